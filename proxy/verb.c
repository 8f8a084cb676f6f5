/* verb.c: looking up a protocol's verbs (see verb.h). */
#include "verb.h"

static unsigned char verb_upper(unsigned char c)
{
    return c >= 'a' && c <= 'z' ? (unsigned char)(c - 'a' + 'A') : c;
}

bool verb_is(const struct verb *v, const char *word, size_t len)
{
    size_t k = 0;

    if (v->len == 0 || v->len != len)
        return false;
    while (k < len && verb_upper((unsigned char)word[k]) == (unsigned char)v->name[k])
        k++;
    return k == len;
}

unsigned verb_find(const struct verb *table, unsigned count, const char *word, size_t len,
                   unsigned unknown)
{
    for (unsigned i = 0; i < count; i++)
        if (verb_is(&table[i], word, len))
            return i;
    return unknown;
}
