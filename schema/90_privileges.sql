/*
 * 90_privileges: the roles of a payments system, and one grant helper each.
 *
 *   charging   charges, holds, jobs, balance reads: what an application that
 *              sells metered work needs; it cannot put money into an account
 *   treasury   money in: credits of every kind (top-ups, grants with expiry
 *              and priority, refunds of charges, adjustments), balance reads
 *   admin      accounts (credit limits, status), limits, API keys, prices,
 *              tenant scopes of reporting roles, the audit
 *   reporting  SELECT on the views of schema billing, optionally scoped to
 *              some tenants (billing_scope_role)
 *
 * No role gets table rights: every write goes through the SECURITY DEFINER
 * functions, which run as the extension's owner with a pinned search_path
 * and record the role that asked (billing.actor()).  Nothing is granted to
 * PUBLIC but the pure helpers.  The grant helpers run with the caller's
 * rights, so only a role allowed to grant (the extension owner, a
 * superuser) can use them.
 */

-- the functions of each role, in one place
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

-- grant one role kind to a role (the helpers below)
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

CREATE FUNCTION @extschema@.billing_grant_reporting(role regrole) RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT billing.grant_role(role, 'reporting') $$;
COMMENT ON FUNCTION @extschema@.billing_grant_reporting(regrole) IS 'grant a reporting role SELECT on the billing views (no tables); see billing_scope_role() to limit it to some tenants';
REVOKE ALL ON FUNCTION @extschema@.billing_grant_reporting(regrole) FROM PUBLIC;

-- 1.3's name for the application role: now the charging role only
CREATE FUNCTION @extschema@.billing_grant_app(role regrole) RETURNS void
    LANGUAGE sql
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT billing.grant_role(role, 'charging') $$;
COMMENT ON FUNCTION @extschema@.billing_grant_app(regrole) IS 'deprecated: billing_grant_charging() (since 1.4 the application role cannot credit or change settings)';
REVOKE ALL ON FUNCTION @extschema@.billing_grant_app(regrole) FROM PUBLIC;

-- take every billing right away from a role
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

-- tenant scopes of reporting roles (admin)
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
