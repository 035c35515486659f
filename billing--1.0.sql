/* billing--1.0.sql: install script of the billing extension, version 1.0 */

\echo Use "CREATE EXTENSION billing" to load this file. \quit

/*
 * Layout.  Tables, views and composite types live in schema "billing"; the
 * SQL API (billing_* functions) lives in the schema the extension is
 * created in (public by default), so it is callable with the default
 * search_path.  Money is stored as bigint micro-units (columns *_micros)
 * and shown as numeric with scale 6 by the views and functions.
 */
CREATE SCHEMA billing;
COMMENT ON SCHEMA billing IS 'billing extension: ledger tables and reporting views';

-- ---------------------------------------------------------------------------
-- helpers (C)
-- ---------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------
-- tables
-- ---------------------------------------------------------------------------

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
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_pkey PRIMARY KEY (tenant_id),
    CONSTRAINT accounts_status_check CHECK (status IN ('active', 'suspended', 'closed')),
    CONSTRAINT accounts_credit_limit_check CHECK (credit_limit_micros >= 0)
);
COMMENT ON TABLE billing.accounts IS 'one account per tenant; balance_micros caches SUM(entries.amount_micros), kept in the same transaction';

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
    CONSTRAINT entries_pkey PRIMARY KEY (tenant_id, entry_id),
    CONSTRAINT entries_trace_key UNIQUE (tenant_id, trace_id),
    CONSTRAINT entries_kind_check CHECK (kind IN ('topup', 'grant', 'refund', 'adjustment', 'deduct')),
    CONSTRAINT entries_amount_check CHECK (amount_micros <> 0)
);
ALTER SEQUENCE billing.entry_id_seq OWNED BY billing.entries.entry_id;
COMMENT ON TABLE billing.entries IS 'append-only ledger: one row per money movement; amount signed (debits negative)';

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
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rejections_pkey PRIMARY KEY (tenant_id, rejection_id),
    CONSTRAINT rejections_trace_key UNIQUE (tenant_id, trace_id)
);
ALTER SEQUENCE billing.rejection_id_seq OWNED BY billing.rejections.rejection_id;
COMMENT ON TABLE billing.rejections IS 'append-only: charges refused by billing_try_deduct(), so a replay returns the same refusal';

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
    CONSTRAINT account_events_action_check CHECK (action IN ('create', 'update'))
);
ALTER SEQUENCE billing.account_event_id_seq OWNED BY billing.account_events.event_id;
COMMENT ON TABLE billing.account_events IS 'append-only audit trail of account settings (creation, credit limit, status, ...)';

-- append-only enforcement, for every role (ENABLE ALWAYS: also in replica mode)
CREATE TRIGGER entries_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.entries
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Record a correction as a new entry instead, e.g. billing_credit(..., kind => ''refund'') or kind => ''adjustment''.');
ALTER TABLE billing.entries ENABLE ALWAYS TRIGGER entries_append_only;

CREATE TRIGGER rejections_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.rejections
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'A recorded rejection is final for its trace id: retry with a new trace id.');
ALTER TABLE billing.rejections ENABLE ALWAYS TRIGGER rejections_append_only;

CREATE TRIGGER account_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.account_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'The audit trail is never rewritten.');
ALTER TABLE billing.account_events ENABLE ALWAYS TRIGGER account_events_append_only;

CREATE TRIGGER accounts_no_delete
    BEFORE DELETE OR TRUNCATE ON billing.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Accounts are never deleted: close one with billing_account_update(tenant_id, status => ''closed'').');
ALTER TABLE billing.accounts ENABLE ALWAYS TRIGGER accounts_no_delete;

-- pg_dump must dump the data of extension tables, or a restore loses the ledger
SELECT pg_catalog.pg_extension_config_dump('billing.accounts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.entries', '');
SELECT pg_catalog.pg_extension_config_dump('billing.rejections', '');
SELECT pg_catalog.pg_extension_config_dump('billing.account_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.entry_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.rejection_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.account_event_id_seq', '');

-- ---------------------------------------------------------------------------
-- composite result types
-- ---------------------------------------------------------------------------

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
    created_at    timestamptz,
    sqlstate      text,         -- NULL when committed
    reason        text,
    detail        text
);

CREATE TYPE billing.verify_result AS (
    tenant_id            text,
    cached_balance       numeric,
    ledger_sum           numeric,
    entries              bigint,
    chain_breaks         bigint,
    first_break_entry_id bigint,
    problem              text
);

-- ---------------------------------------------------------------------------
-- views for reporting tools
-- ---------------------------------------------------------------------------

CREATE VIEW billing.balances AS
SELECT a.tenant_id,
       a.currency,
       a.status,
       billing.to_amount(a.balance_micros)                         AS balance,
       billing.to_amount(a.credit_limit_micros)                    AS credit_limit,
       billing.to_amount(a.balance_micros + a.credit_limit_micros) AS available,
       a.version,
       a.last_entry_at,
       a.timezone,
       a.metadata,
       a.created_at,
       a.updated_at
  FROM billing.accounts a;
COMMENT ON VIEW billing.balances IS 'one row per account: balance, credit limit, available funds, version';

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
       e.metadata->>'api_key'                    AS api_key,
       e.metadata,
       e.event_at,
       e.created_at
  FROM billing.entries e;
COMMENT ON VIEW billing.ledger IS 'readable ledger: amounts as numeric, model and api_key lifted from metadata';

CREATE VIEW billing.usage_daily AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       count(*) FILTER (WHERE e.kind = 'deduct')                                   AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind = 'deduct'), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)::bigint) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_daily IS 'per tenant and day (account time zone, by event time): charges and credits';

CREATE VIEW billing.usage_monthly AS
SELECT e.tenant_id,
       date_trunc('month', coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS month,
       count(*) FILTER (WHERE e.kind = 'deduct')                                   AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind = 'deduct'), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)::bigint) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_monthly IS 'per tenant and calendar month (account time zone, by event time): charges and credits';

CREATE VIEW billing.usage_by_model AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       e.metadata->>'model'    AS model,
       e.metadata->>'provider' AS provider,
       count(*)                AS charges,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS spent,
       sum(CASE WHEN jsonb_typeof(e.metadata->'input_tokens') = 'number'
                THEN (e.metadata->>'input_tokens')::numeric END)  AS input_tokens,
       sum(CASE WHEN jsonb_typeof(e.metadata->'output_tokens') = 'number'
                THEN (e.metadata->>'output_tokens')::numeric END) AS output_tokens
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE e.kind = 'deduct'
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_model IS 'charges per tenant, day, model and provider (from entry metadata)';

CREATE VIEW billing.usage_by_api_key AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       e.metadata->>'api_key'  AS api_key,
       count(*)                AS charges,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS spent
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE e.kind = 'deduct'
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.usage_by_api_key IS 'charges per tenant, day and api key (metadata->>''api_key'')';

-- ---------------------------------------------------------------------------
-- the SQL API: ledger (C)
-- ---------------------------------------------------------------------------

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

CREATE FUNCTION billing_deduct(tenant_id text, amount numeric, trace_id text,
                               description text DEFAULT NULL,
                               metadata jsonb DEFAULT NULL,
                               event_at timestamptz DEFAULT NULL,
                               kind text DEFAULT 'deduct')
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_deduct(text, numeric, text, text, jsonb, timestamptz, text) IS
    'charge an account; idempotent by trace_id; raises on insufficient funds';

CREATE FUNCTION billing_try_deduct(tenant_id text, amount numeric, trace_id text,
                                   description text DEFAULT NULL,
                                   metadata jsonb DEFAULT NULL,
                                   event_at timestamptz DEFAULT NULL,
                                   kind text DEFAULT 'deduct')
    RETURNS billing.charge_outcome
    AS 'MODULE_PATHNAME', 'billing_try_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text) IS
    'like billing_deduct, but a business rejection is returned and recorded (a replay returns it again)';

CREATE FUNCTION billing_balance(tenant_id text) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_balance'
    LANGUAGE C STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing_balance(text) IS 'cached balance of an account, O(1)';

-- ---------------------------------------------------------------------------
-- the SQL API: accounts, history, audit (PL/pgSQL / SQL: not on the hot path)
-- ---------------------------------------------------------------------------

-- shared checks of account settings; raise ZB015/ZB016/ZB018
CREATE FUNCTION billing.check_account_settings(tenant_id text, currency text,
                                               status text, timezone text,
                                               metadata jsonb)
    RETURNS void
    LANGUAGE plpgsql IMMUTABLE
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
        BEGIN
            PERFORM now() AT TIME ZONE timezone;
        EXCEPTION WHEN invalid_parameter_value THEN
            RAISE EXCEPTION 'invalid time zone %', quote_literal(timezone)
                USING ERRCODE = 'ZB018',
                      DETAIL = 'Daily and monthly figures are computed in the account time zone.',
                      HINT = 'Use a name from pg_timezone_names, e.g. UTC or Europe/Berlin.';
        END;
    END IF;
    IF metadata IS NOT NULL AND jsonb_typeof(metadata) <> 'object' THEN
        RAISE EXCEPTION 'metadata must be a json object'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('The value given was %s.', metadata),
                  HINT = 'Pass e.g. ''{"plan": "pro"}''::jsonb, or leave it out.';
    END IF;
END;
$$;

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
    IF billing_account_create.status = 'closed' THEN
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
    END IF;

    RETURN QUERY SELECT * FROM billing.balances b WHERE b.tenant_id = p_tenant;
END;
$$;
COMMENT ON FUNCTION billing_account_update(text, numeric, text, text, jsonb, text) IS
    'change credit limit, status, time zone or metadata; every change is recorded in billing.account_events';

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

CREATE FUNCTION billing_verify(tenant_id text DEFAULT NULL)
    RETURNS SETOF billing.verify_result
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH chain AS (
        SELECT e.tenant_id, e.entry_id, e.amount_micros, e.balance_after_micros,
               lag(e.balance_after_micros, 1, 0::bigint)
                   OVER (PARTITION BY e.tenant_id ORDER BY e.version) AS before_micros,
               e.version
          FROM billing.entries e
         WHERE $1 IS NULL OR e.tenant_id = $1
    ), per_tenant AS (
        SELECT c.tenant_id,
               sum(c.amount_micros) AS total,
               count(*) AS n,
               count(*) FILTER (WHERE c.balance_after_micros <> c.before_micros + c.amount_micros) AS breaks,
               min(c.entry_id) FILTER (WHERE c.balance_after_micros <> c.before_micros + c.amount_micros) AS first_break,
               max(c.version) AS max_version
          FROM chain c
         GROUP BY c.tenant_id
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
               ELSE 'account version is behind its entries'
           END
      FROM billing.accounts a
      FULL JOIN per_tenant p ON p.tenant_id = a.tenant_id
     WHERE ($1 IS NULL OR coalesce(a.tenant_id, p.tenant_id) = $1)
       AND (a.tenant_id IS NULL
            OR a.balance_micros <> coalesce(p.total, 0)
            OR coalesce(p.breaks, 0) > 0
            OR a.version < coalesce(p.max_version, 0))
     ORDER BY 1
$$;
COMMENT ON FUNCTION billing_verify(text) IS
    'audit: one row per account whose cached balance differs from SUM(entries) or whose balance_after chain is broken; no rows when consistent';

-- ---------------------------------------------------------------------------
-- privileges: nothing for PUBLIC but the pure helpers; see README "Privileges"
-- ---------------------------------------------------------------------------

REVOKE ALL ON FUNCTION billing_credit(text, numeric, text, text, jsonb, timestamptz, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_deduct(text, numeric, text, text, jsonb, timestamptz, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_balance(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_balance_at(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_verify(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_account_create(text, text, numeric, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_account_update(text, numeric, text, text, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing.check_account_settings(text, text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing.append_only() FROM PUBLIC;

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
    EXECUTE format('GRANT USAGE ON SCHEMA billing TO %s', role);
END;
$$;
COMMENT ON FUNCTION billing_grant_app(regrole) IS 'grant an application role EXECUTE on the billing_* API (no table rights)';

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
    FOR v IN SELECT c.oid FROM pg_class c
              WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'v'
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s', v, role);
    END LOOP;
END;
$$;
COMMENT ON FUNCTION billing_grant_reporting(regrole) IS 'grant a reporting role SELECT on the billing views (no tables, no functions)';

-- the application API, in one place for billing_grant_app()
CREATE FUNCTION billing.app_functions() RETURNS regprocedure[]
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY[
        'billing_credit(text, numeric, text, text, jsonb, timestamptz, text)',
        'billing_deduct(text, numeric, text, text, jsonb, timestamptz, text)',
        'billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text)',
        'billing_balance(text)',
        'billing_balance_at(text, timestamptz)',
        'billing_account_create(text, text, numeric, text, text, jsonb)',
        'billing_account_update(text, numeric, text, text, jsonb, text)'
    ]::regprocedure[]
$$;
REVOKE ALL ON FUNCTION billing_grant_app(regrole) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing_grant_reporting(regrole) FROM PUBLIC;
