/* Status codes, their texts, and the thread-local detail text of the last failure. */
#include <stdio.h>
#include <string.h>

#include "core/internal.h"

#define CKPT__ERROR_TEXT_MAX 1024

/* Thread-local so concurrent callers (pipeline threads, Python threads) never see each
 * other's details. */
static _Thread_local char last_error[CKPT__ERROR_TEXT_MAX];

const char *ckpt_strerror(int status)
{
    switch (status) {
#define CKPT__STATUS_MSG(name, value, msg)                                                   \
    case (value): return (msg);
        CKPT_STATUS_MAP(CKPT__STATUS_MSG)
#undef CKPT__STATUS_MSG
    default: return "unknown status";
    }
}

const char *ckpt_status_name(int status)
{
    switch (status) {
#define CKPT__STATUS_NAME(name, value, msg)                                                  \
    case (value): return "CKPT_" #name;
        CKPT_STATUS_MAP(CKPT__STATUS_NAME)
#undef CKPT__STATUS_NAME
    default: return "CKPT_UNKNOWN";
    }
}

const char *ckpt_last_error(void) { return last_error; }

const char *ckpt_version(void) { return "0.1.0"; }

int ckpt__error(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    ckpt_debug("error %s: %s", ckpt_status_name(status), last_error);
    return status;
}

int ckpt__error_prefix(int status, const char *fmt, ...)
{
    char prefix[CKPT__ERROR_TEXT_MAX];
    char old[CKPT__ERROR_TEXT_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, last_error, sizeof(old));
    /* Truncation is acceptable: the start of the text carries the context. */
    size_t plen = strnlen(prefix, sizeof(last_error) - 1);
    memcpy(last_error, prefix, plen);
    size_t olen = strnlen(old, sizeof(last_error) - 1 - plen);
    memcpy(last_error + plen, old, olen);
    last_error[plen + olen] = '\0';
    return status;
}

void ckpt__error_clear(void) { last_error[0] = '\0'; }
