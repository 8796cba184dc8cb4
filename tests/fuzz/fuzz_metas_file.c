/* libFuzzer target for the metas file decoder: anything a remote deployment (or an HTTP
 * client) hands us must be rejected cleanly or decode into a structure whose every range
 * checks out, and re-encoding a decoded file must succeed and decode again. metas_file.c
 * is compiled in directly because fuzz targets link only libckpt (no UCX/MPI). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "format/metas_file.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ckpt__metas_t m;
    if (ckpt__metas_decode(data, size, &m) != CKPT_OK) return 0;
    char *json = NULL;
    size_t len = 0;
    if (ckpt__metas_encode(&m, &json, &len) != CKPT_OK) abort(); /* decode accepted it */
    ckpt__metas_t again;
    if (ckpt__metas_decode(json, len, &again) != CKPT_OK) abort();
    if (again.nranks != m.nranks || again.ntensors != m.ntensors || again.version != m.version)
        abort();
    ckpt__metas_free(&again);
    ckpt__free(json);
    ckpt__metas_free(&m);
    return 0;
}
