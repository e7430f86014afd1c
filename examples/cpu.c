/*
 * cpu: a CPU-bound command job. Counts primes by trial division and reports progress.
 *
 *   cpu [--iterations N] [--exit CODE]
 *
 * REPORT_EVERY (environment) sets how often progress goes to stderr. The result goes to
 * stdout; the exit code is CODE (default 0), so tests can check that it is kept.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int is_prime(unsigned long n) {
    if (n < 2) return 0;
    for (unsigned long d = 2; d * d <= n; d++) {
        if (n % d == 0) return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    unsigned long iterations = 100000;
    int exit_code = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--iterations") == 0 && i + 1 < argc) {
            iterations = strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--exit") == 0 && i + 1 < argc) {
            exit_code = atoi(argv[++i]);
        } else {
            fprintf(stderr, "cpu: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    const char *every_text = getenv("REPORT_EVERY");
    unsigned long every = every_text ? strtoul(every_text, NULL, 10) : 0;

    unsigned long primes = 0;
    for (unsigned long n = 0; n < iterations; n++) {
        primes += (unsigned long)is_prime(n);
        if (every && n && n % every == 0) {
            fprintf(stderr, "cpu: %lu of %lu checked\n", n, iterations);
        }
    }
    printf("primes below %lu: %lu\n", iterations, primes);
    return exit_code;
}
