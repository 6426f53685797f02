/*
 * sample.h — decoding within the context a model was trained on, and picking the next
 * token from one row of logits, for `cmoe sample`. Host-side, in double (backends
 * download logits as double), one version for all backends. The uniform draw u comes
 * from the caller (Philox keyed by the seed), so a sample is reproducible.
 *
 *     moe_decoder d;
 *     moe_decoder_init(&d, model, seq);           // seq: what the model trained on
 *     for (i = 0; i < n_prompt; i++) moe_decoder_push(&d, prompt[i], logits);
 *     for (;;) { moe_sample_token(&tok, probs, logits, V, T, k, p, u); moe_decoder_push(&d, tok, logits); }
 *     moe_decoder_free(&d);
 */
#ifndef CMOE_SAMPLE_H
#define CMOE_SAMPLE_H

#include "cmoe.h"
#include "model/model.h"

/*
 * Decoding one token at a time through the KV cache (moe_model_decode) within a window
 * of W positions, W being the sequence length the model was trained on: a model run at
 * positions it never saw turns to gibberish (RoPE gives keys there rotations, and
 * queries distances, that training never showed). When the window is full, the last
 * keep = W/2 tokens are re-encoded at positions 0 .. keep−1 — their keys and values
 * recomputed, so no cached key keeps the rotation of its old position — and decoding
 * goes on after them. A slide costs keep decode steps every W − keep tokens.
 */
typedef struct {
    moe_model *m;
    int64_t W, keep; /* the window; tokens kept when it slides */
    int64_t n;       /* tokens in the window now (the next one goes to position n) */
    int64_t slides;  /* times the window slid */
    int32_t *win;    /* [W] the window's tokens */
} moe_decoder;

/* W in [1, max_position_embeddings] and no more than the max_seq m was created for. */
moe_status moe_decoder_init(moe_decoder *d, moe_model *m, int64_t W);
/* Appends token (sliding first when the window is full) and writes the logits [V] of
 * the token after it. */
moe_status moe_decoder_push(moe_decoder *d, int32_t token, double *logits);
void moe_decoder_free(moe_decoder *d);

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
