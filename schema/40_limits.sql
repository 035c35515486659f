/* 40_limits: quotas, spending caps, per-charge maximum, rate limit */

CREATE VIEW billing.quota_usage WITH (security_barrier) AS
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
REVOKE ALL ON FUNCTION billing.check_count(bigint, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_limits_set(tenant_id text,
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
REVOKE ALL ON FUNCTION @extschema@.billing_limits_set(text, bigint, bigint, numeric, numeric, numeric, bigint, text) FROM PUBLIC;
