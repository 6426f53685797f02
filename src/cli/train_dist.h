/*
 * train_dist.h — what `cmoe train` does differently under mpirun or srun, or with
 * --groups > 1 in one process (src/dist/): rank 0 alone owns the run directory, prints and
 * writes; every rank reads its share of each batch and takes part in every gather; the
 * ranks agree on their settings before anything else, on stopping after a signal, and on
 * whether a step failed.
 */
#ifndef CMOE_CLI_TRAIN_DIST_H
#define CMOE_CLI_TRAIN_DIST_H

#include "dist/dist.h"
#include "dist/groups.h"
#include "io/rundir.h"

typedef struct {
    moe_comm *world;    /* the job: one process unless launched by MPI */
    int rank, size;
    moe_dist_options o; /* --ep, --a2a, --ranks-per-node, --a2a-chunks, --zero */
    moe_dist *d;        /* the layout, when the group path runs */
    moe_gtrain *g;
} cli_dist;

/* One of train's layout options (name without "--": ep, groups, a2a, ranks-per-node,
 * a2a-chunks, a2a-max-rows, zero) into o (and *groups); else 1 with the message in err. */
int cli_dist_option(const char *name, const char *arg, moe_dist_options *o, int64_t *groups, char *err, size_t n);

/* Joins the job (MPI_Init when launched by MPI); on ranks other than 0 stdout goes to
 * /dev/null (rank 0 speaks for the job; errors still reach stderr, naming the rank). */
moe_status cli_dist_init(cli_dist *c);
/* The layout and trainer (not the world). */
void cli_dist_free(cli_dist *c);
/* The world and MPI. */
void cli_dist_finish(cli_dist *c);
/* Whether training runs through groups (several ranks, or --groups > 1). */
int cli_dist_active(const cli_dist *c, int64_t groups);

/* why, prefixed "rank R: " on a rank other than 0 (unless it names its rank already). */
const char *cli_dist_who(const cli_dist *c, const char *why, char *buf, size_t n);
/* This rank failed inside a step while the others wait in it: says why and ends the job
 * (MPI_Abort; mpirun names the rank that aborted). */
void cli_dist_abort(cli_dist *c, const char *why);

/* Every rank's status (collective; one process: s). */
moe_status cli_dist_all_ok(cli_dist *c, moe_status s, const char *what);
/* Rank 0's status and string buf [n] to every rank (collective). */
moe_status cli_dist_share(cli_dist *c, moe_status s, char *buf, size_t n, const char *what);
/* The largest v over the ranks (a stop signal's number, 0: none). */
int cli_dist_max(cli_dist *c, int v);

/* The ranks compare the config, the settings, the data's identity, the layout options and
 * cmoe's version (moe_dist_agree). */
moe_status cli_dist_agree(cli_dist *c, const moe_model_config *cfg, const moe_train_settings *t,
                          const moe_dataset *d);
/* The layout, the model on its exchange (a group's sequences per pass), the trainer and
 * its optimizer. */
moe_status cli_dist_setup(cli_dist *c, const moe_model_config *cfg, moe_backend *b, const moe_train_settings *t,
                          moe_model **m, moe_optim **opt);
/* Lines for the start of the log: the layout and the memory per rank. */
void cli_dist_describe(const cli_dist *c, FILE *out);

/* At the end: the all-to-all's bytes per rank per step and its share of the step time
 * (this rank's counters), beside what data parallelism would all-reduce instead. */
void cli_dist_report(cli_dist *c, const moe_model *m, int64_t steps, double train_time, FILE *out);

/* The weights (model.safetensors) and a checkpoint, whole tensors gathered; every rank
 * calls, rank 0 writes (ok = 0: rank 0 failed before, only take part). */
moe_status cli_dist_save_weights(cli_dist *c, const char *dir, moe_model *m, const char *train_json, int64_t step);
moe_status cli_dist_save_ckpt(cli_dist *c, const char *path, moe_model *m, moe_optim *o, const moe_ckpt_state *st,
                              moe_status before);

#endif
