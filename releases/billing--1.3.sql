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
    CONSTRAINT accounts_pkey PRIMARY KEY (tenant_id)
    -- No CHECK constraints on the two hot tables: the executor re-reads
    -- and re-plans every CHECK expression on every INSERT/UPDATE statement
    -- (~10 % of a deduct).  The functions validate every value instead.
);
CREATE INDEX accounts_holds_expiry_idx ON billing.accounts (holds_next_expiry)
    WHERE holds_next_expiry IS NOT NULL;
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
    changed_by  text        NOT NULL DEFAULT session_user,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT account_events_pkey PRIMARY KEY (tenant_id, event_id),
    CONSTRAINT account_events_action_check CHECK (action IN ('create', 'update', 'limits'))
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
-- a hold has expired since anything ran on the account (then from the holds)
CREATE FUNCTION billing.effective_holds(a billing.accounts) RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
               WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN a.holds_micros
               ELSE (SELECT coalesce(sum(h.amount_micros - h.captured_micros - h.released_micros), 0)::bigint
                       FROM billing.holds h
                      WHERE h.tenant_id = a.tenant_id AND h.status = 'open' AND h.expires_at > now())
           END
$$;
REVOKE ALL ON FUNCTION billing.effective_holds(billing.accounts) FROM PUBLIC;

CREATE VIEW billing.balances AS
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
  FROM billing.accounts a;
COMMENT ON VIEW billing.balances IS 'one row per account: balance, credit limit, on hold, available funds, version';

CREATE FUNCTION billing_account_create(tenant_id text,
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
            details := details || format('metadata: existing %s, requested %s', acc.metadata, billing_account_create.metadata);
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
COMMENT ON FUNCTION billing_account_create(text, text, numeric, text, text, jsonb) IS
    'create an account, or return the existing one if the given settings match (ZB006 otherwise)';
REVOKE ALL ON FUNCTION billing_account_create(text, text, numeric, text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION billing_account_update(tenant_id text,
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
BEGIN
    PERFORM billing.check_account_settings(p_tenant, NULL,
                                           billing_account_update.status,
                                           billing_account_update.timezone,
                                           billing_account_update.metadata);
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
               metadata = acc.metadata,
               version = a.version + 1,
               updated_at = now()
         WHERE a.tenant_id = p_tenant;
        INSERT INTO billing.account_events (tenant_id, action, changes, reason)
        VALUES (p_tenant, 'update', changes, billing_account_update.reason);
        PERFORM billing.sync_mark(p_tenant);
    END IF;

    RETURN QUERY SELECT * FROM billing.balances b WHERE b.tenant_id = p_tenant;
END;
$$;
COMMENT ON FUNCTION billing_account_update(text, numeric, text, text, jsonb, text) IS
    'change credit limit, status, time zone or metadata; every change is recorded in billing.account_events';
REVOKE ALL ON FUNCTION billing_account_update(text, numeric, text, text, jsonb, text) FROM PUBLIC;
/* 20_ledger: the append-only ledger, recorded rejections, the charge API (C) and the audit */

CREATE SEQUENCE billing.entry_id_seq;
CREATE TABLE billing.entries (
    tenant_id            text        NOT NULL,
    entry_id             bigint      NOT NULL DEFAULT nextval('billing.entry_id_seq'),
    trace_id             text        NOT NULL,
    kind                 text        NOT NULL,
    amount_micros        bigint      NOT NULL,
    balance_after_micros bigint      NOT NULL,
    version              bigint      NOT NULL,
    description          text,
    metadata             jsonb       NOT NULL DEFAULT '{}',
    event_at             timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    api_key              text,
    hold_id              bigint,
    CONSTRAINT entries_pkey PRIMARY KEY (tenant_id, entry_id),
    CONSTRAINT entries_trace_key UNIQUE (tenant_id, trace_id)
    -- kind IN (topup, grant, refund, adjustment, deduct, capture) and
    -- amount_micros <> 0 are guaranteed by the functions (see accounts)
);
ALTER SEQUENCE billing.entry_id_seq OWNED BY billing.entries.entry_id;
COMMENT ON TABLE billing.entries IS 'append-only ledger: one row per money movement; amount signed (debits negative)';

-- append-only enforcement, for every role (ENABLE ALWAYS: also in replica mode)
CREATE TRIGGER entries_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.entries
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Record a correction as a new entry instead, e.g. billing_credit(..., kind => ''refund'') or kind => ''adjustment''.');
ALTER TABLE billing.entries ENABLE ALWAYS TRIGGER entries_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.entries', '');
SELECT pg_catalog.pg_extension_config_dump('billing.entry_id_seq', '');

CREATE SEQUENCE billing.rejection_id_seq;
CREATE TABLE billing.rejections (
    tenant_id     text        NOT NULL,
    rejection_id  bigint      NOT NULL DEFAULT nextval('billing.rejection_id_seq'),
    trace_id      text        NOT NULL,
    kind          text        NOT NULL,
    amount_micros bigint      NOT NULL,
    description   text,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    event_at      timestamptz,
    sqlstate      text        NOT NULL,
    reason        text        NOT NULL,
    detail        text,
    api_key       text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rejections_pkey PRIMARY KEY (tenant_id, rejection_id),
    CONSTRAINT rejections_trace_key UNIQUE (tenant_id, trace_id)
);
ALTER SEQUENCE billing.rejection_id_seq OWNED BY billing.rejections.rejection_id;
COMMENT ON TABLE billing.rejections IS 'append-only: charges refused by billing_try_deduct(), so a replay returns the same refusal';

CREATE TRIGGER rejections_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.rejections
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'A recorded rejection is final for its trace id: retry with a new trace id.');
ALTER TABLE billing.rejections ENABLE ALWAYS TRIGGER rejections_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.rejections', '');
SELECT pg_catalog.pg_extension_config_dump('billing.rejection_id_seq', '');

CREATE TYPE billing.entry_result AS (
    entry_id      bigint,
    tenant_id     text,
    trace_id      text,
    kind          text,
    amount        numeric,      -- signed, as in the ledger (debits negative)
    balance_after numeric,
    version       bigint,
    created_at    timestamptz,
    replayed      boolean
);

CREATE TYPE billing.charge_outcome AS (
    status        text,         -- 'committed' or 'rejected'
    replayed      boolean,
    entry_id      bigint,       -- NULL when rejected
    tenant_id     text,
    trace_id      text,
    kind          text,
    amount        numeric,
    balance_after numeric,      -- NULL when rejected
    version       bigint,       -- account version after the entry (for settle.lua); NULL when rejected
    created_at    timestamptz,
    sqlstate      text,         -- NULL when committed
    reason        text,
    detail        text
);

CREATE FUNCTION billing_credit(tenant_id text, amount numeric, trace_id text,
                               description text DEFAULT NULL,
                               metadata jsonb DEFAULT NULL,
                               event_at timestamptz DEFAULT NULL,
                               kind text DEFAULT 'topup')
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_credit'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_credit(text, numeric, text, text, jsonb, timestamptz, text) IS
    'add money (kind topup, grant, refund or adjustment); idempotent by trace_id';

REVOKE ALL ON FUNCTION billing_credit(text, numeric, text, text, jsonb, timestamptz, text) FROM PUBLIC;

CREATE FUNCTION billing_deduct(tenant_id text, amount numeric, trace_id text,
                               description text DEFAULT NULL,
                               metadata jsonb DEFAULT NULL,
                               event_at timestamptz DEFAULT NULL,
                               kind text DEFAULT 'deduct',
                               api_key text DEFAULT NULL)
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) IS
    'charge an account (optionally through an API key); idempotent by trace_id; raises on insufficient funds, quotas, caps';
REVOKE ALL ON FUNCTION billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) FROM PUBLIC;

CREATE FUNCTION billing_try_deduct(tenant_id text, amount numeric, trace_id text,
                                   description text DEFAULT NULL,
                                   metadata jsonb DEFAULT NULL,
                                   event_at timestamptz DEFAULT NULL,
                                   kind text DEFAULT 'deduct',
                                   api_key text DEFAULT NULL)
    RETURNS billing.charge_outcome
    AS 'MODULE_PATHNAME', 'billing_try_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) IS
    'like billing_deduct, but a business rejection is returned and recorded (a replay returns it again)';
REVOKE ALL ON FUNCTION billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) FROM PUBLIC;

CREATE FUNCTION billing_deduct_many(tenant_ids text[], amounts numeric[], trace_ids text[],
                                    descriptions text[] DEFAULT NULL,
                                    metadata jsonb[] DEFAULT NULL,
                                    api_keys text[] DEFAULT NULL,
                                    on_reject text DEFAULT 'raise')
    RETURNS SETOF billing.charge_outcome
    AS 'MODULE_PATHNAME', 'billing_deduct_many'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_deduct_many(text[], numeric[], text[], text[], jsonb[], text[], text) IS
    'charge many items in one call (same rules per item); on_reject raise: a rejection aborts the batch, record: returned per item';
REVOKE ALL ON FUNCTION billing_deduct_many(text[], numeric[], text[], text[], jsonb[], text[], text) FROM PUBLIC;

CREATE FUNCTION billing_balance(tenant_id text) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_balance'
    LANGUAGE C STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_balance(text) IS 'cached balance of an account, O(1)';
REVOKE ALL ON FUNCTION billing_balance(text) FROM PUBLIC;

CREATE FUNCTION billing_balance_at(tenant_id text, at timestamptz) RETURNS numeric
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    total numeric;
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
    PERFORM FROM billing.accounts a WHERE a.tenant_id = billing_balance_at.tenant_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', billing_balance_at.tenant_id
            USING ERRCODE = 'ZB001',
                  HINT = format('Create it first with billing_account_create(%L).', billing_balance_at.tenant_id);
    END IF;
    SELECT coalesce(sum(e.amount_micros), 0) INTO total
      FROM billing.entries e
     WHERE e.tenant_id = billing_balance_at.tenant_id
       AND e.created_at <= billing_balance_at.at;
    RETURN billing.to_amount(total::bigint);
END;
$$;
COMMENT ON FUNCTION billing_balance_at(text, timestamptz) IS
    'balance at a point in time: SUM of the entries created up to then';
REVOKE ALL ON FUNCTION billing_balance_at(text, timestamptz) FROM PUBLIC;

CREATE VIEW billing.ledger AS
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
       e.created_at
  FROM billing.entries e;
COMMENT ON VIEW billing.ledger IS 'readable ledger: amounts as numeric, model and api_key lifted from metadata';

CREATE TYPE billing.verify_result AS (
    tenant_id            text,
    cached_balance       numeric,
    ledger_sum           numeric,
    entries              bigint,
    chain_breaks         bigint,
    first_break_entry_id bigint,
    problem              text
);

CREATE FUNCTION billing.verify_entries(tenant_id text)
    RETURNS TABLE (tenant_id text, total numeric, n bigint, breaks bigint,
                   first_break bigint, max_version bigint, invalid bigint)
    AS 'MODULE_PATHNAME', 'billing_verify_entries'
    LANGUAGE C STABLE;

COMMENT ON FUNCTION billing.verify_entries(text) IS
    'per-tenant facts of the ledger in one pass (internal: billing_verify); NULL: every tenant';

REVOKE ALL ON FUNCTION billing.verify_entries(text) FROM PUBLIC;

CREATE FUNCTION billing_verify(tenant_id text DEFAULT NULL)
    RETURNS SETOF billing.verify_result
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
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
    RETURN QUERY

    WITH per_tenant AS (
        SELECT * FROM billing.verify_entries(billing_verify.tenant_id)
    )
    , holds AS (
        SELECT h.tenant_id,
               sum(h.amount_micros - h.captured_micros - h.released_micros) AS open_micros
          FROM billing.holds h
         WHERE h.status = 'open' AND (billing_verify.tenant_id IS NULL OR h.tenant_id = billing_verify.tenant_id)
         GROUP BY h.tenant_id
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
               ELSE 'cached holds differ from the open holds'
           END
      FROM billing.accounts a
      FULL JOIN per_tenant p ON p.tenant_id = a.tenant_id
      LEFT JOIN holds h ON h.tenant_id = a.tenant_id
     WHERE (billing_verify.tenant_id IS NULL OR coalesce(a.tenant_id, p.tenant_id) = billing_verify.tenant_id)
       AND (a.tenant_id IS NULL
            OR a.balance_micros <> coalesce(p.total, 0)
            OR coalesce(p.breaks, 0) > 0
            OR a.version < coalesce(p.max_version, 0)
            OR coalesce(p.invalid, 0) > 0
            OR a.holds_micros <> coalesce(h.open_micros, 0))
     ORDER BY 1;
END;
$$;
COMMENT ON FUNCTION billing_verify(text) IS
    'audit: one row per account whose cached balance differs from SUM(entries), whose balance_after chain is broken, whose version lags its entries, with invalid entries, or whose cached holds differ from its open holds; no rows when consistent';
REVOKE ALL ON FUNCTION billing_verify(text) FROM PUBLIC;
/* 30_holds: reservations (two-phase charges) and their journal (C) */

CREATE SEQUENCE billing.hold_id_seq;
CREATE TABLE billing.holds (
    tenant_id       text        NOT NULL,
    hold_id         bigint      NOT NULL DEFAULT nextval('billing.hold_id_seq'),
    trace_id        text        NOT NULL,
    amount_micros   bigint      NOT NULL,
    captured_micros bigint      NOT NULL DEFAULT 0,
    released_micros bigint      NOT NULL DEFAULT 0,
    status          text        NOT NULL DEFAULT 'open',
    expires_at      timestamptz NOT NULL,
    api_key         text,
    description     text,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT holds_pkey PRIMARY KEY (tenant_id, hold_id),
    CONSTRAINT holds_trace_key UNIQUE (tenant_id, trace_id),
    CONSTRAINT holds_status_check CHECK (status IN ('open', 'captured', 'released', 'expired')),
    CONSTRAINT holds_amount_check CHECK (amount_micros > 0 AND captured_micros >= 0 AND released_micros >= 0)
);
ALTER SEQUENCE billing.hold_id_seq OWNED BY billing.holds.hold_id;
CREATE INDEX holds_open_idx ON billing.holds (tenant_id, expires_at) WHERE status = 'open';
COMMENT ON TABLE billing.holds IS 'reservations (two-phase charges); remaining = amount - captured - released while open; history in hold_events';

CREATE TRIGGER holds_no_delete
    BEFORE DELETE OR TRUNCATE ON billing.holds
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Holds are never deleted: release one with billing_release().');
ALTER TABLE billing.holds ENABLE ALWAYS TRIGGER holds_no_delete;
SELECT pg_catalog.pg_extension_config_dump('billing.holds', '');
SELECT pg_catalog.pg_extension_config_dump('billing.hold_id_seq', '');

CREATE SEQUENCE billing.hold_event_id_seq;
CREATE TABLE billing.hold_events (
    tenant_id     text        NOT NULL,
    event_id      bigint      NOT NULL DEFAULT nextval('billing.hold_event_id_seq'),
    hold_id       bigint      NOT NULL,
    trace_id      text,
    action        text        NOT NULL,
    amount_micros bigint      NOT NULL,
    entry_id      bigint,
    expires_at    timestamptz,
    final         boolean     NOT NULL DEFAULT false,   -- a capture that settled the hold on purpose
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT hold_events_pkey PRIMARY KEY (tenant_id, event_id),
    CONSTRAINT hold_events_trace_key UNIQUE (tenant_id, trace_id),
    CONSTRAINT hold_events_action_check CHECK (action IN ('hold', 'capture', 'release', 'extend', 'expire'))
);
ALTER SEQUENCE billing.hold_event_id_seq OWNED BY billing.hold_events.event_id;
COMMENT ON TABLE billing.hold_events IS 'append-only journal of every hold operation (captures also reference their ledger entry)';

CREATE TRIGGER hold_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.hold_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'The hold journal is never rewritten: release or capture the hold instead.');
ALTER TABLE billing.hold_events ENABLE ALWAYS TRIGGER hold_events_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.hold_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.hold_event_id_seq', '');

CREATE TYPE billing.hold_result AS (
    hold_id       bigint,
    tenant_id     text,
    trace_id      text,         -- the hold's trace id
    status        text,         -- open, captured, released, expired
    amount        numeric,
    captured      numeric,
    released      numeric,
    remaining     numeric,
    expires_at    timestamptz,
    available     numeric,      -- the account's available funds after this call
    replayed      boolean
);

CREATE TYPE billing.capture_result AS (
    entry_id       bigint,
    hold_id        bigint,
    tenant_id      text,
    trace_id       text,        -- the capture's trace id
    amount         numeric,     -- signed, as in the ledger
    balance_after  numeric,
    hold_captured  numeric,
    hold_remaining numeric,
    hold_status    text,
    created_at     timestamptz,
    replayed       boolean
);

CREATE FUNCTION billing_hold(tenant_id text, amount numeric, trace_id text,
                             expires_in interval DEFAULT '15 minutes',
                             description text DEFAULT NULL,
                             metadata jsonb DEFAULT NULL,
                             api_key text DEFAULT NULL)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_hold(text, numeric, text, interval, text, jsonb, text) IS
    'reserve funds (lowers available, not the balance) until captured, released or expired; idempotent by trace_id';
REVOKE ALL ON FUNCTION billing_hold(text, numeric, text, interval, text, jsonb, text) FROM PUBLIC;

CREATE FUNCTION billing_capture(tenant_id text, hold_trace_id text, amount numeric, trace_id text,
                                final boolean DEFAULT false,
                                description text DEFAULT NULL,
                                metadata jsonb DEFAULT NULL,
                                event_at timestamptz DEFAULT NULL)
    RETURNS billing.capture_result
    AS 'MODULE_PATHNAME', 'billing_capture'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) IS
    'charge against a hold (a ledger entry of kind capture); final => release the rest; idempotent by trace_id';
REVOKE ALL ON FUNCTION billing_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) FROM PUBLIC;

CREATE FUNCTION billing_release(tenant_id text, hold_trace_id text, trace_id text)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_release'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_release(text, text, text) IS
    'free what is left on a hold; idempotent by trace_id; a settled or expired hold releases nothing';
REVOKE ALL ON FUNCTION billing_release(text, text, text) FROM PUBLIC;

CREATE FUNCTION billing_hold_extend(tenant_id text, hold_trace_id text,
                                    expires_in interval DEFAULT '15 minutes')
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold_extend'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_hold_extend(text, text, interval) IS
    'heartbeat: an open hold now expires at now() + expires_in';
REVOKE ALL ON FUNCTION billing_hold_extend(text, text, interval) FROM PUBLIC;

CREATE VIEW billing.open_holds AS
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
 WHERE h.status = 'open' AND h.expires_at > now();
COMMENT ON VIEW billing.open_holds IS 'holds that still reserve funds (open and not expired)';
/* 40_limits: quotas, spending caps, per-charge maximum, rate limit */

CREATE VIEW billing.quota_usage AS
WITH p AS (
    SELECT a.*,
           (now() AT TIME ZONE a.timezone)::date AS today,
           date_trunc('month', now() AT TIME ZONE a.timezone)::date AS this_month
      FROM billing.accounts a
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

-- a count limit: NULL or >= 0
CREATE FUNCTION billing.check_count(value bigint, argname text) RETURNS bigint
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

CREATE FUNCTION billing_limits_set(tenant_id text,
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
           version = a.version + 1,
           updated_at = now()
     WHERE a.tenant_id = acc.tenant_id;
    INSERT INTO billing.account_events (tenant_id, action, changes, reason)
    VALUES (acc.tenant_id, 'limits', lim, billing_limits_set.reason);
    PERFORM billing.sync_mark(acc.tenant_id);

    RETURN QUERY SELECT * FROM billing.quota_usage q WHERE q.tenant_id = acc.tenant_id;
END;
$$;
COMMENT ON FUNCTION billing_limits_set(text, bigint, bigint, numeric, numeric, numeric, bigint, text) IS
    'set all limits of an account at once (NULL = no limit); recorded in billing.account_events';
REVOKE ALL ON FUNCTION billing_limits_set(text, bigint, bigint, numeric, numeric, numeric, bigint, text) FROM PUBLIC;
/* 50_keys: API keys and their budgets */

CREATE TABLE billing.api_keys (
    tenant_id           text        NOT NULL,
    key_id              text        NOT NULL,
    status              text        NOT NULL DEFAULT 'active',
    budget_micros       bigint,
    budget_period       text,
    period_start        date,
    period_spend_micros bigint      NOT NULL DEFAULT 0,
    metadata            jsonb       NOT NULL DEFAULT '{}',
    last_used_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT api_keys_pkey PRIMARY KEY (tenant_id, key_id),
    CONSTRAINT api_keys_status_check CHECK (status IN ('active', 'suspended', 'revoked')),
    CONSTRAINT api_keys_budget_check CHECK ((budget_micros IS NULL) = (budget_period IS NULL) AND budget_micros >= 0),
    CONSTRAINT api_keys_period_check CHECK (budget_period IN ('day', 'month', 'lifetime'))
);
COMMENT ON TABLE billing.api_keys IS 'API keys of an account, with an optional budget per day, month or lifetime';
SELECT pg_catalog.pg_extension_config_dump('billing.api_keys', '');

CREATE VIEW billing.api_key_budgets AS
WITH k AS (
    SELECT k.*,
           CASE k.budget_period
               WHEN 'day' THEN (now() AT TIME ZONE a.timezone)::date
               WHEN 'month' THEN date_trunc('month', now() AT TIME ZONE a.timezone)::date
           END AS current_start,
           a.timezone
      FROM billing.api_keys k
      JOIN billing.accounts a ON a.tenant_id = k.tenant_id
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

-- shared checks of api key settings
CREATE FUNCTION billing.check_key_settings(key_id text, budget numeric, budget_period text,
                                           OUT budget_micros bigint)
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF key_id IS NULL THEN
        RAISE EXCEPTION 'key_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the key id.';
    END IF;
    IF key_id = '' OR length(key_id) > 255 THEN
        RAISE EXCEPTION 'key_id must be 1 to 255 characters'
            USING ERRCODE = 'ZB018', DETAIL = format('It has %s characters.', length(key_id)),
                  HINT = 'Use the public id of the key (never the secret).';
    END IF;
    IF key_id ~ '[{}]' THEN
        RAISE EXCEPTION 'key_id must not contain { or }'
            USING ERRCODE = 'ZB018', DETAIL = format('The value given was %s.', quote_literal(key_id)),
                  HINT = 'Braces delimit the Redis hash tag of the tenant''s keys.';
    END IF;
    IF budget_period IS NOT NULL AND budget_period NOT IN ('day', 'month', 'lifetime') THEN
        RAISE EXCEPTION 'invalid budget period %', quote_literal(budget_period)
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

CREATE FUNCTION billing_api_key_create(tenant_id text, key_id text,
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
    INSERT INTO billing.api_keys AS t (tenant_id, key_id, budget_micros, budget_period, metadata)
    VALUES (acc.tenant_id, billing_api_key_create.key_id, micros, billing_api_key_create.budget_period,
            coalesce(billing_api_key_create.metadata, '{}'))
    ON CONFLICT (tenant_id, key_id) DO NOTHING
    RETURNING * INTO k;
    IF FOUND THEN
        -- the key's Redis hash carries the account version: bump it
        UPDATE billing.accounts a SET version = a.version + 1 WHERE a.tenant_id = acc.tenant_id;
        PERFORM billing.sync_mark(acc.tenant_id);
    ELSE
        SELECT * INTO k FROM billing.api_keys t
         WHERE t.tenant_id = acc.tenant_id AND t.key_id = billing_api_key_create.key_id;
        -- like billing_account_create: only the settings given are compared
        IF (billing_api_key_create.budget IS NOT NULL
            AND (k.budget_micros IS DISTINCT FROM micros OR k.budget_period IS DISTINCT FROM billing_api_key_create.budget_period))
           OR (billing_api_key_create.metadata IS NOT NULL AND k.metadata <> billing_api_key_create.metadata) THEN
            RAISE EXCEPTION 'api key "%" already exists with different settings', k.key_id
                USING ERRCODE = 'ZB006',
                      DETAIL = format('Existing: budget %s, metadata %s; requested: budget %s, metadata %s.',
                                      coalesce(billing.to_amount(k.budget_micros) || ' per ' || k.budget_period, 'none'), k.metadata,
                                      coalesce(billing.to_amount(micros) || ' per ' || billing_api_key_create.budget_period, 'none'),
                                      coalesce(billing_api_key_create.metadata::text, '(not given)')),
                      HINT = 'Change it with billing_api_key_update(), or leave the settings out to get the existing key.';
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM billing.api_key_budgets b
                  WHERE b.tenant_id = acc.tenant_id AND b.key_id = billing_api_key_create.key_id;
END;
$$;
COMMENT ON FUNCTION billing_api_key_create(text, text, numeric, text, jsonb) IS
    'create an API key for an account, optionally with a budget per day, month or lifetime';
REVOKE ALL ON FUNCTION billing_api_key_create(text, text, numeric, text, jsonb) FROM PUBLIC;

CREATE FUNCTION billing_api_key_update(tenant_id text, key_id text,
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
        RAISE EXCEPTION 'invalid api key status %', quote_literal(billing_api_key_update.status)
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
           updated_at = now()
     WHERE t.tenant_id = acc.tenant_id AND t.key_id = k.key_id;
    UPDATE billing.accounts a SET version = a.version + 1 WHERE a.tenant_id = acc.tenant_id;
    PERFORM billing.sync_mark(acc.tenant_id);
    RETURN QUERY SELECT * FROM billing.api_key_budgets b
                  WHERE b.tenant_id = acc.tenant_id AND b.key_id = k.key_id;
END;
$$;
COMMENT ON FUNCTION billing_api_key_update(text, text, text, numeric, text, boolean) IS
    'change an API key: status (active, suspended, revoked — final), budget and period, or remove_budget';
REVOKE ALL ON FUNCTION billing_api_key_update(text, text, text, numeric, text, boolean) FROM PUBLIC;
/* 60_pricing: token prices with history, and charges priced from usage */

CREATE TABLE billing.prices (
    model                 text        NOT NULL,
    currency              text        NOT NULL,
    effective_from        timestamptz NOT NULL,
    input_per_1k_micros   bigint      NOT NULL,
    output_per_1k_micros  bigint      NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT prices_pkey PRIMARY KEY (model, currency, effective_from),
    CONSTRAINT prices_check CHECK (input_per_1k_micros >= 0 AND output_per_1k_micros >= 0)
);
COMMENT ON TABLE billing.prices IS 'price per 1,000 tokens per model and currency, with history: a charge uses the price effective at its event time';

CREATE TRIGGER prices_no_rewrite
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.prices
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Prices keep their history: add a new price with a later effective_from via billing_price_set().');
ALTER TABLE billing.prices ENABLE ALWAYS TRIGGER prices_no_rewrite;
SELECT pg_catalog.pg_extension_config_dump('billing.prices', '');

CREATE VIEW billing.price_list AS
SELECT p.model,
       p.currency,
       billing.to_amount(p.input_per_1k_micros)  AS input_per_1k,
       billing.to_amount(p.output_per_1k_micros) AS output_per_1k,
       p.effective_from,
       lead(p.effective_from) OVER w AS effective_until,
       p.effective_from <= now() AND coalesce(lead(p.effective_from) OVER w > now(), true) AS is_current
  FROM billing.prices p
WINDOW w AS (PARTITION BY p.model, p.currency ORDER BY p.effective_from);
COMMENT ON VIEW billing.price_list IS 'prices per model and currency with their validity window';

CREATE FUNCTION billing_price_set(model text, input_per_1k numeric, output_per_1k numeric,
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
    IF billing_price_set.model IS NULL OR billing_price_set.model = '' OR length(billing_price_set.model) > 255 THEN
        RAISE EXCEPTION 'model must be 1 to 255 characters'
            USING ERRCODE = CASE WHEN billing_price_set.model IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass the model name as gateways report it, e.g. gpt-4o.';
    END IF;
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
COMMENT ON FUNCTION billing_price_set(text, numeric, numeric, timestamptz, text) IS
    'add a price per 1,000 input/output tokens for a model, effective from a time (history is kept)';
REVOKE ALL ON FUNCTION billing_price_set(text, numeric, numeric, timestamptz, text) FROM PUBLIC;

-- the price effective at a time, or ZB060
CREATE FUNCTION billing.price_at(model text, currency text, at timestamptz) RETURNS billing.prices
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p billing.prices;
    first_from timestamptz;
BEGIN
    SELECT * INTO p FROM billing.prices x
     WHERE x.model = price_at.model AND x.currency = price_at.currency AND x.effective_from <= price_at.at
     ORDER BY x.effective_from DESC LIMIT 1;
    IF NOT FOUND THEN
        SELECT min(x.effective_from) INTO first_from FROM billing.prices x
         WHERE x.model = price_at.model AND x.currency = price_at.currency;
        IF first_from IS NULL THEN
            RAISE EXCEPTION 'unknown model "%"', price_at.model
                USING ERRCODE = 'ZB060',
                      DETAIL = format('No price for %s in %s.', price_at.model, price_at.currency),
                      HINT = 'Add one with billing_price_set().';
        END IF;
        RAISE EXCEPTION 'no price for model "%" at %', price_at.model, price_at.at
            USING ERRCODE = 'ZB060',
                  DETAIL = format('The first price for %s in %s is effective from %s.',
                                  price_at.model, price_at.currency, first_from),
                  HINT = 'Add an earlier price with billing_price_set(), or charge a later event time.';
    END IF;
    RETURN p;
END;
$$;
REVOKE ALL ON FUNCTION billing.price_at(text, text, timestamptz) FROM PUBLIC;

-- tokens -> micros, exactly, rounded half up once on the total
CREATE FUNCTION billing.cost_micros(p billing.prices, input_tokens bigint, output_tokens bigint) RETURNS bigint
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

CREATE FUNCTION billing_cost(model text, input_tokens bigint, output_tokens bigint,
                             at timestamptz DEFAULT now(), currency text DEFAULT 'USD')
    RETURNS numeric
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF billing_cost.model IS NULL OR billing_cost.at IS NULL OR billing_cost.currency IS NULL THEN
        RAISE EXCEPTION 'model, at and currency must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name; at and currency have defaults.';
    END IF;
    RETURN billing.to_amount(billing.cost_micros(
        billing.price_at(billing_cost.model, billing_cost.currency, billing_cost.at),
        billing_cost.input_tokens, billing_cost.output_tokens));
END;
$$;
COMMENT ON FUNCTION billing_cost(text, bigint, bigint, timestamptz, text) IS
    'exact cost of a usage: (input_tokens * input_per_1k + output_tokens * output_per_1k) / 1000, rounded half up to 6 decimals';
REVOKE ALL ON FUNCTION billing_cost(text, bigint, bigint, timestamptz, text) FROM PUBLIC;

CREATE FUNCTION billing_deduct_usage(tenant_id text, model text,
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
    IF billing_deduct_usage.metadata IS NOT NULL AND jsonb_typeof(billing_deduct_usage.metadata) <> 'object' THEN
        PERFORM billing.check_account_settings('-', NULL, NULL, NULL, billing_deduct_usage.metadata);
    END IF;
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_deduct_usage.tenant_id;
    IF NOT FOUND THEN
        PERFORM billing.lock_account(billing_deduct_usage.tenant_id);   -- raises ZB015 / ZB001
    END IF;
    -- price at the usage time; a replay is priced when the original was recorded
    SELECT e.created_at INTO priced FROM billing.entries e
     WHERE e.tenant_id = billing_deduct_usage.tenant_id AND e.trace_id = billing_deduct_usage.trace_id;
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
    RETURN @extschema@.billing_deduct(billing_deduct_usage.tenant_id, billing.to_amount(cost), billing_deduct_usage.trace_id,
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
COMMENT ON FUNCTION billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text) IS
    'charge token usage at the model price effective at event time; model, tokens and unit prices go into the entry metadata';
REVOKE ALL ON FUNCTION billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text) FROM PUBLIC;
/* 65_usage: usage reports (views) */

-- usage = charges: entries of kind deduct and capture
CREATE VIEW billing.usage_daily AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       count(*) FILTER (WHERE e.kind IN ('deduct', 'capture'))                      AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind IN ('deduct', 'capture')), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)::bigint) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_daily IS 'per tenant and day (account time zone, by event time): charges and credits';

CREATE VIEW billing.usage_monthly AS
SELECT e.tenant_id,
       date_trunc('month', coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS month,
       count(*) FILTER (WHERE e.kind IN ('deduct', 'capture'))                      AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind IN ('deduct', 'capture')), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)::bigint) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_monthly IS 'per tenant and calendar month (account time zone, by event time): charges and credits';

CREATE VIEW billing.usage_by_model AS
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

CREATE VIEW billing.usage_by_api_key AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.api_key, e.metadata->>'api_key') AS api_key,
       count(*)                AS charges,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS spent
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE e.kind IN ('deduct', 'capture')
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.usage_by_api_key IS 'charges per tenant, day and api key (the api_key argument, else metadata->>''api_key'')';
/* 70_jobs: billable jobs; the C trigger billing.job_guard enforces the state machine */

CREATE FUNCTION billing.job_guard() RETURNS trigger
    AS 'MODULE_PATHNAME', 'billing_job_guard'
    LANGUAGE C;
COMMENT ON FUNCTION billing.job_guard() IS 'trigger: job state machine and invariants (ZB070, ZB072)';
REVOKE ALL ON FUNCTION billing.job_guard() FROM PUBLIC;

CREATE SEQUENCE billing.job_id_seq;
CREATE TABLE billing.jobs (
    tenant_id        text        NOT NULL,
    job_id           bigint      NOT NULL DEFAULT nextval('billing.job_id_seq'),
    idempotency_key  text        NOT NULL,
    kind             text        NOT NULL,
    state            text        NOT NULL DEFAULT 'queued',
    input            jsonb       NOT NULL DEFAULT '{}',
    output           jsonb,
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 3,
    run_at           timestamptz NOT NULL DEFAULT now(),
    worker           text,
    lease_until      timestamptz,
    heartbeat_at     timestamptz,
    estimated_micros bigint      NOT NULL,
    actual_micros    bigint,
    hold_trace_id    text,
    hold_seq         integer     NOT NULL DEFAULT 0,
    hold_ttl         interval    NOT NULL DEFAULT '1 hour',
    charge_entry_id  bigint,
    last_error       text,
    note             text,      -- why this write happens; moved into job_events by the trigger
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CONSTRAINT jobs_pkey PRIMARY KEY (tenant_id, job_id),
    CONSTRAINT jobs_idempotency_key UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT jobs_state_check CHECK (state IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    CONSTRAINT jobs_attempt_check CHECK (attempt >= 0 AND max_attempts BETWEEN 1 AND 100),
    CONSTRAINT jobs_estimate_check CHECK (estimated_micros > 0 AND actual_micros >= 0)
);
ALTER SEQUENCE billing.job_id_seq OWNED BY billing.jobs.job_id;
CREATE INDEX jobs_queued_idx ON billing.jobs (run_at, job_id) WHERE state = 'queued';
CREATE INDEX jobs_processing_idx ON billing.jobs (lease_until) WHERE state = 'processing';
COMMENT ON TABLE billing.jobs IS 'billable jobs; state machine and billing invariants enforced by the job_guard trigger';
CREATE TRIGGER jobs_guard
    BEFORE INSERT OR UPDATE ON billing.jobs
    FOR EACH ROW EXECUTE FUNCTION billing.job_guard();
ALTER TABLE billing.jobs ENABLE ALWAYS TRIGGER jobs_guard;

CREATE TRIGGER jobs_no_delete
    BEFORE DELETE OR TRUNCATE ON billing.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Jobs are never deleted: cancel one with billing_job_cancel().');
ALTER TABLE billing.jobs ENABLE ALWAYS TRIGGER jobs_no_delete;
SELECT pg_catalog.pg_extension_config_dump('billing.jobs', '');
SELECT pg_catalog.pg_extension_config_dump('billing.job_id_seq', '');

CREATE SEQUENCE billing.job_event_id_seq;
CREATE TABLE billing.job_events (
    tenant_id   text        NOT NULL,
    event_id    bigint      NOT NULL DEFAULT nextval('billing.job_event_id_seq'),
    job_id      bigint      NOT NULL,
    from_state  text,
    to_state    text        NOT NULL,
    attempt     integer     NOT NULL,
    reason      text,
    worker      text,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT job_events_pkey PRIMARY KEY (tenant_id, event_id)
);
ALTER SEQUENCE billing.job_event_id_seq OWNED BY billing.job_events.event_id;
CREATE INDEX job_events_job_idx ON billing.job_events (tenant_id, job_id, event_id);
COMMENT ON TABLE billing.job_events IS 'append-only business log of job transitions (from, to, attempt, reason, worker, when)';

CREATE TRIGGER job_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.job_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'The job log is never rewritten.');
ALTER TABLE billing.job_events ENABLE ALWAYS TRIGGER job_events_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.job_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.job_event_id_seq', '');

CREATE TYPE billing.job_result AS (
    job_id          bigint,
    tenant_id       text,
    idempotency_key text,
    kind            text,
    state           text,
    attempt         integer,
    max_attempts    integer,
    run_at          timestamptz,
    worker          text,
    lease_until     timestamptz,
    estimated_cost  numeric,
    actual_cost     numeric,
    hold_trace_id   text,
    charge_entry_id bigint,
    last_error      text,
    input           jsonb,
    output          jsonb,
    created_at      timestamptz,
    finished_at     timestamptz,
    replayed        boolean
);

CREATE FUNCTION billing.job_result(j billing.jobs, replayed boolean) RETURNS billing.job_result
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ROW(j.job_id, j.tenant_id, j.idempotency_key, j.kind, j.state, j.attempt, j.max_attempts,
               j.run_at, j.worker, j.lease_until, billing.to_amount(j.estimated_micros),
               billing.to_amount(j.actual_micros), j.hold_trace_id, j.charge_entry_id, j.last_error,
               j.input, j.output, j.created_at, j.finished_at, replayed)::billing.job_result
$$;

-- lock a job (FOR UPDATE) or raise ZB071
CREATE FUNCTION billing.job_lock(tenant_id text, job_id bigint) RETURNS billing.jobs
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
    SELECT * INTO j FROM billing.jobs x
     WHERE x.tenant_id = job_lock.tenant_id AND x.job_id = job_lock.job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist for tenant "%"', job_lock.job_id, job_lock.tenant_id
            USING ERRCODE = 'ZB071', HINT = 'Pass the job_id that billing_job_submit() returned.';
    END IF;
    RETURN j;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_lock(text, bigint) FROM PUBLIC;

-- is the job's hold open, safely before its expiry?
CREATE FUNCTION billing.job_hold_open(j billing.jobs, margin interval DEFAULT '1 second') RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM billing.holds h
                    WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
                      AND h.status = 'open' AND h.expires_at > clock_timestamp() + margin)
$$;

-- keep the job's hold alive until `until` + the job's hold_ttl (if it is still open)
CREATE FUNCTION billing.job_keep_hold(j billing.jobs, until timestamptz) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted interval := least(until - now() + j.hold_ttl, interval '31 days');
BEGIN
    IF billing.job_hold_open(j) AND EXISTS (
        SELECT FROM billing.holds h
         WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
           AND h.expires_at < now() + wanted) THEN
        PERFORM @extschema@.billing_hold_extend(j.tenant_id, j.hold_trace_id, wanted);
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_keep_hold(billing.jobs, timestamptz) FROM PUBLIC;

-- release the job's hold (nothing happens if it is settled or expired)
CREATE FUNCTION billing.job_release_hold(j billing.jobs) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF j.hold_trace_id IS NOT NULL THEN
        PERFORM @extschema@.billing_release(j.tenant_id, j.hold_trace_id, j.hold_trace_id || ':release');
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_release_hold(billing.jobs) FROM PUBLIC;

-- a failed attempt: retry with backoff while attempts remain, else failed (hold released)
CREATE FUNCTION billing.job_fail_attempt(j billing.jobs, error text, retryable boolean) RETURNS billing.jobs
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    j.last_error := error;
    j.lease_until := NULL;
    j.updated_at := now();
    IF retryable AND j.attempt < j.max_attempts THEN
        -- River-style backoff: attempt^4 seconds, +-10 % jitter
        j.state := 'queued';
        j.run_at := now() + make_interval(secs => power(j.attempt, 4) * (0.9 + 0.2 * random()));
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
REVOKE ALL ON FUNCTION billing.job_fail_attempt(billing.jobs, text, boolean) FROM PUBLIC;

-- processing, and (if a worker is named) leased by that worker, or ZB073
CREATE FUNCTION billing.job_check_lease(j billing.jobs, worker text, wanted text) RETURNS void
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

CREATE FUNCTION billing_job_submit(tenant_id text, kind text, idempotency_key text,
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
    IF billing_job_submit.kind = '' OR length(billing_job_submit.kind) > 255
       OR billing_job_submit.idempotency_key = '' OR length(billing_job_submit.idempotency_key) > 255 THEN
        RAISE EXCEPTION 'kind and idempotency_key must be 1 to 255 characters'
            USING ERRCODE = 'ZB018', HINT = 'Use e.g. kind => ''translate'', idempotency_key => your request id.';
    END IF;
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
    IF billing_job_submit.input IS NOT NULL AND jsonb_typeof(billing_job_submit.input) <> 'object' THEN
        RAISE EXCEPTION 'input must be a json object'
            USING ERRCODE = 'ZB018', DETAIL = format('The value given was %s.', billing_job_submit.input),
                  HINT = 'Pass e.g. ''{"document": "s3://bucket/key"}''::jsonb, or leave it out.';
    END IF;
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
                      DETAIL = format('Existing job %s: kind %s, estimated_cost %s, max_attempts %s, input %s.',
                                      j.job_id, j.kind, billing.to_amount(j.estimated_micros), j.max_attempts, j.input),
                      HINT = 'Resend the original submit unchanged to get the job, or use a new idempotency key.';
        END IF;
        RETURN billing.job_result(j, true);
    END IF;

    -- reserve the estimate; not enough funds -> the error aborts the submit: no job
    PERFORM @extschema@.billing_hold(j.tenant_id, billing.to_amount(est), j.hold_trace_id,
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
COMMENT ON FUNCTION billing_job_submit(text, text, text, numeric, jsonb, integer, timestamptz, interval) IS
    'create a job and hold its estimated cost in one transaction; a duplicate idempotency key returns the existing job';
REVOKE ALL ON FUNCTION billing_job_submit(text, text, text, numeric, jsonb, integer, timestamptz, interval) FROM PUBLIC;

CREATE FUNCTION billing_job_claim(worker text,
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
BEGIN
    IF billing_job_claim.worker IS NULL OR billing_job_claim.max_jobs IS NULL OR billing_job_claim.lease IS NULL THEN
        RAISE EXCEPTION 'worker, max_jobs and lease must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Name the worker, e.g. its host and pid.';
    END IF;
    IF billing_job_claim.max_jobs NOT BETWEEN 1 AND 1000
       OR billing_job_claim.lease <= interval '0' OR billing_job_claim.lease > interval '1 day' THEN
        RAISE EXCEPTION 'max_jobs must be 1 to 1000 and lease in (0, 1 day]'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('max_jobs %s, lease %s.', billing_job_claim.max_jobs, billing_job_claim.lease),
                  HINT = 'Keep leases short and renew them with billing_job_heartbeat().';
    END IF;
    FOR j IN
        WITH due AS (
            SELECT x.tenant_id, x.job_id
              FROM billing.jobs x
             WHERE x.state = 'queued' AND x.run_at <= now()
               AND (billing_job_claim.kinds IS NULL OR x.kind = ANY (billing_job_claim.kinds))
               AND (billing_job_claim.tenant_id IS NULL OR x.tenant_id = billing_job_claim.tenant_id)
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
COMMENT ON FUNCTION billing_job_claim(text, text[], integer, interval, text) IS
    'hand due queued jobs to a worker (FOR UPDATE SKIP LOCKED): attempt + 1, lease set; two workers never get the same job';
REVOKE ALL ON FUNCTION billing_job_claim(text, text[], integer, interval, text) FROM PUBLIC;

CREATE FUNCTION billing_job_heartbeat(tenant_id text, job_id bigint, worker text,
                                      lease interval DEFAULT '5 minutes')
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_heartbeat.tenant_id, billing_job_heartbeat.job_id);
BEGIN
    IF billing_job_heartbeat.lease IS NULL OR billing_job_heartbeat.worker IS NULL THEN
        RAISE EXCEPTION 'worker and lease must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Name the worker that claimed the job.';
    END IF;
    IF billing_job_heartbeat.lease <= interval '0' OR billing_job_heartbeat.lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be in (0, 1 day]'
            USING ERRCODE = 'ZB018', HINT = 'Pass e.g. interval ''5 minutes''.';
    END IF;
    PERFORM billing.job_check_lease(j, billing_job_heartbeat.worker, 'processing');
    j.lease_until := now() + billing_job_heartbeat.lease;
    j.heartbeat_at := now();
    UPDATE billing.jobs x SET lease_until = j.lease_until, heartbeat_at = j.heartbeat_at, updated_at = now()
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    PERFORM billing.job_keep_hold(j, j.lease_until);
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION billing_job_heartbeat(text, bigint, text, interval) IS
    'extend the lease of a processing job (and the expiry of its hold)';
REVOKE ALL ON FUNCTION billing_job_heartbeat(text, bigint, text, interval) FROM PUBLIC;

CREATE FUNCTION billing_job_complete(tenant_id text, job_id bigint, actual_cost numeric,
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
    IF billing_job_complete.output IS NOT NULL AND jsonb_typeof(billing_job_complete.output) <> 'object' THEN
        RAISE EXCEPTION 'output must be a json object'
            USING ERRCODE = 'ZB018', DETAIL = format('The value given was %s.', billing_job_complete.output),
                  HINT = 'Pass e.g. ''{"words": 912}''::jsonb, or leave it out.';
    END IF;
    IF j.state = 'completed' AND j.actual_micros = actual THEN
        RETURN billing.job_result(j, true);           -- a retried complete
    END IF;
    PERFORM billing.job_check_lease(j, billing_job_complete.worker, 'completed');

    -- the charge; if it fails, the error leaves the job processing
    IF actual > 0 AND billing.job_hold_open(j) THEN
        SELECT c.entry_id INTO entry
          FROM @extschema@.billing_capture(j.tenant_id, j.hold_trace_id, billing.to_amount(actual),
                                          format('job:%s:charge', j.job_id), final => true,
                                          description => format('job %s (%s)', j.job_id, j.kind)) c;
    ELSE
        PERFORM billing.job_release_hold(j);         -- hold expired or nothing to charge
        IF actual > 0 THEN
            SELECT d.entry_id INTO entry
              FROM @extschema@.billing_deduct(j.tenant_id, billing.to_amount(actual), format('job:%s:charge', j.job_id),
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
COMMENT ON FUNCTION billing_job_complete(text, bigint, numeric, jsonb, text) IS
    'capture the actual cost and mark the job completed in one transaction; if the charge fails nothing changes';
REVOKE ALL ON FUNCTION billing_job_complete(text, bigint, numeric, jsonb, text) FROM PUBLIC;

CREATE FUNCTION billing_job_fail(tenant_id text, job_id bigint, error text,
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
    PERFORM billing.job_check_lease(j, billing_job_fail.worker, 'failed');
    j := billing.job_fail_attempt(j, coalesce(billing_job_fail.error, 'failed'), billing_job_fail.retryable);
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION billing_job_fail(text, bigint, text, boolean, text) IS
    'a failed attempt: queued again with backoff while attempts remain (hold kept), else failed with the hold released';
REVOKE ALL ON FUNCTION billing_job_fail(text, bigint, text, boolean, text) FROM PUBLIC;

CREATE FUNCTION billing_job_cancel(tenant_id text, job_id bigint, reason text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_cancel.tenant_id, billing_job_cancel.job_id);
BEGIN
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
COMMENT ON FUNCTION billing_job_cancel(text, bigint, text) IS 'cancel a queued or processing job and release its hold';
REVOKE ALL ON FUNCTION billing_job_cancel(text, bigint, text) FROM PUBLIC;

CREATE FUNCTION billing_job_retry(tenant_id text, job_id bigint)
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
    PERFORM @extschema@.billing_hold(j.tenant_id, billing.to_amount(j.estimated_micros), j.hold_trace_id,
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
COMMENT ON FUNCTION billing_job_retry(text, bigint) IS 'requeue a failed job with a new hold for its estimate (attempts start over)';
REVOKE ALL ON FUNCTION billing_job_retry(text, bigint) FROM PUBLIC;

CREATE FUNCTION billing_job_rescue(max_jobs integer DEFAULT 100)
    RETURNS SETOF billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs;
BEGIN
    IF max_jobs IS NULL THEN
        RAISE EXCEPTION 'max_jobs must not be null' USING ERRCODE = 'ZB015', HINT = 'Leave it out for 100.';
    END IF;
    IF max_jobs NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'max_jobs must be 1 to 10000' USING ERRCODE = 'ZB018', HINT = 'Rescue in batches.';
    END IF;
    FOR j IN
        SELECT * FROM billing.jobs x
         WHERE x.state = 'processing' AND x.lease_until < now()
         ORDER BY x.lease_until
         LIMIT max_jobs
           FOR UPDATE SKIP LOCKED
    LOOP
        j := billing.job_fail_attempt(j, format('lease expired (worker %s, attempt %s)', j.worker, j.attempt), true);
        RETURN NEXT billing.job_result(j, false);
    END LOOP;
END;
$$;
COMMENT ON FUNCTION billing_job_rescue(integer) IS
    'jobs whose lease expired count as a failed attempt: queued again with backoff, or failed with the hold released';
REVOKE ALL ON FUNCTION billing_job_rescue(integer) FROM PUBLIC;

CREATE VIEW billing.jobs_by_state AS
SELECT j.tenant_id, j.kind, j.state,
       count(*)                AS jobs,
       min(j.created_at)       AS oldest_created_at,
       min(j.run_at) FILTER (WHERE j.state = 'queued') AS next_run_at
  FROM billing.jobs j
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.jobs_by_state IS 'job counts per tenant, kind and state';

CREATE VIEW billing.job_failures AS
SELECT e.tenant_id, j.kind, e.reason AS error,
       count(*)          AS failures,
       count(DISTINCT e.job_id) AS jobs,
       max(e.created_at) AS last_seen
  FROM billing.job_events e
  JOIN billing.jobs j ON j.tenant_id = e.tenant_id AND j.job_id = e.job_id
 WHERE e.from_state = 'processing' AND e.to_state IN ('queued', 'failed')
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.job_failures IS 'failed attempts (including rescued ones) per tenant, kind and error';

CREATE VIEW billing.job_costs AS
SELECT j.tenant_id, j.kind,
       count(*) AS completed_jobs,
       billing.to_amount(sum(j.estimated_micros)::bigint) AS estimated,
       billing.to_amount(sum(j.actual_micros)::bigint)    AS actual,
       round(sum(j.actual_micros)::numeric / nullif(sum(j.estimated_micros), 0), 4) AS actual_to_estimate
  FROM billing.jobs j
 WHERE j.state = 'completed'
 GROUP BY 1, 2;
COMMENT ON VIEW billing.job_costs IS 'estimated vs actual cost of completed jobs per tenant and kind';

CREATE VIEW billing.job_time_in_state AS
WITH spans AS (
    SELECT e.tenant_id, e.job_id, e.to_state AS state,
           lead(e.created_at) OVER (PARTITION BY e.tenant_id, e.job_id ORDER BY e.event_id) - e.created_at AS spent
      FROM billing.job_events e
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
/* 80_sync: the Redis mirror's database side, and the worker's periodic maintenance */

CREATE FUNCTION billing.sync_mark(tenant_id text) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_sync_mark_sql'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.sync_mark(text) IS 'mark a tenant changed: pushed to Redis after this transaction commits';
REVOKE ALL ON FUNCTION billing.sync_mark(text) FROM PUBLIC;

CREATE FUNCTION billing.expire_holds_of(tenant_id text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_expire_holds_of'
    LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION billing.expire_holds_of(text) FROM PUBLIC;

CREATE FUNCTION billing.expire_due_holds(max_accounts integer DEFAULT 1000) RETURNS integer
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
REVOKE ALL ON FUNCTION billing.expire_due_holds(integer) FROM PUBLIC;

CREATE FUNCTION billing.maintenance() RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    expired integer := billing.expire_due_holds(1000);
    rescued integer;
BEGIN
    SELECT count(*) INTO rescued FROM @extschema@.billing_job_rescue(100);
    RETURN jsonb_build_object('accounts_with_expired_holds', expired, 'jobs_rescued', rescued);
END;
$$;
COMMENT ON FUNCTION billing.maintenance() IS 'periodic maintenance run by the background worker: expire holds, rescue stuck jobs';
REVOKE ALL ON FUNCTION billing.maintenance() FROM PUBLIC;

CREATE FUNCTION billing.sync_snapshot_of(tenants text[])
    RETURNS TABLE (tenant_id text, key_id text, version bigint, fields text[])
    AS 'MODULE_PATHNAME', 'billing_sync_snapshot_of'
    LANGUAGE C STABLE;

COMMENT ON FUNCTION billing.sync_snapshot_of(text[]) IS
    'the Redis hashes of the given tenants and their API keys (internal: the background worker, through billing.sync_snapshot)';

REVOKE ALL ON FUNCTION billing.sync_snapshot_of(text[]) FROM PUBLIC;

-- what the worker pushes: one row per tenant hash and per api key hash;
-- fields = Redis field/value pairs, amounts in integer micro-units
CREATE FUNCTION billing.sync_snapshot(tenants text[], after text, lim integer)
    RETURNS TABLE (tenant_id text, key_id text, version bigint, fields text[])
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tenants IS NULL THEN
        -- a resync page: the tenants after `after`
        tenants := ARRAY(SELECT a.tenant_id FROM billing.accounts a
                          WHERE a.tenant_id > after ORDER BY a.tenant_id LIMIT lim);
    END IF;
    RETURN QUERY
        SELECT s.* FROM billing.sync_snapshot_of(tenants) AS s
         ORDER BY s.tenant_id, s.key_id NULLS LAST;
END
$$;
REVOKE ALL ON FUNCTION billing.sync_snapshot(text[], text, integer) FROM PUBLIC;

CREATE TYPE billing.sync_info AS (
    enabled             boolean,      -- false: billing not in shared_preload_libraries
    worker_pid          integer,
    connected           boolean,
    redis_run_id        text,
    dirty_accounts      bigint,       -- committed changes waiting to be pushed
    full_resync_pending boolean,
    lag                 interval,     -- age of the oldest committed change not yet in Redis
    last_push_at        timestamptz,
    pushed              bigint,
    failed              bigint,
    last_error          text,
    last_error_at       timestamptz,
    last_full_resync_at timestamptz,
    full_resyncs        bigint,
    repaired            bigint,       -- hashes fixed by the periodic consistency check
    recent_lag_p50_ms   double precision,
    recent_lag_p99_ms   double precision
);

CREATE FUNCTION billing_sync_status() RETURNS billing.sync_info
    AS 'MODULE_PATHNAME', 'billing_sync_status'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing_sync_status() IS 'state of the Redis mirror: connected, lag, pushes, errors, last full resync';
REVOKE ALL ON FUNCTION billing_sync_status() FROM PUBLIC;

CREATE VIEW billing.sync_status AS SELECT * FROM billing_sync_status();
COMMENT ON VIEW billing.sync_status IS 'state of the Redis mirror (one row), for dashboards';
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
/* 90_privileges: grant helpers for the documented roles */

/*
 * Grant helpers: the documented role model in one call each.  They run with
 * the caller's rights, so only a role allowed to grant (the extension
 * owner, a superuser) can use them.
 */
CREATE FUNCTION billing_grant_app(role regrole) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn regprocedure;
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the application role.';
    END IF;
    FOREACH fn IN ARRAY billing.app_functions() LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', fn, role);
    END LOOP;
    -- billing_account_create/update return rows of billing.balances
    EXECUTE format('GRANT EXECUTE ON FUNCTION billing.effective_holds(billing.accounts) TO %s', role);
    EXECUTE format('GRANT USAGE ON SCHEMA billing TO %s', role);
END;
$$;
COMMENT ON FUNCTION billing_grant_app(regrole) IS 'grant an application role EXECUTE on the billing_* API (no table rights)';
REVOKE ALL ON FUNCTION billing_grant_app(regrole) FROM PUBLIC;

CREATE FUNCTION billing_grant_reporting(role regrole) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v regclass;
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the reporting role.';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA billing TO %s', role);
    -- functions the views call (views run functions with the reader's rights)
    EXECUTE format('GRANT EXECUTE ON FUNCTION billing.effective_holds(billing.accounts) TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION @extschema@.billing_sync_status() TO %s', role);
    FOR v IN SELECT c.oid FROM pg_class c
              WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'v'
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s', v, role);
    END LOOP;
END;
$$;
COMMENT ON FUNCTION billing_grant_reporting(regrole) IS 'grant a reporting role SELECT on the billing views (no tables, no functions)';
REVOKE ALL ON FUNCTION billing_grant_reporting(regrole) FROM PUBLIC;

-- the application API, in one place for billing_grant_app()
CREATE FUNCTION billing.app_functions() RETURNS regprocedure[]
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY[
        '@extschema@.billing_credit(text, numeric, text, text, jsonb, timestamptz, text)',
        '@extschema@.billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text)',
        '@extschema@.billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text, text)',
        '@extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text)',
        '@extschema@.billing_deduct_many(text[], numeric[], text[], text[], jsonb[], text[], text)',
        '@extschema@.billing_hold(text, numeric, text, interval, text, jsonb, text)',
        '@extschema@.billing_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz)',
        '@extschema@.billing_release(text, text, text)',
        '@extschema@.billing_hold_extend(text, text, interval)',
        '@extschema@.billing_cost(text, bigint, bigint, timestamptz, text)',
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
    ]::regprocedure[]
$$;
