/*
 * The synthetic multi-task generator (languages described in data.h). Every draw is a
 * Philox block keyed by the generator's seed, so a sequence is a pure function of
 * (config, index) and needs no tables: training tests, the MI loss and the expert
 * specialisation demo all see the same data on every backend and rank.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/data.h"

/* Sub-streams of MOE_RNG_DATA (folded in above bit 8, like the layer index). */
enum { SYNTH_TABLE = 1, SYNTH_SEQ = 2 };

static uint32_t draw(const moe_synth_config *c, uint32_t sub, uint32_t a, uint32_t b, uint32_t t)
{
    const uint32_t ctr[4] = {a, b, t, MOE_RNG_DATA | (sub << 8)};
    const uint32_t key[2] = {(uint32_t)c->seed, (uint32_t)(c->seed >> 32)};
    uint32_t o[4];
    moe_philox4x32_10(ctr, key, o);
    return o[0];
}

void moe_synth_config_default(moe_synth_config *c)
{
    c->n_tasks = 4;
    c->vocab = 32;
    c->seed = 1;
    c->n_val = 64;
}

moe_status moe_synth_config_validate(const moe_synth_config *c)
{
    if (c->n_tasks < 1)
        return moe_error(MOE_ERR_ARG, "synth: tasks %lld must be at least 1", (long long)c->n_tasks);
    if (c->vocab < 4 || c->vocab > 65536)
        return moe_error(MOE_ERR_ARG, "synth: vocab %lld is not in [4, 65536]", (long long)c->vocab);
    /* counting strides 1, 3, 5, ... must stay distinct below vocab */
    if (c->vocab < 2 * c->n_tasks)
        return moe_error(MOE_ERR_ARG, "synth: vocab %lld is smaller than 2 x tasks (%lld)", (long long)c->vocab,
                         (long long)c->n_tasks);
    if (c->n_val < 0)
        return moe_error(MOE_ERR_ARG, "synth: val %lld is negative", (long long)c->n_val);
    return MOE_OK;
}

moe_status moe_synth_config_parse(const char *spec, moe_synth_config *c)
{
    char *copy = strdup(spec ? spec : "");
    if (!copy)
        return moe_error(MOE_ERR_NOMEM, "synth: out of memory");
    moe_status st = MOE_OK;
    char *save = NULL;
    for (char *kv = strtok_r(copy, ",", &save); kv && st == MOE_OK; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) {
            st = moe_error(MOE_ERR_ARG, "synth: '%s' is not key=value (keys: tasks, vocab, seed, val)", kv);
            break;
        }
        *eq = '\0';
        char *end;
        errno = 0;
        unsigned long long v = strtoull(eq + 1, &end, 10);
        if (errno || end == eq + 1 || *end || eq[1] == '-') {
            st = moe_error(MOE_ERR_ARG, "synth: %s='%s' is not a non-negative integer", kv, eq + 1);
            break;
        }
        if (strcmp(kv, "tasks") == 0)
            c->n_tasks = v > INT64_MAX ? INT64_MAX : (int64_t)v;
        else if (strcmp(kv, "vocab") == 0)
            c->vocab = v > INT64_MAX ? INT64_MAX : (int64_t)v;
        else if (strcmp(kv, "seed") == 0)
            c->seed = v;
        else if (strcmp(kv, "val") == 0)
            c->n_val = v > INT64_MAX ? INT64_MAX : (int64_t)v;
        else
            st = moe_error(MOE_ERR_ARG, "synth: unknown key '%s' (keys: tasks, vocab, seed, val)", kv);
    }
    free(copy);
    return st;
}

int32_t moe_synth_task(const moe_synth_config *c, uint64_t index)
{
    return (int32_t)(index % (uint64_t)c->n_tasks);
}

int32_t moe_synth_next(const moe_synth_config *c, uint64_t index, int64_t t, int32_t prev)
{
    const uint32_t V = (uint32_t)c->vocab;
    const uint32_t m = (uint32_t)moe_synth_task(c, index);
    if (m % 2 == 0)
        return (int32_t)(((uint32_t)prev + m + 1) % V);
    /* the successor pair of prev in task m, the same for every sequence */
    uint32_t a = draw(c, SYNTH_TABLE, m, (uint32_t)prev, 0) % V;
    uint32_t b = (a + 1 + draw(c, SYNTH_TABLE, m, (uint32_t)prev, 1) % (V - 1)) % V;
    uint32_t r = draw(c, SYNTH_SEQ, (uint32_t)index, (uint32_t)(index >> 32), (uint32_t)t);
    return (int32_t)((r & 3) ? a : b); /* a with probability 3/4 */
}

moe_status moe_synth_sequence(const moe_synth_config *c, uint64_t index, int64_t len, int32_t *tokens,
                              int32_t *task_ids)
{
    if (!c || (!tokens && len > 0))
        return moe_error(MOE_ERR_ARG, "synth: config or tokens is NULL");
    if (len < 0 || len > UINT32_MAX)
        return moe_error(MOE_ERR_ARG, "synth: length %lld is not in [0, 2^32)", (long long)len);
    moe_status st = moe_synth_config_validate(c);
    if (st != MOE_OK)
        return st;
    if (len == 0)
        return MOE_OK;
    tokens[0] = (int32_t)(draw(c, SYNTH_SEQ, (uint32_t)index, (uint32_t)(index >> 32), 0) % (uint32_t)c->vocab);
    for (int64_t t = 1; t < len; t++)
        tokens[t] = moe_synth_next(c, index, t, tokens[t - 1]);
    if (task_ids) {
        int32_t m = moe_synth_task(c, index);
        for (int64_t t = 0; t < len; t++)
            task_ids[t] = m;
    }
    return MOE_OK;
}
