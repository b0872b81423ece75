"""deploy/: what cannot run here (Docker, Kubernetes, systemd) is parsed and checked; the SQL runs for real.

The Kubernetes manifests are validated against the API's own OpenAPI schemas (kubernetes-validate ships
them, strict: an unknown or misspelt field fails); compose and the configs they carry are loaded by
pgwarden's own config loader; the Dockerfile's COPY sources must exist; service_role.sql is applied to the
test cluster, in a database of its own, and the role it makes is tried through psql.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ENV_OVERRIDES, load_yaml_text, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(f.read_text(encoding="utf-8")) if d is not None)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def rules_configmap() -> dict[str, Any]:
    """The ConfigMap kustomize generates from deploy/rules/hotel.yaml (kustomization.yaml)."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    gen = kust["configMapGenerator"][0]
    data = {}
    for spec in gen["files"]:
        key, _, src = spec.partition("=")
        data[key] = (DEPLOY / src).read_text(encoding="utf-8")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "namespace": kust["namespace"], **gen.get("options", {})},
            "data": data}


# --- Kubernetes -----------------------------------------------------------------------------------


def test_k8s_manifests_validate_against_the_kubernetes_schema() -> None:
    import kubernetes_validate as kv  # in the test extra: a missing one is an error, not a skip
    docs = k8s_docs() + [rules_configmap()]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Namespace", "Secret", "Secret", "Secret",
                                               "Service"]
    for d in docs:
        kv.validate(d, K8S_VERSION, strict=True)
    # and a misspelt field is caught (the validation can fail)
    bad = json.loads(json.dumps(by_kind(docs, "Deployment", "pgwarden")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = sorted(kust["resources"])
    assert listed == sorted(f"k8s/{p.name}" for p in (DEPLOY / "k8s").glob("*.yaml"))
    assert kust["namespace"] == "pgwarden"
    assert {d["metadata"].get("namespace", "pgwarden") for d in k8s_docs() if d["kind"] != "Namespace"} == {
        "pgwarden"}


def test_deployment_probes_secrets_and_configmap_fit_together() -> None:
    docs = k8s_docs()
    dep = by_kind(docs, "Deployment", "pgwarden")
    spec = dep["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"postgres": 6432, "metrics": 9187}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # volumes name Secrets and the ConfigMap that exist
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["rules"]["configMap"]["name"] == rules_configmap()["metadata"]["name"]
    for v in ("config", "tls"):
        by_kind(docs, "Secret", vols[v]["secret"]["secretName"])
    assert by_kind(docs, "Secret", "pgwarden-tls")["type"] == "kubernetes.io/tls"
    for ref in c["envFrom"]:
        env = by_kind(docs, "Secret", ref["secretRef"]["name"])["stringData"]
        assert set(env) <= set(ENV_OVERRIDES) | {"PGWARDEN_MASK_SALT"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    # the configuration in the Secret is valid for pgwarden, and its paths are where the volumes are
    text = by_kind(docs, "Secret", "pgwarden-config")["stringData"]["pgwarden.yaml"]
    raw, _ = load_yaml_text(text, "pgwarden-config")
    assert mounts["config"] == c["args"][c["args"].index("--config") + 1] == "/etc/pgwarden/pgwarden.yaml"
    assert raw["tls"] == {"cert": mounts["tls"] + "/tls.crt", "key": mounts["tls"] + "/tls.key"}
    assert raw["rules"] == mounts["rules"] + "/hotel.yaml"
    assert "hotel.yaml" in rules_configmap()["data"]
    assert raw["metrics"]["listen"].endswith(f":{ports['metrics']}")
    assert raw["listen"]["port"] == ports["postgres"]
    assert raw["shutdown_grace"] < pod["terminationGracePeriodSeconds"]
    raw.pop("tls")
    raw["rules"] = str(DEPLOY / "rules" / "hotel.yaml")
    from proxy.config import apply_env

    env = by_kind(docs, "Secret", "pgwarden-upstream")["stringData"]
    cfg = parse_config(apply_env(raw, load_yaml_text(text, "pgwarden-config")[1], env),
                       load_yaml_text(text, "pgwarden-config")[1])
    assert cfg.users["alice"].role == "front_desk"
    assert cfg.state is not None and (cfg.state.user, cfg.state.password) == ("pgwarden_state", "change-me")
    svc = by_kind(docs, "Service", "pgwarden")
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)


# --- docker compose -------------------------------------------------------------------------------


def test_compose_file_services_mounts_and_config() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) == {"postgres", "seed", "grants", "pgwarden"}
    pw = services["pgwarden"]
    assert (DEPLOY / pw["build"]["context"] / pw["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    mounts = {}
    for v in pw["volumes"]:
        src, dst, *_ = v.split(":")
        if src.startswith("."):
            assert (DEPLOY / src).exists(), src
        mounts[dst] = src
    assert "/readyz" in " ".join(pw["healthcheck"]["test"])
    assert set(pw["environment"]) <= set(ENV_OVERRIDES) | {"PGWARDEN_MASK_SALT"}
    # the configuration pgwarden gets, with the environment compose gives it
    cfg_src = DEPLOY / mounts["/etc/pgwarden/pgwarden.yaml"]
    raw, loc = load_yaml_text(cfg_src.read_text(encoding="utf-8"), str(cfg_src))
    assert raw["rules"].startswith("/etc/pgwarden/rules/")
    assert (DEPLOY / mounts["/etc/pgwarden/rules"] / Path(raw["rules"]).name).is_file()
    raw["rules"] = str(DEPLOY / "rules" / Path(raw["rules"]).name)
    from proxy.config import apply_env

    cfg = parse_config(apply_env(raw, loc, {k: str(v) for k, v in pw["environment"].items()}), loc)
    assert (cfg.upstream.host, cfg.upstream.password) == ("postgres", "demo-service-password")
    assert cfg.state is not None and (cfg.state.host, cfg.state.user, cfg.state.password) == (
        "postgres", "pgwarden_state", "demo-state-password")
    assert cfg.metrics_listen == ("0.0.0.0", 9187)
    assert f"{cfg.metrics_listen[1]}:{cfg.metrics_listen[1]}" in pw["ports"]
    assert cfg.users["pms"].method == "md5"
    # the one-shot services: seed, then the least-privileged role, then pgwarden
    assert services["grants"]["depends_on"] == {"seed": {"condition": "service_completed_successfully"}}
    assert pw["depends_on"] == {"grants": {"condition": "service_completed_successfully"}}
    grants_cmd = services["grants"]["command"][0]
    assert "/sql/service_role.sql" in grants_cmd and "./sql:/sql:ro" in services["grants"]["volumes"]
    assert "/sql/state_role.sql" in grants_cmd
    assert "grant_to=None" in services["seed"]["command"][0]  # no broad grants from the sample loader


# --- Dockerfile, systemd --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    out = []
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_what_exists_and_runs_unprivileged() -> None:
    ins = dockerfile()
    assert ins[0][0] == "FROM" and re.fullmatch(r"python:3\.1[1-9]-slim", ins[0][1])
    copies = [shlex.split(rest) for word, rest in ins if word == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for s in sources:
            assert (ROOT / s).exists(), f"COPY source {s} missing"
    # the package's own directories are all copied
    copied = {s for *sources, _ in copies for s in sources}
    assert {"pyproject.toml", "proxy", "rules", "masking"} <= copied
    users = [rest for word, rest in ins if word == "USER"]
    assert users == ["10001:10001"]
    assert ("ENTRYPOINT", '["pgwarden"]') in ins
    assert ("CMD", '["serve", "--config", "/etc/pgwarden/pgwarden.yaml"]') in ins
    assert ("STOPSIGNAL", "SIGTERM") in ins


def test_systemd_unit_reloads_drains_and_runs_unprivileged() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "pgwarden.service").read_text(encoding="utf-8"))
    svc = unit["Service"]
    assert svc["User"] == "pgwarden" and svc["Group"] == "pgwarden"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # only the main process gets SIGTERM: workers must not get a second one from systemd (that stops at once)
    assert svc["KillMode"] == "mixed" and svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) > 30  # longer than the default shutdown_grace
    argv = shlex.split(svc["ExecStart"])
    assert argv[1:4] == ["serve", "--config", "/etc/pgwarden/pgwarden.yaml"] and "--workers" in argv
    assert svc["NoNewPrivileges"] == "true" and svc["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# --- the least-privileged service role, for real ----------------------------------------------------

ROLE = "pgwarden_role_check"
ROLE_PASSWORD = "role-check-pw"
DB = "service_role_check"


def role_psql(cluster: Any, sql: str) -> subprocess.CompletedProcess[str]:
    """psql over TCP, logged in as the role service_role.sql made."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = ROLE_PASSWORD
    return subprocess.run([shutil.which("psql") or "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                           f"host=127.0.0.1 port={cluster.port} dbname={DB} user={ROLE} sslmode=disable",
                           "-c", sql], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def role_db(cluster: Any) -> Any:
    cluster.psql(f"DROP DATABASE IF EXISTS {DB};\nCREATE DATABASE {DB};", database="postgres")
    schema = (ROOT / "proxy" / "demo" / "schema.sql").read_text(encoding="utf-8")
    cluster.psql(schema, database=DB)
    cluster.psql("CREATE TABLE cs_records_all PARTITION OF cs_records DEFAULT;\n"
                 "INSERT INTO guests (name, id_number, phone, account_manager, region) "
                 "VALUES ('张三', '110101199003070000', '13800000000', 'erin', 'east');\n"
                 "INSERT INTO cs_records (guest_id, department, category, channel, agent, content) "
                 "SELECT 1, 'FO', 'consultation', 'phone', 'pms', 'n' || g FROM generate_series(1, 3) g;",
                 database=DB)
    # the script as a DBA runs it (psql -v svc=... -v svc_password=... -f service_role.sql)
    script = (DEPLOY / "sql" / "service_role.sql").read_text(encoding="utf-8")
    cluster.psql(f"\\set svc {ROLE}\n\\set svc_password {ROLE_PASSWORD}\n" + script, database=DB)
    try:
        yield cluster
    finally:
        cluster.psql(f"DROP DATABASE IF EXISTS {DB};", database="postgres")
        cluster.psql(f"DROP OWNED BY {ROLE} CASCADE;", database="hotel")
        cluster.psql(f"DROP ROLE IF EXISTS {ROLE};", database="postgres")


def test_service_role_reads_and_inserts_only_what_the_rules_need(role_db: Any) -> None:
    c = role_db
    r = role_psql(c, "SELECT count(*) FROM cs_records")
    assert (r.returncode, r.stdout) == (0, "3\n"), r.stderr
    r = role_psql(c, "INSERT INTO cs_records (guest_id, department, category, channel, agent, content) "
                     "VALUES (1, 'FO', 'request', 'phone', 'pms', 'towels') RETURNING id")
    assert r.returncode == 0, r.stderr
    assert role_psql(c, "SELECT count(*) FROM cs_records").stdout == "4\n"
    assert role_psql(c, "SELECT count(*) FROM guests").stdout == "1\n"
    # the PMS's UPDATE of a record's content (pgwarden holds it to its own rows of today)
    r = role_psql(c, "UPDATE cs_records SET content = 'towels delivered' WHERE content = 'towels'")
    assert (r.returncode, r.stdout) == (0, "UPDATE 1\n"), r.stderr
    denied = {
        "UPDATE cs_records SET agent = 'x'": "permission denied for table cs_records",
        "UPDATE cs_records SET legal_hold = true": "permission denied for table cs_records",
        "UPDATE cs_records SET created_at = now()": "permission denied for table cs_records",
        "UPDATE guests SET phone = 'x'": "permission denied for table guests",
        "DELETE FROM cs_records": "permission denied for table cs_records",
        "TRUNCATE cs_records": "permission denied for table cs_records",
        "INSERT INTO guests (name, id_number, phone, account_manager, region) VALUES ('a','b','c','d','east')":
            "permission denied for table guests",
        "CREATE TABLE public.mine (id int)": "permission denied for schema public",
        "CREATE SCHEMA mine": f"permission denied for database {DB}",
        "CREATE TEMP TABLE scratch (id int)": "permission denied to create temporary tables in database",
        "ALTER TABLE cs_records ADD COLUMN x int": "must be owner of table cs_records",
        "DROP TABLE guests": "must be owner of table guests",
        "SELECT count(*) FROM cs_records_all": "permission denied for table cs_records_all",
    }
    for sql, message in denied.items():
        r = role_psql(c, sql)
        assert r.returncode != 0 and message in r.stderr, (sql, r.stderr)
    r = role_psql(c, f"SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls FROM pg_roles "
                     f"WHERE rolname = '{ROLE}'")
    assert r.stdout == "f|f|f|f|f\n"
    r = role_psql(c, f"SELECT count(*) FROM pg_class WHERE relowner = '{ROLE}'::regrole")
    assert r.stdout == "0\n"
    # the grants are exactly the hotel tables' SELECT plus INSERT on cs_records (UPDATE is per column)
    r = role_psql(c, "SELECT table_name || ':' || string_agg(privilege_type, ',' ORDER BY privilege_type) "
                     f"FROM information_schema.role_table_grants WHERE grantee = '{ROLE}' "
                     "GROUP BY table_name ORDER BY table_name")
    assert r.stdout.split() == [
        "abnormal_tickets:SELECT", "complaint_plans:SELECT", "crisis_reports:SELECT", "cs_records:INSERT,SELECT",
        "disputes:SELECT", "fault_logs:SELECT", "guests:SELECT", "keycard_events:SELECT", "service_ratings:SELECT",
        "sys_params:SELECT", "training_dialogs:SELECT"]


def test_service_role_covers_every_table_the_hotel_rules_grant() -> None:
    from rules.model import load_rules

    rules = load_rules(DEPLOY / "rules" / "hotel.yaml")
    granted = {t for g in rules.roles.values() for t in g.grants}
    sql = (DEPLOY / "sql" / "service_role.sql").read_text(encoding="utf-8")
    select = re.search(r"GRANT SELECT ON(.*?)TO", sql, re.S)
    assert select is not None
    listed = {t.strip() for t in select.group(1).split(",")}
    assert granted <= listed, granted - listed
    # every table some role may write is writable by the service role (and no other)
    writers = {t for g in rules.roles.values() for t, tg in g.grants.items()
               if {"insert", "update", "delete"} & {k.value for k in tg.kinds}}
    assert writers == {"public.cs_records"}, writers
    deleters = {t for g in rules.roles.values() for t, tg in g.grants.items() if "delete" in {k.value for k in tg.kinds}}
    assert deleters == set() and "DELETE" not in sql.upper()  # no role deletes, so the service role may not


def test_state_role_owns_the_guard_schema_and_the_service_role_cannot_reach_it(cluster: Any, tmp_path: Path) -> None:
    """deploy/sql/state_role.sql as a DBA runs it, then `pgwarden migrate` as that role."""
    import json
    import sys

    from proxy.verifiers import make_scram_verifier

    db, role, pw = "state_role_check", "pgw_state_check", "state-check-pw"
    cluster.psql(f"DROP DATABASE IF EXISTS {db};\nCREATE DATABASE {db};", database="postgres")
    try:
        script = (DEPLOY / "sql" / "state_role.sql").read_text(encoding="utf-8")
        for _ in range(2):  # running it again converges
            cluster.psql(f"\\set state {role}\n\\set state_password {pw}\n" + script, database=db)
        owner = cluster.psql("SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'pgwarden'", database=db)
        assert owner.strip() == role
        has_create = cluster.psql(f"SELECT has_database_privilege('{role}', '{db}', 'CREATE')", database=db)
        assert has_create.strip() == "f"
        cfg = tmp_path / "state-check.yaml"
        cfg.write_text(json.dumps({
            "upstream": {"host": cluster.host, "port": cluster.port, "user": cluster.service_user},
            "state": {"host": cluster.host, "port": cluster.port, "database": db, "user": role, "password": pw,
                      "sslmode": "disable"},
            "users": {"x": {"role": "r", "password": make_scram_verifier("x")}}}))
        run = [sys.executable, "-m", "proxy.cli", "migrate", "--config", str(cfg)]
        first = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0 and "applied [1, 2, 3, 4]" in first.stdout, first.stderr
        again = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "up to date (version 4)" in again.stdout, again.stderr
        tables = cluster.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
                              "WHERE schemaname = 'pgwarden'", database=db)
        assert tables.strip() == ("audit_anchors,emergencies,guest_lookups,lockouts,refusal_streaks,row_usage,"
                                  "schema_migrations,"
                                  "ticket_decisions,tickets")
        denied = cluster.psql(f"SELECT has_schema_privilege('{cluster.service_user}', 'pgwarden', 'USAGE')",
                              database=db)
        assert denied.strip() == "f"
    finally:
        cluster.psql(f"DROP DATABASE IF EXISTS {db};", database="postgres")
        cluster.psql(f"DROP ROLE IF EXISTS {role};", database="postgres")
