/*
 * caller: a small JSON API that calls another workload through pollen_call.
 *
 *   GET  /?to=echo            calls workload "echo" with an empty body
 *   POST /?to=echo/some/path  calls "echo/some/path" with this request's body
 *
 * Answers {"to": NAME, "result": N, "status": S, "response": BODY} where `result` is what
 * pollen_call returned (the response length, or a negative POLLEN_ERR_* code).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pollen.h"

#define MAX_RESPONSE (64 * 1024)
#define MAX_BODY (64 * 1024)

static void json_string(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            putchar('\\');
            putchar(c);
        } else if (c == '\n') {
            fputs("\\n", stdout);
        } else if (c < 0x20 || c == 0x7f) {
            printf("\\u%04x", c);
        } else {
            putchar(c);
        }
    }
    putchar('"');
}

/* The value of `key` in a query string, copied into `out` (no percent-decoding needed here). */
static int query_param(const char *query, const char *key, char *out, size_t cap) {
    size_t key_len = strlen(key);
    const char *p = query;
    while (p && *p) {
        const char *end = strchr(p, '&');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len > key_len && strncmp(p, key, key_len) == 0 && p[key_len] == '=') {
            size_t value_len = len - key_len - 1;
            if (value_len >= cap) value_len = cap - 1;
            memcpy(out, p + key_len + 1, value_len);
            out[value_len] = '\0';
            return 1;
        }
        p = end ? end + 1 : NULL;
    }
    return 0;
}

int main(void) {
    static char body[MAX_BODY];
    static char response[MAX_RESPONSE];
    char to[256] = "echo";

    const char *query = getenv("QUERY_STRING");
    query_param(query ? query : "", "to", to, sizeof to);

    size_t body_len = fread(body, 1, sizeof body, stdin);

    pollen_log_str(POLLEN_LOG_INFO, "caller: calling another workload");
    int32_t result = pollen_call(to, strlen(to), body, body_len, response, sizeof response);
    int32_t status = result >= 0 ? pollen_call_status() : 0;

    if (result < 0) {
        pollen_log_str(POLLEN_LOG_WARN, "caller: the call failed");
        printf("Status: 502 Bad Gateway\n");
    }
    printf("Content-Type: application/json\n\n");
    fputs("{\"to\":", stdout);
    json_string(to, strlen(to));
    printf(",\"result\":%d,\"status\":%d,\"response\":", (int)result, (int)status);
    size_t shown = result > 0 ? (size_t)result : 0;
    if (shown > sizeof response) shown = sizeof response;
    json_string(response, shown);
    fputs("}\n", stdout);
    return 0;
}
