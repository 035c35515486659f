/* billing--1.2--1.3.sql: upgrade from 1.2 to 1.3 */

\echo Use "ALTER EXTENSION billing UPDATE TO '1.3'" to load this file. \quit

/*
 * 1.3: the background worker's hold expiry skips accounts that someone
 * else holds locked (a long transaction, a session idle in transaction).
 *
 * billing.expire_due_holds() waited for each account's row lock; the worker
 * runs it between pushes, so one account locked for minutes stopped the
 * Redis mirror of every tenant for minutes.  Now the due accounts are
 * locked with SKIP LOCKED: a locked one is left for the next round (its
 * holds stop counting at expires_at all the same; only their status and
 * the account's cache wait).  The worker also runs maintenance with a
 * lock_timeout, after the pushes, for the locks this does not cover.
 *
 * 1.3 also closes two holes found in review:
 *
 * - The DROP guard (1.1) saw only DROP EXTENSION billing.  DROP SCHEMA
 *   public CASCADE (the extension depends on its install schema), DROP OWNED
 *   BY <its owner>, DROP EXTENSION plpgsql CASCADE... dropped the
 *   extension, and the ledger with it, unguarded.  An sql_drop event trigger
 *   cannot help (one that belongs to the extension is already gone when the
 *   extension is dropped), so the library checks the drop itself: an
 *   object_access_hook (src/guard.c) refuses every drop of the extension,
 *   by whatever command, with ZB021 unless billing.allow_drop is on.  The
 *   event trigger billing_guard_drop_cascade calls a C function of the
 *   library at the start of every DROP command, so that the hook is loaded
 *   also without shared_preload_libraries.
 *
 * - An account time zone may no longer be an abbreviation (IST, PST, CET,
 *   EST...): AT TIME ZONE looks a name up in timezone_abbreviations before
 *   the tz database, so its meaning depended on the session's setting (IST
 *   is Israel in the Default set, India in the India set; EST is -05 in
 *   Default, +10 in Australia).  Only names of pg_timezone_names are taken,
 *   minus those that are also abbreviations with an offset (CET, EET, EST,
 *   HST, MET, MST, WET); UTC, GMT, UCT and Zulu mean UTC either way.
 *   Accounts that already have such a zone keep it.
 *
 * - billing.usage_by_model showed the captures of a hold under model NULL
 *   when the model was given to billing_hold (the streaming flow) and not
 *   repeated on each capture; a capture now takes its hold's model and
 *   provider when it names none.
 */
CREATE OR REPLACE FUNCTION billing.expire_due_holds(max_accounts integer DEFAULT 1000) RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
    n integer := 0;
BEGIN
    FOR t IN SELECT a.tenant_id FROM billing.accounts a
              WHERE a.holds_next_expiry <= now()
              ORDER BY a.holds_next_expiry
              LIMIT max_accounts
              FOR UPDATE SKIP LOCKED
    LOOP
        IF billing.expire_holds_of(t) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END;
$$;
COMMENT ON FUNCTION billing.expire_due_holds(integer) IS 'expire due holds of accounts nobody else has locked (the worker runs it; correctness never depends on it)';

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

-- account time zones: names of the tz database only, no abbreviations
CREATE FUNCTION billing.known_zone_file(zone text) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF position('/' IN zone) > 0 THEN
        PERFORM now() AT TIME ZONE zone;
        RETURN true;
    END IF;
    RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names n WHERE lower(n.name) = lower(zone));
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END;
$$;
REVOKE ALL ON FUNCTION billing.known_zone_file(text) FROM PUBLIC;
COMMENT ON FUNCTION billing.known_zone_file(text) IS 'is this (pattern-checked) name a zone of the tz database? (for billing.check_account_settings)';

CREATE OR REPLACE FUNCTION billing.check_account_settings(tenant_id text, currency text,
                                                          status text, timezone text,
                                                          metadata jsonb)
    RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tenant_id IS NULL THEN
        RAISE EXCEPTION 'tenant_id must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass a value for tenant_id.';
    END IF;
    IF tenant_id = '' OR length(tenant_id) > 255 THEN
        RAISE EXCEPTION 'tenant_id must be 1 to 255 characters'
            USING ERRCODE = 'ZB016',
                  DETAIL = format('It has %s characters.', length(tenant_id)),
                  HINT = 'Use your own customer or workspace id.';
    END IF;
    IF tenant_id ~ '[{}]' THEN
        -- braces delimit the Redis Cluster hash tag of the tenant's keys
        RAISE EXCEPTION 'tenant_id must not contain { or }'
            USING ERRCODE = 'ZB016',
                  DETAIL = format('The value given was %s.', quote_literal(tenant_id)),
                  HINT = 'The tenant id is the Redis hash tag billing:{tenant}; use another separator.';
    END IF;
    IF currency IS NOT NULL AND currency !~ '^[A-Z][A-Z0-9]{2,9}$' THEN
        RAISE EXCEPTION 'invalid currency %', quote_literal(currency)
            USING ERRCODE = 'ZB018',
                  DETAIL = 'A currency is 3 to 10 upper-case letters or digits, starting with a letter.',
                  HINT = 'Use an ISO 4217 code such as USD, or a unit name such as CREDITS.';
    END IF;
    IF status IS NOT NULL AND status NOT IN ('active', 'suspended', 'closed') THEN
        RAISE EXCEPTION 'invalid account status %', quote_literal(status)
            USING ERRCODE = 'ZB018',
                  DETAIL = 'Allowed statuses: active, suspended, closed.',
                  HINT = 'Suspend to stop charges temporarily; close to stop everything for good.';
    END IF;
    IF timezone IS NOT NULL THEN
        -- An abbreviation (IST, PST, also the zone names CET, EST...) means
        -- what the session's timezone_abbreviations says: AT TIME ZONE looks
        -- it up there before the tz database.  UTC, GMT, UCT and Zulu are
        -- abbreviations too, but mean UTC in every set.  The fixed list keeps
        -- the zone names that are abbreviations of a shipped set refused
        -- whatever this session's set is.
        IF lower(timezone) NOT IN ('utc', 'gmt', 'uct', 'zulu')
           AND (lower(timezone) IN ('cet', 'eet', 'est', 'hst', 'met', 'mst', 'wet')
                OR EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_abbrevs ab
                            WHERE lower(ab.abbrev) = lower(check_account_settings.timezone))) THEN
            RAISE EXCEPTION 'invalid time zone %', quote_literal(timezone)
                USING ERRCODE = 'ZB018',
                      DETAIL = format('%s is a time zone abbreviation: its meaning depends on the setting timezone_abbreviations.',
                                      timezone),
                      HINT = 'Use the region''s name from pg_timezone_names, e.g. Asia/Kolkata or America/Los_Angeles.';
        END IF;
        -- a zone name of the tz database (Europe/Berlin, UTC, Etc/GMT+3...),
        -- not a POSIX offset string such as '+14' (which means UTC-14) or
        -- 'XYZ5', nor the files localtime and posixrules of the zone directory.
        -- A name with a slash is a zone file if AT TIME ZONE knows it (a POSIX
        -- string with a slash has a comma, which the pattern refuses); only a
        -- name without one (Japan, EST5EDT, or XYZ5) is looked up in
        -- pg_timezone_names, which reads the whole zone directory (~30 ms).
        IF timezone !~ '^[A-Za-z][A-Za-z0-9_]*(/[A-Za-z0-9_+-]+)*$'
           OR lower(timezone) IN ('localtime', 'posixrules')
           OR (lower(timezone) NOT IN ('utc', 'gmt', 'uct', 'zulu')
               AND NOT billing.known_zone_file(timezone)) THEN
            RAISE EXCEPTION 'invalid time zone %', quote_literal(timezone)
                USING ERRCODE = 'ZB018',
                      DETAIL = 'Daily and monthly figures are computed in the account time zone.',
                      HINT = 'Use a name from pg_timezone_names, e.g. UTC or Europe/Berlin.';
        END IF;
    END IF;
    IF metadata IS NOT NULL AND jsonb_typeof(metadata) <> 'object' THEN
        RAISE EXCEPTION 'metadata must be a json object'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('The value given was %s.', metadata),
                  HINT = 'Pass e.g. ''{"plan": "pro"}''::jsonb, or leave it out.';
    END IF;
END;
$$;

-- usage per model: a capture is charged under the model of its hold when the
-- capture itself names none (the streaming flow sets model and provider on
-- billing_hold, then captures what was used); token counts stay the
-- entries' own, so several partial captures do not repeat the hold's.
CREATE OR REPLACE VIEW billing.usage_by_model AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.metadata->>'model', h.metadata->>'model')       AS model,
       coalesce(e.metadata->>'provider', h.metadata->>'provider') AS provider,
       count(*)                AS charges,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS spent,
       sum(CASE WHEN jsonb_typeof(e.metadata->'input_tokens') = 'number'
                THEN (e.metadata->>'input_tokens')::numeric END)  AS input_tokens,
       sum(CASE WHEN jsonb_typeof(e.metadata->'output_tokens') = 'number'
                THEN (e.metadata->>'output_tokens')::numeric END) AS output_tokens
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN billing.holds h ON h.tenant_id = e.tenant_id AND h.hold_id = e.hold_id
 WHERE e.kind IN ('deduct', 'capture')
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_model IS 'charges per tenant, day, model and provider (from entry metadata; a capture without a model takes its hold''s)';
