/* xclient.c: Postfix XCLIENT attribute announcements and command lines (see xclient.h). */
#include "xclient.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proxyproto.h"

/* --- attributes ---------------------------------------------------------------------------------
 */

static const struct {
    const char *name;
    unsigned flag;
} xclient_attrs[] = {
    {"ADDR", XCLIENT_F_ADDR},
    {"PORT", XCLIENT_F_PORT},
    {"PROTO", XCLIENT_F_PROTO},
    {"HELO", XCLIENT_F_HELO},
    {"LOGIN", XCLIENT_F_LOGIN},
    {"NAME", XCLIENT_F_NAME},
    {"DESTADDR", XCLIENT_F_DESTADDR},
    {"DESTPORT", XCLIENT_F_DESTPORT},
    {"REVERSE_NAME", XCLIENT_F_REVERSE_NAME},
};

static bool xclient_word_eq(const char *s, size_t n, const char *word)
{
    size_t wl = strlen(word);

    if (n != wl)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        if (c != word[i])
            return false;
    }
    return true;
}

unsigned xclient_parse_caps(const char *list, size_t len)
{
    unsigned caps = 0;
    size_t i = 0;

    while (i < len) {
        while (i < len && (list[i] == ' ' || list[i] == '\t'))
            i++;
        size_t start = i;
        while (i < len && list[i] != ' ' && list[i] != '\t')
            i++;
        for (size_t k = 0; k < sizeof(xclient_attrs) / sizeof(xclient_attrs[0]); k++)
            if (xclient_word_eq(list + start, i - start, xclient_attrs[k].name))
                caps |= xclient_attrs[k].flag;
    }
    return caps;
}

bool xclient_ehlo_line_caps(const char *line, size_t len, unsigned *caps)
{
    size_t i = 0;

    if (len >= 2 && line[len - 2] == '\r' && line[len - 1] == '\n')
        len -= 2;
    if (len >= 4 && line[0] >= '0' && line[0] <= '9' && line[1] >= '0' && line[1] <= '9' &&
        line[2] >= '0' && line[2] <= '9' && (line[3] == '-' || line[3] == ' '))
        i = 4;
    size_t start = i;
    while (i < len && line[i] != ' ' && line[i] != '\t')
        i++;
    if (!xclient_word_eq(line + start, i - start, "XCLIENT"))
        return false;
    *caps = xclient_parse_caps(line + i, len - i);
    return true;
}

/* RFC 1891 xtext of s: '+', '=' and bytes outside 33..126 as "+HH". Writes into out when it is
 * not NULL (the caller has checked the room); returns the encoded length either way. */
static size_t xclient_xtext(char *out, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;

    for (const unsigned char *c = (const unsigned char *)s; *c != '\0'; c++) {
        if (*c < 33 || *c > 126 || *c == '+' || *c == '=') {
            if (out != NULL) {
                out[n] = '+';
                out[n + 1] = hex[*c >> 4];
                out[n + 2] = hex[*c & 15];
            }
            n += 3;
        } else {
            if (out != NULL)
                out[n] = (char)*c;
            n++;
        }
    }
    return n;
}

/* The unencoded value of one attribute into val (64 bytes), or a string from info. Returns
 * NULL to leave the attribute out (PROTO not known yet). */
static const char *xclient_value(unsigned flag, const struct xclient_info *info, char *val)
{
    static const char unavailable[] = "[UNAVAILABLE]";
    const struct sockaddr *sa =
        (flag & (XCLIENT_F_ADDR | XCLIENT_F_PORT)) ? info->addr : info->destaddr;
    char text[PROXYPROTO_ADDR_TEXT_MAX];
    unsigned port;
    bool v6;

    switch (flag) {
    case XCLIENT_F_ADDR:
    case XCLIENT_F_DESTADDR:
        /* An IPv4 client on a dual-stack socket is an IPv4 client to the backend's rules. */
        if (!proxyproto_addr_text(sa, text, &v6, &port))
            return unavailable;
        snprintf(val, 64, "%s%s", v6 ? "IPV6:" : "", text);
        return val;
    case XCLIENT_F_PORT:
    case XCLIENT_F_DESTPORT:
        if (!proxyproto_addr_text(sa, text, &v6, &port))
            return unavailable;
        snprintf(val, 64, "%u", port);
        return val;
    case XCLIENT_F_PROTO:
        if (info->proto == XCLIENT_PROTO_SMTP)
            return "SMTP";
        if (info->proto == XCLIENT_PROTO_ESMTP)
            return "ESMTP";
        return NULL;
    case XCLIENT_F_HELO:
        return info->helo != NULL ? info->helo : unavailable;
    case XCLIENT_F_LOGIN:
        return info->login != NULL ? info->login : unavailable;
    case XCLIENT_F_NAME:
        return info->name != NULL ? info->name : unavailable;
    case XCLIENT_F_REVERSE_NAME:
        return info->reverse_name != NULL ? info->reverse_name : unavailable;
    default:
        abort(); /* only xclient_attrs[] flags reach here */
    }
}

int xclient_format(char *out, size_t cap, unsigned *todo, const struct xclient_info *info)
{
    static const char verb[] = "XCLIENT";
    /* Room for " NAME=value" between the verb and CRLF. */
    const size_t room = XCLIENT_LINE_MAX - (sizeof(verb) - 1) - 2;
    size_t n = sizeof(verb) - 1;
    int written = 0;

    if (cap < XCLIENT_LINE_MAX + 1)
        return -ENOBUFS;
    *todo &= XCLIENT_F_ALL;
    memcpy(out, verb, n);
    for (size_t k = 0; k < sizeof(xclient_attrs) / sizeof(xclient_attrs[0]); k++) {
        unsigned flag = xclient_attrs[k].flag;
        const char *name = xclient_attrs[k].name;
        size_t nl = strlen(name);
        char val[64];

        if (!(*todo & flag))
            continue;
        const char *v = xclient_value(flag, info, val);
        if (v == NULL) {
            *todo &= ~flag;
            continue;
        }
        size_t vl = xclient_xtext(NULL, v);
        if (1 + nl + 1 + vl > room) {
            v = "[UNAVAILABLE]";
            vl = strlen(v);
        }
        if (n + 1 + nl + 1 + vl + 2 > XCLIENT_LINE_MAX)
            continue; /* for the next XCLIENT command; a later, shorter one may still fit */
        out[n++] = ' ';
        memcpy(out + n, name, nl);
        n += nl;
        out[n++] = '=';
        n += xclient_xtext(out + n, v);
        *todo &= ~flag;
        written++;
    }
    if (written == 0)
        return 0;
    memcpy(out + n, "\r\n", 3);
    return (int)(n + 2);
}
