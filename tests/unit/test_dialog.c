/* test_dialog.c: unit tests for the pure part of proxy/dialog.c, the dialect verb table. */
#include "dialog.h"
#include "test.h"

#include <string.h>

enum { VERB_LOGIN = 1, VERB_STARTTLS, VERB_LOGOUT };

static const struct dialect_verb verbs[] = {
    {"LOGIN", VERB_LOGIN, DIALECT_V_CREDENTIALS},
    {"STARTTLS", VERB_STARTTLS, DIALECT_V_STARTTLS | DIALECT_V_BEFORE_TLS | DIALECT_V_BARRIER},
    {"LOGOUT", VERB_LOGOUT, DIALECT_V_ENDS | DIALECT_V_BEFORE_TLS},
    {NULL, 0, 0},
};

static const struct dialect dl = {.name = "test", .match = DIALECT_MATCH_TAG, .verbs = verbs};

static void test_verb_find(void)
{
    const struct dialect_verb *v = dialect_verb_find(&dl, "starttls", 8);

    ASSERT(v != NULL);
    ASSERT_EQ(v->id, VERB_STARTTLS);
    ASSERT(v->flags & DIALECT_V_STARTTLS);
    /* Case-insensitive, and exactly len bytes: a prefix or a longer word is not the verb. */
    ASSERT(dialect_verb_find(&dl, "LoGoUt", 6)->id == VERB_LOGOUT);
    ASSERT(dialect_verb_find(&dl, "LOGOUTX", 7) == NULL);
    ASSERT(dialect_verb_find(&dl, "LOGOUT extra", 6)->id == VERB_LOGOUT);
    ASSERT(dialect_verb_find(&dl, "LOG", 3) == NULL);
    ASSERT(dialect_verb_find(&dl, "", 0) == NULL);
    ASSERT(dialect_verb_find(&dl, "SELECT", 6) == NULL);
    /* A dialect without a table knows no verb. */
    struct dialect none = {.name = "none"};
    ASSERT(dialect_verb_find(&none, "LOGIN", 5) == NULL);
}

int main(void)
{
    test_verb_find();
    printf("test_dialog: all passed\n");
    return 0;
}
