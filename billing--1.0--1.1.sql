/* billing--1.0--1.1.sql: upgrade from 1.0 to 1.1 */

\echo Use "ALTER EXTENSION billing UPDATE TO '1.1'" to load this file. \quit

/*
 * 1.1: DROP EXTENSION billing would destroy the ledger with every table in
 * it, so it is refused unless the session says it means it:
 *
 *     SET billing.allow_drop = on;  DROP EXTENSION billing;
 *
 * An event trigger on ddl_command_start sees the statement before anything
 * is dropped (a trigger at a later event would already be gone with the
 * extension).  It is a guard against accidents, not a security boundary:
 * a superuser can disable event triggers.
 */
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
