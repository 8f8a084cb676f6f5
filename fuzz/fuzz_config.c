/* fuzz_config.c: libFuzzer harness for the INI configuration parser.
 *
 * Any input either loads or fails with one "fuzz.ini[:LINE]: message" and
 * no config; a loaded config is freed without leaks. Host names are never
 * resolved here: the harness's own getaddrinfo() answers names beginning with
 * a to m with two addresses (127.0.0.2 and ::2, so the expansion of names into
 * backends is fuzzed too) and others with "unknown name", and its
 * ares_init_options() fails, so fuzzing sends no DNS queries and stays fast.
 * Inputs naming the key tls_keylog are skipped: loading one creates the file
 * it names, and a fuzzer must not create files at paths it made up.
 */
#include <ares.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res);
void freeaddrinfo(struct addrinfo *res);
int ares_init_options(ares_channel *channel, struct ares_options *options, int optmask);

/* One answer: the addrinfo and its address in one block, as freeaddrinfo() below frees. */
struct fuzz_answer {
    struct addrinfo ai;
    struct sockaddr_in6 sa;
};

static struct addrinfo *fuzz_answer(int family, struct addrinfo *next)
{
    struct fuzz_answer *a = calloc(1, sizeof(*a));

    if (a == NULL)
        return next;
    a->ai.ai_family = family;
    a->ai.ai_socktype = SOCK_STREAM;
    a->ai.ai_addr = (struct sockaddr *)&a->sa;
    a->ai.ai_next = next;
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&a->sa;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(0x7f000002);
        a->ai.ai_addrlen = sizeof(*in);
    } else {
        a->sa.sin6_family = AF_INET6;
        a->sa.sin6_addr.s6_addr[15] = 2;
        a->ai.ai_addrlen = sizeof(a->sa);
    }
    return &a->ai;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    (void)service;
    (void)hints;
    *res = NULL;
    if (node == NULL || node[0] < 'a' || node[0] > 'm')
        return EAI_NONAME;
    *res = fuzz_answer(AF_INET6, fuzz_answer(AF_INET, NULL));
    return *res != NULL ? 0 : EAI_MEMORY;
}

void freeaddrinfo(struct addrinfo *res)
{
    while (res != NULL) {
        struct addrinfo *next = res->ai_next;
        free(res);
        res = next;
    }
}

int ares_init_options(ares_channel *channel, struct ares_options *options, int optmask)
{
    (void)channel;
    (void)options;
    (void)optmask;
    return ARES_ENOMEM;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[CONFIG_ERR_MAX];
    struct config *c = NULL;
    char *text = malloc(size + 1);

    if (text == NULL)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    if (strstr(text, "tls_keylog") != NULL) {
        free(text);
        return 0;
    }
    err[0] = '\0';
    int rc = config_load_string(text, "fuzz.ini", &c, err, sizeof(err));
    if (rc == 0) {
        if (c == NULL || c->n_listeners == 0)
            abort(); /* a loaded config has at least one listener */
        (void)config_check_supported(c, err, sizeof(err));
        config_unref(c);
    } else if (c != NULL || strncmp(err, "fuzz.ini", 8) != 0) {
        abort(); /* a failed load names the file and leaves no config */
    }
    free(text);
    return 0;
}
