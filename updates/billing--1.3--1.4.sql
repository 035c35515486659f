/* updates/billing--1.3--1.4.sql: upgrade from 1.3 to 1.4 (see CHANGELOG.md) */

\echo Use "ALTER EXTENSION billing UPDATE TO '1.4'" to load this file. \quit

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
 * Run as the extension's owner, whoever runs ALTER EXTENSION UPDATE (another
 * superuser, say): what this script creates must belong to the owner, and
 * its grants and revokes be the owner's, exactly as in a fresh install.  The
 * caller's role comes back at the end of the script.
 */
SELECT pg_catalog.set_config('billing_upgrade.caller', current_user, true);
DO $$
BEGIN
    EXECUTE pg_catalog.format('SET LOCAL ROLE %I',
        (SELECT r.rolname FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_roles r ON r.oid = e.extowner WHERE e.extname = 'billing'));
END
$$;

/*
 * The tables first, in the order every charge takes them (the account row
 * first): the ALTER TABLEs below would otherwise take entries before
 * accounts while charges running during the upgrade hold accounts and wait
 * for entries, a deadlock.  Charges wait for the upgrade instead.
 */
LOCK TABLE billing.accounts, billing.entries, billing.rejections, billing.holds,
           billing.hold_events, billing.api_keys, billing.account_events, billing.prices,
           billing.jobs, billing.job_events
    IN ACCESS EXCLUSIVE MODE;

-- a sum of micro-units (numeric: the views' sums over many entries may pass
-- bigint's range, which the entries' own amounts never do) to an exact
-- amount with scale 6, like billing.to_amount
CREATE FUNCTION billing.to_amount_sum(micros numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN micros OPERATOR(pg_catalog.*) 0.000001;  -- exact: scale 0 times scale 6 (a division would round)
COMMENT ON FUNCTION billing.to_amount_sum(numeric) IS 'a sum of micro-units to an exact numeric amount with scale 6 (the views)';

-- ---------------------------------------------------------------------------
-- issue 12: trust boundaries
-- ---------------------------------------------------------------------------

-- the role that asked, recorded by entries and account events; argument
-- checks shared with the C functions (identifiers without control or
-- invisible characters, bounded texts and json, the event_at window)
CREATE FUNCTION billing.actor() RETURNS text
    AS 'MODULE_PATHNAME', 'billing_actor_sql'
    LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.actor() IS 'the role that asked for the current call (session role after SET ROLE, not a SECURITY DEFINER owner)';

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

/*
 * 1.3's install script did not pin search_path: in a database whose owner
 * had planted a public.nextval(text) before CREATE EXTENSION, the tables'
 * defaults nextval('billing.…') bound to it (an exact match for the
 * literal), and every insert without an id (account events, entries, holds,
 * jobs, from SECURITY DEFINER functions) ran it as the extension's owner.
 * Bind them again, to pg_catalog.nextval(regclass), as a fresh install does.
 */
ALTER TABLE billing.account_events ALTER COLUMN event_id SET DEFAULT pg_catalog.nextval('billing.account_event_id_seq'::pg_catalog.regclass);
ALTER TABLE billing.entries ALTER COLUMN entry_id SET DEFAULT pg_catalog.nextval('billing.entry_id_seq'::pg_catalog.regclass);
ALTER TABLE billing.rejections ALTER COLUMN rejection_id SET DEFAULT pg_catalog.nextval('billing.rejection_id_seq'::pg_catalog.regclass);
ALTER TABLE billing.holds ALTER COLUMN hold_id SET DEFAULT pg_catalog.nextval('billing.hold_id_seq'::pg_catalog.regclass);
ALTER TABLE billing.hold_events ALTER COLUMN event_id SET DEFAULT pg_catalog.nextval('billing.hold_event_id_seq'::pg_catalog.regclass);
ALTER TABLE billing.jobs ALTER COLUMN job_id SET DEFAULT pg_catalog.nextval('billing.job_id_seq'::pg_catalog.regclass);
ALTER TABLE billing.job_events ALTER COLUMN event_id SET DEFAULT pg_catalog.nextval('billing.job_event_id_seq'::pg_catalog.regclass);

ALTER TABLE billing.entries ADD COLUMN actor text;
COMMENT ON COLUMN billing.entries.actor IS 'the role that asked for the entry (the session role after SET ROLE; NULL for entries written before 1.4)';
ALTER TABLE billing.account_events ALTER COLUMN changed_by SET DEFAULT billing.actor();

-- tenant scopes of reporting roles; every view of tenant data filters by
-- them and is a security barrier
CREATE TABLE billing.tenant_scopes (
    role_name   name        NOT NULL,
    tenant_id   text        NOT NULL,
    granted_by  text        NOT NULL DEFAULT billing.actor(),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenant_scopes_pkey PRIMARY KEY (role_name, tenant_id)
);
COMMENT ON TABLE billing.tenant_scopes IS 'reporting roles that may see only some tenants (no rows for a role: it sees every tenant)';
SELECT pg_catalog.pg_extension_config_dump('billing.tenant_scopes', '');
-- the tenants the calling session may see, or NULL when it is not scoped;
-- the views call it once per query (an InitPlan).  Both the role that asks
-- (billing.actor(): the current role after SET ROLE) and the role the
-- session logged in as (session_user) count: a scope of either applies, and
-- with scopes of both only their common tenants are visible, so SET ROLE
-- can narrow what a session sees but never widen it (a scoped login that is
-- a member of an unscoped role stays scoped after SET ROLE).  On Citus (a
-- reference table) it reads this node's copy directly: the views' queries
-- run on the shards, where a query through Citus would be a nested
-- distributed query.
CREATE FUNCTION billing.visible_tenants() RETURNS text[]
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    scopes regclass := 'billing.tenant_scopes';
    copy   regclass;
    asker  text := billing.actor();
    login  text := session_user;
    result text[];
    logged text[];
BEGIN
    IF billing.is_citus_table('billing.tenant_scopes') THEN
        SELECT c INTO copy FROM billing.local_shards('billing.tenant_scopes') c;
        IF copy IS NOT NULL THEN
            scopes := copy;
        END IF;
    END IF;
    EXECUTE format('SELECT array_agg(s.tenant_id ORDER BY s.tenant_id) FROM %s s WHERE s.role_name = $1', scopes)
       INTO result USING asker;
    IF login IS DISTINCT FROM asker THEN
        EXECUTE format('SELECT array_agg(s.tenant_id ORDER BY s.tenant_id) FROM %s s WHERE s.role_name = $1', scopes)
           INTO logged USING login;
        IF logged IS NOT NULL THEN
            result := CASE WHEN result IS NULL THEN logged
                           ELSE ARRAY(SELECT t FROM unnest(result) t WHERE t = ANY (logged) ORDER BY t) END;
        END IF;
    END IF;
    RETURN result;
END;
$$;
COMMENT ON FUNCTION billing.visible_tenants() IS 'tenants the calling session may see in the views (NULL: all): the scopes of the current role and of the session''s login role, both applied';

CREATE OR REPLACE VIEW billing.balances WITH (security_barrier) AS
SELECT a.tenant_id,
       a.currency,
       a.status,
       billing.to_amount(a.balance_micros)                         AS balance,
       billing.to_amount(a.credit_limit_micros)                    AS credit_limit,
       billing.to_amount(billing.effective_holds(a))               AS on_hold,
       billing.to_amount(a.balance_micros) + billing.to_amount(a.credit_limit_micros)
           - billing.to_amount(billing.effective_holds(a))          AS available,
       a.version,
       a.last_entry_at,
       a.timezone,
       a.metadata,
       a.created_at,
       a.updated_at
  FROM billing.accounts a
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR a.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.balances IS 'one row per account: balance, credit limit, on hold, available funds, version';

CREATE OR REPLACE VIEW billing.ledger WITH (security_barrier) AS
SELECT e.entry_id,
       e.tenant_id,
       e.trace_id,
       e.kind,
       billing.to_amount(e.amount_micros)        AS amount,
       billing.to_amount(e.balance_after_micros) AS balance_after,
       e.version,
       e.description,
       e.metadata->>'model'                      AS model,
       coalesce(e.api_key, e.metadata->>'api_key') AS api_key,
       e.hold_id,
       e.metadata,
       e.event_at,
       e.created_at,
       e.actor
  FROM billing.entries e
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.ledger IS 'readable ledger: amounts as numeric, model and api_key lifted from metadata';

CREATE OR REPLACE VIEW billing.open_holds WITH (security_barrier) AS
SELECT h.tenant_id,
       h.hold_id,
       h.trace_id,
       h.api_key,
       billing.to_amount(h.amount_micros)                                         AS amount,
       billing.to_amount(h.captured_micros)                                       AS captured,
       billing.to_amount(h.amount_micros - h.captured_micros - h.released_micros) AS remaining,
       h.expires_at,
       h.description,
       h.created_at
  FROM billing.holds h
 WHERE h.status = 'open' AND h.expires_at > now()
   AND ((SELECT billing.visible_tenants()) IS NULL OR h.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.open_holds IS 'holds that still reserve funds (open and not expired)';

CREATE OR REPLACE VIEW billing.quota_usage WITH (security_barrier) AS
WITH p AS (
    SELECT a.tenant_id, a.timezone, a.usage_day, a.usage_month,
           a.day_requests, a.month_requests, a.day_spend_micros, a.month_spend_micros,
           a.daily_request_quota, a.monthly_request_quota,
           a.daily_spend_cap_micros, a.monthly_spend_cap_micros,
           a.max_charge_micros, a.minute_request_limit,
           (now() AT TIME ZONE a.timezone)::date AS today,
           date_trunc('month', now() AT TIME ZONE a.timezone)::date AS this_month
      FROM billing.accounts a
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR a.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
)
SELECT p.tenant_id,
       p.timezone,
       p.today AS day,
       CASE WHEN p.usage_day = p.today THEN p.day_requests ELSE 0 END AS requests_today,
       p.daily_request_quota,
       p.daily_request_quota - CASE WHEN p.usage_day = p.today THEN p.day_requests ELSE 0 END AS requests_left_today,
       billing.to_amount(CASE WHEN p.usage_day = p.today THEN p.day_spend_micros ELSE 0 END) AS spent_today,
       billing.to_amount(p.daily_spend_cap_micros) AS daily_spend_cap,
       ((p.today + 1)::timestamp AT TIME ZONE p.timezone) AS day_resets_at,
       p.this_month AS month,
       CASE WHEN p.usage_month = p.this_month THEN p.month_requests ELSE 0 END AS requests_this_month,
       p.monthly_request_quota,
       p.monthly_request_quota - CASE WHEN p.usage_month = p.this_month THEN p.month_requests ELSE 0 END AS requests_left_this_month,
       billing.to_amount(CASE WHEN p.usage_month = p.this_month THEN p.month_spend_micros ELSE 0 END) AS spent_this_month,
       billing.to_amount(p.monthly_spend_cap_micros) AS monthly_spend_cap,
       ((p.this_month + interval '1 month')::timestamp AT TIME ZONE p.timezone) AS month_resets_at,
       billing.to_amount(p.max_charge_micros) AS max_charge,
       p.minute_request_limit AS per_minute_limit
  FROM p;
COMMENT ON VIEW billing.quota_usage IS 'per account: requests and spend of the current day and month (account time zone), limits, what is left, when they reset';

CREATE OR REPLACE VIEW billing.api_key_budgets WITH (security_barrier) AS
WITH k AS (
    SELECT k.*,
           CASE k.budget_period
               WHEN 'day' THEN (now() AT TIME ZONE a.timezone)::date
               WHEN 'month' THEN date_trunc('month', now() AT TIME ZONE a.timezone)::date
           END AS current_start,
           a.timezone
      FROM billing.api_keys k
      JOIN billing.accounts a ON a.tenant_id = k.tenant_id
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR k.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
), s AS (
    SELECT k.*,
           CASE WHEN k.budget_period IS NULL OR k.budget_period = 'lifetime' OR k.period_start = k.current_start
                THEN k.period_spend_micros ELSE 0 END AS spent_micros,
           (SELECT coalesce(sum(h.amount_micros - h.captured_micros - h.released_micros), 0)::bigint
              FROM billing.holds h
             WHERE h.tenant_id = k.tenant_id AND h.api_key = k.key_id
               AND h.status = 'open' AND h.expires_at > now()) AS on_hold_micros
      FROM k
)
SELECT s.tenant_id,
       s.key_id,
       s.status,
       billing.to_amount(s.budget_micros) AS budget,
       s.budget_period,
       billing.to_amount(s.spent_micros) AS spent,
       billing.to_amount(s.on_hold_micros) AS on_hold,
       billing.to_amount(s.budget_micros - s.spent_micros - s.on_hold_micros) AS remaining,
       CASE s.budget_period
           WHEN 'day' THEN ((s.current_start + 1)::timestamp AT TIME ZONE s.timezone)
           WHEN 'month' THEN ((s.current_start + interval '1 month')::timestamp AT TIME ZONE s.timezone)
       END AS resets_at,
       s.last_used_at,
       s.metadata
  FROM s;
COMMENT ON VIEW billing.api_key_budgets IS 'per API key: budget, spent in the current period, on hold, remaining, reset time';

CREATE OR REPLACE VIEW billing.usage_daily WITH (security_barrier) AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       count(*) FILTER (WHERE e.kind IN ('deduct', 'capture'))                      AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind IN ('deduct', 'capture')), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount_sum(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_daily IS 'per tenant and day (account time zone, by event time): charges and credits';

CREATE OR REPLACE VIEW billing.usage_monthly WITH (security_barrier) AS
SELECT e.tenant_id,
       date_trunc('month', coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS month,
       count(*) FILTER (WHERE e.kind IN ('deduct', 'capture'))                      AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind IN ('deduct', 'capture')), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount_sum(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_monthly IS 'per tenant and calendar month (account time zone, by event time): charges and credits';

CREATE OR REPLACE VIEW billing.usage_by_model WITH (security_barrier) AS
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
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_model IS 'charges per tenant, day, model and provider (from entry metadata; a capture without a model takes its hold''s)';

CREATE OR REPLACE VIEW billing.usage_by_api_key WITH (security_barrier) AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.api_key, e.metadata->>'api_key') AS api_key,
       count(*)                AS charges,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS spent
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE e.kind IN ('deduct', 'capture')
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.usage_by_api_key IS 'charges per tenant, day and api key (the api_key argument, else metadata->>''api_key'')';

CREATE OR REPLACE VIEW billing.jobs_by_state WITH (security_barrier) AS
SELECT j.tenant_id, j.kind, j.state,
       count(*)                AS jobs,
       min(j.created_at)       AS oldest_created_at,
       min(j.run_at) FILTER (WHERE j.state = 'queued') AS next_run_at
  FROM billing.jobs j
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR j.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.jobs_by_state IS 'job counts per tenant, kind and state';

CREATE OR REPLACE VIEW billing.job_failures WITH (security_barrier) AS
SELECT e.tenant_id, j.kind, e.reason AS error,
       count(*)          AS failures,
       count(DISTINCT e.job_id) AS jobs,
       max(e.created_at) AS last_seen
  FROM billing.job_events e
  JOIN billing.jobs j ON j.tenant_id = e.tenant_id AND j.job_id = e.job_id
 WHERE e.from_state = 'processing' AND e.to_state IN ('queued', 'failed')
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.job_failures IS 'failed attempts (including rescued ones) per tenant, kind and error';

CREATE OR REPLACE VIEW billing.job_costs WITH (security_barrier) AS
SELECT j.tenant_id, j.kind,
       count(*) AS completed_jobs,
       billing.to_amount_sum(sum(j.estimated_micros)) AS estimated,
       billing.to_amount_sum(sum(j.actual_micros))    AS actual,
       round(sum(j.actual_micros)::numeric / nullif(sum(j.estimated_micros), 0), 4) AS actual_to_estimate
  FROM billing.jobs j
 WHERE j.state = 'completed'
   AND ((SELECT billing.visible_tenants()) IS NULL OR j.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.job_costs IS 'estimated vs actual cost of completed jobs per tenant and kind';

CREATE OR REPLACE VIEW billing.job_time_in_state WITH (security_barrier) AS
WITH spans AS (
    SELECT e.tenant_id, e.job_id, e.to_state AS state,
           lead(e.created_at) OVER (PARTITION BY e.tenant_id, e.job_id ORDER BY e.event_id) - e.created_at AS spent
      FROM billing.job_events e
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
)
SELECT j.kind, s.state,
       count(*) AS spans,
       avg(s.spent) AS avg_time,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY s.spent) AS p50_time,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY s.spent) AS p95_time,
       max(s.spent) AS max_time
  FROM spans s
  JOIN billing.jobs j ON j.tenant_id = s.tenant_id AND j.job_id = s.job_id
 WHERE s.spent IS NOT NULL
 GROUP BY 1, 2;
COMMENT ON VIEW billing.job_time_in_state IS 'how long jobs stay in each state (finished spans only), per kind';

-- bounded inputs, errors without unbounded or foreign data, a time zone
-- change that keeps the current day's and month's usage.  (No REVOKE for a
-- replaced function: inside an upgrade it would record the grants users
-- made as the extension's own, and pg_dump would then not dump them; the
-- internal helpers that PUBLIC may no longer run are the exception.)
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
    -- 1 to 255 characters, no control or invisible characters
    PERFORM billing.check_id(tenant_id, 'tenant_id', 'ZB016');
    IF tenant_id ~ '[{}]' THEN
        -- braces delimit the Redis Cluster hash tag of the tenant's keys
        RAISE EXCEPTION 'tenant_id must not contain { or }'
            USING ERRCODE = 'ZB016',
                  DETAIL = format('The value given was %s.', billing.show(tenant_id)),
                  HINT = 'The tenant id is the Redis hash tag billing:{tenant}; use another separator.';
    END IF;
    IF currency IS NOT NULL AND currency !~ '^[A-Z][A-Z0-9]{2,9}$' THEN
        RAISE EXCEPTION 'invalid currency %', billing.show(currency)
            USING ERRCODE = 'ZB018',
                  DETAIL = 'A currency is 3 to 10 upper-case letters or digits, starting with a letter.',
                  HINT = 'Use an ISO 4217 code such as USD, or a unit name such as CREDITS.';
    END IF;
    IF status IS NOT NULL AND status NOT IN ('active', 'suspended', 'closed') THEN
        RAISE EXCEPTION 'invalid account status %', billing.show(status)
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
            RAISE EXCEPTION 'invalid time zone %', billing.show(timezone)
                USING ERRCODE = 'ZB018',
                      DETAIL = format('%s is a time zone abbreviation: its meaning depends on the setting timezone_abbreviations.',
                                      billing.show(timezone)),
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
            RAISE EXCEPTION 'invalid time zone %', billing.show(timezone)
                USING ERRCODE = 'ZB018',
                      DETAIL = 'Daily and monthly figures are computed in the account time zone.',
                      HINT = 'Use a name from pg_timezone_names, e.g. UTC or Europe/Berlin.';
        END IF;
    END IF;
    -- a json object of at most 16 kB
    PERFORM billing.check_json(metadata, 'metadata');
END;
$$;

CREATE OR REPLACE FUNCTION @extschema@.billing_account_create(tenant_id text,
                                       currency text DEFAULT NULL,
                                       credit_limit numeric DEFAULT NULL,
                                       status text DEFAULT NULL,
                                       timezone text DEFAULT NULL,
                                       metadata jsonb DEFAULT NULL)
    RETURNS SETOF billing.balances
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    p_tenant   text   := billing_account_create.tenant_id;
    p_limit    bigint;
    acc        billing.accounts;
    diffs      text[] := '{}';
    details    text[] := '{}';
BEGIN
    PERFORM billing.check_account_settings(p_tenant, billing_account_create.currency,
                                           billing_account_create.status,
                                           billing_account_create.timezone,
                                           billing_account_create.metadata);
    IF billing_account_create.credit_limit IS NOT NULL THEN
        p_limit := billing.to_micros(billing_account_create.credit_limit, 'credit_limit', true);
    END IF;
    IF billing_account_create.status = 'closed'
       AND NOT EXISTS (SELECT FROM billing.accounts a WHERE a.tenant_id = p_tenant) THEN
        RAISE EXCEPTION 'a new account cannot be closed'
            USING ERRCODE = 'ZB018', HINT = 'Create it active or suspended.';
    END IF;

    INSERT INTO billing.accounts AS a (tenant_id, currency, credit_limit_micros,
                                       status, timezone, metadata)
    VALUES (p_tenant,
            coalesce(billing_account_create.currency, 'USD'),
            coalesce(p_limit, 0),
            coalesce(billing_account_create.status, 'active'),
            coalesce(billing_account_create.timezone, 'UTC'),
            coalesce(billing_account_create.metadata, '{}'))
    ON CONFLICT (tenant_id) DO NOTHING
    RETURNING * INTO acc;

    IF FOUND THEN
        PERFORM billing.sync_mark(p_tenant);
        INSERT INTO billing.account_events (tenant_id, action, changes)
        VALUES (p_tenant, 'create',
                jsonb_build_object('currency', acc.currency,
                                   'credit_limit', billing.to_amount(acc.credit_limit_micros),
                                   'status', acc.status,
                                   'timezone', acc.timezone,
                                   'metadata', acc.metadata));
    ELSE
        -- it exists (maybe created concurrently: ON CONFLICT waited for it)
        SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = p_tenant;
        IF billing_account_create.currency IS NOT NULL AND billing_account_create.currency <> acc.currency THEN
            diffs := diffs || 'currency'::text;
            details := details || format('currency: existing %s, requested %s', acc.currency, billing_account_create.currency);
        END IF;
        IF p_limit IS NOT NULL AND p_limit <> acc.credit_limit_micros THEN
            diffs := diffs || 'credit_limit'::text;
            details := details || format('credit_limit: existing %s, requested %s',
                                         billing.to_amount(acc.credit_limit_micros), billing.to_amount(p_limit));
        END IF;
        IF billing_account_create.status IS NOT NULL AND billing_account_create.status <> acc.status THEN
            diffs := diffs || 'status'::text;
            details := details || format('status: existing %s, requested %s', acc.status, billing_account_create.status);
        END IF;
        IF billing_account_create.timezone IS NOT NULL AND billing_account_create.timezone <> acc.timezone THEN
            diffs := diffs || 'timezone'::text;
            details := details || format('timezone: existing %s, requested %s', acc.timezone, billing_account_create.timezone);
        END IF;
        IF billing_account_create.metadata IS NOT NULL AND billing_account_create.metadata <> acc.metadata THEN
            diffs := diffs || 'metadata'::text;
            details := details || format('metadata: existing a json object of %s bytes, requested one of %s bytes',
                                         pg_column_size(acc.metadata), pg_column_size(billing_account_create.metadata));
        END IF;
        IF cardinality(diffs) > 0 THEN
            RAISE EXCEPTION 'account "%" already exists with a different %', p_tenant, array_to_string(diffs, ', ')
                USING ERRCODE = 'ZB006',
                      DETAIL = array_to_string(details, '; ') || '.',
                      HINT = 'Change settings with billing_account_update(), or leave them out to get the existing account.';
        END IF;
    END IF;

    RETURN QUERY SELECT * FROM billing.balances b WHERE b.tenant_id = p_tenant;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_account_create(text, text, numeric, text, text, jsonb) IS
    'create an account, or return the existing one if the given settings match (ZB006 otherwise)';

CREATE OR REPLACE FUNCTION billing.check_count(value bigint, argname text) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value < 0 THEN
        RAISE EXCEPTION '% must be zero or positive', argname
            USING ERRCODE = 'ZB018',
                  DETAIL = format('The value given was %s.', value),
                  HINT = 'Pass NULL (no limit), 0 (nothing allowed) or a positive count.';
    END IF;
    RETURN value;
END;
$$;
REVOKE ALL ON FUNCTION billing.check_count(bigint, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION billing.check_key_settings(key_id text, budget numeric, budget_period text,
                                           OUT budget_micros bigint)
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF key_id IS NULL THEN
        RAISE EXCEPTION 'key_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the key id.';
    END IF;
    -- 1 to 255 characters, no control or invisible characters
    PERFORM billing.check_id(key_id, 'key_id', 'ZB018');
    IF key_id ~ '[{}]' THEN
        RAISE EXCEPTION 'key_id must not contain { or }'
            USING ERRCODE = 'ZB018', DETAIL = format('The value given was %s.', billing.show(key_id)),
                  HINT = 'Braces delimit the Redis hash tag of the tenant''s keys.';
    END IF;
    IF budget_period IS NOT NULL AND budget_period NOT IN ('day', 'month', 'lifetime') THEN
        RAISE EXCEPTION 'invalid budget period %', billing.show(budget_period)
            USING ERRCODE = 'ZB018', DETAIL = 'Allowed periods: day, month, lifetime.',
                  HINT = 'Days and months are calendar periods in the account time zone.';
    END IF;
    IF (budget IS NULL) <> (budget_period IS NULL) THEN
        RAISE EXCEPTION 'budget and budget_period go together'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('budget %s, budget_period %s.', coalesce(budget::text, 'null'), coalesce(budget_period, 'null')),
                  HINT = 'Pass both, e.g. budget => 50, budget_period => ''month''.';
    END IF;
    budget_micros := billing.to_micros(budget, 'budget', true);
END;
$$;
REVOKE ALL ON FUNCTION billing.check_key_settings(text, numeric, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.billing_price_set(model text, input_per_1k numeric, output_per_1k numeric,
                                  effective_from timestamptz DEFAULT now(),
                                  currency text DEFAULT 'USD')
    RETURNS SETOF billing.price_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    p_in  bigint;
    p_out bigint;
BEGIN
    IF billing_price_set.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name as gateways report it, e.g. gpt-4o.';
    END IF;
    PERFORM billing.check_id(billing_price_set.model, 'model', 'ZB018');
    IF billing_price_set.effective_from IS NULL OR NOT isfinite(billing_price_set.effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite timestamp'
            USING ERRCODE = CASE WHEN billing_price_set.effective_from IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass when the price starts to apply, e.g. now() or ''2027-01-01 00:00+00''.';
    END IF;
    PERFORM billing.check_account_settings('-', billing_price_set.currency, NULL, NULL, NULL);
    IF billing_price_set.currency IS NULL THEN
        RAISE EXCEPTION 'currency must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass e.g. USD.';
    END IF;
    IF billing_price_set.input_per_1k IS NULL OR billing_price_set.output_per_1k IS NULL THEN
        RAISE EXCEPTION 'input_per_1k and output_per_1k must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass 0 for a side that is free.';
    END IF;
    p_in := billing.to_micros(billing_price_set.input_per_1k, 'input_per_1k', true);
    p_out := billing.to_micros(billing_price_set.output_per_1k, 'output_per_1k', true);
    INSERT INTO billing.prices (model, currency, effective_from, input_per_1k_micros, output_per_1k_micros)
    VALUES (billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from, p_in, p_out)
    ON CONFLICT (model, currency, effective_from) DO NOTHING;
    IF NOT FOUND AND NOT EXISTS (
        SELECT FROM billing.prices p
         WHERE p.model = billing_price_set.model AND p.currency = billing_price_set.currency
           AND p.effective_from = billing_price_set.effective_from
           AND p.input_per_1k_micros = p_in AND p.output_per_1k_micros = p_out) THEN
        RAISE EXCEPTION 'a different price for % in % is already effective from %',
                        billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from
            USING ERRCODE = 'ZB006',
                  HINT = 'Prices are history: add the new price with a later effective_from.';
    END IF;
    RETURN QUERY SELECT * FROM billing.price_list l
                  WHERE l.model = billing_price_set.model AND l.currency = billing_price_set.currency;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_price_set(text, numeric, numeric, timestamptz, text) IS
    'add a price per 1,000 input/output tokens for a model, effective from a time (history is kept)';

CREATE OR REPLACE FUNCTION billing.cost_micros(p billing.prices, input_tokens bigint, output_tokens bigint) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cost numeric;
BEGIN
    IF input_tokens IS NULL OR output_tokens IS NULL THEN
        RAISE EXCEPTION 'input_tokens and output_tokens must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass 0 for a side that was not used.';
    END IF;
    IF input_tokens < 0 OR output_tokens < 0 THEN
        RAISE EXCEPTION 'token counts must be zero or positive'
            USING ERRCODE = 'ZB061',
                  DETAIL = format('input_tokens %s, output_tokens %s.', input_tokens, output_tokens),
                  HINT = 'Pass the counts the provider reported.';
    END IF;
    cost := round((input_tokens::numeric * p.input_per_1k_micros
                   + output_tokens::numeric * p.output_per_1k_micros) / 1000);
    IF cost > 1000000000000000000 THEN      -- 10^12 units, the limit of one charge
        RAISE EXCEPTION 'cost is out of range'
            USING ERRCODE = 'ZB013',
                  DETAIL = format('%s input and %s output tokens of %s cost %s; the largest charge is 1000000000000.',
                                  input_tokens, output_tokens, p.model, round(cost / 1000000, 6)),
                  HINT = 'Check the token counts; split a huge usage into several charges.';
    END IF;
    RETURN cost::bigint;
END;
$$;
REVOKE ALL ON FUNCTION billing.cost_micros(billing.prices, bigint, bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.billing_deduct_usage(tenant_id text, model text,
                                     input_tokens bigint, output_tokens bigint,
                                     trace_id text,
                                     description text DEFAULT NULL,
                                     metadata jsonb DEFAULT NULL,
                                     event_at timestamptz DEFAULT NULL,
                                     api_key text DEFAULT NULL)
    RETURNS billing.entry_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc     billing.accounts;
    priced  timestamptz;
    p       billing.prices;
    cost    bigint;
BEGIN
    IF billing_deduct_usage.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the model name.';
    END IF;
    IF billing_deduct_usage.trace_id IS NULL THEN
        RAISE EXCEPTION 'trace_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass a value for trace_id.';
    END IF;
    PERFORM billing.check_json(billing_deduct_usage.metadata, 'metadata');
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_deduct_usage.tenant_id;
    IF NOT FOUND THEN
        PERFORM billing.lock_account(billing_deduct_usage.tenant_id);   -- raises ZB015 / ZB001
    END IF;
    -- price at the usage time; a replay is priced when the original was recorded
    SELECT e.created_at INTO priced FROM billing.entries e
     WHERE e.tenant_id = billing_deduct_usage.tenant_id AND e.trace_id = billing_deduct_usage.trace_id;
    IF NOT FOUND THEN
        -- a new charge: it is priced at its event time, which must be in the
        -- accepted window (ZB019)
        PERFORM billing.check_event_at(billing_deduct_usage.event_at);
    END IF;
    priced := coalesce(billing_deduct_usage.event_at, priced, now());
    p := billing.price_at(billing_deduct_usage.model, acc.currency, priced);
    cost := billing.cost_micros(p, billing_deduct_usage.input_tokens, billing_deduct_usage.output_tokens);
    IF cost = 0 THEN
        RAISE EXCEPTION 'usage costs nothing'
            USING ERRCODE = 'ZB010',
                  DETAIL = format('%s input and %s output tokens of %s cost 0.000000.',
                                  billing_deduct_usage.input_tokens, billing_deduct_usage.output_tokens,
                                  billing_deduct_usage.model),
                  HINT = 'Skip the charge for empty usage.';
    END IF;
    RETURN billing.internal_deduct(billing_deduct_usage.tenant_id, billing.to_amount(cost), billing_deduct_usage.trace_id,
                          description => billing_deduct_usage.description,
                          metadata => coalesce(billing_deduct_usage.metadata, '{}') || jsonb_build_object(
                              'model', billing_deduct_usage.model,
                              'input_tokens', billing_deduct_usage.input_tokens,
                              'output_tokens', billing_deduct_usage.output_tokens,
                              'input_per_1k', billing.to_amount(p.input_per_1k_micros),
                              'output_per_1k', billing.to_amount(p.output_per_1k_micros),
                              'price_effective_from',
                              to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
                          event_at => billing_deduct_usage.event_at,
                          api_key => billing_deduct_usage.api_key);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text) IS
    'charge token usage at the model price effective at event time; model, tokens and unit prices go into the entry metadata';

-- the result row of a job.  No SET search_path (its body names everything
-- with its schema): a function with settings is never inlined, and run as a
-- function of its own it would parse its body again at every call.
CREATE OR REPLACE FUNCTION billing.job_result(j billing.jobs, replayed boolean) RETURNS billing.job_result
    LANGUAGE sql IMMUTABLE
AS $$
    SELECT ROW(j.job_id, j.tenant_id, j.idempotency_key, j.kind, j.state, j.attempt, j.max_attempts,
               j.run_at, j.worker, j.lease_until, billing.to_amount(j.estimated_micros),
               billing.to_amount(j.actual_micros), j.hold_trace_id, j.charge_entry_id, j.last_error,
               j.input, j.output, j.created_at, j.finished_at, replayed)::billing.job_result
$$;
REVOKE ALL ON FUNCTION billing.job_result(billing.jobs, boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION billing.job_lock(tenant_id text, job_id bigint) RETURNS billing.jobs
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs;
BEGIN
    IF job_lock.tenant_id IS NULL OR job_lock.job_id IS NULL THEN
        RAISE EXCEPTION 'tenant_id and job_id must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the tenant and the job_id that billing_job_submit() returned.';
    END IF;
    PERFORM billing.check_id(job_lock.tenant_id, 'tenant_id', 'ZB016');
    SELECT * INTO j FROM billing.jobs x
     WHERE x.tenant_id = job_lock.tenant_id AND x.job_id = job_lock.job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist for tenant "%"', job_lock.job_id, job_lock.tenant_id
            USING ERRCODE = 'ZB071', HINT = 'Pass the job_id that billing_job_submit() returned.';
    END IF;
    RETURN j;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_hold_open(billing.jobs, interval) FROM PUBLIC;

CREATE OR REPLACE FUNCTION billing.job_check_lease(j billing.jobs, worker text, wanted text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF j.state = 'processing' AND (worker IS NULL OR worker = j.worker) THEN
        RETURN;
    END IF;
    IF j.state = 'processing' OR (j.state = 'queued' AND j.attempt > 0) THEN
        RAISE EXCEPTION 'job % is no longer leased by %', j.job_id, coalesce(worker, 'this worker')
            USING ERRCODE = 'ZB073',
                  DETAIL = format('The job is %s (attempt %s, worker %s).', j.state, j.attempt, coalesce(j.worker, 'none')),
                  HINT = 'Its lease expired and it was rescued; drop this result, another attempt will run.';
    END IF;
    RAISE EXCEPTION 'illegal job transition from % to %', j.state, wanted
        USING ERRCODE = 'ZB070',
              DETAIL = format('Job %s of tenant "%s" is %s.', j.job_id, j.tenant_id, j.state),
              HINT = 'Only a processing job can be completed, failed or heartbeaten.';
END;
$$;
REVOKE ALL ON FUNCTION billing.job_check_lease(billing.jobs, text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.billing_job_submit(tenant_id text, kind text, idempotency_key text,
                                   estimated_cost numeric,
                                   input jsonb DEFAULT NULL,
                                   max_attempts integer DEFAULT 3,
                                   run_at timestamptz DEFAULT NULL,
                                   hold_ttl interval DEFAULT '1 hour')
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    j        billing.jobs;
    est      bigint;
    new_id   bigint;
    diffs    text[] := '{}';
BEGIN
    IF billing_job_submit.tenant_id IS NULL OR billing_job_submit.kind IS NULL
       OR billing_job_submit.idempotency_key IS NULL OR billing_job_submit.estimated_cost IS NULL
       OR billing_job_submit.max_attempts IS NULL OR billing_job_submit.hold_ttl IS NULL THEN
        RAISE EXCEPTION 'tenant_id, kind, idempotency_key, estimated_cost, max_attempts and hold_ttl must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass every required argument.';
    END IF;
    PERFORM billing.check_id(billing_job_submit.kind, 'kind', 'ZB018');
    PERFORM billing.check_id(billing_job_submit.idempotency_key, 'idempotency_key', 'ZB018');
    IF billing_job_submit.max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 100'
            USING ERRCODE = 'ZB018', DETAIL = format('The value given was %s.', billing_job_submit.max_attempts),
                  HINT = 'Most jobs want 3 to 25 attempts.';
    END IF;
    IF billing_job_submit.hold_ttl <= interval '0' OR billing_job_submit.hold_ttl > interval '31 days'
       OR extract(month FROM billing_job_submit.hold_ttl) <> 0 OR extract(year FROM billing_job_submit.hold_ttl) <> 0
       OR (billing_job_submit.run_at IS NOT NULL AND (NOT isfinite(billing_job_submit.run_at)
           OR billing_job_submit.run_at > now() + interval '30 days')) THEN
        RAISE EXCEPTION 'hold_ttl must be in (0, 31 days] and run_at finite and at most 30 days ahead'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('hold_ttl %s, run_at %s.', billing_job_submit.hold_ttl, billing_job_submit.run_at),
                  HINT = 'The hold reserving the estimate must outlive the wait for the job.';
    END IF;
    PERFORM billing.check_account_settings(billing_job_submit.tenant_id, NULL, NULL, NULL, NULL);
    -- a json object of at most 16 kB: references to the work, not the work
    PERFORM billing.check_json(billing_job_submit.input, 'input');
    est := billing.to_micros(billing_job_submit.estimated_cost, 'estimated_cost', false);

    new_id := nextval('billing.job_id_seq');
    INSERT INTO billing.jobs AS x (tenant_id, job_id, idempotency_key, kind, input, max_attempts, run_at,
                                   estimated_micros, hold_trace_id, hold_seq, hold_ttl, note)
    VALUES (billing_job_submit.tenant_id, new_id, billing_job_submit.idempotency_key, billing_job_submit.kind,
            coalesce(billing_job_submit.input, '{}'), billing_job_submit.max_attempts,
            coalesce(billing_job_submit.run_at, now()), est,
            format('job:%s:1', new_id), 1, billing_job_submit.hold_ttl, NULL)
    ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
    RETURNING * INTO j;

    IF NOT FOUND THEN
        -- a duplicate submit (maybe concurrent: ON CONFLICT waited for it)
        SELECT * INTO j FROM billing.jobs x
         WHERE x.tenant_id = billing_job_submit.tenant_id AND x.idempotency_key = billing_job_submit.idempotency_key;
        IF j.kind <> billing_job_submit.kind THEN diffs := diffs || 'kind'::text; END IF;
        IF j.estimated_micros <> est THEN diffs := diffs || 'estimated_cost'::text; END IF;
        IF j.input <> coalesce(billing_job_submit.input, '{}') THEN diffs := diffs || 'input'::text; END IF;
        IF j.max_attempts <> billing_job_submit.max_attempts THEN diffs := diffs || 'max_attempts'::text; END IF;
        IF cardinality(diffs) > 0 THEN
            RAISE EXCEPTION 'idempotency key "%" was already used with a different %',
                            billing_job_submit.idempotency_key, array_to_string(diffs, ', ')
                USING ERRCODE = 'ZB005',
                      DETAIL = format('Existing job %s: kind %s, estimated_cost %s, max_attempts %s, input of %s bytes.',
                                      j.job_id, billing.show(j.kind), billing.to_amount(j.estimated_micros), j.max_attempts,
                                      pg_column_size(j.input)),
                      HINT = 'Resend the original submit unchanged to get the job, or use a new idempotency key.';
        END IF;
        RETURN billing.job_result(j, true);
    END IF;

    -- reserve the estimate; not enough funds -> the error aborts the submit: no job
    PERFORM billing.internal_hold(j.tenant_id, billing.to_amount(est), j.hold_trace_id,
                                    expires_in => least(greatest(j.run_at - now(), interval '0') + j.hold_ttl,
                                                        interval '31 days'),
                                    description => format('job %s (%s)', j.job_id, j.kind));
    -- the first line of the job's log (the trigger logs the transitions;
    -- a direct INSERT, e.g. by pg_restore, brings its log along)
    INSERT INTO billing.job_events (tenant_id, job_id, from_state, to_state, attempt, reason)
    VALUES (j.tenant_id, j.job_id, NULL, 'queued', 0, 'submitted');
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_submit(text, text, text, numeric, jsonb, integer, timestamptz, interval) IS
    'create a job and hold its estimated cost in one transaction; a duplicate idempotency key returns the existing job';

CREATE OR REPLACE FUNCTION @extschema@.billing_job_complete(tenant_id text, job_id bigint, actual_cost numeric,
                                     output jsonb DEFAULT NULL, worker text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j       billing.jobs := billing.job_lock(billing_job_complete.tenant_id, billing_job_complete.job_id);
    actual  bigint;
    entry   bigint;
BEGIN
    IF billing_job_complete.actual_cost IS NULL THEN
        RAISE EXCEPTION 'actual_cost must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass what the job really cost (0 if nothing).';
    END IF;
    actual := billing.to_micros(billing_job_complete.actual_cost, 'actual_cost', true);
    PERFORM billing.check_json(billing_job_complete.output, 'output');
    IF j.state = 'completed' AND j.actual_micros = actual THEN
        RETURN billing.job_result(j, true);           -- a retried complete
    END IF;
    PERFORM billing.job_check_lease(j, billing_job_complete.worker, 'completed');

    -- the charge; if it fails, the error leaves the job processing
    IF actual > 0 AND billing.job_hold_open(j) THEN
        SELECT c.entry_id INTO entry
          FROM billing.internal_capture(j.tenant_id, j.hold_trace_id, billing.to_amount(actual),
                                          format('job:%s:charge', j.job_id), final => true,
                                          description => format('job %s (%s)', j.job_id, j.kind)) c;
    ELSE
        PERFORM billing.job_release_hold(j);         -- hold expired or nothing to charge
        IF actual > 0 THEN
            SELECT d.entry_id INTO entry
              FROM billing.internal_deduct(j.tenant_id, billing.to_amount(actual), format('job:%s:charge', j.job_id),
                                             description => format('job %s (%s)', j.job_id, j.kind),
                                             metadata => jsonb_build_object('job_id', j.job_id, 'kind', j.kind)) d;
        END IF;
    END IF;

    j.state := 'completed';
    j.actual_micros := actual;
    j.charge_entry_id := entry;
    j.output := billing_job_complete.output;
    j.finished_at := now();
    j.lease_until := NULL;
    UPDATE billing.jobs x
       SET state = 'completed', actual_micros = actual, charge_entry_id = entry, output = j.output,
           lease_until = NULL, finished_at = j.finished_at, updated_at = now(),
           note = format('charged %s', billing.to_amount(actual))
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_complete(text, bigint, numeric, jsonb, text) IS
    'capture the actual cost and mark the job completed in one transaction; if the charge fails nothing changes';

CREATE OR REPLACE FUNCTION @extschema@.billing_job_fail(tenant_id text, job_id bigint, error text,
                                 retryable boolean DEFAULT true, worker text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_fail.tenant_id, billing_job_fail.job_id);
BEGIN
    IF billing_job_fail.retryable IS NULL THEN
        RAISE EXCEPTION 'retryable must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass true or false.';
    END IF;
    PERFORM billing.check_text(billing_job_fail.error, 'error');
    PERFORM billing.job_check_lease(j, billing_job_fail.worker, 'failed');
    j := billing.job_fail_attempt(j, coalesce(billing_job_fail.error, 'failed'), billing_job_fail.retryable);
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_fail(text, bigint, text, boolean, text) IS
    'a failed attempt: queued again with backoff while attempts remain (hold kept), else failed with the hold released';

CREATE OR REPLACE FUNCTION @extschema@.billing_job_cancel(tenant_id text, job_id bigint, reason text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_cancel.tenant_id, billing_job_cancel.job_id);
BEGIN
    PERFORM billing.check_text(billing_job_cancel.reason, 'reason');
    IF j.state = 'cancelled' THEN
        RETURN billing.job_result(j, true);
    END IF;
    IF j.state NOT IN ('queued', 'processing') THEN
        RAISE EXCEPTION 'illegal job transition from % to cancelled', j.state
            USING ERRCODE = 'ZB070',
                  DETAIL = format('Job %s of tenant "%s" is %s.', j.job_id, j.tenant_id, j.state),
                  HINT = 'Only queued or processing jobs can be cancelled.';
    END IF;
    PERFORM billing.job_release_hold(j);
    j.state := 'cancelled';
    j.finished_at := now();
    j.lease_until := NULL;
    j.last_error := coalesce(billing_job_cancel.reason, j.last_error);
    UPDATE billing.jobs x SET state = 'cancelled', lease_until = NULL, finished_at = j.finished_at,
                              last_error = j.last_error, updated_at = now(),
                              note = coalesce(billing_job_cancel.reason, 'cancelled')
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_cancel(text, bigint, text) IS 'cancel a queued or processing job and release its hold';

-- the DROP guard of 1.1 matched the statement's text ("DROP EXTENSION x
-- /* billing */" was refused); the library's hook (1.3) checks what is
-- really dropped, for every way the extension can be dropped
DROP EVENT TRIGGER billing_guard_drop;
DROP FUNCTION billing.guard_drop();

-- ---------------------------------------------------------------------------
-- issue 16: grants (credit buckets with expiry and priority), refunds tied to
-- their charge
-- ---------------------------------------------------------------------------

-- where the buckets live: the open ones on the account row, what a debit drew
-- and a hold reserved beside it.  Accounts, entries and holds of 1.3 have no
-- buckets: their money is the wallet's.
ALTER TABLE billing.accounts ADD COLUMN grants_state bigint[],
                             ADD COLUMN grants_next_expiry timestamptz;
CREATE INDEX accounts_grants_expiry_idx ON billing.accounts (grants_next_expiry)
    WHERE grants_next_expiry IS NOT NULL;
COMMENT ON TABLE billing.accounts IS 'one account per tenant; balance_micros caches SUM(entries.amount_micros), kept in the same transaction';
ALTER TABLE billing.entries ADD COLUMN grant_id bigint,
                            ADD COLUMN draws bigint[],
                            ADD COLUMN refund_of bigint;
COMMENT ON COLUMN billing.entries.grant_id IS 'kind grant: the bucket it filled; kind expire: the bucket that expired';
COMMENT ON COLUMN billing.entries.draws IS 'a debit: the grant buckets it drew from; a refund: those it gave back to (grant_id, amount pairs; the wallet is the rest)';
COMMENT ON COLUMN billing.entries.refund_of IS 'a refund: the entry_id of the charge it refunds';
ALTER TABLE billing.holds ADD COLUMN grant_draws bigint[];

-- What the cached balance still holds of grants that have expired, before
-- their expire entries are written (by the next call on the account): what
-- is left in them, and what holds that have expired themselves had reserved
-- of them.  billing.balances and billing_balance_at() subtract it, so
-- expired credit never shows as spendable; billing_balance() does the same
-- in C.
CREATE FUNCTION billing.grants_expired(grants_state bigint[], at timestamptz) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_grants_expired'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.grants_expired(bigint[], timestamptz) IS 'what accounts.grants_state holds of grants expired by a time';
CREATE FUNCTION billing.shares_expired(grants_state bigint[], grant_draws bigint[],
                                       hold_expires_at timestamptz, at timestamptz) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_shares_expired'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing.shares_expired(bigint[], bigint[], timestamptz, timestamptz) IS 'of what a hold reserved of grants, what has expired by a time (the hold and the grant both expired)';

-- both for one account (the holds are read only when one has expired;
-- PL/pgSQL and spelled out in billing.balances, as billing.effective_holds)
CREATE FUNCTION billing.expired_micros(a billing.accounts, at timestamptz) RETURNS bigint
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF a.grants_state IS NULL THEN
        RETURN 0;
    END IF;
    IF a.holds_next_expiry IS NULL OR a.holds_next_expiry > at THEN
        RETURN billing.grants_expired(a.grants_state, at);
    END IF;
    RETURN billing.grants_expired(a.grants_state, at)
           + (SELECT coalesce(sum(billing.shares_expired(a.grants_state, h.grant_draws,
                                                        h.expires_at, at)), 0)::bigint
                FROM billing.holds h
               WHERE h.tenant_id = a.tenant_id AND h.status = 'open'
                 AND h.expires_at <= at AND h.grant_draws IS NOT NULL);
END;
$$;
COMMENT ON FUNCTION billing.expired_micros(billing.accounts, timestamptz) IS 'what an account''s cached balance still holds of expired grants (the views and billing_balance_at subtract it)';
REVOKE ALL ON FUNCTION billing.expired_micros(billing.accounts, timestamptz) FROM PUBLIC;

CREATE OR REPLACE VIEW billing.balances WITH (security_barrier) AS
SELECT a.tenant_id,
       a.currency,
       a.status,
       billing.to_amount(a.balance_micros - billing.expired_micros(a, now())) AS balance,
       billing.to_amount(a.credit_limit_micros)                    AS credit_limit,
       billing.to_amount(billing.effective_holds(a))               AS on_hold,
       billing.to_amount(a.balance_micros - billing.expired_micros(a, now()))
           + billing.to_amount(a.credit_limit_micros)
           - billing.to_amount(billing.effective_holds(a))          AS available,
       a.version,
       a.last_entry_at,
       a.timezone,
       a.metadata,
       a.created_at,
       a.updated_at
  FROM billing.accounts a
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR a.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));

CREATE OR REPLACE VIEW billing.ledger WITH (security_barrier) AS
SELECT e.entry_id,
       e.tenant_id,
       e.trace_id,
       e.kind,
       billing.to_amount(e.amount_micros)        AS amount,
       billing.to_amount(e.balance_after_micros) AS balance_after,
       e.version,
       e.description,
       e.metadata->>'model'                      AS model,
       coalesce(e.api_key, e.metadata->>'api_key') AS api_key,
       e.hold_id,
       e.metadata,
       e.event_at,
       e.created_at,
       e.actor,
       e.grant_id,
       e.refund_of
  FROM billing.entries e
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
-- billing_verify() also replays the buckets from the ledger (and checks
-- finished jobs against their charge and hold: a restore loads jobs in no
-- order, issue 13)
DROP FUNCTION billing.verify_entries(text);
CREATE FUNCTION billing.verify_entries(tenant_id text)
    RETURNS TABLE (tenant_id text, total numeric, n bigint, breaks bigint,
                   first_break bigint, max_version bigint, invalid bigint,
                   grants bigint[], grants_negative bigint)
    AS 'MODULE_PATHNAME', 'billing_verify_entries'
    LANGUAGE C STABLE;

COMMENT ON FUNCTION billing.verify_entries(text) IS
    'per-tenant facts of the ledger in one pass (internal: billing_verify); NULL: every tenant';

REVOKE ALL ON FUNCTION billing.verify_entries(text) FROM PUBLIC;

-- the grants and the refunds (schema/25_grants.sql)
CREATE SEQUENCE billing.grant_id_seq;
CREATE TABLE billing.grants (
    tenant_id       text        NOT NULL,
    grant_id        bigint      NOT NULL DEFAULT nextval('billing.grant_id_seq'),
    entry_id        bigint      NOT NULL,   -- the grant's ledger entry
    trace_id        text        NOT NULL,
    category        text        NOT NULL,
    priority        integer     NOT NULL,
    granted_micros  bigint      NOT NULL,   -- the credit
    amount_micros   bigint      NOT NULL,   -- what went into the bucket (debt was paid back first)
    expires_at      timestamptz,            -- NULL: never
    description     text,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL,
    CONSTRAINT grants_pkey PRIMARY KEY (tenant_id, grant_id),
    CONSTRAINT grants_entry_key UNIQUE (tenant_id, entry_id),
    CONSTRAINT grants_category_check CHECK (category IN ('promotional', 'paid')),
    CONSTRAINT grants_priority_check CHECK (priority BETWEEN 0 AND 1000),
    CONSTRAINT grants_amount_check CHECK (granted_micros > 0 AND amount_micros BETWEEN 0 AND granted_micros)
);
ALTER SEQUENCE billing.grant_id_seq OWNED BY billing.grants.grant_id;
COMMENT ON TABLE billing.grants IS 'grants (credit buckets with a category, a priority and an optional expiry); what is left in an open one is on its account row (grants_state)';
CREATE TRIGGER grants_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.grants
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'A grant is never rewritten: what is left of it is on its account row.');
ALTER TABLE billing.grants ENABLE ALWAYS TRIGGER grants_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.grants', '');
SELECT pg_catalog.pg_extension_config_dump('billing.grant_id_seq', '');

CREATE TABLE billing.refunds (
    tenant_id        text        NOT NULL,
    charge_entry_id  bigint      NOT NULL,
    refund_entry_id  bigint      NOT NULL,
    amount_micros    bigint      NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT refunds_pkey PRIMARY KEY (tenant_id, charge_entry_id, refund_entry_id),
    CONSTRAINT refunds_amount_check CHECK (amount_micros > 0)
);
COMMENT ON TABLE billing.refunds IS 'append-only: which refund entry gave back how much of which charge';
CREATE TRIGGER refunds_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.refunds
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'A refund is final: refund the rest with another billing_refund().');
ALTER TABLE billing.refunds ENABLE ALWAYS TRIGGER refunds_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.refunds', '');

CREATE TYPE billing.grant_result AS (
    grant_id        bigint,
    tenant_id       text,
    trace_id        text,
    category        text,
    priority        integer,
    granted         numeric,      -- the credit
    amount          numeric,      -- what went into the bucket (debt is paid back first)
    expires_at      timestamptz,
    entry_id        bigint,
    balance_after   numeric,
    version         bigint,
    created_at      timestamptz,
    replayed        boolean
);

CREATE TYPE billing.refund_result AS (
    entry_id         bigint,
    tenant_id        text,
    trace_id         text,        -- the refund's
    charge_trace_id  text,
    charge_entry_id  bigint,
    amount           numeric,
    refunded         numeric,     -- of the charge, by every refund so far
    refundable       numeric,     -- of the charge, still
    balance_after    numeric,
    version          bigint,
    created_at       timestamptz,
    replayed         boolean
);

CREATE FUNCTION @extschema@.billing_grant(tenant_id text, amount numeric, trace_id text,
                              expires_at timestamptz DEFAULT NULL,
                              priority integer DEFAULT 0,
                              category text DEFAULT 'promotional',
                              description text DEFAULT NULL,
                              metadata jsonb DEFAULT NULL)
    RETURNS billing.grant_result
    AS 'MODULE_PATHNAME', 'billing_grant'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_grant(text, numeric, text, timestamptz, integer, text, text, jsonb) IS
    'credit a bucket of its own: spent before the wallet in burn order (priority, then earliest expiry, then oldest); what is left of it at expires_at leaves the balance; idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_grant(text, numeric, text, timestamptz, integer, text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_refund(tenant_id text, charge_trace_id text, amount numeric, trace_id text,
                               reason text DEFAULT NULL)
    RETURNS billing.refund_result
    AS 'MODULE_PATHNAME', 'billing_refund'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_refund(text, text, numeric, text, text) IS
    'give back (part of) a charge, to the buckets it came from; never more than it charged minus earlier refunds (ZB091); idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_refund(text, text, numeric, text, text) FROM PUBLIC;

-- grants: every grant with what is left of it (open ones: on the account
-- row), what open holds reserve of it, what expired of it, and its status.
-- A share of an expired hold came back to its grant when the hold expired:
-- spendable, or expired with the grant (as billing.balances counts it).
CREATE VIEW billing.grant_balances WITH (security_barrier) AS
WITH state AS (
    SELECT a.tenant_id, a.grants_state[i] AS grant_id, a.grants_state[i + 1] AS remaining
      FROM billing.accounts a,
           generate_series(1, coalesce(array_length(a.grants_state, 1), 0), 5) AS i
), held AS (
    SELECT h.tenant_id, h.grant_draws[i] AS grant_id,
           coalesce(sum(h.grant_draws[i + 1]) FILTER (WHERE h.expires_at > now()), 0) AS reserved,
           coalesce(sum(h.grant_draws[i + 1]) FILTER (WHERE h.expires_at <= now()), 0) AS freed
      FROM billing.holds h,
           generate_series(1, coalesce(array_length(h.grant_draws, 1), 0), 2) AS i
     WHERE h.status = 'open'
     GROUP BY 1, 2
), expired AS (
    SELECT e.tenant_id, e.grant_id, -sum(e.amount_micros) AS expired
      FROM billing.entries e
     WHERE e.kind = 'expire'
     GROUP BY 1, 2
)
SELECT g.tenant_id,
       g.grant_id,
       g.trace_id,
       g.category,
       g.priority,
       billing.to_amount(g.granted_micros) AS granted,
       billing.to_amount(CASE WHEN g.expires_at <= now() THEN 0
                              ELSE coalesce(s.remaining, 0) + coalesce(r.freed, 0) END::bigint) AS remaining,
       billing.to_amount(coalesce(r.reserved, 0)::bigint) AS reserved,
       billing.to_amount((coalesce(x.expired, 0)
                          + CASE WHEN g.expires_at <= now() THEN coalesce(s.remaining, 0) + coalesce(r.freed, 0)
                                 ELSE 0 END)::bigint) AS expired,
       g.expires_at,
       CASE WHEN coalesce(r.reserved, 0) > 0 THEN 'open'
            WHEN g.expires_at <= now() THEN 'expired'
            WHEN coalesce(s.remaining, 0) + coalesce(r.freed, 0) > 0 THEN 'open'
            ELSE 'used' END AS status,
       g.description,
       g.created_at
  FROM billing.grants g
  LEFT JOIN state s ON s.tenant_id = g.tenant_id AND s.grant_id = g.grant_id
  LEFT JOIN held r ON r.tenant_id = g.tenant_id AND r.grant_id = g.grant_id
  LEFT JOIN expired x ON x.tenant_id = g.tenant_id AND x.grant_id = g.grant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR g.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.grant_balances IS 'every grant: granted, left (remaining, reserved by open holds), expired, status (open: something left or reserved; used; expired)';

-- which grant buckets each charge drew from, each refund gave back to, and
-- each grant filled
CREATE VIEW billing.grant_draws WITH (security_barrier) AS
SELECT e.tenant_id,
       e.entry_id,
       e.trace_id,
       e.kind,
       g.grant_id,
       g.trace_id AS grant_trace_id,
       g.category,
       billing.to_amount(CASE WHEN e.amount_micros > 0 THEN e.draws[i + 1] ELSE -e.draws[i + 1] END) AS amount,
       e.refund_of,
       e.created_at
  FROM billing.entries e
 CROSS JOIN LATERAL generate_series(1, coalesce(array_length(e.draws, 1), 0), 2) AS i
  JOIN billing.grants g ON g.tenant_id = e.tenant_id AND g.grant_id = e.draws[i]
 WHERE e.draws IS NOT NULL
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.grant_draws IS 'what charges drew from grant buckets (negative), and grants and refunds put into them (positive); the rest of each entry is the wallet''s';

-- breakage: credit that expired unused, per tenant, month (account time zone)
-- and category
CREATE VIEW billing.breakage WITH (security_barrier) AS
SELECT e.tenant_id,
       date_trunc('month', e.event_at AT TIME ZONE a.timezone)::date AS month,
       g.category,
       count(*) AS expiries,
       billing.to_amount_sum(-sum(e.amount_micros)) AS expired
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN billing.grants g ON g.tenant_id = e.tenant_id AND g.grant_id = e.grant_id
 WHERE e.kind = 'expire'
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.breakage IS 'grant credit that expired unused, per tenant, month (account time zone, by expiry time) and category';

-- refunds per charge
CREATE VIEW billing.refunded_charges WITH (security_barrier) AS
SELECT c.tenant_id,
       c.trace_id AS charge_trace_id,
       c.entry_id AS charge_entry_id,
       c.kind,
       billing.to_amount(-c.amount_micros) AS charged,
       billing.to_amount(sum(r.amount_micros)::bigint) AS refunded,
       billing.to_amount((-c.amount_micros - sum(r.amount_micros))::bigint) AS refundable,
       count(*) AS refunds,
       max(r.created_at) AS last_refunded_at
  FROM billing.refunds r
  JOIN billing.entries c ON c.tenant_id = r.tenant_id AND c.entry_id = r.charge_entry_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4, 5;
COMMENT ON VIEW billing.refunded_charges IS 'charges that were refunded: charged, refunded so far, still refundable';

-- ---------------------------------------------------------------------------
-- issue 16, part 3 and 4 (usage): prices the way providers bill
-- (rates per 1M tokens of each kind, per request, per second; per-tenant
-- overrides; the usage views net refunds against their charge)
-- ---------------------------------------------------------------------------

-- billing_cost, billing_deduct_usage and billing_price_set get new trailing
-- arguments (so 1.3's calls by position and by name work as before), and
-- price_list and the usage views new columns: they are dropped and created
-- again.  A DROP takes the grants users made on them along; they are noted
-- here and given again below to the objects that replace them.
SELECT pg_catalog.set_config('billing_upgrade.pricing_acl', coalesce((
    SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
               'kind', x.kind, 'new', x.new, 'owner', x.owner::text, 'acl', x.acl::text, 'init', x.init::text))::text
      FROM (SELECT 'FUNCTION' AS kind, n.new, p.proowner AS owner, p.proacl AS acl, ip.initprivs AS init
              FROM (VALUES ('@extschema@.billing_cost(text, bigint, bigint, timestamptz, text)', '@extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text)'),
               ('@extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text)', '@extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric)'),
               ('@extschema@.billing_price_set(text, numeric, numeric, timestamptz, text)', '@extschema@.billing_price_set(text, numeric, numeric, timestamptz, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric)')) AS n(old, new)
              JOIN pg_catalog.pg_proc p ON p.oid = n.old::pg_catalog.regprocedure
              LEFT JOIN pg_catalog.pg_init_privs ip
                     ON ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND ip.objoid = p.oid AND ip.objsubid = 0
            UNION ALL
            SELECT 'TABLE', c.oid::pg_catalog.regclass::text, c.relowner, c.relacl, ip.initprivs
              FROM pg_catalog.pg_class c
              LEFT JOIN pg_catalog.pg_init_privs ip
                     ON ip.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass AND ip.objoid = c.oid AND ip.objsubid = 0
             WHERE c.oid IN ('billing.price_list'::pg_catalog.regclass, 'billing.usage_daily'::pg_catalog.regclass, 'billing.usage_monthly'::pg_catalog.regclass, 'billing.usage_by_model'::pg_catalog.regclass, 'billing.usage_by_api_key'::pg_catalog.regclass)) AS x), '[]'), true);

DROP FUNCTION @extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text);
DROP FUNCTION @extschema@.billing_cost(text, bigint, bigint, timestamptz, text);
DROP FUNCTION @extschema@.billing_price_set(text, numeric, numeric, timestamptz, text);
DROP FUNCTION billing.cost_micros(billing.prices, bigint, bigint);
DROP FUNCTION billing.price_at(text, text, timestamptz);
DROP VIEW billing.price_list;
DROP VIEW billing.usage_daily;
DROP VIEW billing.usage_monthly;
DROP VIEW billing.usage_by_model;
DROP VIEW billing.usage_by_api_key;

-- 1.3's prices per 1,000 tokens become prices per 1M tokens, exactly
-- (x 1000); a rate over 10^12 per 1M tokens (the limit of every amount)
-- cannot be kept and stops the upgrade
DO $$
DECLARE
    p billing.prices;
BEGIN
    SELECT * INTO p FROM billing.prices x
     WHERE x.input_per_1k_micros > 1000000000000000 OR x.output_per_1k_micros > 1000000000000000
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the price of % in % effective from % is too large to convert to a price per 1M tokens',
                        p.model, p.currency, p.effective_from
            USING ERRCODE = 'ZB013',
                  DETAIL = pg_catalog.format('Per 1,000 tokens: input %s, output %s; the largest rate is 1000000000 per 1,000 tokens.',
                                             billing.to_amount(p.input_per_1k_micros), billing.to_amount(p.output_per_1k_micros)),
                  HINT = 'No provider charges that much: check the price, and ask for help before upgrading.';
    END IF;
END
$$;
ALTER TABLE billing.prices DROP CONSTRAINT prices_check;
ALTER TABLE billing.prices RENAME COLUMN input_per_1k_micros TO input_per_1m_micros;
ALTER TABLE billing.prices RENAME COLUMN output_per_1k_micros TO output_per_1m_micros;
ALTER TABLE billing.prices
    ALTER COLUMN input_per_1m_micros DROP NOT NULL,
    ALTER COLUMN input_per_1m_micros TYPE bigint USING input_per_1m_micros * 1000,
    ALTER COLUMN output_per_1m_micros DROP NOT NULL,
    ALTER COLUMN output_per_1m_micros TYPE bigint USING output_per_1m_micros * 1000,
    ADD COLUMN cached_input_per_1m_micros bigint,
    ADD COLUMN cache_write_per_1m_micros bigint,
    ADD COLUMN reasoning_per_1m_micros bigint,
    ADD COLUMN per_request_micros bigint,
    ADD COLUMN per_second_micros bigint,
    ADD CONSTRAINT prices_check CHECK (
        input_per_1m_micros >= 0 AND output_per_1m_micros >= 0
        AND cached_input_per_1m_micros >= 0 AND cache_write_per_1m_micros >= 0
        AND reasoning_per_1m_micros >= 0 AND per_request_micros >= 0 AND per_second_micros >= 0
        AND num_nonnulls(input_per_1m_micros, output_per_1m_micros, cached_input_per_1m_micros,
                         cache_write_per_1m_micros, reasoning_per_1m_micros, per_request_micros,
                         per_second_micros) > 0);
COMMENT ON TABLE billing.prices IS 'list prices per model and currency, with history (per 1M tokens of each kind, per request, per second; NULL: not offered): a charge uses the price effective at its event time';

-- the overrides, the price list and the pricing functions (schema/60_pricing.sql)
CREATE TABLE billing.price_overrides (
    tenant_id                   text        NOT NULL,
    model                       text        NOT NULL,
    currency                    text        NOT NULL,
    effective_from              timestamptz NOT NULL,
    list_price                  boolean     NOT NULL DEFAULT false,
    input_per_1m_micros         bigint,
    cached_input_per_1m_micros  bigint,
    cache_write_per_1m_micros   bigint,
    output_per_1m_micros        bigint,
    reasoning_per_1m_micros     bigint,
    per_request_micros          bigint,
    per_second_micros           bigint,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT price_overrides_pkey PRIMARY KEY (tenant_id, model, currency, effective_from),
    CONSTRAINT price_overrides_check CHECK (
        input_per_1m_micros >= 0 AND output_per_1m_micros >= 0
        AND cached_input_per_1m_micros >= 0 AND cache_write_per_1m_micros >= 0
        AND reasoning_per_1m_micros >= 0 AND per_request_micros >= 0 AND per_second_micros >= 0
        AND CASE WHEN list_price
                 THEN num_nonnulls(input_per_1m_micros, output_per_1m_micros, cached_input_per_1m_micros,
                                   cache_write_per_1m_micros, reasoning_per_1m_micros, per_request_micros,
                                   per_second_micros) = 0
                 ELSE num_nonnulls(input_per_1m_micros, output_per_1m_micros, cached_input_per_1m_micros,
                                   cache_write_per_1m_micros, reasoning_per_1m_micros, per_request_micros,
                                   per_second_micros) > 0 END)
);
COMMENT ON TABLE billing.price_overrides IS 'a tenant''s own prices (enterprise plans), with history: each row wins over the list price for that tenant from effective_from on; a list_price row ends the override';
COMMENT ON COLUMN billing.price_overrides.list_price IS 'true: from effective_from on the tenant pays the list price again (no rates)';

CREATE TRIGGER price_overrides_no_rewrite
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.price_overrides
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Price overrides keep their history: add a new one with a later effective_from via billing_price_override_set() or billing_price_override_end().');
ALTER TABLE billing.price_overrides ENABLE ALWAYS TRIGGER price_overrides_no_rewrite;
SELECT pg_catalog.pg_extension_config_dump('billing.price_overrides', '');

CREATE VIEW billing.price_list AS
SELECT p.model,
       p.currency,
       billing.to_amount(p.input_per_1m_micros)        AS input_per_1m,
       billing.to_amount(p.cached_input_per_1m_micros) AS cached_input_per_1m,
       billing.to_amount(p.cache_write_per_1m_micros)  AS cache_write_per_1m,
       billing.to_amount(p.output_per_1m_micros)       AS output_per_1m,
       billing.to_amount(p.reasoning_per_1m_micros)    AS reasoning_per_1m,
       billing.to_amount(p.per_request_micros)         AS per_request,
       billing.to_amount(p.per_second_micros)          AS per_second,
       p.effective_from,
       lead(p.effective_from) OVER w AS effective_until,
       p.effective_from <= now() AND coalesce(lead(p.effective_from) OVER w > now(), true) AS is_current
  FROM billing.prices p
WINDOW w AS (PARTITION BY p.model, p.currency ORDER BY p.effective_from);
COMMENT ON VIEW billing.price_list IS 'list prices per model and currency (per 1M tokens, per request, per second; NULL: not offered) with their validity window';

CREATE VIEW billing.price_override_list WITH (security_barrier) AS
SELECT o.tenant_id,
       o.model,
       o.currency,
       billing.to_amount(o.input_per_1m_micros)        AS input_per_1m,
       billing.to_amount(o.cached_input_per_1m_micros) AS cached_input_per_1m,
       billing.to_amount(o.cache_write_per_1m_micros)  AS cache_write_per_1m,
       billing.to_amount(o.output_per_1m_micros)       AS output_per_1m,
       billing.to_amount(o.reasoning_per_1m_micros)    AS reasoning_per_1m,
       billing.to_amount(o.per_request_micros)         AS per_request,
       billing.to_amount(o.per_second_micros)          AS per_second,
       o.effective_from,
       o.effective_until,
       o.effective_from <= now() AND coalesce(o.effective_until > now(), true) AS is_current
  FROM (SELECT x.*, lead(x.effective_from) OVER w AS effective_until
          FROM billing.price_overrides x
         WHERE ((SELECT billing.visible_tenants()) IS NULL OR x.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
        WINDOW w AS (PARTITION BY x.tenant_id, x.model, x.currency ORDER BY x.effective_from)) o
 WHERE NOT o.list_price;
COMMENT ON VIEW billing.price_override_list IS 'tenants'' own prices per model with their validity window (an override ends at the next one, or where the tenant goes back to the list price)';

-- the rates of a price as micro-units, checked: each one NULL (not offered)
-- or an amount >= 0 with at most 6 decimals (ZB010-ZB013); at least one
-- given (ZB015).  Order: input, output, cached input, cache write,
-- reasoning (per 1M tokens), per request, per second.
CREATE FUNCTION billing.check_rates(input_per_1m numeric, output_per_1m numeric,
                                    cached_input_per_1m numeric, cache_write_per_1m numeric,
                                    reasoning_per_1m numeric, per_request numeric, per_second numeric)
    RETURNS bigint[]
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF num_nonnulls(input_per_1m, output_per_1m, cached_input_per_1m, cache_write_per_1m,
                    reasoning_per_1m, per_request, per_second) = 0 THEN
        RAISE EXCEPTION 'a price needs at least one rate'
            USING ERRCODE = 'ZB015',
                  HINT = 'Pass the rates the provider quotes, e.g. input_per_1m => 3, output_per_1m => 15; 0 for a free one.';
    END IF;
    RETURN ARRAY[billing.to_micros(input_per_1m, 'input_per_1m', true),
                 billing.to_micros(output_per_1m, 'output_per_1m', true),
                 billing.to_micros(cached_input_per_1m, 'cached_input_per_1m', true),
                 billing.to_micros(cache_write_per_1m, 'cache_write_per_1m', true),
                 billing.to_micros(reasoning_per_1m, 'reasoning_per_1m', true),
                 billing.to_micros(per_request, 'per_request', true),
                 billing.to_micros(per_second, 'per_second', true)];
END;
$$;
REVOKE ALL ON FUNCTION billing.check_rates(numeric, numeric, numeric, numeric, numeric, numeric, numeric) FROM PUBLIC;

-- a rate of 1.3's API (per 1,000 tokens) as micro-units per 1M tokens,
-- exactly (x 1000); the per-1M limit is that of every amount
CREATE FUNCTION billing.rate_per_1k(per_1k numeric, argname text) RETURNS numeric
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    micros bigint := billing.to_micros(per_1k, argname, true);   -- ZB010-ZB013, as in 1.3
BEGIN
    IF micros > 1000000000000000 THEN
        RAISE EXCEPTION '% is out of range', argname
            USING ERRCODE = 'ZB013',
                  DETAIL = format('The value given was %s; the largest allowed is 1000000000 (10^12 per 1M tokens).',
                                  billing.to_amount(micros)),
                  HINT = 'Pass the rate per 1M tokens instead (input_per_1m, output_per_1m).';
    END IF;
    RETURN billing.to_amount(micros) * 1000;
END;
$$;
REVOKE ALL ON FUNCTION billing.rate_per_1k(numeric, text) FROM PUBLIC;

-- "input_per_1m: existing 3.000000, requested 2.500000; ..." for ZB006
CREATE FUNCTION billing.rates_differ(was bigint[], requested bigint[]) RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(format('%s: existing %s, requested %s', n.name,
                             coalesce(billing.to_amount(was[n.i])::text, 'none'),
                             coalesce(billing.to_amount(requested[n.i])::text, 'none')), '; ' ORDER BY n.i) || '.'
      FROM unnest(ARRAY['input_per_1m', 'output_per_1m', 'cached_input_per_1m', 'cache_write_per_1m',
                        'reasoning_per_1m', 'per_request', 'per_second']) WITH ORDINALITY AS n(name, i)
     WHERE was[n.i] IS DISTINCT FROM requested[n.i]
$$;
REVOKE ALL ON FUNCTION billing.rates_differ(bigint[], bigint[]) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_price_set(model text, input_per_1k numeric DEFAULT NULL,
                                  output_per_1k numeric DEFAULT NULL,
                                  effective_from timestamptz DEFAULT now(),
                                  currency text DEFAULT 'USD',
                                  input_per_1m numeric DEFAULT NULL,
                                  output_per_1m numeric DEFAULT NULL,
                                  cached_input_per_1m numeric DEFAULT NULL,
                                  cache_write_per_1m numeric DEFAULT NULL,
                                  reasoning_per_1m numeric DEFAULT NULL,
                                  per_request numeric DEFAULT NULL,
                                  per_second numeric DEFAULT NULL)
    RETURNS SETOF billing.price_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r bigint[];
    was billing.prices;
BEGIN
    IF billing_price_set.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name as gateways report it, e.g. gpt-4o.';
    END IF;
    PERFORM billing.check_id(billing_price_set.model, 'model', 'ZB018');
    IF billing_price_set.effective_from IS NULL OR NOT isfinite(billing_price_set.effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite timestamp'
            USING ERRCODE = CASE WHEN billing_price_set.effective_from IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass when the price starts to apply, e.g. now() or ''2027-01-01 00:00+00''.';
    END IF;
    PERFORM billing.check_account_settings('-', billing_price_set.currency, NULL, NULL, NULL);
    IF billing_price_set.currency IS NULL THEN
        RAISE EXCEPTION 'currency must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass e.g. USD.';
    END IF;
    IF billing_price_set.input_per_1k IS NOT NULL AND billing_price_set.input_per_1m IS NOT NULL
       OR billing_price_set.output_per_1k IS NOT NULL AND billing_price_set.output_per_1m IS NOT NULL THEN
        RAISE EXCEPTION 'pass a rate per 1M tokens or per 1,000 tokens, not both'
            USING ERRCODE = 'ZB018',
                  HINT = 'Pass input_per_1m and output_per_1m (input_per_1k and output_per_1k are 1.3''s arguments).';
    END IF;
    -- 1.3's rates per 1,000 tokens are stored exactly, per 1M tokens
    r := billing.check_rates(coalesce(billing_price_set.input_per_1m,
                                      billing.rate_per_1k(billing_price_set.input_per_1k, 'input_per_1k')),
                             coalesce(billing_price_set.output_per_1m,
                                      billing.rate_per_1k(billing_price_set.output_per_1k, 'output_per_1k')),
                             billing_price_set.cached_input_per_1m, billing_price_set.cache_write_per_1m,
                             billing_price_set.reasoning_per_1m, billing_price_set.per_request,
                             billing_price_set.per_second);
    INSERT INTO billing.prices (model, currency, effective_from, input_per_1m_micros, output_per_1m_micros,
                                cached_input_per_1m_micros, cache_write_per_1m_micros, reasoning_per_1m_micros,
                                per_request_micros, per_second_micros)
    VALUES (billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from,
            r[1], r[2], r[3], r[4], r[5], r[6], r[7])
    ON CONFLICT (model, currency, effective_from) DO NOTHING;
    IF NOT FOUND THEN
        SELECT * INTO was FROM billing.prices p
         WHERE p.model = billing_price_set.model AND p.currency = billing_price_set.currency
           AND p.effective_from = billing_price_set.effective_from;
        IF ARRAY[was.input_per_1m_micros, was.output_per_1m_micros, was.cached_input_per_1m_micros,
                 was.cache_write_per_1m_micros, was.reasoning_per_1m_micros, was.per_request_micros,
                 was.per_second_micros] IS DISTINCT FROM r THEN
            RAISE EXCEPTION 'a different price for % in % is already effective from %',
                            billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from
                USING ERRCODE = 'ZB006',
                      DETAIL = billing.rates_differ(ARRAY[was.input_per_1m_micros, was.output_per_1m_micros,
                                                          was.cached_input_per_1m_micros, was.cache_write_per_1m_micros,
                                                          was.reasoning_per_1m_micros, was.per_request_micros,
                                                          was.per_second_micros], r),
                      HINT = 'Prices are history: add the new price with a later effective_from.';
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM billing.price_list l
                  WHERE l.model = billing_price_set.model AND l.currency = billing_price_set.currency;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_price_set(text, numeric, numeric, timestamptz, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric) IS
    'add a list price for a model (per 1M input, cached input, cache write, output and reasoning tokens, per request, per second), effective from a time (history is kept)';
REVOKE ALL ON FUNCTION @extschema@.billing_price_set(text, numeric, numeric, timestamptz, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric) FROM PUBLIC;

-- the account of an override, or ZB001 / ZB003; its currency
CREATE FUNCTION billing.override_account(tenant_id text) RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc billing.accounts;
BEGIN
    PERFORM billing.check_account_settings(override_account.tenant_id, NULL, NULL, NULL, NULL);
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = override_account.tenant_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', override_account.tenant_id
            USING ERRCODE = 'ZB001',
                  HINT = format('Create it first with billing_account_create(%L).', override_account.tenant_id);
    END IF;
    IF acc.status = 'closed' THEN
        RAISE EXCEPTION 'account "%" is closed', override_account.tenant_id
            USING ERRCODE = 'ZB003',
                  DETAIL = 'A closed account cannot be changed or reopened.',
                  HINT = 'Closed is final: open a new account for this customer.';
    END IF;
    RETURN acc.currency;
END;
$$;
REVOKE ALL ON FUNCTION billing.override_account(text) FROM PUBLIC;

-- record one override row (rates, or a return to the list price) unless the
-- same row exists; another row at the same time is ZB006
CREATE FUNCTION billing.override_insert(o billing.price_overrides) RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was billing.price_overrides;
BEGIN
    INSERT INTO billing.price_overrides (tenant_id, model, currency, effective_from, list_price,
                                         input_per_1m_micros, cached_input_per_1m_micros,
                                         cache_write_per_1m_micros, output_per_1m_micros,
                                         reasoning_per_1m_micros, per_request_micros, per_second_micros)
    VALUES (o.tenant_id, o.model, o.currency, o.effective_from, o.list_price,
            o.input_per_1m_micros, o.cached_input_per_1m_micros, o.cache_write_per_1m_micros,
            o.output_per_1m_micros, o.reasoning_per_1m_micros, o.per_request_micros, o.per_second_micros)
    ON CONFLICT (tenant_id, model, currency, effective_from) DO NOTHING;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO was FROM billing.price_overrides x
     WHERE x.tenant_id = o.tenant_id AND x.model = o.model AND x.currency = o.currency
       AND x.effective_from = o.effective_from;
    IF was.list_price IS DISTINCT FROM o.list_price
       OR ARRAY[was.input_per_1m_micros, was.output_per_1m_micros, was.cached_input_per_1m_micros,
                was.cache_write_per_1m_micros, was.reasoning_per_1m_micros, was.per_request_micros,
                was.per_second_micros]
          IS DISTINCT FROM
          ARRAY[o.input_per_1m_micros, o.output_per_1m_micros, o.cached_input_per_1m_micros,
                o.cache_write_per_1m_micros, o.reasoning_per_1m_micros, o.per_request_micros,
                o.per_second_micros] THEN
        RAISE EXCEPTION 'a different price override for % of tenant "%" is already effective from %',
                        o.model, o.tenant_id, o.effective_from
            USING ERRCODE = 'ZB006',
                  DETAIL = CASE WHEN was.list_price THEN 'From then on the tenant pays the list price.'
                                WHEN o.list_price THEN 'From then on the tenant has its own price.'
                                ELSE billing.rates_differ(
                                         ARRAY[was.input_per_1m_micros, was.output_per_1m_micros,
                                               was.cached_input_per_1m_micros, was.cache_write_per_1m_micros,
                                               was.reasoning_per_1m_micros, was.per_request_micros,
                                               was.per_second_micros],
                                         ARRAY[o.input_per_1m_micros, o.output_per_1m_micros,
                                               o.cached_input_per_1m_micros, o.cache_write_per_1m_micros,
                                               o.reasoning_per_1m_micros, o.per_request_micros,
                                               o.per_second_micros]) END,
                  HINT = 'Overrides are history: add the new one with a later effective_from.';
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.override_insert(billing.price_overrides) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_price_override_set(tenant_id text, model text,
                                           input_per_1m numeric DEFAULT NULL,
                                           output_per_1m numeric DEFAULT NULL,
                                           cached_input_per_1m numeric DEFAULT NULL,
                                           cache_write_per_1m numeric DEFAULT NULL,
                                           reasoning_per_1m numeric DEFAULT NULL,
                                           per_request numeric DEFAULT NULL,
                                           per_second numeric DEFAULT NULL,
                                           effective_from timestamptz DEFAULT now())
    RETURNS SETOF billing.price_override_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o billing.price_overrides;
    r bigint[];
BEGIN
    o.currency := billing.override_account(billing_price_override_set.tenant_id);
    IF billing_price_override_set.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name as gateways report it, e.g. gpt-4o.';
    END IF;
    PERFORM billing.check_id(billing_price_override_set.model, 'model', 'ZB018');
    IF billing_price_override_set.effective_from IS NULL OR NOT isfinite(billing_price_override_set.effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite timestamp'
            USING ERRCODE = CASE WHEN billing_price_override_set.effective_from IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass when the price starts to apply, e.g. now() or ''2027-01-01 00:00+00''.';
    END IF;
    r := billing.check_rates(billing_price_override_set.input_per_1m, billing_price_override_set.output_per_1m,
                             billing_price_override_set.cached_input_per_1m,
                             billing_price_override_set.cache_write_per_1m,
                             billing_price_override_set.reasoning_per_1m, billing_price_override_set.per_request,
                             billing_price_override_set.per_second);
    o.tenant_id := billing_price_override_set.tenant_id;
    o.model := billing_price_override_set.model;
    o.effective_from := billing_price_override_set.effective_from;
    o.list_price := false;
    o.input_per_1m_micros := r[1];
    o.output_per_1m_micros := r[2];
    o.cached_input_per_1m_micros := r[3];
    o.cache_write_per_1m_micros := r[4];
    o.reasoning_per_1m_micros := r[5];
    o.per_request_micros := r[6];
    o.per_second_micros := r[7];
    PERFORM billing.override_insert(o);
    RETURN QUERY SELECT * FROM billing.price_override_list l
                  WHERE l.tenant_id = o.tenant_id AND l.model = o.model AND l.currency = o.currency;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_price_override_set(text, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric, timestamptz) IS
    'give a tenant its own price for a model (wins over the list price), effective from a time (history is kept)';
REVOKE ALL ON FUNCTION @extschema@.billing_price_override_set(text, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric, timestamptz) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_price_override_end(tenant_id text, model text,
                                           effective_from timestamptz DEFAULT now())
    RETURNS SETOF billing.price_override_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o billing.price_overrides;
    before billing.price_overrides;
BEGIN
    o.currency := billing.override_account(billing_price_override_end.tenant_id);
    IF billing_price_override_end.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name of the override.';
    END IF;
    PERFORM billing.check_id(billing_price_override_end.model, 'model', 'ZB018');
    IF billing_price_override_end.effective_from IS NULL OR NOT isfinite(billing_price_override_end.effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite timestamp'
            USING ERRCODE = CASE WHEN billing_price_override_end.effective_from IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass when the list price applies again, e.g. now().';
    END IF;
    o.tenant_id := billing_price_override_end.tenant_id;
    o.model := billing_price_override_end.model;
    o.effective_from := billing_price_override_end.effective_from;
    o.list_price := true;
    -- an override must be in effect just before (unless this is a replay)
    SELECT * INTO before FROM billing.price_overrides x
     WHERE x.tenant_id = o.tenant_id AND x.model = o.model AND x.currency = o.currency
       AND x.effective_from <= o.effective_from
     ORDER BY x.effective_from DESC LIMIT 1;
    IF NOT FOUND OR (before.list_price AND before.effective_from < o.effective_from) THEN
        RAISE EXCEPTION 'tenant "%" has no price override for % to end at %',
                        o.tenant_id, o.model, o.effective_from
            USING ERRCODE = 'ZB060',
                  DETAIL = CASE WHEN FOUND THEN format('It pays the list price since %s.', before.effective_from)
                                ELSE format('It has no override for %s in %s before then.', o.model, o.currency) END,
                  HINT = 'See billing.price_override_list.';
    END IF;
    PERFORM billing.override_insert(o);
    RETURN QUERY SELECT * FROM billing.price_override_list l
                  WHERE l.tenant_id = o.tenant_id AND l.model = o.model AND l.currency = o.currency;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_price_override_end(text, text, timestamptz) IS
    'end a tenant''s own price for a model: from effective_from on it pays the list price again';
REVOKE ALL ON FUNCTION @extschema@.billing_price_override_end(text, text, timestamptz) FROM PUBLIC;

-- the price a tenant (NULL: anyone) pays for a model at a time: its override
-- effective then, else the list price (list_price true, tenant_id NULL);
-- or ZB060 (ZB018 for a model or currency that cannot be one)
CREATE FUNCTION billing.price_for(tenant_id text, model text, currency text, at timestamptz)
    RETURNS billing.price_overrides
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o billing.price_overrides;
    first_from timestamptz;
BEGIN
    IF price_for.tenant_id IS NOT NULL THEN
        SELECT * INTO o FROM billing.price_overrides x
         WHERE x.tenant_id = price_for.tenant_id AND x.model = price_for.model
           AND x.currency = price_for.currency AND x.effective_from <= price_for.at
         ORDER BY x.effective_from DESC LIMIT 1;
        IF FOUND AND NOT o.list_price THEN
            RETURN o;
        END IF;
    END IF;
    -- the list price, as a row of price_overrides (tenant_id NULL, list_price)
    SELECT NULL, x.model, x.currency, x.effective_from, true, x.input_per_1m_micros,
           x.cached_input_per_1m_micros, x.cache_write_per_1m_micros, x.output_per_1m_micros,
           x.reasoning_per_1m_micros, x.per_request_micros, x.per_second_micros, x.created_at
      INTO o
      FROM billing.prices x
     WHERE x.model = price_for.model AND x.currency = price_for.currency AND x.effective_from <= price_for.at
     ORDER BY x.effective_from DESC LIMIT 1;
    IF NOT FOUND THEN
        -- the errors name them: bounded (ZB018) before they are shown
        PERFORM billing.check_id(price_for.model, 'model', 'ZB018');
        PERFORM billing.check_account_settings('-', price_for.currency, NULL, NULL, NULL);
        SELECT min(x.effective_from) INTO first_from FROM billing.prices x
         WHERE x.model = price_for.model AND x.currency = price_for.currency;
        IF first_from IS NULL THEN
            RAISE EXCEPTION 'unknown model "%"', price_for.model
                USING ERRCODE = 'ZB060',
                      DETAIL = format('No price for %s in %s.', price_for.model, price_for.currency),
                      HINT = 'Add one with billing_price_set().';
        END IF;
        RAISE EXCEPTION 'no price for model "%" at %', price_for.model, price_for.at
            USING ERRCODE = 'ZB060',
                  DETAIL = format('The first price for %s in %s is effective from %s.',
                                  price_for.model, price_for.currency, first_from),
                  HINT = 'Add an earlier price with billing_price_set(), or charge a later event time.';
    END IF;
    RETURN o;
END;
$$;
REVOKE ALL ON FUNCTION billing.price_for(text, text, text, timestamptz) FROM PUBLIC;

-- the rates a usage is priced at, after the fallbacks: input, cached input
-- (else input), cache write (else input), output, reasoning (else output)
-- per 1M tokens, the fee per request (else 0), per second; NULL: no rate.
-- (No SET search_path: it names no function or operator, and without one
-- the planner inlines it into its caller's expression.)
CREATE FUNCTION billing.effective_rates(p billing.price_overrides) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[p.input_per_1m_micros,
                 coalesce(p.cached_input_per_1m_micros, p.input_per_1m_micros),
                 coalesce(p.cache_write_per_1m_micros, p.input_per_1m_micros),
                 p.output_per_1m_micros,
                 coalesce(p.reasoning_per_1m_micros, p.output_per_1m_micros),
                 coalesce(p.per_request_micros, 0),
                 p.per_second_micros]
$$;
REVOKE ALL ON FUNCTION billing.effective_rates(billing.price_overrides) FROM PUBLIC;

-- a usage -> micros, exactly: every quantity times its rate, summed in
-- numeric, rounded half up once.  Quantities: input, cached input, cache
-- write, output and reasoning tokens, requests, seconds.  Errors: ZB015
-- (NULL), ZB061 (negative, or seconds not a finite number with at most 6
-- decimals up to 10^12), ZB062 (a quantity without a rate), ZB013 (more
-- than one charge may be).
CREATE FUNCTION billing.cost_micros(p billing.price_overrides, quantities numeric[]) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    names CONSTANT text[] := ARRAY['input_tokens', 'cached_input_tokens', 'cache_write_tokens',
                                   'output_tokens', 'reasoning_tokens', 'requests', 'seconds'];
    what CONSTANT text[] := ARRAY['input tokens', 'cached input tokens', 'cache write tokens',
                                  'output tokens', 'reasoning tokens', 'requests', 'seconds'];
    rates bigint[] := billing.effective_rates(p);
    bad text;
    cost numeric;
    seconds numeric := quantities[7];
BEGIN
    IF array_position(quantities, NULL) IS NOT NULL THEN
        RAISE EXCEPTION '% must not be null', names[array_position(quantities, NULL)]
            USING ERRCODE = 'ZB015', HINT = 'Pass 0 for a kind of usage that did not occur.';
    END IF;
    IF 0 > ANY (quantities) THEN
        SELECT string_agg(format('%s %s', names[i],
                                  CASE WHEN length(quantities[i]::text) <= 64 THEN quantities[i]::text
                                       ELSE billing.show(quantities[i]::text) END), ', ' ORDER BY i) INTO bad
          FROM generate_subscripts(quantities, 1) i
         WHERE quantities[i] < 0;
        RAISE EXCEPTION 'usage counts must be zero or positive'
            USING ERRCODE = 'ZB061',
                  DETAIL = bad || '.',
                  HINT = 'Pass the counts the provider reported.';
    END IF;
    IF seconds IN ('NaN', 'Infinity') OR seconds > 1000000000000 OR seconds <> round(seconds, 6) THEN
        RAISE EXCEPTION 'seconds must be a finite number of seconds with at most 6 decimal places, at most 10^12'
            USING ERRCODE = 'ZB061',
                  DETAIL = format('The value given was %s.', billing.show(seconds::text)),
                  HINT = 'Pass the duration the provider billed, e.g. 12.5.';
    END IF;
    IF quantities[1] > 0 AND rates[1] IS NULL OR quantities[2] > 0 AND rates[2] IS NULL
       OR quantities[3] > 0 AND rates[3] IS NULL OR quantities[4] > 0 AND rates[4] IS NULL
       OR quantities[5] > 0 AND rates[5] IS NULL OR quantities[7] > 0 AND rates[7] IS NULL THEN
        FOR i IN 1 .. 7 LOOP
            IF quantities[i] > 0 AND rates[i] IS NULL THEN
                RAISE EXCEPTION 'the price of model "%" has no rate for %', p.model, what[i]
                    USING ERRCODE = 'ZB062',
                          DETAIL = format('%s %s; the %s effective from %s sets no %s rate.',
                                          names[i], quantities[i],
                                          CASE WHEN p.list_price THEN 'list price'
                                               ELSE format('override of tenant "%s"', p.tenant_id) END,
                                          p.effective_from,
                                          CASE i WHEN 1 THEN 'input' WHEN 2 THEN 'cached input (nor input)'
                                                 WHEN 3 THEN 'cache write (nor input)' WHEN 4 THEN 'output'
                                                 WHEN 5 THEN 'reasoning (nor output)' ELSE 'per-second' END),
                          HINT = 'Add a price that sets the rate (billing_price_set, billing_price_override_set), or report this usage under a kind the model has a rate for.';
            END IF;
        END LOOP;
    END IF;
    -- per 1M tokens: times 0.000001, not divided (a numeric division rounds
    -- its quotient to a scale of its choosing); a count of 0 adds 0 whatever
    -- its rate
    cost := (quantities[1] * coalesce(rates[1], 0) + quantities[2] * coalesce(rates[2], 0)
             + quantities[3] * coalesce(rates[3], 0) + quantities[4] * coalesce(rates[4], 0)
             + quantities[5] * coalesce(rates[5], 0)) * 0.000001
            + quantities[6] * rates[6] + quantities[7] * coalesce(rates[7], 0);
    cost := round(cost);        -- exact so far; half up (away from zero, all terms are >= 0)
    IF cost > 1000000000000000000 THEN      -- 10^12 units, the limit of one charge
        RAISE EXCEPTION 'cost is out of range'
            USING ERRCODE = 'ZB013',
                  DETAIL = format('The usage of %s costs %s; the largest charge is 1000000000000.',
                                  p.model, cost * 0.000001),
                  HINT = 'Check the counts; split a huge usage into several charges.';
    END IF;
    RETURN cost::bigint;
END;
$$;
REVOKE ALL ON FUNCTION billing.cost_micros(billing.price_overrides, numeric[]) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_cost(model text, input_tokens bigint DEFAULT 0, output_tokens bigint DEFAULT 0,
                             at timestamptz DEFAULT now(), currency text DEFAULT NULL,
                             cached_input_tokens bigint DEFAULT 0, cache_write_tokens bigint DEFAULT 0,
                             reasoning_tokens bigint DEFAULT 0, requests bigint DEFAULT 1,
                             seconds numeric DEFAULT 0, tenant_id text DEFAULT NULL)
    RETURNS numeric
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur text := billing_cost.currency;
    acc_currency text;
BEGIN
    IF billing_cost.model IS NULL OR billing_cost.at IS NULL THEN
        RAISE EXCEPTION 'model and at must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name; at has a default (now).';
    END IF;
    IF billing_cost.tenant_id IS NOT NULL THEN
        -- the tenant's price: its override, else the list price in its currency
        PERFORM billing.check_account_settings(billing_cost.tenant_id, NULL, NULL, NULL, NULL);
        SELECT a.currency INTO acc_currency FROM billing.accounts a WHERE a.tenant_id = billing_cost.tenant_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'account "%" does not exist', billing_cost.tenant_id
                USING ERRCODE = 'ZB001',
                      HINT = format('Create it first with billing_account_create(%L).', billing_cost.tenant_id);
        END IF;
        IF cur IS NOT NULL AND cur <> acc_currency THEN
            RAISE EXCEPTION 'account "%" is billed in %, not %', billing_cost.tenant_id, acc_currency, billing.show(cur)
                USING ERRCODE = 'ZB018',
                      HINT = 'Leave currency out: a tenant''s cost is in its account''s currency.';
        END IF;
        cur := acc_currency;
    END IF;
    cur := coalesce(cur, 'USD');
    RETURN billing.to_amount(billing.cost_micros(
        billing.price_for(billing_cost.tenant_id, billing_cost.model, cur, billing_cost.at),
        ARRAY[billing_cost.input_tokens, billing_cost.cached_input_tokens, billing_cost.cache_write_tokens,
              billing_cost.output_tokens, billing_cost.reasoning_tokens, billing_cost.requests,
              billing_cost.seconds]));
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text) IS
    'exact cost of a usage at the price effective at `at` (a tenant''s override, else the list price): each count times its rate, summed, rounded half up to 6 decimals once';
REVOKE ALL ON FUNCTION @extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_deduct_usage(tenant_id text, model text,
                                     input_tokens bigint, output_tokens bigint,
                                     trace_id text,
                                     description text DEFAULT NULL,
                                     metadata jsonb DEFAULT NULL,
                                     event_at timestamptz DEFAULT NULL,
                                     api_key text DEFAULT NULL,
                                     cached_input_tokens bigint DEFAULT 0,
                                     cache_write_tokens bigint DEFAULT 0,
                                     reasoning_tokens bigint DEFAULT 0,
                                     requests bigint DEFAULT 1,
                                     seconds numeric DEFAULT 0)
    RETURNS billing.entry_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc     billing.accounts;
    priced  timestamptz;
    was     jsonb;
    p       billing.price_overrides;
    r       bigint[];
    q       numeric[];
    cost    bigint;
    usage   jsonb;
BEGIN
    IF billing_deduct_usage.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the model name.';
    END IF;
    IF billing_deduct_usage.trace_id IS NULL THEN
        RAISE EXCEPTION 'trace_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass a value for trace_id.';
    END IF;
    PERFORM billing.check_json(billing_deduct_usage.metadata, 'metadata');
    -- the account row lock first, as billing_deduct takes it: the charge is
    -- priced at the moment it is made (its created_at), not when the
    -- transaction started
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_deduct_usage.tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM billing.lock_account(billing_deduct_usage.tenant_id);   -- raises ZB015 / ZB001
    END IF;
    SELECT e.metadata INTO was FROM billing.entries e
     WHERE e.tenant_id = billing_deduct_usage.tenant_id AND e.trace_id = billing_deduct_usage.trace_id;
    IF FOUND AND (was ? 'input_per_1m' OR was ? 'input_per_1k') AND was ? 'price_effective_from' THEN
        -- a replay: priced with the unit prices its entry records, whatever
        -- the price history says since (a price set or backdated later, an
        -- override ended), so the same request always replays
        p := ROW(billing_deduct_usage.tenant_id, billing_deduct_usage.model, acc.currency,
                 (was->>'price_effective_from')::timestamptz,
                 NOT coalesce((was->>'price_override')::boolean, false),
                 CASE WHEN was ? 'input_per_1m' THEN ((was->>'input_per_1m')::numeric * 1000000)::bigint
                      ELSE ((was->>'input_per_1k')::numeric * 1000000000)::bigint END,
                 ((was->>'cached_input_per_1m')::numeric * 1000000)::bigint,
                 ((was->>'cache_write_per_1m')::numeric * 1000000)::bigint,
                 CASE WHEN was ? 'output_per_1m' THEN ((was->>'output_per_1m')::numeric * 1000000)::bigint
                      ELSE ((was->>'output_per_1k')::numeric * 1000000000)::bigint END,
                 ((was->>'reasoning_per_1m')::numeric * 1000000)::bigint,
                 ((was->>'per_request')::numeric * 1000000)::bigint,
                 ((was->>'per_second')::numeric * 1000000)::bigint,
                 NULL)::billing.price_overrides;
    ELSE
        IF NOT FOUND THEN
            -- a new charge: it is priced at its event time, which must be in
            -- the accepted window (ZB019)
            PERFORM billing.check_event_at(billing_deduct_usage.event_at);
        END IF;
        priced := coalesce(billing_deduct_usage.event_at, clock_timestamp());
        p := billing.price_for(billing_deduct_usage.tenant_id, billing_deduct_usage.model, acc.currency, priced);
    END IF;
    q := ARRAY[billing_deduct_usage.input_tokens, billing_deduct_usage.cached_input_tokens,
               billing_deduct_usage.cache_write_tokens, billing_deduct_usage.output_tokens,
               billing_deduct_usage.reasoning_tokens, billing_deduct_usage.requests,
               billing_deduct_usage.seconds];
    cost := billing.cost_micros(p, q);
    IF cost = 0 THEN
        RAISE EXCEPTION 'usage costs nothing'
            USING ERRCODE = 'ZB010',
                  DETAIL = format('The usage (%s) of %s costs 0.000000.',
                                  coalesce((SELECT string_agg(format('%s %s', x.name, x.quantity), ', ' ORDER BY x.i)
                                              FROM unnest(ARRAY['input_tokens', 'cached_input_tokens',
                                                                'cache_write_tokens', 'output_tokens',
                                                                'reasoning_tokens', 'requests', 'seconds'], q)
                                                   WITH ORDINALITY AS x(name, quantity, i)
                                             WHERE x.quantity <> 0), 'none'),
                                  billing_deduct_usage.model),
                  HINT = 'Skip the charge for empty usage.';
    END IF;
    r := billing.effective_rates(p);
    IF was ? 'input_per_1k' AND NOT was ? 'input_per_1m' AND q[2] = 0 AND q[3] = 0 AND q[5] = 0
       AND q[6] = 1 AND q[7] = 0 AND p.list_price AND r[1] % 1000 = 0 AND r[4] % 1000 = 0 THEN
        -- the replay of a usage charged by 1.3: its metadata as 1.3 wrote it
        -- (prices per 1,000 tokens), so that the same request replays
        usage := jsonb_build_object(
            'model', billing_deduct_usage.model,
            'input_tokens', billing_deduct_usage.input_tokens,
            'output_tokens', billing_deduct_usage.output_tokens,
            'input_per_1k', billing.to_amount(r[1] / 1000),
            'output_per_1k', billing.to_amount(r[4] / 1000),
            'price_effective_from',
            to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
    ELSE
        usage := jsonb_build_object(
            'model', billing_deduct_usage.model,
            'input_tokens', billing_deduct_usage.input_tokens,
            'cached_input_tokens', billing_deduct_usage.cached_input_tokens,
            'cache_write_tokens', billing_deduct_usage.cache_write_tokens,
            'output_tokens', billing_deduct_usage.output_tokens,
            'reasoning_tokens', billing_deduct_usage.reasoning_tokens,
            'requests', billing_deduct_usage.requests,
            'seconds', billing_deduct_usage.seconds,
            'input_per_1m', billing.to_amount(r[1]),
            'cached_input_per_1m', billing.to_amount(r[2]),
            'cache_write_per_1m', billing.to_amount(r[3]),
            'output_per_1m', billing.to_amount(r[4]),
            'reasoning_per_1m', billing.to_amount(r[5]),
            'per_request', billing.to_amount(r[6]),
            'per_second', billing.to_amount(r[7]),
            'price_effective_from',
            to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'price_override', NOT p.list_price);
    END IF;
    RETURN billing.internal_deduct(billing_deduct_usage.tenant_id, billing.to_amount(cost), billing_deduct_usage.trace_id,
                          description => billing_deduct_usage.description,
                          metadata => coalesce(billing_deduct_usage.metadata, '{}') || usage,
                          event_at => billing_deduct_usage.event_at,
                          api_key => billing_deduct_usage.api_key);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric) IS
    'charge a usage (tokens of each kind, requests, seconds) at the price effective at event time (the tenant''s override, else the list price); the breakdown and the unit prices go into the entry metadata';
REVOKE ALL ON FUNCTION @extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric) FROM PUBLIC;

-- the usage views (schema/65_usage.sql)
-- Usage = charges, net of their refunds.  A charge is every debit that counts
-- as spend in the quota counters: kind deduct, capture, or adjustment with a
-- negative amount (an expiry is not a charge).  A refund tied to its charge
-- (billing_refund: refund_of) is netted against the charge's day, model and
-- api key, however much later it was made; a credit of kind refund without
-- a charge (billing_credit) is a credit.  Days and months are those of the
-- account's time zone, by usage time (event_at, else created_at).
CREATE VIEW billing.usage_daily WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       count(*) FILTER (WHERE e.amount_micros < 0)                                           AS charges,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)) AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))                                     AS refunded,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)
                              - coalesce(sum(r.micros), 0))                                  AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                           AS credits,
       billing.to_amount_sum(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.kind <> 'expire' AND NOT (e.kind = 'refund' AND e.refund_of IS NOT NULL)
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_daily IS 'per tenant and day (account time zone, by usage time): charges, what was refunded of them, net spend; credits';

CREATE VIEW billing.usage_monthly WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       date_trunc('month', coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS month,
       count(*) FILTER (WHERE e.amount_micros < 0)                                           AS charges,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)) AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))                                     AS refunded,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)
                              - coalesce(sum(r.micros), 0))                                  AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                           AS credits,
       billing.to_amount_sum(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.kind <> 'expire' AND NOT (e.kind = 'refund' AND e.refund_of IS NOT NULL)
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_monthly IS 'per tenant and calendar month (account time zone, by usage time): charges, what was refunded of them, net spend; credits';

CREATE VIEW billing.usage_by_model WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.metadata->>'model', h.metadata->>'model')       AS model,
       coalesce(e.metadata->>'provider', h.metadata->>'provider') AS provider,
       count(*)                                                    AS charges,
       billing.to_amount_sum(-sum(e.amount_micros))                AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))           AS refunded,
       billing.to_amount_sum(-sum(e.amount_micros) - coalesce(sum(r.micros), 0)) AS spent,
       sum(CASE WHEN jsonb_typeof(e.metadata->'input_tokens') = 'number'
                THEN (e.metadata->>'input_tokens')::numeric END)  AS input_tokens,
       sum(CASE WHEN jsonb_typeof(e.metadata->'output_tokens') = 'number'
                THEN (e.metadata->>'output_tokens')::numeric END) AS output_tokens
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN billing.holds h ON h.tenant_id = e.tenant_id AND h.hold_id = e.hold_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.amount_micros < 0 AND e.kind <> 'expire'
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_model IS 'charges per tenant, day, model and provider, net of their refunds (from entry metadata; a capture without a model takes its hold''s)';

CREATE VIEW billing.usage_by_api_key WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.api_key, e.metadata->>'api_key')                 AS api_key,
       count(*)                                                    AS charges,
       billing.to_amount_sum(-sum(e.amount_micros))                AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))           AS refunded,
       billing.to_amount_sum(-sum(e.amount_micros) - coalesce(sum(r.micros), 0)) AS spent
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.amount_micros < 0 AND e.kind <> 'expire'
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.usage_by_api_key IS 'charges per tenant, day and api key (the api_key argument, else metadata->>''api_key''), net of their refunds';

-- usage by token type: the breakdown billing_deduct_usage() recorded in a
-- charge's metadata (the counts and the unit prices it was priced at,
-- 1.3's prices per 1,000 tokens included).  cost is each part's exact
-- share before the charge's one rounding (12 decimal places hold it);
-- refunds are not split by type.
CREATE VIEW billing.usage_by_token_type WITH (security_barrier) AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       e.metadata->>'model' AS model,
       t.token_type,
       count(*)             AS charges,
       sum(t.quantity)      AS quantity,
       round(sum(t.quantity * t.rate * t.unit), 12) AS cost
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 CROSS JOIN LATERAL (
     SELECT CASE WHEN jsonb_typeof(e.metadata->'input_tokens') = 'number' THEN (e.metadata->>'input_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'cached_input_tokens') = 'number' THEN (e.metadata->>'cached_input_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'cache_write_tokens') = 'number' THEN (e.metadata->>'cache_write_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'output_tokens') = 'number' THEN (e.metadata->>'output_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'reasoning_tokens') = 'number' THEN (e.metadata->>'reasoning_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'requests') = 'number' THEN (e.metadata->>'requests')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'seconds') = 'number' THEN (e.metadata->>'seconds')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'input_per_1m') = 'number' THEN (e.metadata->>'input_per_1m')::numeric
                 WHEN jsonb_typeof(e.metadata->'input_per_1k') = 'number' THEN (e.metadata->>'input_per_1k')::numeric * 1000 END,
            CASE WHEN jsonb_typeof(e.metadata->'cached_input_per_1m') = 'number' THEN (e.metadata->>'cached_input_per_1m')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'cache_write_per_1m') = 'number' THEN (e.metadata->>'cache_write_per_1m')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'output_per_1m') = 'number' THEN (e.metadata->>'output_per_1m')::numeric
                 WHEN jsonb_typeof(e.metadata->'output_per_1k') = 'number' THEN (e.metadata->>'output_per_1k')::numeric * 1000 END,
            CASE WHEN jsonb_typeof(e.metadata->'reasoning_per_1m') = 'number' THEN (e.metadata->>'reasoning_per_1m')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'per_request') = 'number' THEN (e.metadata->>'per_request')::numeric ELSE 0 END,
            CASE WHEN jsonb_typeof(e.metadata->'per_second') = 'number' THEN (e.metadata->>'per_second')::numeric END
 ) AS u(input, cached_input, cache_write, output, reasoning, requests, seconds,
        input_rate, cached_input_rate, cache_write_rate, output_rate, reasoning_rate, request_rate, second_rate)
 CROSS JOIN LATERAL (VALUES
     ('input',        u.input,        u.input_rate,        0.000001),
     ('cached_input', u.cached_input, u.cached_input_rate, 0.000001),
     ('cache_write',  u.cache_write,  u.cache_write_rate,  0.000001),
     ('output',       u.output,       u.output_rate,       0.000001),
     ('reasoning',    u.reasoning,    u.reasoning_rate,    0.000001),
     ('request',      u.requests,     u.request_rate,      1),
     ('second',       u.seconds,      u.second_rate,       1)
 ) AS t(token_type, quantity, rate, unit)
 WHERE e.kind = 'deduct' AND e.metadata ? 'price_effective_from' AND t.quantity > 0
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_token_type IS 'priced usage (billing_deduct_usage) per tenant, day, model and token type (input, cached_input, cache_write, output, reasoning; request, second): quantity and exact cost before rounding';

-- the grants users had on what was dropped above, on what replaces it.  A
-- GRANT in an extension script also records the object's whole new ACL as
-- the extension's own privileges (pg_init_privs), and pg_dump would leave
-- those user grants out of a dump: the recorded privileges are put back to
-- what this script set (a fresh install's).  (The grantor becomes the
-- extension's owner; column grants on the old views are not carried over.)
DO $$
DECLARE
    o jsonb;
    cls regclass;
    obj oid;
    target text;
    kind "char";
    init aclitem[];
    has_init boolean;
    g record;
BEGIN
    FOR o IN SELECT * FROM pg_catalog.jsonb_array_elements(pg_catalog.current_setting('billing_upgrade.pricing_acl')::jsonb)
    LOOP
        IF o->>'kind' = 'FUNCTION' THEN
            cls := 'pg_catalog.pg_proc'::pg_catalog.regclass;
            obj := (o->>'new')::pg_catalog.regprocedure;
            target := 'FUNCTION ' || obj::pg_catalog.regprocedure::text;
            kind := 'f';
        ELSE
            cls := 'pg_catalog.pg_class'::pg_catalog.regclass;
            obj := (o->>'new')::pg_catalog.regclass;
            target := 'TABLE ' || obj::pg_catalog.regclass::text;
            kind := 'r';
        END IF;
        SELECT ip.initprivs, true INTO init, has_init FROM pg_catalog.pg_init_privs ip
         WHERE ip.classoid = cls AND ip.objoid = obj AND ip.objsubid = 0;
        FOR g IN
            SELECT a.grantee, a.privilege_type, a.is_grantable
              FROM pg_catalog.aclexplode((o->>'acl')::aclitem[]) a
            EXCEPT
            SELECT b.grantee, b.privilege_type, b.is_grantable
              FROM pg_catalog.aclexplode(coalesce((o->>'init')::aclitem[],
                                                  pg_catalog.acldefault(kind, (o->>'owner')::oid))) b
        LOOP
            EXECUTE pg_catalog.format('GRANT %s ON %s TO %s%s', g.privilege_type, target,
                                      CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                                           ELSE g.grantee::pg_catalog.regrole::text END,
                                      CASE WHEN g.is_grantable AND g.grantee <> 0 THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
        IF has_init THEN
            UPDATE pg_catalog.pg_init_privs ip SET initprivs = init
             WHERE ip.classoid = cls AND ip.objoid = obj AND ip.objsubid = 0;
        ELSE
            DELETE FROM pg_catalog.pg_init_privs ip
             WHERE ip.classoid = cls AND ip.objoid = obj AND ip.objsubid = 0;
        END IF;
    END LOOP;
END
$$;

-- end of issue 16, part 3 and 4 (usage)

-- ---------------------------------------------------------------------------
-- issue 15: billing on a Citus cluster, distributed by tenant (see
-- schema/95_citus.sql and docs/scaling.md).  Nothing changes on a single
-- node; on Citus every function that takes a tenant runs on the tenant's
-- node, and what is not about one tenant runs per node on its own shards.
-- (billing.maintenance(), billing.sync_snapshot() and billing_grant_worker()
-- are per node too: the worker's section below defines them last.)
-- ---------------------------------------------------------------------------

-- the relations of a table on this node: the table itself, or (Citus) its
-- shards placed here, nothing on a node without any
CREATE FUNCTION billing.local_shards(tbl regclass) RETURNS SETOF regclass
    AS 'MODULE_PATHNAME', 'billing_local_shards_sql'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.local_shards(regclass) IS 'the relations of a billing table on this node: the table itself, or (Citus) its shards placed here';
REVOKE ALL ON FUNCTION billing.local_shards(regclass) FROM PUBLIC;

CREATE FUNCTION billing.is_distributed(tbl regclass) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_is_distributed_sql'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.is_distributed(regclass) IS 'is the table distributed by Citus (by hash)?';
REVOKE ALL ON FUNCTION billing.is_distributed(regclass) FROM PUBLIC;

CREATE FUNCTION billing.is_citus_table(tbl regclass) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_is_citus_table_sql'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.is_citus_table(regclass) IS 'is the table any Citus table (distributed or reference)?';
REVOKE ALL ON FUNCTION billing.is_citus_table(regclass) FROM PUBLIC;

CREATE FUNCTION billing.shell_rows(tbl regclass) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_shell_rows'
    LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION billing.shell_rows(regclass) IS 'rows in the local heap of a table, read directly (for a Citus table: rows nothing reads, left by a migration)';
REVOKE ALL ON FUNCTION billing.shell_rows(regclass) FROM PUBLIC;

-- the tables distributed by tenant_id, billing.accounts first (the others
-- are colocated with it)
CREATE FUNCTION billing.tenant_tables() RETURNS regclass[]
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY['billing.accounts', 'billing.entries', 'billing.rejections',
                 'billing.account_events', 'billing.holds', 'billing.hold_events',
                 'billing.api_keys', 'billing.jobs', 'billing.job_events',
                 'billing.grants', 'billing.refunds', 'billing.price_overrides']::regclass[]
$$;
COMMENT ON FUNCTION billing.tenant_tables() IS 'the tables Citus distributes by tenant_id (billing.accounts first; the others colocated with it)';
REVOKE ALL ON FUNCTION billing.tenant_tables() FROM PUBLIC;

-- this node's Citus group (0: the coordinator), NULL without Citus
CREATE FUNCTION billing.local_group() RETURNS integer
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g);
END;
$$;
COMMENT ON FUNCTION billing.local_group() IS 'this node''s Citus group id (0 on the coordinator), NULL without Citus';
REVOKE ALL ON FUNCTION billing.local_group() FROM PUBLIC;

-- functions and views whose queries Citus can run on the shards: no
-- whole-row function of a table's row type in a query, no LANGUAGE sql
-- function with parameters querying a distributed table, no correlated
-- subquery on one inside a delegated call, no nested distributed query

-- what remains on an account's open holds right now: the cached sum, unless
-- a hold has expired since anything ran on the account (then from the holds).
-- (PL/pgSQL, not SQL: Citus cannot plan an SQL function's query with
-- parameters on a distributed table.  billing.balances spells the same out
-- instead of calling it: Citus runs a view's query on the shards, whose row
-- type is not billing.accounts.)
CREATE OR REPLACE FUNCTION billing.effective_holds(a billing.accounts) RETURNS bigint
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN
        RETURN a.holds_micros;
    END IF;
    RETURN (SELECT coalesce(sum(h.amount_micros - h.captured_micros - h.released_micros), 0)::bigint
              FROM billing.holds h
             WHERE h.tenant_id = a.tenant_id AND h.status = 'open' AND h.expires_at > now());
END;
$$;

-- billing.balances (10_accounts.sql) again, now that billing.holds exists:
-- balance and on hold as billing.expired_micros(a, now()) and
-- billing.effective_holds(a) compute them, spelled out with a join of the
-- open holds grouped by tenant.  On Citus the query runs on the shards,
-- whose row type is not billing.accounts; a function that queried
-- billing.holds from there, or a correlated subquery inside a call Citus
-- delegated in a transaction block, would be a nested distributed query,
-- while a join on tenant_id is one query on one shard of each table.
CREATE OR REPLACE VIEW billing.balances WITH (security_barrier) AS
SELECT a.tenant_id,
       a.currency,
       a.status,
       billing.to_amount(a.balance_micros
           - CASE WHEN a.grants_state IS NULL THEN 0::bigint
                ELSE billing.grants_expired(a.grants_state, now())
                     + CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN 0::bigint
                            ELSE coalesce(h.expired_shares, 0) END END) AS balance,
       billing.to_amount(a.credit_limit_micros) AS credit_limit,
       billing.to_amount(
           CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN a.holds_micros
                ELSE coalesce(h.open_micros, 0) END) AS on_hold,
       billing.to_amount(a.balance_micros
           - CASE WHEN a.grants_state IS NULL THEN 0::bigint
                ELSE billing.grants_expired(a.grants_state, now())
                     + CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN 0::bigint
                            ELSE coalesce(h.expired_shares, 0) END END)
       + billing.to_amount(a.credit_limit_micros)
       - billing.to_amount(
           CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN a.holds_micros
                ELSE coalesce(h.open_micros, 0) END) AS available,
       a.version,
       a.last_entry_at,
       a.timezone,
       a.metadata,
       a.created_at,
       a.updated_at
  FROM billing.accounts a
  LEFT JOIN (SELECT h.tenant_id,
                    sum(h.amount_micros - h.captured_micros - h.released_micros)
                        FILTER (WHERE h.expires_at > now())::bigint AS open_micros,
                    sum(billing.shares_expired(o.grants_state, h.grant_draws, h.expires_at, now()))
                        FILTER (WHERE h.expires_at <= now() AND h.grant_draws IS NOT NULL)::bigint AS expired_shares
               FROM billing.holds h
               JOIN billing.accounts o ON o.tenant_id = h.tenant_id
              WHERE h.status = 'open'
              GROUP BY h.tenant_id) h ON h.tenant_id = a.tenant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR a.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));

CREATE OR REPLACE VIEW billing.api_key_budgets WITH (security_barrier) AS
WITH k AS (
    SELECT k.*,
           CASE k.budget_period
               WHEN 'day' THEN (now() AT TIME ZONE a.timezone)::date
               WHEN 'month' THEN date_trunc('month', now() AT TIME ZONE a.timezone)::date
           END AS current_start,
           a.timezone
      FROM billing.api_keys k
      JOIN billing.accounts a ON a.tenant_id = k.tenant_id
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR k.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
), s AS (
    -- the key's open holds joined, grouped by key, not a correlated
    -- subquery: on Citus that is one query on one shard of each table, also
    -- inside a call Citus delegated in a transaction block
    SELECT k.*,
           CASE WHEN k.budget_period IS NULL OR k.budget_period = 'lifetime' OR k.period_start = k.current_start
                THEN k.period_spend_micros ELSE 0 END AS spent_micros,
           coalesce(h.open_micros, 0)::bigint AS on_hold_micros
      FROM k
      LEFT JOIN (SELECT h.tenant_id, h.api_key,
                        sum(h.amount_micros - h.captured_micros - h.released_micros) AS open_micros
                   FROM billing.holds h
                  WHERE h.status = 'open' AND h.expires_at > now() AND h.api_key IS NOT NULL
                  GROUP BY h.tenant_id, h.api_key) h
        ON h.tenant_id = k.tenant_id AND h.api_key = k.key_id
)
SELECT s.tenant_id,
       s.key_id,
       s.status,
       billing.to_amount(s.budget_micros) AS budget,
       s.budget_period,
       billing.to_amount(s.spent_micros) AS spent,
       billing.to_amount(s.on_hold_micros) AS on_hold,
       billing.to_amount(s.budget_micros - s.spent_micros - s.on_hold_micros) AS remaining,
       CASE s.budget_period
           WHEN 'day' THEN ((s.current_start + 1)::timestamp AT TIME ZONE s.timezone)
           WHEN 'month' THEN ((s.current_start + interval '1 month')::timestamp AT TIME ZONE s.timezone)
       END AS resets_at,
       s.last_used_at,
       s.metadata
  FROM s;
COMMENT ON VIEW billing.api_key_budgets IS 'per API key: budget, spent in the current period, on hold, remaining, reset time';

-- an expiry dates from its grant's expires_at
CREATE OR REPLACE FUNCTION @extschema@.billing_balance_at(tenant_id text, at timestamptz) RETURNS numeric
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    total numeric;
    acc   billing.accounts;
BEGIN
    IF billing_balance_at.tenant_id IS NULL THEN
        RAISE EXCEPTION 'tenant_id must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass a value for tenant_id.';
    END IF;
    IF billing_balance_at.at IS NULL THEN
        RAISE EXCEPTION 'at must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the point in time, e.g. now() - interval ''1 day''.';
    END IF;
    PERFORM billing.check_account_settings(billing_balance_at.tenant_id, NULL, NULL, NULL, NULL);
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_balance_at.tenant_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', billing_balance_at.tenant_id
            USING ERRCODE = 'ZB001',
                  HINT = format('Create it first with billing_account_create(%L).', billing_balance_at.tenant_id);
    END IF;
    -- An expiry counts from the moment the grant expired (its event_at), even
    -- when its entry was written later; a grant that expired by then but whose
    -- entry is not written yet still holds its remainder in grants_state (and
    -- holds that expired by then, what they had reserved of it).
    SELECT coalesce(sum(e.amount_micros), 0) INTO total
      FROM billing.entries e
     WHERE e.tenant_id = billing_balance_at.tenant_id
       AND CASE WHEN e.kind = 'expire' THEN LEAST(e.event_at, e.created_at)
                ELSE e.created_at END <= billing_balance_at.at;
    -- (of the row read above: on Citus a query's rows are of the shard's type)
    RETURN billing.to_amount((total - billing.expired_micros(acc, billing_balance_at.at))::bigint);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_balance_at(text, timestamptz) IS
    'balance at a point in time: SUM of the entries created up to then, grants that had expired by then taken off';

-- billing_verify(): per node, gathered on the coordinator
-- the checks of billing_verify() on this node's tenants (all, or one): over
-- the tables, or on Citus over the shards placed on this node (each tenant
-- lives in one shard of each table, all on one node); on Citus also one row
-- per local table of a Citus table that still holds rows, outside every
-- shard (nothing reads them; a migration left them)
CREATE FUNCTION billing.verify_local(tenant_id text)
    RETURNS SETOF billing.verify_result
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    -- no JIT: the grant-state arrays' generate_series is estimated at 1,000
    -- rows per account, which puts this plan over jit_optimize_above_cost,
    -- and compiling it took 0.8 s of a 1 s audit of 300,000 entries; the
    -- work is in verify_entries (C), which JIT does not speed up
    SET jit = off
AS $$
DECLARE
    src  text[] := '{}';
    t    regclass;
    n    bigint;
BEGIN
    -- each table as this node holds it: the table itself, or the union of
    -- its shards placed here (colocated: a tenant's rows are all here or
    -- all elsewhere); none, no tenant of this node to check
    FOREACH t IN ARRAY ARRAY['billing.accounts', 'billing.holds', 'billing.jobs', 'billing.entries']::regclass[] LOOP
        src := src || (SELECT CASE WHEN NOT billing.is_distributed(t) THEN t::text
                                   ELSE '(' || string_agg(format('SELECT * FROM %s', s), ' UNION ALL ') || ')' END
                         FROM billing.local_shards(t) s);
    END LOOP;
    IF array_position(src, NULL) IS NULL THEN
        RETURN QUERY EXECUTE format($q$
    WITH per_tenant AS (
        SELECT * FROM billing.verify_entries($1)
    )
    , holds AS (
        SELECT h.tenant_id,
               sum(h.amount_micros - h.captured_micros - h.released_micros) AS open_micros
          FROM %2$s h
         WHERE h.status = 'open' AND ($1 IS NULL OR h.tenant_id = $1)
         GROUP BY h.tenant_id
    )
    -- what each grant bucket holds by the account (remaining and reserved by
    -- holds): the ledger's replay (verify_entries) must say the same
    , state AS (
        SELECT a.tenant_id, a.grants_state[i] AS g, a.grants_state[i + 1] AS remaining,
               a.grants_state[i + 2] AS reserved
          FROM %1$s a,
               generate_series(1, coalesce(array_length(a.grants_state, 1), 0), 5) AS i
         WHERE $1 IS NULL OR a.tenant_id = $1
    )
    , grants AS (
        SELECT s.tenant_id, array_agg(v.x ORDER BY s.g, v.k) AS state
          FROM state s, LATERAL (VALUES (1, s.g), (2, s.remaining + s.reserved)) AS v(k, x)
         WHERE s.remaining + s.reserved <> 0
         GROUP BY 1
    )
    -- and what it says open holds reserved must be what they did
    , reservations AS (
        SELECT coalesce(s.tenant_id, o.tenant_id) AS tenant_id
          FROM (SELECT * FROM state WHERE reserved <> 0) s
          FULL JOIN (SELECT h.tenant_id, h.grant_draws[i] AS g, sum(h.grant_draws[i + 1]) AS reserved
                       FROM %2$s h,
                            generate_series(1, coalesce(array_length(h.grant_draws, 1), 0), 2) AS i
                      WHERE h.status = 'open'
                        AND ($1 IS NULL OR h.tenant_id = $1)
                      GROUP BY 1, 2) o
            ON o.tenant_id = s.tenant_id AND o.g = s.g
         WHERE s.reserved IS DISTINCT FROM o.reserved
         GROUP BY 1
    )
    -- finished jobs against their charge and hold (what the job guard checks
    -- as each job changes; a restore loads jobs without their order): one
    -- index probe per finished job, not a second pass over the ledger
    , jobs AS (
        SELECT j.tenant_id, count(*) AS bad
          FROM %3$s j
         WHERE j.state IN ('completed', 'failed', 'cancelled')
           AND ($1 IS NULL OR j.tenant_id = $1)
           AND ((j.state = 'completed'
                 AND CASE WHEN j.charge_entry_id IS NULL THEN j.actual_micros IS DISTINCT FROM 0
                          ELSE NOT EXISTS (SELECT FROM %4$s e
                                            WHERE e.tenant_id = j.tenant_id AND e.entry_id = j.charge_entry_id
                                              AND e.trace_id = format('job:%%s:charge', j.job_id)
                                              AND e.amount_micros = -j.actual_micros) END)
                OR EXISTS (SELECT FROM %2$s h
                            WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
                              AND h.status = 'open' AND h.expires_at > now()))
         GROUP BY j.tenant_id
    )
    SELECT coalesce(a.tenant_id, p.tenant_id),
           billing.to_amount(a.balance_micros),
           (coalesce(p.total, 0) / 1000000)::numeric(38, 6),
           coalesce(p.n, 0),
           coalesce(p.breaks, 0),
           p.first_break,
           CASE
               WHEN a.tenant_id IS NULL THEN 'entries without an account'
               WHEN a.balance_micros <> coalesce(p.total, 0) THEN 'cached balance differs from SUM(entries)'
               WHEN coalesce(p.breaks, 0) > 0 THEN 'balance_after chain is broken'
               WHEN a.version < coalesce(p.max_version, 0) THEN 'account version is behind its entries'
               WHEN coalesce(p.invalid, 0) > 0 THEN 'entries with an unknown kind, a zero amount or the wrong sign'
               WHEN coalesce(p.grants_negative, 0) > 0 THEN 'a grant bucket went below zero'
               WHEN coalesce(p.grants, '{}') <> coalesce(g.state, '{}') THEN 'grant buckets differ from the ledger'
               WHEN r.tenant_id IS NOT NULL THEN 'grant reservations differ from the open holds'
               WHEN a.holds_micros <> coalesce(h.open_micros, 0) THEN 'cached holds differ from the open holds'
               ELSE 'finished jobs without their own charge or with their hold open'
           END
      FROM %1$s a
      FULL JOIN per_tenant p ON p.tenant_id = a.tenant_id
      LEFT JOIN holds h ON h.tenant_id = a.tenant_id
      LEFT JOIN grants g ON g.tenant_id = a.tenant_id
      LEFT JOIN reservations r ON r.tenant_id = a.tenant_id
      LEFT JOIN jobs jb ON jb.tenant_id = a.tenant_id
     WHERE ($1 IS NULL OR coalesce(a.tenant_id, p.tenant_id) = $1)
       AND (a.tenant_id IS NULL
            OR a.balance_micros <> coalesce(p.total, 0)
            OR coalesce(p.breaks, 0) > 0
            OR a.version < coalesce(p.max_version, 0)
            OR coalesce(p.invalid, 0) > 0
            OR coalesce(p.grants_negative, 0) > 0
            OR coalesce(p.grants, '{}') <> coalesce(g.state, '{}')
            OR r.tenant_id IS NOT NULL
            OR a.holds_micros <> coalesce(h.open_micros, 0)
            OR jb.bad > 0)
     ORDER BY 1
    $q$, src[1], src[2], src[3], src[4]) USING verify_local.tenant_id;
    END IF;
    -- Citus: rows in a Citus table's local heap are read by no one
    IF billing.is_distributed('billing.accounts') THEN
        FOREACH t IN ARRAY billing.tenant_tables() || ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[] LOOP
            n := billing.shell_rows(t);
            IF n > 0 THEN
                RETURN NEXT ROW(NULL, NULL, NULL, n, 0, NULL,
                                format('%s rows left in the local table %s of node group %s, outside every shard: SELECT billing.citus_clear_local_rows() on that node',
                                       n, t, billing.local_group()))::billing.verify_result;
            END IF;
        END LOOP;
    END IF;
END;
$$;
COMMENT ON FUNCTION billing.verify_local(text) IS
    'the checks of billing_verify() on this node''s tenants (internal); on Citus also rows left in local tables';
REVOKE ALL ON FUNCTION billing.verify_local(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.billing_verify(tenant_id text DEFAULT NULL)
    RETURNS SETOF billing.verify_result
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r      record;
    found  jsonb := '[]';
    failed text;
BEGIN
    IF billing_verify.tenant_id IS NOT NULL THEN
        PERFORM billing.check_account_settings(billing_verify.tenant_id, NULL, NULL, NULL, NULL);
    END IF;
    IF billing_verify.tenant_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM billing.accounts a WHERE a.tenant_id = billing_verify.tenant_id)
       AND NOT EXISTS (SELECT FROM billing.entries e WHERE e.tenant_id = billing_verify.tenant_id) THEN
        RAISE EXCEPTION 'account "%" does not exist', billing_verify.tenant_id
            USING ERRCODE = 'ZB001',
                  HINT = 'Call billing_verify() without an argument to check every account.';
    END IF;
    -- one tenant (on Citus the call runs on its node), or a single node
    IF billing_verify.tenant_id IS NOT NULL OR NOT billing.is_distributed('billing.accounts') THEN
        RETURN QUERY SELECT * FROM billing.verify_local(billing_verify.tenant_id);
        RETURN;
    END IF;
    -- Citus: every node checks its own shards (and its local tables); a
    -- node that cannot be asked fails the audit, which must not look clean
    FOR r IN SELECT * FROM run_command_on_all_nodes(
                 'SELECT coalesce(pg_catalog.json_agg(v), ''[]'') FROM billing.verify_local(NULL) v')
    LOOP
        IF r.success THEN
            found := found || r.result::jsonb;
        ELSE
            failed := concat_ws('; ', failed, format('node %s: %s', r.nodeid, r.result));
        END IF;
    END LOOP;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'billing_verify() could not check every node'
            USING ERRCODE = 'ZB104', DETAIL = billing.show(failed, 1000),
                  HINT = 'Bring the node back (or remove it from the cluster) and verify again.';
    END IF;
    RETURN QUERY
        SELECT v.* FROM jsonb_populate_recordset(NULL::billing.verify_result, found) v ORDER BY 1, 7;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_verify(text) IS
    'audit: one row per account whose cached balance differs from SUM(entries), whose balance_after chain is broken, whose version lags its entries, with invalid entries, whose grant buckets differ from what the ledger says (or went below zero) or from what open holds reserved, whose cached holds differ from its open holds, or with a finished job without its own charge or with its hold open; on Citus also rows left in local tables; no rows when consistent';

-- jobs: per-node rescue and untargeted claims
-- is the job's hold open, safely before its expiry?  (PL/pgSQL: Citus
-- cannot plan an SQL function's query with parameters on a distributed table)
CREATE OR REPLACE FUNCTION billing.job_hold_open(j billing.jobs, margin interval DEFAULT '1 second') RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (SELECT FROM billing.holds h
                    WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
                      AND h.status = 'open' AND h.expires_at > clock_timestamp() + margin);
END;
$$;

-- keep the job's hold alive past `until` (if it is still open), to `until`
-- + hold_ttl (at most 31 days from now).  A queued job (a retry waiting for
-- run_at = until) always gets that, as at submit.  A processing job (a claim
-- or a heartbeat: until is the lease's end) keeps a hold that outlives the
-- lease by half its hold_ttl or more as it is: the slack that spares most
-- claims and heartbeats an extension (a hold update, a journal row and an
-- account write each).  A lease that runs out is rescued into a retry, which
-- extends the hold again.
CREATE OR REPLACE FUNCTION billing.job_keep_hold(j billing.jobs, until timestamptz) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted interval := least(until - now() + j.hold_ttl, interval '31 days');
    short_of timestamptz := now() + wanted;
BEGIN
    IF j.state = 'processing' THEN
        short_of := least(until + j.hold_ttl / 2, short_of);
    END IF;
    -- open, safely before its expiry (as billing.job_hold_open), and short:
    -- one lookup, with no function call in it (with Citus a query on
    -- billing.holds that calls a function querying it again is a nested
    -- distributed query)
    IF EXISTS (SELECT FROM billing.holds h
                WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
                  AND h.status = 'open' AND h.expires_at > clock_timestamp() + interval '1 second'
                  AND h.expires_at < short_of) THEN
        PERFORM billing.internal_hold_extend(j.tenant_id, j.hold_trace_id, wanted);
    END IF;
END;
$$;

-- a failed attempt: retry with backoff while attempts remain, else failed (hold released)
CREATE OR REPLACE FUNCTION billing.job_fail_attempt(j billing.jobs, error text, retryable boolean) RETURNS billing.jobs
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    j.last_error := error;
    j.lease_until := NULL;
    j.updated_at := now();
    IF retryable AND j.attempt < j.max_attempts THEN
        -- River-style backoff: attempt^4 seconds, +-10 % jitter, at most 30
        -- days (as submit's run_at: the hold, at most 31 days, outlives it)
        j.state := 'queued';
        j.run_at := now() + least(make_interval(secs => power(j.attempt, 4) * (0.9 + 0.2 * random())),
                                  interval '30 days');
        PERFORM billing.job_keep_hold(j, j.run_at);
    ELSE
        PERFORM billing.job_release_hold(j);
        j.state := 'failed';
        j.finished_at := now();
    END IF;
    UPDATE billing.jobs x
       SET state = j.state, run_at = j.run_at, lease_until = NULL, last_error = j.last_error,
           updated_at = j.updated_at, finished_at = j.finished_at, note = error
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN j;
END;
$$;

-- the jobs of this node whose lease expired, as failed attempts (the table,
-- or on Citus each shard placed here); the background worker of every node
-- runs it (billing.maintenance)
CREATE FUNCTION billing.job_rescue_local(max_jobs integer) RETURNS SETOF billing.job_result
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s    regclass;
    j    billing.jobs;
    seen integer := 0;
BEGIN
    FOR s IN SELECT billing.local_shards('billing.jobs') LOOP
        FOR j IN EXECUTE pg_catalog.format(
                     'SELECT * FROM %s x '
                     'WHERE x.state OPERATOR(pg_catalog.=) ''processing'' '
                     '  AND x.lease_until OPERATOR(pg_catalog.<) pg_catalog.now() '
                     'ORDER BY x.lease_until LIMIT $1 FOR UPDATE SKIP LOCKED', s)
                 USING max_jobs OPERATOR(pg_catalog.-) seen
        LOOP
            seen := seen OPERATOR(pg_catalog.+) 1;
            j := billing.job_fail_attempt(j, pg_catalog.format('lease expired (worker %s, attempt %s)', j.worker, j.attempt), true);
            RETURN NEXT billing.job_result(j, false);
        END LOOP;
        EXIT WHEN seen OPERATOR(pg_catalog.>=) max_jobs;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION billing.job_rescue_local(integer) IS 'the jobs of this node whose lease expired count as failed attempts (internal: billing_job_rescue, billing.maintenance)';
REVOKE ALL ON FUNCTION billing.job_rescue_local(integer) FROM PUBLIC;

-- per-node work on a node without shards of a distributed table: ZB103
CREATE FUNCTION billing.require_local_shards(tbl regclass, what text) RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF billing.is_distributed(tbl) AND NOT EXISTS (SELECT FROM billing.local_shards(tbl)) THEN
        RAISE EXCEPTION '% runs per node, and this node holds no shard of %', what, tbl
            USING ERRCODE = 'ZB103',
                  DETAIL = format('This is Citus node group %s.', billing.local_group()),
                  HINT = 'Call it on the worker nodes (each works on its own shards), or pass a tenant_id.';
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.require_local_shards(regclass, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.billing_job_rescue(max_jobs integer DEFAULT 100)
    RETURNS SETOF billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF max_jobs IS NULL THEN
        RAISE EXCEPTION 'max_jobs must not be null' USING ERRCODE = 'ZB015', HINT = 'Leave it out for 100.';
    END IF;
    IF max_jobs NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'max_jobs must be 1 to 10000' USING ERRCODE = 'ZB018', HINT = 'Rescue in batches.';
    END IF;
    PERFORM billing.require_local_shards('billing.jobs', 'billing_job_rescue()');
    RETURN QUERY SELECT * FROM billing.job_rescue_local(max_jobs);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_rescue(integer) IS
    'jobs whose lease expired count as a failed attempt: queued again with backoff, or failed with the hold released; on Citus the jobs of this node';

CREATE OR REPLACE FUNCTION @extschema@.billing_job_claim(worker text,
                                  kinds text[] DEFAULT NULL,
                                  max_jobs integer DEFAULT 1,
                                  lease interval DEFAULT '5 minutes',
                                  tenant_id text DEFAULT NULL)
    RETURNS SETOF billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    j       billing.jobs;
    claimed billing.jobs[] := '{}';
    shards  regclass[];
    s       regclass;
    k       record;
    start   integer;
BEGIN
    IF billing_job_claim.worker IS NULL OR billing_job_claim.max_jobs IS NULL OR billing_job_claim.lease IS NULL THEN
        RAISE EXCEPTION 'worker, max_jobs and lease must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Name the worker, e.g. its host and pid.';
    END IF;
    PERFORM billing.check_id(billing_job_claim.worker, 'worker', 'ZB018');
    IF billing_job_claim.max_jobs NOT BETWEEN 1 AND 1000
       OR billing_job_claim.lease <= interval '0' OR billing_job_claim.lease > interval '1 day' THEN
        RAISE EXCEPTION 'max_jobs must be 1 to 1000 and lease in (0, 1 day]'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('max_jobs %s, lease %s.', billing_job_claim.max_jobs, billing_job_claim.lease),
                  HINT = 'Keep leases short and renew them with billing_job_heartbeat().';
    END IF;
    IF billing_job_claim.tenant_id IS NOT NULL THEN
        -- one tenant (on Citus the call runs on its node, and every query of
        -- a delegated call must name the tenant: no "tenant_id IS NULL OR")
        FOR j IN
            WITH due AS (
                SELECT x.tenant_id, x.job_id
                  FROM billing.jobs x
                 WHERE x.tenant_id = billing_job_claim.tenant_id
                   AND x.state = 'queued' AND x.run_at <= now()
                   AND (billing_job_claim.kinds IS NULL OR x.kind = ANY (billing_job_claim.kinds))
                 ORDER BY x.run_at, x.job_id
                 LIMIT billing_job_claim.max_jobs
                   FOR UPDATE SKIP LOCKED
            )
            UPDATE billing.jobs x
               SET state = 'processing', attempt = x.attempt + 1, worker = billing_job_claim.worker,
                   lease_until = now() + billing_job_claim.lease, heartbeat_at = now(), updated_at = now(),
                   note = 'claimed'
              FROM due
             WHERE x.tenant_id = billing_job_claim.tenant_id
               AND x.tenant_id = due.tenant_id AND x.job_id = due.job_id
            RETURNING x.*
        LOOP
            j.note := NULL;
            claimed := claimed || j;
        END LOOP;
    ELSIF NOT billing.is_distributed('billing.jobs') THEN
        -- a single node: every tenant's due jobs
        FOR j IN
            WITH due AS (
                SELECT x.tenant_id, x.job_id
                  FROM billing.jobs x
                 WHERE x.state = 'queued' AND x.run_at <= now()
                   AND (billing_job_claim.kinds IS NULL OR x.kind = ANY (billing_job_claim.kinds))
                 ORDER BY x.run_at, x.job_id
                 LIMIT billing_job_claim.max_jobs
                   FOR UPDATE SKIP LOCKED
            )
            UPDATE billing.jobs x
               SET state = 'processing', attempt = x.attempt + 1, worker = billing_job_claim.worker,
                   lease_until = now() + billing_job_claim.lease, heartbeat_at = now(), updated_at = now(),
                   note = 'claimed'
              FROM due
             WHERE x.tenant_id = due.tenant_id AND x.job_id = due.job_id
            RETURNING x.*
        LOOP
            j.note := NULL;
            claimed := claimed || j;
        END LOOP;
    ELSE
        -- Citus, no tenant: the due jobs of this node's shards, from a random
        -- shard on (claimers of one node spread over its shards); each is
        -- locked in its shard (SKIP LOCKED) and claimed through Citus
        PERFORM billing.require_local_shards('billing.jobs', 'billing_job_claim() without a tenant_id');
        shards := ARRAY(SELECT billing.local_shards('billing.jobs'));
        start := floor(random() * cardinality(shards))::integer;
        FOR i IN 0 .. cardinality(shards) - 1 LOOP
            EXIT WHEN cardinality(claimed) >= billing_job_claim.max_jobs;
            s := shards[1 + (start + i) % cardinality(shards)];
            FOR k IN EXECUTE format('SELECT x.tenant_id, x.job_id FROM %s x '
                                    'WHERE x.state = ''queued'' AND x.run_at <= now() '
                                    '  AND ($1 IS NULL OR x.kind = ANY ($1)) '
                                    'ORDER BY x.run_at, x.job_id LIMIT $2 FOR UPDATE SKIP LOCKED', s)
                     USING billing_job_claim.kinds, billing_job_claim.max_jobs - cardinality(claimed)
            LOOP
                UPDATE billing.jobs x
                   SET state = 'processing', attempt = x.attempt + 1, worker = billing_job_claim.worker,
                       lease_until = now() + billing_job_claim.lease, heartbeat_at = now(), updated_at = now(),
                       note = 'claimed'
                 WHERE x.tenant_id = k.tenant_id AND x.job_id = k.job_id
                RETURNING x.* INTO j;
                j.note := NULL;
                claimed := claimed || j;
            END LOOP;
        END LOOP;
    END IF;
    -- keep the holds alive past the leases, locking the accounts in tenant
    -- order: two claimers never wait on each other's accounts in a cycle
    FOR j IN SELECT * FROM unnest(claimed) c ORDER BY c.tenant_id, c.job_id LOOP
        PERFORM billing.job_keep_hold(j, j.lease_until);
    END LOOP;
    FOR j IN SELECT * FROM unnest(claimed) c ORDER BY c.run_at, c.job_id LOOP
        RETURN NEXT billing.job_result(j, false);
    END LOOP;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_claim(text, text[], integer, interval, text) IS
    'hand due queued jobs to a worker (FOR UPDATE SKIP LOCKED): attempt + 1, lease set; two workers never get the same job; on Citus without a tenant: the jobs of this node';

-- hold and grant expiry: this node's accounts
-- the worker's sweep also writes due expiries, one account's failure
-- skipping only that account
CREATE OR REPLACE FUNCTION billing.expire_due_holds(max_accounts integer DEFAULT 1000) RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s    regclass;
    t    text;
    n    integer := 0;
    seen integer := 0;
BEGIN
    -- this node's accounts: the table, or on Citus each shard placed here
    FOR s IN SELECT billing.local_shards('billing.accounts') LOOP
        FOR t IN EXECUTE pg_catalog.format(
                     'SELECT a.tenant_id FROM %s a '
                     'WHERE a.holds_next_expiry OPERATOR(pg_catalog.<=) pg_catalog.now() '
                     '   OR a.grants_next_expiry OPERATOR(pg_catalog.<=) pg_catalog.now() '
                     'ORDER BY least(a.holds_next_expiry, a.grants_next_expiry) '
                     'LIMIT $1 FOR UPDATE SKIP LOCKED', s)
                 USING max_accounts OPERATOR(pg_catalog.-) seen
        LOOP
            seen := seen OPERATOR(pg_catalog.+) 1;
            -- one account that cannot be swept must not stop the others
            BEGIN
                IF billing.expire_holds_of(t) THEN
                    n := n OPERATOR(pg_catalog.+) 1;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'billing: the expiry sweep skipped account "%": %', t, SQLERRM;
            END;
        END LOOP;
        EXIT WHEN seen OPERATOR(pg_catalog.>=) max_accounts;
    END LOOP;
    RETURN n;
END;
$$;
COMMENT ON FUNCTION billing.expire_due_holds(integer) IS 'expire due holds and grants of accounts nobody else has locked (the worker runs it; correctness never depends on it)';

-- distribution and per-node setup
CREATE FUNCTION billing.citus_node_setup() RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    g      bigint := billing.local_group();
    seq    regclass;
    lo     bigint;
    hi     bigint;
    last   bigint;
    called boolean;
    nxt    bigint;
    result jsonb := '{}';
BEGIN
    IF g IS NULL OR g OPERATOR(pg_catalog.<) 0 THEN
        RETURN pg_catalog.jsonb_build_object('group', g);
    END IF;
    lo := g OPERATOR(pg_catalog.*) (1::bigint OPERATOR(pg_catalog.<<) 48) OPERATOR(pg_catalog.+) 1;
    hi := (g OPERATOR(pg_catalog.+) 1) OPERATOR(pg_catalog.*) (1::bigint OPERATOR(pg_catalog.<<) 48)
          OPERATOR(pg_catalog.-) 1;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_sequence s
                     JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) s.seqrelid
                    WHERE c.relnamespace OPERATOR(pg_catalog.=) 'billing'::regnamespace
                      AND (s.seqmin OPERATOR(pg_catalog.<>) lo OR s.seqmax OPERATOR(pg_catalog.<>) hi)) THEN
        RETURN pg_catalog.jsonb_build_object('group', g, 'next', 'unchanged');
    END IF;
    -- the extension's sequences, on this node only
    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
    FOR seq IN SELECT c.oid FROM pg_catalog.pg_class c
                WHERE c.relnamespace OPERATOR(pg_catalog.=) 'billing'::regnamespace
                  AND c.relkind OPERATOR(pg_catalog.=) 'S'
                ORDER BY c.relname
    LOOP
        -- the sequence's lock first (a no-op ALTER takes it): a nextval()
        -- of another transaction between the read and the RESTART below
        -- would be handed out again
        EXECUTE pg_catalog.format('ALTER SEQUENCE %s NO CYCLE', seq);
        EXECUTE pg_catalog.format('SELECT last_value, is_called FROM %s', seq) INTO last, called;
        nxt := pg_catalog.int8larger(lo, CASE WHEN called THEN last OPERATOR(pg_catalog.+) 1 ELSE last END);
        IF nxt OPERATOR(pg_catalog.>) hi THEN
            RAISE EXCEPTION 'sequence % is beyond the id range of node group %', seq, g
                USING ERRCODE = 'ZB101',
                      DETAIL = pg_catalog.format('Its next value is %s; the range is %s to %s.', nxt, lo, hi),
                      HINT = 'Each node numbers from group * 2^48; see docs/scaling.md.';
        END IF;
        EXECUTE pg_catalog.format('ALTER SEQUENCE %s MINVALUE %s MAXVALUE %s START WITH %s RESTART WITH %s',
                                  seq, lo, hi, nxt, nxt);
        result := result OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(seq::text, nxt);
    END LOOP;
    RETURN pg_catalog.jsonb_build_object('group', g, 'next', result);
END;
$$;
COMMENT ON FUNCTION billing.citus_node_setup() IS 'Citus: give this node its own range of billing''s ids (group * 2^48 on); idempotent';
REVOKE ALL ON FUNCTION billing.citus_node_setup() FROM PUBLIC;

CREATE FUNCTION billing.citus_clear_local_rows() RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t       regclass;
    n       bigint;
    cleared jsonb := '{}';
BEGIN
    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
    FOREACH t IN ARRAY billing.tenant_tables()
                       OPERATOR(pg_catalog.||) ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[] LOOP
        IF billing.is_citus_table(t) THEN
            n := billing.shell_rows(t);
            IF n OPERATOR(pg_catalog.>) 0 THEN
                EXECUTE pg_catalog.format('TRUNCATE %s', t);
                cleared := cleared OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(t::text, n);
            END IF;
        END IF;
    END LOOP;
    RETURN cleared;
END;
$$;
COMMENT ON FUNCTION billing.citus_clear_local_rows() IS 'Citus: remove the rows of this node''s local tables of billing''s Citus tables (rows nothing reads, left by a migration)';
REVOKE ALL ON FUNCTION billing.citus_clear_local_rows() FROM PUBLIC;

CREATE FUNCTION billing.citus_distribute(shard_count integer DEFAULT NULL)
    RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t      regclass;
    f      regprocedure;
    nfun   integer := 0;
    left_  bigint;
    setup  jsonb;
    failed text;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = 'ZB101',
                  DETAIL = 'billing.citus_distribute() distributes billing''s tables with Citus.',
                  HINT = 'CREATE EXTENSION citus on every node and add the workers (citus_add_node) first.';
    END IF;
    IF billing.local_group() OPERATOR(pg_catalog.<>) 0 THEN
        RAISE EXCEPTION 'billing.citus_distribute() runs on the coordinator'
            USING ERRCODE = 'ZB101',
                  DETAIL = pg_catalog.format('This node is in Citus group %s; the coordinator is group 0.', billing.local_group()),
                  HINT = 'Connect to the coordinator.';
    END IF;
    -- billing's triggers (append-only tables, the job state machine) must
    -- be created on the shards and fire there: every node needs the setting
    SELECT pg_catalog.string_agg(pg_catalog.format('node %s: %s', r.nodeid, r.result), '; ' ORDER BY r.nodeid)
      INTO failed
      FROM run_command_on_all_nodes('SHOW citus.enable_unsafe_triggers') r
     WHERE NOT r.success OR r.result OPERATOR(pg_catalog.<>) 'on';
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'citus.enable_unsafe_triggers must be on on every node'
            USING ERRCODE = 'ZB101',
                  DETAIL = pg_catalog.format('billing''s append-only and job triggers must fire on the shards; found: %s.', failed),
                  HINT = 'Set citus.enable_unsafe_triggers = on in postgresql.conf of every node and reload.';
    END IF;
    -- every node its own range of ids.  Before the lock below: each node
    -- runs it in a transaction of its own, the coordinator too (over a
    -- connection of its own), whose ALTER SEQUENCE waits for the
    -- transactions that took an id; one of them waiting for our lock would
    -- make a cycle PostgreSQL cannot see (one side waits on a socket).
    SELECT pg_catalog.jsonb_object_agg(r.nodeid, CASE WHEN r.success THEN r.result::jsonb ELSE pg_catalog.to_jsonb(r.result) END),
           pg_catalog.string_agg(pg_catalog.format('node %s: %s', r.nodeid, r.result), '; ')
               FILTER (WHERE NOT r.success)
      INTO setup, failed
      FROM run_command_on_all_nodes('SELECT billing.citus_node_setup()') r;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'billing.citus_node_setup() failed on a node'
            USING ERRCODE = 'ZB101', DETAIL = failed,
                  HINT = 'Nothing was distributed; fix that node and call billing.citus_distribute() again.';
    END IF;
    -- one placement per shard: the direct path writes a tenant's rows on its node
    PERFORM pg_catalog.set_config('citus.shard_replication_factor', '1', true);
    -- no charge writes while the tables move (they wait, then are routed)
    LOCK TABLE billing.accounts, billing.entries, billing.rejections, billing.holds,
               billing.hold_events, billing.api_keys, billing.account_events, billing.prices,
               billing.jobs, billing.job_events, billing.grants, billing.refunds,
               billing.price_overrides, billing.tenant_scopes
        IN EXCLUSIVE MODE;
    IF NOT billing.is_citus_table('billing.prices') THEN
        PERFORM create_reference_table('billing.prices');
    END IF;
    IF NOT billing.is_citus_table('billing.tenant_scopes') THEN
        PERFORM create_reference_table('billing.tenant_scopes');
    END IF;
    IF NOT billing.is_distributed('billing.accounts') THEN
        PERFORM create_distributed_table('billing.accounts', 'tenant_id',
                                         shard_count => coalesce(shard_count,
                                                                 pg_catalog.current_setting('citus.shard_count')::integer));
    END IF;
    FOREACH t IN ARRAY (billing.tenant_tables())[2:] LOOP
        IF NOT billing.is_distributed(t) THEN
            PERFORM create_distributed_table(t, 'tenant_id', colocate_with => 'billing.accounts');
        END IF;
    END LOOP;
    -- every billing_* function that takes a tenant runs on the tenant's node
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::regclass
               AND d.objid OPERATOR(pg_catalog.=) p.oid AND d.deptype OPERATOR(pg_catalog.=) 'e'
          JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
               AND e.extname OPERATOR(pg_catalog.=) 'billing'
         WHERE 'tenant_id' OPERATOR(pg_catalog.=) ANY (p.proargnames)
           AND p.pronamespace OPERATOR(pg_catalog.=) e.extnamespace
         ORDER BY 1
    LOOP
        PERFORM create_distributed_function(f, 'tenant_id', colocate_with => 'billing.accounts',
                                            force_delegation => true);
        nfun := nfun OPERATOR(pg_catalog.+) 1;
    END LOOP;
    -- the rows create_distributed_table copied stay in the local heaps
    FOREACH t IN ARRAY billing.tenant_tables()
                       OPERATOR(pg_catalog.||) ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[] LOOP
        PERFORM truncate_local_data_after_distributing_table(t);
    END LOOP;
    SELECT pg_catalog.sum(billing.shell_rows(x)) INTO left_
      FROM pg_catalog.unnest(billing.tenant_tables()
                             OPERATOR(pg_catalog.||) ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[]) x;
    IF left_ OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION '% rows are still in local tables after the distribution', left_
            USING ERRCODE = 'ZB102',
                  DETAIL = 'A charge must never read or write a row outside the shards.',
                  HINT = 'Nothing was distributed (the transaction rolled back); look for a trigger or rule that writes billing''s tables.';
    END IF;
    RETURN pg_catalog.jsonb_build_object('tables', pg_catalog.cardinality(billing.tenant_tables()) OPERATOR(pg_catalog.+) 2,
                                         'functions', nfun, 'nodes', setup);
END;
$$;
COMMENT ON FUNCTION billing.citus_distribute(integer) IS 'Citus: distribute billing by tenant (tables, reference tables, functions), remove the rows left in local tables, give every node its id range; on the coordinator, once';
REVOKE ALL ON FUNCTION billing.citus_distribute(integer) FROM PUBLIC;

-- end of issue 15 (Citus)

-- ---------------------------------------------------------------------------
-- issue 17: events out of the database (wip/events): the transactional
-- outbox, alert thresholds on the account row, metrics; schema/75_events.sql
-- ---------------------------------------------------------------------------

-- the per-tenant event sequence and the alert thresholds live on the account
-- row that every charge locks and writes anyway (schema/10_accounts.sql), a
-- key's announced thresholds on its row (schema/50_keys.sql)
ALTER TABLE billing.accounts ADD COLUMN events_seq bigint NOT NULL DEFAULT 0,
                             ADD COLUMN alert_low_balance_micros bigint,
                             ADD COLUMN alert_percents integer[],
                             ADD COLUMN alert_grant_lead interval,
                             ADD COLUMN alert_state integer NOT NULL DEFAULT 0,
                             ADD COLUMN alert_grants_until timestamptz,
                             ADD COLUMN alert_grants_gid bigint,
                             ADD COLUMN alert_next_at timestamptz;
CREATE INDEX accounts_alert_next_idx ON billing.accounts (alert_next_at)
    WHERE alert_next_at IS NOT NULL;
ALTER TABLE billing.api_keys ADD COLUMN alert_levels integer NOT NULL DEFAULT 0;
-- its k.* takes the new column in, as in a fresh install
CREATE OR REPLACE VIEW billing.api_key_budgets WITH (security_barrier) AS
WITH k AS (
    SELECT k.*,
           CASE k.budget_period
               WHEN 'day' THEN (now() AT TIME ZONE a.timezone)::date
               WHEN 'month' THEN date_trunc('month', now() AT TIME ZONE a.timezone)::date
           END AS current_start,
           a.timezone
      FROM billing.api_keys k
      JOIN billing.accounts a ON a.tenant_id = k.tenant_id
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR k.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
), s AS (
    -- the key's open holds joined, grouped by key, not a correlated
    -- subquery: on Citus that is one query on one shard of each table, also
    -- inside a call Citus delegated in a transaction block
    SELECT k.*,
           CASE WHEN k.budget_period IS NULL OR k.budget_period = 'lifetime' OR k.period_start = k.current_start
                THEN k.period_spend_micros ELSE 0 END AS spent_micros,
           coalesce(h.open_micros, 0)::bigint AS on_hold_micros
      FROM k
      LEFT JOIN (SELECT h.tenant_id, h.api_key,
                        sum(h.amount_micros - h.captured_micros - h.released_micros) AS open_micros
                   FROM billing.holds h
                  WHERE h.status = 'open' AND h.expires_at > now() AND h.api_key IS NOT NULL
                  GROUP BY h.tenant_id, h.api_key) h
        ON h.tenant_id = k.tenant_id AND h.api_key = k.key_id
)
SELECT s.tenant_id,
       s.key_id,
       s.status,
       billing.to_amount(s.budget_micros) AS budget,
       s.budget_period,
       billing.to_amount(s.spent_micros) AS spent,
       billing.to_amount(s.on_hold_micros) AS on_hold,
       billing.to_amount(s.budget_micros - s.spent_micros - s.on_hold_micros) AS remaining,
       CASE s.budget_period
           WHEN 'day' THEN ((s.current_start + 1)::timestamp AT TIME ZONE s.timezone)
           WHEN 'month' THEN ((s.current_start + interval '1 month')::timestamp AT TIME ZONE s.timezone)
       END AS resets_at,
       s.last_used_at,
       s.metadata
  FROM s;
-- billing_alerts_set() records its changes as action 'alerts'
ALTER TABLE billing.account_events DROP CONSTRAINT account_events_action_check,
    ADD CONSTRAINT account_events_action_check CHECK (action IN ('create', 'update', 'limits', 'alerts'));

CREATE SEQUENCE billing.event_id_seq;
CREATE TABLE billing.events (
    tenant_id    text        NOT NULL,
    seq          bigint      NOT NULL,   -- per tenant: 1, 2, 3, ... in commit order
    event_id     bigint      NOT NULL DEFAULT nextval('billing.event_id_seq'),
    type         text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,            -- NULL until the worker delivered it to Redis
    CONSTRAINT events_pkey PRIMARY KEY (tenant_id, seq)
);
ALTER SEQUENCE billing.event_id_seq OWNED BY billing.events.event_id;
-- the worker's queue: undelivered events in event_id order (a tenant's
-- event ids grow with its seq: both are taken under its account lock)
CREATE INDEX events_undelivered_idx ON billing.events (event_id) WHERE delivered_at IS NULL;
-- the pruning after billing.events_retention
CREATE INDEX events_created_idx ON billing.events (created_at);
-- a redelivery (Redis lost events: see src/outbox.c) walks the delivered
-- ones in event_id order, a batch at a time from where the last one ended
CREATE INDEX events_id_idx ON billing.events (event_id);
COMMENT ON TABLE billing.events IS 'the outbox: events written in the transaction of their change, numbered per tenant, delivered to Redis Streams by the worker';
SELECT pg_catalog.pg_extension_config_dump('billing.events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.event_id_seq', '');

CREATE VIEW billing.event_log WITH (security_barrier) AS
SELECT e.tenant_id, e.seq, e.event_id, e.type, e.payload, e.created_at, e.delivered_at
  FROM billing.events e
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.event_log IS 'the events still in the outbox (undelivered, or delivered within billing.events_retention)';

CREATE VIEW billing.alerts WITH (security_barrier) AS
WITH a AS (
    SELECT a.*,
           (now() AT TIME ZONE a.timezone)::date AS today,
           date_trunc('month', now() AT TIME ZONE a.timezone)::date AS this_month
      FROM billing.accounts a
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR a.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
)
SELECT a.tenant_id,
       billing.to_amount(a.alert_low_balance_micros) AS low_balance,
       a.alert_percents AS quota_percents,
       a.alert_grant_lead AS grant_expiring,
       (a.alert_state & 1) = 1 AS low_balance_announced,
       CASE WHEN a.usage_day = a.today THEN a.alert_percents[(a.alert_state >> 4) & 15] END AS daily_requests_announced,
       CASE WHEN a.usage_month = a.this_month THEN a.alert_percents[(a.alert_state >> 8) & 15] END AS monthly_requests_announced,
       CASE WHEN a.usage_day = a.today THEN a.alert_percents[(a.alert_state >> 12) & 15] END AS daily_spend_announced,
       CASE WHEN a.usage_month = a.this_month THEN a.alert_percents[(a.alert_state >> 16) & 15] END AS monthly_spend_announced,
       a.alert_grants_until AS grants_announced_until,
       a.alert_next_at AS next_grant_alert_at,
       a.events_seq AS last_event_seq
  FROM a;
COMMENT ON VIEW billing.alerts IS 'per account: the alert thresholds (billing_alerts_set) and what of them has been announced';

CREATE FUNCTION @extschema@.billing_alerts_set(tenant_id text,
                                   low_balance numeric DEFAULT NULL,
                                   quota_percents integer[] DEFAULT NULL,
                                   grant_expiring interval DEFAULT NULL,
                                   reason text DEFAULT NULL)
    RETURNS SETOF billing.alerts
    AS 'MODULE_PATHNAME', 'billing_alerts_set'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_alerts_set(text, numeric, integer[], interval, text) IS
    'set the alert thresholds of an account (NULL = off): low balance, percentages of its quotas, caps and key budgets, grant expiry lead; recorded in billing.account_events';
REVOKE ALL ON FUNCTION @extschema@.billing_alerts_set(text, numeric, integer[], interval, text) FROM PUBLIC;

-- an event of a tenant, in this transaction (billing_account_update, the
-- worker's mirror.repaired): takes the account lock and the next seq
CREATE FUNCTION billing.event_write(tenant_id text, type text, payload jsonb) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_event_write'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.event_write(text, text, jsonb) IS 'write an event of a tenant into the outbox, in this transaction; returns its sequence number (internal)';
REVOKE ALL ON FUNCTION billing.event_write(text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION billing.alerts_check(tenant_id text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_alerts_check'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.alerts_check(text) IS 'what falls due by itself on one account (expiries, grant.expiring); true when an event was written (internal)';
REVOKE ALL ON FUNCTION billing.alerts_check(text) FROM PUBLIC;

-- SECURITY DEFINER: the worker's role needs EXECUTE on it only
CREATE FUNCTION billing.alerts_due(max_accounts integer DEFAULT 1000) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s    regclass;
    t    text;
    n    integer := 0;
    seen integer := 0;
BEGIN
    -- this node's accounts: the table, or on Citus each shard placed here
    -- (Citus refuses FOR UPDATE in a query over the distributed table)
    FOR s IN SELECT billing.local_shards('billing.accounts') LOOP
        FOR t IN EXECUTE pg_catalog.format(
                     'SELECT a.tenant_id FROM %s a '
                     'WHERE a.alert_next_at OPERATOR(pg_catalog.<=) pg_catalog.now() '
                     'ORDER BY a.alert_next_at '
                     'LIMIT $1 FOR UPDATE SKIP LOCKED', s)
                 USING max_accounts OPERATOR(pg_catalog.-) seen
        LOOP
            seen := seen OPERATOR(pg_catalog.+) 1;
            -- one account that cannot be checked must not stop the others
            BEGIN
                IF billing.alerts_check(t) THEN
                    n := n OPERATOR(pg_catalog.+) 1;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'billing: the alerts'' sweep skipped account "%": %', t, SQLERRM;
            END;
        END LOOP;
        EXIT WHEN seen OPERATOR(pg_catalog.>=) max_accounts;
    END LOOP;
    RETURN n;
END;
$$;
COMMENT ON FUNCTION billing.alerts_due(integer) IS 'announce the grant.expiring events due on accounts nobody else has locked (the worker runs it)';
REVOKE ALL ON FUNCTION billing.alerts_due(integer) FROM PUBLIC;

CREATE FUNCTION billing.metric_samples()
    RETURNS TABLE (name text, labels jsonb, value double precision, type text, help text)
    AS 'MODULE_PATHNAME', 'billing_metric_samples'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.metric_samples() IS 'the samples of billing_metrics() as rows (the view billing.metrics)';
REVOKE ALL ON FUNCTION billing.metric_samples() FROM PUBLIC;

CREATE VIEW billing.metrics AS SELECT * FROM billing.metric_samples();
COMMENT ON VIEW billing.metrics IS 'the samples of billing_metrics() as rows, for postgres_exporter and dashboards';

CREATE FUNCTION @extschema@.billing_metrics() RETURNS text
    AS 'MODULE_PATHNAME', 'billing_metrics'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_metrics() IS 'charges, refusals, entries, holds, jobs, the Redis mirror and the outbox in the Prometheus text exposition format';
REVOKE ALL ON FUNCTION @extschema@.billing_metrics() FROM PUBLIC;

-- billing_sync_status(): the outbox's backlog and delivery lag after the
-- mirror's columns; SECURITY DEFINER, as it reads the outbox for every caller
ALTER TYPE billing.sync_info ADD ATTRIBUTE events_backlog bigint,
                             ADD ATTRIBUTE events_lag interval,
                             ADD ATTRIBUTE events_delivered bigint,
                             ADD ATTRIBUTE events_last_delivered_at timestamptz,
                             ADD ATTRIBUTE events_recent_lag_p50_ms double precision,
                             ADD ATTRIBUTE events_recent_lag_p99_ms double precision,
                             ADD ATTRIBUTE events_last_error text,
                             ADD ATTRIBUTE events_last_error_at timestamptz;
CREATE OR REPLACE VIEW billing.sync_status AS SELECT * FROM @extschema@.billing_sync_status();
ALTER FUNCTION @extschema@.billing_sync_status() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- account.status_changed (billing_account_update), a changed quota or cap
-- (billing_limits_set) or key budget (billing_api_key_update) announced
-- afresh: the mirror's section below defines these three last, as in
-- schema/, with the events' changes

-- end of issue 17 (events)

-- ---------------------------------------------------------------------------
-- issue 18: the charge engine (wip/engine): billing_charge(), batched by
-- engine workers; billing_engine_status(); billing.engine_test_gate() for
-- tests.  Their rights: billing.role_functions() in the roles section below.
-- ---------------------------------------------------------------------------
CREATE FUNCTION @extschema@.billing_charge(tenant_id text, amount numeric, trace_id text,
                               description text DEFAULT NULL,
                               metadata jsonb DEFAULT NULL,
                               event_at timestamptz DEFAULT NULL,
                               kind text DEFAULT 'deduct',
                               api_key text DEFAULT NULL)
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_charge'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.billing_charge(text, numeric, text, text, jsonb, timestamptz, text, text) IS
    'billing_deduct committed by the charge engine, batched with other callers'' charges; outside transaction blocks only; idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_charge(text, numeric, text, text, jsonb, timestamptz, text, text) FROM PUBLIC;

CREATE TYPE billing.engine_info AS (
    database      text,
    worker        integer,      -- 1 .. billing.engine_workers
    pid           integer,      -- NULL unless running
    state         text,         -- running, starting, stopped
    queued        integer,      -- charges waiting for this worker now
    free_slots    integer,      -- places left in the shared queue (all workers)
    batches       bigint,       -- since the server started
    charges       bigint,       -- results handed back
    largest_batch bigint,
    retries       bigint,       -- batches applied again after an error
    deferrals     bigint,       -- tenants put off to the next batch (account locked elsewhere)
    last_batch_at timestamptz
);

CREATE FUNCTION @extschema@.billing_engine_status() RETURNS SETOF billing.engine_info
    AS 'MODULE_PATHNAME', 'billing_engine_status'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.billing_engine_status() IS 'the charge engine''s workers: state, queue, batches';
REVOKE ALL ON FUNCTION @extschema@.billing_engine_status() FROM PUBLIC;

-- for tests only (superuser): make the charges queued meanwhile one batch
CREATE FUNCTION billing.engine_test_gate(on_ boolean) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_engine_test_gate'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.engine_test_gate(boolean) IS
    'tests only: true holds the charge engine (and billing_charge''s callers, on an advisory lock) until false, so that what was queued meanwhile is one batch';
REVOKE ALL ON FUNCTION billing.engine_test_gate(boolean) FROM PUBLIC;
-- end of issue 18 (the charge engine)

-- ---------------------------------------------------------------------------
-- the roles (issue 12), after every other section: billing.role_functions()
-- names the functions the sections create
-- ---------------------------------------------------------------------------

-- the roles: charging, treasury, admin, reporting (see schema/90_privileges.sql)
DROP FUNCTION billing.app_functions();
CREATE FUNCTION billing.role_functions(role_kind text) RETURNS regprocedure[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    -- the API's functions in the schema the extension is in now, found by
    -- the extension's record: if the database owner renamed it, the grants
    -- still go to the extension's functions, not to ones of the same names
    -- in a new schema of the old name
    SELECT pg_catalog.array_agg(CASE WHEN pg_catalog.starts_with(u.f, '@extschema@.')
               THEN (SELECT pg_catalog.quote_ident(n.nspname)
                       FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                      WHERE e.extname = 'billing')
                    || '.' || pg_catalog.substr(u.f, pg_catalog.length('@extschema@.') + 1)
               ELSE u.f END::pg_catalog.regprocedure ORDER BY u.i)
      FROM pg_catalog.unnest(CASE role_kind
    WHEN 'charging' THEN ARRAY[
        '@extschema@.billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text)',
        '@extschema@.billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text, text)',
        '@extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric)',
        '@extschema@.billing_deduct_many(text[], numeric[], text[], text[], jsonb[], text[], text)',
        '@extschema@.billing_charge(text, numeric, text, text, jsonb, timestamptz, text, text)',
        '@extschema@.billing_hold(text, numeric, text, interval, text, jsonb, text)',
        '@extschema@.billing_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz)',
        '@extschema@.billing_release(text, text, text)',
        '@extschema@.billing_hold_extend(text, text, interval)',
        '@extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text)',
        '@extschema@.billing_balance(text)',
        '@extschema@.billing_balance_at(text, timestamptz)',
        '@extschema@.billing_job_submit(text, text, text, numeric, jsonb, integer, timestamptz, interval)',
        '@extschema@.billing_job_claim(text, text[], integer, interval, text)',
        '@extschema@.billing_job_heartbeat(text, bigint, text, interval)',
        '@extschema@.billing_job_complete(text, bigint, numeric, jsonb, text)',
        '@extschema@.billing_job_fail(text, bigint, text, boolean, text)',
        '@extschema@.billing_job_cancel(text, bigint, text)',
        '@extschema@.billing_job_retry(text, bigint)',
        '@extschema@.billing_job_rescue(integer)'
    ]::pg_catalog.text[]
    WHEN 'treasury' THEN ARRAY[
        '@extschema@.billing_credit(text, numeric, text, text, jsonb, timestamptz, text)',
        '@extschema@.billing_grant(text, numeric, text, timestamptz, integer, text, text, jsonb)',
        '@extschema@.billing_refund(text, text, numeric, text, text)',
        '@extschema@.billing_balance(text)',
        '@extschema@.billing_balance_at(text, timestamptz)'
    ]::pg_catalog.text[]
    WHEN 'admin' THEN ARRAY[
        '@extschema@.billing_account_create(text, text, numeric, text, text, jsonb)',
        '@extschema@.billing_account_update(text, numeric, text, text, jsonb, text)',
        '@extschema@.billing_limits_set(text, bigint, bigint, numeric, numeric, numeric, bigint, text)',
        '@extschema@.billing_api_key_create(text, text, numeric, text, jsonb)',
        '@extschema@.billing_api_key_update(text, text, text, numeric, text, boolean)',
        '@extschema@.billing_price_set(text, numeric, numeric, timestamptz, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric)',
        '@extschema@.billing_price_override_set(text, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric, timestamptz)',
        '@extschema@.billing_price_override_end(text, text, timestamptz)',
        '@extschema@.billing_scope_role(regrole, text[])',
        '@extschema@.billing_unscope_role(regrole)',
        '@extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text)',
        '@extschema@.billing_balance(text)',
        '@extschema@.billing_balance_at(text, timestamptz)',
        '@extschema@.billing_verify(text)',
        '@extschema@.billing_sync_status()',
        '@extschema@.billing_alerts_set(text, numeric, integer[], interval, text)',
        '@extschema@.billing_metrics()',
        '@extschema@.billing_engine_status()',
        'billing.effective_holds(billing.accounts)',
        'billing.expired_micros(billing.accounts, timestamptz)',
        'billing.metric_samples()'
    ]::pg_catalog.text[]
    WHEN 'reporting' THEN ARRAY[
        -- the functions the views call (a view runs them with the reader's rights),
        -- and the two that 1.3's billing.balances called (caller's rights since 1.4)
        'billing.effective_holds(billing.accounts)',
        'billing.expired_micros(billing.accounts, timestamptz)',
        '@extschema@.billing_sync_status()',
        'billing.metric_samples()',
        '@extschema@.billing_metrics()',
        '@extschema@.billing_engine_status()'
    ]::pg_catalog.text[]
    END) WITH ORDINALITY u(f, i)
$$;
REVOKE ALL ON FUNCTION billing.role_functions(text) FROM PUBLIC;
COMMENT ON FUNCTION billing.role_functions(text) IS 'the functions of a role (charging, treasury, admin, reporting), for the grant helpers';

CREATE FUNCTION billing.grant_role(role regrole, role_kind text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn regprocedure;
    v regclass;
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the role to grant to.';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA billing TO %s', role);
    FOREACH fn IN ARRAY billing.role_functions(role_kind) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', fn, role);
    END LOOP;
    IF role_kind = 'reporting' THEN
        FOR v IN SELECT c.oid FROM pg_catalog.pg_class c
                  WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'v'
        LOOP
            EXECUTE format('GRANT SELECT ON %s TO %s', v, role);
        END LOOP;
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.grant_role(regrole, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_grant_charging(role regrole) RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT billing.grant_role(role, 'charging') $$;
COMMENT ON FUNCTION @extschema@.billing_grant_charging(regrole) IS 'grant a role the charging API: charges, holds, jobs, balance reads (no credits, no settings, no tables)';
REVOKE ALL ON FUNCTION @extschema@.billing_grant_charging(regrole) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_grant_treasury(role regrole) RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT billing.grant_role(role, 'treasury') $$;
COMMENT ON FUNCTION @extschema@.billing_grant_treasury(regrole) IS 'grant a role the treasury API: credits of every kind, balance reads';
REVOKE ALL ON FUNCTION @extschema@.billing_grant_treasury(regrole) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_grant_admin(role regrole) RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT billing.grant_role(role, 'admin') $$;
COMMENT ON FUNCTION @extschema@.billing_grant_admin(regrole) IS 'grant a role the admin API: accounts, limits, API keys, prices, tenant scopes, the audit';
REVOKE ALL ON FUNCTION @extschema@.billing_grant_admin(regrole) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.billing_grant_reporting(role regrole) RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT billing.grant_role(role, 'reporting') $$;
COMMENT ON FUNCTION @extschema@.billing_grant_reporting(regrole) IS 'grant a reporting role SELECT on the billing views (no tables); see billing_scope_role() to limit it to some tenants';

CREATE OR REPLACE FUNCTION @extschema@.billing_grant_app(role regrole) RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT billing.grant_role(role, 'charging') $$;
COMMENT ON FUNCTION @extschema@.billing_grant_app(regrole) IS 'deprecated: billing_grant_charging() (since 1.4 the application role cannot credit or change settings)';

CREATE FUNCTION @extschema@.billing_revoke_all(role regrole) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn regprocedure;
    v regclass;
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the role to revoke from.';
    END IF;
    FOR fn IN SELECT DISTINCT f FROM unnest(billing.role_functions('charging') || billing.role_functions('treasury')
                                            || billing.role_functions('admin') || billing.role_functions('reporting')) f
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', fn, role);
    END LOOP;
    FOR v IN SELECT c.oid FROM pg_catalog.pg_class c
              WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'v'
    LOOP
        EXECUTE format('REVOKE SELECT ON %s FROM %s', v, role);
    END LOOP;
    EXECUTE format('REVOKE USAGE ON SCHEMA billing FROM %s', role);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_revoke_all(regrole) IS 'revoke every right the grant helpers give from a role';
REVOKE ALL ON FUNCTION @extschema@.billing_revoke_all(regrole) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_scope_role(role regrole, tenant_ids text[])
    RETURNS SETOF billing.tenant_scopes
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
    name name := (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = role);
BEGIN
    IF role IS NULL OR tenant_ids IS NULL THEN
        RAISE EXCEPTION 'role and tenant_ids must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the role and the tenants it may see.';
    END IF;
    IF cardinality(tenant_ids) = 0 OR cardinality(tenant_ids) > 10000 OR array_position(tenant_ids, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'tenant_ids must name 1 to 10000 tenants'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('It names %s (nulls: %s).', cardinality(tenant_ids),
                                  array_position(tenant_ids, NULL) IS NOT NULL),
                  HINT = 'To let the role see every tenant again, call billing_unscope_role().';
    END IF;
    FOREACH t IN ARRAY tenant_ids LOOP
        PERFORM billing.check_id(t, 'tenant_id', 'ZB016');
    END LOOP;
    DELETE FROM billing.tenant_scopes s WHERE s.role_name = name;
    INSERT INTO billing.tenant_scopes (role_name, tenant_id)
    SELECT DISTINCT name, x FROM unnest(tenant_ids) x;
    RETURN QUERY SELECT * FROM billing.tenant_scopes s WHERE s.role_name = name ORDER BY s.tenant_id;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_scope_role(regrole, text[]) IS 'let a reporting role see only these tenants in the billing views (replaces its scope)';
REVOKE ALL ON FUNCTION @extschema@.billing_scope_role(regrole, text[]) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_unscope_role(role regrole) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the role.';
    END IF;
    DELETE FROM billing.tenant_scopes s
     WHERE s.role_name = (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = role);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_unscope_role(regrole) IS 'let a reporting role see every tenant again';
REVOKE ALL ON FUNCTION @extschema@.billing_unscope_role(regrole) FROM PUBLIC;

-- 1.3's billing_grant_app() gave the application role every function: money
-- in (billing_credit), credit limits and status, limits, keys.  A role that
-- was granted all of 1.3's application functions got them that way: it
-- keeps the charging role's rights and loses the others; a WARNING names it
-- and says how to give back what it needs.  Grants made function by
-- function are left as they are.
--
-- A REVOKE inside an extension script also records the function's whole new
-- ACL, user grants included, as the extension's own privileges
-- (pg_init_privs); pg_dump would then leave those user grants out of a dump.
-- So each function's recorded privileges are put back as they were.
DO $$
DECLARE
    app regprocedure[] := ARRAY[
        '@extschema@.billing_credit(text, numeric, text, text, jsonb, timestamptz, text)',
        '@extschema@.billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text)',
        '@extschema@.billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text, text)',
        '@extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric)',
        '@extschema@.billing_deduct_many(text[], numeric[], text[], text[], jsonb[], text[], text)',
        '@extschema@.billing_hold(text, numeric, text, interval, text, jsonb, text)',
        '@extschema@.billing_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz)',
        '@extschema@.billing_release(text, text, text)',
        '@extschema@.billing_hold_extend(text, text, interval)',
        '@extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text)',
        '@extschema@.billing_balance(text)',
        '@extschema@.billing_balance_at(text, timestamptz)',
        '@extschema@.billing_account_create(text, text, numeric, text, text, jsonb)',
        '@extschema@.billing_account_update(text, numeric, text, text, jsonb, text)',
        '@extschema@.billing_limits_set(text, bigint, bigint, numeric, numeric, numeric, bigint, text)',
        '@extschema@.billing_api_key_create(text, text, numeric, text, jsonb)',
        '@extschema@.billing_api_key_update(text, text, text, numeric, text, boolean)',
        '@extschema@.billing_job_submit(text, text, text, numeric, jsonb, integer, timestamptz, interval)',
        '@extschema@.billing_job_claim(text, text[], integer, interval, text)',
        '@extschema@.billing_job_heartbeat(text, bigint, text, interval)',
        '@extschema@.billing_job_complete(text, bigint, numeric, jsonb, text)',
        '@extschema@.billing_job_fail(text, bigint, text, boolean, text)',
        '@extschema@.billing_job_cancel(text, bigint, text)',
        '@extschema@.billing_job_retry(text, bigint)',
        '@extschema@.billing_job_rescue(integer)'
    ]::regprocedure[];
    keep regprocedure[] := billing.role_functions('charging');
    r record;
    fn regprocedure;
    lost text[];
    init aclitem[];
BEGIN
    FOR r IN
        SELECT g.grantee, ro.rolname
          FROM (SELECT a.grantee, count(DISTINCT p.oid) AS n
                  FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
                 WHERE p.oid = ANY (app) AND a.privilege_type = 'EXECUTE'
                 GROUP BY a.grantee) g
          JOIN pg_catalog.pg_roles ro ON ro.oid = g.grantee
         WHERE g.n = cardinality(app)
           AND g.grantee <> (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'billing')
    LOOP
        lost := '{}';
        FOREACH fn IN ARRAY app LOOP
            IF NOT fn = ANY (keep) THEN
                init := (SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip
                          WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                            AND ip.objoid = fn AND ip.objsubid = 0);
                EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM %I', fn, r.rolname);
                UPDATE pg_catalog.pg_init_privs ip SET initprivs = init
                 WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                   AND ip.objoid = fn AND ip.objsubid = 0;
                lost := lost || (SELECT p.proname::text FROM pg_catalog.pg_proc p WHERE p.oid = fn);
            END IF;
        END LOOP;
        -- 1.3 also granted billing.effective_holds (for the rows of
        -- billing.balances); a reporting role keeps it for the views
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                        WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'v'
                          AND pg_catalog.has_table_privilege(r.grantee, c.oid, 'SELECT')) THEN
            init := (SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip
                      WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                        AND ip.objoid = 'billing.effective_holds(billing.accounts)'::regprocedure AND ip.objsubid = 0);
            EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION billing.effective_holds(billing.accounts) FROM %I', r.rolname);
            UPDATE pg_catalog.pg_init_privs ip SET initprivs = init
             WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
               AND ip.objoid = 'billing.effective_holds(billing.accounts)'::regprocedure AND ip.objsubid = 0;
        END IF;
        RAISE WARNING 'billing 1.4: role "%" keeps the charging API and may no longer call %',
                      r.rolname, pg_catalog.array_to_string(lost, ', ')
            USING HINT = pg_catalog.format('If it must: SELECT billing_grant_treasury(%L) for credits, SELECT billing_grant_admin(%L) for accounts, limits, keys and prices.',
                                           r.rolname, r.rolname);
    END LOOP;
END
$$;

-- 1.3's reporting roles (SELECT on every view 1.3 had) read 1.4's new views
-- too, and billing.expired_micros(), as billing.effective_holds(), which
-- every reader of 1.3 was given (the reporting role's rights of a fresh
-- install; no 1.4 view calls them).  The recorded privileges (pg_init_privs) are put back as
-- above, so that pg_dump keeps dumping these grants as the user's.
DO $$
DECLARE
    old_views regclass[] := ARRAY['billing.balances', 'billing.ledger', 'billing.open_holds',
        'billing.quota_usage', 'billing.api_key_budgets', 'billing.price_list', 'billing.usage_daily',
        'billing.usage_monthly', 'billing.usage_by_model', 'billing.usage_by_api_key',
        'billing.jobs_by_state', 'billing.job_failures', 'billing.job_costs',
        'billing.job_time_in_state', 'billing.sync_status']::regclass[];
    owner oid := (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'billing');
    r record;
    v regclass;
    fn regprocedure;
    init aclitem[];
BEGIN
    FOR r IN
        SELECT ro.oid, ro.rolname FROM pg_catalog.pg_roles ro
         WHERE ro.oid <> owner
           AND (pg_catalog.has_function_privilege(ro.oid, 'billing.effective_holds(billing.accounts)', 'EXECUTE')
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
                             WHERE p.oid = 'billing.effective_holds(billing.accounts)'::regprocedure
                               AND a.grantee = ro.oid))
    LOOP
        init := (SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip
                  WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                    AND ip.objoid = 'billing.expired_micros(billing.accounts, timestamptz)'::regprocedure
                    AND ip.objsubid = 0);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION billing.expired_micros(billing.accounts, timestamptz) TO %I',
                                  r.rolname);
        UPDATE pg_catalog.pg_init_privs ip SET initprivs = init
         WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
           AND ip.objoid = 'billing.expired_micros(billing.accounts, timestamptz)'::regprocedure
           AND ip.objsubid = 0;
        IF (SELECT pg_catalog.bool_and(pg_catalog.has_table_privilege(r.oid, ov, 'SELECT'))
              FROM pg_catalog.unnest(old_views) ov) THEN
            FOR v IN SELECT c.oid::regclass FROM pg_catalog.pg_class c
                      WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'v'
                        AND NOT c.oid = ANY (old_views)
                        AND NOT pg_catalog.has_table_privilege(r.oid, c.oid, 'SELECT')
            LOOP
                init := (SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip
                          WHERE ip.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
                            AND ip.objoid = v AND ip.objsubid = 0);
                EXECUTE pg_catalog.format('GRANT SELECT ON %s TO %I', v, r.rolname);
                -- a view had no recorded privileges: the GRANT recorded some
                IF init IS NULL THEN
                    DELETE FROM pg_catalog.pg_init_privs ip
                     WHERE ip.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
                       AND ip.objoid = v AND ip.objsubid = 0;
                ELSE
                    UPDATE pg_catalog.pg_init_privs ip SET initprivs = init
                     WHERE ip.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
                       AND ip.objoid = v AND ip.objsubid = 0;
                END IF;
            END LOOP;
            -- issue 17: the view billing.metrics calls billing.metric_samples()
            -- with the reader's rights; billing_metrics() is the same as text
            FOR fn IN SELECT f FROM pg_catalog.unnest(ARRAY['billing.metric_samples()',
                                   '@extschema@.billing_metrics()']::regprocedure[]) f
            LOOP
                init := (SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip
                          WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                            AND ip.objoid = fn AND ip.objsubid = 0);
                EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', fn, r.rolname);
                UPDATE pg_catalog.pg_init_privs ip SET initprivs = init
                 WHERE ip.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                   AND ip.objoid = fn AND ip.objsubid = 0;
            END LOOP;
        END IF;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- Issue 12, the background worker (wip/worker): every operator and function
-- in the worker's SQL schema-qualified; billing.maintenance() SECURITY
-- DEFINER, so that a worker running as billing.worker_role needs EXECUTE on
-- it only; billing_grant_worker(role) grants that role what it needs.  With
-- issue 15 (Citus) the maintenance and the resync pages are per node.
-- ---------------------------------------------------------------------------
-- (billing.expire_due_holds(): see the issue 16 and issue 15 sections)

CREATE OR REPLACE FUNCTION billing.maintenance() RETURNS jsonb
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    expired integer;
    rescued integer;
BEGIN
    -- Citus: a node added after billing.citus_distribute() gets its own id
    -- range here (its charges refuse until then)
    IF billing.is_distributed('billing.accounts') THEN
        PERFORM billing.citus_node_setup();
    END IF;
    -- this node's accounts and jobs (on Citus: its shards)
    expired := billing.expire_due_holds(1000);
    SELECT pg_catalog.count(*) INTO rescued FROM billing.job_rescue_local(100);
    RETURN pg_catalog.jsonb_build_object('accounts_with_expired_holds', expired, 'jobs_rescued', rescued);
END;
$$;
COMMENT ON FUNCTION billing.maintenance() IS 'periodic maintenance run by the background worker: expire holds, rescue stuck jobs (on Citus: of this node, and its id range)';

CREATE OR REPLACE FUNCTION billing.sync_snapshot(tenants text[], after text, lim integer)
    RETURNS TABLE (tenant_id text, key_id text, version bigint, fields text[])
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src text;
BEGIN
    IF tenants IS NULL THEN
        -- a resync page: the tenants after `after` of this node (the table,
        -- or on Citus the shards placed here)
        SELECT pg_catalog.string_agg(pg_catalog.format('SELECT a.tenant_id FROM %s a '
                                                       'WHERE a.tenant_id OPERATOR(pg_catalog.>) $1', s),
                                     ' UNION ALL ')
          INTO src FROM billing.local_shards('billing.accounts') s;
        IF src IS NULL THEN
            RETURN;
        END IF;
        EXECUTE pg_catalog.format('SELECT ARRAY(SELECT t.tenant_id FROM (%s) t ORDER BY 1 LIMIT $2)', src)
           INTO tenants USING after, lim;
    END IF;
    RETURN QUERY
        SELECT s.* FROM billing.sync_snapshot_of(tenants) AS s
         ORDER BY s.tenant_id, s.key_id NULLS LAST;
END
$$;

CREATE FUNCTION @extschema@.billing_grant_worker(role regrole) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the role of billing.worker_role.';
    END IF;
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA billing TO %s', role);
    EXECUTE pg_catalog.format('GRANT SELECT ON billing.accounts, billing.api_keys, billing.holds TO %s', role);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION billing.sync_snapshot(text[], text, integer), billing.sync_snapshot_of(text[]), billing.maintenance(), billing.local_shards(regclass) TO %s', role);
    -- the events (schema/75_events.sql): deliver, mark, prune; the sweep; mirror.repaired
    EXECUTE pg_catalog.format('GRANT SELECT, UPDATE, DELETE ON billing.events TO %s', role);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION billing.alerts_due(integer), billing.event_write(text, text, jsonb) TO %s', role);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_grant_worker(regrole) IS 'grant the background worker''s role (billing.worker_role) what it needs: read the snapshot tables, build snapshots, run the maintenance, deliver and prune the events';
REVOKE ALL ON FUNCTION @extschema@.billing_grant_worker(regrole) FROM PUBLIC;
-- (end of the worker's section)

-- ---------------------------------------------------------------------------
-- issue 12 (M6) and 16 (the Redis hash and expiry): the mirror pushes the API
-- key hashes that changed, not every key of a tenant
-- ---------------------------------------------------------------------------

-- the account version of the last change of a key's Redis hash; the hashes
-- in Redis carry at most the account's version now
ALTER TABLE billing.api_keys ADD COLUMN version bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN billing.api_keys.version IS 'the account version of the last change of the key''s Redis hash (its version there): the worker pushes the keys that changed, not every key of the account';
UPDATE billing.api_keys k SET version = a.version
  FROM billing.accounts a WHERE a.tenant_id = k.tenant_id;
-- the view's k.* (the CTE) takes in the new column, as in a fresh install
CREATE OR REPLACE VIEW billing.api_key_budgets WITH (security_barrier) AS
WITH k AS (
    SELECT k.*,
           CASE k.budget_period
               WHEN 'day' THEN (now() AT TIME ZONE a.timezone)::date
               WHEN 'month' THEN date_trunc('month', now() AT TIME ZONE a.timezone)::date
           END AS current_start,
           a.timezone
      FROM billing.api_keys k
      JOIN billing.accounts a ON a.tenant_id = k.tenant_id
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR k.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
), s AS (
    -- the key's open holds joined, grouped by key, not a correlated
    -- subquery: on Citus that is one query on one shard of each table, also
    -- inside a call Citus delegated in a transaction block
    SELECT k.*,
           CASE WHEN k.budget_period IS NULL OR k.budget_period = 'lifetime' OR k.period_start = k.current_start
                THEN k.period_spend_micros ELSE 0 END AS spent_micros,
           coalesce(h.open_micros, 0)::bigint AS on_hold_micros
      FROM k
      LEFT JOIN (SELECT h.tenant_id, h.api_key,
                        sum(h.amount_micros - h.captured_micros - h.released_micros) AS open_micros
                   FROM billing.holds h
                  WHERE h.status = 'open' AND h.expires_at > now() AND h.api_key IS NOT NULL
                  GROUP BY h.tenant_id, h.api_key) h
        ON h.tenant_id = k.tenant_id AND h.api_key = k.key_id
)
SELECT s.tenant_id,
       s.key_id,
       s.status,
       billing.to_amount(s.budget_micros) AS budget,
       s.budget_period,
       billing.to_amount(s.spent_micros) AS spent,
       billing.to_amount(s.on_hold_micros) AS on_hold,
       billing.to_amount(s.budget_micros - s.spent_micros - s.on_hold_micros) AS remaining,
       CASE s.budget_period
           WHEN 'day' THEN ((s.current_start + 1)::timestamp AT TIME ZONE s.timezone)
           WHEN 'month' THEN ((s.current_start + interval '1 month')::timestamp AT TIME ZONE s.timezone)
       END AS resets_at,
       s.last_used_at,
       s.metadata
  FROM s;


CREATE FUNCTION billing.sync_mark_keys(tenant_id text, since bigint, key_ids text[]) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_sync_mark_keys_sql'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.sync_mark_keys(text, bigint, text[]) IS 'mark a tenant changed from account version since on, and the API keys whose Redis hashes changed (NULL: those whose api_keys.version is above since)';
REVOKE ALL ON FUNCTION billing.sync_mark_keys(text, bigint, text[]) FROM PUBLIC;

-- the SQL functions that change a key or the time zone: the key's version,
-- and a mark that names what changed
CREATE OR REPLACE FUNCTION @extschema@.billing_account_update(tenant_id text,
                                       credit_limit numeric DEFAULT NULL,
                                       status text DEFAULT NULL,
                                       timezone text DEFAULT NULL,
                                       metadata jsonb DEFAULT NULL,
                                       reason text DEFAULT NULL)
    RETURNS SETOF billing.balances
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    p_tenant   text := billing_account_update.tenant_id;
    p_limit    bigint;
    acc        billing.accounts;
    changes    jsonb := '{}';
    old_day    date;
    old_month  date;
    new_day    date;
    new_month  date;
BEGIN
    PERFORM billing.check_account_settings(p_tenant, NULL,
                                           billing_account_update.status,
                                           billing_account_update.timezone,
                                           billing_account_update.metadata);
    PERFORM billing.check_text(billing_account_update.reason, 'reason');
    IF billing_account_update.credit_limit IS NOT NULL THEN
        p_limit := billing.to_micros(billing_account_update.credit_limit, 'credit_limit', true);
    END IF;

    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = p_tenant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', p_tenant
            USING ERRCODE = 'ZB001',
                  HINT = format('Create it first with billing_account_create(%L).', p_tenant);
    END IF;
    IF acc.status = 'closed' THEN
        RAISE EXCEPTION 'account "%" is closed', p_tenant
            USING ERRCODE = 'ZB003',
                  DETAIL = 'A closed account cannot be changed or reopened.',
                  HINT = 'Closed is final: open a new account for this customer.';
    END IF;

    IF p_limit IS NOT NULL AND p_limit <> acc.credit_limit_micros THEN
        changes := changes || jsonb_build_object('credit_limit', jsonb_build_object(
                       'old', billing.to_amount(acc.credit_limit_micros), 'new', billing.to_amount(p_limit)));
        acc.credit_limit_micros := p_limit;
    END IF;
    IF billing_account_update.status IS NOT NULL AND billing_account_update.status <> acc.status THEN
        changes := changes || jsonb_build_object('status', jsonb_build_object(
                       'old', acc.status, 'new', billing_account_update.status));
        acc.status := billing_account_update.status;
    END IF;
    IF billing_account_update.timezone IS NOT NULL AND billing_account_update.timezone <> acc.timezone THEN
        changes := changes || jsonb_build_object('timezone', jsonb_build_object(
                       'old', acc.timezone, 'new', billing_account_update.timezone));
        -- The usage of the current day and month carries over into the new
        -- zone's current day and month: a zone change never starts a period
        -- afresh, so switching zones back and forth cannot reset a quota.
        -- (The periods are computed first: Citus refuses now() inside a
        -- CASE of an UPDATE.)
        old_day := (now() AT TIME ZONE acc.timezone)::date;
        old_month := date_trunc('month', now() AT TIME ZONE acc.timezone)::date;
        new_day := (now() AT TIME ZONE billing_account_update.timezone)::date;
        new_month := date_trunc('month', now() AT TIME ZONE billing_account_update.timezone)::date;
        IF acc.usage_day = old_day THEN
            acc.usage_day := new_day;
        END IF;
        IF acc.usage_month = old_month THEN
            acc.usage_month := new_month;
        END IF;
        UPDATE billing.api_keys k
           SET period_start = CASE WHEN k.budget_period = 'day' THEN new_day ELSE new_month END
         WHERE k.tenant_id = p_tenant
           AND k.period_start = CASE WHEN k.budget_period = 'day' THEN old_day
                                     WHEN k.budget_period = 'month' THEN old_month END;
        -- every key's Redis hash says when its budget period ends: all change
        UPDATE billing.api_keys k SET version = acc.version + 1 WHERE k.tenant_id = p_tenant;
        acc.timezone := billing_account_update.timezone;
    END IF;
    IF billing_account_update.metadata IS NOT NULL AND billing_account_update.metadata <> acc.metadata THEN
        changes := changes || jsonb_build_object('metadata', jsonb_build_object(
                       'old', acc.metadata, 'new', billing_account_update.metadata));
        acc.metadata := billing_account_update.metadata;
    END IF;

    IF changes <> '{}' THEN
        UPDATE billing.accounts a
           SET credit_limit_micros = acc.credit_limit_micros,
               status = acc.status,
               timezone = acc.timezone,
               usage_day = acc.usage_day,
               usage_month = acc.usage_month,
               metadata = acc.metadata,
               version = a.version + 1,
               updated_at = now()
         WHERE a.tenant_id = p_tenant;
        INSERT INTO billing.account_events (tenant_id, action, changes, reason)
        VALUES (p_tenant, 'update', changes, billing_account_update.reason);
        -- the key hashes changed with the time zone only (found by their version)
        PERFORM billing.sync_mark_keys(p_tenant, acc.version,
                                       CASE WHEN changes ? 'timezone' THEN NULL ELSE '{}'::text[] END);
        -- the outbox (schema/75_events.sql), in this transaction
        IF changes ? 'status' THEN
            PERFORM billing.event_write(p_tenant, 'account.status_changed',
                jsonb_build_object('from', changes->'status'->'old', 'to', changes->'status'->'new',
                                   'reason', billing_account_update.reason, 'changed_by', billing.actor()));
        END IF;
    END IF;

    RETURN QUERY SELECT * FROM billing.balances b WHERE b.tenant_id = p_tenant;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_account_update(text, numeric, text, text, jsonb, text) IS
    'change credit limit, status, time zone or metadata; every change is recorded in billing.account_events';

CREATE OR REPLACE FUNCTION @extschema@.billing_limits_set(tenant_id text,
                                   daily_requests bigint DEFAULT NULL,
                                   monthly_requests bigint DEFAULT NULL,
                                   daily_spend numeric DEFAULT NULL,
                                   monthly_spend numeric DEFAULT NULL,
                                   max_charge numeric DEFAULT NULL,
                                   per_minute bigint DEFAULT NULL,
                                   reason text DEFAULT NULL)
    RETURNS SETOF billing.quota_usage
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc  billing.accounts := billing.lock_account(billing_limits_set.tenant_id);
    lim  jsonb;
BEGIN
    PERFORM billing.check_text(billing_limits_set.reason, 'reason');
    acc.daily_request_quota      := billing.check_count(billing_limits_set.daily_requests, 'daily_requests');
    acc.monthly_request_quota    := billing.check_count(billing_limits_set.monthly_requests, 'monthly_requests');
    acc.minute_request_limit     := billing.check_count(billing_limits_set.per_minute, 'per_minute');
    acc.daily_spend_cap_micros   := billing.to_micros(billing_limits_set.daily_spend, 'daily_spend', true);
    acc.monthly_spend_cap_micros := billing.to_micros(billing_limits_set.monthly_spend, 'monthly_spend', true);
    acc.max_charge_micros        := billing.to_micros(billing_limits_set.max_charge, 'max_charge', false);
    IF acc.status = 'closed' THEN
        RAISE EXCEPTION 'account "%" is closed', acc.tenant_id
            USING ERRCODE = 'ZB003', HINT = 'Closed is final: open a new account for this customer.';
    END IF;

    lim := jsonb_build_object(
        'daily_requests', acc.daily_request_quota,
        'monthly_requests', acc.monthly_request_quota,
        'daily_spend', billing.to_amount(acc.daily_spend_cap_micros),
        'monthly_spend', billing.to_amount(acc.monthly_spend_cap_micros),
        'max_charge', billing.to_amount(acc.max_charge_micros),
        'per_minute', acc.minute_request_limit);

    UPDATE billing.accounts a
       SET daily_request_quota = acc.daily_request_quota,
           monthly_request_quota = acc.monthly_request_quota,
           minute_request_limit = acc.minute_request_limit,
           daily_spend_cap_micros = acc.daily_spend_cap_micros,
           monthly_spend_cap_micros = acc.monthly_spend_cap_micros,
           max_charge_micros = acc.max_charge_micros,
           -- a changed quota or cap: its alert thresholds are announced afresh
           alert_state = a.alert_state
               & ~(CASE WHEN a.daily_request_quota IS DISTINCT FROM acc.daily_request_quota THEN 15 << 4 ELSE 0 END)
               & ~(CASE WHEN a.monthly_request_quota IS DISTINCT FROM acc.monthly_request_quota THEN 15 << 8 ELSE 0 END)
               & ~(CASE WHEN a.daily_spend_cap_micros IS DISTINCT FROM acc.daily_spend_cap_micros THEN 15 << 12 ELSE 0 END)
               & ~(CASE WHEN a.monthly_spend_cap_micros IS DISTINCT FROM acc.monthly_spend_cap_micros THEN 15 << 16 ELSE 0 END),
           version = a.version + 1,
           updated_at = now()
     WHERE a.tenant_id = acc.tenant_id;
    INSERT INTO billing.account_events (tenant_id, action, changes, reason)
    VALUES (acc.tenant_id, 'limits', lim, billing_limits_set.reason);
    PERFORM billing.sync_mark_keys(acc.tenant_id, acc.version, '{}');  -- no key hash changed

    RETURN QUERY SELECT * FROM billing.quota_usage q WHERE q.tenant_id = acc.tenant_id;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_limits_set(text, bigint, bigint, numeric, numeric, numeric, bigint, text) IS
    'set all limits of an account at once (NULL = no limit); recorded in billing.account_events';

CREATE OR REPLACE FUNCTION @extschema@.billing_api_key_create(tenant_id text, key_id text,
                                       budget numeric DEFAULT NULL,
                                       budget_period text DEFAULT NULL,
                                       metadata jsonb DEFAULT NULL)
    RETURNS SETOF billing.api_key_budgets
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    acc     billing.accounts := billing.lock_account(billing_api_key_create.tenant_id);
    micros  bigint := billing.check_key_settings(billing_api_key_create.key_id,
                                                 billing_api_key_create.budget,
                                                 billing_api_key_create.budget_period);
    k       billing.api_keys;
BEGIN
    PERFORM billing.check_account_settings(acc.tenant_id, NULL, NULL, NULL, billing_api_key_create.metadata);
    INSERT INTO billing.api_keys AS t (tenant_id, key_id, budget_micros, budget_period, metadata, version)
    VALUES (acc.tenant_id, billing_api_key_create.key_id, micros, billing_api_key_create.budget_period,
            coalesce(billing_api_key_create.metadata, '{}'), acc.version + 1)
    ON CONFLICT (tenant_id, key_id) DO NOTHING
    RETURNING * INTO k;
    IF FOUND THEN
        -- the key's Redis hash carries the account version of its last change
        UPDATE billing.accounts a SET version = a.version + 1 WHERE a.tenant_id = acc.tenant_id;
        PERFORM billing.sync_mark_keys(acc.tenant_id, acc.version, ARRAY[k.key_id]);
    ELSE
        SELECT * INTO k FROM billing.api_keys t
         WHERE t.tenant_id = acc.tenant_id AND t.key_id = billing_api_key_create.key_id;
        -- like billing_account_create: only the settings given are compared
        IF (billing_api_key_create.budget IS NOT NULL
            AND (k.budget_micros IS DISTINCT FROM micros OR k.budget_period IS DISTINCT FROM billing_api_key_create.budget_period))
           OR (billing_api_key_create.metadata IS NOT NULL AND k.metadata <> billing_api_key_create.metadata) THEN
            RAISE EXCEPTION 'api key "%" already exists with different settings', k.key_id
                USING ERRCODE = 'ZB006',
                      DETAIL = format('Existing: budget %s, metadata of %s bytes; requested: budget %s, metadata %s.',
                                      coalesce(billing.to_amount(k.budget_micros) || ' per ' || k.budget_period, 'none'),
                                      pg_column_size(k.metadata),
                                      coalesce(billing.to_amount(micros) || ' per ' || billing_api_key_create.budget_period, 'none'),
                                      coalesce('of ' || pg_column_size(billing_api_key_create.metadata) || ' bytes', '(not given)')),
                      HINT = 'Change it with billing_api_key_update(), or leave the settings out to get the existing key.';
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM billing.api_key_budgets b
                  WHERE b.tenant_id = acc.tenant_id AND b.key_id = billing_api_key_create.key_id;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_api_key_create(text, text, numeric, text, jsonb) IS
    'create an API key for an account, optionally with a budget per day, month or lifetime';

CREATE OR REPLACE FUNCTION @extschema@.billing_api_key_update(tenant_id text, key_id text,
                                       status text DEFAULT NULL,
                                       budget numeric DEFAULT NULL,
                                       budget_period text DEFAULT NULL,
                                       remove_budget boolean DEFAULT false)
    RETURNS SETOF billing.api_key_budgets
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    acc     billing.accounts := billing.lock_account(billing_api_key_update.tenant_id);
    k       billing.api_keys;
    micros  bigint;
BEGIN
    SELECT * INTO k FROM billing.api_keys t
     WHERE t.tenant_id = acc.tenant_id AND t.key_id = billing_api_key_update.key_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'api key "%" does not exist for account "%"', billing_api_key_update.key_id, acc.tenant_id
            USING ERRCODE = 'ZB050',
                  HINT = format('Create it with billing_api_key_create(%L, %L).', acc.tenant_id, billing_api_key_update.key_id);
    END IF;
    IF billing_api_key_update.status IS NOT NULL AND billing_api_key_update.status NOT IN ('active', 'suspended', 'revoked') THEN
        RAISE EXCEPTION 'invalid api key status %', billing.show(billing_api_key_update.status)
            USING ERRCODE = 'ZB018', DETAIL = 'Allowed statuses: active, suspended, revoked.',
                  HINT = 'Suspend a key temporarily; revoke it for good.';
    END IF;
    IF k.status = 'revoked' AND billing_api_key_update.status IS DISTINCT FROM 'revoked' AND billing_api_key_update.status IS NOT NULL THEN
        RAISE EXCEPTION 'api key "%" is revoked', k.key_id
            USING ERRCODE = 'ZB051', DETAIL = 'A revoked key cannot be reactivated.',
                  HINT = 'Create a new key.';
    END IF;
    IF billing_api_key_update.remove_budget THEN
        k.budget_micros := NULL;
        k.budget_period := NULL;
    ELSIF billing_api_key_update.budget IS NOT NULL OR billing_api_key_update.budget_period IS NOT NULL THEN
        micros := billing.check_key_settings(k.key_id,
                                             coalesce(billing_api_key_update.budget, billing.to_amount(k.budget_micros)),
                                             coalesce(billing_api_key_update.budget_period, k.budget_period));
        IF coalesce(billing_api_key_update.budget_period, k.budget_period) IS DISTINCT FROM k.budget_period THEN
            k.period_start := NULL;         -- a new period kind starts counting afresh
            k.period_spend_micros := 0;
        END IF;
        k.budget_micros := micros;
        k.budget_period := coalesce(billing_api_key_update.budget_period, k.budget_period);
    END IF;
    UPDATE billing.api_keys t
       SET status = coalesce(billing_api_key_update.status, t.status),
           budget_micros = k.budget_micros,
           budget_period = k.budget_period,
           period_start = k.period_start,
           period_spend_micros = k.period_spend_micros,
           -- a new budget: its alert thresholds are announced afresh
           alert_levels = CASE WHEN t.budget_micros IS DISTINCT FROM k.budget_micros
                                 OR t.budget_period IS DISTINCT FROM k.budget_period
                               THEN 0 ELSE t.alert_levels END,
           updated_at = now(),
           version = acc.version + 1
     WHERE t.tenant_id = acc.tenant_id AND t.key_id = k.key_id;
    UPDATE billing.accounts a SET version = a.version + 1 WHERE a.tenant_id = acc.tenant_id;
    PERFORM billing.sync_mark_keys(acc.tenant_id, acc.version, ARRAY[k.key_id]);
    RETURN QUERY SELECT * FROM billing.api_key_budgets b
                  WHERE b.tenant_id = acc.tenant_id AND b.key_id = k.key_id;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_api_key_update(text, text, text, numeric, text, boolean) IS
    'change an API key: status (active, suspended, revoked — final), budget and period, or remove_budget';
-- (end of the mirror's section)

-- the SQL API's C functions under names in schema billing, for the job
-- functions (above) and billing_deduct_usage; see 20_ledger.sql
-- billing_deduct under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_deduct(tenant_id text, amount numeric, trace_id text,
                                  description text DEFAULT NULL,
                                  metadata jsonb DEFAULT NULL,
                                  event_at timestamptz DEFAULT NULL,
                                  kind text DEFAULT 'deduct',
                                  api_key text DEFAULT NULL,
                                  counts_request boolean DEFAULT true)
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_deduct(text, numeric, text, text, jsonb, timestamptz, text, text, boolean) IS
    'billing_deduct for the extension''s own SQL (internal); counts_request => false: no new request (a job''s charge, whose hold counted it)';
REVOKE ALL ON FUNCTION billing.internal_deduct(text, numeric, text, text, jsonb, timestamptz, text, text, boolean) FROM PUBLIC;

-- billing_hold under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_hold(tenant_id text, amount numeric, trace_id text,
                                expires_in interval DEFAULT '15 minutes',
                                description text DEFAULT NULL,
                                metadata jsonb DEFAULT NULL,
                                api_key text DEFAULT NULL)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_hold(text, numeric, text, interval, text, jsonb, text) IS
    'billing_hold for the extension''s own SQL (internal)';
REVOKE ALL ON FUNCTION billing.internal_hold(text, numeric, text, interval, text, jsonb, text) FROM PUBLIC;

-- billing_capture under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_capture(tenant_id text, hold_trace_id text, amount numeric, trace_id text,
                                   final boolean DEFAULT false,
                                   description text DEFAULT NULL,
                                   metadata jsonb DEFAULT NULL,
                                   event_at timestamptz DEFAULT NULL)
    RETURNS billing.capture_result
    AS 'MODULE_PATHNAME', 'billing_capture'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) IS
    'billing_capture for the extension''s own SQL (internal)';
REVOKE ALL ON FUNCTION billing.internal_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) FROM PUBLIC;

-- billing_release under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_release(tenant_id text, hold_trace_id text, trace_id text)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_release'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_release(text, text, text) IS
    'billing_release for the extension''s own SQL (internal)';
REVOKE ALL ON FUNCTION billing.internal_release(text, text, text) FROM PUBLIC;

-- billing_hold_extend under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.  Unlike billing_hold_extend it
-- returns a hold that expired or was settled meanwhile as it is: a claim or
-- a rescue that waited for the account lock past the hold's expiry goes on
-- (its job sees the expired hold at complete) instead of failing as a whole.
CREATE FUNCTION billing.internal_hold_extend(tenant_id text, hold_trace_id text,
                                       expires_in interval DEFAULT '15 minutes')
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold_keep'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_hold_extend(text, text, interval) IS
    'billing_hold_extend for the extension''s own SQL (internal): a hold that is no longer open, or whose expired grant credit the account cannot reserve again, is returned as it is';
REVOKE ALL ON FUNCTION billing.internal_hold_extend(text, text, interval) FROM PUBLIC;

-- the two job functions that 1.3 had calling the API by its schema's name
-- and that nothing above replaces
CREATE OR REPLACE FUNCTION billing.job_release_hold(j billing.jobs) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF j.hold_trace_id IS NOT NULL THEN
        PERFORM billing.internal_release(j.tenant_id, j.hold_trace_id, j.hold_trace_id || ':release');
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION @extschema@.billing_job_retry(tenant_id text, job_id bigint)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_retry.tenant_id, billing_job_retry.job_id);
BEGIN
    IF j.state <> 'failed' THEN
        RAISE EXCEPTION 'illegal job transition from % to queued', j.state
            USING ERRCODE = 'ZB070',
                  DETAIL = format('Job %s of tenant "%s" is %s.', j.job_id, j.tenant_id, j.state),
                  HINT = 'Only a failed job can be retried.';
    END IF;
    j.hold_seq := j.hold_seq + 1;
    j.hold_trace_id := format('job:%s:%s', j.job_id, j.hold_seq);
    -- a new hold for the estimate; not enough funds -> error, the job stays failed
    PERFORM billing.internal_hold(j.tenant_id, billing.to_amount(j.estimated_micros), j.hold_trace_id,
                                    expires_in => j.hold_ttl,
                                    description => format('job %s (%s), retry %s', j.job_id, j.kind, j.hold_seq - 1));
    j.state := 'queued';
    j.attempt := 0;
    j.run_at := now();
    j.finished_at := NULL;
    j.worker := NULL;
    UPDATE billing.jobs x
       SET state = 'queued', attempt = 0, run_at = j.run_at, hold_seq = j.hold_seq, hold_trace_id = j.hold_trace_id,
           finished_at = NULL, worker = NULL, updated_at = now(), note = 'retried'
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN billing.job_result(j, false);
END;
$$;

-- Bounded before they are shown: heartbeat's, complete's and fail's worker,
-- billing_deduct_usage's model (a replay's messages show it; a replay of an
-- entry whose metadata a caller wrote is priced as new: ZB005, not 22P02),
-- billing_api_key_update's key_id (and ZB015 for a NULL one).
CREATE OR REPLACE FUNCTION billing.job_check_lease(j billing.jobs, worker text, wanted text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF j.state = 'processing' AND (worker IS NULL OR worker = j.worker) THEN
        RETURN;
    END IF;
    IF j.state = 'processing' OR (j.state = 'queued' AND j.attempt > 0) THEN
        RAISE EXCEPTION 'job % is no longer leased by %', j.job_id, coalesce(billing.show(worker), 'this worker')
            USING ERRCODE = 'ZB073',
                  DETAIL = format('The job is %s (attempt %s, worker %s).', j.state, j.attempt, coalesce(j.worker, 'none')),
                  HINT = 'Its lease expired and it was rescued; drop this result, another attempt will run.';
    END IF;
    RAISE EXCEPTION 'illegal job transition from % to %', j.state, wanted
        USING ERRCODE = 'ZB070',
              DETAIL = format('Job %s of tenant "%s" is %s.', j.job_id, j.tenant_id, j.state),
              HINT = 'Only a processing job can be completed, failed or heartbeaten.';
END;
$$;

CREATE OR REPLACE FUNCTION @extschema@.billing_deduct_usage(tenant_id text, model text,
                                     input_tokens bigint, output_tokens bigint,
                                     trace_id text,
                                     description text DEFAULT NULL,
                                     metadata jsonb DEFAULT NULL,
                                     event_at timestamptz DEFAULT NULL,
                                     api_key text DEFAULT NULL,
                                     cached_input_tokens bigint DEFAULT 0,
                                     cache_write_tokens bigint DEFAULT 0,
                                     reasoning_tokens bigint DEFAULT 0,
                                     requests bigint DEFAULT 1,
                                     seconds numeric DEFAULT 0)
    RETURNS billing.entry_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc     billing.accounts;
    priced  timestamptz;
    was     jsonb;
    p       billing.price_overrides;
    r       bigint[];
    q       numeric[];
    cost    bigint;
    usage   jsonb;
    used    boolean;                -- the trace id has an entry
    replay  boolean := false;       -- ... of a usage charge: p is its prices
BEGIN
    IF billing_deduct_usage.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the model name.';
    END IF;
    IF billing_deduct_usage.trace_id IS NULL THEN
        RAISE EXCEPTION 'trace_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass a value for trace_id.';
    END IF;
    -- bounded before anything shows it (a replay's error messages do); only
    -- its length, as 1.3's billing_price_set checked the models it priced
    PERFORM billing.check_text(billing_deduct_usage.model, 'model', 255);
    PERFORM billing.check_json(billing_deduct_usage.metadata, 'metadata');
    -- the account row lock first, as billing_deduct takes it: the charge is
    -- priced at the moment it is made (its created_at), not when the
    -- transaction started
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_deduct_usage.tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM billing.lock_account(billing_deduct_usage.tenant_id);   -- raises ZB015 / ZB001
    END IF;
    SELECT e.metadata INTO was FROM billing.entries e
     WHERE e.tenant_id = billing_deduct_usage.tenant_id AND e.trace_id = billing_deduct_usage.trace_id;
    used := FOUND;
    IF used AND (was ? 'input_per_1m' OR was ? 'input_per_1k') AND was ? 'price_effective_from' THEN
        BEGIN
            -- a replay: priced with the unit prices its entry records, whatever
            -- the price history says since (a price set or backdated later, an
            -- override ended), so the same request always replays
            p := ROW(billing_deduct_usage.tenant_id, billing_deduct_usage.model, acc.currency,
                     (was->>'price_effective_from')::timestamptz,
                     NOT coalesce((was->>'price_override')::boolean, false),
                     CASE WHEN was ? 'input_per_1m' THEN ((was->>'input_per_1m')::numeric * 1000000)::bigint
                          ELSE ((was->>'input_per_1k')::numeric * 1000000000)::bigint END,
                     ((was->>'cached_input_per_1m')::numeric * 1000000)::bigint,
                     ((was->>'cache_write_per_1m')::numeric * 1000000)::bigint,
                     CASE WHEN was ? 'output_per_1m' THEN ((was->>'output_per_1m')::numeric * 1000000)::bigint
                          ELSE ((was->>'output_per_1k')::numeric * 1000000000)::bigint END,
                     ((was->>'reasoning_per_1m')::numeric * 1000000)::bigint,
                     ((was->>'per_request')::numeric * 1000000)::bigint,
                     ((was->>'per_second')::numeric * 1000000)::bigint,
                     NULL)::billing.price_overrides;
            replay := true;
        EXCEPTION WHEN data_exception THEN
            -- not a usage charge's metadata (a billing_deduct's, written by its
            -- caller): priced as new, and the trace id's conflict is ZB005 below
            replay := false;
        END;
    END IF;
    IF NOT replay THEN
        IF NOT used THEN
            -- a new charge: it is priced at its event time, which must be in
            -- the accepted window (ZB019)
            PERFORM billing.check_event_at(billing_deduct_usage.event_at);
        END IF;
        priced := coalesce(billing_deduct_usage.event_at, clock_timestamp());
        p := billing.price_for(billing_deduct_usage.tenant_id, billing_deduct_usage.model, acc.currency, priced);
    END IF;
    q := ARRAY[billing_deduct_usage.input_tokens, billing_deduct_usage.cached_input_tokens,
               billing_deduct_usage.cache_write_tokens, billing_deduct_usage.output_tokens,
               billing_deduct_usage.reasoning_tokens, billing_deduct_usage.requests,
               billing_deduct_usage.seconds];
    cost := billing.cost_micros(p, q);
    IF cost = 0 THEN
        RAISE EXCEPTION 'usage costs nothing'
            USING ERRCODE = 'ZB010',
                  DETAIL = format('The usage (%s) of %s costs 0.000000.',
                                  coalesce((SELECT string_agg(format('%s %s', x.name, x.quantity), ', ' ORDER BY x.i)
                                              FROM unnest(ARRAY['input_tokens', 'cached_input_tokens',
                                                                'cache_write_tokens', 'output_tokens',
                                                                'reasoning_tokens', 'requests', 'seconds'], q)
                                                   WITH ORDINALITY AS x(name, quantity, i)
                                             WHERE x.quantity <> 0), 'none'),
                                  billing_deduct_usage.model),
                  HINT = 'Skip the charge for empty usage.';
    END IF;
    r := billing.effective_rates(p);
    IF was ? 'input_per_1k' AND NOT was ? 'input_per_1m' AND q[2] = 0 AND q[3] = 0 AND q[5] = 0
       AND q[6] = 1 AND q[7] = 0 AND p.list_price AND r[1] % 1000 = 0 AND r[4] % 1000 = 0 THEN
        -- the replay of a usage charged by 1.3: its metadata as 1.3 wrote it
        -- (prices per 1,000 tokens), so that the same request replays
        usage := jsonb_build_object(
            'model', billing_deduct_usage.model,
            'input_tokens', billing_deduct_usage.input_tokens,
            'output_tokens', billing_deduct_usage.output_tokens,
            'input_per_1k', billing.to_amount(r[1] / 1000),
            'output_per_1k', billing.to_amount(r[4] / 1000),
            'price_effective_from',
            to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
    ELSE
        usage := jsonb_build_object(
            'model', billing_deduct_usage.model,
            'input_tokens', billing_deduct_usage.input_tokens,
            'cached_input_tokens', billing_deduct_usage.cached_input_tokens,
            'cache_write_tokens', billing_deduct_usage.cache_write_tokens,
            'output_tokens', billing_deduct_usage.output_tokens,
            'reasoning_tokens', billing_deduct_usage.reasoning_tokens,
            'requests', billing_deduct_usage.requests,
            'seconds', billing_deduct_usage.seconds,
            'input_per_1m', billing.to_amount(r[1]),
            'cached_input_per_1m', billing.to_amount(r[2]),
            'cache_write_per_1m', billing.to_amount(r[3]),
            'output_per_1m', billing.to_amount(r[4]),
            'reasoning_per_1m', billing.to_amount(r[5]),
            'per_request', billing.to_amount(r[6]),
            'per_second', billing.to_amount(r[7]),
            'price_effective_from',
            to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'price_override', NOT p.list_price);
    END IF;
    -- the caller's metadata was checked above; with the breakdown added it
    -- must still fit, and the error says what was added
    usage := billing.check_json(coalesce(billing_deduct_usage.metadata, '{}') || usage,
                                'metadata with the usage breakdown');
    RETURN billing.internal_deduct(billing_deduct_usage.tenant_id, billing.to_amount(cost), billing_deduct_usage.trace_id,
                          description => billing_deduct_usage.description,
                          metadata => usage,
                          event_at => billing_deduct_usage.event_at,
                          api_key => billing_deduct_usage.api_key);
END;
$$;

CREATE OR REPLACE FUNCTION @extschema@.billing_api_key_update(tenant_id text, key_id text,
                                       status text DEFAULT NULL,
                                       budget numeric DEFAULT NULL,
                                       budget_period text DEFAULT NULL,
                                       remove_budget boolean DEFAULT false)
    RETURNS SETOF billing.api_key_budgets
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    acc     billing.accounts := billing.lock_account(billing_api_key_update.tenant_id);
    k       billing.api_keys;
    micros  bigint;
BEGIN
    IF billing_api_key_update.key_id IS NULL THEN
        RAISE EXCEPTION 'key_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the key''s id.';
    END IF;
    SELECT * INTO k FROM billing.api_keys t
     WHERE t.tenant_id = acc.tenant_id AND t.key_id = billing_api_key_update.key_id FOR UPDATE;
    IF NOT FOUND THEN
        -- bounded before it is shown (a key that exists is shown as it was made)
        PERFORM billing.check_id(billing_api_key_update.key_id, 'key_id', 'ZB018');
        RAISE EXCEPTION 'api key "%" does not exist for account "%"', billing_api_key_update.key_id, acc.tenant_id
            USING ERRCODE = 'ZB050',
                  HINT = format('Create it with billing_api_key_create(%L, %L).', acc.tenant_id, billing_api_key_update.key_id);
    END IF;
    IF billing_api_key_update.status IS NOT NULL AND billing_api_key_update.status NOT IN ('active', 'suspended', 'revoked') THEN
        RAISE EXCEPTION 'invalid api key status %', billing.show(billing_api_key_update.status)
            USING ERRCODE = 'ZB018', DETAIL = 'Allowed statuses: active, suspended, revoked.',
                  HINT = 'Suspend a key temporarily; revoke it for good.';
    END IF;
    IF k.status = 'revoked' AND billing_api_key_update.status IS DISTINCT FROM 'revoked' AND billing_api_key_update.status IS NOT NULL THEN
        RAISE EXCEPTION 'api key "%" is revoked', k.key_id
            USING ERRCODE = 'ZB051', DETAIL = 'A revoked key cannot be reactivated.',
                  HINT = 'Create a new key.';
    END IF;
    IF billing_api_key_update.remove_budget THEN
        k.budget_micros := NULL;
        k.budget_period := NULL;
    ELSIF billing_api_key_update.budget IS NOT NULL OR billing_api_key_update.budget_period IS NOT NULL THEN
        micros := billing.check_key_settings(k.key_id,
                                             coalesce(billing_api_key_update.budget, billing.to_amount(k.budget_micros)),
                                             coalesce(billing_api_key_update.budget_period, k.budget_period));
        IF coalesce(billing_api_key_update.budget_period, k.budget_period) IS DISTINCT FROM k.budget_period THEN
            k.period_start := NULL;         -- a new period kind starts counting afresh
            k.period_spend_micros := 0;
        END IF;
        k.budget_micros := micros;
        k.budget_period := coalesce(billing_api_key_update.budget_period, k.budget_period);
    END IF;
    UPDATE billing.api_keys t
       SET status = coalesce(billing_api_key_update.status, t.status),
           budget_micros = k.budget_micros,
           budget_period = k.budget_period,
           period_start = k.period_start,
           period_spend_micros = k.period_spend_micros,
           -- a new budget: its alert thresholds are announced afresh
           alert_levels = CASE WHEN t.budget_micros IS DISTINCT FROM k.budget_micros
                                 OR t.budget_period IS DISTINCT FROM k.budget_period
                               THEN 0 ELSE t.alert_levels END,
           updated_at = now(),
           version = acc.version + 1
     WHERE t.tenant_id = acc.tenant_id AND t.key_id = k.key_id;
    UPDATE billing.accounts a SET version = a.version + 1 WHERE a.tenant_id = acc.tenant_id;
    PERFORM billing.sync_mark_keys(acc.tenant_id, acc.version, ARRAY[k.key_id]);
    RETURN QUERY SELECT * FROM billing.api_key_budgets b
                  WHERE b.tenant_id = acc.tenant_id AND b.key_id = k.key_id;
END;
$$;

-- A job's charge after its hold expired is no new request: its hold counted
-- it (billing.internal_deduct's counts_request).
CREATE OR REPLACE FUNCTION @extschema@.billing_job_complete(tenant_id text, job_id bigint, actual_cost numeric,
                                     output jsonb DEFAULT NULL, worker text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j       billing.jobs := billing.job_lock(billing_job_complete.tenant_id, billing_job_complete.job_id);
    actual  bigint;
    entry   bigint;
BEGIN
    IF billing_job_complete.actual_cost IS NULL THEN
        RAISE EXCEPTION 'actual_cost must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass what the job really cost (0 if nothing).';
    END IF;
    actual := billing.to_micros(billing_job_complete.actual_cost, 'actual_cost', true);
    PERFORM billing.check_json(billing_job_complete.output, 'output');
    IF j.state = 'completed' AND j.actual_micros = actual THEN
        RETURN billing.job_result(j, true);           -- a retried complete
    END IF;
    PERFORM billing.job_check_lease(j, billing_job_complete.worker, 'completed');

    -- the charge; if it fails, the error leaves the job processing
    IF actual > 0 AND billing.job_hold_open(j) THEN
        SELECT c.entry_id INTO entry
          FROM billing.internal_capture(j.tenant_id, j.hold_trace_id, billing.to_amount(actual),
                                          format('job:%s:charge', j.job_id), final => true,
                                          description => format('job %s (%s)', j.job_id, j.kind)) c;
    ELSE
        PERFORM billing.job_release_hold(j);         -- hold expired or nothing to charge
        IF actual > 0 THEN
            SELECT d.entry_id INTO entry
              FROM billing.internal_deduct(j.tenant_id, billing.to_amount(actual), format('job:%s:charge', j.job_id),
                                             description => format('job %s (%s)', j.job_id, j.kind),
                                             metadata => jsonb_build_object('job_id', j.job_id, 'kind', j.kind),
                                             counts_request => false) d;   -- the hold counted it
        END IF;
    END IF;

    j.state := 'completed';
    j.actual_micros := actual;
    j.charge_entry_id := entry;
    j.output := billing_job_complete.output;
    j.finished_at := now();
    j.lease_until := NULL;
    UPDATE billing.jobs x
       SET state = 'completed', actual_micros = actual, charge_entry_id = entry, output = j.output,
           lease_until = NULL, finished_at = j.finished_at, updated_at = now(),
           note = format('charged %s', billing.to_amount(actual))
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN billing.job_result(j, false);
END;
$$;

/*
 * 99_schema_check: the API's schema and the calls other roles make to it.
 *
 * Nothing the extension runs as its owner finds a function in the API's
 * schema by name (see docs/security.md), but the calls of the roles that
 * use the API do: whoever may create functions in that schema can add one
 * with an API function's name and a closer argument type (integer where
 * the API takes numeric, text where it takes regrole), which then wins
 * such a call and runs with the caller's rights, a superuser's or the
 * treasury role's.  On PostgreSQL 15 and later the owner of a database
 * owns its schema public.  Say so when roles other than superusers may
 * create objects there.
 */
DO $$
DECLARE
    api   oid := (SELECT e.extnamespace FROM pg_catalog.pg_extension e
                   WHERE e.extname OPERATOR(pg_catalog.=) 'billing');
    n     bigint;
    names text[];
BEGIN
    SELECT pg_catalog.count(*), (pg_catalog.array_agg(pg_catalog.quote_ident(r.rolname) ORDER BY r.rolname))[1:5]
      INTO n, names
      FROM pg_catalog.pg_roles r
     WHERE NOT r.rolsuper
       AND NOT pg_catalog.starts_with(r.rolname, 'pg_')
       AND pg_catalog.has_schema_privilege(r.oid, api, 'CREATE');
    IF n OPERATOR(pg_catalog.>) 0 THEN
        RAISE WARNING 'billing: roles that are not superusers may create functions in schema %, where the API is',
                      pg_catalog.quote_ident((SELECT s.nspname FROM pg_catalog.pg_namespace s WHERE s.oid OPERATOR(pg_catalog.=) api))
            USING DETAIL = pg_catalog.format('%s role(s): %s%s. A function one of them creates there with the name of an API function and a closer argument type runs instead of it when another role calls it by name, with that role''s rights.',
                                             n, pg_catalog.array_to_string(names, ', '),
                                             CASE WHEN n OPERATOR(pg_catalog.>) 5 THEN ', ...' ELSE '' END),
                  HINT = 'Create the extension in a schema only superusers may create objects in (CREATE SCHEMA billing_api; CREATE EXTENSION billing SCHEMA billing_api), and let the roles that call it put that schema first in their search_path or call it schema-qualified (docs/security.md, "The schema of the API").';
    END IF;
END
$$;

-- always last: back to the caller's role
DO $$
BEGIN
    EXECUTE pg_catalog.format('SET LOCAL ROLE %I', pg_catalog.current_setting('billing_upgrade.caller'));
END
$$;
