-- The upstream role pgwarden logs in as: least privilege for the hotel rules (deploy/rules/hotel.yaml).
--
-- Run it with psql in the hotel database, as the tables' owner or a superuser:
--
--   psql -d hotel -v svc=pgwarden_svc -v svc_password='...' -f deploy/sql/service_role.sql
--
-- Both variables are optional (default role name pgwarden_svc; without svc_password set the
-- password later with \password). Running it again converges to the same grants.
--
-- What the role may do, and why:
--   * log in and CONNECT to this database; nothing else at database level (no CREATE, no TEMPORARY,
--     which is also revoked from PUBLIC here);
--   * USAGE on schema public, never CREATE: it owns nothing, so it cannot change or drop a table,
--     and pgwarden's rewritten statements cannot be made to run code it defined;
--   * SELECT on exactly the tables some role in the hotel rules is granted;
--   * INSERT on cs_records (and the id sequence) and UPDATE of its content columns, for the
--     property-management system;
--   * not superuser, no CREATEDB/CREATEROLE/REPLICATION/BYPASSRLS: row security and every grant apply.
-- The rules, not the role, decide which rows and columns each person sees: the role is the ceiling.

\set ON_ERROR_STOP on
\if :{?svc}
\else
\set svc pgwarden_svc
\endif

SELECT format('CREATE ROLE %I LOGIN', :'svc')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'svc') \gexec

ALTER ROLE :"svc" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
\if :{?svc_password}
ALTER ROLE :"svc" WITH PASSWORD :'svc_password';
\endif
-- JIT compiling pgwarden's masked statements can take a minute of CPU (1 s without): off for the service role.
ALTER ROLE :"svc" SET jit = off;

-- Start from nothing in this database, then grant what the rules need.
REVOKE ALL ON DATABASE :"DBNAME" FROM :"svc";
GRANT CONNECT ON DATABASE :"DBNAME" TO :"svc";
REVOKE ALL ON SCHEMA public FROM :"svc";
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"svc";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM :"svc";
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM :"svc";
GRANT USAGE ON SCHEMA public TO :"svc";
-- PUBLIC's defaults would give every role temporary tables here, and before PostgreSQL 15 CREATE in
-- schema public too; nothing pgwarden fronts needs either (hardening for every role in this database).
REVOKE TEMPORARY ON DATABASE :"DBNAME" FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

GRANT SELECT ON
    public.guests, public.cs_records, public.complaint_plans, public.disputes, public.service_ratings,
    public.abnormal_tickets, public.crisis_reports, public.sys_params, public.fault_logs,
    public.training_dialogs, public.keycard_events
TO :"svc";

-- The PMS writes conversation records and updates its own of today (role pms_integration:
-- statements [select, insert, update]). pgwarden holds both to the row filter; here UPDATE is also
-- limited to the record's content columns, so no statement can move a record to another guest,
-- agent or day, or lift a legal hold, whatever the rules say.
GRANT INSERT ON public.cs_records TO :"svc";
GRANT UPDATE (department, category, severity, channel, guest_name, phone, id_number, bank_card, content)
    ON public.cs_records TO :"svc";
GRANT USAGE ON SEQUENCE public.cs_records_id_seq TO :"svc";
