"""rules.model: the YAML rules as typed values, their errors, and what they grant one person."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlglot

from proxy.config import ConfigError, load_yaml_text
from rules.principal import Principal
from rules.grants import StatementKind, Treatment
from rules.model import effective_role, grants_for, load_rules, parse_rules

HOTEL = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "hotel.yaml"


def person(user: str, role: str, dept: str | None = "FO", **attrs: object) -> Principal:
    return Principal(user=user, role=role, department=dept, attributes=dict(attrs))


def rules_from(text: str):
    data, loc = load_yaml_text(text, "r.yaml")
    return parse_rules(data, loc)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        rules_from(text)
    return str(ei.value)


def test_hotel_rules_load_with_every_demo_role() -> None:
    from proxy.demo.run import DEMO_USERS

    rules = load_rules(HOTEL)
    assert {role for role, *_ in DEMO_USERS.values()} <= set(rules.roles)
    assert rules.timezone == "Asia/Shanghai" and [s.name for s in rules.shifts] == ["early", "late", "night"]


def test_training_precondition_falls_back_to_trainee() -> None:
    rules = load_rules(HOTEL)
    role, why = effective_role(rules, person("anna", "front_desk", training_completed=False))
    assert role is not None and role.name == "trainee"
    assert "requires training_completed=True" in why and "using role trainee" in why
    role, why = effective_role(rules, person("alice", "front_desk", training_completed=True))
    assert role is not None and role.name == "front_desk" and why == ""


def test_unknown_role_gets_nothing() -> None:
    grants, why = grants_for(load_rules(HOTEL), person("x", "no_such_role"))
    assert grants is None and "no rules" in why


def test_it_ops_sees_no_personal_tables() -> None:
    grants, _ = grants_for(load_rules(HOTEL), person("carol", "it_ops", "IT"))
    assert grants is not None
    assert set(grants.tables) == {"public.sys_params", "public.fault_logs"}


def test_front_desk_filter_and_masks() -> None:
    grants, _ = grants_for(load_rules(HOTEL), person("alice", "front_desk", training_completed=True))
    assert grants is not None
    g = grants.tables["public.cs_records"]
    sql = g.row_filter.sql(dialect="postgres")
    assert '"department" OPERATOR(pg_catalog.=) \'FO\'' in sql
    assert "pg_catalog.statement_timestamp()" in sql and "now()" not in sql.lower()
    assert '"legal_hold" IS FALSE' in sql
    # every operator in the injected predicate is pinned to pg_catalog
    tree = sqlglot.parse_one(sql, read="postgres")
    assert not list(tree.find_all(sqlglot.exp.GTE, sqlglot.exp.LT, sqlglot.exp.EQ, sqlglot.exp.Sub,
                                  sqlglot.exp.Add, sqlglot.exp.LTE))
    assert {c: r.treatment for c, r in g.columns.items()} == {
        "guest_name": Treatment.MASK, "phone": Treatment.MASK, "id_number": Treatment.MASK,
        "bank_card": Treatment.MASK, "content": Treatment.MASK}
    assert grants.row_cap == 200 and not grants.export


def test_principal_values_are_literals_not_sql() -> None:
    # A department or user name with a quote cannot break out of the predicate.
    grants, _ = grants_for(load_rules(HOTEL), person("o'brien", "account_manager", "X' OR '1'='1"))
    assert grants is not None
    sql = grants.tables["public.guests"].row_filter.sql(dialect="postgres")
    assert sql == '"account_manager" OPERATOR(pg_catalog.=) \'o\'\'brien\''
    reparsed = sqlglot.parse_one(sql, read="postgres")
    assert reparsed.expression.this == "o'brien"


def test_missing_department_means_no_rows() -> None:
    grants, _ = grants_for(load_rules(HOTEL), person("bob", "supervisor", None))
    assert grants is not None
    assert "FALSE" in grants.tables["public.service_ratings"].row_filter.sql(dialect="postgres").upper()


def test_pms_may_insert_and_update_cs_records_only() -> None:
    grants, _ = grants_for(load_rules(HOTEL), person("pms", "pms_integration"))
    assert grants is not None
    assert grants.tables["public.cs_records"].kinds == frozenset({StatementKind.SELECT, StatementKind.INSERT,
                                                                   StatementKind.UPDATE})
    assert StatementKind.INSERT in grants.kinds and StatementKind.DELETE not in grants.kinds


def test_general_manager_unmasked_cs_records_but_masked_guests() -> None:
    grants, _ = grants_for(load_rules(HOTEL), person("dave", "general_manager", None))
    assert grants is not None
    assert grants.tables["public.cs_records"].columns == {}
    assert grants.tables["public.guests"].columns["id_number"].treatment == Treatment.MASK


@pytest.mark.parametrize("text,line,needle", [
    ("timezone: Mars/Base\n", 1, "unknown time zone"),
    ("tables: {}\nroles:\n  r:\n    grants:\n      public.nope: {}\n", 5, "is not classified"),
    ("tables:\n  public.t: {}\nroles:\n  r:\n    grants:\n      public.t:\n        rows: [current_shift]\n",
     6, "needs a time_column"),
    ("tables:\n  public.t: {time_column: c}\nroles:\n  r:\n    grants:\n      public.t:\n"
     "        rows: [{last: soon}]\n", 7, "expected a duration"),
    ("tables:\n  public.t: {}\nroles:\n  r:\n    statements: [select, drop]\n", 5, "unknown statement kind 'drop'"),
    ("tables:\n  public.t: {}\nroles:\n  r:\n    otherwise: ghost\n", 5, "unknown role 'ghost'"),
    ("tables:\n  public.t: {}\nroles:\n  r:\n    grants:\n      public.t:\n        rows:\n"
     "          - sql: \"id IN (SELECT id FROM secrets)\"\n", 8, "may not contain a subquery"),
    ("shifts:\n  a: [\"07:00\", \"07:00\"]\n", 2, "cannot start and end at the same time"),
    ("roles:\n  r:\n    colour: red\n", 3, "unknown key 'colour'"),
])
def test_errors_carry_file_and_line(text: str, line: int, needle: str) -> None:
    msg = error_of(text)
    assert msg.startswith(f"r.yaml:{line}: "), msg
    assert needle in msg


# ---------------------------------------------------------------- include:


def _split_hotel(tmp_path: Path) -> tuple[Path, Path]:
    text = HOTEL.read_text(encoding="utf-8")
    head, roles = text.split("\nroles:\n", 1)
    main, part = tmp_path / "hotel.yaml", tmp_path / "parts" / "roles.yaml"
    part.parent.mkdir()
    main.write_text(head + "\ninclude: [parts/roles.yaml]\n", encoding="utf-8")
    part.write_text("# the roles, kept apart\nroles:\n" + roles, encoding="utf-8")
    return main, part


def test_included_files_merge_into_the_same_rules(tmp_path: Path) -> None:
    main, part = _split_hotel(tmp_path)
    import re

    whole, split = load_rules(HOTEL), load_rules(main)

    def unplaced(x: object) -> str:  # everything but the file:line positions
        return re.sub(r"'[^']*\.yaml:\d+'", "''", repr(x))

    assert split.shifts == whole.shifts and unplaced(split.tables) == unplaced(whole.tables)
    assert unplaced(split.roles) == unplaced(whole.roles) and "front_desk" in split.roles
    assert split.roles["trainee"].where == f"{part.resolve()}:{next(i for i, ln in enumerate(part.read_text().splitlines(), 1) if ln.startswith('  trainee:'))}"
    assert split.sources == (str(main), str(part.resolve()))


def test_errors_in_an_included_file_name_that_file_and_line(tmp_path: Path) -> None:
    main, part = _split_hotel(tmp_path)
    text = part.read_text(encoding="utf-8").replace("    row_cap: 200\n", "    row_cap: -1\n", 1)
    part.write_text(text, encoding="utf-8")
    line = text.splitlines().index("    row_cap: -1") + 1
    with pytest.raises(ConfigError, match=rf"^{part.resolve()}:{line}: row_cap must be a positive"):
        load_rules(main)


@pytest.mark.parametrize("included, needle", [
    ("roles:\n  trainee: {}\n", r"extra.yaml:2: role 'trainee' is already defined at .*/parts/roles.yaml:\d+"),
    ("timezone: UTC\n", r"timezone 'UTC' disagrees with 'Asia/Shanghai' at .*hotel.yaml:6"),
    ("users: {}\n", r"may hold timezone, shifts, tables and roles, not 'users'"),
    ("include: [../hotel.yaml]\n", r"includes itself"),
    ("roles: [a]\n", r"roles must be a mapping"),
])
def test_include_conflicts_are_errors(tmp_path: Path, included: str, needle: str) -> None:
    main, part = _split_hotel(tmp_path)
    extra = tmp_path / "parts" / "extra.yaml"
    extra.write_text(included, encoding="utf-8")
    main.write_text(main.read_text(encoding="utf-8").replace("[parts/roles.yaml]", "[parts/roles.yaml, parts/extra.yaml]"),
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=needle):
        load_rules(main)


def test_missing_include_is_an_error_at_its_line(tmp_path: Path) -> None:
    main = tmp_path / "r.yaml"
    main.write_text("timezone: UTC\ninclude:\n  - nope.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{main}:3: included file 'nope.yaml' does not exist"):
        load_rules(main)
