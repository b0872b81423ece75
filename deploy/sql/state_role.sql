-- The login pgwarden keeps its guard state with (lockouts, lookup counts, row budgets), and the schema
-- it owns. A role of its own, apart from the service role client sessions run as: no statement a
-- client sends through pgwarden can then read or reset a counter, whatever the rules let through.
--
-- Run it with psql in the database that holds the state (the hotel database is fine), as a superuser
-- or the database owner:
--
--   psql -d hotel -v state=pgwarden_state -v state_password='...' -f deploy/sql/state_role.sql
--
-- Variables are optional (defaults: role pgwarden_state, schema pgwarden). pgwarden creates the
-- tables in the schema itself (`pgwarden migrate`, or at start). Running it again converges.

\set ON_ERROR_STOP on
\if :{?state}
\else
\set state pgwarden_state
\endif
\if :{?state_schema}
\else
\set state_schema pgwarden
\endif

SELECT format('CREATE ROLE %I LOGIN', :'state')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'state') \gexec

ALTER ROLE :"state" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
\if :{?state_password}
ALTER ROLE :"state" WITH PASSWORD :'state_password';
\endif

-- CONNECT only: the schema is made here, so the role needs no CREATE on the database.
GRANT CONNECT ON DATABASE :"DBNAME" TO :"state";
CREATE SCHEMA IF NOT EXISTS :"state_schema" AUTHORIZATION :"state";
ALTER SCHEMA :"state_schema" OWNER TO :"state";
REVOKE ALL ON SCHEMA :"state_schema" FROM PUBLIC;
