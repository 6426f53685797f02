/*
 * checkpoint.h — the full training state in one safetensors file, for `cmoe train
 * --save-every` / `--resume`.
 *
 * Tensors (cmoe names, model.h's table; the layout of the backend's parameters):
 *   NAME            every parameter of the model (the router bias of aux-loss-free
 *                   balancing is one of them: it is state, updated every step)
 *   optim.m.NAME    AdamW's first moment of NAME
 *   optim.v.NAME    AdamW's second moment of NAME
 * all of one dtype: F32 when the backend holds fp32 (cpu), F64 when it holds double
 * (ref), so that the values written are exactly the values held and a resumed run is
 * bitwise the uninterrupted one. __metadata__ (strings):
 *   format       "cmoe-checkpoint-1"
 *   dtype        "F32" or "F64" (every tensor has it)
 *   config       the model configuration (moe_model_config_to_json)
 *   train        the training settings (JSON object, the CLI's train.json); optional
 *   step         optimizer steps done
 *   optim_steps  AdamW's t (bias correction), <= step
 *   seed         the run's seed (initialisation, data order)
 *   data_step    the data position: batches are a pure function of (seed, step, micro)
 *                (data.h), so it equals step; kept apart so the format says it
 *   state        other run state as a JSON object (elapsed seconds, ...); optional
 *   cmoe_version, crc32 (zlib CRC-32 of the data section, written by the writer)
 *
 * What else feeds a step needs no state: the learning rate is a pure function of
 * (optimizer config, step), Philox draws are keyed by (seed, step, ...), and each
 * step's statistics start from zero.
 *
 *     moe_ckpt_state st = {.step = 100, .optim_steps = 100, .seed = 1337, .train_json = tj};
 *     moe_ckpt_save("run/ckpt-100.safetensors", model, optim, &st);   // atomic
 *     ...
 *     moe_ckpt *ck;
 *     moe_ckpt_open("run/ckpt-100.safetensors", &ck);   // file, metadata, config
 *     moe_model_create(&ck->cfg, backend, B, S, &m);  moe_optim_create(m, &oc, &o);
 *     moe_ckpt_restore(ck, m, o);                       // validates every tensor first
 *     moe_ckpt_free(ck);
 */
#ifndef CMOE_CHECKPOINT_H
#define CMOE_CHECKPOINT_H

#include "model/model.h"
#include "io/safetensors.h"

#define MOE_CKPT_FORMAT "cmoe-checkpoint-1"

typedef struct {
    int64_t step;           /* optimizer steps done */
    int64_t optim_steps;    /* AdamW's t */
    uint64_t seed;
    const char *train_json; /* JSON object or NULL */
    const char *state_json; /* JSON object or NULL */
} moe_ckpt_state;

/* Writes PATH atomically (safetensors writer: PATH.tmp, fsync, rename, fsync of the
 * directory): every parameter, both moments, the metadata above. The model must hold
 * every tensor whole (one process; a sharded model saves through moe_ckpt_save_with). */
moe_status moe_ckpt_save(const char *path, moe_model *m, moe_optim *o, const moe_ckpt_state *st);

/* Parameter i's whole tensor and its moments, into p, m, v [whole numel] (expert
 * parallelism gathers the shards: src/dist/dist_io.h). */
typedef moe_status (*moe_ckpt_get_fn)(void *ctx, int i, double *p, double *m, double *v);
/* The same file from tensors that get provides, with the whole shapes
 * (moe_ckpt_full_info): any layout's checkpoint loads under any other. get is called once
 * per parameter in table order (it may be collective), and the file is assembled in host
 * memory before it is written. */
moe_status moe_ckpt_save_with(const char *path, const moe_model *m, moe_ckpt_get_fn get, void *ctx,
                              const moe_ckpt_state *st);
/* The whole tensor's info of a parameter that may be a shard (shape[0] × shards). */
void moe_ckpt_full_info(const moe_param_info *p, moe_param_info *full);

typedef struct {
    moe_st_file *f;
    moe_model_config cfg;   /* from metadata config, validated */
    char *config_json;      /* the metadata config as written */
    moe_st_dtype dtype;     /* MOE_ST_F32 or MOE_ST_F64 */
    int64_t step, optim_steps, data_step;
    uint64_t seed;
    char *train_json;       /* NULL when absent */
    char *state_json;       /* NULL when absent */
} moe_ckpt;

/*
 * Reads PATH and checks everything that does not need a model: the safetensors
 * structure (bounded header, JSON, dtypes, offsets in range and not overlapping), the
 * CRC-32 (required here), the format version, the metadata (each field parsed and
 * range checked), the config, one dtype for every tensor. MOE_ERR_FORMAT names the file
 * and the problem.
 */
moe_status moe_ckpt_open(const char *path, moe_ckpt **out);
void moe_ckpt_free(moe_ckpt *c);

/* Checks the tensors against the model: the config matches the model's, every
 * parameter and both of its moments are there with the model's shape (the whole tensor's,
 * for an expert shard), no other tensor, every value finite. Changes nothing. */
moe_status moe_ckpt_check(const moe_ckpt *c, const moe_model *m);

/* moe_ckpt_check, then sets the parameters, the moments (o may be NULL: weights only)
 * and AdamW's t; an expert shard takes its slice of each whole tensor, a ZeRO-1 optimizer
 * its part of the moments: resharding. Nothing is set when the check fails. */
moe_status moe_ckpt_restore(const moe_ckpt *c, moe_model *m, moe_optim *o);

#endif
