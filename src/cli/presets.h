/*
 * presets.h — model presets by name, shared by every command that takes --preset NAME,
 * and the default dataset of cmoe train.
 *
 * NAME.json is looked up in ./configs, then in $CMOE_CONFIGS, then in the installed
 * $(pkgdatadir)/configs; a name found nowhere may still be a built-in preset (laptop,
 * tiny: moe_model_config_preset).
 */
#ifndef CMOE_CLI_PRESETS_H
#define CMOE_CLI_PRESETS_H

#include <stddef.h>

#include "model/model.h"

/* path [n] = the file of preset name; MOE_ERR_IO (message lists where it looked) when none. */
moe_status cli_preset_find(const char *name, char *path, size_t n);

/* Loads preset name into c; src [n] says where it came from (a path or "preset X (built in)"). */
moe_status cli_preset_load(const char *name, moe_model_config *c, char *src, size_t n);

/* Calls fn for each preset name found (files in the search path, first one wins, then the
 * built-in ones), in the order of the search path, each directory's names sorted. */
void cli_preset_list(void (*fn)(const char *name, const char *path, void *ctx), void *ctx);

/* The shipped corpus `cmoe train` uses without --data. */
#define CLI_DEFAULT_DATA "datasets/brown/brown.txt.gz"

/* out [n] = the default dataset: ./datasets/brown, then $CMOE_DATA (a file, or a directory
 * that holds brown/brown.txt.gz like the source tree's datasets/), then the installed one;
 * MOE_ERR_IO saying what to do when none is there. */
moe_status cli_default_data(char *out, size_t n);

#endif
