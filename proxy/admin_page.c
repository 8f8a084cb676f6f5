/* admin_page.c: the sessions page; see admin_page.h. Every value from a
 * session is put in the page with textContent, never parsed as HTML. */
#include "admin_page.h"

#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

const char admin_page_html[] =
    "<!DOCTYPE html>\n"
    "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>mxproxy sessions</title>\n"
    "<style>\n"
    "body{font:13px/1.4 monospace;margin:1em;color:#222}\n"
    "table{border-collapse:collapse;margin-bottom:1em}\n"
    "th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}\n"
    "th{background:#eee}tr.sel{outline:2px solid #36c}tbody tr{cursor:pointer}\n"
    "tr.failed td{background:#fde8e8}tr.failed td.mark{color:#b00;font-weight:bold}\n"
    "tr.open td.mark{color:#070}td.n{text-align:right}\n"
    "#status{color:#666}\n"
    "</style></head><body>\n"
    "<h1>mxproxy sessions</h1>\n"
    "<form id=\"filter\">client <input id=\"client\" size=\"18\" placeholder=\"CIDR\">\n"
    " listener <input id=\"listener\" size=\"12\">\n"
    " <label><input type=\"checkbox\" id=\"error\"> failed only</label>\n"
    " <span id=\"status\">loading</span></form>\n"
    "<h2>Sessions</h2>\n"
    "<table><thead><tr><th></th><th>sid</th><th>listener</th><th>mode</th><th>client</th>"
    "<th>backend</th><th>phase / end</th><th>age s</th><th>up</th><th>down</th><th>tls</th>"
    "<th>helo</th><th>mail_from</th><th>rcpt ok/rej</th><th>primary error</th></tr></thead>\n"
    "<tbody id=\"sessions\"></tbody></table>\n"
    "<h2>Transcript <span id=\"tsid\"></span></h2>\n"
    "<p id=\"tinfo\"></p>\n"
    "<table><thead><tr><th>at ms</th><th>command</th><th>code</th><th>reply</th><th>ms</th>"
    "<th>pipelined</th><th></th></tr></thead>\n"
    "<tbody id=\"transcript\"></tbody></table>\n"
    "<script>\n"
    "'use strict';\n"
    "const POLL_MS = 1000;\n"
    "let selected = location.hash.slice(1);\n"
    "function $(id) { return document.getElementById(id); }\n"
    "function cell(tr, text, cls) {\n"
    "  const td = document.createElement('td');\n"
    "  td.textContent = text === undefined || text === null ? '' : String(text);\n"
    "  if (cls) td.className = cls;\n"
    "  tr.appendChild(td);\n"
    "}\n"
    "function query() {\n"
    "  const q = new URLSearchParams();\n"
    "  if ($('client').value) q.set('client', $('client').value);\n"
    "  if ($('listener').value) q.set('listener', $('listener').value);\n"
    "  if ($('error').checked) q.set('error', '1');\n"
    "  const s = q.toString();\n"
    "  return s ? '?' + s : '';\n"
    "}\n"
    "function row(s, open) {\n"
    "  const tr = document.createElement('tr');\n"
    "  tr.className = (open ? 'open' : 'closed') + (s.failed ? ' failed' : '') +\n"
    "                 (s.sid === selected ? ' sel' : '');\n"
    "  tr.dataset.sid = s.sid;\n"
    "  cell(tr, s.failed ? 'FAILED' : open ? 'open' : '', 'mark');\n"
    "  cell(tr, s.sid);\n"
    "  cell(tr, s.listener);\n"
    "  cell(tr, s.mode);\n"
    "  cell(tr, s.client);\n"
    "  cell(tr, s.backend);\n"
    "  cell(tr, open ? s.phase : s.end + (s.error ? ' (' + s.error + ')' : ''));\n"
    "  cell(tr, (s.age_ms / 1000).toFixed(1), 'n');\n"
    "  cell(tr, s.bytes_up, 'n');\n"
    "  cell(tr, s.bytes_down, 'n');\n"
    "  cell(tr, [s.tls_client, s.tls_backend].map(t => t || '-').join(' | '));\n"
    "  cell(tr, s.helo);\n"
    "  cell(tr, s.mail_from);\n"
    "  cell(tr, s.rcpt_ok === undefined ? '' : s.rcpt_ok + '/' + s.rcpt_rejected);\n"
    "  cell(tr, s.primary_error);\n"
    "  tr.addEventListener('click', () => { selected = s.sid; location.hash = s.sid; poll(); });\n"
    "  return tr;\n"
    "}\n"
    "function transcript(s) {\n"
    "  $('tsid').textContent = s.sid;\n"
    "  $('tinfo').textContent = s.client + ' -> ' + (s.backend || '-') + ', ' +\n"
    "    (s.phase === 'closed' ? 'end ' + s.end : s.phase) +\n"
    "    (s.primary_error ? ', primary error: ' + s.primary_error : '') +\n"
    "    ', pairs ' + s.pairs_total + (s.pairs_dropped ? ' (' + s.pairs_dropped +\n"
    "    ' oldest dropped)' : '');\n"
    "  const body = document.createElement('tbody');\n"
    "  body.id = 'transcript';\n"
    "  for (const p of s.pairs) {\n"
    "    const tr = document.createElement('tr');\n"
    "    if (p.primary) tr.className = 'failed';\n"
    "    cell(tr, p.at_ms.toFixed(1), 'n');\n"
    "    cell(tr, p.cmd);\n"
    "    cell(tr, p.code);\n"
    "    cell(tr, p.reply);\n"
    "    cell(tr, p.ms === null ? '' : p.ms.toFixed(3), 'n');\n"
    "    cell(tr, p.pipelined ? 'yes' : '');\n"
    "    cell(tr, [p.local && 'local', p.aborted && 'aborted', p.primary && 'primary']\n"
    "             .filter(Boolean).join(' '), 'mark');\n"
    "    body.appendChild(tr);\n"
    "  }\n"
    "  $('transcript').replaceWith(body);\n"
    "}\n"
    "async function poll() {\n"
    "  try {\n"
    "    const r = await fetch('sessions' + query(), {cache: 'no-store'});\n"
    "    if (!r.ok) throw new Error('/sessions: ' + r.status);\n"
    "    const d = await r.json();\n"
    "    const body = document.createElement('tbody');\n"
    "    body.id = 'sessions';\n"
    "    if (!selected && (d.open.length || d.recent.length))\n"
    "      selected = (d.open[0] || d.recent[0]).sid;\n"
    "    for (const s of d.open) body.appendChild(row(s, true));\n"
    "    for (const s of d.recent) body.appendChild(row(s, false));\n"
    "    $('sessions').replaceWith(body);\n"
    "    $('status').textContent = d.open.length + ' open, ' + d.recent.length +\n"
    "      ' recent (of ' + d.recent_sessions + ' kept), ' + new Date().toISOString();\n"
    "    if (selected) {\n"
    "      const t = await fetch('sessions/' + selected, {cache: 'no-store'});\n"
    "      if (t.ok) transcript(await t.json());\n"
    "    }\n"
    "  } catch (e) {\n"
    "    $('status').textContent = String(e);\n"
    "  }\n"
    "}\n"
    "$('filter').addEventListener('input', poll);\n"
    "$('filter').addEventListener('submit', e => e.preventDefault());\n"
    "poll();\n"
    "setInterval(poll, POLL_MS);\n"
    "</script></body></html>\n";

const size_t admin_page_html_len = sizeof(admin_page_html) - 1;

/* 'sha256-<base64>' of the text between open and close in the page into out (64 bytes). */
static int admin_page_hash(const char *open, const char *close, char *out)
{
    const char *a = strstr(admin_page_html, open), *b;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;

    if (a == NULL || (b = strstr(a += strlen(open), close)) == NULL ||
        EVP_Digest(a, (size_t)(b - a), md, &md_len, EVP_sha256(), NULL) != 1 || md_len != 32)
        return -1;
    memcpy(out, "'sha256-", 8);
    int n = EVP_EncodeBlock((unsigned char *)out + 8, md, (int)md_len); /* 44 bytes */
    memcpy(out + 8 + n, "'", 2);
    return 0;
}

size_t admin_page_csp(char *out, size_t cap)
{
    char style[64], script[64];

    if (admin_page_hash("<style>", "</style>", style) != 0 ||
        admin_page_hash("<script>", "</script>", script) != 0)
        return 0;
    int n = snprintf(out, cap,
                     "Content-Security-Policy: default-src 'none'; style-src %s; script-src %s; "
                     "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                     "frame-ancestors 'none'\r\n",
                     style, script);
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}
