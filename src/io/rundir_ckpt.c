/*
 * Checkpoints of a run directory (rundir.h): names, rotation (--keep), and the choice of
 * the checkpoint --resume continues from: the newest that is valid, saying which newer ones
 * failed and why, so one corrupt file (a crash, a full disk, a bad copy) does not block a
 * run that has an older good one.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/rundir.h"

#define CKPT_PREFIX "ckpt-"
#define CKPT_SUFFIX ".safetensors"

/* STEP of a name "ckpt-STEP.safetensors" (decimal digits only), or -1 */
static int64_t step_of(const char *name)
{
    const size_t np = strlen(CKPT_PREFIX), ns = strlen(CKPT_SUFFIX), n = strlen(name);
    if (n <= np + ns || n - np - ns > 18 || strncmp(name, CKPT_PREFIX, np) || strcmp(name + n - ns, CKPT_SUFFIX))
        return -1;
    int64_t v = 0;
    for (size_t i = np; i < n - ns; i++) {
        if (name[i] < '0' || name[i] > '9')
            return -1;
        v = 10 * v + (name[i] - '0');
    }
    return v;
}

moe_status moe_ckpt_path(char *buf, size_t n, const char *dir, int64_t step)
{
    int k = snprintf(buf, n, "%s/" CKPT_PREFIX "%" PRId64 CKPT_SUFFIX, dir, step);
    if (k < 0 || (size_t)k >= n)
        return moe_error(MOE_ERR_ARG, "checkpoint path in '%s' is too long", dir);
    return MOE_OK;
}

moe_status moe_ckpt_list(const char *dir, int64_t **steps, int *n)
{
    *steps = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d)
        return moe_error(MOE_ERR_IO, "cannot read directory '%s': %s", dir, strerror(errno));
    int cap = 0;
    moe_status s = MOE_OK;
    for (struct dirent *e; (e = readdir(d));) {
        int64_t st = step_of(e->d_name);
        if (st < 0)
            continue;
        if (*n == cap) {
            int64_t *ns = realloc(*steps, (size_t)(cap = cap ? 2 * cap : 16) * sizeof *ns);
            if (!ns) {
                s = moe_error(MOE_ERR_NOMEM, "out of memory");
                break;
            }
            *steps = ns;
        }
        (*steps)[(*n)++] = st;
    }
    closedir(d);
    for (int i = 1; i < *n; i++) /* insertion sort: a handful of files */
        for (int j = i; j > 0 && (*steps)[j - 1] > (*steps)[j]; j--) {
            int64_t t = (*steps)[j];
            (*steps)[j] = (*steps)[j - 1];
            (*steps)[j - 1] = t;
        }
    return s;
}

moe_status moe_ckpt_prune(const char *dir, int64_t after, int64_t keep, int *removed_after)
{
    if (removed_after)
        *removed_after = 0;
    int64_t *steps;
    int n;
    moe_status s = moe_ckpt_list(dir, &steps, &n);
    if (s)
        return s;
    char path[4200];
    int kept = 0;
    for (int i = n - 1; i >= 0 && !s; i--) {
        const int later = after >= 0 && steps[i] > after;
        if (!later && (keep <= 0 || kept < keep)) {
            kept++;
            continue;
        }
        if ((s = moe_ckpt_path(path, sizeof path, dir, steps[i])))
            break;
        if (remove(path) != 0 && errno != ENOENT)
            s = moe_error(MOE_ERR_IO, "cannot remove '%s': %s", path, strerror(errno));
        else if (later && removed_after)
            ++*removed_after;
    }
    free(steps);
    return s;
}

moe_status moe_resume_dir(const char *path, char *dir, size_t n)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        return moe_error(MOE_ERR_IO, "--resume '%s': %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) {
        snprintf(dir, n, "%s", path);
        return MOE_OK;
    }
    if (!S_ISREG(sb.st_mode))
        return moe_error(MOE_ERR_IO, "--resume '%s' is neither a run directory nor a checkpoint file", path);
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, n, ".");
    else if (slash == path)
        snprintf(dir, n, "/");
    else
        snprintf(dir, n, "%.*s", (int)(slash - path), path);
    return MOE_OK;
}

/* The checkpoint at path against the run's config (as JSON): opened, CRC and metadata
 * checked, the same model. */
static moe_status try_ckpt(const char *path, const char *run_cfg, moe_ckpt **out)
{
    moe_ckpt *ck;
    moe_status s = moe_ckpt_open(path, &ck);
    if (s)
        return s;
    char *b = NULL;
    if (!(s = moe_model_config_to_json(&ck->cfg, 0, &b)) && strcmp(run_cfg, b))
        s = moe_error(MOE_ERR_FORMAT, "%s: the checkpoint's config does not match the run's config.json (another "
                      "run's checkpoint?)", path);
    free(b);
    if (s) {
        moe_ckpt_free(ck);
        return s;
    }
    *out = ck;
    return MOE_OK;
}

/* "text\n" appended to *notes */
static void add_note(char **notes, const char *text)
{
    size_t had = *notes ? strlen(*notes) : 0, n = strlen(text);
    char *m = realloc(*notes, had + n + 2);
    if (!m)
        return;
    memcpy(m + had, text, n);
    m[had + n] = '\n';
    m[had + n + 1] = '\0';
    *notes = m;
}

moe_status moe_resume_find(const char *path, moe_resume_point *rp)
{
    memset(rp, 0, sizeof *rp);
    moe_status s = moe_resume_dir(path, rp->dir, sizeof rp->dir);
    if (s)
        return s;
    char cfg_path[4200], *run_cfg = NULL;
    moe_model_config dc;
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", rp->dir);
    if ((s = moe_model_config_load(cfg_path, &dc))) {
        char why[1024]; /* moe_error writes into the buffer moe_last_error returns */
        snprintf(why, sizeof why, "%s", moe_last_error());
        return moe_error(s, "--resume: the run's %s: %s", cfg_path, why);
    }
    if ((s = moe_model_config_to_json(&dc, 0, &run_cfg)))
        return s;
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISREG(sb.st_mode)) { /* that file or nothing */
        snprintf(rp->path, sizeof rp->path, "%s", path);
        s = try_ckpt(path, run_cfg, &rp->ck);
        free(run_cfg);
        return s;
    }
    int64_t *steps;
    int n;
    if ((s = moe_ckpt_list(rp->dir, &steps, &n))) {
        free(run_cfg);
        return s;
    }
    char *failures = NULL;
    for (int i = n - 1; i >= 0; i--) {
        if ((s = moe_ckpt_path(rp->path, sizeof rp->path, rp->dir, steps[i])))
            break;
        if (!(s = try_ckpt(rp->path, run_cfg, &rp->ck)))
            break;
        add_note(&failures, moe_last_error());
    }
    free(steps);
    free(run_cfg);
    if (!n) {
        return moe_error(MOE_ERR_IO, "--resume '%s': no checkpoint (ckpt-STEP.safetensors) in it; 'cmoe train "
                         "--save-every N' writes them (and so does stopping it with Ctrl-C or kill)", path);
    }
    if (s) {
        char msg[900];
        snprintf(msg, sizeof msg, "%s", failures ? failures : "");
        free(failures);
        size_t k = strlen(msg);
        while (k && msg[k - 1] == '\n')
            msg[--k] = '\0';
        for (char *p = msg; (p = strchr(p, '\n'));)
            *p = ';', p++;
        return moe_error(MOE_ERR_FORMAT, "--resume '%s': no valid checkpoint: %s", path, msg);
    }
    rp->notes = failures;
    return MOE_OK;
}

void moe_resume_point_free(moe_resume_point *rp)
{
    moe_ckpt_free(rp->ck);
    free(rp->notes);
    memset(rp, 0, sizeof *rp);
}
