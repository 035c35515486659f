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
    -- 1.4: how many of the account's alert_percents of the budget were
    -- announced (quota.threshold) in the current budget period
    alert_levels        integer     NOT NULL DEFAULT 0,
    version             bigint      NOT NULL DEFAULT 0,
    CONSTRAINT api_keys_pkey PRIMARY KEY (tenant_id, key_id),
    CONSTRAINT api_keys_status_check CHECK (status IN ('active', 'suspended', 'revoked')),
    CONSTRAINT api_keys_budget_check CHECK ((budget_micros IS NULL) = (budget_period IS NULL) AND budget_micros >= 0),
    CONSTRAINT api_keys_period_check CHECK (budget_period IN ('day', 'month', 'lifetime'))
);
COMMENT ON TABLE billing.api_keys IS 'API keys of an account, with an optional budget per day, month or lifetime';
COMMENT ON COLUMN billing.api_keys.version IS 'the account version of the last change of the key''s Redis hash (its version there): the worker pushes the keys that changed, not every key of the account';
SELECT pg_catalog.pg_extension_config_dump('billing.api_keys', '');

CREATE VIEW billing.api_key_budgets WITH (security_barrier) AS
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

CREATE FUNCTION @extschema@.billing_api_key_create(tenant_id text, key_id text,
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
REVOKE ALL ON FUNCTION @extschema@.billing_api_key_create(text, text, numeric, text, jsonb) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_api_key_update(tenant_id text, key_id text,
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
COMMENT ON FUNCTION @extschema@.billing_api_key_update(text, text, text, numeric, text, boolean) IS
    'change an API key: status (active, suspended, revoked — final), budget and period, or remove_budget';
REVOKE ALL ON FUNCTION @extschema@.billing_api_key_update(text, text, text, numeric, text, boolean) FROM PUBLIC;
