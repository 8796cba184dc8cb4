/* Hooks for tests only; reachable through the static library, not exported by libckpt.so. */
#ifndef CKPT_CORE_TESTING_H
#define CKPT_CORE_TESTING_H

/* After n more successful allocations through ckpt__malloc & co, every allocation fails;
 * n < 0 turns failures off again. */
void ckpt_testing_fail_alloc_after(long n);

#endif
