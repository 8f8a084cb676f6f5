/* fuzz_config.c: libFuzzer harness for the INI configuration parser.
 *
 * Any input either loads or fails with one "fuzz.ini[:LINE]: message" and
 * no config; a loaded config is freed without leaks. Host names are never
 * resolved here: the harness's own getaddrinfo() answers "unknown name", so
 * fuzzing sends no DNS queries and stays fast. Inputs naming the key
 * tls_keylog are skipped: loading one creates the file it names, and a
 * fuzzer must not create files at paths it made up.
 */
#include <netdb.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    (void)node;
    (void)service;
    (void)hints;
    *res = NULL;
    return EAI_NONAME;
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
