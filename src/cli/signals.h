/*
 * signals.h — stopping a long command cleanly: the first SIGINT, SIGTERM or SIGHUP
 * (Ctrl-C, kill, docker stop, Slurm's --signal) sets a flag that the command reads between
 * steps; a second one ends the process at once, by the signal's own default action.
 */
#ifndef CMOE_CLI_SIGNALS_H
#define CMOE_CLI_SIGNALS_H

#include <signal.h>

/* Installs the handlers (old [3] keeps the previous ones) and clears the flag. */
void cli_stop_catch(struct sigaction *old);
void cli_stop_restore(const struct sigaction *old);
/* The first stop signal received (0: none). */
int cli_stop_signal(void);

#endif
