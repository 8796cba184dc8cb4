/* The one JSON form of an update's result (ckpt_update_result_t): the HTTP API
 * (GET /v1/updates/N) and serve's --json lines both write it with this function, so both
 * show every field the engine reports, under the same names. Callers add their envelope
 * (ids, ok/status, the job's reason). */
#ifndef CKPT_SERVER_RESULT_JSON_H
#define CKPT_SERVER_RESULT_JSON_H

#include <cjson/cJSON.h>

#include "ckpt/engine.h"

/* Adds to o: version, ranks, bytes, tensors, buckets, bucket_size, buffers, direct, p2p,
 * pull_s, pull_bytes, need_bytes_max, need_bytes_total, unneeded, host_bytes_max, in_place_bytes, the
 * phase times gather_s .. total_s, nisolated and isolated [{rank, worker, status,
 * reason}]. */
void ckpt__update_result_json(cJSON *o, const ckpt_update_result_t *r);

#endif
