/* ckpt-worker: the reference inference worker. It holds a model (named tensors), takes
 * weight updates from its engine rank through the receiver API, and can write what it holds
 * (checksums, a safetensors dump) so tests and the demo can compare it with the checkpoint.
 * Uses only the public headers, like any inference engine would. */
#include <getopt.h>
#include <signal.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/receiver.h"
#include "model.h"

typedef struct {
    const char *socket, *layout, *checksum_out, *dump;
    int tp_rank, tp_size, verify, timeout_ms, post_hook_ms, die_in_post_hook;
    int engine_wait_ms; /* connect / reconnect: < 0 = until an engine comes */
    long updates, fail_on, stall_on, die_on;
    int dump_now; /* with --updates K, the dump is written after the last update only */
    int declare_need;     /* tell the engine what this worker holds (NEED) */
    int ep_rank, ep_size; /* expert parallel: hold block ep_rank of ep_size of the experts */
    const char *need_glob[8]; /* hold (and need) only the layout's tensors matching one */
    int nneed_glob;
} opts_t;

/* Same format and level as the library's logger ([ckpt <level>] ...), from CKPT_LOG_LEVEL. */
static void wlog(int level, const char *fmt, ...)
{
    static const char *tags[] = {"error", "warn", "info", "debug", "trace"};
    if (level > ckpt_log_get_level()) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[ckpt-worker %s] ", tags[level]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void usage(FILE *out)
{
    fprintf(out,
        "usage: ckpt-worker --socket PATH [options]\n\n"
        "Reference inference worker: connects to its engine rank's socket, applies every\n"
        "weight update to its in-memory model and reports whether each one completed.\n\n"
        "options:\n"
        "  --socket PATH            the engine rank's Unix socket (required)\n"
        "  --layout FILE_OR_DIR     start from this safetensors checkpoint's tensor names,\n"
        "                           dtypes and shapes (zeros); unknown names fail a bucket.\n"
        "                           Without it the first update defines the model.\n"
        "  --tp-rank R --tp-size N  tensor parallel: tensors with ndim >= 2 whose dim 0 is a\n"
        "                           multiple of N keep rows [R*d0/N, (R+1)*d0/N); others whole\n"
        "  --declare-need           tell the engine which tensors (and TP rows) this worker\n"
        "                           holds, after each connect: it then sends only those,\n"
        "                           and an update of a tensor no worker needs fails unless\n"
        "                           asked with unneeded=ignore (needs --layout)\n"
        "  --ep-rank R --ep-size N  expert parallel: of the layout's experts (names with\n"
        "                           '.experts.X.'), hold only block R of N contiguous ones;\n"
        "                           every other tensor whole; implies --declare-need\n"
        "  --need-glob PATTERN      hold only the layout's tensors whose names match the\n"
        "                           shell pattern (e.g. '*experts.[0-3].*' for one EP rank);\n"
        "                           repeat it (up to 8) for a union; implies --declare-need\n"
        "  --verify                 verify every tensor's XXH3-64 checksum (also on when the\n"
        "                           engine asks for it)\n"
        "  --checksum-out FILE      after each completed update: JSON of name -> XXH3-64\n"
        "                           (hex) of the bytes this worker holds\n"
        "  --dump DIR               after each completed update (with --updates K: after the\n"
        "                           last one): DIR/model.safetensors\n"
        "  --timeout-ms N           per-message wait inside an update (default 30000): an\n"
        "                           engine silent that long mid-update loses the update\n"
        "  --engine-wait-ms N       how long to wait for an engine to connect to, at start\n"
        "                           and whenever it goes away (-1, the default: forever,\n"
        "                           retrying with back-off and logging a line a minute);\n"
        "                           the model keeps its last complete weights meanwhile\n"
        "  --updates K              exit after K updates (0 = never, the default); exit\n"
        "                           status 0 when every one completed, else 1\n"
        "  --post-hook-sleep-ms N   the post-hook run on FINISH sleeps N ms (default 10)\n"
        "  --die-in-post-hook       test knob: the post-hook kills this process (SIGKILL)\n"
        "  --fail-on-bucket B       test knob: answer bucket B with \"injected failure\"\n"
        "  --stall-on-bucket B      test knob: never answer bucket B\n"
        "  --die-on-bucket B        test knob: kill this process (SIGKILL) when bucket B\n"
        "                           arrives, before answering it\n"
        "  -h, --help               this text\n\n"
        "stdout gets one line per update:\n"
        "  update <id> of '<name>' version <v>: complete | aborted (<reason>)\n");
}

static int parse(int argc, char **argv, opts_t *o)
{
    static const struct option longs[] = {
        {"socket", 1, 0, 's'}, {"layout", 1, 0, 'l'}, {"tp-rank", 1, 0, 'r'},
        {"tp-size", 1, 0, 'n'}, {"verify", 0, 0, 'v'}, {"checksum-out", 1, 0, 'c'},
        {"dump", 1, 0, 'd'}, {"timeout-ms", 1, 0, 't'}, {"updates", 1, 0, 'u'},
        {"post-hook-sleep-ms", 1, 0, 'p'}, {"fail-on-bucket", 1, 0, 'F'},
        {"stall-on-bucket", 1, 0, 'S'}, {"die-in-post-hook", 0, 0, 'K'},
        {"die-on-bucket", 1, 0, 'X'}, {"engine-wait-ms", 1, 0, 'E'}, {"help", 0, 0, 'h'},
        {"declare-need", 0, 0, 'D'}, {"need-glob", 1, 0, 'G'},
        {"ep-rank", 1, 0, 'R'}, {"ep-size", 1, 0, 'N'},
        {0, 0, 0, 0}};
    int c;
    memset(o, 0, sizeof(*o));
    o->tp_size = 1;
    o->ep_size = 1;
    o->timeout_ms = 30000;
    o->engine_wait_ms = -1; /* an engine restart, however long, must not end the worker */
    o->post_hook_ms = 10;
    o->fail_on = o->stall_on = o->die_on = -1;
    while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
        switch (c) {
        case 's': o->socket = optarg; break;
        case 'l': o->layout = optarg; break;
        case 'r': o->tp_rank = atoi(optarg); break;
        case 'n': o->tp_size = atoi(optarg); break;
        case 'v': o->verify = 1; break;
        case 'c': o->checksum_out = optarg; break;
        case 'd': o->dump = optarg; break;
        case 't': o->timeout_ms = atoi(optarg); break;
        case 'u': o->updates = atol(optarg); break;
        case 'p': o->post_hook_ms = atoi(optarg); break;
        case 'F': o->fail_on = atol(optarg); break;
        case 'S': o->stall_on = atol(optarg); break;
        case 'X': o->die_on = atol(optarg); break;
        case 'K': o->die_in_post_hook = 1; break;
        case 'E': o->engine_wait_ms = atoi(optarg); break;
        case 'D': o->declare_need = 1; break;
        case 'R': o->ep_rank = atoi(optarg), o->declare_need = 1; break;
        case 'N': o->ep_size = atoi(optarg), o->declare_need = 1; break;
        case 'G':
            if (o->nneed_glob == 8) {
                fprintf(stderr, "ckpt-worker: at most 8 --need-glob patterns\n");
                return 2;
            }
            o->need_glob[o->nneed_glob++] = optarg;
            o->declare_need = 1;
            break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return 2;
        }
    }
    if (o->socket == NULL || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (o->declare_need && o->layout == NULL) {
        fprintf(stderr, "ckpt-worker: --declare-need and --need-glob need --layout (the "
                        "tensors to declare)\n");
        return 2;
    }
    if (o->ep_size < 1 || o->ep_rank < 0 || o->ep_rank >= o->ep_size) {
        fprintf(stderr, "ckpt-worker: --ep-rank %d outside 0..%d\n", o->ep_rank, o->ep_size - 1);
        return 2;
    }
    if (o->tp_size < 1 || o->tp_rank < 0 || o->tp_rank >= o->tp_size) {
        fprintf(stderr, "ckpt-worker: --tp-rank %d outside 0..%d\n", o->tp_rank, o->tp_size - 1);
        return 2;
    }
    return 0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* One line with the worker's state: what an inference engine checks before serving. */
static void print_state(ckpt_receiver_t *r)
{
    int st = 0;
    uint64_t v = 0, id = 0;
    ckpt_receiver_state(r, &st, &v, &id);
    if (st == CKPT_RECV_STATE_CONSISTENT)
        printf("state: consistent at version %" PRIu64 " (update %" PRIu64 ")\n", v, id);
    else if (st == CKPT_RECV_STATE_INCOMPLETE)
        printf("state: incomplete since version %" PRIu64 " (update %" PRIu64 ")\n", v, id);
    else
        printf("state: %s\n", st == CKPT_RECV_STATE_UPDATING ? "updating" : "none");
}

/* Runs one update after BEGIN. Returns 1 completed, 0 aborted / failed, -1 connection lost. */
static int run_update(ckpt_receiver_t *r, const ckpt_update_info_t *info, wk_model_t *m,
                      const opts_t *o)
{
    char why[1024];
    for (;;) {
        int ev;
        uint32_t b;
        const ckpt_tensor_view_t *v;
        size_t n;
        int rc = ckpt_receiver_next(r, o->timeout_ms, &ev, &b, &v, &n);
        if (rc == CKPT_EPROTO) continue; /* bad bucket: already answered, engine aborts */
        if (rc) {
            printf("update %" PRIu64 " of '%s' version %" PRIu64 ": aborted (%s)\n",
                   info->update_id, info->name, info->version, ckpt_last_error());
            return -1;
        }
        if (ev == CKPT_RECV_BUCKET) {
            if ((long)b == o->stall_on) {
                wlog(1, "stalling on bucket %u (--stall-on-bucket)", b);
                for (;;) pause();
            }
            if ((long)b == o->die_on) {
                wlog(1, "dying on bucket %u (--die-on-bucket)", b);
                fflush(stdout);
                raise(SIGKILL);
            }
            if ((long)b == o->fail_on) rc = ckpt_receiver_fail(r, "injected failure");
            else {
                int st = wk_model_apply(m, v, n, o->verify || info->verify, why, sizeof(why));
                rc = st ? ckpt_receiver_fail_status(r, st, why) : ckpt_receiver_ack(r);
                if (st) wlog(0, "bucket %u: %s", b, why);
            }
            if (rc) return -1;
        } else if (ev == CKPT_RECV_FINISH) {
            sleep_ms(o->post_hook_ms); /* stands in for re-processing the weights */
            if (o->die_in_post_hook) {
                wlog(1, "dying in the post-hook (--die-in-post-hook)");
                fflush(stdout);
                raise(SIGKILL);
            }
            printf("post-hook of update %" PRIu64 " done (%d ms)\n", info->update_id,
                   o->post_hook_ms);
            /* Complete only at COMMIT: an ABORT here means another worker failed. */
            if (ckpt_receiver_finish_reply(r, 1, NULL) != 0) {
                printf("update %" PRIu64 " of '%s' version %" PRIu64 ": incomplete (%s)\n",
                       info->update_id, info->name, info->version, ckpt_receiver_reason(r));
                print_state(r);
                /* ABORT keeps the connection; a lost engine means reconnecting. */
                return strncmp(ckpt_receiver_reason(r), "aborted", 7) == 0 ? 0 : -1;
            }
            printf("update %" PRIu64 " of '%s' version %" PRIu64 ": complete\n",
                   info->update_id, info->name, info->version);
            int wrc = 0;
            if (o->checksum_out) wrc |= wk_model_write_checksums(m, o->checksum_out, info);
            if (o->dump && o->dump_now) wrc |= wk_model_dump(m, o->dump, info);
            print_state(r); /* after the dump: a reader of this line finds it written */
            return wrc ? 0 : 1;
        } else {
            printf("update %" PRIu64 " of '%s' version %" PRIu64 ": aborted (%s)\n",
                   info->update_id, info->name, info->version, ckpt_receiver_reason(r));
            print_state(r);
            return 0;
        }
        fflush(stdout);
    }
}

/* Tells the engine what this worker holds (--declare-need). */
static int declare_need(ckpt_receiver_t *r, const wk_model_t *m)
{
    ckpt_need_decl_t *d = NULL;
    if (wk_model_need(m, &d) != CKPT_OK) return -1;
    int rc = ckpt_receiver_declare_need(r, d, m->n);
    free(d);
    if (rc == 0) printf("declared the need of %zu tensors\n", m->n);
    return rc;
}

/* Hands the receiver the model's full (un-sliced) tensors for the manifest check. */
static int set_model(ckpt_receiver_t *r, const wk_model_t *m)
{
    ckpt_tensor_meta_t *metas = calloc(m->n + 1, sizeof(*metas));
    if (metas == NULL) return -1;
    for (size_t i = 0; i < m->n; i++) metas[i] = m->t[i].full;
    int rc = ckpt_receiver_set_model(r, metas, m->n);
    free(metas);
    return rc;
}

int main(int argc, char **argv)
{
    opts_t o;
    wk_model_t model;
    ckpt_receiver_t *r = NULL;
    long done = 0, ok = 0;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (o.tp_size > 1) ckpt_log_set_rank(o.tp_rank);
    wk_model_init(&model, o.tp_rank, o.tp_size);
    model.only = o.need_glob;
    model.nonly = o.nneed_glob;
    model.ep_rank = o.ep_rank;
    model.ep_size = o.ep_size;
    if (o.layout && wk_model_load_layout(&model, o.layout) != 0) return 1;
    if (o.layout) wlog(2, "layout %s: %zu tensors", o.layout, model.n);
    int model_known = o.layout != NULL;
    while (o.updates == 0 || done < o.updates) {
        ckpt_update_info_t info;
        if (r == NULL) {
            rc = ckpt_receiver_connect(o.socket, o.engine_wait_ms, &r);
            if (rc) {
                wlog(0, "%s", ckpt_last_error());
                break;
            }
            wlog(2, "connected to %s", o.socket);
            /* With a layout the model is known: updates that do not fit it (missing,
             * unknown or reshaped tensors) are refused before any byte lands. */
            if (model_known && set_model(r, &model) != 0) {
                wlog(0, "%s", ckpt_last_error());
                break;
            }
            if (o.declare_need && declare_need(r, &model) != 0) {
                wlog(0, "declaring the need: %s", ckpt_last_error());
                break;
            }
        }
        rc = ckpt_receiver_wait_update(r, -1, &info);
        if (rc == CKPT_EBUSY || rc == CKPT_EPERM) { /* refused: retrying cannot help */
            wlog(0, "%s", ckpt_last_error());
            break;
        }
        if (rc == CKPT_EINVAL) { /* the manifest did not fit the model: refused, kept */
            printf("update refused: %s\n", ckpt_last_error());
            done++;
            continue;
        }
        if (rc) { /* engine gone: reconnect (it may be restarting) */
            wlog(1, "%s; reconnecting", ckpt_last_error());
            ckpt_receiver_close(r);
            r = NULL;
            continue;
        }
        o.dump_now = o.updates == 0 || done + 1 == o.updates;
        int res = run_update(r, &info, &model, &o);
        done++;
        ok += res == 1;
        /* Without a layout, the first complete, non-partial update defines the model:
         * later ones must cover it, or they would leave it half old, half new. */
        if (res == 1 && !model_known && !info.partial) {
            if (set_model(r, &model) != 0) {
                wlog(0, "%s", ckpt_last_error());
                break;
            }
            model_known = 1;
            wlog(2, "model: %zu tensors (from update %" PRIu64 ")", model.n, info.update_id);
        }
        if (res < 0) {
            ckpt_receiver_close(r);
            r = NULL;
        }
    }
    ckpt_receiver_close(r);
    wk_model_free(&model);
    return o.updates > 0 && done == o.updates && ok == done ? 0 : 1;
}
