/* Internals of `ckpt-engine serve` shared by its two front ends on rank 0: the command
 * file (cmd_serve.c) and the HTTP control API (serve_http.c). */
#ifndef CKPT_TOOLS_SERVE_H
#define CKPT_TOOLS_SERVE_H

#include <signal.h>

#include "ckpt/engine.h"
#include "ckpt/server.h"

typedef struct {
    int json;                /* results as JSON lines instead of tables */
    ckpt_floors_t floors;
    int have_floors;
    ckpt_http_server_t *srv; /* NULL without --http: nothing to publish */
    const char *socket_dir;  /* the engine's --socket-dir (trigger socket paths); may be NULL */
    int timeout_ms;          /* the engine's --timeout-ms (bound of a trigger POST) */
    char token[512];         /* --token-file's token, also sent when fetching P2P metas */
} serve_state_t;

/* Set (to the signal number) by SIGINT/SIGTERM on rank 0: stop reading commands and
 * serving, shut every rank down. */
extern volatile sig_atomic_t serve_stop;

/* Result lines on stdout, as tables or (--json) JSON lines. */
void serve_print_update(const serve_state_t *st, const ckpt_update_result_t *r);
void serve_print_simple(const serve_state_t *st, const char *cmd, const char *name, int rc,
                        const char *reason, double seconds);

/* Version of registered checkpoint `name`; 0 when not registered. */
uint64_t serve_version_of(ckpt_engine_t *engine, const char *name);
/* Shows checkpoint `name` (just registered on every rank) as ready in the HTTP API. */
void serve_publish(serve_state_t *st, ckpt_engine_t *engine, const char *name);
/* Exports a registered checkpoint's P2P metas and publishes them on the HTTP API. */
void serve_publish_metas(serve_state_t *st, ckpt_engine_t *engine, const char *name);

/* Parses --http [ADDR:]PORT ("8080", "0.0.0.0:8080", "[::1]:8080"); ADDR defaults to
 * 127.0.0.1, PORT 0 picks a free one. Returns 0, or -1 after printing why. */
int serve_http_parse_listen(const char *text, char *addr, size_t addr_cap, int *port_out);

/* Before MPI starts: refuses (-1 after printing why, exit 2) to listen beyond loopback
 * without a token unless insecure_no_token, which only warns. */
int serve_http_check_exposure(const char *addr, int have_token, int insecure_no_token);

/* Rank 0: starts the HTTP server (token from token_file, NULL: none; limits: the request
 * deadline and per-address limit, 0 fields for the defaults) and prints
 * "http: listening on http://ADDR:PORT". Returns 0, or -1 after printing why. */
int serve_http_start(serve_state_t *st, const char *addr, int port, const char *token_file,
                     const ckpt_http_options_t *limits);
/* Rank 0: runs HTTP jobs against the engine until serve_stop, then stops the server.
 * Returns the number of failed jobs. */
int serve_http_run(serve_state_t *st, ckpt_engine_t *engine);

/* Publishing (serve_publish.c, docs/PUBLISH.md). Rank 0: prints the socket paths; registers
 * what trainers published (HTTP idle loop, at most every 200 ms); the await-published
 * command (NAME [timeout=MS], rest of the line in *save). */
void serve_publish_announce(const serve_state_t *st, ckpt_engine_t *engine);
void serve_publish_tick(serve_state_t *st, ckpt_engine_t *engine);
int serve_publish_await(serve_state_t *st, ckpt_engine_t *engine, const char *name,
                        char **save);

#endif
