/* ckpt-engine serve: checkpoints trainers publish (docs/PUBLISH.md). Every rank listens on
 * DIR/publish-<rank>.sock; registering what arrived is collective, so rank 0 asks for it:
 * when the HTTP loop is idle (serve_publish_tick), or for the await-published command. */
#include <cjson/cJSON.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "serve.h"

#define MAX_EVENTS 16
/* How often rank 0 asks the ranks for published parts while idle: one small broadcast and
 * one integer allreduce each time, invisible next to the HTTP loop's own 200 ms wait. */
#define TICK_S 0.2

void serve_publish_announce(const serve_state_t *st, ckpt_engine_t *engine)
{
    if (!st->socket_dir) return;
    int n = ckpt_engine_size(engine);
    printf("sockets: workers connect to %s/rank-<r>.sock, trainers publish to "
           "%s/publish-<r>.sock (r = 0..%d)\n", st->socket_dir, st->socket_dir, n - 1);
    fflush(stdout);
}

static void print_event(const serve_state_t *st, const char *cmd, const ckpt_publish_event_t *ev,
                        double seconds)
{
    if (st->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "command", cmd);
        cJSON_AddStringToObject(o, "name", ev->name);
        cJSON_AddBoolToObject(o, "ok", ev->status == 0);
        cJSON_AddStringToObject(o, "status", ckpt_status_name(ev->status));
        cJSON_AddStringToObject(o, "reason", ev->reason);
        cJSON_AddNumberToObject(o, "version", (double)ev->version);
        cJSON_AddNumberToObject(o, "step", (double)ev->step);
        cJSON_AddNumberToObject(o, "parts", ev->nparts);
        cJSON_AddNumberToObject(o, "tensors", ev->ntensors);
        cJSON_AddNumberToObject(o, "bytes", (double)ev->bytes);
        cJSON_AddBoolToObject(o, "replaced", ev->replaced);
        cJSON_AddNumberToObject(o, "seconds", seconds);
        char *text = cJSON_PrintUnformatted(o);
        if (text) printf("%s\n", text);
        cJSON_free(text);
        cJSON_Delete(o);
    } else if (ev->status == 0) {
        char size[32];
        printf("%s '%s': registered as version %llu (step %llu, %u part%s, %u tensors, %s)%s\n",
               cmd, ev->name, (unsigned long long)ev->version, (unsigned long long)ev->step,
               ev->nparts, ev->nparts == 1 ? "" : "s", ev->ntensors,
               ckpt_format_size(ev->bytes, size, sizeof(size)),
               ev->replaced ? ", replacing the previous version" : "");
    } else {
        printf("%s '%s' FAILED: %s\n", cmd, ev->name, ev->reason);
    }
}

/* Prints the events and shows registered checkpoints on the HTTP API (and exports them
 * for P2P), as a registration from the command file does. `await` is printed under the
 * await-published command instead; returns its index or -1. */
static int handle_events(serve_state_t *st, ckpt_engine_t *engine,
                         const ckpt_publish_event_t *ev, size_t n, const char *await)
{
    int found = -1;
    for (size_t i = 0; i < n && i < MAX_EVENTS; i++) {
        if (await && strcmp(ev[i].name, await) == 0) found = (int)i;
        else print_event(st, "publish", &ev[i], 0);
        if (ev[i].status == 0) serve_publish(st, engine, ev[i].name);
    }
    return found;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void serve_publish_tick(serve_state_t *st, ckpt_engine_t *engine)
{
    static double last;
    double t = now_s();
    if (!st->socket_dir || t - last < TICK_S) return;
    last = t;
    ckpt_publish_event_t ev[MAX_EVENTS];
    size_t n = 0;
    /* The bound on a part waiting for the others: the engine's --timeout-ms. */
    if (ckpt_engine_publish_poll(engine, st->timeout_ms, NULL, ev, MAX_EVENTS, &n, NULL) == 0)
        handle_events(st, engine, ev, n, NULL);
}

int serve_publish_await(serve_state_t *st, ckpt_engine_t *engine, const char *name,
                        char **save)
{
    int timeout_ms = st->timeout_ms > 0 ? st->timeout_ms : 30000;
    char *opt;
    while ((opt = strtok_r(NULL, " \t\r\n", save)) != NULL) {
        if (strncmp(opt, "timeout=", 8) == 0 && atoi(opt + 8) > 0) {
            timeout_ms = atoi(opt + 8);
        } else {
            printf("await-published '%s': unknown option '%s' (timeout=MS)\n", name, opt);
            return -1;
        }
    }
    ckpt_publish_event_t ev[MAX_EVENTS], result;
    memset(&result, 0, sizeof(result));
    snprintf(result.name, sizeof(result.name), "%s", name);
    double t0 = now_s(), deadline = t0 + timeout_ms / 1000.0;
    if (!st->socket_dir) {
        result.status = CKPT_EINVAL;
        snprintf(result.reason, sizeof(result.reason), "nothing can be published: start serve "
                 "with --socket-dir DIR (trainers publish to DIR/publish-<rank>.sock)");
        print_event(st, "await-published", &result, 0);
        return -1;
    }
    for (;;) {
        int last = serve_stop || now_s() >= deadline;
        size_t n = 0;
        /* Parts wait for the others at most as long as this command; at the end the
         * name's parts still incomplete are dropped (and named) now. */
        int rc = ckpt_engine_publish_poll(engine, timeout_ms, last ? name : NULL, ev,
                                          MAX_EVENTS, &n, NULL);
        if (rc < 0) {
            result.status = rc;
            snprintf(result.reason, sizeof(result.reason), "%s", ckpt_last_error());
            break;
        }
        int i = handle_events(st, engine, ev, n, name);
        if (i >= 0) {
            result = ev[i];
            break;
        }
        if (last) {
            result.status = serve_stop ? CKPT_ECANCELED : CKPT_ETIMEDOUT;
            snprintf(result.reason, sizeof(result.reason), "%s: no part of '%s' was published "
                     "within %d ms (trainers publish to %s/publish-<rank>.sock)",
                     serve_stop ? "stopping" : "timed out", name, timeout_ms, st->socket_dir);
            break;
        }
        /* 20 ms between polls: a trainer waits little, the ranks barely wake. */
        struct timespec nap = {0, 20 * 1000 * 1000};
        nanosleep(&nap, NULL);
    }
    print_event(st, "await-published", &result, now_s() - t0);
    return result.status == 0 ? 0 : -1;
}
