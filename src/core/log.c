/* Leveled logging with a rank prefix. The library prints only through here. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/internal.h"

static atomic_int log_level = -1; /* -1: not read from the environment yet */
static atomic_int log_rank = -1;

static int parse_level(const char *s)
{
    static const char *names[] = {"error", "warn", "info", "debug", "trace"};
    if (s == NULL || *s == '\0') return CKPT_LOG_WARN;
    for (int i = 0; i < (int)CKPT_ARRAY_SIZE(names); i++)
        if (strcasecmp(s, names[i]) == 0) return i;
    if (strcasecmp(s, "warning") == 0) return CKPT_LOG_WARN;
    char *end;
    long v = strtol(s, &end, 10);
    if (*end == '\0' && v >= 0 && v <= CKPT_LOG_TRACE) return (int)v;
    return CKPT_LOG_WARN;
}

int ckpt_log_get_level(void)
{
    int level = atomic_load_explicit(&log_level, memory_order_relaxed);
    if (level < 0) {
        level = parse_level(getenv("CKPT_LOG_LEVEL"));
        atomic_store(&log_level, level);
    }
    return level;
}

void ckpt_log_set_level(int level)
{
    if (level < CKPT_LOG_ERROR) level = CKPT_LOG_ERROR;
    if (level > CKPT_LOG_TRACE) level = CKPT_LOG_TRACE;
    atomic_store(&log_level, level);
}

void ckpt_log_set_rank(int rank) { atomic_store(&log_rank, rank); }

void ckpt__log(int level, const char *fmt, ...)
{
    static const char *tags[] = {"error", "warn", "info", "debug", "trace"};
    char line[2048];
    int rank = atomic_load_explicit(&log_rank, memory_order_relaxed);
    int n;
    if (rank >= 0)
        n = snprintf(line, sizeof(line), "[ckpt %s r%d] ", tags[level], rank);
    else
        n = snprintf(line, sizeof(line), "[ckpt %s] ", tags[level]);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    /* One fputs per line so lines of concurrent ranks and threads do not interleave. */
    size_t len = strlen(line);
    if (len + 1 < sizeof(line)) {
        line[len] = '\n';
        line[len + 1] = '\0';
    }
    fputs(line, stderr);
}
