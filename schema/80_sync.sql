/* 80_sync: the Redis mirror's database side, and the worker's periodic maintenance */

CREATE FUNCTION billing.sync_mark(tenant_id text) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_sync_mark_sql'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.sync_mark(text) IS 'mark a tenant changed: pushed to Redis after this transaction commits';
REVOKE ALL ON FUNCTION billing.sync_mark(text) FROM PUBLIC;

CREATE FUNCTION billing.sync_mark_keys(tenant_id text, since bigint, key_ids text[]) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_sync_mark_keys_sql'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.sync_mark_keys(text, bigint, text[]) IS 'mark a tenant changed from account version since on, and the API keys whose Redis hashes changed (NULL: those whose api_keys.version is above since)';
REVOKE ALL ON FUNCTION billing.sync_mark_keys(text, bigint, text[]) FROM PUBLIC;

CREATE FUNCTION billing.expire_holds_of(tenant_id text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_expire_holds_of'
    LANGUAGE C VOLATILE;
REVOKE ALL ON FUNCTION billing.expire_holds_of(text) FROM PUBLIC;

CREATE FUNCTION billing.expire_due_holds(max_accounts integer DEFAULT 1000) RETURNS integer
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
REVOKE ALL ON FUNCTION billing.expire_due_holds(integer) FROM PUBLIC;

-- SECURITY DEFINER: a worker running as billing.worker_role (not a
-- superuser) needs EXECUTE on this function only to do the maintenance
CREATE FUNCTION billing.maintenance() RETURNS jsonb
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
    recent_lag_p99_ms   double precision,
    -- 1.4: the outbox (schema/75_events.sql)
    events_backlog      bigint,       -- events not yet delivered to Redis
    events_lag          interval,     -- age of the oldest of them (0 when none)
    events_delivered    bigint,       -- delivered since the server started
    events_last_delivered_at timestamptz,
    events_recent_lag_p50_ms double precision,
    events_recent_lag_p99_ms double precision,
    events_last_error   text,         -- the delivery's last error (NULL for a scoped role)
    events_last_error_at timestamptz
);

-- SECURITY DEFINER: it reads the outbox's backlog for every caller
CREATE FUNCTION @extschema@.billing_sync_status() RETURNS billing.sync_info
    AS 'MODULE_PATHNAME', 'billing_sync_status'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_sync_status() IS 'state of the Redis mirror: connected, lag, pushes, errors, last full resync';
REVOKE ALL ON FUNCTION @extschema@.billing_sync_status() FROM PUBLIC;

CREATE VIEW billing.sync_status AS SELECT * FROM @extschema@.billing_sync_status();
COMMENT ON VIEW billing.sync_status IS 'state of the Redis mirror (one row), for dashboards';

/*
 * The rights of a background worker that connects as billing.worker_role
 * instead of the bootstrap superuser (README, docs/security.md): read the
 * three tables a snapshot is built from, build snapshots, run the
 * maintenance (SECURITY DEFINER).  The role also needs LOGIN (PostgreSQL 15
 * and 16) and CONNECT on the database, which are not the extension's to
 * grant.  Runs with the caller's rights, like the other grant helpers.
 */
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
