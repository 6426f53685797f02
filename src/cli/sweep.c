/*
 * cmoe sweep SPEC.json --out DIR — runs a list or grid of training runs (sweep.h), each an
 * ordinary run directory trained by this build's own `cmoe train` (/proc/self/exe) in a
 * child process, one after another, and resumable:
 *
 *  - a run recorded as finished in DIR/sweep.jsonl with the same model and settings (its
 *    key) is not trained again;
 *  - a run with a checkpoint in DIR/runs/NAME continues with `cmoe train --resume`, bitwise
 *    as if it had not stopped (every child saves a checkpoint every quarter of its steps,
 *    and on INT, TERM, HUP);
 *  - anything else starts fresh.
 *
 * INT, TERM and HUP are forwarded to the child (which saves a checkpoint and stops) and end
 * the sweep with 128 + the signal; a second signal stops the child at once. The child runs
 * in its own process group (a terminal's Ctrl-C reaches it once, through the sweep) and gets
 * TERM when the sweep dies (PR_SET_PDEATHSIG), so `kill -9` of the sweep leaves no trainer
 * behind and its checkpoint resumes.
 */
#define _GNU_SOURCE /* pipe2 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <jansson.h>

#include "cmoe.h"
#include "commands.h"
#include "core/durable.h"
#include "core/input.h"
#include "report.h"
#include "run.h"
#include "sweep.h"

void help_sweep(void)
{
    printf("usage: cmoe sweep SPEC.json --out DIR [--dry-run] [--threads N]\n\n"
           "Trains a list or grid of runs, one after another, each an ordinary run directory\n"
           "(DIR/runs/NAME: cmoe eval, sample, report and export work on it), by running this\n"
           "build's own 'cmoe train'. Resumable: run the same command again after a stop (Ctrl-C,\n"
           "kill, a crash) and finished runs are kept, an interrupted run continues from its\n"
           "checkpoint (bitwise as if it had not stopped), the rest start. A progress line covers\n"
           "the whole sweep (share of its training FLOPs done, ETA).\n\n"
           "DIR gets sweep.jsonl (one record per run: name, model config, settings, grid values,\n"
           "total and active parameters, FLOPs per token, tokens, training FLOPs, wall time, final\n"
           "and best validation loss), report.html (validation loss against training FLOPs and\n"
           "wall time for every run, a table, and the analyses the spec asks for), plots/NAME.svg\n"
           "(the same charts as images), configs/, logs/ (each run's train output) and runs/.\n\n"
           "The spec (JSON; README.md, 'Sweeps'):\n"
           "  \"preset\" | \"config\"   the starting model (default: laptop)\n"
           "  \"model\": {...}        model keys for every run (Hugging Face names)\n"
           "  \"train\": {...}        steps, batch, seq, accum, lr, warmup, seed, data, evals (10),\n"
           "                        eval_every, eval_batches (20), save_every (steps/4), keep (1),\n"
           "                        threads, backend\n"
           "  \"budget\": {\"flops\": X} every run's steps = X / (FLOPs per token x tokens per step),\n"
           "                        rounded: each run spends the same training compute (cmoe\n"
           "                        info's forward+backward FLOPs per token at the run's seq)\n"
           "  \"runs\": [{\"name\", \"preset\"|\"config\", \"model\", \"train\"}, ...]\n"
           "  \"grid\": {\"model.KEY\"|\"train.KEY\": [values]}   crossed with every run; \"{KEY}\"\n"
           "                        in a run's name takes the grid value\n"
           "  \"analysis\": {\"baseline\": NAME, \"fit\": \"clark\", \"load\": true}\n"
           "                        baseline: each run's final-loss gap and the compute it took to\n"
           "                        reach the baseline's final loss; fit: Clark et al.'s\n"
           "                        log L = a log N + b log E + c log N log E + d by least squares;\n"
           "                        load: expert-load imbalance over time beside the loss\n\n"
           "Options:\n"
           "  --out DIR     the sweep's directory: new, empty, or a sweep's to continue\n"
           "  --dry-run     resolve the spec and print the plan (steps, FLOPs, state); write nothing\n"
           "  --threads N   worker threads of every run (changes no result)\n"
           "  --help        this text\n\n"
           "Exit status: 0 every run done; 1 a bad spec (the message names the key) or a run that\n"
           "failed (the others still run; the next invocation retries it); 2 usage; 128 + the\n"
           "signal when stopped by INT, TERM or HUP.\n");
}

static int usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe sweep: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'cmoe help sweep'.\n", stderr);
    return EXIT_USAGE;
}

static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe sweep: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return EXIT_FAIL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- signals ------------------------------------------------------------------------ */

static volatile sig_atomic_t stop_signal;
static volatile pid_t child_pid;

static void on_signal(int sig)
{
    if (!stop_signal)
        stop_signal = sig;
    const pid_t c = child_pid;
    if (c > 0) /* the first stops it after its step (a checkpoint), a second at once */
        kill(c, sig);
}

static const int stop_signals[] = {SIGINT, SIGTERM, SIGHUP};

static void catch_signals(struct sigaction *old)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 3; i++)
        sigaction(stop_signals[i], &sa, &old[i]);
}

static void restore_signals(const struct sigaction *old)
{
    for (int i = 0; i < 3; i++)
        sigaction(stop_signals[i], &old[i], NULL);
}

/* ---- the directory ------------------------------------------------------------------- */

static int exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* DIR new, empty, or a sweep's (it has spec.json). */
static moe_status check_dir(const char *dir, int *is_sweep)
{
    struct stat sb;
    *is_sweep = 0;
    if (stat(dir, &sb) != 0)
        return errno == ENOENT ? MOE_OK : moe_error(MOE_ERR_IO, "--out %s: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return moe_error(MOE_ERR_IO, "--out %s: not a directory", dir);
    char p[4200];
    sweep_path(p, sizeof p, dir, "", "spec.json", "");
    if (exists(p)) {
        *is_sweep = 1;
        return MOE_OK;
    }
    int empty = 1;
    DIR *d = opendir(dir);
    if (!d)
        return moe_error(MOE_ERR_IO, "--out %s: %s", dir, strerror(errno));
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            empty = 0;
    closedir(d);
    if (!empty)
        return moe_error(MOE_ERR_IO, "--out %s: not empty and not a sweep (it has no spec.json); choose a new "
                         "directory", dir);
    return MOE_OK;
}

/* ---- the plan -------------------------------------------------------------------------- */

static void fmt_experts(const sweep_run *r, char *buf, size_t n)
{
    if (!r->info.n_moe_layers)
        snprintf(buf, n, "dense");
    else
        snprintf(buf, n, "%lldx%g", (long long)r->cfg.moe.n_experts, r->info.experts_per_token);
}

typedef enum { ST_DONE, ST_RESUME, ST_NEW } run_state;

static run_state state_of(const sweep_run *r, const char *dir)
{
    if (r->done)
        return ST_DONE;
    char rd[4200], k[4200];
    sweep_path(rd, sizeof rd, dir, "runs", r->name, "");
    sweep_path(k, sizeof k, dir, "keys", r->name, "");
    char *text = NULL;
    size_t len;
    int same = exists(k) && moe_read_all(k, "run key", 64, MOE_IN_REGULAR, &text, &len) == MOE_OK &&
               !strncmp(text, r->key, 8);
    free(text);
    int64_t *steps = NULL;
    int n = 0;
    if (same && exists(rd) && moe_ckpt_list(rd, &steps, &n) == MOE_OK && n > 0) {
        free(steps);
        return ST_RESUME;
    }
    free(steps);
    return ST_NEW;
}

static const char *state_name(run_state s)
{
    return s == ST_DONE ? "done" : s == ST_RESUME ? "resume" : "new";
}

static void print_plan(const sweep_spec *s, const char *dir)
{
    double total = 0;
    printf("%-3s %-28s %-8s %10s %10s %11s %8s %11s %11s  %s\n", "#", "run", "experts", "params", "active",
           "FLOPs/tok", "steps", "tokens", "train FLOPs", "state");
    for (int i = 0; i < s->n; i++) {
        const sweep_run *r = &s->runs[i];
        char e[32];
        fmt_experts(r, e, sizeof e);
        printf("%-3d %-28s %-8s %10lld %10lld %11.5g %8lld %11lld %11.5g  %s\n", i + 1, r->name, e,
               (long long)r->info.total_params, (long long)r->info.active_params, r->flops_per_token,
               (long long)r->t.steps, (long long)r->tokens, r->train_flops, state_name(state_of(r, dir)));
        total += r->train_flops;
    }
    printf("total %.5g training FLOPs", total);
    if (s->budget_flops > 0)
        printf(" (budget %.5g per run)", s->budget_flops);
    printf("\n");
}

/* ---- children ---------------------------------------------------------------------------- */

typedef struct {
    const sweep_spec *s;
    int index;
    double total, done_flops; /* training FLOPs of the sweep, and of its finished runs */
    double base_flops, t0;    /* done when this invocation started, and when */
    int64_t step, steps;
    int last_decile, tty;
    double val;
} progress;

/* The progress line; finished: the run is done (and counted in done_flops). */
static void show(progress *p, int finished)
{
    const sweep_run *r = &p->s->runs[p->index];
    const double cur =
        p->done_flops + (finished ? 0 : r->train_flops * (double)p->step / (double)(p->steps ? p->steps : 1));
    const double frac = p->total > 0 ? cur / p->total : 0, el = now() - p->t0;
    const double rate = el > 0 ? (cur - p->base_flops) / el : 0;
    char e[32], eta[32], val[32] = "";
    cli_fmt_duration(e, sizeof e, el);
    if (rate > 0)
        cli_fmt_duration(eta, sizeof eta, (p->total - cur) / rate);
    else
        snprintf(eta, sizeof eta, "?");
    if (isfinite(p->val))
        snprintf(val, sizeof val, "  val %.4f", p->val);
    char line[512], wall[32] = "";
    if (finished) {
        cli_fmt_duration(wall, sizeof wall, json_real_value(json_object_get(r->record, "wall_s")));
        snprintf(line, sizeof line, "[%d/%d] %s  done in %s: val %.4f (best %.4f)  |  sweep %.1f%%  %s  ETA %s",
                 p->index + 1, p->s->n, r->name, wall, json_real_value(json_object_get(r->record, "final_val_loss")),
                 json_real_value(json_object_get(r->record, "best_val_loss")), 100 * frac, e, eta);
    } else {
        snprintf(line, sizeof line, "[%d/%d] %s  step %lld/%lld%s  |  sweep %.1f%%  %s  ETA %s", p->index + 1,
                 p->s->n, r->name, (long long)p->step, (long long)p->steps, val, 100 * frac, e, eta);
    }
    if (p->tty)
        printf("\r%s\033[K%s", line, finished ? "\n" : "");
    else
        printf("%s\n", line);
    fflush(stdout);
}

/* One line of the child's output: progress ("step N/M ... val V"), "resumed ... at step K". */
static void child_line(progress *p, const char *line)
{
    long long a, b;
    const char *at;
    if (sscanf(line, "step %lld/%lld", &a, &b) == 2 && b > 0) {
        p->step = a;
        p->steps = b;
        const char *v = strstr(line, "  val ");
        if (v)
            p->val = strtod(v + 6, NULL);
        const int dec = (int)(10 * a / b);
        if (p->tty || dec > p->last_decile) {
            p->last_decile = dec;
            show(p, 0);
        }
    } else if (strstr(line, "resumed from") && (at = strstr(line, " at step ")) && sscanf(at, " at step %lld", &a) == 1) {
        const sweep_run *r = &p->s->runs[p->index];
        p->step = a;
        p->last_decile = (int)(10 * a / (p->steps ? p->steps : r->t.steps));
        p->base_flops += r->train_flops * (double)a / (double)r->t.steps;
    }
}

/*
 * Runs argv (argv[0] is the command: "train", "report") with this build's binary, its stdout
 * and stderr into the log and, line by line, to child_line (p may be NULL). Returns the exit
 * status (128 + signal when killed), or -1 when it could not start (message set).
 */
static int run_child(char *const *argv, FILE *log, progress *p)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        moe_error(MOE_ERR_IO, "pipe: %s", strerror(errno));
        return -1;
    }
    fflush(stdout);
    fflush(log);
    const pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        moe_error(MOE_ERR_IO, "fork: %s", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        setpgid(0, 0); /* a terminal's Ctrl-C reaches it through the sweep, once */
#ifdef __linux__
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* the sweep killed: the child saves and stops */
#endif
        if (getppid() != parent)
            _exit(128 + SIGTERM);
        int nul = open("/dev/null", O_RDONLY);
        if (nul >= 0)
            dup2(nul, STDIN_FILENO);
        dup2(fds[1], STDOUT_FILENO);
        dup2(fds[1], STDERR_FILENO);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        /* when the sweep is gone its pipe is too: writes fail instead of killing the trainer
         * before it has saved (it gets TERM, above) */
        signal(SIGPIPE, SIG_IGN);
        char *args[64];
        int n = 0;
        args[n++] = "cmoe";
        for (int i = 0; argv[i] && n < 63; i++)
            args[n++] = argv[i];
        args[n] = NULL;
        execv("/proc/self/exe", args);
        dprintf(STDERR_FILENO, "cmoe sweep: cannot run /proc/self/exe: %s\n", strerror(errno));
        _exit(127);
    }
    child_pid = pid;
    if (stop_signal) /* arrived between the check and the fork */
        kill(pid, stop_signal);
    close(fds[1]);
    char buf[8192], line[4096];
    size_t ln = 0;
    for (;;) {
        ssize_t k = read(fds[0], buf, sizeof buf);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        fwrite(buf, 1, (size_t)k, log);
        fflush(log);
        for (ssize_t i = 0; i < k; i++) {
            if (buf[i] == '\n' || buf[i] == '\r' || ln + 1 == sizeof line) {
                line[ln] = 0;
                if (p && ln)
                    child_line(p, line);
                ln = 0;
            } else {
                line[ln++] = buf[i];
            }
        }
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    child_pid = 0;
    return WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 1;
}

/* The last non-empty lines of a log, for a failure's message. */
static void log_tail(const char *path, char *out, size_t n)
{
    out[0] = 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char lines[4][512];
    int k = 0;
    char buf[512];
    while (fgets(buf, sizeof buf, f)) {
        buf[strcspn(buf, "\r\n")] = 0;
        if (*buf)
            snprintf(lines[k++ % 4], sizeof lines[0], "%s", buf);
    }
    fclose(f);
    for (int i = k > 4 ? k - 4 : 0; i < k; i++) {
        strncat(out, "\n    ", n - strlen(out) - 1);
        strncat(out, lines[i % 4], n - strlen(out) - 1);
    }
}

/* ---- one run ------------------------------------------------------------------------------ */

typedef struct {
    char steps[32], batch[32], seq[32], accum[32], lr[40], warmup[32], seed[32], eval_every[32], eval_batches[32],
        save_every[32], keep[32], threads[32], log_every[32];
} numbers;

/* 0 done, 1 failed, 2 stopped by a signal. */
static int train_one(sweep_spec *s, const char *dir, progress *p, int *failed)
{
    sweep_run *r = &s->runs[p->index];
    char rd[4200], cfg[4200], logp[4200], keyp[4200];
    sweep_path(rd, sizeof rd, dir, "runs", r->name, "");
    sweep_path(cfg, sizeof cfg, dir, "configs", r->name, ".json");
    sweep_path(logp, sizeof logp, dir, "logs", r->name, ".log");
    sweep_path(keyp, sizeof keyp, dir, "keys", r->name, "");
    const run_state st = state_of(r, dir);
    moe_status ms;
    if ((ms = moe_durable_write_text(cfg, r->cfg_json)) || (st == ST_NEW && (ms = moe_durable_write_text(keyp, r->key)))) {
        fail("%s", moe_last_error());
        return 1;
    }
    FILE *log = fopen(logp, "a");
    if (!log) {
        fail("%s: %s", logp, strerror(errno));
        return 1;
    }
    const moe_train_settings *t = &r->t;
    numbers n;
    snprintf(n.steps, sizeof n.steps, "%lld", (long long)t->steps);
    snprintf(n.batch, sizeof n.batch, "%lld", (long long)t->batch);
    snprintf(n.seq, sizeof n.seq, "%lld", (long long)t->seq);
    snprintf(n.accum, sizeof n.accum, "%lld", (long long)t->accum);
    snprintf(n.lr, sizeof n.lr, "%.17g", t->oc.lr);
    snprintf(n.warmup, sizeof n.warmup, "%lld", (long long)t->oc.warmup_steps);
    snprintf(n.seed, sizeof n.seed, "%llu", (unsigned long long)t->seed);
    snprintf(n.eval_every, sizeof n.eval_every, "%lld", (long long)t->eval_every);
    snprintf(n.eval_batches, sizeof n.eval_batches, "%lld", (long long)t->eval_batches);
    snprintf(n.save_every, sizeof n.save_every, "%lld", (long long)t->save_every);
    snprintf(n.keep, sizeof n.keep, "%lld", (long long)t->keep);
    snprintf(n.threads, sizeof n.threads, "%lld", (long long)t->threads);
    snprintf(n.log_every, sizeof n.log_every, "%lld", (long long)(t->steps >= 50 ? t->steps / 50 : 1));
    char *argv[48];
    int k = 0;
    argv[k++] = "train";
    if (st == ST_RESUME) {
        argv[k++] = "--resume", argv[k++] = rd;
        argv[k++] = "--data", argv[k++] = (char *)t->data;
    } else {
        argv[k++] = "--out", argv[k++] = rd, argv[k++] = "--force";
        argv[k++] = "--config", argv[k++] = cfg;
        argv[k++] = "--data", argv[k++] = (char *)t->data;
        argv[k++] = "--batch", argv[k++] = n.batch;
        argv[k++] = "--seq", argv[k++] = n.seq;
        argv[k++] = "--accum", argv[k++] = n.accum;
        argv[k++] = "--lr", argv[k++] = n.lr;
        argv[k++] = "--warmup", argv[k++] = n.warmup;
        argv[k++] = "--seed", argv[k++] = n.seed;
    }
    argv[k++] = "--steps", argv[k++] = n.steps;
    argv[k++] = "--backend", argv[k++] = (char *)t->backend;
    argv[k++] = "--eval-every", argv[k++] = n.eval_every;
    argv[k++] = "--eval-batches", argv[k++] = n.eval_batches;
    argv[k++] = "--save-every", argv[k++] = n.save_every;
    argv[k++] = "--keep", argv[k++] = n.keep;
    argv[k++] = "--log-every", argv[k++] = n.log_every;
    if (t->threads > 0)
        argv[k++] = "--threads", argv[k++] = n.threads;
    argv[k] = NULL;
    fprintf(log, "---- cmoe sweep: %s %s (key %s)\n", st == ST_RESUME ? "resuming" : "starting", r->name, r->key);
    p->step = 0;
    p->steps = t->steps;
    p->last_decile = -1;
    p->val = NAN;
    if (!p->tty)
        printf("[%d/%d] %s: %s (%lld steps, %.4g FLOPs)\n", p->index + 1, s->n, r->name,
               st == ST_RESUME ? "resuming from its checkpoint" : "starting", (long long)t->steps, r->train_flops);
    const int rc = run_child(argv, log, p);
    fclose(log);
    if (rc == -1) {
        fail("%s: %s", r->name, moe_last_error());
        *failed += 1;
        return 1;
    }
    if (stop_signal && rc != 0)
        return 2;
    json_t *rec = NULL;
    char why[2048] = "";
    if (rc == 0 && (rec = sweep_record_done(r, rd))) {
        /* the run's own page, as cmoe report writes it (output into the log) */
        char *rargv[] = {"report", rd, NULL};
        FILE *l2 = fopen(logp, "a");
        if (l2) {
            run_child(rargv, l2, NULL);
            fclose(l2);
        }
    } else {
        if (rc == 0)
            snprintf(why, sizeof why, "\n    %s", moe_last_error());
        else
            log_tail(logp, why, sizeof why);
        rec = sweep_record_new(r, "failed");
        json_object_set_new(rec, "error", json_string(why + (why[0] == '\n' ? 5 : 0)));
    }
    if ((ms = sweep_append_record(dir, rec))) {
        json_decref(rec);
        fail("%s", moe_last_error());
        return 1;
    }
    json_decref(r->record);
    r->record = rec;
    r->done = rc == 0 && !why[0];
    if (!r->done) {
        if (p->tty)
            printf("\n");
        fprintf(stderr, "cmoe sweep: run %s failed (exit %d; %s):%s\n", r->name, rc, logp, why);
        *failed += 1;
        return 1;
    }
    p->done_flops += r->train_flops;
    show(p, 1);
    return 0;
}

/* ---- the command ------------------------------------------------------------------------- */

static int run_sweep(sweep_spec *s, const char *dir)
{
    int is_sweep;
    moe_status ms = check_dir(dir, &is_sweep);
    if (ms)
        return fail("%s", moe_last_error());
    if ((ms = moe_mkdirs(dir, NULL)))
        return fail("%s", moe_last_error());
    moe_rundir lock;
    memset(&lock, 0, sizeof lock);
    lock.lock_fd = lock.metrics_fd = -1;
    snprintf(lock.dir, sizeof lock.dir, "%s", dir);
    if ((ms = moe_rundir_lock(&lock)))
        return fail("%s", moe_last_error());
    int rc = EXIT_OK;
    char p[4200];
    static const char *const subs[] = {"configs", "logs", "runs", "keys", "plots"};
    for (int i = 0; i < 5 && !ms; i++) {
        sweep_path(p, sizeof p, dir, "", subs[i], "");
        ms = moe_mkdirs(p, NULL);
    }
    sweep_path(p, sizeof p, dir, "", "spec.json", "");
    if (ms || (ms = sweep_read_records(s, dir, 1)) || (ms = moe_durable_write(p, s->text, strlen(s->text)))) {
        moe_rundir_close(&lock, 0, NULL);
        return fail("%s", moe_last_error());
    }
    progress pr;
    memset(&pr, 0, sizeof pr);
    pr.s = s;
    pr.tty = isatty(STDOUT_FILENO);
    pr.t0 = now();
    int ndone = 0;
    for (int i = 0; i < s->n; i++) {
        pr.total += s->runs[i].train_flops;
        if (s->runs[i].done) {
            pr.done_flops += s->runs[i].train_flops;
            ndone++;
        }
    }
    pr.base_flops = pr.done_flops;
    printf("cmoe sweep: %s -> %s: %d runs, %d done already%s%s\n", s->path, dir, s->n, ndone,
           s->description[0] ? "\n  " : "", s->description);
    print_plan(s, dir);
    fflush(stdout);
    struct sigaction old[3];
    stop_signal = 0;
    catch_signals(old);
    int failed = 0, stopped = 0;
    for (int i = 0; i < s->n && !stopped; i++) {
        if (stop_signal) {
            stopped = 1;
            break;
        }
        if (s->runs[i].done)
            continue;
        pr.index = i;
        if (train_one(s, dir, &pr, &failed) == 2)
            stopped = 1;
    }
    restore_signals(old);
    if (pr.tty)
        printf("\n");
    ndone = 0;
    for (int i = 0; i < s->n; i++)
        ndone += s->runs[i].done;
    if (ndone && (ms = sweep_report(s, dir))) {
        fail("%s", moe_last_error());
        rc = EXIT_FAIL;
    }
    char el[32];
    cli_fmt_duration(el, sizeof el, now() - pr.t0);
    if (stopped) {
        printf("cmoe sweep: stopped by signal %d after %s, %d of %d runs done; run the same command to continue\n",
               (int)stop_signal, el, ndone, s->n);
        rc = 128 + (int)stop_signal;
    } else if (failed) {
        printf("cmoe sweep: %d of %d runs done, %d failed (see above); run the same command to retry them\n", ndone,
               s->n, failed);
        rc = EXIT_FAIL;
    } else {
        printf("cmoe sweep: all %d runs done (%s in this invocation); %s/sweep.jsonl, %s/report.html\n", s->n, el, dir,
               dir);
    }
    moe_rundir_close(&lock, 0, NULL);
    return rc;
}

int cmd_sweep(int argc, char **argv)
{
    enum { O_OUT = 256, O_DRY, O_THREADS, O_HELP };
    static const struct option longopts[] = {
        {"out", required_argument, NULL, O_OUT},
        {"dry-run", no_argument, NULL, O_DRY},
        {"threads", required_argument, NULL, O_THREADS},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *out = NULL, *spec = NULL;
    int dry = 0, opt;
    int64_t threads = -1;
    optind = 0;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        switch (opt) {
        case O_OUT: out = optarg; break;
        case O_DRY: dry = 1; break;
        case O_THREADS:
            if (!cli_parse_i64(optarg, 0, 4096, &threads))
                return usage("--threads: '%s' is not an integer in [0, 4096]", optarg);
            break;
        case O_HELP: help_sweep(); return EXIT_OK;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    for (; optind < argc; optind++) {
        if (spec)
            return usage("one SPEC.json, got also '%s'", argv[optind]);
        spec = argv[optind];
    }
    if (!spec)
        return usage("which spec? usage: cmoe sweep SPEC.json --out DIR");
    if (!out)
        return usage("--out DIR is required (the sweep's directory)");
    if (strlen(out) > 3000) /* room for DIR/runs/NAME/... */
        return usage("--out: the path is too long");
    sweep_spec s;
    if (sweep_spec_load(spec, threads, &s)) {
        int rc = fail("%s", moe_last_error());
        sweep_spec_free(&s);
        return rc;
    }
    int rc;
    if (dry) {
        int is_sweep;
        if (check_dir(out, &is_sweep) == MOE_OK && is_sweep && sweep_read_records(&s, out, 0) != MOE_OK)
            fprintf(stderr, "cmoe sweep: warning: %s\n", moe_last_error());
        printf("cmoe sweep: %s -> %s: %d runs (dry run: nothing is written)\n", spec, out, s.n);
        print_plan(&s, out);
        rc = EXIT_OK;
    } else {
        rc = run_sweep(&s, out);
    }
    sweep_spec_free(&s);
    return rc;
}
