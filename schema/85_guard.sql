/* 85_guard: DROP EXTENSION billing is refused unless billing.allow_drop is on */

CREATE FUNCTION billing.guard_drop() RETURNS event_trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tg_tag = 'DROP EXTENSION'
       AND current_query() ~* '\mbilling\M'
       AND coalesce(current_setting('billing.allow_drop', true), 'off') NOT IN ('on', 'true', '1', 'yes') THEN
        RAISE EXCEPTION 'dropping extension billing would destroy the ledger'
            USING ERRCODE = 'ZB021',
                  DETAIL = 'Every account, entry, hold and job is stored in the extension''s tables.',
                  HINT = 'Take a pg_dump first; then SET billing.allow_drop = on in this session and drop it.';
    END IF;
END;
$$;

REVOKE ALL ON FUNCTION billing.guard_drop() FROM PUBLIC;

CREATE EVENT TRIGGER billing_guard_drop ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION billing.guard_drop();

-- the DROP guard, for every way the extension is dropped (see src/guard.c)
CREATE FUNCTION billing.guard_drop_cascade() RETURNS event_trigger
    LANGUAGE C
    AS 'MODULE_PATHNAME', 'billing_guard_drop_cascade';

REVOKE ALL ON FUNCTION billing.guard_drop_cascade() FROM PUBLIC;

COMMENT ON FUNCTION billing.guard_drop_cascade() IS 'loads the library, whose hook refuses any drop of the extension (ZB021) unless billing.allow_drop is on';

CREATE EVENT TRIGGER billing_guard_drop_cascade ON ddl_command_start
    WHEN TAG IN ('DROP ACCESS METHOD', 'DROP AGGREGATE', 'DROP CAST', 'DROP COLLATION',
                 'DROP CONVERSION', 'DROP DOMAIN', 'DROP EXTENSION',
                 'DROP FOREIGN DATA WRAPPER', 'DROP FOREIGN TABLE', 'DROP FUNCTION',
                 'DROP INDEX', 'DROP LANGUAGE', 'DROP MATERIALIZED VIEW', 'DROP OPERATOR',
                 'DROP OPERATOR CLASS', 'DROP OPERATOR FAMILY', 'DROP OWNED', 'DROP POLICY',
                 'DROP PROCEDURE', 'DROP PUBLICATION', 'DROP ROUTINE', 'DROP RULE',
                 'DROP SCHEMA', 'DROP SEQUENCE', 'DROP SERVER', 'DROP STATISTICS',
                 'DROP SUBSCRIPTION', 'DROP TABLE', 'DROP TEXT SEARCH CONFIGURATION',
                 'DROP TEXT SEARCH DICTIONARY', 'DROP TEXT SEARCH PARSER',
                 'DROP TEXT SEARCH TEMPLATE', 'DROP TRANSFORM', 'DROP TRIGGER', 'DROP TYPE',
                 'DROP USER MAPPING', 'DROP VIEW')
    EXECUTE FUNCTION billing.guard_drop_cascade();
