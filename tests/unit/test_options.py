"""The libpq ``options`` startup parameter, split the way PostgreSQL splits it."""

from __future__ import annotations

import pytest

from proxy.session.startup import LoginError, parse_options, split_options


@pytest.mark.parametrize("raw,words", [
    ("", []),
    ("-c a=1", ["-c", "a=1"]),
    ("  -ca=1\t--b=2  ", ["-ca=1", "--b=2"]),
    (r"-c search_path=my\ schema", ["-c", "search_path=my schema"]),
    (r"-c x=back\\slash", ["-c", r"x=back\slash"]),
    ("-c search_path='a b'", ["-c", "search_path='a", "b'"]),  # no quoting in PostgreSQL's splitter
])
def test_split_like_postgres(raw: str, words: list[str]) -> None:
    assert split_options(raw) == words


def test_parse_pairs_normalises_names() -> None:
    assert parse_options("-c Statement_Timeout=5 --lock-timeout=3 -cpgwarden.ticket=T-1") == [
        ("statement_timeout", "5"), ("lock_timeout", "3"), ("pgwarden.ticket", "T-1")]


@pytest.mark.parametrize("raw,state", [("-X", "42501"), ("--noequals", "08P01"), ("-c", "08P01")])
def test_bad_options(raw: str, state: str) -> None:
    with pytest.raises(LoginError) as ei:
        parse_options(raw)
    assert ei.value.sqlstate == state
