/* Allocation wrapper (with a fail-the-Nth-allocation hook for tests), clocks, strings. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/internal.h"
#include "core/testing.h"

/* < 0: never fail. Otherwise the number of allocations that still succeed. */
static atomic_long alloc_budget = -1;

void ckpt_testing_fail_alloc_after(long n) { atomic_store(&alloc_budget, n); }

static int alloc_should_fail(void)
{
    long b = atomic_load(&alloc_budget);
    if (b < 0) return 0;
    if (b == 0) return 1;
    atomic_fetch_sub(&alloc_budget, 1);
    return 0;
}

void *ckpt__malloc(size_t size)
{
    if (alloc_should_fail()) return NULL;
    return malloc(size ? size : 1);
}

void *ckpt__calloc(size_t count, size_t size)
{
    if (alloc_should_fail()) return NULL;
    return calloc(count ? count : 1, size ? size : 1);
}

void *ckpt__realloc(void *ptr, size_t size)
{
    if (alloc_should_fail()) return NULL;
    return realloc(ptr, size ? size : 1);
}

char *ckpt__strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = ckpt__malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

void ckpt__free(void *ptr) { free(ptr); }

uint64_t ckpt__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double ckpt__now_s(void) { return (double)ckpt__now_ns() * 1e-9; }

int ckpt__strlcpy(char *dst, const char *src, size_t cap)
{
    size_t n = strlen(src);
    if (n >= cap) {
        memcpy(dst, src, cap - 1);
        dst[cap - 1] = '\0';
        return CKPT_ETOOBIG;
    }
    memcpy(dst, src, n + 1);
    return CKPT_OK;
}

int ckpt__check_field_mask(uint64_t mask, uint64_t known, const char *what)
{
    if ((mask & ~known) == 0) return CKPT_OK;
    return ckpt__error(CKPT_EINVAL, "%s: field_mask bits 0x%llx are not known to this libckpt "
                       "(built for a newer one?); set field_mask to 0", what,
                       (unsigned long long)(mask & ~known));
}
