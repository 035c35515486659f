/* 10_accounts: accounts, their audit trail, settings checks, billing.balances */

CREATE TABLE billing.accounts (
    tenant_id           text        NOT NULL,
    currency            text        NOT NULL DEFAULT 'USD',
    credit_limit_micros bigint      NOT NULL DEFAULT 0,
    status              text        NOT NULL DEFAULT 'active',
    timezone            text        NOT NULL DEFAULT 'UTC',
    metadata            jsonb       NOT NULL DEFAULT '{}',
    balance_micros      bigint      NOT NULL DEFAULT 0,
    version             bigint      NOT NULL DEFAULT 0,
    last_entry_at       timestamptz,
    -- open holds: cached sum of what remains on them, and the earliest expiry
    holds_micros        bigint      NOT NULL DEFAULT 0,
    holds_next_expiry   timestamptz,
    -- limits (NULL = none), set with billing_limits_set()
    max_charge_micros        bigint,
    minute_request_limit     bigint,
    daily_request_quota      bigint,
    monthly_request_quota    bigint,
    daily_spend_cap_micros   bigint,
    monthly_spend_cap_micros bigint,
    -- usage counters of the current periods, in the account time zone
    usage_day           date,
    day_requests        bigint      NOT NULL DEFAULT 0,
    day_spend_micros    bigint      NOT NULL DEFAULT 0,
    usage_month         date,
    month_requests      bigint      NOT NULL DEFAULT 0,
    month_spend_micros  bigint      NOT NULL DEFAULT 0,
    usage_minute        timestamptz,
    minute_requests     bigint      NOT NULL DEFAULT 0,
    rejections          bigint      NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- 1.4: the open grant buckets, in burn order: grant_id, remaining,
    -- reserved (by open holds), priority, expires_at (microseconds; never =
    -- 2^63-1) for each
    grants_state        bigint[],
    grants_next_expiry  timestamptz,
    -- 1.4: events (schema/75_events.sql): the last per-tenant event sequence
    -- number, the alert thresholds (billing_alerts_set) and what of them has
    -- been announced, so that a charge checks them without another statement
    events_seq               bigint NOT NULL DEFAULT 0,
    alert_low_balance_micros bigint,
    alert_percents           integer[],
    alert_grant_lead         interval,
    -- bit 0: balance.low announced; 4 bits each from bit 4 on: how many of
    -- alert_percents were announced for the daily requests, monthly
    -- requests, daily spend, monthly spend (in the current day and month)
    alert_state              integer NOT NULL DEFAULT 0,
    -- grant.expiring: grants expiring up to this time, and up to this
    -- grant_id, were announced; when the next one is due
    alert_grants_until       timestamptz,
    alert_grants_gid         bigint,
    alert_next_at            timestamptz,
    CONSTRAINT accounts_pkey PRIMARY KEY (tenant_id)
    -- No CHECK constraints on the two hot tables: the executor re-reads
    -- and re-plans every CHECK expression on every INSERT/UPDATE statement
    -- (~10 % of a deduct).  The functions validate every value instead.
);
CREATE INDEX accounts_holds_expiry_idx ON billing.accounts (holds_next_expiry)
    WHERE holds_next_expiry IS NOT NULL;
CREATE INDEX accounts_grants_expiry_idx ON billing.accounts (grants_next_expiry)
    WHERE grants_next_expiry IS NOT NULL;
CREATE INDEX accounts_alert_next_idx ON billing.accounts (alert_next_at)
    WHERE alert_next_at IS NOT NULL;
COMMENT ON TABLE billing.accounts IS 'one account per tenant; balance_micros caches SUM(entries.amount_micros), kept in the same transaction';

CREATE TRIGGER accounts_no_delete
    BEFORE DELETE OR TRUNCATE ON billing.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Accounts are never deleted: close one with billing_account_update(tenant_id, status => ''closed'').');
ALTER TABLE billing.accounts ENABLE ALWAYS TRIGGER accounts_no_delete;

-- pg_dump must dump the data of extension tables, or a restore loses the ledger
SELECT pg_catalog.pg_extension_config_dump('billing.accounts', '');

CREATE SEQUENCE billing.account_event_id_seq;
CREATE TABLE billing.account_events (
    tenant_id   text        NOT NULL,
    event_id    bigint      NOT NULL DEFAULT nextval('billing.account_event_id_seq'),
    action      text        NOT NULL,
    changes     jsonb       NOT NULL,
    reason      text,
    changed_by  text        NOT NULL DEFAULT billing.actor(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT account_events_pkey PRIMARY KEY (tenant_id, event_id),
    CONSTRAINT account_events_action_check CHECK (action IN ('create', 'update', 'limits', 'alerts'))
);
ALTER SEQUENCE billing.account_event_id_seq OWNED BY billing.account_events.event_id;
COMMENT ON TABLE billing.account_events IS 'append-only audit trail of account settings (creation, credit limit, status, ...)';

CREATE TRIGGER account_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.account_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'The audit trail is never rewritten.');
ALTER TABLE billing.account_events ENABLE ALWAYS TRIGGER account_events_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.account_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.account_event_id_seq', '');

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

-- shared checks of account settings; raise ZB015/ZB016/ZB018
CREATE FUNCTION billing.check_account_settings(tenant_id text, currency text,
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
REVOKE ALL ON FUNCTION billing.check_account_settings(text, text, text, text, jsonb) FROM PUBLIC;

-- raise ZB001 unless the account exists; returns it locked
CREATE FUNCTION billing.lock_account(tenant_id text) RETURNS billing.accounts
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc billing.accounts;
BEGIN
    PERFORM billing.check_account_settings(lock_account.tenant_id, NULL, NULL, NULL, NULL);
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = lock_account.tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', lock_account.tenant_id
            USING ERRCODE = 'ZB001',
                  HINT = format('Create it first with billing_account_create(%L).', lock_account.tenant_id);
    END IF;
    RETURN acc;
END;
$$;
REVOKE ALL ON FUNCTION billing.lock_account(text) FROM PUBLIC;

-- what remains on an account's open holds right now: the cached sum, unless
-- a hold has expired since anything ran on the account (then from the holds).
-- (PL/pgSQL, not SQL: Citus cannot plan an SQL function's query with
-- parameters on a distributed table.  billing.balances spells the same out
-- instead of calling it: Citus runs a view's query on the shards, whose row
-- type is not billing.accounts.)
CREATE FUNCTION billing.effective_holds(a billing.accounts) RETURNS bigint
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
REVOKE ALL ON FUNCTION billing.effective_holds(billing.accounts) FROM PUBLIC;

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

-- the accounts as the API returns them (spelled out again in 30_holds.sql,
-- once billing.holds exists, for Citus)
CREATE VIEW billing.balances WITH (security_barrier) AS
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
COMMENT ON VIEW billing.balances IS 'one row per account: balance, credit limit, on hold, available funds, version';

CREATE FUNCTION @extschema@.billing_account_create(tenant_id text,
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
REVOKE ALL ON FUNCTION @extschema@.billing_account_create(text, text, numeric, text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_account_update(tenant_id text,
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
REVOKE ALL ON FUNCTION @extschema@.billing_account_update(text, numeric, text, text, jsonb, text) FROM PUBLIC;
