#!/usr/bin/env python3
"""Writes a man page's scdoc source from a template and README.md.

    readme2scd.py README.md TEMPLATE.scd.in OUT.scd [NAME=VALUE ...]

README.md is the one source of the key reference, the command line, the signals and the
log tables: the man pages take them from it at build time, so the two cannot drift. The
template is scdoc with three kinds of extra lines:

    %readme-table HEADING | FIRST-HEADER-CELL   a README table, as a list of entries
    %readme-section HEADING                      a README section in order: paragraphs,
                                                 lists, code blocks, tables as lists
    @NAME@ anywhere                              replaced by VALUE from the command line

HEADING is a README heading line as written (`## Logs`, "### `[global]`"); its section runs
to the next heading of any level. A table is every run of '|' lines in that section whose
header row starts with FIRST-HEADER-CELL; a run without a header row continues the table
before it. Each row becomes an entry: the first cell in bold, the middle cells as
"Header: value" lines, the last cell as the text. Anything the script cannot place (a
missing heading or table, a line roff would take for a request) stops the build.
"""

import re
import sys


def fail(msg):
    sys.exit("readme2scd: " + msg)


def escape(text):
    """Plain text for scdoc: its markup characters taken literally."""
    return re.sub(r"([\\*_])", r"\\\1", text)


def inline(md):
    """One line of README markdown as scdoc: `code` and **strong** become bold."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", md)):
        if i % 2:
            out.append("*" + escape(part[1:-1]) + "*")
        else:
            part = re.sub(r"\*\*(.+?)\*\*", lambda m: "\x00" + m.group(1) + "\x00", part)
            out.append(escape(part).replace("\x00", "*"))
    return "".join(out)


def section(readme, heading):
    lines = readme.split("\n")
    try:
        start = lines.index(heading)
    except ValueError:
        fail("no heading %r in README.md" % heading)
    # A '#' line inside a code block is no heading.
    body, fence = [], False
    for line in lines[start + 1:]:
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("#"):
            break
        body.append(line)
    return body


def split_row(line):
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def is_rule(cells):
    return all(re.fullmatch(r":?-+:?", c) for c in cells)


def tables(body):
    """[(index of its first line, header cells, [row cells])] of a section; a run of '|'
    lines without a header row continues the table before it."""
    out, run = [], []
    for i, line in enumerate(body + [""]):
        if line.startswith("|"):
            run.append(split_row(line))
            continue
        if run:
            if len(run) > 1 and is_rule(run[1]):
                out.append((i - len(run), run[0], run[2:]))
            elif out:
                out[-1][2].extend(run)
            else:
                fail("a table without a header row: %r" % run[0])
            run = []
    return out


def render_rows(header, rows):
    out = []
    for row in rows:
        if len(row) != len(header):
            fail("row %r has %d cells, the header %d" % (row[0], len(row), len(header)))
        body = ["%s: %s" % (h[:1].upper() + h[1:], inline(c))
                for h, c in zip(header[1:-1], row[1:-1])]
        body.append(inline(row[-1]))
        out.append(inline(row[0]) + "\n\t" + "++\n".join(body))
    return "\n\n".join(out)


def render_table(readme, heading, first):
    found = [t for t in tables(section(readme, heading)) if t[1][0] == first]
    if len(found) != 1:
        fail("%d tables whose header starts with %r under %r" % (len(found), first, heading))
    return render_rows(found[0][1], found[0][2])


def render_section(readme, heading):
    """A README section in order: paragraphs, lists and code blocks, each table as a list
    of entries."""
    body = section(readme, heading)
    at = {t[0]: t for t in tables(body)}
    out, fence = [], False
    for i, line in enumerate(body):
        if line.startswith("```"):
            fence = not fence
            out.append("```")
        elif fence:
            out.append(line.replace("\\", "\\\\"))
        elif line.startswith("|"):
            if i in at:
                out += ["", render_rows(at[i][1], at[i][2]), ""]
        elif line.startswith(" "):
            # scdoc indents with tabs only: a list item's next line joins it, other
            # indented text loses its blanks.
            if out and out[-1].strip():
                out[-1] += " " + inline(line.strip())
            else:
                out.append(inline(line.strip()))
        else:
            out.append(inline(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out).strip("\n"))


def main(argv):
    if len(argv) < 4:
        fail("usage: readme2scd.py README.md TEMPLATE.scd.in OUT.scd [NAME=VALUE ...]")
    readme = open(argv[1], encoding="utf-8").read()
    template = open(argv[2], encoding="utf-8").read()
    defs = dict(a.split("=", 1) for a in argv[4:])
    out = []
    for line in template.split("\n"):
        m = re.fullmatch(r"%readme-table (.+?) \| (.+)", line)
        if m:
            out.append(render_table(readme, m.group(1), m.group(2)))
            continue
        m = re.fullmatch(r"%readme-section (.+)", line)
        if m:
            out.append(render_section(readme, m.group(1)))
            continue
        if line.startswith("%"):
            fail("unknown directive %r" % line)
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"@([A-Z_]+)@", lambda m: defs[m.group(1)] if m.group(1) in defs
                  else fail("no value for @%s@" % m.group(1)), text)
    for n, line in enumerate(text.split("\n"), 1):
        if line.lstrip("\t").startswith((".", "'")):
            fail("line %d starts with a roff control character: %r" % (n, line))
    with open(argv[3], "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv)
