/* fuzz.h: what every mxproxy libFuzzer harness in fuzz/ shares.
 *
 * FUZZ_CHECK(cond) prints the location and the condition to stderr and aborts when cond is
 * false, so libFuzzer keeps the input that broke an invariant. Checks are for invariants of
 * mxproxy's own code, never a verdict on the input.
 */
#ifndef MXPROXY_FUZZ_H
#define MXPROXY_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* libFuzzer's entry point: called once per input; data is libFuzzer's, valid for the call. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
