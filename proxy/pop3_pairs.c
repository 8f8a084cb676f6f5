/* pop3_pairs.c: PURE response-to-command matching (see pop3_pairs.h for the contract). */
#include "pop3_pairs.h"

#include <assert.h>
#include <errno.h>
#include <string.h>

static_assert(POP3_PAIRS_TEXT_MAX <= 255, "entry text_len is an unsigned char");
static_assert(sizeof("AUTH ") - 1 + 20 + sizeof(" [redacted]") - 1 < POP3_PAIRS_TEXT_MAX,
              "room for a redacted AUTH line");

static const char pop3_pairs_redacted[] = " [redacted]";

static const struct pop3_pairs_local_answer {
    enum pop3_status status;
    const char *text;
    const char *cmd_text; /* what the log shows in place of the line; NULL: the command's */
} pop3_pairs_local_answers[] = {
    [POP3_LOCAL_NONE] = {POP3_STATUS_NONE, "", ""},
    [POP3_LOCAL_TOO_LONG] = {POP3_STATUS_ERR, "Line too long", "[line too long]"},
    [POP3_LOCAL_INVALID] = {POP3_STATUS_ERR, "Syntax error, bare CR or LF in command",
                            "[invalid line]"},
    [POP3_LOCAL_STLS] = {POP3_STATUS_OK, "Begin TLS negotiation now", NULL},
    [POP3_LOCAL_NEED_TLS] = {POP3_STATUS_ERR, "Must issue a STLS command first", NULL},
    [POP3_LOCAL_TLS_ACTIVE] = {POP3_STATUS_ERR, "TLS already active", NULL},
    [POP3_LOCAL_XCLIENT] = {POP3_STATUS_ERR, "Command not permitted", NULL},
    [POP3_LOCAL_STLS_AUTHED] = {POP3_STATUS_ERR, "STLS not permitted after authentication", NULL},
};

size_t pop3_pairs_room(const struct pop3_pairs *pp)
{
    return pp->q != NULL ? POP3_PAIRS_CAP - pp->count : 0;
}

void pop3_pairs_attach(struct pop3_pairs *pp, struct pop3_pairs_entry *q)
{
    if (pp->q == NULL) {
        pp->q = q;
        pp->head = 0;
    }
}

struct pop3_pairs_entry *pop3_pairs_detach(struct pop3_pairs *pp)
{
    struct pop3_pairs_entry *q = pp->q;

    if (q == NULL || pp->count > 0)
        return NULL;
    pp->q = NULL;
    pp->head = 0;
    return q;
}

size_t pop3_pairs_outstanding(const struct pop3_pairs *pp)
{
    return pp->count;
}

static struct pop3_pairs_entry *pop3_pairs_at(const struct pop3_pairs *pp, unsigned i)
{
    return &pp->q[(pp->head + i) % POP3_PAIRS_CAP];
}

enum pop3_cmd pop3_pairs_oldest(const struct pop3_pairs *pp)
{
    return pp->count > 0 ? pp->q[pp->head].cmd : POP3_CMD_NONE;
}

/* Index of the oldest entry the server answers, or pp->count when there is none. */
static unsigned pop3_pairs_first_remote(const struct pop3_pairs *pp)
{
    unsigned i = 0;

    while (i < pp->count && pop3_pairs_at(pp, i)->local != POP3_LOCAL_NONE)
        i++;
    return i;
}

enum pop3_frame pop3_pairs_frame(const struct pop3_pairs *pp)
{
    unsigned i;

    if (!pp->greeted)
        return POP3_FRAME_SINGLE;
    i = pop3_pairs_first_remote(pp);
    return i < pp->count ? pop3_pairs_at(pp, i)->frame : POP3_FRAME_SINGLE;
}

bool pop3_pairs_authenticated(const struct pop3_pairs *pp)
{
    return pp->sum.authenticated;
}

const struct pop3_pairs_summary *pop3_pairs_summary(const struct pop3_pairs *pp)
{
    return &pp->sum;
}

/* Copies at most max bytes of s[0, n) into dst, NUL-terminates it, returns the length. */
static size_t pop3_pairs_copy(char *dst, size_t max, const char *s, size_t n)
{
    if (n > max)
        n = max;
    if (n > 0)
        memcpy(dst, s, n);
    dst[n] = '\0';
    return n;
}

/* Appends a new entry; the caller checked for room. */
static struct pop3_pairs_entry *pop3_pairs_push(struct pop3_pairs *pp, enum pop3_cmd cmd,
                                                uint64_t now_ns)
{
    struct pop3_pairs_entry *e = pop3_pairs_at(pp, pp->count);

    memset(e, 0, sizeof(*e));
    e->cmd = cmd;
    e->t_cmd = now_ns;
    if (pp->count > 0)
        e->flags |= POP3_PAIR_F_PIPELINED;
    pp->count++;
    return e;
}

static void pop3_pairs_set_text(struct pop3_pairs_entry *e, const char *s, size_t n)
{
    if (n > POP3_PAIRS_TEXT_MAX)
        n = POP3_PAIRS_TEXT_MAX;
    if (n > 0)
        memcpy(e->text, s, n);
    e->text_len = (unsigned char)n;
}

/* The newest entry when it is cmd, else NULL. */
static struct pop3_pairs_entry *pop3_pairs_newest(struct pop3_pairs *pp, enum pop3_cmd cmd)
{
    struct pop3_pairs_entry *e;

    if (pp->count == 0)
        return NULL;
    e = pop3_pairs_at(pp, pp->count - 1);
    return e->cmd == cmd ? e : NULL;
}

static void pop3_pairs_command(struct pop3_pairs *pp, const struct pop3_event *ev,
                               struct pop3_pairs_entry *e)
{
    e->frame = ev->frame;
    if (ev->flags & POP3_EV_F_REDACTED) {
        /* ev->line stops before the credential; the marker stands for it. */
        size_t room = POP3_PAIRS_TEXT_MAX - (sizeof(pop3_pairs_redacted) - 1);
        size_t n = ev->line_len < room ? ev->line_len : room;
        pop3_pairs_set_text(e, ev->line, n);
        memcpy(e->text + n, pop3_pairs_redacted, sizeof(pop3_pairs_redacted) - 1);
        e->text_len = (unsigned char)(n + sizeof(pop3_pairs_redacted) - 1);
    } else {
        pop3_pairs_set_text(e, ev->line, ev->line_len);
    }
    if (pop3_cmd_flags(ev->cmd) & VERB_ENDS)
        pp->sum.quit_sent = true;
}

int pop3_pairs_on_client_event(struct pop3_pairs *pp, const struct pop3_event *ev, uint64_t now_ns)
{
    struct pop3_pairs_entry *e;
    enum pop3_local local;

    switch (ev->type) {
    case POP3_EV_COMMAND:
        if (pop3_pairs_room(pp) == 0)
            return -ENOBUFS;
        pop3_pairs_command(pp, ev, pop3_pairs_push(pp, ev->cmd, now_ns));
        return 0;
    case POP3_EV_TOO_LONG:
    case POP3_EV_INVALID:
    case POP3_EV_AUTH_RESPONSE:
        if (ev->flags & POP3_EV_F_CANCEL) {
            e = pop3_pairs_newest(pp, POP3_CMD_AUTH);
            if (e != NULL)
                e->flags |= POP3_PAIR_F_CANCELLED;
            return 0;
        }
        if (ev->type == POP3_EV_AUTH_RESPONSE)
            return 0;
        local = ev->type == POP3_EV_TOO_LONG ? POP3_LOCAL_TOO_LONG : POP3_LOCAL_INVALID;
        if (pop3_pairs_room(pp) == 0)
            return -ENOBUFS;
        e = pop3_pairs_push(pp, POP3_CMD_NONE, now_ns);
        e->local = local;
        pop3_pairs_set_text(e, pop3_pairs_local_answers[local].cmd_text,
                            strlen(pop3_pairs_local_answers[local].cmd_text));
        return 0;
    default:
        return 0;
    }
}

/* Removes entry i (0 = oldest) into *e; entries before it keep their order. */
static void pop3_pairs_remove(struct pop3_pairs *pp, unsigned i, struct pop3_pairs_entry *e)
{
    *e = *pop3_pairs_at(pp, i);
    for (; i > 0; i--)
        *pop3_pairs_at(pp, i) = *pop3_pairs_at(pp, i - 1);
    pp->head = (pp->head + 1) % POP3_PAIRS_CAP;
    pp->count--;
}

static void pop3_pairs_fill(struct pop3_pair *out, enum pop3_pair_kind kind,
                            const struct pop3_pairs_entry *e, const struct pop3_response *r)
{
    memset(out, 0, sizeof(*out));
    out->kind = kind;
    if (e != NULL) {
        out->cmd = e->cmd;
        out->local = e->local;
        out->cmd_text_len =
            pop3_pairs_copy(out->cmd_text, POP3_PAIRS_TEXT_MAX, e->text, e->text_len);
        out->flags = e->flags;
        out->rounds = e->rounds;
        out->t_cmd = e->t_cmd;
    }
    if (r != NULL) {
        out->status = r->status;
        out->text_len = pop3_pairs_copy(out->text, POP3_TEXT_MAX, r->text, r->text_len);
        out->t_reply = r->t_first;
        if (r->truncated)
            out->flags |= POP3_PAIR_F_TRUNCATED;
        if (r->multi) {
            out->flags |= POP3_PAIR_F_MULTI;
            out->lines = r->lines;
            out->size = r->size;
        }
    }
}

/* Would a -ERR to cmd fail something the client wanted? Not for CAPA, LIST, UIDL, NOOP, RSET,
 * UTF8, LANG and unknown commands: clients probe with those and carry on. */
static bool pop3_pairs_counts(enum pop3_cmd cmd)
{
    switch (cmd) {
    case POP3_CMD_NONE:
    case POP3_CMD_USER:
    case POP3_CMD_PASS:
    case POP3_CMD_APOP:
    case POP3_CMD_AUTH:
    case POP3_CMD_STLS:
    case POP3_CMD_QUIT:
    case POP3_CMD_STAT:
    case POP3_CMD_RETR:
    case POP3_CMD_TOP:
    case POP3_CMD_DELE:
    case POP3_CMD_XCLIENT:
        return true;
    default:
        return false;
    }
}

/* Flags out as the primary error and records it, if it is the first failure that counts. */
static void pop3_pairs_judge(struct pop3_pairs *pp, struct pop3_pair *out)
{
    if (out->status != POP3_STATUS_ERR || !pop3_pairs_counts(out->cmd))
        return;
    /* The client gave up on AUTH itself: the refusal that follows fails nothing. */
    if (out->flags & POP3_PAIR_F_CANCELLED)
        return;
    if (pp->sum.has_primary)
        return;
    out->flags |= POP3_PAIR_F_PRIMARY;
    pp->sum.primary = *out;
    pp->sum.has_primary = true;
}

/* Summary bookkeeping for a matched command. */
static void pop3_pairs_account(struct pop3_pairs *pp, const struct pop3_pair *out)
{
    struct pop3_pairs_summary *s = &pp->sum;
    bool ok = out->status == POP3_STATUS_OK;

    if (pop3_cmd_flags(out->cmd) & VERB_ENDS)
        s->quit_answered = true;
    switch (out->cmd) {
    case POP3_CMD_PASS:
    case POP3_CMD_APOP:
        if (ok)
            s->authenticated = true;
        break;
    case POP3_CMD_AUTH:
        /* A bare AUTH lists mechanisms; only an exchange logs in. */
        if (ok && !(out->flags & POP3_PAIR_F_MULTI))
            s->authenticated = true;
        break;
    case POP3_CMD_RETR:
        if (ok) {
            s->retrieved++;
            s->retrieved_octets += out->size;
        }
        break;
    case POP3_CMD_DELE:
        if (ok)
            s->deleted++;
        break;
    default:
        break;
    }
}

enum pop3_pairs_res pop3_pairs_on_response(struct pop3_pairs *pp, const struct pop3_response *r,
                                           struct pop3_pair *out)
{
    struct pop3_pairs_entry e;
    unsigned i;

    if (!pp->greeted) {
        pp->greeted = true;
        pop3_pairs_fill(out, POP3_PAIR_GREETING, NULL, r);
        pop3_pairs_judge(pp, out);
        return POP3_PAIRS_GREETING;
    }
    i = pop3_pairs_first_remote(pp);
    if (i == pp->count) {
        pop3_pairs_fill(out, POP3_PAIR_UNSOLICITED, NULL, r);
        pop3_pairs_judge(pp, out);
        return POP3_PAIRS_UNSOLICITED;
    }
    if (r->status == POP3_STATUS_CONT) {
        struct pop3_pairs_entry *a = pop3_pairs_at(pp, i);
        a->rounds++;
        pop3_pairs_fill(out, POP3_PAIR_COMMAND, a, r);
        return POP3_PAIRS_INTERMEDIATE;
    }
    pop3_pairs_remove(pp, i, &e);
    pop3_pairs_fill(out, POP3_PAIR_COMMAND, &e, r);
    pop3_pairs_judge(pp, out);
    pop3_pairs_account(pp, out);
    return POP3_PAIRS_MATCHED;
}

bool pop3_pairs_take_local(struct pop3_pairs *pp, uint64_t now_ns, struct pop3_pair *out)
{
    struct pop3_pairs_entry e;
    const struct pop3_pairs_local_answer *a;

    if (pp->count == 0 || pp->q[pp->head].local == POP3_LOCAL_NONE)
        return false;
    pop3_pairs_remove(pp, 0, &e);
    if (e.local == POP3_LOCAL_STLS && pp->sum.authenticated)
        e.local = POP3_LOCAL_STLS_AUTHED;
    a = &pop3_pairs_local_answers[e.local];
    pop3_pairs_fill(out, POP3_PAIR_LOCAL, &e, NULL);
    out->status = a->status;
    out->text_len = pop3_pairs_copy(out->text, POP3_TEXT_MAX, a->text, strlen(a->text));
    out->t_reply = now_ns;
    if (e.local == POP3_LOCAL_NEED_TLS)
        pop3_pairs_judge(pp, out); /* a refused login fails the session */
    return true;
}

bool pop3_pairs_abort(struct pop3_pairs *pp, struct pop3_pair *out)
{
    struct pop3_pairs_entry e;

    if (pp->count == 0)
        return false;
    pop3_pairs_remove(pp, 0, &e);
    pop3_pairs_fill(out, POP3_PAIR_ABORTED, &e, NULL);
    return true;
}

int pop3_pairs_answer_locally(struct pop3_pairs *pp, enum pop3_local local)
{
    if (pp->count == 0)
        return -ENOENT;
    pop3_pairs_at(pp, pp->count - 1)->local = local;
    return 0;
}
