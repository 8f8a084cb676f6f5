/* test.h: tiny assertion helpers for mxproxy's C unit tests.
 *
 * Each ASSERT_* prints both sides and the location, then exits 1, so ctest
 * names the failing module and the log shows what differed.
 */
#ifndef MXPROXY_TEST_H
#define MXPROXY_TEST_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define TEST_FAIL_(...)                                                                            \
    do {                                                                                           \
        fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                            \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fputc('\n', stderr);                                                                       \
        exit(1);                                                                                   \
    } while (0)

#define ASSERT(cond)                                                                               \
    do {                                                                                           \
        if (!(cond))                                                                               \
            TEST_FAIL_("assertion failed: %s", #cond);                                             \
    } while (0)

#define ASSERT_EQ(a, b)                                                                            \
    do {                                                                                           \
        intmax_t a_ = (intmax_t)(a), b_ = (intmax_t)(b);                                           \
        if (a_ != b_)                                                                              \
            TEST_FAIL_("%s == %s: %jd != %jd", #a, #b, a_, b_);                                    \
    } while (0)

#define ASSERT_OK(expr) ASSERT_EQ((expr), 0)

#define ASSERT_STREQ(a, b)                                                                         \
    do {                                                                                           \
        const char *a_ = (a), *b_ = (b);                                                           \
        if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0)                                       \
            TEST_FAIL_("%s == %s: \"%s\" != \"%s\"", #a, #b, a_ ? a_ : "(null)",                   \
                       b_ ? b_ : "(null)");                                                        \
    } while (0)

/* Compares len bytes; prints them escaped on mismatch. */
#define ASSERT_MEMEQ(a, alen, b, blen)                                                             \
    do {                                                                                           \
        const char *a_ = (const char *)(a), *b_ = (const char *)(b);                               \
        size_t al_ = (alen), bl_ = (blen);                                                         \
        if (al_ != bl_ || memcmp(a_, b_, al_) != 0) {                                              \
            fprintf(stderr, "%s:%d: %s != %s\n  got:  ", __FILE__, __LINE__, #a, #b);              \
            test_dump_(a_, al_);                                                                   \
            fprintf(stderr, "\n  want: ");                                                         \
            test_dump_(b_, bl_);                                                                   \
            fputc('\n', stderr);                                                                   \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static inline void test_dump_(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\r')
            fputs("\\r", stderr);
        else if (c == '\n')
            fputs("\\n", stderr);
        else if (c < 0x20 || c >= 0x7f)
            fprintf(stderr, "\\x%02x", c);
        else
            fputc(c, stderr);
    }
}

/* A parser's input placed flush against a PROT_NONE page, so reading one
 * byte past it crashes at once (picohttpparser's test does the same). */
struct guard {
    char *base;    /* the mapping */
    size_t maplen; /* its length, the guard page included */
};

/* Copies s[0, n) so that its last byte is the last one before a PROT_NONE page. */
static inline const char *guard_place(struct guard *g, const void *s, size_t n)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t data = (n + page - 1) / page * page;

    if (data == 0)
        data = page;
    g->maplen = data + page;
    g->base = mmap(NULL, g->maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT(g->base != MAP_FAILED);
    ASSERT_OK(mprotect(g->base + data, page, PROT_NONE));
    if (n > 0)
        memcpy(g->base + data - n, s, n);
    return g->base + data - n;
}

static inline void guard_free(struct guard *g)
{
    munmap(g->base, g->maplen);
}

#endif /* MXPROXY_TEST_H */
