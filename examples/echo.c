/*
 * echo: answers every HTTP request with a JSON description of it, as the module saw it
 * through WAGI: method, path, query, headers (from the HTTP_* variables), body (from stdin),
 * the whole environment and argv. Useful to see what a workload receives.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

/* Write `s` (length `n`) as a JSON string. Bytes >= 0x80 pass through, so UTF-8 stays UTF-8. */
static void json_string(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': fputs("\\\"", stdout); break;
        case '\\': fputs("\\\\", stdout); break;
        case '\n': fputs("\\n", stdout); break;
        case '\r': fputs("\\r", stdout); break;
        case '\t': fputs("\\t", stdout); break;
        default:
            if (c < 0x20 || c == 0x7f) {
                printf("\\u%04x", c);
            } else {
                putchar(c);
            }
        }
    }
    putchar('"');
}

static void json_cstr(const char *s) { json_string(s, s ? strlen(s) : 0); }

static const char *env_or_empty(const char *name) {
    const char *value = getenv(name);
    return value ? value : "";
}

/* Read all of stdin into a growing buffer. */
static char *read_body(size_t *len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (buf == NULL) return NULL;
    for (;;) {
        if (n == cap) {
            cap *= 2;
            char *bigger = realloc(buf, cap);
            if (bigger == NULL) { free(buf); return NULL; }
            buf = bigger;
        }
        size_t got = fread(buf + n, 1, cap - n, stdin);
        n += got;
        if (got == 0) break;
    }
    *len = n;
    return buf;
}

int main(int argc, char **argv) {
    size_t body_len = 0;
    char *body = read_body(&body_len);
    if (body == NULL) {
        printf("Status: 500\nContent-Type: text/plain\n\nout of memory\n");
        return 0;
    }

    printf("Content-Type: application/json\n\n{");
    fputs("\"method\":", stdout); json_cstr(env_or_empty("REQUEST_METHOD"));
    fputs(",\"path\":", stdout); json_cstr(env_or_empty("PATH_INFO"));
    fputs(",\"query\":", stdout); json_cstr(env_or_empty("QUERY_STRING"));

    /* Headers: HTTP_FOO_BAR=v becomes "foo-bar": "v". */
    fputs(",\"headers\":{", stdout);
    int first = 1;
    for (char **e = environ; *e != NULL; e++) {
        if (strncmp(*e, "HTTP_", 5) != 0) continue;
        const char *eq = strchr(*e, '=');
        if (eq == NULL) continue;
        if (!first) putchar(',');
        first = 0;
        putchar('"');
        for (const char *p = *e + 5; p < eq; p++) {
            char c = *p == '_' ? '-' : *p;
            putchar(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
        }
        putchar('"');
        putchar(':');
        json_cstr(eq + 1);
    }
    putchar('}');

    fputs(",\"body\":", stdout); json_string(body, body_len);
    printf(",\"bodyLength\":%zu", body_len);

    fputs(",\"env\":{", stdout);
    first = 1;
    for (char **e = environ; *e != NULL; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL) continue;
        if (!first) putchar(',');
        first = 0;
        json_string(*e, (size_t)(eq - *e));
        putchar(':');
        json_cstr(eq + 1);
    }
    putchar('}');

    fputs(",\"args\":[", stdout);
    for (int i = 0; i < argc; i++) {
        if (i) putchar(',');
        json_cstr(argv[i]);
    }
    fputs("]}\n", stdout);
    free(body);
    return 0;
}
