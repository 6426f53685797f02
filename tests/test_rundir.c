/*
 * io/rundir.h: the run directory as a library.
 *  - a new run is refused in '/', in a directory that holds a run, and in one that holds
 *    other files (unless force), and those files stay as they were;
 *  - the lock: a second process fails at once naming the holder's pid; after the holder
 *    closes, or dies without closing (a stale lock file), the directory can be locked again;
 *  - a failed new run that saved nothing removes what it wrote and the directories it made;
 *  - metrics.jsonl: records appended as whole lines; cut back to a step with a torn last
 *    line dropped;
 *  - checkpoints: rotation (--keep), and --resume from the newest valid one, naming the
 *    newer one that failed and why; named exactly, a bad checkpoint is an error;
 *  - the settings: train.json round trip, and the data checked by identity.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/rundir.h"
#include "testutil.h"

static char dir[256];

static const char *tmp(const char *name)
{
    static char path[6][600];
    static int slot;
    slot = (slot + 1) % 6;
    snprintf(path[slot], sizeof path[slot], "%s/%s", dir, name);
    return path[slot];
}

static void put(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static char *get(const char *path)
{
    static char buf[8192];
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static int exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

START_TEST(new_run_refusals)
{
    moe_rundir rd;
    ck_assert_int_eq(moe_rundir_create("/", 0, &rd), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "root directory"));
    ck_assert_int_eq(moe_rundir_create("/", 1, &rd), MOE_ERR_ARG); /* not even with force */
    mkdir(tmp("proj"), 0700);
    put(tmp("proj/config.json"), "{\"mine\": 1}");
    ck_assert_int_eq(moe_rundir_create(tmp("proj"), 0, &rd), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "holds no cmoe run ('config.json')"));
    ck_assert_str_eq(get(tmp("proj/config.json")), "{\"mine\": 1}");
    ck_assert(!exists(tmp("proj/" MOE_RUN_LOCK)));
    mkdir(tmp("old"), 0700);
    put(tmp("old/metrics.jsonl"), "{\"step\":1}\n");
    ck_assert_int_eq(moe_rundir_create(tmp("old"), 0, &rd), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "already holds a run (metrics.jsonl)"));
    /* force: into it, the old weights gone */
    put(tmp("old/model.safetensors"), "old weights");
    ck_assert_msg(moe_rundir_create(tmp("old"), 1, &rd) == MOE_OK, "%s", moe_last_error());
    ck_assert(!exists(tmp("old/model.safetensors")));
    moe_rundir_close(&rd, 0, NULL);
    ck_assert(!exists(tmp("old/" MOE_RUN_LOCK)));
}
END_TEST

/* In a child: lock dir; exit 0 when locked, 1 when refused (the message in msg file). */
static int try_lock_in_child(const char *d, int hold_and_die)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        moe_rundir rd;
        moe_status s = moe_rundir_open(d, &rd);
        if (s) {
            put(tmp("msg"), moe_last_error());
            _exit(1);
        }
        if (hold_and_die)
            _exit(0); /* dies holding it: the file stays, the flock goes */
        moe_rundir_close(&rd, 0, NULL);
        _exit(0);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    return WEXITSTATUS(status);
}

START_TEST(lock)
{
    moe_rundir rd;
    ck_assert_int_eq(moe_rundir_create(tmp("locked"), 0, &rd), MOE_OK);
    ck_assert_int_eq(try_lock_in_child(tmp("locked"), 0), 1);
    char want[64];
    snprintf(want, sizeof want, "is in use by process %ld", (long)getpid());
    ck_assert_msg(strstr(get(tmp("msg")), want), "%s", get(tmp("msg")));
    moe_rundir_close(&rd, 0, NULL);
    ck_assert_int_eq(try_lock_in_child(tmp("locked"), 0), 0);
    /* a holder that died: its file is there, its lock is not */
    ck_assert_int_eq(try_lock_in_child(tmp("locked"), 1), 0);
    ck_assert(exists(tmp("locked/" MOE_RUN_LOCK)));
    ck_assert_msg(moe_rundir_open(tmp("locked"), &rd) == MOE_OK, "%s", moe_last_error());
    moe_rundir_close(&rd, 0, NULL);
    /* a new run in a directory in use is refused without a look at its files */
    ck_assert_int_eq(moe_rundir_open(tmp("locked"), &rd), MOE_OK);
    pid_t pid = fork();
    if (pid == 0) {
        moe_rundir other;
        _exit(moe_rundir_create(tmp("locked"), 1, &other) == MOE_ERR_IO &&
              strstr(moe_last_error(), "is in use by process") ? 0 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    moe_rundir_close(&rd, 0, NULL);
}
END_TEST

START_TEST(failed_run_leaves_nothing)
{
    moe_rundir rd;
    int removed;
    ck_assert_int_eq(moe_rundir_create(tmp("a/b/run"), 0, &rd), MOE_OK);
    ck_assert_int_eq(moe_rundir_start(&rd, "{}", "{}", -1), MOE_OK);
    ck_assert_int_eq(moe_rundir_append_metrics(&rd, "{\"step\":1}"), MOE_OK);
    moe_rundir_close(&rd, 1, &removed);
    ck_assert_int_eq(removed, 1);
    ck_assert(!exists(tmp("a")));
    /* into an existing empty directory: emptied, kept */
    mkdir(tmp("empty"), 0700);
    ck_assert_int_eq(moe_rundir_create(tmp("empty"), 0, &rd), MOE_OK);
    ck_assert_int_eq(moe_rundir_start(&rd, "{}", "{}", -1), MOE_OK);
    moe_rundir_close(&rd, 1, NULL);
    ck_assert(exists(tmp("empty")));
    ck_assert(!exists(tmp("empty/config.json")) && !exists(tmp("empty/metrics.jsonl")));
    /* something was saved: all of it stays */
    ck_assert_int_eq(moe_rundir_create(tmp("kept"), 0, &rd), MOE_OK);
    ck_assert_int_eq(moe_rundir_start(&rd, "{}", "{}", -1), MOE_OK);
    rd.saved = 1;
    moe_rundir_close(&rd, 1, &removed);
    ck_assert_int_eq(removed, 0);
    ck_assert(exists(tmp("kept/train.json")));
}
END_TEST

START_TEST(metrics_torn_and_cut)
{
    moe_rundir rd;
    ck_assert_int_eq(moe_rundir_create(tmp("m"), 0, &rd), MOE_OK);
    ck_assert_int_eq(moe_rundir_start(&rd, "{}", "{}", -1), MOE_OK);
    char rec[64];
    for (int i = 1; i <= 5; i++) {
        snprintf(rec, sizeof rec, "{\"step\":%d,\"loss\":%d.5}", i, i);
        ck_assert_int_eq(moe_rundir_append_metrics(&rd, rec), MOE_OK);
    }
    ck_assert_int_eq(moe_rundir_sync_metrics(&rd), MOE_OK);
    moe_rundir_close(&rd, 0, NULL);
    int fd = open(tmp("m/metrics.jsonl"), O_WRONLY | O_APPEND);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "{\"step\":6,\"lo", 13), 13); /* a crash mid-write */
    close(fd);
    int torn;
    ck_assert_int_eq(moe_metrics_cut(tmp("m/metrics.jsonl"), 3, &torn), MOE_OK);
    ck_assert_int_eq(torn, 1);
    ck_assert_str_eq(get(tmp("m/metrics.jsonl")), "{\"step\":1,\"loss\":1.5}\n{\"step\":2,\"loss\":2.5}\n"
                                                  "{\"step\":3,\"loss\":3.5}\n");
    /* resumed at 2: cut, then appended after */
    ck_assert_int_eq(moe_rundir_open(tmp("m"), &rd), MOE_OK);
    ck_assert_int_eq(moe_rundir_start(&rd, NULL, "{}", 2), MOE_OK);
    ck_assert_int_eq(moe_rundir_append_metrics(&rd, "{\"step\":3,\"loss\":0}"), MOE_OK);
    moe_rundir_close(&rd, 0, NULL);
    ck_assert_str_eq(get(tmp("m/metrics.jsonl")), "{\"step\":1,\"loss\":1.5}\n{\"step\":2,\"loss\":2.5}\n"
                                                  "{\"step\":3,\"loss\":0}\n");
    ck_assert_str_eq(get(tmp("m/config.json")), "{}\n"); /* config_json NULL: left alone */
}
END_TEST

/* ---- checkpoints --------------------------------------------------------------------- */

static void save_ckpt(moe_model *m, moe_optim *o, const char *d, int64_t step)
{
    char path[700];
    ck_assert_int_eq(moe_ckpt_path(path, sizeof path, d, step), MOE_OK);
    moe_ckpt_state st = {step, step, 1337, "{\"steps\": 10}", NULL};
    ck_assert_msg(moe_ckpt_save(path, m, o, &st) == MOE_OK, "%s", moe_last_error());
}

START_TEST(checkpoints)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    moe_backend *b;
    moe_model *m;
    moe_optim *o;
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    oc.total_steps = 10;
    ck_assert_int_eq(moe_backend_create("cpu", NULL, &b), MOE_OK);
    ck_assert_int_eq(moe_model_create(&c, b, NULL, 1, 4, &m), MOE_OK);
    ck_assert_int_eq(moe_model_init(m, 1), MOE_OK);
    ck_assert_int_eq(moe_optim_create(m, &oc, &o), MOE_OK);
    const char *d = tmp("ck");
    mkdir(d, 0700);
    char *cfg;
    ck_assert_int_eq(moe_model_config_to_json(&c, 1, &cfg), MOE_OK);
    put(tmp("ck/config.json"), cfg);
    free(cfg);
    moe_resume_point rp;
    ck_assert_int_eq(moe_resume_find(d, &rp), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "no checkpoint"));
    moe_resume_point_free(&rp);
    for (int64_t s = 2; s <= 10; s += 2)
        save_ckpt(m, o, d, s);
    /* rotation: the newest 3 */
    ck_assert_int_eq(moe_ckpt_prune(d, -1, 3, NULL), MOE_OK);
    int64_t *steps;
    int n;
    ck_assert_int_eq(moe_ckpt_list(d, &steps, &n), MOE_OK);
    ck_assert_int_eq(n, 3);
    ck_assert(steps[0] == 6 && steps[1] == 8 && steps[2] == 10);
    free(steps);
    /* the newest corrupt: its last data byte flipped */
    const char *newest = tmp("ck/ckpt-10.safetensors");
    FILE *f = fopen(newest, "r+b");
    ck_assert_ptr_nonnull(f);
    fseek(f, -1, SEEK_END);
    int byte = fgetc(f);
    fseek(f, -1, SEEK_END);
    fputc(byte ^ 1, f);
    fclose(f);
    ck_assert_msg(moe_resume_find(d, &rp) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(rp.ck->step, 8);
    ck_assert_ptr_nonnull(rp.notes);
    ck_assert_ptr_nonnull(strstr(rp.notes, "ckpt-10.safetensors"));
    ck_assert_ptr_nonnull(strstr(rp.notes, "CRC-32 mismatch"));
    moe_resume_point_free(&rp);
    /* named exactly: that file or nothing */
    ck_assert_int_eq(moe_resume_find(newest, &rp), MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "CRC-32 mismatch"));
    moe_resume_point_free(&rp);
    /* all bad: each named */
    put(tmp("ck/ckpt-8.safetensors"), "junk");
    put(tmp("ck/ckpt-6.safetensors"), "junk");
    ck_assert_int_eq(moe_resume_find(d, &rp), MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "no valid checkpoint"));
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "ckpt-6.safetensors"));
    moe_resume_point_free(&rp);
    /* pruning after a resume point */
    int later;
    ck_assert_int_eq(moe_ckpt_prune(d, 6, 0, &later), MOE_OK);
    ck_assert_int_eq(later, 2);
    moe_optim_free(o);
    moe_model_free(m);
    moe_backend_free(b);
}
END_TEST

/* ---- settings and the data they name ------------------------------------------------------ */

START_TEST(settings_and_data)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    moe_train_settings t;
    moe_train_settings_default(&t);
    t.seq = c.max_position_embeddings + 1;
    ck_assert_int_eq(moe_train_settings_validate(&t, &c), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "max_position_embeddings"));
    t.seq = 8;
    t.batch = 3;
    t.steps = t.oc.total_steps = 40;
    t.seed = 99;
    ck_assert_msg(moe_train_settings_validate(&t, &c) == MOE_OK, "%s", moe_last_error());
    put(tmp("text.txt"), "abababababababababababababababababababab");
    moe_dataset *d;
    ck_assert_int_eq(moe_dataset_open(tmp("text.txt"), NULL, &d), MOE_OK);
    char *json;
    ck_assert_int_eq(moe_train_settings_to_json(&t, d, NULL, &json), MOE_OK);
    moe_run_record rec;
    ck_assert_msg(moe_run_record_parse(json, "test", &rec) == MOE_OK, "%s", moe_last_error());
    free(json);
    ck_assert_int_eq(rec.t.batch, 3);
    ck_assert_int_eq(rec.t.steps, 40);
    ck_assert(rec.t.seed == 99);
    ck_assert_int_eq(rec.have_data_id, 1);
    ck_assert_int_eq(moe_run_record_check_data(&rec, d), MOE_OK);
    moe_dataset_free(d);
    /* the same bytes under a relative name: the same data */
    char cwd[1024];
    ck_assert_ptr_nonnull(getcwd(cwd, sizeof cwd));
    ck_assert_int_eq(chdir(dir), 0);
    ck_assert_int_eq(moe_dataset_open("text.txt", NULL, &d), MOE_OK);
    ck_assert_int_eq(chdir(cwd), 0);
    ck_assert_int_eq(moe_run_record_check_data(&rec, d), MOE_OK);
    moe_dataset_free(d);
    /* other bytes of the same size: refused, naming the checksum */
    put(tmp("text.txt"), "babababababababababababababababababababa");
    ck_assert_int_eq(moe_dataset_open(tmp("text.txt"), NULL, &d), MOE_OK);
    ck_assert_int_eq(moe_run_record_check_data(&rec, d), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "CRC-32"));
    ck_assert_ptr_null(strstr(moe_last_error(), "size"));
    moe_dataset_free(d);
    /* resuming: the settings that may change come from the command line */
    moe_train_settings cli, out;
    moe_train_settings_default(&cli);
    cli.steps = 80;
    cli.batch = 7; /* not given: ignored */
    moe_train_settings_resume(&out, &rec, &cli, MOE_TS_STEPS);
    ck_assert_int_eq(out.steps, 80);
    ck_assert_int_eq(out.oc.total_steps, 80);
    ck_assert_int_eq(out.batch, 3);
}
END_TEST

int main(void)
{
    snprintf(dir, sizeof dir, "%s/cmoe-rundir.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 99;
    }
    Suite *s = suite_create("rundir");
    TCase *tc = tcase_create("rundir");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, new_run_refusals);
    tcase_add_test(tc, lock);
    tcase_add_test(tc, failed_run_leaves_nothing);
    tcase_add_test(tc, metrics_torn_and_cut);
    tcase_add_test(tc, checkpoints);
    tcase_add_test(tc, settings_and_data);
    suite_add_tcase(s, tc);
    int rc = tu_run(s);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "note: could not remove %s\n", dir);
    return rc;
}
