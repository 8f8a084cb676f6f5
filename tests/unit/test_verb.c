/* test_verb.c: unit tests for proxy/verb.c and for the three protocols' verb tables, which the
 * parsers and the sessions both read: each table is checked against the rules the session code
 * relies on, and each credential verb against its own parser. */
#include "imap.h"
#include "pop3.h"
#include "smtp.h"
#include "test.h"
#include "verb.h"

#include <ctype.h>
#include <string.h>

struct table {
    const char *proto;
    const struct verb *verbs;
    unsigned count;
    unsigned unknown; /* the UNKNOWN row */
};

static const struct table tables[] = {
    {"smtp", smtp_verbs, SMTP_CMD_COUNT, SMTP_CMD_UNKNOWN},
    {"pop3", pop3_verbs, POP3_CMD_COUNT, POP3_CMD_UNKNOWN},
    {"imap", imap_verbs, IMAP_CMD_COUNT_, IMAP_CMD_UNKNOWN},
};

static const struct verb toy[] = {
    VERB_PSEUDO("", 0),
    VERB_PSEUDO("UNKNOWN", 0),
    VERB("LOGIN", VERB_CREDENTIALS),
    VERB("STARTTLS", VERB_BARRIER | VERB_BEFORE_TLS),
    VERB("LOGOUT", VERB_ENDS | VERB_BEFORE_TLS),
    VERB_PSEUDO(".", 0),
};

static void test_find(void)
{
    const unsigned n = sizeof(toy) / sizeof(toy[0]);

    ASSERT_EQ(verb_find(toy, n, "starttls", 8, 1), 3u);
    ASSERT_EQ(verb_find(toy, n, "LoGoUt", 6, 1), 4u);
    /* Exactly len bytes: a prefix or a longer word is not the verb. */
    ASSERT_EQ(verb_find(toy, n, "LOGOUTX", 7, 1), 1u);
    ASSERT_EQ(verb_find(toy, n, "LOGOUT extra", 6, 1), 4u);
    ASSERT_EQ(verb_find(toy, n, "LOG", 3, 1), 1u);
    /* Pseudo commands are no words: "", "UNKNOWN" and "." are unknown verbs. */
    ASSERT_EQ(verb_find(toy, n, "", 0, 1), 1u);
    ASSERT_EQ(verb_find(toy, n, "UNKNOWN", 7, 1), 1u);
    ASSERT_EQ(verb_find(toy, n, ".", 1, 1), 1u);
    /* ASCII case only: a byte above 0x7f never folds onto a letter. */
    ASSERT_EQ(verb_find(toy, n, "LOG\xc9N", 5, 1), 1u);
    ASSERT_EQ(verb_find(toy, 0, "LOGIN", 5, 7), 7u);
    ASSERT_STREQ(verb_name(toy, n, 3), "STARTTLS");
    ASSERT_STREQ(verb_name(toy, n, n), "");
    ASSERT_EQ(verb_flags(toy, n, 4), VERB_ENDS | VERB_BEFORE_TLS);
    ASSERT_EQ(verb_flags(toy, n, 99), 0u);
}

/* What every table must say for the session code to be right. */
static void test_table_rules(void)
{
    for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]); t++) {
        const struct table *tb = &tables[t];
        unsigned starttls = 0, ends = 0;

        ASSERT_STREQ(tb->verbs[0].name, "");
        ASSERT_EQ(tb->verbs[tb->unknown].len, 0u);
        for (unsigned i = 0; i < tb->count; i++) {
            const struct verb *v = &tb->verbs[i];
            if (v->name == NULL)
                TEST_FAIL_("%s: row %u has no name", tb->proto, i);
            if (v->len != 0 && v->len != strlen(v->name))
                TEST_FAIL_("%s: %s: len %u", tb->proto, v->name, v->len);
            for (const char *c = v->name; *c != '\0'; c++)
                if (islower((unsigned char)*c))
                    TEST_FAIL_("%s: %s is not upper case", tb->proto, v->name);
            if (v->len == 0)
                continue;
            /* Found by itself, in any case, and no other row shares its word. */
            char lower[32];
            ASSERT(v->len < sizeof(lower));
            for (unsigned k = 0; k <= v->len; k++)
                lower[k] = (char)tolower((unsigned char)v->name[k]);
            ASSERT_EQ(verb_find(tb->verbs, tb->count, v->name, v->len, tb->unknown), i);
            ASSERT_EQ(verb_find(tb->verbs, tb->count, lower, v->len, tb->unknown), i);
            /* A parser either holds what follows or drops it, not both. */
            if ((v->flags & VERB_WAIT) && (v->flags & VERB_BARRIER))
                TEST_FAIL_("%s: %s both waits and is a barrier", tb->proto, v->name);
            /* require_tls: a client can always start TLS and leave, never log in. */
            if ((v->flags & (VERB_BARRIER | VERB_ENDS)) && !(v->flags & VERB_BEFORE_TLS))
                TEST_FAIL_("%s: %s is refused before TLS", tb->proto, v->name);
            if ((v->flags & VERB_CREDENTIALS) && (v->flags & VERB_BEFORE_TLS))
                TEST_FAIL_("%s: %s sends credentials before TLS", tb->proto, v->name);
            starttls += (v->flags & VERB_BARRIER) != 0;
            ends += (v->flags & VERB_ENDS) != 0;
        }
        ASSERT_EQ(starttls, 1u);
        ASSERT_EQ(ends, 1u);
    }
}

/* The loggable text of the first command in line, by the protocol's own parser. */
static size_t logged_text(const struct table *tb, const char *line, const char **text)
{
    size_t len = strlen(line);

    if (tb->verbs == smtp_verbs) {
        struct smtp_client p = {0};
        struct smtp_event ev;
        smtp_client_parse(&p, line, len, &ev);
        ASSERT_EQ(ev.type, SMTP_EV_COMMAND);
        *text = ev.line;
        return ev.line_len;
    }
    if (tb->verbs == pop3_verbs) {
        struct pop3_client p = {0};
        struct pop3_event ev;
        pop3_client_parse(&p, line, len, &ev);
        ASSERT_EQ(ev.type, POP3_EV_COMMAND);
        *text = ev.line;
        return ev.line_len;
    }
    struct imap_client p;
    struct imap_event ev;
    imap_client_init(&p, NULL);
    imap_client_parse(&p, line, len, &ev);
    ASSERT_EQ(ev.type, IMAP_EV_COMMAND);
    *text = ev.text;
    return ev.text_len;
}

/* A verb the table calls a credential is one its parser never logs the arguments of. */
static void test_credentials_redacted(void)
{
    static const char secret[] = "c2VjcmV0LXBhc3N3b3Jk";

    for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]); t++) {
        const struct table *tb = &tables[t];
        unsigned seen = 0;
        for (unsigned i = 0; i < tb->count; i++) {
            const struct verb *v = &tb->verbs[i];
            char line[128];
            const char *text;
            if (!(v->flags & VERB_CREDENTIALS))
                continue;
            /* "VERB PLAIN secret": a mechanism and an initial response, or a name and a
             * password; either way the secret is the part that must not show. */
            snprintf(line, sizeof(line), "%s%s PLAIN %s\r\n", tb->verbs == imap_verbs ? "a1 " : "",
                     v->name, secret);
            size_t n = logged_text(tb, line, &text);
            if (memmem(text, n, secret, sizeof(secret) - 1) != NULL)
                TEST_FAIL_("%s: %s logged as \"%.*s\"", tb->proto, v->name, (int)n, text);
            ASSERT(n >= v->len && memcmp(text, v->name, v->len) == 0);
            seen++;
        }
        ASSERT(seen >= 1);
    }
}

int main(void)
{
    test_find();
    test_table_rules();
    test_credentials_redacted();
    printf("test_verb: all passed\n");
    return 0;
}
