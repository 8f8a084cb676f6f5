/* smtp_pairs.c: PURE reply-to-command matching (see smtp_pairs.h for the contract). */
#include "smtp_pairs.h"

#include <assert.h>
#include <errno.h>
#include <string.h>

static_assert(SMTP_PAIRS_TEXT_MAX <= 255, "entry text_len is an unsigned char");
static_assert(sizeof("AUTH ") - 1 + sizeof(" [redacted]") - 1 < SMTP_PAIRS_TEXT_MAX,
              "room for a redacted AUTH line");

static const char smtp_pairs_redacted[] = " [redacted]";

static const struct smtp_pairs_local_answer {
    int code;
    const char *esc;
    const char *text;
    const char *cmd_text; /* what the log shows in place of the line */
} smtp_pairs_local_answers[] = {
    [SMTP_LOCAL_NONE] = {0, "", "", ""},
    [SMTP_LOCAL_TOO_LONG] = {500, "5.5.2", "Line too long", "[line too long]"},
    [SMTP_LOCAL_INVALID] = {500, "5.5.2", "Syntax error, bare CR or LF in command",
                            "[invalid line]"},
    [SMTP_LOCAL_SMUGGLING] = {554, "5.7.0", "Message rejected: bare CR or LF around end of data",
                              "."},
    /* These keep the command's own text in the log. */
    [SMTP_LOCAL_STARTTLS] = {220, "2.0.0", "Ready to start TLS", NULL},
    [SMTP_LOCAL_NEED_TLS] = {530, "5.7.0", "Must issue a STARTTLS command first", NULL},
    [SMTP_LOCAL_TLS_ACTIVE] = {503, "5.5.1", "TLS already active", NULL},
    [SMTP_LOCAL_XCLIENT] = {550, "5.7.0", "Command not permitted", NULL},
    [SMTP_LOCAL_EHLO] = {250, "", "", NULL},
    [SMTP_LOCAL_STARTTLS_IN_TX] = {503, "5.5.1", "Error: MAIL transaction in progress", NULL},
};

size_t smtp_pairs_room(const struct smtp_pairs *pp)
{
    return pp->q != NULL ? SMTP_PAIRS_CAP - pp->count : 0;
}

void smtp_pairs_attach(struct smtp_pairs *pp, struct smtp_pairs_entry *q)
{
    if (pp->q == NULL) {
        pp->q = q;
        pp->head = 0;
    }
}

struct smtp_pairs_entry *smtp_pairs_detach(struct smtp_pairs *pp)
{
    struct smtp_pairs_entry *q = pp->q;

    if (q == NULL || pp->count > 0)
        return NULL;
    pp->q = NULL;
    pp->head = 0;
    return q;
}

size_t smtp_pairs_outstanding(const struct smtp_pairs *pp)
{
    return pp->count;
}

static struct smtp_pairs_entry *smtp_pairs_at(struct smtp_pairs *pp, unsigned i)
{
    return &pp->q[(pp->head + i) % SMTP_PAIRS_CAP];
}

bool smtp_pairs_in_transaction(const struct smtp_pairs *pp)
{
    return pp->tx_open;
}

enum smtp_cmd smtp_pairs_oldest(const struct smtp_pairs *pp)
{
    return pp->count > 0 ? pp->q[pp->head].cmd : SMTP_CMD_NONE;
}

const struct smtp_pairs_summary *smtp_pairs_summary(const struct smtp_pairs *pp)
{
    return &pp->sum;
}

/* Copies at most max bytes of s[0, n) into dst, NUL-terminates it, returns the length. */
static size_t smtp_pairs_copy(char *dst, size_t max, const char *s, size_t n)
{
    if (n > max)
        n = max;
    if (n > 0)
        memcpy(dst, s, n);
    dst[n] = '\0';
    return n;
}

/* Appends a new entry; the caller checked for room. */
static struct smtp_pairs_entry *smtp_pairs_push(struct smtp_pairs *pp, enum smtp_cmd cmd,
                                                uint64_t now_ns)
{
    struct smtp_pairs_entry *e = smtp_pairs_at(pp, pp->count);

    memset(e, 0, sizeof(*e));
    e->cmd = cmd;
    e->t_cmd = now_ns;
    if (pp->count > 0)
        e->flags |= SMTP_PAIR_F_PIPELINED;
    pp->count++;
    return e;
}

static void smtp_pairs_set_text(struct smtp_pairs_entry *e, const char *s, size_t n)
{
    if (n > SMTP_PAIRS_TEXT_MAX)
        n = SMTP_PAIRS_TEXT_MAX;
    if (n > 0)
        memcpy(e->text, s, n);
    e->text_len = (unsigned char)n;
}

/* The newest entry when it is cmd, else NULL. */
static struct smtp_pairs_entry *smtp_pairs_newest(struct smtp_pairs *pp, enum smtp_cmd cmd)
{
    struct smtp_pairs_entry *e;

    if (pp->count == 0)
        return NULL;
    e = smtp_pairs_at(pp, pp->count - 1);
    return e->cmd == cmd ? e : NULL;
}

static void smtp_pairs_command(struct smtp_pairs *pp, const struct smtp_event *ev,
                               struct smtp_pairs_entry *e)
{
    struct smtp_pairs_summary *s = &pp->sum;

    if (ev->cmd == SMTP_CMD_AUTH) {
        /* ev->line stops after the mechanism; the marker stands for the initial response. */
        size_t room = SMTP_PAIRS_TEXT_MAX - (sizeof(smtp_pairs_redacted) - 1);
        size_t n = ev->line_len < room ? ev->line_len : room;
        smtp_pairs_set_text(e, ev->line, n);
        if (ev->flags & SMTP_EV_F_AUTH_INITIAL) {
            memcpy(e->text + n, smtp_pairs_redacted, sizeof(smtp_pairs_redacted) - 1);
            e->text_len = (unsigned char)(n + sizeof(smtp_pairs_redacted) - 1);
        }
    } else {
        smtp_pairs_set_text(e, ev->line, ev->line_len);
    }
    if (smtp_cmd_flags(ev->cmd) & VERB_ENDS)
        s->quit_sent = true;
    switch (ev->cmd) {
    case SMTP_CMD_HELO:
    case SMTP_CMD_EHLO:
        smtp_pairs_copy(s->helo, SMTP_PAIRS_NAME_MAX, ev->arg, ev->arg_len);
        break;
    case SMTP_CMD_MAIL:
        if (!s->has_mail_from && ev->arg != NULL) {
            smtp_pairs_copy(s->mail_from, SMTP_PAIRS_NAME_MAX, ev->arg, ev->arg_len);
            s->has_mail_from = true;
        }
        break;
    case SMTP_CMD_BDAT:
        e->size = ev->size;
        if (ev->flags & SMTP_EV_F_LAST)
            e->flags |= SMTP_PAIR_F_LAST;
        break;
    default:
        break;
    }
}

int smtp_pairs_on_client_event(struct smtp_pairs *pp, const struct smtp_event *ev, uint64_t now_ns)
{
    struct smtp_pairs_entry *e;
    enum smtp_local local = SMTP_LOCAL_NONE;

    switch (ev->type) {
    case SMTP_EV_COMMAND:
        if (smtp_pairs_room(pp) == 0)
            return -ENOBUFS;
        smtp_pairs_command(pp, ev, smtp_pairs_push(pp, ev->cmd, now_ns));
        return 0;
    case SMTP_EV_BDAT_END:
        /* A BDAT command is complete with the last byte of its chunk. */
        e = smtp_pairs_newest(pp, SMTP_CMD_BDAT);
        if (e != NULL)
            e->t_cmd = now_ns;
        return 0;
    case SMTP_EV_DATA_END:
        if (smtp_pairs_room(pp) == 0)
            return -ENOBUFS;
        e = smtp_pairs_push(pp, SMTP_CMD_DOT, now_ns);
        e->size = ev->size;
        smtp_pairs_set_text(e, ".", 1);
        if (ev->flags & SMTP_EV_F_SMUGGLING)
            e->local = SMTP_LOCAL_SMUGGLING;
        return 0;
    case SMTP_EV_TOO_LONG:
        local = SMTP_LOCAL_TOO_LONG;
        /* fallthrough */
    case SMTP_EV_INVALID:
        if (local == SMTP_LOCAL_NONE)
            local = SMTP_LOCAL_INVALID;
        /* fallthrough */
    case SMTP_EV_AUTH_RESPONSE:
        if (ev->flags & SMTP_EV_F_CANCEL) {
            e = smtp_pairs_newest(pp, SMTP_CMD_AUTH);
            if (e != NULL)
                e->flags |= SMTP_PAIR_F_CANCELLED;
            return 0;
        }
        if (local == SMTP_LOCAL_NONE)
            return 0;
        if (smtp_pairs_room(pp) == 0)
            return -ENOBUFS;
        e = smtp_pairs_push(pp, SMTP_CMD_NONE, now_ns);
        e->local = local;
        smtp_pairs_set_text(e, smtp_pairs_local_answers[local].cmd_text,
                            strlen(smtp_pairs_local_answers[local].cmd_text));
        return 0;
    default:
        return 0;
    }
}

/* Removes entry i (0 = oldest) into *e. */
static void smtp_pairs_remove(struct smtp_pairs *pp, unsigned i, struct smtp_pairs_entry *e)
{
    *e = *smtp_pairs_at(pp, i);
    /* Only the head is removed in order; a skipped local entry keeps its place. */
    for (; i > 0; i--)
        *smtp_pairs_at(pp, i) = *smtp_pairs_at(pp, i - 1);
    pp->head = (pp->head + 1) % SMTP_PAIRS_CAP;
    pp->count--;
}

static void smtp_pairs_fill(struct smtp_pair *out, enum smtp_pair_kind kind,
                            const struct smtp_pairs_entry *e, const struct smtp_reply *r)
{
    memset(out, 0, sizeof(*out));
    out->kind = kind;
    if (e != NULL) {
        out->cmd = e->cmd;
        out->local = e->local;
        out->cmd_text_len =
            smtp_pairs_copy(out->cmd_text, SMTP_PAIRS_TEXT_MAX, e->text, e->text_len);
        out->flags = e->flags;
        out->size = e->size;
        out->rounds = e->rounds;
        out->t_cmd = e->t_cmd;
    }
    if (r != NULL) {
        out->code = r->code;
        memcpy(out->esc, r->esc, sizeof(out->esc));
        out->esc[sizeof(out->esc) - 1] = '\0';
        out->text_len = smtp_pairs_copy(out->text, SMTP_REPLY_TEXT_MAX, r->text, r->text_len);
        out->lines = r->lines;
        out->t_reply = r->t_first;
        if (r->truncated)
            out->flags |= SMTP_PAIR_F_TRUNCATED;
    }
}

static void smtp_pairs_tx_reset(struct smtp_pairs *pp)
{
    pp->tx_open = false;
    pp->tx_mail_failed = false;
    pp->tx_rcpt_ok = 0;
    pp->tx_rcpt_rejected = 0;
}

/* Would a failure of cmd fail the transaction or the session? Replies to RSET, NOOP, VRFY,
 * EXPN, HELP, QUIT and unknown verbs do not, nor does an EHLO "not implemented" the client
 * answers with HELO. */
static bool smtp_pairs_counts(enum smtp_cmd cmd, int code)
{
    switch (cmd) {
    case SMTP_CMD_EHLO:
        return code < 500 || code > 504;
    case SMTP_CMD_NONE:
    case SMTP_CMD_HELO:
    case SMTP_CMD_MAIL:
    case SMTP_CMD_RCPT:
    case SMTP_CMD_DATA:
    case SMTP_CMD_BDAT:
    case SMTP_CMD_DOT:
    case SMTP_CMD_AUTH:
    case SMTP_CMD_STARTTLS:
    case SMTP_CMD_XCLIENT:
        return true;
    default:
        return false;
    }
}

/* A failure that only follows from an earlier one in the same transaction. */
static bool smtp_pairs_consequence(const struct smtp_pairs *pp, enum smtp_cmd cmd)
{
    bool payload = cmd == SMTP_CMD_DATA || cmd == SMTP_CMD_BDAT || cmd == SMTP_CMD_DOT;

    if ((payload || cmd == SMTP_CMD_RCPT) && pp->tx_mail_failed)
        return true;
    return payload && pp->tx_rcpt_ok == 0 && pp->tx_rcpt_rejected > 0;
}

/* Flags out as consequence or primary error and records the primary error. */
static void smtp_pairs_judge(struct smtp_pairs *pp, struct smtp_pair *out)
{
    if (out->code < 400)
        return;
    if (out->code != 421 && smtp_pairs_consequence(pp, out->cmd)) {
        out->flags |= SMTP_PAIR_F_CONSEQUENCE;
        return;
    }
    if (out->code != 421 && !smtp_pairs_counts(out->cmd, out->code))
        return;
    /* The client gave up on AUTH itself: the refusal that follows fails nothing. */
    if (out->code != 421 && (out->flags & SMTP_PAIR_F_CANCELLED))
        return;
    if (pp->sum.has_primary)
        return;
    out->flags |= SMTP_PAIR_F_PRIMARY;
    pp->sum.primary = *out;
    pp->sum.has_primary = true;
}

/* Summary and transaction bookkeeping for a matched command. */
static void smtp_pairs_account(struct smtp_pairs *pp, struct smtp_pair *out)
{
    struct smtp_pairs_summary *s = &pp->sum;
    bool ok = out->code >= 200 && out->code < 400;

    if (smtp_cmd_flags(out->cmd) & VERB_ENDS)
        s->quit_answered = true;
    switch (out->cmd) {
    case SMTP_CMD_HELO:
    case SMTP_CMD_EHLO:
    case SMTP_CMD_RSET:
        if (ok)
            smtp_pairs_tx_reset(pp);
        break;
    case SMTP_CMD_MAIL:
        smtp_pairs_tx_reset(pp);
        pp->tx_mail_failed = !ok;
        pp->tx_open = ok;
        break;
    case SMTP_CMD_RCPT:
        if (ok) {
            s->rcpt_ok++;
            pp->tx_rcpt_ok++;
        } else {
            s->rcpt_rejected++;
            pp->tx_rcpt_rejected++;
        }
        break;
    case SMTP_CMD_DOT:
        if (ok)
            s->messages++;
        smtp_pairs_tx_reset(pp);
        break;
    case SMTP_CMD_BDAT:
        if (out->flags & SMTP_PAIR_F_LAST) {
            if (ok)
                s->messages++;
            smtp_pairs_tx_reset(pp);
        }
        break;
    case SMTP_CMD_AUTH:
        if (ok)
            s->auth_ok = true;
        break;
    case SMTP_CMD_STARTTLS:
    case SMTP_CMD_XCLIENT:
        if (out->code == 220) {
            /* A new SMTP session starts: the client must say EHLO again. */
            s->helo[0] = '\0';
            smtp_pairs_tx_reset(pp);
            if (out->cmd == SMTP_CMD_XCLIENT)
                out->flags |= SMTP_PAIR_F_NEW_SESSION;
        }
        break;
    default:
        break;
    }
}

enum smtp_pairs_res smtp_pairs_on_reply(struct smtp_pairs *pp, const struct smtp_reply *r,
                                        struct smtp_pair *out)
{
    struct smtp_pairs_entry e;
    unsigned i = 0;

    if (!pp->greeted) {
        pp->greeted = true;
        smtp_pairs_fill(out, SMTP_PAIR_GREETING, NULL, r);
        smtp_pairs_judge(pp, out);
        return SMTP_PAIRS_GREETING;
    }
    while (i < pp->count && smtp_pairs_at(pp, i)->local != SMTP_LOCAL_NONE)
        i++;
    if (i == pp->count) {
        smtp_pairs_fill(out, SMTP_PAIR_UNSOLICITED, NULL, r);
        if (r->code == 421)
            smtp_pairs_judge(pp, out);
        return SMTP_PAIRS_UNSOLICITED;
    }
    if (smtp_pairs_at(pp, i)->cmd == SMTP_CMD_AUTH && r->code == 334) {
        struct smtp_pairs_entry *a = smtp_pairs_at(pp, i);
        a->rounds++;
        smtp_pairs_fill(out, SMTP_PAIR_COMMAND, a, r);
        return SMTP_PAIRS_INTERMEDIATE;
    }
    smtp_pairs_remove(pp, i, &e);
    smtp_pairs_fill(out, SMTP_PAIR_COMMAND, &e, r);
    smtp_pairs_judge(pp, out);
    smtp_pairs_account(pp, out);
    if (pp->sum.has_primary && (out->flags & SMTP_PAIR_F_PRIMARY))
        pp->sum.primary.flags = out->flags;
    return SMTP_PAIRS_MATCHED;
}

bool smtp_pairs_take_local(struct smtp_pairs *pp, uint64_t now_ns, struct smtp_pair *out)
{
    struct smtp_pairs_entry e;
    const struct smtp_pairs_local_answer *a;

    if (pp->count == 0 || pp->q[pp->head].local == SMTP_LOCAL_NONE)
        return false;
    smtp_pairs_remove(pp, 0, &e);
    if (e.local == SMTP_LOCAL_STARTTLS && pp->tx_open)
        e.local = SMTP_LOCAL_STARTTLS_IN_TX;
    a = &smtp_pairs_local_answers[e.local];
    smtp_pairs_fill(out, SMTP_PAIR_LOCAL, &e, NULL);
    out->code = a->code;
    smtp_pairs_copy(out->esc, sizeof(out->esc) - 1, a->esc, strlen(a->esc));
    out->text_len = smtp_pairs_copy(out->text, SMTP_REPLY_TEXT_MAX, a->text, strlen(a->text));
    out->lines = 1;
    out->t_reply = now_ns;
    if (e.local == SMTP_LOCAL_SMUGGLING) {
        smtp_pairs_judge(pp, out);
        smtp_pairs_tx_reset(pp);
    } else if (e.local == SMTP_LOCAL_NEED_TLS) {
        smtp_pairs_judge(pp, out); /* a refused MAIL fails the transaction */
    } else if (e.local == SMTP_LOCAL_EHLO) {
        smtp_pairs_tx_reset(pp); /* as an accepted EHLO from the server would */
    }
    return true;
}

bool smtp_pairs_abort(struct smtp_pairs *pp, struct smtp_pair *out)
{
    struct smtp_pairs_entry e;

    if (pp->count == 0)
        return false;
    smtp_pairs_remove(pp, 0, &e);
    smtp_pairs_fill(out, SMTP_PAIR_ABORTED, &e, NULL);
    return true;
}

int smtp_pairs_answer_locally(struct smtp_pairs *pp, enum smtp_local local)
{
    if (pp->count == 0)
        return -ENOENT;
    smtp_pairs_at(pp, pp->count - 1)->local = local;
    return 0;
}
