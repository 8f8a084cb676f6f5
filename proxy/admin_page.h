/* admin_page.h: the sessions page the admin endpoint serves at GET /. */
#ifndef MXPROXY_ADMIN_PAGE_H
#define MXPROXY_ADMIN_PAGE_H

#include <stddef.h>

/* One self-contained HTML document (inline style and script, no external
 * assets): a table of open and recent sessions polled from /sessions every
 * second, failed ones marked, and the selected session's pairs
 * from /sessions/SID as a transcript with timings. */
extern const char admin_page_html[];
extern const size_t admin_page_html_len;

/* The page's Content-Security-Policy header line, "Content-Security-Policy: ...\r\n": its
 * own inline style and script (named by their SHA-256) and requests to its own origin, nothing
 * else; a value that reached the page as markup despite textContent could not run. Returns the
 * length written to out (NUL-terminated), or 0 when cap is too small or hashing failed. */
size_t admin_page_csp(char *out, size_t cap);

#endif /* MXPROXY_ADMIN_PAGE_H */
