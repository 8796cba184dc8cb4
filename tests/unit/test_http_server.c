/* The HTTP control API: request-body validation, the trigger body, the job queue driven
 * through real HTTP requests (libcurl) against an in-process server.
 *
 * `test_http_server --serve [--token T] [--max-body N] [--update-ms MS] [--ranks N]
 * [--request-timeout S] [--per-ip N] [--max-conns N]` is a
 * fake rank 0 for tests/python/test_http.py: it starts the server on an ephemeral port,
 * prints "port N", and executes jobs with a fake engine of N ranks (default 2; updates take
 * MS milliseconds over 10 buckets, report progress, pause/trigger/resume vLLM through the
 * real ckpt_trigger_begin/end with socket dir /tmp/ckpt-fake, and write a trace) until
 * SIGTERM. A checkpoint named "fail-update" fails its updates on rank 1.
 * `test_http_server --client CMD ARGS..` runs the CLI client (ckpt-engine CMD ARGS..). */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "ckpt/server.h"
#include "test.h"

/* The CLI client, compiled in so `test_http_server --client CMD ...` runs it (the tool's
 * main.c is not ours to hook). */
#include "../../tools/ckpt-engine/cmd_client.c"

/* ---- fake rank 0 ---------------------------------------------------------------------- */

static volatile sig_atomic_t stop_flag;
static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static pthread_mutex_t prog_mu = PTHREAD_MUTEX_INITIALIZER;
static ckpt_http_progress_t prog;

/* Like the lead's adapter over ckpt_engine_progress: thread-safe, called by HTTP threads. */
static int pull_progress(void *ctx, ckpt_http_progress_t *out)
{
    (void)ctx;
    pthread_mutex_lock(&prog_mu);
    *out = prog;
    pthread_mutex_unlock(&prog_mu);
    return 0;
}

static int fake_ranks = 2;

static void fake_update(const ckpt_http_job_t *job, int update_ms, ckpt_http_job_result_t *res)
{
    enum { NB = 10 };
    const uint64_t total = 10ull << 20;
    ckpt_trigger_t *trig = NULL;
    res->failed_rank = -1;
    /* The real rank 0's sequence (serve_http.c): pause, trigger, update, join, resume. */
    if (job->update_url[0] &&
        ckpt_trigger_begin(job, "/tmp/ckpt-fake", fake_ranks, 2,
                           job->timeout_ms ? job->timeout_ms : 5000, &trig, res) != 0)
        return;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 1; i <= NB; i++) {
        sleep_ms(update_ms / NB);
        clock_gettime(CLOCK_MONOTONIC, &b);
        pthread_mutex_lock(&prog_mu);
        prog.nbuckets = NB;
        prog.buckets_done = (uint32_t)i;
        prog.bytes_total = total;
        prog.bytes_done = total / NB * (uint64_t)i;
        prog.elapsed_s = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
        pthread_mutex_unlock(&prog_mu);
    }
    res->update.nbuckets = NB;
    res->update.bucket_size = total / NB;
    res->update.bytes = total;
    res->update.ntensors = 7;
    res->update.nranks = fake_ranks;
    res->update.version = 2;
    res->update.total_s = prog.elapsed_s;
    res->update.pipeline_s = prog.elapsed_s * 0.9;
    res->update.plan_s = prog.elapsed_s * 0.1;
    if (strcmp(job->name, "fail-update") == 0) {
        res->status = CKPT_EPEER;
        res->failed_rank = 1;
        snprintf(res->reason, sizeof res->reason, "rank 1: worker disconnected in bucket 3");
    }
    if (trig) ckpt_trigger_end(trig, res);
    FILE *f = fopen(job->trace_path, "w");
    if (f) {
        fprintf(f, "{\"traceEvents\":[{\"name\":\"update\",\"ph\":\"X\",\"ts\":0,\"dur\":%d,"
                   "\"pid\":0,\"tid\":0}]}\n", update_ms * 1000);
        fclose(f);
    }
}

static void fake_execute(ckpt_http_server_t *srv, const ckpt_http_job_t *job, int update_ms)
{
    ckpt_http_job_result_t res;
    memset(&res, 0, sizeof res);
    res.failed_rank = -1;
    struct stat st;
    switch (job->kind) {
    case CKPT_JOB_REGISTER:
        if (job->nfiles > 0) { /* a list: every file must exist, their sizes add up */
            for (size_t at = 0; at < job->files_len; at += strlen(job->files + at) + 1) {
                if (stat(job->files + at, &st) != 0) {
                    res.status = CKPT_ENOENT;
                    snprintf(res.reason, sizeof res.reason, "%.400s: no such file",
                             job->files + at);
                    break;
                }
                res.bytes += (uint64_t)st.st_size;
            }
            res.ntensors = (uint32_t)job->nfiles;
            res.version = 1;
            break;
        }
        if (stat(job->path, &st) != 0) {
            res.status = CKPT_ENOENT;
            snprintf(res.reason, sizeof res.reason, "%.400s: no such file or directory",
                     job->path);
            break;
        }
        sleep_ms(50);
        res.bytes = S_ISREG(st.st_mode) ? (uint64_t)st.st_size : (1u << 20);
        res.ntensors = 3;
        res.version = 1;
        break;
    case CKPT_JOB_UNREGISTER: break;
    case CKPT_JOB_UPDATE: fake_update(job, update_ms, &res); break;
    }
    ckpt_http_job_done(srv, job, &res);
    if (job->kind == CKPT_JOB_REGISTER && res.status == 0) {
        char metas[CKPT_NAME_MAX + 16];
        int n = snprintf(metas, sizeof metas, "metas-of-%s", job->name);
        ckpt_http_set_metas(srv, job->name, metas, (size_t)n);
    }
}

static int serve(int argc, char **argv)
{
    ckpt_http_options_t o = CKPT_HTTP_OPTIONS_INIT;
    int update_ms = 1000;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--token") == 0) o.token = argv[i + 1];
        else if (strcmp(argv[i], "--max-body") == 0) o.max_body = (size_t)atol(argv[i + 1]);
        else if (strcmp(argv[i], "--update-ms") == 0) update_ms = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--bind") == 0) o.bind_addr = argv[i + 1];
        else if (strcmp(argv[i], "--ranks") == 0) fake_ranks = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--request-timeout") == 0) o.request_timeout_s = atof(argv[i + 1]);
        else if (strcmp(argv[i], "--per-ip") == 0) o.per_ip_limit = (unsigned)atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--max-conns") == 0) o.max_connections = (unsigned)atoi(argv[i + 1]);
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    ckpt_http_server_t *srv;
    if (ckpt_http_start(&o, &srv) != 0) {
        fprintf(stderr, "cannot start: %s\n", ckpt_last_error());
        return 1;
    }
    ckpt_http_set_progress_fn(srv, pull_progress, NULL);
    ckpt_http_set_engine_ranks(srv, fake_ranks);
    printf("port %d\n", ckpt_http_port(srv));
    fflush(stdout);
    while (!stop_flag) {
        ckpt_http_job_t *job = calloc(1, sizeof *job);
        int rc = ckpt_http_next_job(srv, 100, job);
        if (rc == 0) {
            pthread_mutex_lock(&prog_mu);
            memset(&prog, 0, sizeof prog);
            pthread_mutex_unlock(&prog_mu);
            fake_execute(srv, job, update_ms);
            ckpt_http_job_release(job);
        }
        free(job);
    }
    ckpt_http_stop(srv);
    return 0;
}

/* ---- unit tests ----------------------------------------------------------------------- */

static ckpt_http_job_t job_buf;

static int parse_upd(const char *body, char *field)
{
    memset(&job_buf, 0, sizeof job_buf);
    return ckpt_http_parse_update(body, strlen(body), &job_buf, field, 64);
}

static void test_names(void)
{
    CHECK(ckpt_http_name_valid("llama-3.1_8B"));
    CHECK(!ckpt_http_name_valid(""));
    CHECK(!ckpt_http_name_valid(".hidden"));
    CHECK(!ckpt_http_name_valid("-x"));
    CHECK(!ckpt_http_name_valid("a/b"));
    CHECK(!ckpt_http_name_valid("a b"));
    char longname[200];
    memset(longname, 'a', sizeof longname);
    longname[129] = '\0';
    CHECK(!ckpt_http_name_valid(longname));
    longname[128] = '\0';
    CHECK(ckpt_http_name_valid(longname));
}

static void test_parse_register(void)
{
    char field[64];
    ckpt_http_job_t j;
    memset(&j, 0, sizeof j);
    const char *ok = "{\"path\": \"/models/a\"}";
    CHECK_OK(ckpt_http_parse_register(ok, strlen(ok), &j, field, sizeof field));
    CHECK_STR(j.path, "/models/a");
    const char *files = "{\"files\": [\"/m/model.safetensors\"]}";
    CHECK_OK(ckpt_http_parse_register(files, strlen(files), &j, field, sizeof field));
    CHECK_STR(j.path, "/m/model.safetensors");
    CHECK_RC(ckpt_http_parse_register("{}", 2, &j, field, sizeof field), CKPT_EINVAL);
    CHECK_STR(field, "path");
    CHECK_RC(ckpt_http_parse_register("{\"path\": 3}", 11, &j, field, sizeof field), CKPT_EINVAL);
    CHECK_STR(field, "path");
    CHECK_ERR_HAS("must be a string");
    CHECK_RC(ckpt_http_parse_register("{\"path\": ", 9, &j, field, sizeof field), CKPT_EFORMAT);
    CHECK_ERR_HAS("malformed JSON");
    CHECK_RC(ckpt_http_parse_register("[1]", 3, &j, field, sizeof field), CKPT_EINVAL);
    const char *extra = "{\"path\": \"/a\", \"colour\": 1}";
    CHECK_RC(ckpt_http_parse_register(extra, strlen(extra), &j, field, sizeof field), CKPT_EINVAL);
    CHECK_STR(field, "colour");
    /* Several files: a list the engine registers as one checkpoint. */
    memset(&j, 0, sizeof j);
    const char *two = "{\"files\": [\"/m/b.safetensors\", \"/m/a.safetensors\"]}";
    CHECK_OK(ckpt_http_parse_register(two, strlen(two), &j, field, sizeof field));
    CHECK(j.nfiles == 2 && j.path[0] == '\0');
    CHECK(j.files && strcmp(j.files, "/m/b.safetensors") == 0 &&
          strcmp(j.files + strlen(j.files) + 1, "/m/a.safetensors") == 0);
    CHECK(j.files_len == 2 * sizeof "/m/a.safetensors");
    ckpt_http_job_release(&j);
    CHECK(j.files == NULL && j.nfiles == 0);
    static const struct {
        const char *body, *field, *text;
    } bad[] = {
        {"{\"files\": []}", "files", "non-empty array"},
        {"{\"files\": \"/a.safetensors\"}", "files", "non-empty array"},
        {"{\"files\": [\"/a.safetensors\", 3]}", "files", "path strings"},
        {"{\"files\": [\"/a.safetensors\", \"\"]}", "files", "path strings"},
        {"{\"files\": [\"/a.safetensors\", \"/m\"]}", "files", "each must be a .safetensors"},
        {"{\"files\": [\"/a.safetensors\", \"/a.safetensors\"]}", "files", "twice"},
        {"{\"path\": \"/m\", \"files\": [\"/a.safetensors\"]}", "files", "not both"},
        /* cJSON cuts strings at \u0000 and keeps duplicate keys: both refused by name */
        {"{\"path\": \"/m/a\\u0000.safetensors\"}", "path", "NUL"},
        {"{\"files\": [\"/a.safetensors\", \"/b\\u0000.safetensors\"]}", "files", "NUL"},
        {"{\"path\": \"/m\", \"path\": \"/etc\"}", "path", "given twice"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&j, 0, sizeof j);
        field[0] = '\0';
        int rc = ckpt_http_parse_register(bad[i].body, strlen(bad[i].body), &j, field,
                                          sizeof field);
        if (rc != CKPT_EINVAL || strcmp(field, bad[i].field) != 0 ||
            !strstr(ckpt_last_error(), bad[i].text) || j.files != NULL) {
            fprintf(stderr, "register body %s: rc %s field '%s' error '%s'\n", bad[i].body,
                    ckpt_status_name(rc), field, ckpt_last_error());
            test__failures++;
        }
    }
}

static void test_parse_update(void)
{
    char field[64];
    CHECK_OK(parse_upd("", field));
    CHECK_STR(job_buf.mode, "broadcast");
    CHECK(job_buf.verify == -1 && job_buf.bucket_max == 0 && job_buf.timeout_ms == 0);
    CHECK(job_buf.partial == 0 && job_buf.isolate == 0);
    CHECK_OK(parse_upd("{\"partial\": true, \"isolate\": true}", field));
    CHECK(job_buf.partial == 1 && job_buf.isolate == 1 && job_buf.verify == -1);
    CHECK_OK(parse_upd("{\"partial\": null, \"isolate\": false}", field));
    CHECK(job_buf.partial == 0 && job_buf.isolate == 0);
    CHECK_OK(parse_upd("{\"mode\":\"p2p\",\"ranks\":[3,1],\"timeout_ms\":5000,"
                       "\"bucket_max\":\"64MiB\",\"verify\":true,"
                       "\"update_url\":\"http://127.0.0.1:8000/collective_rpc\","
                       "\"metas_url\":\"http://10.0.0.1:8080/v1/checkpoints/m/metas\"}",
                       field));
    CHECK_STR(job_buf.mode, "p2p");
    CHECK_STR(job_buf.metas_url, "http://10.0.0.1:8080/v1/checkpoints/m/metas");
    CHECK(job_buf.nranks == 2 && job_buf.ranks[0] == 3 && job_buf.ranks[1] == 1);
    CHECK(job_buf.timeout_ms == 5000 && job_buf.verify == 1);
    CHECK(job_buf.bucket_max == (64ull << 20));
    CHECK_RC(parse_upd("{\"mode\":\"p2p\"}", field), CKPT_EINVAL); /* no metas_url */
    CHECK_STR(field, "metas_url");
    CHECK_RC(parse_upd("{\"metas_url\":\"http://h/m\"}", field), CKPT_EINVAL); /* not p2p */
    CHECK_STR(field, "metas_url");
    CHECK_RC(parse_upd("{\"mode\":\"p2p\",\"metas_url\":\"ftp://h/m\"}", field), CKPT_EINVAL);
    CHECK_OK(parse_upd("{\"bucket_max\": 1048576}", field));
    CHECK(job_buf.bucket_max == 1048576);
    /* checkpoint-engine's update fields: ranks (checked against the engine at admission),
     * inference_group_ranks, timeout in seconds, uds; nulls mean the default. */
    CHECK_OK(parse_upd("{\"ranks\": [1, 0], \"inference_group_ranks\": [2, 3], "
                       "\"timeout\": 1.5, \"uds\": \"/run/vllm.sock\", "
                       "\"update_url\": \"http://localhost/collective_rpc\", \"pause\": \"keep\"}",
                       field));
    CHECK(job_buf.nranks == 2 && job_buf.ngroup_ranks == 2 && job_buf.group_ranks[0] == 2 &&
          job_buf.group_ranks[1] == 3);
    CHECK(job_buf.timeout_ms == 1500);
    CHECK_STR(job_buf.uds, "/run/vllm.sock");
    CHECK_STR(job_buf.pause, "keep");
    CHECK_OK(parse_upd("{\"update_url\": null, \"uds\": null, \"ranks\": [], "
                       "\"inference_group_ranks\": [], \"timeout\": null}", field));
    CHECK(job_buf.update_url[0] == '\0' && job_buf.nranks == 0 && job_buf.timeout_ms == 0);
    CHECK_OK(parse_upd("{\"update_url\": \"http://h/other\", \"pause\": \"off\"}", field));
    char base[64];
    CHECK(ckpt_http_trigger_base("http://h:8000/collective_rpc", base, sizeof base));
    CHECK_STR(base, "http://h:8000");
    CHECK(!ckpt_http_trigger_base("http://h:8000/rpc", base, sizeof base));

    static const struct {
        const char *body, *field;
        int status;
    } bad[] = {
        {"{\"timeout_ms\": \"5\"}", "timeout_ms", CKPT_EINVAL},
        {"{\"timeout_ms\": 1.5}", "timeout_ms", CKPT_EINVAL},
        {"{\"timeout_ms\": -1}", "timeout_ms", CKPT_EINVAL},
        {"{\"timeout_ms\": 1e300}", "timeout_ms", CKPT_EINVAL},
        {"{\"bucket_max\": \"lots\"}", "bucket_max", CKPT_EINVAL},
        {"{\"bucket_max\": 0}", "bucket_max", CKPT_EINVAL},
        {"{\"mode\": \"multicast\"}", "mode", CKPT_EINVAL},
        {"{\"verify\": 1}", "verify", CKPT_EINVAL},
        {"{\"partial\": \"yes\"}", "partial", CKPT_EINVAL},
        {"{\"isolate\": 1}", "isolate", CKPT_EINVAL},
        {"{\"ranks\": [0, 0], \"mode\": \"p2p\"}", "ranks", CKPT_EINVAL},
        {"{\"ranks\": [-1], \"mode\": \"p2p\"}", "ranks", CKPT_EINVAL},
        {"{\"ranks\": [1.5]}", "ranks", CKPT_EINVAL},
        {"{\"ranks\": [4096]}", "ranks", CKPT_EINVAL},
        {"{\"inference_group_ranks\": [0, 0], \"update_url\": \"http://h/\"}",
         "inference_group_ranks", CKPT_EINVAL},
        {"{\"inference_group_ranks\": [1]}", "inference_group_ranks", CKPT_EINVAL},
        {"{\"timeout\": 0}", "timeout", CKPT_EINVAL},
        {"{\"timeout\": \"5\"}", "timeout", CKPT_EINVAL},
        {"{\"timeout\": 1e9}", "timeout", CKPT_EINVAL},
        {"{\"timeout\": 5, \"timeout_ms\": 5000}", "timeout", CKPT_EINVAL},
        {"{\"uds\": \"vllm.sock\", \"update_url\": \"http://h/\"}", "uds", CKPT_EINVAL},
        {"{\"uds\": \"/run/vllm.sock\"}", "uds", CKPT_EINVAL},
        {"{\"pause\": \"sometimes\"}", "pause", CKPT_EINVAL},
        {"{\"pause\": \"wait\", \"update_url\": \"http://h/other\"}", "pause", CKPT_EINVAL},
        {"{\"pause\": \"wait\"}", "pause", CKPT_EINVAL},
        {"{\"update_url\": \"file:///etc/passwd\"}", "update_url", CKPT_EINVAL},
        {"{\"trigger_method\": \"x\"}", "trigger_method", CKPT_EINVAL},
        {"{\"update_url\": \"http://h/\", \"trigger_method\": \"a b\"}", "trigger_method",
         CKPT_EINVAL},
        {"{\"bogus\": 1}", "bogus", CKPT_EINVAL},
        {"{\"mode\": ", "", CKPT_EFORMAT},
        {"\"str\"", "", CKPT_EINVAL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = parse_upd(bad[i].body, field);
        if (rc != bad[i].status || strcmp(field, bad[i].field) != 0) {
            fprintf(stderr, "body %s: rc %s field '%s', want %s '%s'\n", bad[i].body,
                    ckpt_status_name(rc), field, ckpt_status_name(bad[i].status), bad[i].field);
            test__failures++;
        }
    }
}

static void test_trigger_body(void)
{
    const char *socks[] = {"/run/a/rank-0.sock", "/run/a/rank-1.sock"};
    ckpt_trigger_request_t r = {0, NULL, "m", 3, 9, socks, 2, 0};
    char buf[1024];
    CHECK_OK(ckpt_trigger_body(&r, buf, sizeof buf));
    CHECK(strstr(buf, "\"method\":\"ckpt_engine_update\"") != NULL);
    CHECK(strstr(buf, "\"args\":[]") != NULL);
    CHECK(strstr(buf, "\"socket_paths\":{\"0\":\"/run/a/rank-0.sock\",\"1\":\"/run/a/rank-1.sock\"}"));
    CHECK(strstr(buf, "\"update_id\":9") && strstr(buf, "\"version\":3"));
    CHECK(strstr(buf, "\"timeout\":null") != NULL);
    CHECK(strstr(buf, "timeout_s") == NULL);
    CHECK_RC(ckpt_trigger_body(&r, buf, 16), CKPT_ETOOBIG);
    r.timeout_s = 2.5;
    CHECK_OK(ckpt_trigger_body(&r, buf, sizeof buf));
    CHECK(strstr(buf, "\"timeout_s\":2.5") && strstr(buf, "\"timeout\":2.5"));
}

static void test_trigger_refused(void)
{
    char err[512];
    /* Port 1 on loopback: nothing listens there in a test environment. */
    int rc = ckpt_trigger_post("http://127.0.0.1:1/collective_rpc", NULL, "{}", 2000, err,
                               sizeof err);
    CHECK(rc == CKPT_EPEER || rc == CKPT_ETIMEDOUT);
    CHECK(strstr(err, "127.0.0.1:1") != NULL);
    ckpt_trigger_t *t;
    CHECK_OK(ckpt_trigger_start("http://127.0.0.1:1/x", NULL, "{}", 2000, &t));
    CHECK(ckpt_trigger_wait(t, err, sizeof err) != 0);
    CHECK(strstr(err, "trigger POST") != NULL);
    /* A Unix socket nobody listens on: refused, and the text names the socket. */
    rc = ckpt_trigger_post("http://localhost/collective_rpc", "/nonexistent/vllm.sock", "{}",
                           2000, err, sizeof err);
    CHECK(rc == CKPT_EPEER);
    CHECK(strstr(err, "over Unix socket /nonexistent/vllm.sock") != NULL);
    /* Without --socket-dir the engine serves no workers: begin refuses before any POST. */
    ckpt_http_job_t *job = calloc(1, sizeof *job);
    ckpt_http_job_result_t r;
    memset(&r, 0, sizeof r);
    snprintf(job->update_url, sizeof job->update_url, "http://127.0.0.1:1/collective_rpc");
    CHECK_RC(ckpt_trigger_begin(job, NULL, 2, 1, 1000, &t, &r), CKPT_EINVAL);
    CHECK(strstr(r.reason, "--socket-dir") != NULL && !r.paused);
    /* Pausing a vLLM that is not there fails before the trigger, naming the pause URL. */
    memset(&r, 0, sizeof r);
    CHECK(ckpt_trigger_begin(job, "/tmp/s", 2, 1, 1000, &t, &r) != 0);
    CHECK(strstr(r.reason, "pause POST http://127.0.0.1:1/pause?mode=wait") != NULL);
    CHECK(!r.paused && !r.resumed);
    free(job);
}

typedef struct {
    char text[8192];
} buf_t;

/* Requests go through the CLI's own call() (compiled in above). */
static long http(int port, const char *method, const char *path, const char *body,
                 const char *token, buf_t *out)
{
    client_t c = {NULL, "", "test"};
    char server[64];
    snprintf(server, sizeof server, "http://127.0.0.1:%d", port);
    c.server = server;
    if (token) snprintf(c.token, sizeof c.token, "%s", token);
    body_t b;
    long code = call(&c, method, path, body, &b);
    snprintf(out->text, sizeof out->text, "%s", b.data ? b.data : "");
    free(b.data);
    return code;
}

static void test_server_jobs(void)
{
    ckpt_http_options_t o = CKPT_HTTP_OPTIONS_INIT;
    o.token = "s3cret";
    ckpt_http_server_t *srv;
    CHECK_OK(ckpt_http_start(&o, &srv));
    if (!srv) return;
    int port = ckpt_http_port(srv);
    CHECK(port > 0);
    buf_t b;
    ckpt_http_job_t job;
    CHECK_RC(ckpt_http_next_job(srv, 10, &job), CKPT_ETIMEDOUT);
    CHECK(http(port, "GET", "/v1/healthz", NULL, NULL, &b) == 200);
    CHECK(http(port, "GET", "/v1/checkpoints", NULL, NULL, &b) == 401);
    CHECK(http(port, "GET", "/v1/checkpoints", NULL, "wrong", &b) == 401);
    CHECK(http(port, "POST", "/v1/checkpoints/m/files", "{\"path\":\"/x\"}", "s3cret", &b) == 202);
    CHECK(strstr(b.text, "\"registering\"") != NULL);
    CHECK(http(port, "POST", "/v1/checkpoints/m/files", "{\"path\":\"/x\"}", "s3cret", &b) == 409);
    CHECK_OK(ckpt_http_next_job(srv, 1000, &job));
    CHECK(job.kind == CKPT_JOB_REGISTER);
    CHECK_STR(job.name, "m");
    CHECK_STR(job.path, "/x");
    ckpt_http_job_result_t r;
    memset(&r, 0, sizeof r);
    r.bytes = 4096;
    r.ntensors = 2;
    r.version = 1;
    CHECK_OK(ckpt_http_job_done(srv, &job, &r));
    CHECK(http(port, "GET", "/v1/checkpoints/m", NULL, "s3cret", &b) == 200);
    CHECK(strstr(b.text, "\"ready\"") && strstr(b.text, "\"bytes\":4096"));
    CHECK(http(port, "GET", "/v1/checkpoints/m/metas", NULL, "s3cret", &b) == 404);
    CHECK_OK(ckpt_http_set_metas(srv, "m", "abc", 3));
    CHECK(http(port, "GET", "/v1/checkpoints/m/metas", NULL, "s3cret", &b) == 200);
    CHECK_STR(b.text, "abc");
    CHECK(http(port, "POST", "/v1/checkpoints/m/update", "{\"timeout_ms\":100}", "s3cret", &b) ==
          202);
    CHECK(strstr(b.text, "\"/v1/updates/1\"") != NULL);
    CHECK(http(port, "POST", "/v1/checkpoints/m/update", "", "s3cret", &b) == 409);
    CHECK_OK(ckpt_http_next_job(srv, 1000, &job));
    CHECK(job.kind == CKPT_JOB_UPDATE && job.id == 1 && job.timeout_ms == 100);
    CHECK(job.trace_path[0] != '\0');
    ckpt_http_progress_t p = {3, 10, 300, 1000, 0.5};
    ckpt_http_report_progress(srv, &p);
    CHECK(http(port, "GET", "/v1/updates/1", NULL, "s3cret", &b) == 200);
    CHECK(strstr(b.text, "\"running\"") && strstr(b.text, "\"buckets_done\":3"));
    memset(&r, 0, sizeof r);
    r.failed_rank = -1;
    r.update.bytes = 1000;
    r.update.total_s = 0.7;
    CHECK_OK(ckpt_http_job_done(srv, &job, &r));
    CHECK(http(port, "GET", "/v1/updates/1", NULL, "s3cret", &b) == 200);
    CHECK(strstr(b.text, "\"succeeded\"") != NULL);
    CHECK(http(port, "GET", "/metrics", NULL, "s3cret", &b) == 200);
    CHECK(strstr(b.text, "ckpt_updates_total{result=\"ok\"} 1") != NULL);
    CHECK(http(port, "DELETE", "/v1/checkpoints/m", NULL, "s3cret", &b) == 202);
    CHECK_OK(ckpt_http_next_job(srv, 1000, &job));
    CHECK(job.kind == CKPT_JOB_UNREGISTER);
    memset(&r, 0, sizeof r);
    CHECK_OK(ckpt_http_job_done(srv, &job, &r));
    CHECK(http(port, "GET", "/v1/checkpoints/m", NULL, "s3cret", &b) == 404);
    /* A queued job left behind at stop is freed by stop (ASan checks). */
    CHECK(http(port, "POST", "/v1/checkpoints/n/files", "{\"path\":\"/y\"}", "s3cret", &b) == 202);
    ckpt_http_stop(srv);
}

static void test_bad_start(void)
{
    ckpt_http_options_t o = CKPT_HTTP_OPTIONS_INIT;
    o.bind_addr = "localhost"; /* not a literal: refused rather than resolved */
    ckpt_http_server_t *srv = NULL;
    CHECK_RC(ckpt_http_start(&o, &srv), CKPT_EINVAL);
    CHECK_ERR_HAS("localhost");
    CHECK(srv == NULL);
    o.bind_addr = NULL;
    o.request_timeout_s = -1; /* out of range: named, not clamped */
    CHECK_RC(ckpt_http_start(&o, &srv), CKPT_EINVAL);
    CHECK_ERR_HAS("request timeout");
    CHECK(srv == NULL);
}

/* An escaped backslash before u0000 is text, not a NUL: accepted as written. */
static void test_nul_escape_is_exact(void)
{
    ckpt_http_job_t j;
    memset(&j, 0, sizeof j);
    char field[64];
    const char *body = "{\"path\": \"/m/a\\\\u0000\"}";
    CHECK_OK(ckpt_http_parse_register(body, strlen(body), &j, field, sizeof field));
    CHECK(strcmp(j.path, "/m/a\\u0000") == 0);
}

/* The server's options have no field_mask bits yet: any bit is refused by name. */
static void test_options_field_mask(void)
{
    ckpt_http_options_t o = CKPT_HTTP_OPTIONS_INIT;
    ckpt_http_server_t *srv = NULL;
    o.field_mask = 1;
    CHECK_RC(ckpt_http_start(&o, &srv), CKPT_EINVAL);
    CHECK_ERR_HAS("ckpt_http_options_t: field_mask bits 0x1");
    CHECK(srv == NULL);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--serve") == 0) return serve(argc, argv);
    if (argc > 2 && strcmp(argv[1], "--client") == 0) return cmd_client(argc - 2, argv + 2);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    RUN_TEST(test_names);
    RUN_TEST(test_options_field_mask);
    RUN_TEST(test_parse_register);
    RUN_TEST(test_parse_update);
    RUN_TEST(test_trigger_body);
    RUN_TEST(test_trigger_refused);
    RUN_TEST(test_server_jobs);
    RUN_TEST(test_bad_start);
    RUN_TEST(test_nul_escape_is_exact);
    curl_global_cleanup();
    TEST_EXIT();
}
