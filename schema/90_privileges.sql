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
