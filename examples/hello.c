/*
 * hello: the smallest HTTP workload. WAGI: headers, a blank line, then the body, on stdout.
 * The greeting comes from the GREETING environment variable that the Workload declares.
 */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    const char *greeting = getenv("GREETING");
    if (greeting == NULL || greeting[0] == '\0') {
        greeting = "Hello from Pollen";
    }
    printf("Content-Type: text/plain; charset=utf-8\n\n%s!\n", greeting);
    return 0;
}
