/* probe.c: PURE. Health check dialogues; see probe.h. */
#include "probe.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What one complete line does to the check. */
enum probe_line {
    PROBE_LINE_MORE = 0, /* not the last line of the reply: read on */
    PROBE_LINE_OK,       /* a positive reply ends here */
    PROBE_LINE_FAIL,     /* a negative or malformed reply; reason is set */
};

typedef enum probe_line (*probe_judge_fn)(struct probe *p, const char *line, size_t len);

static enum probe_line probe_judge_smtp(struct probe *p, const char *line, size_t len);
static enum probe_line probe_judge_pop3(struct probe *p, const char *line, size_t len);
static enum probe_line probe_judge_imap(struct probe *p, const char *line, size_t len);

/* One row per protocol: how its greeting is judged, how a check leaves. */
static const struct probe_row {
    probe_judge_fn greeting; /* a line of the greeting */
    const char *goodbye;     /* sent after a passing greeting check */
} probe_rows[PROBE_PROTO_COUNT_] = {
    [PROBE_SMTP] = {probe_judge_smtp, "QUIT\r\n"},
    [PROBE_POP3] = {probe_judge_pop3, "QUIT\r\n"},
    [PROBE_IMAP] = {probe_judge_imap, "a LOGOUT\r\n"},
};

/* The command each SMTP step ends with, named in reasons. */
static const char *const probe_smtp_steps[] = {"greeting", "EHLO", "QUIT"};

void probe_init(struct probe *p, enum probe_proto proto, bool smtp, const char *ehlo_name)
{
    if ((unsigned)proto >= PROBE_PROTO_COUNT_ || (smtp && proto != PROBE_SMTP))
        abort(); /* a caller's bug: config.c refuses these combinations */
    memset(p, 0, offsetof(struct probe, line));
    p->proto = proto;
    p->smtp = smtp;
    p->ehlo_name = ehlo_name;
    p->line[0] = '\0';
    p->out[0] = '\0';
    p->reason[0] = '\0';
}

static enum probe_line probe_fail(struct probe *p, const char *why)
{
    snprintf(p->reason, sizeof(p->reason), "%s", why);
    return PROBE_LINE_FAIL;
}

/* An SMTP reply line: three digits, then '-' (more lines follow), ' ' or
 * nothing (the last line). Every line of a reply carries the same code. */
static enum probe_line probe_judge_smtp(struct probe *p, const char *line, size_t len)
{
    if (len < 3 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9' ||
        line[2] < '0' || line[2] > '9' || (len > 3 && line[3] != '-' && line[3] != ' '))
        return probe_fail(p, "malformed reply");
    int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    if (p->code != 0 && code != p->code)
        return probe_fail(p, "malformed reply");
    p->code = code;
    if (len > 3 && line[3] == '-')
        return PROBE_LINE_MORE;
    p->code = 0;
    if (code / 100 != 2) {
        snprintf(p->reason, sizeof(p->reason), "%s %d", probe_smtp_steps[p->step], code);
        return PROBE_LINE_FAIL;
    }
    return PROBE_LINE_OK;
}

/* RFC 1939: "+OK" or "-ERR", then a space and text or nothing. */
static enum probe_line probe_judge_pop3(struct probe *p, const char *line, size_t len)
{
    if (len >= 3 && memcmp(line, "+OK", 3) == 0 && (len == 3 || line[3] == ' '))
        return PROBE_LINE_OK;
    if (len >= 4 && memcmp(line, "-ERR", 4) == 0 && (len == 4 || line[4] == ' '))
        return probe_fail(p, "greeting -ERR");
    return probe_fail(p, "malformed greeting");
}

/* RFC 9051 7.1: the greeting is an untagged OK, PREAUTH or BYE. */
static enum probe_line probe_judge_imap(struct probe *p, const char *line, size_t len)
{
    if ((len >= 4 && memcmp(line, "* OK", 4) == 0 && (len == 4 || line[4] == ' ')) ||
        (len >= 9 && memcmp(line, "* PREAUTH", 9) == 0 && (len == 9 || line[9] == ' ')))
        return PROBE_LINE_OK;
    if (len >= 5 && memcmp(line, "* BYE", 5) == 0 && (len == 5 || line[5] == ' '))
        return probe_fail(p, "greeting BYE");
    return probe_fail(p, "malformed greeting");
}

/* A whole line arrived: the verdict of the step, or PROBE_AGAIN. */
static enum probe_status probe_line_done(struct probe *p)
{
    enum probe_line r;

    if (p->skipping) {
        p->skipping = false;
        r = probe_fail(p, "reply line too long");
    } else if (p->step == 0) {
        r = probe_rows[p->proto].greeting(p, p->line, p->len);
    } else {
        r = probe_judge_smtp(p, p->line, p->len);
    }
    p->len = 0;
    if (r == PROBE_LINE_MORE)
        return PROBE_AGAIN;
    if (r == PROBE_LINE_FAIL) {
        p->step = 3;
        return PROBE_FAIL;
    }
    if (!p->smtp || p->step == 2) {
        p->step = 3;
        return PROBE_OK;
    }
    if (p->step == 0)
        snprintf(p->out, sizeof(p->out), "EHLO %.200s\r\n", p->ehlo_name);
    else
        snprintf(p->out, sizeof(p->out), "QUIT\r\n");
    p->step++;
    return PROBE_SEND;
}

enum probe_status probe_feed(struct probe *p, const char *buf, size_t len, size_t *used)
{
    *used = 0;
    if (p->step == 3)
        return p->reason[0] != '\0' ? PROBE_FAIL : PROBE_OK;
    for (size_t i = 0; i < len; i++) {
        char c = buf[i];
        if (c == '\n') {
            if (p->len > 0 && p->line[p->len - 1] == '\r')
                p->len--;
            *used = i + 1;
            enum probe_status st = probe_line_done(p);
            if (st != PROBE_AGAIN)
                return st;
            continue;
        }
        if (p->skipping)
            continue;
        if (p->len == sizeof(p->line)) {
            p->skipping = true; /* judged (failed) at its end, so the reason is exact */
            continue;
        }
        p->line[p->len++] = c;
    }
    *used = len;
    return PROBE_AGAIN;
}

const char *probe_output(const struct probe *p)
{
    return p->out;
}

const char *probe_reason(const struct probe *p)
{
    return p->reason;
}

const char *probe_goodbye(enum probe_proto proto)
{
    return probe_rows[proto].goodbye;
}
