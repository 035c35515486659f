\echo Use "CREATE EXTENSION billing" to load this file. \quit

-- Every name this script binds is in pg_catalog or qualified.  The schema
-- of the SQL API (public by default) is writable by the database owner, who
-- must not be able to plant a function or operator there (an exact match
-- for a call in this script, such as public.nextval(text) for the defaults'
-- nextval('...')) that defaults, constraints and views would then run for
-- their callers, the SECURITY DEFINER functions and the worker included.
-- CREATE EXTENSION and ALTER EXTENSION restore search_path after the script
-- (a SET LOCAL; a plain SET would outlive it).
SET LOCAL search_path TO pg_catalog, pg_temp;

/*
 * billing: the install script of the current version, built by `make` from
 * the files schema/NN_area.sql in name order (see the Makefile); one file per area.
 *
 * 00_schema: the schema and the small C helpers every area uses.
 *
 * Layout.  Tables, views and composite types live in schema "billing"; the
 * SQL API (billing_* functions) lives in the schema the extension is
 * created in (public by default), so it is callable with the default
 * search_path.  Money is stored as bigint micro-units (columns *_micros)
 * and shown as numeric with scale 6 by the views and functions.
 */

CREATE SCHEMA billing;
COMMENT ON SCHEMA billing IS 'billing extension: ledger tables and reporting views';

CREATE FUNCTION billing.to_amount(micros bigint) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_to_amount'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.to_amount(bigint) IS 'micro-units to an exact numeric amount with scale 6';

-- a sum of micro-units (numeric: the views' sums over many entries may pass
-- bigint's range, which the entries' own amounts never do) to an exact
-- amount with scale 6, like billing.to_amount
CREATE FUNCTION billing.to_amount_sum(micros numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN micros OPERATOR(pg_catalog.*) 0.000001;  -- exact: scale 0 times scale 6 (a division would round)
COMMENT ON FUNCTION billing.to_amount_sum(numeric) IS 'a sum of micro-units to an exact numeric amount with scale 6 (the views)';

CREATE FUNCTION billing.to_micros(amount numeric, argname text DEFAULT 'amount',
                                  allow_zero boolean DEFAULT false) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_to_micros'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.to_micros(numeric, text, boolean) IS 'checked conversion of an amount to micro-units (errors ZB010-ZB013)';

CREATE FUNCTION billing.append_only() RETURNS trigger
    AS 'MODULE_PATHNAME', 'billing_append_only'
    LANGUAGE C;
COMMENT ON FUNCTION billing.append_only() IS 'trigger: refuses UPDATE/DELETE/TRUNCATE (SQLSTATE ZB020)';
REVOKE ALL ON FUNCTION billing.append_only() FROM PUBLIC;

-- the role that asked for a change (the session's role after SET ROLE, not
-- the owner a SECURITY DEFINER function runs as): ledger entries and account
-- events record it
CREATE FUNCTION billing.actor() RETURNS text
    AS 'MODULE_PATHNAME', 'billing_actor_sql'
    LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.actor() IS 'the role that asked for the current call (session role after SET ROLE, not a SECURITY DEFINER owner)';

-- the argument checks of the C functions, for the SQL-level ones: an
-- identifier (no control or invisible characters, 1 to 255 characters), a
-- bounded text, a bounded json object, an event time in the accepted window.
-- NULL passes through; the errors never show the value.
CREATE FUNCTION billing.check_id(value text, argname text, sqlstate text DEFAULT 'ZB018') RETURNS text
    AS 'MODULE_PATHNAME', 'billing_check_id_sql'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.check_id(text, text, text) IS 'an identifier: 1 to 255 characters, no control or invisible characters (else the given SQLSTATE)';

CREATE FUNCTION billing.check_text(value text, argname text, max_chars integer DEFAULT 1000) RETURNS text
    AS 'MODULE_PATHNAME', 'billing_check_text_sql'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.check_text(text, text, integer) IS 'a free-form text of at most max_chars characters (ZB018)';

CREATE FUNCTION billing.check_json(value jsonb, argname text) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'billing_check_json_sql'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.check_json(jsonb, text) IS 'a json object of at most 16384 bytes (ZB018)';

CREATE FUNCTION billing.check_event_at(event_at timestamptz) RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_check_event_at_sql'
    LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.check_event_at(timestamptz) IS 'an event time in the accepted window: billing.event_at_window before now to 5 minutes after (ZB019)';

CREATE FUNCTION billing.show(value text, max_chars integer DEFAULT 64) RETURNS text
    AS 'MODULE_PATHNAME', 'billing_show_sql'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.show(text, integer) IS 'a value quoted for an error message, cut to max_chars characters';
