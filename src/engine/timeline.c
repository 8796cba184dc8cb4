/* Update timeline and its Chrome trace export (see timeline.h). */
#include <stdio.h>
#include <string.h>

#include "engine/coll.h"
#include "engine/timeline.h"

static const char *kind_names[CKPT__EV_KINDS] = {"stage", "broadcast", "ready", "reload",
                                                  "agree", "reload in place"};

int ckpt__timeline_init(ckpt__timeline_t *tl, size_t cap)
{
    memset(tl, 0, sizeof(*tl));
    tl->events = ckpt__calloc(cap, sizeof(*tl->events));
    if (!tl->events) return ckpt__error(CKPT_ENOMEM, "timeline of %zu events", cap);
    tl->cap = cap;
    tl->origin = ckpt__now_s();
    return CKPT_OK;
}

void ckpt__timeline_free(ckpt__timeline_t *tl)
{
    ckpt__free(tl->events);
    memset(tl, 0, sizeof(*tl));
}

void ckpt__timeline_add(ckpt__timeline_t *tl, int bucket, int kind, double t0)
{
    if (tl->count == tl->cap) return;
    ckpt__event_t *ev = &tl->events[tl->count++];
    ev->bucket = bucket;
    ev->kind = kind;
    ev->t0 = t0 - tl->origin;
    ev->t1 = ckpt__now_s() - tl->origin;
}

void ckpt__timeline_span(ckpt__timeline_t *tl, int bucket, int kind, double t0, double t1)
{
    if (tl->count == tl->cap) return;
    ckpt__event_t *ev = &tl->events[tl->count++];
    ev->bucket = bucket;
    ev->kind = kind;
    ev->t0 = t0 - tl->origin;
    ev->t1 = t1 - tl->origin;
}

void ckpt__timeline_bytes(ckpt__timeline_t *tl, uint64_t bytes)
{
    if (tl->count > 0) tl->events[tl->count - 1].bytes = bytes;
}

int ckpt__timeline_write(ckpt_engine_t *e, ckpt__timeline_t *tl, const char *path,
                         const char *label, int timeout_ms)
{
    int rc = CKPT_OK;
    int n = (int)tl->count;
    int *counts = NULL, *displs = NULL;
    ckpt__event_t *all = NULL;
    MPI_Request req;
    if (e->rank == 0) {
        counts = ckpt__calloc((size_t)e->size, sizeof(int));
        displs = ckpt__calloc((size_t)e->size, sizeof(int));
    }
    MPI_Igather(&n, 1, MPI_INT, counts, 1, MPI_INT, 0, e->world, &req);
    rc = ckpt__mpi_wait(e, &req, timeout_ms, 500, "trace gather");
    if (rc < 0) goto out;
    int total = 0;
    if (e->rank == 0) {
        for (int r = 0; r < e->size; r++) {
            displs[r] = total * (int)sizeof(ckpt__event_t);
            total += counts[r];
            counts[r] *= (int)sizeof(ckpt__event_t);
        }
        all = ckpt__calloc((size_t)total + 1, sizeof(*all));
    }
    MPI_Igatherv(tl->events, n * (int)sizeof(ckpt__event_t), MPI_BYTE, all, counts, displs,
                 MPI_BYTE, 0, e->world, &req);
    rc = ckpt__mpi_wait(e, &req, timeout_ms, 500, "trace gather");
    if (rc < 0 || e->rank != 0 || path == NULL) goto out;

    FILE *f = fopen(path, "w");
    if (!f) {
        rc = ckpt__error(CKPT_EIO, "writing trace %s: %m", path);
        goto out;
    }
    fprintf(f, "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"update\":\"%s\"},\"traceEvents\":[",
            label);
    int first = 1;
    for (int r = 0; r < e->size; r++) {
        fprintf(f, "%s{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%d,\"args\":{\"name\":"
                   "\"rank %d\"}}",
                first ? "" : ",", r, r);
        first = 0;
        for (int k = 0; k < CKPT__EV_KINDS; k++)
            fprintf(f, ",{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":%d,"
                       "\"args\":{\"name\":\"%s\"}}",
                    r, k, kind_names[k]);
    }
    for (int r = 0, i = 0; r < e->size; r++) {
        int cnt = counts[r] / (int)sizeof(ckpt__event_t);
        for (int j = 0; j < cnt; j++, i++) {
            const ckpt__event_t *ev = &all[i];
            fprintf(f, ",{\"name\":\"%s b%d\",\"cat\":\"%s\",\"ph\":\"X\",\"pid\":%d,\"tid\":%d,"
                       "\"ts\":%.3f,\"dur\":%.3f,\"args\":{\"bucket\":%d,\"bytes\":%llu}}",
                    kind_names[ev->kind], ev->bucket, kind_names[ev->kind], r, ev->kind,
                    ev->t0 * 1e6, (ev->t1 - ev->t0) * 1e6, ev->bucket,
                    (unsigned long long)ev->bytes);
        }
    }
    fprintf(f, "]}\n");
    if (fclose(f) != 0) rc = ckpt__error(CKPT_EIO, "writing trace %s: %m", path);
out:
    ckpt__free(counts);
    ckpt__free(displs);
    ckpt__free(all);
    return rc;
}
