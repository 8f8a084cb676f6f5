/* imap_pairs.c: PURE response-to-command matching by tag (see imap_pairs.h). */
#include "imap_pairs.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static_assert(IMAP_TAG_MAX <= 255 && IMAP_TEXT_MAX <= 255, "entry lengths are unsigned chars");

static const struct imap_pairs_local_answer {
    enum imap_status status;
    const char *text;
    const char *cmd_text; /* what the log shows in place of the line; NULL: the command's */
} imap_pairs_local_answers[] = {
    [IMAP_LOCAL_NONE] = {IMAP_ST_NONE, "", ""},
    [IMAP_LOCAL_TOO_LONG] = {IMAP_ST_BAD, "Line too long", "[line too long]"},
    [IMAP_LOCAL_INVALID] = {IMAP_ST_BAD, "Bare CR or LF or NUL in command line", "[invalid line]"},
    [IMAP_LOCAL_STARTTLS] = {IMAP_ST_OK, "Begin TLS negotiation now", NULL},
    [IMAP_LOCAL_TLS_ACTIVE] = {IMAP_ST_BAD, "TLS already active", NULL},
    [IMAP_LOCAL_NEED_TLS] = {IMAP_ST_NO, "[PRIVACYREQUIRED] TLS required", NULL},
};

void imap_pairs_attach(struct imap_pairs *pp, struct imap_pairs_entry *q)
{
    if (pp->q == NULL) {
        pp->q = q;
        memset(q, 0, IMAP_PAIRS_CAP * sizeof(*q));
        pp->count = 0;
        pp->has_current = false;
    }
}

struct imap_pairs_entry *imap_pairs_detach(struct imap_pairs *pp)
{
    struct imap_pairs_entry *q = pp->q;

    if (q == NULL || pp->count > 0)
        return NULL;
    pp->q = NULL;
    pp->has_current = false;
    return q;
}

size_t imap_pairs_room(const struct imap_pairs *pp)
{
    return pp->q != NULL ? IMAP_PAIRS_CAP - pp->count : 0;
}

size_t imap_pairs_outstanding(const struct imap_pairs *pp)
{
    return pp->count;
}

const struct imap_pairs_summary *imap_pairs_summary(const struct imap_pairs *pp)
{
    return &pp->sum;
}

static size_t imap_pairs_copy(char *dst, size_t max, const char *s, size_t n)
{
    if (n > max)
        n = max;
    if (n > 0)
        memcpy(dst, s, n);
    dst[n] = '\0';
    return n;
}

/* The oldest used slot, or NULL. */
static struct imap_pairs_entry *imap_pairs_oldest(struct imap_pairs *pp)
{
    struct imap_pairs_entry *best = NULL;

    if (pp->q == NULL)
        return NULL;
    for (unsigned i = 0; i < IMAP_PAIRS_CAP; i++)
        if (pp->q[i].used && (best == NULL || pp->q[i].seq < best->seq))
            best = &pp->q[i];
    return best;
}

static struct imap_pairs_entry *imap_pairs_newest(struct imap_pairs *pp)
{
    return pp->has_current && pp->q != NULL && pp->q[pp->current].used ? &pp->q[pp->current] : NULL;
}

static struct imap_pairs_entry *imap_pairs_push(struct imap_pairs *pp, const struct imap_event *ev,
                                                uint64_t now_ns)
{
    struct imap_pairs_entry *e = NULL;
    unsigned slot = 0;

    for (unsigned i = 0; i < IMAP_PAIRS_CAP; i++) {
        if (!pp->q[i].used) {
            e = &pp->q[i];
            slot = i;
            break;
        }
    }
    assert(e != NULL);
    memset(e, 0, sizeof(*e));
    e->used = true;
    e->cmd = ev->cmd;
    e->seq = pp->seq++;
    e->t_cmd = now_ns;
    e->untagged_at = pp->untagged;
    if (pp->count > 0)
        e->flags |= IMAP_PAIR_F_PIPELINED;
    if (ev->tag != NULL) {
        e->tag_len = (unsigned char)(ev->tag_len < IMAP_TAG_MAX ? ev->tag_len : IMAP_TAG_MAX);
        memcpy(e->tag, ev->tag, e->tag_len);
    }
    pp->count++;
    pp->current = slot;
    pp->has_current = true;
    return e;
}

/* The command's text as far as ev gives it (BEGIN and PART: so far; COMMAND: whole). */
static void imap_pairs_note_text(struct imap_pairs_entry *e, const struct imap_event *ev)
{
    if (ev->text != NULL) {
        e->text_len = (unsigned char)(ev->text_len < IMAP_TEXT_MAX ? ev->text_len : IMAP_TEXT_MAX);
        memcpy(e->text, ev->text, e->text_len);
    }
}

static void imap_pairs_complete(struct imap_pairs *pp, struct imap_pairs_entry *e,
                                const struct imap_event *ev, uint64_t now_ns)
{
    imap_pairs_note_text(e, ev);
    e->size = ev->size;
    e->t_cmd = now_ns;
    e->complete = true;
    if (imap_cmd_flags(ev->cmd) & VERB_ENDS)
        pp->sum.logout_sent = true;
}

int imap_pairs_on_client_event(struct imap_pairs *pp, const struct imap_event *ev, uint64_t now_ns)
{
    struct imap_pairs_entry *e;
    enum imap_local local = IMAP_LOCAL_INVALID;

    switch (ev->type) {
    case IMAP_EV_BEGIN:
        if (ev->flags & IMAP_EV_F_NO_TAG)
            return 0;
        if (imap_pairs_room(pp) == 0)
            return -ENOBUFS;
        imap_pairs_note_text(imap_pairs_push(pp, ev, now_ns), ev);
        return 0;
    case IMAP_EV_PART:
        e = imap_pairs_newest(pp);
        if (e != NULL && !e->complete)
            imap_pairs_note_text(e, ev);
        return 0;
    case IMAP_EV_COMMAND:
        if (ev->flags & IMAP_EV_F_NO_TAG)
            return 0;
        if (ev->flags & IMAP_EV_F_CONTINUED) {
            /* The server may have refused the command before its end (a literal it did not
             * want): then there is nothing left to complete. */
            e = imap_pairs_newest(pp);
            if (e != NULL && !e->complete)
                imap_pairs_complete(pp, e, ev, now_ns);
            return 0;
        }
        if (imap_pairs_room(pp) == 0)
            return -ENOBUFS;
        imap_pairs_complete(pp, imap_pairs_push(pp, ev, now_ns), ev, now_ns);
        return 0;
    case IMAP_EV_AUTH_RESPONSE:
        e = imap_pairs_newest(pp);
        if ((ev->flags & IMAP_EV_F_CANCEL) && e != NULL && e->cmd == IMAP_CMD_AUTHENTICATE)
            e->flags |= IMAP_PAIR_F_CANCELLED;
        return 0;
    case IMAP_EV_TOO_LONG:
        local = IMAP_LOCAL_TOO_LONG;
        /* fallthrough */
    case IMAP_EV_INVALID:
        if (ev->flags & IMAP_EV_F_CANCEL) {
            e = imap_pairs_newest(pp);
            if (e != NULL && e->cmd == IMAP_CMD_AUTHENTICATE)
                e->flags |= IMAP_PAIR_F_CANCELLED;
            return 0;
        }
        if (ev->flags & IMAP_EV_F_MIDCMD) {
            /* Cut short: the command as far as it went, for its aborted pair. */
            e = imap_pairs_newest(pp);
            if (e != NULL && !e->complete && ev->text != NULL) {
                imap_pairs_note_text(e, ev);
                e->size = ev->size;
            }
            return 0;
        }
        if (imap_pairs_room(pp) == 0)
            return -ENOBUFS;
        e = imap_pairs_push(pp, ev, now_ns);
        e->cmd = IMAP_CMD_NONE;
        e->local = local;
        e->complete = true;
        return 0;
    default:
        return 0;
    }
}

int imap_pairs_answer_locally(struct imap_pairs *pp, enum imap_local local)
{
    struct imap_pairs_entry *e = imap_pairs_newest(pp);

    if (e == NULL)
        return -ENOENT;
    e->local = local;
    e->complete = true; /* a command refused at a synchronizing literal ends there */
    return 0;
}

/* Moves entry e into *out (kind and status are the caller's) and frees its slot. */
static void imap_pairs_pop(struct imap_pairs *pp, struct imap_pairs_entry *e, struct imap_pair *out)
{
    out->cmd = e->cmd;
    out->local = e->local;
    out->tag_len = imap_pairs_copy(out->tag, IMAP_TAG_MAX, e->tag, e->tag_len);
    out->cmd_text_len = imap_pairs_copy(out->cmd_text, IMAP_TEXT_MAX, e->text, e->text_len);
    out->untagged = (unsigned)(pp->untagged - e->untagged_at);
    out->rounds = e->rounds;
    out->size = e->size;
    out->flags = e->flags;
    out->t_cmd = e->t_cmd;
    if (pp->has_current && &pp->q[pp->current] == e)
        pp->has_current = false;
    e->used = false;
    pp->count--;
}

static void imap_pairs_set_reply(struct imap_pair *out, const struct imap_resp *r)
{
    out->status = r->status;
    out->text_len = imap_pairs_copy(out->text, IMAP_TEXT_MAX, r->text, r->text_len);
    imap_pairs_copy(out->code, IMAP_KEYWORD_MAX, r->code, strlen(r->code));
    if (r->truncated)
        out->flags |= IMAP_PAIR_F_TRUNCATED;
    out->t_reply = r->t_first;
}

static void imap_pairs_primary(struct imap_pairs *pp, struct imap_pair *out)
{
    if (pp->sum.has_primary)
        return;
    out->flags |= IMAP_PAIR_F_PRIMARY;
    pp->sum.has_primary = true;
    pp->sum.primary = *out;
}

enum imap_pairs_res imap_pairs_on_response(struct imap_pairs *pp, const struct imap_resp *r,
                                           struct imap_pair *out)
{
    struct imap_pairs_entry *e = NULL;

    memset(out, 0, sizeof(*out));
    switch (r->kind) {
    case IMAP_RESP_GARBAGE:
        out->kind = IMAP_PAIR_UNSOLICITED;
        imap_pairs_set_reply(out, r);
        return IMAP_PAIRS_GARBAGE;
    case IMAP_RESP_CONTINUE:
        e = imap_pairs_newest(pp);
        if (e != NULL) {
            out->cmd = e->cmd;
            if (e->cmd == IMAP_CMD_AUTHENTICATE)
                e->rounds++;
        }
        imap_pairs_set_reply(out, r);
        return IMAP_PAIRS_CONTINUE;
    case IMAP_RESP_UNTAGGED:
        imap_pairs_set_reply(out, r);
        if (!pp->greeted) {
            pp->greeted = true;
            out->kind = IMAP_PAIR_GREETING;
            out->tag[0] = '*';
            out->tag[1] = '\0';
            out->tag_len = 1;
            if (r->status == IMAP_ST_PREAUTH)
                pp->sum.auth_ok = true;
            if (r->status == IMAP_ST_BYE) {
                pp->sum.bye_seen = true;
                imap_pairs_primary(pp, out);
            }
            return IMAP_PAIRS_GREETING;
        }
        pp->untagged++;
        if (r->status == IMAP_ST_BYE) {
            pp->sum.bye_seen = true;
            if (!pp->sum.logout_sent) {
                out->kind = IMAP_PAIR_UNSOLICITED;
                out->tag[0] = '*';
                out->tag[1] = '\0';
                out->tag_len = 1;
                imap_pairs_primary(pp, out);
            }
        }
        return IMAP_PAIRS_UNTAGGED;
    case IMAP_RESP_TAGGED:
        break;
    }
    if (pp->q != NULL) {
        for (unsigned i = 0; i < IMAP_PAIRS_CAP; i++) {
            struct imap_pairs_entry *c = &pp->q[i];
            if (c->used && c->local == IMAP_LOCAL_NONE && c->tag_len == r->tag_len &&
                memcmp(c->tag, r->tag, r->tag_len) == 0 && (e == NULL || c->seq < e->seq))
                e = c;
        }
    }
    if (e == NULL) {
        out->kind = IMAP_PAIR_UNSOLICITED;
        out->tag_len = imap_pairs_copy(out->tag, IMAP_TAG_MAX, r->tag, r->tag_len);
        imap_pairs_set_reply(out, r);
        return IMAP_PAIRS_UNSOLICITED;
    }
    out->kind = IMAP_PAIR_COMMAND;
    imap_pairs_pop(pp, e, out);
    imap_pairs_set_reply(out, r);
    if (imap_cmd_flags(out->cmd) & VERB_ENDS)
        pp->sum.logout_answered = true;
    if ((out->cmd == IMAP_CMD_LOGIN || out->cmd == IMAP_CMD_AUTHENTICATE) &&
        r->status == IMAP_ST_OK)
        pp->sum.auth_ok = true;
    if ((r->status == IMAP_ST_NO || r->status == IMAP_ST_BAD) &&
        !(out->flags & IMAP_PAIR_F_CANCELLED))
        imap_pairs_primary(pp, out);
    return IMAP_PAIRS_MATCHED;
}

bool imap_pairs_take_local(struct imap_pairs *pp, uint64_t now_ns, struct imap_pair *out)
{
    struct imap_pairs_entry *e = imap_pairs_oldest(pp);
    const struct imap_pairs_local_answer *a;

    if (e == NULL || e->local == IMAP_LOCAL_NONE || !e->complete)
        return false;
    memset(out, 0, sizeof(*out));
    out->kind = IMAP_PAIR_LOCAL;
    imap_pairs_pop(pp, e, out);
    a = &imap_pairs_local_answers[out->local];
    out->status = a->status;
    out->text_len = imap_pairs_copy(out->text, IMAP_TEXT_MAX, a->text, strlen(a->text));
    if (a->cmd_text != NULL)
        out->cmd_text_len =
            imap_pairs_copy(out->cmd_text, IMAP_TEXT_MAX, a->cmd_text, strlen(a->cmd_text));
    out->t_reply = now_ns;
    return true;
}

bool imap_pairs_abort(struct imap_pairs *pp, struct imap_pair *out)
{
    struct imap_pairs_entry *e = imap_pairs_oldest(pp);

    if (e == NULL)
        return false;
    memset(out, 0, sizeof(*out));
    out->kind = IMAP_PAIR_ABORTED;
    imap_pairs_pop(pp, e, out);
    return true;
}

ssize_t imap_pairs_local_line(const struct imap_pair *pair, char *out, size_t cap)
{
    int n = snprintf(out, cap, "%s %s %s\r\n", pair->tag_len > 0 ? pair->tag : "*",
                     imap_status_name(pair->status), pair->text);

    if (n < 0 || (size_t)n >= cap)
        return -1;
    return n;
}
