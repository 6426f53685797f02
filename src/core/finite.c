/* Scanning values for NaN and ±Inf: what `cmoe oracle`, `eval`, `import` and the
 * training-divergence message use to name the tensor and element that went bad. */
#include <math.h>

#include "cmoe.h"

int64_t moe_first_nonfinite(const double *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return i;
    return -1;
}

moe_status moe_check_finite(moe_status s, const char *what, const double *x, int64_t n)
{
    int64_t i = moe_first_nonfinite(x, n);
    if (i < 0)
        return MOE_OK;
    return moe_error(s, "%s is not finite: element %lld (of %lld) is %g", what, (long long)i, (long long)n, x[i]);
}
