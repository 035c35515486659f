\echo Use "CREATE EXTENSION billing" to load this file. \quit

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
