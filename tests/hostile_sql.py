"""A seeded generator of lexically hostile statements (issue 11: one meaning).

Each case hides a *payload* (a read of protected data, an export, a write, a call
no role may make) behind a lexical *gadget* that one parser may read differently
from another: block comments nested, unterminated or closed inside strings and
identifiers, ``--`` and ``/*`` inside literals, dollar quotes and their tags,
E'' and U&'' strings with UESCAPE, backslashes under standard_conforming_strings,
operators spelled with ``*`` ``/`` ``-``, numeric literal edges, and CJK text.
Half the cases are built from carriers known to split parsers (the comment
nesting that let every restricted role read everything); the other half insert
random gadgets at random token boundaries of random statements.

Deterministic for a seed: ``cases(seed, n)`` always yields the same texts, so a
failure names its seed and index and reproduces exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

#: What a gadget tries to smuggle: each must be fenced, masked or refused for a restricted role.
PAYLOADS = (
    "SELECT 'LEAK:' || department || ':' || legal_hold::text || ':' || category || ':' || agent || ':' || phone "
    "FROM cs_records LIMIT 3",
    "SELECT 'LEAK:' || id_number || ':' || phone FROM guests LIMIT 3",
    "SELECT phone, id_number FROM cs_records WHERE department <> 'FO' LIMIT 2",
    "COPY (SELECT phone, id_number FROM cs_records LIMIT 2) TO STDOUT",
    "WITH x AS (UPDATE cs_records SET content = content WHERE legal_hold RETURNING 1) SELECT count(*) FROM x",
    "SELECT pg_read_file('/etc/passwd')",
    "SET ROLE postgres",
    "SELECT name, value FROM sys_params ORDER BY name LIMIT 2",
    "SELECT 'LEAK:' || department || ':' || legal_hold::text || ':' || category || ':' || agent || ':' || phone "
    "FROM cs_records_2026_11 LIMIT 2",
)

#: Harmless statements to wrap or to break up.
BASES = (
    "SELECT 1",
    "SELECT 'x' AS a",
    "SELECT count(*) FROM cs_records",
    "SELECT id, category FROM cs_records ORDER BY id LIMIT 2",
    "SELECT relname FROM pg_class WHERE relname = 'cs_records'",
    "SELECT now()",
    "SHOW TimeZone",
    "SET statement_timeout TO 5000",
    "SELECT 1 + 2 * 3 - 4 / 2",
)

#: (opening, closing): text between them hides the payload from one reader or the other.
_PAIRS = (
    ("/*/**/", "*/"), ("/* /* */", "*/"), ("/*", "*/"), ("/**/", ""), ("/*/*/", "*/"), ("/* */ /*", "*/"),
    ("--", "\n"), ("/* -- */", ""), ("/* ' */", "'"), ("/* $$ */", "$$"), ("/*", "*/*/"), ("/**/*/", "*/"),
)
_STRINGS = (
    "'{x}'", "E'{x}'", "e'{x}'", "U&'{x}'", "U&'{x}' UESCAPE '!'", "$${x}$$", "$a${x}$a$", "$_${x}$_$",
    "$ä${x}$ä$", "N'{x}'", "B'{x}'", "X'{x}'", "'{x}' '{x}'", "'{x}'\n'{x}'", "\"{x}\"", "U&\"{x}\"",
)
_INNER = (
    "", "*/", "/*", "--", ";", "''", "\\", "\\'", "\\\\", "$$", "$a$", "\\0027", "!0027", "'' OR ''", "*/ --",
    "前台", "客服记录", "ｱｲｳ", "\\u0027", "%s", "\n", "/* */",
)
_GADGETS = (
    "/*", "*/", "/*/**/", "--", "--\n", "'", "''", "E'\\''", "$$", "$a$", "$1", "$1$", "\\", "\"", "\"\"",
    "*/*", "-/**/-", "*--", "/*--*/", "U&'\\0027'", "UESCAPE '!'", "1_000", "0x1F", "1e", ".5", "5.", "1..2",
    "::", "=>", "~*", "!~~", "@-@", "?|", "#-", ";", "(", ")", "客服", "\t", "\r", "\x0b",
)


@dataclass(frozen=True)
class Case:
    """One hostile statement; ``where`` says how to reproduce it."""

    sql: str
    where: str
    extended: bool


def _carrier(r: random.Random) -> str:
    payload = r.choice(PAYLOADS)
    kind = r.randrange(8)
    if kind == 0:  # the comment pair around a string that ends inside the payload's comment
        open_, close = r.choice(_PAIRS)
        return f"{open_} SELECT '{close} {payload} --'"
    if kind == 1:  # a string (of some kind) whose end the readers may place differently
        s = r.choice(_STRINGS).format(x=r.choice(_INNER))
        return f"SELECT {s} , ({payload}) --'"
    if kind == 2:  # a comment opened in a string and closed outside it
        s = r.choice(_STRINGS).format(x=r.choice(("/*", "*/", "--", "/* */")))
        return f"SELECT {s} /* */ , ({payload}) -- */"
    if kind == 3:  # the payload inside a comment one reader thinks is closed
        open_, close = r.choice(_PAIRS)
        return f"SELECT 1 {open_} , ({payload}) {close}"
    if kind == 4:  # operators made of comment characters
        op = r.choice(("*/", "/*", "-/*", "*-", "/-", "**/", "//*", "-*/", "+/*", "</*", "@/*"))
        return f"SELECT 2 {op} 1 , ({payload}) {r.choice(('*/', '--', ''))}"
    if kind == 5:  # a dollar-quote tag one reader may not see as a tag
        tag = r.choice(("$a$", "$_$", "$1$", "$$", "$a1$", "$ä$", "$A$"))
        glue = r.choice(("", " ", "x", "1", "_"))
        return f"SELECT {glue}{tag} , ({payload}) {tag}"
    if kind == 6:  # a multi-statement text whose split the readers may place differently
        open_, close = r.choice(_PAIRS)
        return f"SELECT 1 {open_}; {payload}; {close} SELECT 2"
    s = r.choice(("'\\' , ", "E'\\' , ", "'\\\\' , ", "E'\\\\' , ", "'a\\'b' , "))
    return f"SELECT {s}({payload}) --'"


def _random(r: random.Random) -> str:
    base = r.choice(BASES + PAYLOADS)
    words = base.split(" ")
    for _ in range(r.randint(1, 3)):
        i = r.randint(0, len(words))
        words.insert(i, r.choice(_GADGETS))
    if r.random() < 0.3:
        words.append(r.choice(("--", "*/", "/*", "'", "$$", ";")))
    sep = r.choice((" ", "", "\n"))
    return sep.join(words) if sep else " ".join(words).replace(" ", r.choice((" ", "  ", "\t")))


def cases(seed: int, n: int) -> Iterator[Case]:
    """``n`` hostile statements for ``seed``, reproducible; about half carriers, half random."""
    r = random.Random(seed)
    for i in range(n):
        sql = _carrier(r) if r.random() < 0.5 else _random(r)
        yield Case(sql=sql, where=f"seed {seed} case {i}", extended=r.random() < 0.4)
