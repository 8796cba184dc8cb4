/* The window source (source.h): on one host the workers map every owner's pool regions
 * and read each window in place, so there is nothing to fill and nothing to move. */
#include "engine/source.h"

const ckpt__source_ops_t ckpt__source_window = {"window", 1, 0, 0, NULL};
