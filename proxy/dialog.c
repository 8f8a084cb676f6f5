/* dialog.c: the protocol-neutral part of a line dialog (see dialog.h). */
#include "dialog.h"

#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "config.h"
#include "log.h"
#include "relay.h"
#include "session_impl.h"
#include "sessview.h"
#include "sockaddr.h"
#include "tls.h"
#include "worker.h"

#define DIALOG_SPARE_KEEP 16 /* spare command FIFOs a worker keeps */

/* A spare FIFO: the header, then the storage. */
struct dialog_spare {
    struct dialog_spare *next;
    size_t size;
    max_align_t data[];
};

bool dialog_needs_tls(const struct session *s, unsigned id)
{
    const struct dialect *dl = dialog_of(s)->dialect;

    return s->cl->require_tls && s->client_tls == NULL &&
           !(verb_flags(dl->verbs, dl->nverbs, id) & VERB_BEFORE_TLS);
}

/* ---- FIFO storage --------------------------------------------------------------------- */

void *dialog_fifo_lend(struct session *s, size_t size)
{
    struct dialog *d = dialog_of(s);
    struct worker *w = s->w;
    struct dialog_spare *f = NULL;

    if (d->fifo != NULL)
        return d->fifo;
    for (struct dialog_spare **pp = &w->dialog_spare; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->size == size) {
            f = *pp;
            *pp = f->next;
            w->dialog_spare_n--;
            break;
        }
    }
    if (f == NULL) {
        f = malloc(sizeof(*f) + size);
        if (f == NULL)
            return NULL;
        f->size = size;
    }
    d->fifo = f->data;
    d->fifo_size = size;
    return d->fifo;
}

void dialog_fifo_return(struct session *s)
{
    struct dialog *d = dialog_of(s);
    struct worker *w = s->w;

    if (d->fifo == NULL)
        return;
    struct dialog_spare *f =
        (struct dialog_spare *)((char *)d->fifo - offsetof(struct dialog_spare, data));
    if (w->dialog_spare_n >= DIALOG_SPARE_KEEP) {
        free(f);
    } else {
        f->next = w->dialog_spare;
        w->dialog_spare = f;
        w->dialog_spare_n++;
    }
    d->fifo = NULL;
}

void dialog_pool_drain(struct worker *w)
{
    while (w->dialog_spare != NULL) {
        struct dialog_spare *f = w->dialog_spare;
        w->dialog_spare = f->next;
        free(f);
    }
    w->dialog_spare_n = 0;
}

void dialog_free(struct session *s)
{
    struct dialog *d = dialog_of(s);

    if (d->held != NULL)
        relay_block_unref(s->up.pool, d->held);
    d->held = NULL;
    dialog_fifo_return(s);
    free(d->carry);
    free(d->sline);
    free(d->tail);
    d->carry = d->sline = d->tail = NULL;
}

/* ---- logging ---------------------------------------------------------------------------- */

bool dialog_logs_pairs(const struct session *s)
{
    return s->transcript != CONFIG_TRANSCRIPT_OFF && log_enabled(LOG_INFO);
}

static void dialog_note_text(char *dst, size_t cap, const char *src, size_t len)
{
    if (len >= cap)
        len = cap - 1;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

void dialog_note_pair(const struct session *s, const struct dialog_pair_note *n)
{
    struct sessview_pair p;

    if (s->view == NULL)
        return;
    if (s->transcript == CONFIG_TRANSCRIPT_OFF) {
        session_view_update(s); /* no pairs in the log, none on the page; the rest moves on */
        return;
    }
    dialog_note_text(p.cmd, sizeof(p.cmd), n->cmd, n->cmd_len);
    dialog_note_text(p.code, sizeof(p.code), n->code, strlen(n->code));
    dialog_note_text(p.reply, sizeof(p.reply), n->reply, n->reply_len);
    p.at_us = (clock_mono_ns() - s->t_accept) / 1000;
    p.ms_us = n->ms_ns / 1000;
    p.flags = n->flags;
    session_view_pair(s, &p);
}

bool dialog_logs_lines(const struct session *s)
{
    return s->transcript == CONFIG_TRANSCRIPT_FULL && log_enabled(LOG_INFO);
}

void dialog_log_line(const struct session *s, const char *dir, const char *text, size_t len,
                     bool cut)
{
    struct log_line l;

    log_begin(&l, LOG_INFO, "line");
    log_sid(&l, s->id);
    log_str(&l, "dir", dir);
    log_ms(&l, "at_ms", clock_mono_ns() - s->t_accept); /* since the session opened */
    log_strn(&l, "text", text, len);
    if (cut)
        log_uint(&l, "cut", 1);
    log_end(&l);
}

void dialog_server_lines(struct session *s, const char *p, size_t len)
{
    struct dialog *d = dialog_of(s);

    if (d->sline == NULL) {
        d->sline = malloc(DIALOG_LINE_LOG_MAX);
        if (d->sline == NULL)
            return;
    }
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '\n') {
            if (d->sline_len < DIALOG_LINE_LOG_MAX)
                d->sline[d->sline_len++] = p[i];
            else
                d->flags |= DIALOG_F_SLINE_CUT;
            continue;
        }
        size_t n = d->sline_len;
        if (n > 0 && d->sline[n - 1] == '\r')
            n--;
        const char *red = d->dialect->redact_server_line != NULL
                              ? d->dialect->redact_server_line(d->sline, n)
                              : NULL;
        if (red != NULL)
            dialog_log_line(s, "server", red, strlen(red), false);
        else
            dialog_log_line(s, "server", d->sline, n, (d->flags & DIALOG_F_SLINE_CUT) != 0);
        d->sline_len = 0;
        d->flags &= ~DIALOG_F_SLINE_CUT;
    }
}

/* ---- client -> backend -------------------------------------------------------------- */

int dialog_out_flush(struct session *s, struct relay_block *b, struct dialog_out *o)
{
    int rc = 0;
    if (o->n > 0 && !session_closing(s) && !(s->flags & SESSION_F_NO_BACKEND))
        rc = relay_send(&s->up, b, o->bufs, o->n);
    o->n = 0;
    return rc;
}

int dialog_out_add(struct session *s, struct relay_block *b, struct dialog_out *o, const char *p,
                   size_t len)
{
    if (o->n > 0 && o->bufs[o->n - 1].base + o->bufs[o->n - 1].len == p) {
        o->bufs[o->n - 1].len += len;
        return 0;
    }
    if (o->n == RELAY_SEND_MAX_BUFS) {
        int rc = dialog_out_flush(s, b, o);
        if (rc != 0)
            return rc;
    }
    o->bufs[o->n++] = uv_buf_init((char *)p, (unsigned)len);
    return 0;
}

void dialog_hold(struct session *s, struct relay_block *b, size_t off, size_t end)
{
    struct dialog *d = dialog_of(s);

    relay_block_ref(b);
    d->held = b;
    d->held_off = off;
    d->held_end = end;
    relay_hold(&s->up);
}

int dialog_carry(struct session *s, const char *p, size_t len)
{
    struct dialog *d = dialog_of(s);

    if (len == 0)
        return 0;
    if (d->carry == NULL) {
        d->carry = malloc(s->cl->max_line_length);
        if (d->carry == NULL)
            return UV_ENOMEM;
    }
    memmove(d->carry, p, len); /* p may already point into carry's old copy */
    s->up.carry = d->carry;
    s->up.carry_len = len;
    return 0;
}

void dialog_carry_done(struct session *s)
{
    struct dialog *d = dialog_of(s);

    if (d->carry != NULL && s->up.carry_len == 0 && d->held == NULL) {
        /* Lines are whole again: a session waiting for its client keeps no
         * carry buffer, while a client trickling one line reuses the same one. */
        free(d->carry);
        d->carry = NULL;
    }
}

struct relay_block *dialog_take_held(struct session *s, size_t *off, size_t *end)
{
    struct dialog *d = dialog_of(s);
    struct relay_block *b = d->held;

    d->held = NULL;
    *off = d->held_off;
    *end = d->held_end;
    return b;
}

void dialog_release(struct session *s)
{
    if (dialog_of(s)->held == NULL && !session_ending(s)) {
        int rc = relay_release(&s->up);
        if (rc != 0)
            session_close(s, SESSION_END_CLIENT_RESET, uv_strerror(rc));
    }
}

void dialog_send_backend(struct session *s, const char *line, size_t len)
{
    if (dialog_logs_lines(s))
        dialog_log_line(s, "proxy", line, len >= 2 ? len - 2 : len, false);
    (void)relay_send_copy(&s->up, line, len); /* a failure closes through on_event */
}

/* ---- backend -> client -------------------------------------------------------------- */

void dialog_flush_down(struct session *s)
{
    struct dialog *d = dialog_of(s);

    if (d->down == NULL || d->down_end <= d->down_start)
        return;
    uv_buf_t buf =
        uv_buf_init(d->down->data + d->down_start, (unsigned)(d->down_end - d->down_start));
    d->down_start = d->down_end;
    (void)relay_send(&s->down, d->down, &buf, 1); /* a failure closes through on_event */
}

void dialog_close_after_flush(struct session *s, enum session_end end, const char *error)
{
    if (!session_ending(s))
        dialog_flush_down(s);
    session_close_after_flush(s, end, error);
}

void dialog_drop_tail(struct session *s)
{
    struct dialog *d = dialog_of(s);

    free(d->tail);
    d->tail = NULL;
    d->tail_len = d->tail_cap = 0;
}

bool dialog_keep_tail(struct session *s, const char *p, size_t n)
{
    struct dialog *d = dialog_of(s);

    if (n == 0)
        return true;
    if (d->tail_len + n > d->tail_cap) {
        size_t cap = d->tail_cap > 0 ? d->tail_cap : 512;
        while (cap < d->tail_len + n)
            cap *= 2;
        char *t = realloc(d->tail, cap);
        if (t == NULL)
            return false;
        d->tail = t;
        d->tail_cap = cap;
    }
    memcpy(d->tail + d->tail_len, p, n);
    d->tail_len += n;
    return true;
}

void dialog_send_tail(struct session *s)
{
    struct dialog *d = dialog_of(s);

    for (size_t off = 0; off < d->tail_len && !session_closing(s);) {
        size_t n = d->tail_len - off < RELAY_BLOCK_SIZE ? d->tail_len - off : RELAY_BLOCK_SIZE;
        if (relay_send_copy(&s->down, d->tail + off, n) != 0)
            break; /* a failure closes through on_event */
        off += n;
    }
    dialog_drop_tail(s);
}

void dialog_say(struct session *s, const char *text)
{
    char line[256];
    int n = snprintf(line, sizeof(line), "%s\r\n", text);

    dialog_flush_down(s);
    if (session_closing(s))
        return;
    if (dialog_logs_lines(s))
        dialog_log_line(s, "proxy", text, strlen(text), false);
    (void)relay_send_copy(&s->down, line, (size_t)n); /* a failure closes through on_event */
}

void dialog_stop(struct session *s)
{
    relay_hold(&s->up); /* nothing the client says can reach anyone now */
    dialog_of(s)->flags |= DIALOG_F_ENDING;
    dialog_drop_tail(s);
}

/* ---- TLS ------------------------------------------------------------------------- */

bool dialog_start_backend_tls(struct session *s, const char **why)
{
    char host[SOCKADDR_TEXT_MAX];

    *why = NULL;
    if (tls_conn_new(&s->backend_tls, s->cl->tls_client,
                     session_backend_name(s, host, sizeof(host))) != 0) {
        session_close(s, SESSION_END_BACKEND_RESET, "out of memory");
        return false;
    }
    session_wire_tls(s);
    int hs = tls_handshake(s->backend_tls); /* the ClientHello */
    relay_tls_flush(&s->up);
    if (hs < 0) {
        *why = tls_error_reason(s->backend_tls);
        if (*why == NULL)
            *why = "TLS failure";
        return false;
    }
    return true;
}

void dialog_log_injection(struct session *s)
{
    struct dialog *d = dialog_of(s);
    struct log_line l;

    if (d->injected > 0 && log_enabled(LOG_WARN)) {
        log_begin(&l, LOG_WARN, "starttls_injection");
        log_sid(&l, s->id);
        log_uint(&l, "bytes", d->injected);
        log_end(&l);
    }
    d->injected = 0;
}

bool dialog_drain_due(struct session *s, size_t owed)
{
    const struct dialog *d = dialog_of(s);

    if (!(d->flags & DIALOG_F_DRAIN) || (d->flags & DIALOG_F_ENDING) || session_ending(s))
        return false;
    if (d->flags & DIALOG_F_OPAQUE) {
        dialog_close_after_flush(s, SESSION_END_DRAIN, NULL);
        return false;
    }
    return owed == 0;
}

bool dialog_start_client_tls(struct session *s)
{
    struct dialog *d = dialog_of(s);

    if (tls_conn_new(&s->client_tls, s->cl->tls_server, NULL) != 0) {
        session_close(s, SESSION_END_CLIENT_RESET, "out of memory");
        return false;
    }
    session_wire_tls(s);
    session_tls_started(s); /* the 5 s handshake limit starts now */
    d->flags |= DIALOG_F_TLS | DIALOG_F_SWITCHED;
    s->up.carry_len = 0; /* forget what the client said in plaintext */
    return true;
}

void dialog_go_opaque(struct session *s, const char *ev)
{
    struct dialog *d = dialog_of(s);
    struct log_line l;

    d->flags |= DIALOG_F_OPAQUE;
    s->up.carry_len = 0; /* bytes after STARTTLS were dropped as injected; keep none */
    /* The backend's EOF is passed on to the client, as in mode tcp. */
    s->down.flags &= ~RELAY_F_NO_FIN;
    relay_kernel_allow(&s->up, (enum relay_kernel)s->cl->kernel_relay);
    if (log_enabled(LOG_INFO)) {
        log_begin(&l, LOG_INFO, ev);
        log_sid(&l, s->id);
        log_end(&l);
    }
}
