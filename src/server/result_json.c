/* The JSON form of an update's result (see result_json.h). */
#include "server/result_json.h"

void ckpt__update_result_json(cJSON *o, const ckpt_update_result_t *r)
{
    cJSON_AddNumberToObject(o, "version", (double)r->version);
    cJSON_AddNumberToObject(o, "ranks", r->nranks);
    cJSON_AddNumberToObject(o, "bytes", (double)r->bytes);
    cJSON_AddNumberToObject(o, "tensors", r->ntensors);
    cJSON_AddNumberToObject(o, "buckets", r->nbuckets);
    cJSON_AddNumberToObject(o, "bucket_size", (double)r->bucket_size);
    cJSON_AddNumberToObject(o, "buffers", r->nbuffers);
    cJSON_AddNumberToObject(o, "direct", r->direct);
    cJSON_AddNumberToObject(o, "p2p", r->p2p);
    cJSON_AddNumberToObject(o, "pull_s", r->pull_s);
    cJSON_AddNumberToObject(o, "pull_bytes", (double)r->pull_bytes);
    cJSON_AddNumberToObject(o, "need_bytes_max", (double)r->need_bytes_max);
    cJSON_AddNumberToObject(o, "need_bytes_total", (double)r->need_bytes_total);
    cJSON_AddNumberToObject(o, "unneeded", r->unneeded);
    cJSON_AddNumberToObject(o, "host_bytes_max", (double)r->host_bytes_max);
    cJSON_AddNumberToObject(o, "in_place_bytes", (double)r->in_place_bytes);
    /* per host (index: host group) and per worker (index: rank) */
    cJSON *hin = cJSON_AddArrayToObject(o, "host_bytes_in");
    cJSON *hout = cJSON_AddArrayToObject(o, "host_bytes_out");
    for (uint32_t h = 0; h < r->nhosts && h < CKPT_HOSTS_MAX; h++) {
        cJSON_AddItemToArray(hin, cJSON_CreateNumber((double)r->host_bytes_in[h]));
        cJSON_AddItemToArray(hout, cJSON_CreateNumber((double)r->host_bytes_out[h]));
    }
    cJSON *wb = cJSON_AddArrayToObject(o, "worker_bytes");
    for (uint32_t w = 0; w < r->nworkers && w < CKPT_WORKERS_MAX; w++)
        cJSON_AddItemToArray(wb, cJSON_CreateNumber((double)r->worker_bytes[w]));
    static const char *const devices[] = {"host", "cuda", "sim"};
    cJSON_AddStringToObject(o, "device", r->device >= 0 && r->device <= 2 ? devices[r->device] : "?");
    cJSON_AddNumberToObject(o, "stage_s", r->stage_s);
    cJSON_AddNumberToObject(o, "stage_bytes", (double)r->stage_bytes);
    cJSON_AddNumberToObject(o, "gather_s", r->gather_s);
    cJSON_AddNumberToObject(o, "plan_s", r->plan_s);
    cJSON_AddNumberToObject(o, "begin_s", r->begin_s);
    cJSON_AddNumberToObject(o, "pipeline_s", r->pipeline_s);
    cJSON_AddNumberToObject(o, "finish_s", r->finish_s);
    cJSON_AddNumberToObject(o, "total_s", r->total_s);
    /* "isolate": workers cut out of the update; the others completed it. */
    cJSON_AddNumberToObject(o, "nisolated", r->nisolated);
    cJSON *iso = cJSON_AddArrayToObject(o, "isolated");
    for (uint32_t i = 0; i < r->nisolated && i < CKPT_ISOLATED_MAX; i++) {
        cJSON *w = cJSON_CreateObject();
        cJSON_AddNumberToObject(w, "rank", r->isolated[i].rank);
        cJSON_AddNumberToObject(w, "worker", r->isolated[i].worker_pid);
        cJSON_AddStringToObject(w, "status", ckpt_status_name(r->isolated[i].status));
        cJSON_AddStringToObject(w, "reason", r->isolated[i].reason);
        cJSON_AddItemToArray(iso, w);
    }
}
