/* libFuzzer target: the request-body validators of the HTTP API (outside input), from
 * the ckpt_server library (built with coverage counters in the fuzz tree). The first byte
 * picks the endpoint: odd update, 2 mod 4 gather-metas, else register. */
#include <stdint.h>
#include <string.h>

#include "ckpt/server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static ckpt_http_job_t job;
    char field[64];
    if (size == 0) return 0;
    memset(&job, 0, sizeof job);
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    if ((data[0] & 3) == 2) {
        double timeout_s = 600;
        int rc = ckpt_http_parse_gather_metas(body, len, &timeout_s, field, sizeof field);
        if (rc == 0 && !(timeout_s >= 0 && timeout_s <= 86400)) __builtin_trap();
        return 0;
    }
    int rc = data[0] & 1 ? ckpt_http_parse_update(body, len, &job, field, sizeof field)
                         : ckpt_http_parse_register(body, len, &job, field, sizeof field);
    /* Whatever the input, a success leaves valid, terminated values behind. */
    if (rc == 0) {
        if (strnlen(job.path, sizeof job.path) == sizeof job.path) __builtin_trap();
        if (data[0] & 1) {
            if (strcmp(job.mode, "broadcast") != 0 && strcmp(job.mode, "p2p") != 0)
                __builtin_trap();
            if (job.nranks < 0 || job.nranks > CKPT_HTTP_MAX_RANKS) __builtin_trap();
            if (job.timeout_ms < 0 || job.verify < -1 || job.verify > 1) __builtin_trap();
            if (job.ngroup_ranks < 0 || job.ngroup_ranks > CKPT_HTTP_MAX_RANKS) __builtin_trap();
            if (job.uds[0] && job.uds[0] != '/') __builtin_trap();
        } else if (job.path[0] == '\0' && job.nfiles < 2) {
            __builtin_trap();
        } else if (job.nfiles) {
            /* the list is nfiles NUL-terminated strings filling files_len exactly */
            size_t at = 0;
            int n = 0;
            while (at < job.files_len) at += strnlen(job.files + at, job.files_len - at) + 1, n++;
            if (at != job.files_len || n != job.nfiles) __builtin_trap();
        }
    } else if (job.files) {
        __builtin_trap(); /* a rejected body leaves nothing allocated */
    } else if (strnlen(field, sizeof field) == sizeof field) {
        __builtin_trap();
    }
    ckpt_http_job_release(&job);
    char name[200];
    size_t n = len < sizeof name - 1 ? len : sizeof name - 1;
    memcpy(name, body, n);
    name[n] = '\0';
    (void)ckpt_http_name_valid(name);
    return 0;
}
