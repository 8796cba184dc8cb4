/* ckpt-engine register|update|status|unregister|list|metas: a client of the HTTP API that
 * rank 0 of `ckpt-engine serve --http` runs (docs/HTTP.md). */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "ckpt/ckpt.h"

int cmd_client(int argc, char **argv);

typedef struct {
    const char *server;
    char token[512];
    const char *cmd;
} client_t;

typedef struct {
    char *data;
    size_t len;
} body_t;

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    body_t *b = ud;
    char *d = realloc(b->data, b->len + size * n + 1);
    if (!d) return 0;
    memcpy(d + b->len, p, size * n);
    b->len += size * n;
    d[b->len] = '\0';
    b->data = d;
    return size * n;
}

/* One request; returns the HTTP status, or -1 after printing why the server could not be
 * reached. The reply lands in *out (caller frees out->data). */
static long call(const client_t *c, const char *method, const char *path, const char *json,
                 body_t *out)
{
    char url[2048], auth[600], cerr[CURL_ERROR_SIZE] = "";
    snprintf(url, sizeof url, "%s%s", c->server, path);
    memset(out, 0, sizeof *out);
    CURL *h = curl_easy_init();
    struct curl_slist *hdr = NULL;
    if (!h) return -1;
    if (c->token[0]) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", c->token);
        hdr = curl_slist_append(hdr, auth);
    }
    if (json) hdr = curl_slist_append(hdr, "Content-Type: application/json");
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    if (json) curl_easy_setopt(h, CURLOPT_POSTFIELDS, json);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 60000L);
    CURLcode cc = curl_easy_perform(h);
    long code = -1;
    if (cc == CURLE_OK) {
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    } else {
        const char *why = cc == CURLE_COULDNT_CONNECT ? "connection refused"
                          : cerr[0]                  ? cerr
                                                     : curl_easy_strerror(cc);
        fprintf(stderr, "ckpt-engine %s: cannot reach %s: %s — is `ckpt-engine serve --http` "
                        "running?\n", c->cmd, c->server, why);
    }
    curl_slist_free_all(hdr);
    curl_easy_cleanup(h);
    return code;
}

/* Parses a JSON reply; on an HTTP error prints the server's reason and returns NULL. */
static cJSON *reply(const client_t *c, long code, body_t *b)
{
    cJSON *o = b->data ? cJSON_Parse(b->data) : NULL;
    if (code >= 200 && code < 300 && o) return o;
    const cJSON *err = cJSON_GetObjectItem(o, "error"), *field = cJSON_GetObjectItem(o, "field");
    if (cJSON_IsString(err)) {
        fprintf(stderr, "ckpt-engine %s: %s%s%s%s (HTTP %ld)\n", c->cmd, err->valuestring,
                cJSON_IsString(field) ? " (field '" : "",
                cJSON_IsString(field) ? field->valuestring : "", cJSON_IsString(field) ? "')" : "",
                code);
        if (code == 401) fprintf(stderr, "  (pass the server's token with --token-file FILE)\n");
    } else if (code > 0) {
        fprintf(stderr, "ckpt-engine %s: HTTP %ld: %.200s\n", c->cmd, code,
                b->data ? b->data : "(no body)");
    }
    cJSON_Delete(o);
    return NULL;
}

static cJSON *get_json(const client_t *c, const char *method, const char *path, const char *json)
{
    body_t b;
    long code = call(c, method, path, json, &b);
    cJSON *o = code < 0 ? NULL : reply(c, code, &b);
    free(b.data);
    return o;
}

static double num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItem(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static const char *str(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItem(o, key);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static void print_json(const cJSON *o)
{
    char *t = cJSON_Print(o);
    if (t) printf("%s\n", t);
    free(t);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void show_progress(const cJSON *u, int tty, unsigned *last_done)
{
    const cJSON *p = cJSON_GetObjectItem(u, "progress");
    unsigned done = (unsigned)num(p, "buckets_done"), nb = (unsigned)num(p, "nbuckets");
    char a[32], b[32], r[32], eta[32] = "-";
    ckpt_format_size((uint64_t)num(p, "bytes_done"), a, sizeof a);
    ckpt_format_size((uint64_t)num(p, "bytes_total"), b, sizeof b);
    ckpt_format_size((uint64_t)num(p, "rate_bytes_per_s"), r, sizeof r);
    if (cJSON_IsNumber(cJSON_GetObjectItem(p, "eta_s")))
        snprintf(eta, sizeof eta, "%.1fs", num(p, "eta_s"));
    if (tty) {
        char bar[21];
        int fill = nb ? (int)(20.0 * done / nb) : 0;
        for (int i = 0; i < 20; i++) bar[i] = i < fill ? '#' : '-';
        bar[20] = '\0';
        printf("\r[%s] %-9s bucket %u/%u  %s / %s  %s/s  ETA %s   ", bar, str(u, "state"), done,
               nb, a, b, r, eta);
        fflush(stdout);
    } else if (done != *last_done && (nb || strcmp(str(u, "state"), "running") != 0)) {
        /* Plain lines for logs: one per bucket change, none before the plan exists. */
        printf("%s bucket %u/%u %s / %s %s/s eta %s\n", str(u, "state"), done, nb, a, b, r, eta);
    }
    *last_done = done;
}

/* Polls an update until it ends; exit status 0 only if it succeeded. */
static int wait_update(const client_t *c, const char *status_url)
{
    int tty = isatty(STDOUT_FILENO);
    unsigned last = (unsigned)-1;
    for (;;) {
        cJSON *u = get_json(c, "GET", status_url, NULL);
        if (!u) return 1;
        const char *st = str(u, "state");
        int end = strcmp(st, "succeeded") == 0 || strcmp(st, "failed") == 0;
        show_progress(u, tty, &last);
        if (end) {
            if (tty) printf("\n");
            char sz[32];
            ckpt_format_size((uint64_t)num(u, "bytes"), sz, sizeof sz);
            const cJSON *t = cJSON_GetObjectItem(u, "timings");
            int ok = strcmp(st, "succeeded") == 0;
            if (ok)
                printf("update %.0f of '%s' succeeded: %s in %.0f buckets to %.0f ranks, %.3f s%s\n",
                       num(u, "update_id"), str(u, "name"), sz, num(u, "buckets"),
                       num(u, "ranks"), num(t, "total_s"),
                       cJSON_IsTrue(cJSON_GetObjectItem(u, "resumed"))
                           ? " (vLLM paused for it, resumed)" : "");
            else
                fprintf(stderr, "ckpt-engine update: update %.0f of '%s' failed%s%.0f: %s\n",
                        num(u, "update_id"), str(u, "name"),
                        num(u, "failed_rank") >= 0 ? " on rank " : "",
                        num(u, "failed_rank") >= 0 ? num(u, "failed_rank") : 0, str(u, "reason"));
            /* isolate: the workers cut out, whatever the outcome for the others. */
            const cJSON *w;
            cJSON_ArrayForEach(w, cJSON_GetObjectItem(u, "isolated"))
                fprintf(stderr, "ckpt-engine update: isolated rank %.0f's worker (pid %.0f): %s\n",
                        num(w, "rank"), num(w, "worker"), str(w, "reason"));
            cJSON_Delete(u);
            return ok ? 0 : 1;
        }
        cJSON_Delete(u);
        sleep_ms(200);
    }
}

static int do_register(const client_t *c, const char *name, char **paths, int npaths, int wait)
{
    cJSON *req = cJSON_CreateObject();
    if (npaths == 1) {
        cJSON_AddStringToObject(req, "path", paths[0]);
    } else { /* several safetensors files: one checkpoint ({"files": [...]}) */
        cJSON *arr = cJSON_AddArrayToObject(req, "files");
        for (int i = 0; i < npaths; i++) cJSON_AddItemToArray(arr, cJSON_CreateString(paths[i]));
    }
    char *json = cJSON_PrintUnformatted(req), url[512];
    cJSON_Delete(req);
    snprintf(url, sizeof url, "/v1/checkpoints/%s/files", name);
    cJSON *o = get_json(c, "POST", url, json);
    free(json);
    if (!o) return 1;
    snprintf(url, sizeof url, "%s", str(o, "status_url"));
    cJSON_Delete(o);
    if (!wait) {
        printf("registering '%s' (see %s)\n", name, url);
        return 0;
    }
    for (;;) {
        o = get_json(c, "GET", url, NULL);
        if (!o) return 1;
        if (strcmp(str(o, "state"), "registering") != 0) break;
        cJSON_Delete(o);
        sleep_ms(200);
    }
    int ok = strcmp(str(o, "state"), "ready") == 0;
    char sz[32];
    ckpt_format_size((uint64_t)num(o, "bytes"), sz, sizeof sz);
    if (ok) printf("'%s' ready: %s, %.0f tensors, version %.0f\n", name, sz, num(o, "tensors"),
                   num(o, "version"));
    else fprintf(stderr, "ckpt-engine register: '%s' failed: %s\n", name, str(o, "reason"));
    cJSON_Delete(o);
    return ok ? 0 : 1;
}

static int do_list(const client_t *c)
{
    cJSON *o = get_json(c, "GET", "/v1/checkpoints", NULL);
    if (!o) return 1;
    printf("%-32s %-13s %12s %8s %8s\n", "NAME", "STATE", "BYTES", "TENSORS", "VERSION");
    const cJSON *e;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(o, "checkpoints"))
    {
        char sz[32];
        ckpt_format_size((uint64_t)num(e, "bytes"), sz, sizeof sz);
        printf("%-32s %-13s %12s %8.0f %8.0f\n", str(e, "name"), str(e, "state"), sz,
               num(e, "tensors"), num(e, "version"));
    }
    cJSON_Delete(o);
    return 0;
}

static int do_metas(const client_t *c, const char *name, const char *file)
{
    char url[512];
    snprintf(url, sizeof url, "/v1/checkpoints/%s/metas", name);
    body_t b;
    long code = call(c, "GET", url, NULL, &b);
    if (code != 200) {
        if (code > 0) cJSON_Delete(reply(c, code, &b));
        free(b.data);
        return 1;
    }
    FILE *f = file ? fopen(file, "wb") : stdout;
    int rc = 0;
    if (!f || fwrite(b.data ? b.data : "", 1, b.len, f) != b.len) {
        fprintf(stderr, "ckpt-engine metas: %s: %s\n", file ? file : "stdout", strerror(errno));
        rc = 1;
    }
    if (f && f != stdout && fclose(f) != 0) rc = 1;
    if (!rc && file) fprintf(stderr, "wrote %zu bytes of metas to %s\n", b.len, file);
    free(b.data);
    return rc;
}

static int read_token(client_t *c, const char *file)
{
    FILE *f = fopen(file, "r");
    if (!f) {
        fprintf(stderr, "ckpt-engine %s: token file %s: %s\n", c->cmd, file, strerror(errno));
        return -1;
    }
    size_t n = fread(c->token, 1, sizeof c->token - 1, f);
    fclose(f);
    c->token[n] = '\0';
    /* As the server reads it: the text without surrounding whitespace (files usually end
     * in a newline). */
    while (n && isspace((unsigned char)c->token[n - 1])) c->token[--n] = '\0';
    size_t lead = strspn(c->token, " \t\r\n\v\f");
    memmove(c->token, c->token + lead, n - lead + 1);
    return 0;
}

static void usage(FILE *out)
{
    fprintf(out,
        "usage: ckpt-engine register NAME PATH [PATH..] [--wait]\n"
        "                   (one PATH: a .safetensors file, a directory or an index.json;\n"
        "                   several: .safetensors files registered as one checkpoint)\n"
        "       ckpt-engine update NAME [--bucket-max SIZE] [--timeout-ms MS] [--verify]\n"
        "                   [--partial] [--isolate] [--mode broadcast|p2p] [--ranks R,R..] [--update-url URL]\n"
        "                   [--trigger-method M] [--inference-group-ranks R,R..]\n"
        "                   [--uds PATH] [--pause wait|abort|keep|off] [--metas-url URL]\n"
        "                   [--wait]\n"
        "                   (--metas-url: a P2P update of this deployment, pulling from the\n"
        "                   serving deployment whose GET .../metas URL is given;\n"
        "                   --update-url .../collective_rpc: vLLM, paused around the update\n"
        "                   (--pause, default wait: in-flight requests finish first) and\n"
        "                   resumed only after it succeeded;\n"
        "                   --partial: NAME is a subset of the workers' models on purpose,\n"
        "                   without it a worker whose model has tensors NAME lacks refuses\n"
        "                   the update;\n"
        "                   --isolate: a worker that fails, stalls or dies is cut out of the\n"
        "                   update and listed, the others complete it (default: one fails,\n"
        "                   all abort); the exit status is 0 when the others completed)\n"
        "       ckpt-engine status [UPDATE_ID]\n"
        "       ckpt-engine unregister NAME\n"
        "       ckpt-engine list\n"
        "       ckpt-engine metas NAME [-o FILE]\n"
        "common: --server URL (default $CKPT_SERVER or http://127.0.0.1:8080)\n"
        "        --token-file FILE (default $CKPT_TOKEN_FILE): bearer token of the server\n"
        "Talks to the HTTP API of `ckpt-engine serve --http` (docs/HTTP.md). Exit status:\n"
        "0 success, 1 failure (the reason is printed), 2 usage error.\n");
}

/* Builds the update request from the options; NULL after printing a usage error. */
/* "R,R,.." into a JSON array under key; -1 after printing a usage error. */
static int add_ranks(cJSON *o, const char *key, const char *opt, const char *ranks)
{
    cJSON *arr = cJSON_AddArrayToObject(o, key);
    for (const char *p = ranks; *p;) {
        char *end;
        long r = strtol(p, &end, 10);
        if (end == p || (*end && *end != ',')) {
            fprintf(stderr, "ckpt-engine update: %s wants R,R,.. got '%s'\n", opt, ranks);
            return -1;
        }
        cJSON_AddItemToArray(arr, cJSON_CreateNumber((double)r));
        p = *end ? end + 1 : end;
    }
    return 0;
}

static cJSON *update_body(int verify, int partial, int isolate, const char *bucket, const char *timeout,
                          const char *mode, const char *ranks, const char *url,
                          const char *method, const char *metas_url, const char *group_ranks,
                          const char *uds, const char *pause)
{
    cJSON *o = cJSON_CreateObject();
    if (bucket) cJSON_AddStringToObject(o, "bucket_max", bucket);
    if (timeout) {
        char *end;
        long t = strtol(timeout, &end, 10);
        if (*end || t <= 0) {
            fprintf(stderr, "ckpt-engine update: --timeout-ms wants a positive integer, got '%s'\n",
                    timeout);
            cJSON_Delete(o);
            return NULL;
        }
        cJSON_AddNumberToObject(o, "timeout_ms", (double)t);
    }
    if (verify) cJSON_AddBoolToObject(o, "verify", 1);
    if (partial) cJSON_AddBoolToObject(o, "partial", 1);
    if (isolate) cJSON_AddBoolToObject(o, "isolate", 1);
    if (metas_url && !mode) mode = "p2p";
    if (mode) cJSON_AddStringToObject(o, "mode", mode);
    if (metas_url) cJSON_AddStringToObject(o, "metas_url", metas_url);
    if (url) cJSON_AddStringToObject(o, "update_url", url);
    if (method) cJSON_AddStringToObject(o, "trigger_method", method);
    if (uds) cJSON_AddStringToObject(o, "uds", uds);
    if (pause) cJSON_AddStringToObject(o, "pause", pause);
    if ((ranks && add_ranks(o, "ranks", "--ranks", ranks) < 0) ||
        (group_ranks &&
         add_ranks(o, "inference_group_ranks", "--inference-group-ranks", group_ranks) < 0)) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static int do_update(const client_t *c, const char *name, cJSON *body, int wait)
{
    char *json = cJSON_PrintUnformatted(body), url[512];
    snprintf(url, sizeof url, "/v1/checkpoints/%s/update", name);
    cJSON *o = get_json(c, "POST", url, json);
    free(json);
    if (!o) return 1;
    snprintf(url, sizeof url, "%s", str(o, "status_url"));
    if (!wait) printf("update %.0f of '%s' queued (see %s)\n", num(o, "update_id"), name, url);
    cJSON_Delete(o);
    return wait ? wait_update(c, url) : 0;
}

int cmd_client(int argc, char **argv)
{
    client_t c = {getenv("CKPT_SERVER"), "", argv[0]};
    const char *token_file = getenv("CKPT_TOKEN_FILE"), *out = NULL, *bucket = NULL,
               *timeout = NULL, *mode = NULL, *ranks = NULL, *url = NULL, *method = NULL,
               *metas_url = NULL, *group_ranks = NULL, *uds = NULL, *pause = NULL;
    int wait = 0, verify = 0, partial = 0, isolate = 0, rc = 2;
    enum { O_SERVER = 256, O_TOKEN, O_BUCKET, O_TIMEOUT, O_MODE, O_RANKS, O_URL, O_METHOD,
           O_METAS, O_GROUP, O_UDS, O_PAUSE, O_PARTIAL, O_ISOLATE };
    static const struct option longopts[] = {
        {"server", required_argument, NULL, O_SERVER},
        {"token-file", required_argument, NULL, O_TOKEN},
        {"bucket-max", required_argument, NULL, O_BUCKET},
        {"timeout-ms", required_argument, NULL, O_TIMEOUT},
        {"mode", required_argument, NULL, O_MODE},
        {"ranks", required_argument, NULL, O_RANKS},
        {"update-url", required_argument, NULL, O_URL},
        {"trigger-method", required_argument, NULL, O_METHOD},
        {"metas-url", required_argument, NULL, O_METAS},
        {"inference-group-ranks", required_argument, NULL, O_GROUP},
        {"uds", required_argument, NULL, O_UDS},
        {"pause", required_argument, NULL, O_PAUSE},
        {"verify", no_argument, NULL, 'v'},
        {"partial", no_argument, NULL, O_PARTIAL},
        {"isolate", no_argument, NULL, O_ISOLATE},
        {"wait", no_argument, NULL, 'w'},
        {"output", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "o:h", longopts, NULL)) != -1) {
        switch (ch) {
        case O_SERVER: c.server = optarg; break;
        case O_TOKEN: token_file = optarg; break;
        case O_BUCKET: bucket = optarg; break;
        case O_TIMEOUT: timeout = optarg; break;
        case O_MODE: mode = optarg; break;
        case O_RANKS: ranks = optarg; break;
        case O_URL: url = optarg; break;
        case O_METHOD: method = optarg; break;
        case O_METAS: metas_url = optarg; break;
        case O_GROUP: group_ranks = optarg; break;
        case O_UDS: uds = optarg; break;
        case O_PAUSE: pause = optarg; break;
        case 'v': verify = 1; break;
        case O_PARTIAL: partial = 1; break;
        case O_ISOLATE: isolate = 1; break;
        case 'w': wait = 1; break;
        case 'o': out = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!c.server || !*c.server) c.server = "http://127.0.0.1:8080";
    /* A trailing slash would double up with the API paths. */
    char server[1024];
    snprintf(server, sizeof server, "%s", c.server);
    size_t sl = strlen(server);
    while (sl && server[sl - 1] == '/') server[--sl] = '\0';
    c.server = server;
    if (token_file && read_token(&c, token_file) != 0) return 1;
    char **pos = argv + optind;
    int npos = argc - optind;
    const char *cmd = argv[0];
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (strcmp(cmd, "register") == 0 && npos >= 2) {
        rc = do_register(&c, pos[0], pos + 1, npos - 1, wait);
    } else if (strcmp(cmd, "update") == 0 && npos == 1) {
        cJSON *body = update_body(verify, partial, isolate, bucket, timeout, mode, ranks, url, method, metas_url,
                                  group_ranks, uds, pause);
        rc = body ? do_update(&c, pos[0], body, wait) : 2;
        cJSON_Delete(body);
    } else if (strcmp(cmd, "status") == 0 && npos <= 1) {
        char path[64];
        if (npos == 1) snprintf(path, sizeof path, "/v1/updates/%s", pos[0]);
        else snprintf(path, sizeof path, "/v1/healthz");
        cJSON *o = get_json(&c, "GET", path, NULL);
        if (o) print_json(o);
        rc = o ? 0 : 1;
        cJSON_Delete(o);
        if (o && npos == 0) rc = do_list(&c);
    } else if (strcmp(cmd, "unregister") == 0 && npos == 1) {
        char path[512];
        snprintf(path, sizeof path, "/v1/checkpoints/%s", pos[0]);
        cJSON *o = get_json(&c, "DELETE", path, NULL);
        if (o) printf("'%s' %s\n", pos[0], str(o, "state"));
        rc = o ? 0 : 1;
        cJSON_Delete(o);
    } else if (strcmp(cmd, "list") == 0 && npos == 0) {
        rc = do_list(&c);
    } else if (strcmp(cmd, "metas") == 0 && npos == 1) {
        rc = do_metas(&c, pos[0], out);
    } else {
        fprintf(stderr, "ckpt-engine %s: wrong arguments\n", cmd);
        usage(stderr);
    }
    curl_global_cleanup();
    return rc;
}
