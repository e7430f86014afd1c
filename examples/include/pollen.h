/*
 * pollen.h: the host ABI that Pollen offers to workloads (import module "pollen").
 *
 * A workload is a WASI command module (wasm32-wasi) that exports `_start` and `memory`.
 * Everything below is optional: a module that imports none of it runs just the same.
 * See docs/abi.md for the full contract.
 *
 * Build:  python -m ziglang cc --target=wasm32-wasi -Os -s -I examples/include app.c -o app.wasm
 */
#ifndef POLLEN_H
#define POLLEN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define POLLEN_IMPORT(name) __attribute__((import_module("pollen"), import_name(name)))

/* Log levels for pollen_log, in rising severity. */
#define POLLEN_LOG_DEBUG 0
#define POLLEN_LOG_INFO 1
#define POLLEN_LOG_WARN 2
#define POLLEN_LOG_ERROR 3

/* Negative results of pollen_call. */
#define POLLEN_ERR_NOT_FOUND (-1)   /* no workload of that name is reachable */
#define POLLEN_ERR_UNAVAILABLE (-2) /* the workload is overloaded or not ready; retry later */
#define POLLEN_ERR_FAILED (-3)      /* the callee trapped, timed out or ran out of memory */
#define POLLEN_ERR_TOO_DEEP (-4)    /* too many nested calls (a call cycle?) */
#define POLLEN_ERR_INVALID (-5)     /* bad pointer, length or name in the arguments */

/*
 * Write one log line, tagged with this workload's name, to the node's logs.
 * `msg` need not be NUL-terminated; lines longer than 4096 bytes are cut.
 */
POLLEN_IMPORT("log")
void pollen_log(int32_t level, const char *msg, size_t len);

/*
 * Call another workload's HTTP handler by name and wait for its answer.
 *
 * `name` is "WORKLOAD" or "WORKLOAD/PATH?QUERY" (not NUL-terminated: give its length).
 * The callee sees a POST to /PATH?QUERY with `req` as the body and the header
 * X-Pollen-Caller set to the calling workload's name.
 *
 * Returns the full length of the callee's response body, of which the first
 * min(length, resp_cap) bytes were copied to `resp` (as snprintf does: a result larger
 * than resp_cap means the body was cut), or a negative POLLEN_ERR_* code. The callee's
 * HTTP status is then available from pollen_call_status().
 */
POLLEN_IMPORT("call")
int32_t pollen_call(const char *name, size_t name_len, const void *req, size_t req_len,
                    void *resp, size_t resp_cap);

/* The HTTP status of the last pollen_call that returned >= 0 in this instance, else 0. */
POLLEN_IMPORT("call_status")
int32_t pollen_call_status(void);

/* Convenience: log a NUL-terminated string. */
static inline void pollen_log_str(int32_t level, const char *msg) {
    pollen_log(level, msg, strlen(msg));
}

/* Convenience: call a workload named by a NUL-terminated string. */
static inline int32_t pollen_call_str(const char *name, const void *req, size_t req_len,
                                      void *resp, size_t resp_cap) {
    return pollen_call(name, strlen(name), req, req_len, resp, resp_cap);
}

#ifdef __cplusplus
}
#endif

#endif /* POLLEN_H */
