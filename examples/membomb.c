/*
 * membomb: a rogue module that allocates and touches memory until the allocator gives up,
 * then aborts, as a leaking program does. The sandbox's memory limit must stop it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK (1 << 20)

/* Every block links to the previous one through a volatile head, so the compiler cannot
 * prove the allocations unused and remove them. */
static void *volatile head;

int main(void) {
    size_t total = 0;
    for (;;) {
        char *block = malloc(CHUNK);
        if (block == NULL) {
            fprintf(stderr, "membomb: allocation failed after %zu MiB\n", total / CHUNK);
            abort();
        }
        memset(block, 0xAB, CHUNK);
        *(void **)block = head;
        head = block;
        total += CHUNK;
    }
}
