/*
 * 05_scopes: which tenants a reporting role may see.
 *
 * A role with rows here is scoped: every view of schema billing shows it the
 * rows of those tenants only (the views are security_barrier, so a leaky
 * function in the role's own WHERE clause cannot look at the other rows
 * either).  A role without rows sees every tenant, as before.  Set with
 * billing_scope_role() / billing_unscope_role() (admin role).
 */
CREATE TABLE billing.tenant_scopes (
    role_name   name        NOT NULL,
    tenant_id   text        NOT NULL,
    granted_by  text        NOT NULL DEFAULT billing.actor(),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenant_scopes_pkey PRIMARY KEY (role_name, tenant_id)
);
COMMENT ON TABLE billing.tenant_scopes IS 'reporting roles that may see only some tenants (no rows for a role: it sees every tenant)';
SELECT pg_catalog.pg_extension_config_dump('billing.tenant_scopes', '');

-- the tenants the calling role may see, or NULL when it is not scoped; the
-- views call it once per query (an InitPlan).  On Citus (a reference table)
-- it reads this node's copy directly: the views' queries run on the shards,
-- where a query through Citus would be a nested distributed query.
CREATE FUNCTION billing.visible_tenants() RETURNS text[]
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    copy   regclass;
    result text[];
BEGIN
    IF billing.is_citus_table('billing.tenant_scopes') THEN
        SELECT c INTO copy FROM billing.local_shards('billing.tenant_scopes') c;
        IF copy IS NOT NULL THEN
            EXECUTE format('SELECT CASE WHEN count(*) = 0 THEN NULL ELSE array_agg(s.tenant_id ORDER BY s.tenant_id) END '
                           'FROM %s s WHERE s.role_name = billing.actor()', copy)
               INTO result;
            RETURN result;
        END IF;
    END IF;
    RETURN (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE array_agg(s.tenant_id ORDER BY s.tenant_id) END
              FROM billing.tenant_scopes s
             WHERE s.role_name = billing.actor());
END;
$$;
COMMENT ON FUNCTION billing.visible_tenants() IS 'tenants the calling role may see in the views (NULL: all)';
