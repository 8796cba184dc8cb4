/* Who the other ranks are (pid and host), so that a rank that does not answer is named
 * with what can be known about it, not left as "a rank died or stalled". MPI cannot say
 * which rank is missing from a collective; the agreement (coll.c) can, and a rank on the
 * same host can also read from /proc whether that process exited or is stopped. */
#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "engine/peers.h"

int ckpt__peers_init(ckpt_engine_t *e)
{
    ckpt__peer_t me;
    memset(&me, 0, sizeof(me));
    me.pid = (int32_t)getpid();
    if (gethostname(me.host, sizeof(me.host) - 1) != 0) snprintf(me.host, sizeof(me.host), "?");
    e->peers = ckpt__calloc((size_t)e->size, sizeof(*e->peers));
    if (!e->peers) return ckpt__error(CKPT_ENOMEM, "engine: rank identities");
    MPI_Allgather(&me, (int)sizeof(me), MPI_BYTE, e->peers, (int)sizeof(me), MPI_BYTE, e->world);
    return CKPT_OK;
}

/* What /proc says about rank r's process, when it runs on this host; NULL otherwise. */
static const char *local_state(const ckpt_engine_t *e, int r, char *buf, size_t cap)
{
    if (!e->peers || strcmp(e->peers[r].host, e->peers[e->rank].host) != 0) return NULL;
    char path[64], stat[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)e->peers[r].pid);
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(buf, cap, "has exited");
        return buf;
    }
    size_t n = fread(stat, 1, sizeof(stat) - 1, f);
    fclose(f);
    stat[n] = '\0';
    /* "pid (comm) S ...": the state follows the last ')' (comm may hold spaces, parens). */
    const char *p = strrchr(stat, ')');
    char s = p && p[1] == ' ' ? p[2] : '?';
    if (s == 'T' || s == 't') snprintf(buf, cap, "is stopped (SIGSTOP or a debugger)");
    else if (s == 'Z' || s == 'X') snprintf(buf, cap, "has exited");
    else snprintf(buf, cap, "is running (state %c), so it is stuck or waiting elsewhere", s);
    return buf;
}

size_t ckpt__peer_describe(const ckpt_engine_t *e, int r, char *out, size_t cap)
{
    char st[96];
    const char *state = local_state(e, r, st, sizeof(st));
    int n;
    if (!e->peers)
        n = snprintf(out, cap, "rank %d", r);
    else if (state)
        n = snprintf(out, cap, "rank %d (pid %d on this host, %s) %s", r, (int)e->peers[r].pid,
                     e->peers[r].host, state);
    else
        n = snprintf(out, cap, "rank %d (pid %d on host %s)", r, (int)e->peers[r].pid,
                     e->peers[r].host);
    return n < 0 ? 0 : CKPT_MIN((size_t)n, cap ? cap - 1 : 0);
}

size_t ckpt__peers_local_suspects(const ckpt_engine_t *e, char *out, size_t cap)
{
    size_t len = 0;
    if (cap) out[0] = '\0';
    for (int r = 0; e->peers && r < e->size && len + 1 < cap; r++) {
        char st[96];
        if (r == e->rank || !local_state(e, r, st, sizeof(st)) || strncmp(st, "is running", 10) == 0)
            continue;
        int n = snprintf(out + len, cap - len, "%srank %d (pid %d) %s", len ? "; " : "", r,
                         (int)e->peers[r].pid, st);
        if (n < 0) break;
        len = CKPT_MIN(len + (size_t)n, cap - 1);
    }
    return len;
}
