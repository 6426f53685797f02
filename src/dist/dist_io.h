/*
 * dist_io.h — whole tensors from a model split over ranks, for the files that hold them
 * (checkpoints, the weights): expert shards gathered over the expert-parallel group, ZeRO-1
 * parts of the moments gathered over every rank. Files always hold whole tensors, so a run
 * saved under one layout resumes under any other (checkpoint.h reads a shard's slice).
 *
 *     moe_dist_write(d, m, o, my_writer, ctx);   // every rank calls; rank 0's writer writes
 */
#ifndef CMOE_DIST_DIST_IO_H
#define CMOE_DIST_DIST_IO_H

#include "dist/dist.h"
#include "io/checkpoint.h"

/* A writer on rank 0: calls get(gctx, i, p, m, v) once for each parameter i in table order
 * (m, v NULL: the parameter only) and writes what it gets. */
typedef moe_status (*moe_dist_writer)(void *wctx, moe_ckpt_get_fn get, void *gctx);

/* Every rank: rank 0 runs write with a get that gathers (collectively: the other ranks
 * take part in each gather); the result is rank 0's, on every rank. o may be NULL when
 * the writer asks for parameters only. */
moe_status moe_dist_write(moe_dist *d, moe_model *m, moe_optim *o, moe_dist_writer write, void *wctx);
/* The checkpoint of the whole state through moe_dist_write. */
moe_status moe_dist_ckpt_save(moe_dist *d, const char *path, moe_model *m, moe_optim *o, const moe_ckpt_state *st);

#endif
