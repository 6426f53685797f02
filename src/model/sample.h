/*
 * sample.h — picking the next token from one row of logits, for `cmoe sample`.
 * Host-side, in double (backends download logits as double), one version for all
 * backends. The uniform draw u comes from the caller (Philox keyed by the seed), so
 * a sample is reproducible.
 */
#ifndef CMOE_SAMPLE_H
#define CMOE_SAMPLE_H

#include "cmoe.h"

/*
 * The sampling distribution: softmax(logits / temperature), then top-k (the k most
 * probable), then top-p (the smallest set of the most probable whose mass reaches
 * top_p, the token that crosses it included), renormalised; filtered tokens get 0.
 * The same order as Hugging Face's warpers. Ties go to the lower token id.
 * temperature 0: greedy (probability 1 on the argmax). top_k <= 0 or >= V: no top-k.
 * top_p >= 1: no top-p. Errors (MOE_ERR_ARG) name the field: a non-finite logit,
 * temperature < 0, top_p <= 0, V <= 0.
 */
moe_status moe_sample_probs(double *probs /* [V] */, const double *logits /* [V] */, int64_t V,
                            double temperature, int64_t top_k, double top_p);
/* The first token whose cumulative probability exceeds u·Σprobs, u in [0, 1). */
int32_t moe_sample_pick(const double *probs /* [V] */, int64_t V, double u);
/* moe_sample_probs then moe_sample_pick; probs is the caller's scratch. */
moe_status moe_sample_token(int32_t *token, double *probs /* [V] scratch */, const double *logits /* [V] */,
                            int64_t V, double temperature, int64_t top_k, double top_p, double u);

#endif
