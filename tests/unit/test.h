/* A tiny test runner: each test file is one program; CHECK failures print the place and
 * the expression and make the program exit 1. Exit 77 means skipped. */
#ifndef CKPT_TEST_H
#define CKPT_TEST_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"

static int test__failures;

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: CHECK(%s) failed (last error: %s)\n", __FILE__,          \
                    __LINE__, #cond, ckpt_last_error());                                     \
            test__failures++;                                                                \
        }                                                                                    \
    } while (0)

#define CHECK_RC(expr, want)                                                                 \
    do {                                                                                     \
        int rc__ = (expr);                                                                   \
        if (rc__ != (want)) {                                                                \
            fprintf(stderr, "%s:%d: %s returned %s, want %s (last error: %s)\n", __FILE__,   \
                    __LINE__, #expr, ckpt_status_name(rc__), ckpt_status_name(want),         \
                    ckpt_last_error());                                                      \
            test__failures++;                                                                \
        }                                                                                    \
    } while (0)

#define CHECK_OK(expr) CHECK_RC(expr, CKPT_OK)

#define CHECK_STR(a, b)                                                                      \
    do {                                                                                     \
        const char *a__ = (a), *b__ = (b);                                                   \
        if (strcmp(a__, b__) != 0) {                                                         \
            fprintf(stderr, "%s:%d: \"%s\" != \"%s\"\n", __FILE__, __LINE__, a__, b__);      \
            test__failures++;                                                                \
        }                                                                                    \
    } while (0)

/* Error text must contain a fragment (errors must name their cause). */
#define CHECK_ERR_HAS(fragment)                                                              \
    do {                                                                                     \
        if (strstr(ckpt_last_error(), (fragment)) == NULL) {                                 \
            fprintf(stderr, "%s:%d: last error \"%s\" lacks \"%s\"\n", __FILE__, __LINE__,   \
                    ckpt_last_error(), (fragment));                                          \
            test__failures++;                                                                \
        }                                                                                    \
    } while (0)

#define RUN_TEST(fn)                                                                         \
    do {                                                                                     \
        int before__ = test__failures;                                                       \
        fn();                                                                                \
        fprintf(stderr, "%s %s\n", test__failures == before__ ? "ok  " : "FAIL", #fn);       \
    } while (0)

#define TEST_EXIT() return test__failures ? 1 : 0

#endif
