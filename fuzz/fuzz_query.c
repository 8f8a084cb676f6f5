/* fuzz_query.c: libFuzzer harness for the admin query parser (query.c).
 *
 * Input: a query string (what follows '?' in GET /sessions?...). A good
 * query must leave a filter that keeps query.h's contract: a NUL-terminated
 * listener shorter than QUERY_NAME_MAX, a prefix within the family's bits,
 * and a client= network that contains its own address. The same bytes are
 * also read as a session id.
 */
#include "fuzz.h"
#include "query.h"

#include <netinet/in.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct query_filter f;
    uint64_t sid;

    if (query_parse((const char *)data, size, &f)) {
        FUZZ_CHECK(memchr(f.listener, '\0', sizeof(f.listener)) != NULL);
        FUZZ_CHECK(!f.has_listener || f.listener[0] != '\0');
        FUZZ_CHECK(!f.has_listener || memchr(data, '=', size) != NULL);
        if (f.has_client) {
            struct sockaddr_storage ss;
            memset(&ss, 0, sizeof(ss));
            FUZZ_CHECK(f.client.family == AF_INET || f.client.family == AF_INET6);
            FUZZ_CHECK(f.client.prefix <= (f.client.family == AF_INET ? 32u : 128u));
            ss.ss_family = f.client.family;
            if (f.client.family == AF_INET)
                memcpy(&((struct sockaddr_in *)&ss)->sin_addr, f.client.addr, 4);
            else
                memcpy(&((struct sockaddr_in6 *)&ss)->sin6_addr, f.client.addr, 16);
            FUZZ_CHECK(query_client_match(&f, (const struct sockaddr *)&ss));
        } else {
            struct sockaddr_storage none;
            memset(&none, 0, sizeof(none));
            FUZZ_CHECK(query_client_match(&f, (const struct sockaddr *)&none));
        }
    }
    if (query_parse_sid((const char *)data, size, &sid))
        FUZZ_CHECK(size >= 1 && size <= 16);
    return 0;
}
