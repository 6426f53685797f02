/* Model presets by name: ./configs, $CMOE_CONFIGS, $(pkgdatadir)/configs, built-ins; and
 * the default dataset, found the same way. */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "presets.h"

enum { N_DIRS = 3 };

/* The search path; absent entries are NULL. */
static void search_dirs(const char *dirs[N_DIRS], char *installed, size_t n)
{
    const char *env = getenv("CMOE_CONFIGS");
    dirs[0] = "configs";
    dirs[1] = env && *env ? env : NULL;
    dirs[2] = NULL;
#ifdef CMOE_PKGDATADIR
    if (snprintf(installed, n, "%s/configs", CMOE_PKGDATADIR) < (int)n)
        dirs[2] = installed;
#else
    (void)installed;
    (void)n;
#endif
}

static int is_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static const char *const builtins[] = {"laptop", "tiny"};

moe_status cli_preset_find(const char *name, char *path, size_t n)
{
    if (!name || !*name || strchr(name, '/'))
        return moe_error(MOE_ERR_ARG, "--preset '%s': a preset is a name (e.g. mixtral-8x7b); pass a file with "
                         "--config", name ? name : "");
    const char *dirs[N_DIRS];
    char installed[4096], where[8192] = "";
    search_dirs(dirs, installed, sizeof installed);
    size_t at = 0;
    for (int i = 0; i < N_DIRS; i++) {
        if (!dirs[i])
            continue;
        if (snprintf(path, n, "%s/%s.json", dirs[i], name) < (int)n && is_file(path))
            return MOE_OK;
        if (at < sizeof where)
            at += (size_t)snprintf(where + at, sizeof where - at, "%s%s/", at ? ", " : "", dirs[i]);
    }
    return moe_error(MOE_ERR_IO, "no preset '%s': no %s.json in %s%s", name, name, where,
                     getenv("CMOE_CONFIGS") && *getenv("CMOE_CONFIGS") ? ""
                                                                        : " (set CMOE_CONFIGS to a directory of presets)");
}

moe_status cli_preset_load(const char *name, moe_model_config *c, char *src, size_t n)
{
    char path[4096];
    if (cli_preset_find(name, path, sizeof path) == MOE_OK) {
        snprintf(src, n, "%s", path);
        return moe_model_config_load(path, c);
    }
    if (name && !strchr(name, '/'))
        for (size_t i = 0; i < sizeof builtins / sizeof *builtins; i++)
            if (!strcmp(name, builtins[i])) {
                snprintf(src, n, "preset %s (built in)", name);
                return moe_model_config_preset(name, c);
            }
    return cli_preset_find(name, path, sizeof path); /* its message */
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* name already reported? (the first directory of the search path wins) */
static int seen(char **names, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(names[i], name))
            return 1;
    return 0;
}

void cli_preset_list(void (*fn)(const char *name, const char *path, void *ctx), void *ctx)
{
    const char *dirs[N_DIRS];
    char installed[4096];
    search_dirs(dirs, installed, sizeof installed);
    enum { MAX_NAMES = 1024 };
    char *names[MAX_NAMES];
    int n = 0;
    for (int i = 0; i < N_DIRS; i++) {
        DIR *d = dirs[i] ? opendir(dirs[i]) : NULL;
        if (!d)
            continue;
        int first = n;
        struct dirent *e;
        while ((e = readdir(d)) && n < MAX_NAMES) {
            size_t len = strlen(e->d_name);
            if (len <= 5 || strcmp(e->d_name + len - 5, ".json") || e->d_name[0] == '.')
                continue;
            char *name = strndup(e->d_name, len - 5);
            if (name && !seen(names, n, name))
                names[n++] = name;
            else
                free(name);
        }
        closedir(d);
        qsort(names + first, (size_t)(n - first), sizeof *names, cmp_str);
        for (int j = first; j < n; j++) {
            char path[8192];
            snprintf(path, sizeof path, "%s/%s.json", dirs[i], names[j]);
            fn(names[j], path, ctx);
        }
    }
    for (size_t i = 0; i < sizeof builtins / sizeof *builtins; i++)
        if (!seen(names, n, builtins[i]))
            fn(builtins[i], NULL, ctx);
    for (int i = 0; i < n; i++)
        free(names[i]);
}

/* ---- the default dataset ---------------------------------------------------------- */

static int file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

moe_status cli_default_data(char *out, size_t n)
{
    const char *env = getenv("CMOE_DATA");
    char env_brown[4096] = "";
    if (env && *env)
        snprintf(env_brown, sizeof env_brown, "%s/brown/brown.txt.gz", env);
    const char *cand[3] = {CLI_DEFAULT_DATA, env && *env ? env : "", env_brown};
    for (int i = 0; i < 3; i++)
        if (*cand[i] && strlen(cand[i]) < n && file_exists(cand[i])) {
            memcpy(out, cand[i], strlen(cand[i]) + 1);
            return MOE_OK;
        }
#ifdef CMOE_PKGDATADIR
    snprintf(out, n, "%s/datasets/brown/brown.txt.gz", CMOE_PKGDATADIR);
    if (file_exists(out))
        return MOE_OK;
#endif
    return moe_error(MOE_ERR_IO,
                     "no --data given and the default dataset %s is not here%s; run from the cmoe source "
                     "tree, set CMOE_DATA to its datasets/ directory, or pass --data PATH (text, .gz, an llm.c "
                     "shard, a directory of shards, or synth)",
                     CLI_DEFAULT_DATA, env && *env ? " nor under $CMOE_DATA" : " (and CMOE_DATA is not set)");
}
