/* verb.h: PURE. A protocol's verb table: one per protocol, kept by its parser module
 * (smtp.c, pop3.c, imap.c) and read by both the parser (how a command changes what the
 * parser reads next) and the session (require_tls, how pairs end), so a verb's meaning is
 * written down once.
 *
 * A table is indexed by the protocol's command enum: row i describes command i. Rows that are
 * no word a client can send (NONE, UNKNOWN, SMTP's end-of-data dot) have len 0: they carry the
 * name that logs and metrics show, and flags (UNKNOWN's row says what an unknown verb may do),
 * but verb_find() never returns them. OpenSMTPD's smtp_session.c commands[] is the model.
 */
#ifndef MXPROXY_VERB_H
#define MXPROXY_VERB_H

#include <stdbool.h>
#include <stddef.h>

/* What a verb does. The low byte is shared, the rest is the protocol's own (VERB_PROTO(n)). */
#define VERB_WAIT                                                                                  \
    0x01u /* the parser holds what follows until the reply (DATA, AUTH,                            \
             IMAP IDLE and COMPRESS): its meaning depends on the reply */
#define VERB_BARRIER                                                                               \
    0x02u                      /* what follows is dropped until the reply: bytes sent behind       \
                                  STARTTLS/STLS are an injection (CVE-2011-0411) */
#define VERB_BEFORE_TLS 0x04u  /* allowed before TLS where TLS is required (require_tls) */
#define VERB_ENDS 0x08u        /* its positive reply ends the session (QUIT, LOGOUT) */
#define VERB_CREDENTIALS 0x10u /* its arguments are credentials: never logged */
#define VERB_PROTO(n) (0x100u << (n))

struct verb {
    const char *name;  /* upper case, as on the wire ("STARTTLS"); "" for NONE */
    unsigned char len; /* strlen(name) for a verb a client sends, else 0 */
    unsigned flags;    /* VERB_* */
};

/* A row for a verb a client sends, and one for a pseudo command (no word). */
#define VERB(name, flags)                                                                          \
    {                                                                                              \
        name, sizeof(name) - 1, flags                                                              \
    }
#define VERB_PSEUDO(name, flags)                                                                   \
    {                                                                                              \
        name, 0, flags                                                                             \
    }

/* Is word[0, len) the verb of row v, in any case (ASCII)? Never for a pseudo command. */
bool verb_is(const struct verb *v, const char *word, size_t len);

/* The index of the row of table[0, count) whose verb is word[0, len) in any case (ASCII), or
 * `unknown` when none is. */
unsigned verb_find(const struct verb *table, unsigned count, const char *word, size_t len,
                   unsigned unknown);

/* table[id].name, or "" when id is out of range. */
static inline const char *verb_name(const struct verb *table, unsigned count, unsigned id)
{
    return id < count ? table[id].name : "";
}

/* table[id].flags, or 0 when id is out of range. */
static inline unsigned verb_flags(const struct verb *table, unsigned count, unsigned id)
{
    return id < count ? table[id].flags : 0;
}

#endif
