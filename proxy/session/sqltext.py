"""Cheap facts about SQL text that the relay needs on every statement.

Splitting a multi-statement Query and naming a statement's kind must not
cost a full parse on the hot path; the policy engine parses properly when
rules apply. The scanner knows PostgreSQL's lexical rules for strings
('' and E'\\' escapes), quoted identifiers, dollar quotes and nested comments,
so a ';' inside any of them never splits a statement.
"""

from __future__ import annotations

import re

# PostgreSQL treats every non-ASCII character as an identifier letter.
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\u0080-\U0010ffff][A-Za-z_0-9\u0080-\U0010ffff]*)?\$")
_WORD = re.compile(r"[A-Za-z_]+")
_SPECIAL = re.compile(r"""['"$;/\-]""")
_NEWLINE = re.compile(r"[\r\n]")


def split_statements(sql: str) -> list[str]:
    """The statements of a simple Query, each stripped; empty ones dropped."""
    if ";" not in sql:
        s = sql.strip()
        return [s] if s else []
    out: list[str] = []
    start = 0
    i = 0
    n = len(sql)
    while True:
        m = _SPECIAL.search(sql, i)
        if m is None:
            break
        i = m.start()
        c = sql[i]
        if c == ";":
            piece = sql[start:i].strip()
            if piece and not _only_comments(piece):
                out.append(piece)
            start = i = i + 1
        elif c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _ident_char(sql[i - 2]))
            i = _skip_string(sql, i + 1, escapes)
        elif c == '"':
            j = i + 1
            while True:
                j = sql.find('"', j)
                if j < 0:
                    j = n
                    break
                if j + 1 < n and sql[j + 1] == '"':
                    j += 2
                    continue
                j += 1
                break
            i = j
        elif c == "$":
            prev = sql[i - 1] if i > 0 else " "
            tm = _DOLLAR_TAG.match(sql, i)
            if tm is None or _ident_char(prev):
                i += 1
                continue
            tag = tm.group(0)
            end = sql.find(tag, tm.end())
            i = n if end < 0 else end + len(tag)
        elif c == "-" and sql.startswith("--", i):
            i = _line_end(sql, i)
        elif c == "/" and sql.startswith("/*", i):
            depth = 1
            j = i + 2
            while depth and j < n:
                if sql.startswith("/*", j):
                    depth += 1
                    j += 2
                elif sql.startswith("*/", j):
                    depth -= 1
                    j += 2
                else:
                    j += 1
            i = j
        else:
            i += 1
    tail = sql[start:].strip()
    if tail and not _only_comments(tail):
        out.append(tail)
    return out


def _ident_char(c: str) -> bool:
    """Can c continue an identifier (so a following $ or ' is not a new token)?"""
    return c.isalnum() or c == "_" or c == "$" or ord(c) > 127


def _line_end(sql: str, i: int) -> int:
    """End of a -- comment: PostgreSQL ends it at \n or \r."""
    m = _NEWLINE.search(sql, i)
    return len(sql) if m is None else m.end()


def _only_comments(piece: str) -> bool:
    return skip_space_and_comments(piece, 0, parens=False) >= len(piece)


def _skip_string(sql: str, i: int, escapes: bool) -> int:
    n = len(sql)
    while i < n:
        c = sql[i]
        if escapes and c == "\\":
            i += 2
            continue
        if c == "'":
            if i + 1 < n and sql[i + 1] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return n


def skip_space_and_comments(sql: str, i: int = 0, parens: bool = True) -> int:
    n = len(sql)
    while i < n:
        c = sql[i]
        if c.isspace() or (parens and c == "("):
            i += 1
        elif sql.startswith("--", i):
            i = _line_end(sql, i)
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while depth and i < n:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        else:
            break
    return i


def statement_type(sql: str) -> str:
    """The leading keyword, upper-cased ('SELECT', 'WITH', 'COPY'...), or '' for none."""
    m = _WORD.match(sql, skip_space_and_comments(sql))
    return m.group(0).upper() if m else ""


def type_from_tag(tag: str) -> str:
    """'INSERT 0 3' -> 'INSERT', 'CREATE TABLE' -> 'CREATE TABLE'."""
    words = tag.split(" ")
    while words and words[-1].isdigit():
        words.pop()
    return " ".join(words)
