/* The model's numbers in words: what went non-finite in a diverging run, and what a
 * model too large for the machine is made of (model.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "model/model.h"

moe_status moe_model_explain_nonfinite(moe_model *m, int grads, char *buf, size_t n, int *found)
{
    const int np = moe_model_n_params(m);
    int64_t big = 1;
    for (int i = 0; i < np; i++)
        if (moe_model_param(m, i)->numel > big)
            big = moe_model_param(m, i)->numel;
    double *v = malloc((size_t)big * sizeof *v);
    if (!v)
        return moe_error(MOE_ERR_NOMEM, "out of memory scanning %lld values", (long long)big);
    moe_status s = MOE_OK;
    double top = 0;
    int top_i = 0, bad = 0;
    for (int i = 0; i < np && !bad; i++) {
        const moe_param_info *p = moe_model_param(m, i);
        if ((s = grads ? moe_model_get_grad(m, i, v) : moe_model_get_param(m, i, v)))
            break;
        int64_t e = moe_first_nonfinite(v, p->numel);
        if (e >= 0) {
            snprintf(buf, n, "%s '%s' is not finite (element %lld of %lld is %g)", grads ? "the gradient of" : "parameter",
                     p->name, (long long)e, (long long)p->numel, v[e]);
            bad = 1;
        }
        for (int64_t k = 0; k < p->numel; k++)
            if (fabs(v[k]) > top) {
                top = fabs(v[k]);
                top_i = i;
            }
    }
    if (!s && !bad)
        snprintf(buf, n, "every %s is finite; the largest |%s| is %g, in '%s'", grads ? "gradient" : "parameter",
                 grads ? "gradient" : "parameter", top, moe_model_param(m, top_i)->name);
    if (found)
        *found = bad;
    free(v);
    return s;
}

moe_status moe_model_size_error(const moe_model_config *c, int64_t tokens)
{
    char why[1024]; /* moe_error writes into the buffer moe_last_error returns */
    snprintf(why, sizeof why, "%s", moe_last_error());
    return moe_error(MOE_ERR_NOMEM,
                     "model: %s. The config asks for %lld parameters (hidden_size %lld, num_hidden_layers %lld, "
                     "vocab_size %lld, num_local_experts %lld, moe_intermediate_size %lld, intermediate_size %lld), "
                     "held twice (weights and gradients), and activations for %lld tokens (batch x seq)",
                     why, (long long)moe_model_config_param_count(c), (long long)c->hidden_size,
                     (long long)c->num_hidden_layers, (long long)c->vocab_size, (long long)c->moe.n_experts,
                     (long long)c->moe_intermediate_size, (long long)c->intermediate_size, (long long)tokens);
}
