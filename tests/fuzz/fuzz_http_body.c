/* libFuzzer target: the request-body validators of the HTTP API (outside input), from
 * the ckpt_server library (built with coverage counters in the fuzz tree). The first byte
 * picks the endpoint. */
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
        } else if (job.path[0] == '\0') {
            __builtin_trap();
        }
    } else if (strnlen(field, sizeof field) == sizeof field) {
        __builtin_trap();
    }
    char name[200];
    size_t n = len < sizeof name - 1 ? len : sizeof name - 1;
    memcpy(name, body, n);
    name[n] = '\0';
    (void)ckpt_http_name_valid(name);
    return 0;
}
