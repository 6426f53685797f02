/*
 * presets.h — model presets by name, shared by every command that takes --preset NAME.
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

#endif
