"""proxy.sqltext: statement splitting and statement kinds, checked against PostgreSQL's lexical rules.

split_statements decides what the policy engine sees: the proxy forwards the
original Query text, so if it sees fewer statements than PostgreSQL runs, a
statement reaches the server without ever being decided on. The edge cases
below (non-ASCII identifier characters before $, \r ending a -- comment,
identifier characters before E'...') were each confirmed against a real
PostgreSQL 15 server, where a hidden DROP TABLE ran before they were fixed.
"""

from __future__ import annotations

import pytest

from proxy.session.sqltext import split_statements, statement_type, type_from_tag


class TestSplitBasics:
    @pytest.mark.parametrize(
        "sql,parts",
        [
            ("SELECT 1; SELECT 2", ["SELECT 1", "SELECT 2"]),
            ("SELECT 1;SELECT 2;", ["SELECT 1", "SELECT 2"]),
            ("  SELECT 1 ;\n\n SELECT 2 ;  \n", ["SELECT 1", "SELECT 2"]),
            ("SELECT 1;;;", ["SELECT 1"]),
            (";; ;\n;", []),
            (";SELECT 1", ["SELECT 1"]),
            ("BEGIN; UPDATE t SET a = 1; COMMIT", ["BEGIN", "UPDATE t SET a = 1", "COMMIT"]),
        ],
    )
    def test_plain(self, sql: str, parts: list[str]) -> None:
        assert split_statements(sql) == parts

    @pytest.mark.parametrize(
        "sql,parts",
        [
            ("SELECT 1", ["SELECT 1"]),
            ("  SELECT 1  \n", ["SELECT 1"]),
            ("", []),
            ("   \n\t ", []),
            ("SELECT 'a' || $$b$$ -- c", ["SELECT 'a' || $$b$$ -- c"]),
        ],
    )
    def test_no_semicolon_fast_path(self, sql: str, parts: list[str]) -> None:
        assert split_statements(sql) == parts


class TestSplitStrings:
    def test_semicolon_in_string(self) -> None:
        assert split_statements("SELECT ';'; SELECT 2") == ["SELECT ';'", "SELECT 2"]

    def test_doubled_quote_escape(self) -> None:
        assert split_statements("SELECT 'it''s; ok'; SELECT 2") == ["SELECT 'it''s; ok'", "SELECT 2"]

    def test_only_doubled_quotes(self) -> None:
        assert split_statements("SELECT ''''; SELECT ''';'''") == ["SELECT ''''", "SELECT ''';'''"]

    def test_backslash_is_literal_in_standard_string(self) -> None:
        # standard_conforming_strings=on: 'a\' is a complete string.
        assert split_statements("SELECT 'a\\'; SELECT 2") == ["SELECT 'a\\'", "SELECT 2"]

    @pytest.mark.parametrize("prefix", ["E", "e"])
    def test_e_string_backslash_quote(self, prefix: str) -> None:
        sql = f"SELECT {prefix}'\\''; SELECT 2"
        assert split_statements(sql) == [f"SELECT {prefix}'\\''", "SELECT 2"]

    def test_e_string_escaped_quote_hides_semicolon(self) -> None:
        sql = "SELECT E'\\'; still string'; SELECT 2"
        assert split_statements(sql) == ["SELECT E'\\'; still string'", "SELECT 2"]

    def test_e_string_escaped_backslash_then_quote_ends(self) -> None:
        sql = "SELECT E'a\\\\'; SELECT 2"
        assert split_statements(sql) == ["SELECT E'a\\\\'", "SELECT 2"]

    def test_e_string_doubled_quote(self) -> None:
        assert split_statements("SELECT E'a''b;c'; SELECT 2") == ["SELECT E'a''b;c'", "SELECT 2"]

    def test_e_string_after_paren(self) -> None:
        assert split_statements("SELECT (E'\\';'); SELECT 2") == ["SELECT (E'\\';')", "SELECT 2"]

    @pytest.mark.parametrize("ident", ["name", "xe", "_e", "tablE", "a1e"])
    def test_identifier_ending_in_e_is_not_an_escape_prefix(self, ident: str) -> None:
        # PostgreSQL lexes <ident> then a standard string: the backslash is literal.
        sql = f"SELECT {ident}'\\'; SELECT 2"
        assert split_statements(sql) == [f"SELECT {ident}'\\'", "SELECT 2"]

    def test_unterminated_string_swallows_rest(self) -> None:
        assert split_statements("SELECT 'abc; SELECT 2") == ["SELECT 'abc; SELECT 2"]

    def test_unterminated_e_string_ending_in_backslash(self) -> None:
        assert split_statements("SELECT 1; SELECT E'abc\\") == ["SELECT 1", "SELECT E'abc\\"]

    def test_comment_markers_in_strings(self) -> None:
        assert split_statements("SELECT '--'; SELECT '/*'; SELECT '$$'; SELECT 4") == [
            "SELECT '--'", "SELECT '/*'", "SELECT '$$'", "SELECT 4"
        ]


class TestSplitQuotedIdentifiers:
    def test_semicolon_in_quoted_identifier(self) -> None:
        assert split_statements('SELECT 1 AS "quoted;ident"; SELECT 2') == ['SELECT 1 AS "quoted;ident"', "SELECT 2"]

    def test_doubled_double_quote(self) -> None:
        assert split_statements('SELECT 1 AS "a"";b"; SELECT 2') == ['SELECT 1 AS "a"";b"', "SELECT 2"]

    def test_single_quote_in_identifier(self) -> None:
        assert split_statements('SELECT 1 AS "it\'s"; SELECT 2') == ['SELECT 1 AS "it\'s"', "SELECT 2"]

    def test_unterminated_identifier(self) -> None:
        assert split_statements('SELECT "abc; SELECT 2') == ['SELECT "abc; SELECT 2']


class TestSplitDollarQuotes:
    def test_plain_dollar_quote(self) -> None:
        sql = "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; SELECT 2; $$ LANGUAGE sql; SELECT f()"
        assert split_statements(sql) == [
            "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; SELECT 2; $$ LANGUAGE sql",
            "SELECT f()",
        ]

    def test_tagged_dollar_quote(self) -> None:
        sql = "DO $body$ BEGIN PERFORM 1; RAISE NOTICE 'x;'; END $body$; SELECT 1"
        assert split_statements(sql) == ["DO $body$ BEGIN PERFORM 1; RAISE NOTICE 'x;'; END $body$", "SELECT 1"]

    def test_other_tags_inside_do_not_close(self) -> None:
        sql = "SELECT $a$ x; $b$ y; $$ z; $A$; $a$; SELECT 2"
        assert split_statements(sql) == ["SELECT $a$ x; $b$ y; $$ z; $A$; $a$", "SELECT 2"]

    def test_quote_characters_inside_dollar_quote(self) -> None:
        sql = "SELECT $q$ it's \"; -- /* $q$; SELECT 2"
        assert split_statements(sql) == ["SELECT $q$ it's \"; -- /* $q$", "SELECT 2"]

    def test_tag_with_underscore_and_digits(self) -> None:
        assert split_statements("SELECT $_t1$;$_t1$; SELECT 2") == ["SELECT $_t1$;$_t1$", "SELECT 2"]

    def test_unterminated_dollar_quote(self) -> None:
        assert split_statements("SELECT 1; SELECT $$ abc; def") == ["SELECT 1", "SELECT $$ abc; def"]

    @pytest.mark.parametrize(
        "sql,parts",
        [
            ("SELECT a$b; SELECT 2", ["SELECT a$b", "SELECT 2"]),
            ("SELECT a$b$c FROM t; SELECT 2", ["SELECT a$b$c FROM t", "SELECT 2"]),
            ("SELECT 1 AS x$$; SELECT 2; SELECT 3 AS y$$", ["SELECT 1 AS x$$", "SELECT 2", "SELECT 3 AS y$$"]),
            ("SELECT 1 AS a1$$; SELECT 2", ["SELECT 1 AS a1$$", "SELECT 2"]),
            ("SELECT 1 AS x$$$; SELECT 2; SELECT 3 AS y$$$", ["SELECT 1 AS x$$$", "SELECT 2", "SELECT 3 AS y$$$"]),
            ("SELECT 1 AS _$$; SELECT 2", ["SELECT 1 AS _$$", "SELECT 2"]),
            ("SELECT é$$; SELECT 2", ["SELECT é$$", "SELECT 2"]),
        ],
    )
    def test_dollar_inside_identifier_is_not_a_quote(self, sql: str, parts: list[str]) -> None:
        assert split_statements(sql) == parts

    def test_positional_parameters(self) -> None:
        assert split_statements("SELECT $1; SELECT $2::text") == ["SELECT $1", "SELECT $2::text"]

    @pytest.mark.parametrize("ch", ["€", "😀", "·"])
    def test_dollar_after_non_ascii_identifier_char(self, ch: str) -> None:
        sql = f"SELECT 1 AS x{ch}$$; DROP TABLE t; SELECT 1 AS y{ch}$$"
        assert split_statements(sql) == [f"SELECT 1 AS x{ch}$$", "DROP TABLE t", f"SELECT 1 AS y{ch}$$"]

    def test_dollar_tag_with_astral_char(self) -> None:
        assert split_statements("SELECT $😀$;$😀$; SELECT 2") == ["SELECT $😀$;$😀$", "SELECT 2"]


class TestSplitComments:
    def test_line_comment_hides_semicolon(self) -> None:
        assert split_statements("SELECT 1 -- ; no split\n; SELECT 2") == ["SELECT 1 -- ; no split", "SELECT 2"]

    def test_line_comment_with_quote(self) -> None:
        assert split_statements("-- it's\nSELECT 1; SELECT 2") == ["-- it's\nSELECT 1", "SELECT 2"]

    def test_block_comment_hides_semicolon(self) -> None:
        assert split_statements("SELECT 1 /* ; */; SELECT 2") == ["SELECT 1 /* ; */", "SELECT 2"]

    def test_nested_block_comments(self) -> None:
        sql = "SELECT 1 /* a /* b */ ; */; SELECT 2"
        assert split_statements(sql) == ["SELECT 1 /* a /* b */ ; */", "SELECT 2"]

    def test_deeply_nested_block_comments(self) -> None:
        sql = "SELECT 1 /* 1 /* 2 /* 3 */ ; */ ; */; SELECT 2"
        assert split_statements(sql) == ["SELECT 1 /* 1 /* 2 /* 3 */ ; */ ; */", "SELECT 2"]

    def test_quote_inside_block_comment(self) -> None:
        assert split_statements("SELECT 1 /* it's \" $$ */; SELECT 2") == ["SELECT 1 /* it's \" $$ */", "SELECT 2"]

    def test_unterminated_block_comment(self) -> None:
        assert split_statements("SELECT 1; SELECT 2 /* ; SELECT 3") == ["SELECT 1", "SELECT 2 /* ; SELECT 3"]

    def test_minus_and_slash_operators_do_not_start_comments(self) -> None:
        assert split_statements("SELECT 4 - 1; SELECT 4 / 2; SELECT -1") == ["SELECT 4 - 1", "SELECT 4 / 2", "SELECT -1"]

    def test_comment_between_statements(self) -> None:
        assert split_statements("SELECT 1; /* x */ SELECT 2") == ["SELECT 1", "/* x */ SELECT 2"]

    def test_line_comment_ends_at_carriage_return(self) -> None:
        sql = "SELECT 1 -- c\r; DROP TABLE t; SELECT 2"
        assert split_statements(sql) == ["SELECT 1 -- c", "DROP TABLE t", "SELECT 2"]

    @pytest.mark.parametrize("sql", ["SELECT 1; -- done", "SELECT 1; /* done */", "/* header */; SELECT 1"])
    def test_comment_only_piece_is_empty(self, sql: str) -> None:
        assert split_statements(sql) == ["SELECT 1"]


class TestSplitEscapePrefixEdge:
    @pytest.mark.parametrize("ident", ["a$e", "€e"])
    def test_identifier_char_before_e(self, ident: str) -> None:
        sql = f"SELECT {ident}'\\'; DROP TABLE t; --'"
        # the trailing "--'" is a comment only: PostgreSQL runs two statements
        assert split_statements(sql) == [f"SELECT {ident}'\\'", "DROP TABLE t"]


class TestStatementType:
    @pytest.mark.parametrize(
        "sql,kind",
        [
            ("SELECT 1", "SELECT"),
            ("select 1", "SELECT"),
            ("  \n\tSelect 1", "SELECT"),
            ("(SELECT 1)", "SELECT"),
            ("((  select 1) UNION (select 2))", "SELECT"),
            ("/* x */ with a as (select 1) select * from a", "WITH"),
            ("-- hi\nINSERT INTO t VALUES (1)", "INSERT"),
            ("/* a /* nested */ b */ DELETE FROM t", "DELETE"),
            ("-- one\n-- two\n/* three */ ( update t set a = 1", "UPDATE"),
            ("copy t to stdout", "COPY"),
            ("vacuum_full", "VACUUM_FULL"),
            ("CREATE TABLE t (a int)", "CREATE"),
            ("", ""),
            ("   ", ""),
            ("-- only a comment", ""),
            ("/* unterminated", ""),
            ("123", ""),
            ("'SELECT'", ""),
        ],
    )
    def test_statement_type(self, sql: str, kind: str) -> None:
        assert statement_type(sql) == kind

    def test_comment_ends_at_carriage_return(self) -> None:
        assert statement_type("-- c\rDROP TABLE t") == "DROP"


class TestTypeFromTag:
    @pytest.mark.parametrize(
        "tag,kind",
        [
            ("INSERT 0 3", "INSERT"),
            ("SELECT 5", "SELECT"),
            ("UPDATE 0", "UPDATE"),
            ("COPY 7", "COPY"),
            ("MERGE 2", "MERGE"),
            ("CREATE TABLE", "CREATE TABLE"),
            ("DROP INDEX", "DROP INDEX"),
            ("BEGIN", "BEGIN"),
            ("SELECT", "SELECT"),
            ("", ""),
        ],
    )
    def test_type_from_tag(self, tag: str, kind: str) -> None:
        assert type_from_tag(tag) == kind
