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
