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

#endif /* MXPROXY_ADMIN_PAGE_H */
