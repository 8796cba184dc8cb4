/* libmicrohttpd plumbing: start/stop, body collection with a size limit, bearer-token
 * check, routing to the handlers below, JSON responses. Handlers never block on the
 * engine: they queue a job (202) or answer from the published state. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "server/server_internal.h"

/* Per-request context: the body so far. Past the limit we keep reading (and dropping) so
 * the client gets its 413 instead of a reset connection; a client that keeps sending far
 * past it is cut off. */
typedef struct req {
    char *body;
    size_t len, cap;
    int too_big;
} req_t;

#define DRAIN_FACTOR 64
/* How long gather-metas waits for a registration by default: reading a very large
 * checkpoint from disk takes minutes. */
#define GATHER_WAIT_S 600.0

static enum MHD_Result send_buf(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                                unsigned code, const char *type, void *buf, size_t len,
                                enum MHD_ResponseMemoryMode mode)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, buf, mode);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", type);
    if (code == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    enum MHD_Result r = MHD_queue_response(conn, code, resp);
    MHD_destroy_response(resp);
    srv_count_request(srv, code);
    return r;
}

/* Consumes obj. */
static enum MHD_Result send_json(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                                 unsigned code, cJSON *obj)
{
    char *text = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    if (!text) {
        static char oom[] = "{\"error\":\"out of memory\"}\n";
        return send_buf(conn, srv, 503, "application/json", oom, sizeof oom - 1,
                        MHD_RESPMEM_PERSISTENT);
    }
    size_t n = strlen(text);
    char *copy = malloc(n + 2); /* MHD frees with free(): not our tracked allocator */
    if (copy) {
        memcpy(copy, text, n);
        copy[n] = '\n';
        copy[n + 1] = '\0';
    }
    cJSON_free(text);
    if (!copy) return MHD_NO;
    return send_buf(conn, srv, code, "application/json", copy, n + 1, MHD_RESPMEM_MUST_FREE);
}

static enum MHD_Result send_error(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                                  unsigned code, const char *msg, const char *field)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", msg);
    if (field && field[0]) cJSON_AddStringToObject(o, "field", field);
    cJSON_AddNumberToObject(o, "code", code);
    return send_json(conn, srv, code, o);
}

/* Constant time in the length of the expected token, so response timing says nothing
 * about how many leading bytes of a guess were right. */
static int token_ok(const char *expected, const char *header)
{
    static const char prefix[] = "Bearer ";
    if (!header || strncmp(header, prefix, sizeof prefix - 1) != 0) return 0;
    const char *got = header + sizeof prefix - 1;
    size_t n = strlen(expected), m = strlen(got);
    unsigned diff = (unsigned)(n ^ m);
    for (size_t i = 0; i < n; i++) diff |= (unsigned char)expected[i] ^ (unsigned char)(i < m ? got[i] : 0);
    return diff == 0;
}

/* Splits "/a/b/c" into at most max segments; returns the count, -1 if more. */
static int split_path(char *path, char **seg, int max)
{
    int n = 0;
    char *save = NULL;
    for (char *p = strtok_r(path, "/", &save); p; p = strtok_r(NULL, "/", &save)) {
        if (n == max) return -1;
        seg[n++] = p;
    }
    return n;
}

static int parse_id(const char *s, uint64_t *out)
{
    if (!*s || strlen(s) > 19) return 0;
    uint64_t v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return 0;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    return v != 0;
}

static enum MHD_Result wrong_method(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                                    const char *method, const char *allowed)
{
    char msg[160];
    snprintf(msg, sizeof msg, "method %s not allowed here; use %s", method, allowed);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", msg);
    cJSON_AddNumberToObject(o, "code", 405);
    char *text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!text) return MHD_NO;
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_COPY);
    cJSON_free(text);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "application/json");
    MHD_add_response_header(resp, "Allow", allowed);
    enum MHD_Result r = MHD_queue_response(conn, 405, resp);
    MHD_destroy_response(resp);
    srv_count_request(srv, 405);
    return r;
}

static enum MHD_Result submit(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                              ckpt_http_job_t *job)
{
    char err[640];
    int code = srv_submit(srv, job, err, sizeof err);
    ckpt_http_job_release(job); /* a queued job's list belongs to the queue already */
    if (code != 202 && code != 200) return send_error(conn, srv, (unsigned)code, err, NULL);
    cJSON *o = cJSON_CreateObject();
    char url[CKPT_NAME_MAX + 64];
    cJSON_AddStringToObject(o, "name", job->name);
    if (job->kind == CKPT_JOB_UPDATE) {
        snprintf(url, sizeof url, "/v1/updates/%llu", (unsigned long long)job->id);
        cJSON_AddNumberToObject(o, "update_id", (double)job->id);
        cJSON_AddStringToObject(o, "state", "queued");
    } else {
        snprintf(url, sizeof url, "/v1/checkpoints/%s", job->name);
        cJSON_AddStringToObject(o, "state", code == 200 ? "removed"
                                            : job->kind == CKPT_JOB_REGISTER ? "registering"
                                                                             : "unregistering");
    }
    cJSON_AddStringToObject(o, "status_url", url);
    return send_json(conn, srv, (unsigned)code, o);
}

static enum MHD_Result serve_trace(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                                   uint64_t id)
{
    char path[CKPT_HTTP_PATH_MAX], err[256];
    int code = srv_trace_path(srv, id, path, sizeof path, err, sizeof err);
    if (code != 200) return send_error(conn, srv, (unsigned)code, err, NULL);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0) close(fd);
        snprintf(err, sizeof err, "update %llu wrote no trace (%s)", (unsigned long long)id,
                 strerror(errno));
        return send_error(conn, srv, 404, err, NULL);
    }
    /* MHD sends the file (sendfile where it can) and closes fd with the response. */
    struct MHD_Response *resp = MHD_create_response_from_fd((uint64_t)st.st_size, fd);
    if (!resp) {
        close(fd);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "application/json");
    enum MHD_Result r = MHD_queue_response(conn, 200, resp);
    MHD_destroy_response(resp);
    srv_count_request(srv, 200);
    return r;
}

static enum MHD_Result route_checkpoint(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                                        const char *method, char **seg, int n, req_t *rq)
{
    const char *name = seg[2];
    char field[64] = "", msg[CKPT_NAME_MAX + 128];
    if (!ckpt_http_name_valid(name)) {
        snprintf(msg, sizeof msg,
                 "bad checkpoint name: 1..128 characters of A-Z a-z 0-9 . _ -, not starting "
                 "with . or -");
        return send_error(conn, srv, 400, msg, "name");
    }
    if (n == 3) {
        if (strcmp(method, "GET") == 0) {
            int code;
            cJSON *o = srv_render_checkpoint(srv, name, &code);
            if (!o) {
                snprintf(msg, sizeof msg, "no checkpoint named '%s'", name);
                return send_error(conn, srv, 404, msg, NULL);
            }
            return send_json(conn, srv, 200, o);
        }
        if (strcmp(method, "DELETE") == 0) {
            ckpt_http_job_t *job = ckpt__calloc(1, sizeof *job);
            if (!job) return send_error(conn, srv, 503, "out of memory", NULL);
            job->kind = CKPT_JOB_UNREGISTER;
            ckpt__strlcpy(job->name, name, sizeof job->name);
            enum MHD_Result r = submit(conn, srv, job);
            ckpt__free(job);
            return r;
        }
        return wrong_method(conn, srv, method, "GET, DELETE");
    }
    const char *what = seg[3];
    if (strcmp(what, "metas") == 0) {
        if (strcmp(method, "GET") != 0) return wrong_method(conn, srv, method, "GET");
        void *bytes = NULL;
        size_t len = 0;
        int code = srv_copy_metas(srv, name, &bytes, &len, msg, sizeof msg);
        if (code != 200) return send_error(conn, srv, (unsigned)code, msg, NULL);
        enum MHD_Result r = send_buf(conn, srv, 200, "application/octet-stream", bytes, len,
                                     MHD_RESPMEM_MUST_COPY);
        ckpt__free(bytes);
        return r;
    }
    if (strcmp(what, "gather-metas") == 0) {
        /* checkpoint-engine's step between registering and updating. Our registration
         * gathers the metas itself: this waits for it to end and shows the result. */
        if (strcmp(method, "POST") != 0) return wrong_method(conn, srv, method, "POST");
        double timeout_s = GATHER_WAIT_S;
        if (ckpt_http_parse_gather_metas(rq->body, rq->len, &timeout_s, field, sizeof field))
            return send_error(conn, srv, 400, ckpt_last_error(), field);
        char err[800];
        int code;
        cJSON *o = srv_gather_metas(srv, name, timeout_s, &code, err, sizeof err);
        return o ? send_json(conn, srv, 200, o) : send_error(conn, srv, (unsigned)code, err, NULL);
    }
    int is_files = strcmp(what, "files") == 0, is_update = strcmp(what, "update") == 0;
    if (!is_files && !is_update) return send_error(conn, srv, 404, "no such endpoint", NULL);
    if (strcmp(method, "POST") != 0) return wrong_method(conn, srv, method, "POST");
    ckpt_http_job_t *job = ckpt__calloc(1, sizeof *job);
    if (!job) return send_error(conn, srv, 503, "out of memory", NULL);
    job->kind = is_files ? CKPT_JOB_REGISTER : CKPT_JOB_UPDATE;
    ckpt__strlcpy(job->name, name, sizeof job->name);
    int rc = is_files ? ckpt_http_parse_register(rq->body, rq->len, job, field, sizeof field)
                      : ckpt_http_parse_update(rq->body, rq->len, job, field, sizeof field);
    enum MHD_Result r;
    char err[640];
    if (rc) r = send_error(conn, srv, 400, ckpt_last_error(), field);
    else if (srv_check_ranks(srv, job, err, sizeof err, field, sizeof field))
        r = send_error(conn, srv, 400, err, field);
    else r = submit(conn, srv, job);
    ckpt_http_job_release(job);
    ckpt__free(job);
    return r;
}

static enum MHD_Result route(struct MHD_Connection *conn, ckpt_http_server_t *srv,
                             const char *url, const char *method, req_t *rq)
{
    char path[1024];
    if (strlen(url) >= sizeof path) return send_error(conn, srv, 414, "URL too long", NULL);
    snprintf(path, sizeof path, "%s", url);
    char *seg[6];
    int n = split_path(path, seg, 6);
    if (n == 1 && strcmp(seg[0], "metrics") == 0) {
        if (strcmp(method, "GET") != 0) return wrong_method(conn, srv, method, "GET");
        /* Count this scrape before rendering so the text agrees with the next one. */
        srv_count_request(srv, 200);
        char *text = srv_render_metrics(srv);
        if (!text) return send_error(conn, srv, 503, "out of memory", NULL);
        struct MHD_Response *resp = MHD_create_response_from_buffer(
            strlen(text), text, MHD_RESPMEM_MUST_COPY);
        ckpt__free(text);
        if (!resp) return MHD_NO;
        MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4");
        enum MHD_Result r = MHD_queue_response(conn, 200, resp);
        MHD_destroy_response(resp);
        return r;
    }
    if (n < 2 || strcmp(seg[0], "v1") != 0)
        return send_error(conn, srv, 404, "no such endpoint (see docs/HTTP.md)", NULL);
    if (n == 2 && strcmp(seg[1], "healthz") == 0) {
        if (strcmp(method, "GET") != 0) return wrong_method(conn, srv, method, "GET");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "status", "ok");
        cJSON_AddStringToObject(o, "version", ckpt_version());
        return send_json(conn, srv, 200, o);
    }
    if (strcmp(seg[1], "checkpoints") == 0) {
        if (n == 2) {
            if (strcmp(method, "GET") != 0) return wrong_method(conn, srv, method, "GET");
            return send_json(conn, srv, 200, srv_render_checkpoints(srv));
        }
        if (n == 3 || n == 4) return route_checkpoint(conn, srv, method, seg, n, rq);
    }
    if (strcmp(seg[1], "updates") == 0 && (n == 3 || n == 4)) {
        uint64_t id;
        if (!parse_id(seg[2], &id))
            return send_error(conn, srv, 400, "update id must be a positive integer", "id");
        if (strcmp(method, "GET") != 0) return wrong_method(conn, srv, method, "GET");
        if (n == 4) {
            if (strcmp(seg[3], "trace") != 0)
                return send_error(conn, srv, 404, "no such endpoint", NULL);
            return serve_trace(conn, srv, id);
        }
        int code;
        cJSON *o = srv_render_update(srv, id, &code);
        if (!o) {
            char msg[128];
            snprintf(msg, sizeof msg, "no update %llu (only the last %d are kept)",
                     (unsigned long long)id, SRV_HISTORY);
            return send_error(conn, srv, 404, msg, NULL);
        }
        return send_json(conn, srv, 200, o);
    }
    return send_error(conn, srv, 404, "no such endpoint (see docs/HTTP.md)", NULL);
}

/* ---- the request deadline ----------------------------------------------------------
 * MHD's connection timeout is an idle timeout: each byte a client trickles resets it, so
 * a few hundred clients sending a header line every few seconds would hold every
 * connection slot (and a thread each) forever. MHD 0.9.75 has no total deadline, and in
 * thread-per-connection mode we cannot close its connections ourselves, so a watchdog
 * thread does it through the socket: every connection is listed from MHD's STARTED to
 * its CLOSED notification with a deadline; past it the watchdog writes a 408 and shuts
 * the socket down, which wakes the connection's thread with end-of-file and MHD closes
 * it. shutdown() never frees the descriptor, and MHD closes it only after CLOSED (which
 * unlists it under conn_mu), so the watchdog never touches a reused descriptor. The
 * deadline stops while a handler runs or a response goes out (gather-metas may wait for
 * minutes; a slow reader meets the idle timeout) and restarts for the next request on
 * the same connection. */

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static srv_conn_t *conn_of(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? (srv_conn_t *)ci->socket_context : NULL;
}

/* deadline_on: 1 restarts the clock (waiting for a request), 0 stops it. */
static void conn_deadline(ckpt_http_server_t *srv, struct MHD_Connection *conn, int deadline_on)
{
    srv_conn_t *c = conn_of(conn);
    if (!c) return;
    pthread_mutex_lock(&srv->conn_mu);
    c->deadline = deadline_on ? mono_now() + srv->request_timeout_s : 0;
    pthread_mutex_unlock(&srv->conn_mu);
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    ckpt_http_server_t *srv = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        srv_conn_t *c = ci ? calloc(1, sizeof *c) : NULL;
        if (!c) return; /* unwatched: the idle timeout still bounds it */
        c->fd = ci->connect_fd;
        pthread_mutex_lock(&srv->conn_mu);
        c->deadline = mono_now() + srv->request_timeout_s;
        c->next = srv->conns;
        if (srv->conns) srv->conns->prev = c;
        srv->conns = c;
        srv->nconns++;
        pthread_mutex_unlock(&srv->conn_mu);
        *socket_context = c;
        return;
    }
    srv_conn_t *c = *socket_context;
    if (!c) return;
    pthread_mutex_lock(&srv->conn_mu);
    if (c->prev) c->prev->next = c->next;
    else srv->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    srv->nconns--;
    pthread_mutex_unlock(&srv->conn_mu);
    free(c);
    *socket_context = NULL;
}

static void *watchdog_main(void *arg)
{
    ckpt_http_server_t *srv = arg;
    char msg[256];
    int n = snprintf(msg, sizeof msg,
                     "{\"error\":\"request not received within %g s: send the headers and "
                     "body at once (the server's request deadline)\",\"code\":408}\n",
                     srv->request_timeout_s);
    char resp[512];
    int rn = snprintf(resp, sizeof resp,
                      "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                      "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                      n, msg);
    pthread_mutex_lock(&srv->conn_mu);
    while (srv->watchdog_run) {
        /* A tenth of a second: cuts land within 0.1 s of the deadline at negligible cost
         * (a scan of at most max_connections entries). */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&srv->conn_cv, &srv->conn_mu, &ts);
        double now = mono_now();
        unsigned cut = 0;
        for (srv_conn_t *c = srv->conns; c; c = c->next) {
            if (c->cut || c->deadline == 0 || now < c->deadline) continue;
            /* No handler runs and no response is queued (the deadline would be 0), so
             * nothing else writes this socket. Non-blocking: a client that reads nothing
             * gets no 408 but is cut all the same. */
            if (send(c->fd, resp, (size_t)rn, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) (void)0;
            shutdown(c->fd, SHUT_RDWR);
            c->cut = 1;
            cut++;
        }
        srv->requests_timed_out += cut;
        if (cut) {
            pthread_mutex_unlock(&srv->conn_mu);
            for (unsigned i = 0; i < cut; i++) srv_count_request(srv, 408);
            pthread_mutex_lock(&srv->conn_mu);
        }
    }
    pthread_mutex_unlock(&srv->conn_mu);
    return NULL;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_size, void **con_cls)
{
    (void)version;
    ckpt_http_server_t *srv = cls;
    req_t *rq = *con_cls;
    if (!rq) { /* first call: headers only */
        if (!(rq = calloc(1, sizeof *rq))) return MHD_NO;
        *con_cls = rq;
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (rq->too_big || rq->len + n > srv->max_body) {
            rq->too_big = 1;
            rq->len += n; /* counts dropped bytes only to bound the drain */
            return rq->len > srv->max_body * DRAIN_FACTOR ? MHD_NO : MHD_YES;
        }
        if (rq->len + n > rq->cap) {
            size_t cap = CKPT_MAX(rq->cap * 2, rq->len + n);
            char *b = realloc(rq->body, cap);
            if (!b) return MHD_NO;
            rq->body = b;
            rq->cap = cap;
        }
        memcpy(rq->body + rq->len, upload, n);
        rq->len += n;
        return MHD_YES;
    }
    /* Whole request here: its deadline stops while we answer (gather-metas waits). */
    conn_deadline(srv, conn, 0);
    /* healthz stays open so liveness probes need no secret. */
    if (srv->token && strcmp(url, "/v1/healthz") != 0) {
        const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                       MHD_HTTP_HEADER_AUTHORIZATION);
        if (!token_ok(srv->token, auth))
            return send_error(conn, srv, 401,
                              auth ? "wrong bearer token" : "missing 'Authorization: Bearer <token>'",
                              NULL);
    }
    if (rq->too_big) {
        char msg[96];
        snprintf(msg, sizeof msg, "request body exceeds %zu bytes", srv->max_body);
        return send_error(conn, srv, 413, msg, NULL);
    }
    return route(conn, srv, url, method, rq);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)toe;
    /* A kept-alive connection has a new deadline for its next request. */
    conn_deadline(cls, conn, 1);
    req_t *rq = *con_cls;
    if (rq) {
        free(rq->body);
        free(rq);
        *con_cls = NULL;
    }
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

int ckpt_http_start(const ckpt_http_options_t *opts, ckpt_http_server_t **out)
{
    ckpt_http_options_t def = CKPT_HTTP_OPTIONS_INIT;
    if (!opts) opts = &def;
    if (!out) return ckpt__error(CKPT_EINVAL, "ckpt_http_start: NULL out");
    if (ckpt__check_field_mask(opts->field_mask, 0, "ckpt_http_options_t") < 0)
        return CKPT_EINVAL;
    if (opts->port < 0 || opts->port > 65535)
        return ckpt__error(CKPT_EINVAL, "HTTP port %d is out of range", opts->port);
    const char *addr = opts->bind_addr ? opts->bind_addr : "127.0.0.1";
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    /* A thread per connection: gather-metas waits for a registration inside its handler,
     * which must not stall the other requests (connections are capped at 256). */
    unsigned flags = MHD_USE_AUTO | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_THREAD_PER_CONNECTION;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, addr, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)opts->port);
    } else if (inet_pton(AF_INET6, addr, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)opts->port);
        flags |= MHD_USE_IPv6;
    } else {
        return ckpt__error(CKPT_EINVAL, "HTTP bind address '%s' is not an IPv4 or IPv6 literal",
                           addr);
    }

    int rc = 0;
    ckpt_http_server_t *srv = ckpt__calloc(1, sizeof *srv);
    if (!srv) return ckpt__error(CKPT_ENOMEM, "out of memory");
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cv, NULL);
    pthread_cond_init(&srv->state_cv, NULL);
    pthread_mutex_init(&srv->conn_mu, NULL);
    pthread_cond_init(&srv->conn_cv, NULL);
    srv->max_body = opts->max_body ? opts->max_body : (1u << 20);
    if (!(opts->request_timeout_s >= 0) || opts->request_timeout_s > 86400) {
        rc = ckpt__error(CKPT_EINVAL, "HTTP request timeout %g s is out of range (0, 86400]",
                         opts->request_timeout_s);
        goto fail;
    }
    srv->request_timeout_s =
        opts->request_timeout_s > 0 ? opts->request_timeout_s : CKPT_HTTP_REQUEST_TIMEOUT_S;
    unsigned per_ip = opts->per_ip_limit ? opts->per_ip_limit : CKPT_HTTP_PER_IP_LIMIT;
    unsigned max_conns = opts->max_connections ? opts->max_connections
                                               : CKPT_HTTP_MAX_CONNECTIONS;
    srv->watchdog_run = 1;
    if (pthread_create(&srv->watchdog, NULL, watchdog_main, srv) != 0) {
        rc = ckpt__error(CKPT_EIO, "cannot start the HTTP request watchdog thread");
        goto fail;
    }
    srv->watchdog_started = 1;
    if (opts->token && opts->token[0] && !(srv->token = ckpt__strdup(opts->token))) {
        rc = ckpt__error(CKPT_ENOMEM, "out of memory");
        goto fail;
    }
    if (opts->trace_dir) {
        if (strlen(opts->trace_dir) > 4000 ||
            ckpt__strlcpy(srv->trace_dir, opts->trace_dir, sizeof srv->trace_dir) != 0) {
            rc = ckpt__error(CKPT_EINVAL, "trace directory path is too long");
            goto fail;
        }
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(srv->trace_dir, sizeof srv->trace_dir, "%s/ckpt-http-XXXXXX",
                 tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(srv->trace_dir)) {
            rc = ckpt__error(CKPT_EIO, "%s: cannot create the trace directory: %s",
                             srv->trace_dir, strerror(errno));
            goto fail;
        }
        srv->own_trace_dir = 1;
    }
    srv->mhd = MHD_start_daemon(flags, (uint16_t)opts->port, NULL, NULL, on_request, srv,
                                MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                                MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
                                MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv,
                                /* idle: bounds slow readers of a response */
                                MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
                                MHD_OPTION_CONNECTION_LIMIT, max_conns,
                                /* one address cannot take every slot alone */
                                MHD_OPTION_PER_IP_CONNECTION_LIMIT, per_ip,
                                /* a thread per connection: handlers need little stack,
                                 * so hundreds of threads stay cheap */
                                MHD_OPTION_THREAD_STACK_SIZE, (size_t)(1u << 20),
                                MHD_OPTION_END);
    if (!srv->mhd) {
        rc = ckpt__error(CKPT_EIO, "cannot listen on %s:%d (port in use or not permitted?)",
                         addr, opts->port);
        goto fail;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->mhd, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : opts->port;
    *out = srv;
    return 0;
fail:
    ckpt_http_stop(srv);
    return rc;
}

int ckpt_http_port(const ckpt_http_server_t *srv)
{
    return srv ? srv->port : -1;
}

void ckpt_http_stop(ckpt_http_server_t *srv)
{
    if (!srv) return;
    pthread_mutex_lock(&srv->mu);
    srv->stopping = 1;
    pthread_cond_broadcast(&srv->cv);
    pthread_cond_broadcast(&srv->state_cv); /* handlers waiting in gather-metas answer 503 */
    pthread_mutex_unlock(&srv->mu);
    /* Stops the threads first: no handler runs past this point. */
    if (srv->mhd) MHD_stop_daemon(srv->mhd);
    if (srv->watchdog_started) {
        pthread_mutex_lock(&srv->conn_mu);
        srv->watchdog_run = 0;
        pthread_cond_broadcast(&srv->conn_cv);
        pthread_mutex_unlock(&srv->conn_mu);
        pthread_join(srv->watchdog, NULL);
    }
    if (srv->own_trace_dir) nftw(srv->trace_dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    srv_free_state(srv);
    pthread_cond_destroy(&srv->cv);
    pthread_cond_destroy(&srv->state_cv);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->conn_cv);
    pthread_mutex_destroy(&srv->conn_mu);
    ckpt__free(srv->token);
    ckpt__free(srv);
}
