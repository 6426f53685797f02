/* Stop signals of long commands (signals.h). */
#define _POSIX_C_SOURCE 200809L
#include <string.h>
#include <unistd.h>

#include "signals.h"

/* The first SIGINT, SIGTERM or SIGHUP asks the loop to stop after its step; a second one
 * (of any of them) ends the process at once, by the signal's own default action. */
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig)
{
    static const char msg[] = "\ncmoe train: stopping after this step (a checkpoint is saved); a second signal "
                              "stops at once\n";
    if (stop_signal) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    stop_signal = sig;
    ssize_t k = write(STDERR_FILENO, msg, sizeof msg - 1); /* async-signal-safe, unlike stdio */
    (void)k;
}

static const int stop_signals[] = {SIGINT, SIGTERM, SIGHUP};

void cli_stop_catch(struct sigaction *old)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART; /* writes and reads carry on; the loop looks at the flag */
    sigemptyset(&sa.sa_mask);
    stop_signal = 0;
    for (int i = 0; i < 3; i++)
        sigaction(stop_signals[i], &sa, &old[i]);
}

void cli_stop_restore(const struct sigaction *old)
{
    for (int i = 0; i < 3; i++)
        sigaction(stop_signals[i], &old[i], NULL);
}

int cli_stop_signal(void)
{
    return (int)stop_signal;
}
