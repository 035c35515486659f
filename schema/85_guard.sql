/*
 * 85_guard: dropping the extension (DROP EXTENSION billing, or any cascade
 * that would take it along) is refused unless billing.allow_drop is on.  The
 * check is the library's object_access_hook (src/guard.c), which sees what
 * is really dropped; this event trigger only makes sure the library is
 * loaded for every DROP command.
 */

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
