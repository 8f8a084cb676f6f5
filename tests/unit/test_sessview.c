/* test_sessview.c: session records, their bounds and their JSON (sessview.c). */
#include <string.h>

#include "sessview.h"
#include "test.h"

static void add_pair(struct sessview *v, struct sessview_rec *r, const char *cmd)
{
    struct sessview_pair p;
    memset(&p, 0, sizeof(p));
    snprintf(p.cmd, sizeof(p.cmd), "%s", cmd);
    snprintf(p.code, sizeof(p.code), "250");
    snprintf(p.reply, sizeof(p.reply), "ok \"quoted\"\n");
    p.at_us = 1500;
    p.ms_us = 250;
    p.flags = SESSVIEW_P_MS | SESSVIEW_P_PIPELINED;
    sessview_pair(v, r, &p);
}

static long render(struct sessview *v, unsigned recent, const struct sessview_filter *f, char **out)
{
    struct sessview *views[1] = {v};
    return sessview_render(views, 1, recent, f, out);
}

static void test_ring_and_json(void)
{
    struct sessview v;
    struct sessview_state st;
    struct sessview_filter all = {0};
    char *out;

    sessview_init(&v);
    memset(&st, 0, sizeof(st));
    st.phase = "relaying";
    snprintf(st.client, sizeof(st.client), "192.0.2.1:2525");
    snprintf(st.fields, sizeof(st.fields), ",\"helo\":\"h\"");
    for (uint64_t sid = 1; sid <= 5; sid++) {
        struct sessview_rec *r = sessview_open(&v, sid, "smtp", "smtp");
        ASSERT(r != NULL);
        sessview_update(&v, r, &st);
        for (int i = 0; i < 130; i++)
            add_pair(&v, r, "NOOP");
        sessview_close(&v, r, &st, "quit", sid == 5 ? "boom" : NULL, 3);
    }
    ASSERT_EQ(v.ring_n, 3);
    long n = render(&v, 3, &all, &out);
    ASSERT(n > 0);
    ASSERT_EQ(strlen(out), (size_t)n);
    /* newest first: 5, 4, 3; 1 and 2 are gone */
    const char *s5 = strstr(out, "\"0000000000000005\""), *s3 = strstr(out, "\"0000000000000003\"");
    ASSERT(s5 != NULL && s3 != NULL && s5 < s3);
    ASSERT(strstr(out, "\"0000000000000002\"") == NULL);
    ASSERT(strstr(out, ",\"helo\":\"h\",\"end\":\"quit\"") != NULL);
    ASSERT(strstr(out, "\"pairs_total\":130,\"pairs_dropped\":30") != NULL);
    ASSERT(strstr(out, "\"reply\":\"ok \\\"quoted\\\"\\n\"") != NULL);
    ASSERT(strstr(out, "\"at_ms\":1.500,\"ms\":0.250,\"pipelined\":true") != NULL);
    ASSERT(strstr(out, "\"error\":\"boom\",\"failed\":true") != NULL);
    ASSERT(strncmp(out, "{\"open\":[],\"recent\":[{", 22) == 0);
    free(out);

    /* One by id: every pair kept (100). */
    struct sessview_filter one = {.has_sid = true, .sid = 4};
    ASSERT(render(&v, 3, &one, &out) > 0);
    size_t cmds = 0;
    for (const char *p = out; (p = strstr(p, "\"cmd\":")) != NULL; p++)
        cmds++;
    ASSERT_EQ(cmds, SESSVIEW_PAIRS_MAX);
    free(out);
    one.sid = 1;
    ASSERT_EQ(render(&v, 3, &one, &out), 0);
    ASSERT(out == NULL);

    /* error=1 keeps the session closed with error=; the ring shrinks to 1. */
    struct sessview_filter failed = {.q = {.error_only = true}};
    ASSERT(render(&v, 3, &failed, &out) > 0);
    ASSERT(strstr(out, "\"0000000000000005\"") != NULL);
    ASSERT(strstr(out, "\"0000000000000004\"") == NULL);
    free(out);
    struct sessview_rec *r = sessview_open(&v, 6, "smtp", "smtp");
    sessview_close(&v, r, &st, "quit", NULL, 1);
    ASSERT_EQ(v.ring_n, 1);
    sessview_destroy(&v);
}

int main(void)
{
    test_ring_and_json();
    printf("test_sessview: ok\n");
    return 0;
}
