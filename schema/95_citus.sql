/*
 * 95_citus: billing on a Citus cluster, distributed by tenant (issue 15;
 * docs/scaling.md).
 *
 * Nothing changes on a single node: every per-node function treats a table
 * that Citus does not distribute as its own only "shard".  On Citus:
 *
 * - billing.citus_distribute() (on the coordinator, once) distributes the
 *   tables of billing.tenant_tables() by tenant_id, colocated with
 *   billing.accounts; makes billing.prices and billing.tenant_scopes
 *   reference tables; distributes every billing_* function with a tenant_id
 *   argument by it (force_delegation: Citus runs the call on the tenant's
 *   node, also inside a transaction block); removes the rows
 *   create_distributed_table leaves in the coordinator's local tables; and
 *   gives every node its own range of ids (billing.citus_node_setup()).
 * - The direct path of a charge (src/citus.c) writes the tenant's shard on
 *   this node, or refuses (ZB100); it never writes a local ("shell") table.
 * - Work that is not about one tenant runs on each node over the shards
 *   placed there (billing.local_shards()): hold and grant expiry, job rescue
 *   (the background worker of every node), untargeted billing_job_claim(),
 *   the Redis mirror's resync pages, and billing_verify(), which the
 *   coordinator gathers from every node.
 */

-- the relations of a table on this node: the table itself, or (Citus) its
-- shards placed here, nothing on a node without any
CREATE FUNCTION billing.local_shards(tbl regclass) RETURNS SETOF regclass
    AS 'MODULE_PATHNAME', 'billing_local_shards_sql'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.local_shards(regclass) IS 'the relations of a billing table on this node: the table itself, or (Citus) its shards placed here';
REVOKE ALL ON FUNCTION billing.local_shards(regclass) FROM PUBLIC;

CREATE FUNCTION billing.is_distributed(tbl regclass) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_is_distributed_sql'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.is_distributed(regclass) IS 'is the table distributed by Citus (by hash)?';
REVOKE ALL ON FUNCTION billing.is_distributed(regclass) FROM PUBLIC;

CREATE FUNCTION billing.is_citus_table(tbl regclass) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_is_citus_table_sql'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.is_citus_table(regclass) IS 'is the table any Citus table (distributed or reference)?';
REVOKE ALL ON FUNCTION billing.is_citus_table(regclass) FROM PUBLIC;

CREATE FUNCTION billing.shell_rows(tbl regclass) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_shell_rows'
    LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION billing.shell_rows(regclass) IS 'rows in the local heap of a table, read directly (for a Citus table: rows nothing reads, left by a migration)';
REVOKE ALL ON FUNCTION billing.shell_rows(regclass) FROM PUBLIC;

-- the tables distributed by tenant_id, billing.accounts first (the others
-- are colocated with it)
CREATE FUNCTION billing.tenant_tables() RETURNS regclass[]
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY['billing.accounts', 'billing.entries', 'billing.rejections',
                 'billing.account_events', 'billing.holds', 'billing.hold_events',
                 'billing.api_keys', 'billing.jobs', 'billing.job_events',
                 'billing.grants', 'billing.refunds', 'billing.price_overrides']::regclass[]
$$;
COMMENT ON FUNCTION billing.tenant_tables() IS 'the tables Citus distributes by tenant_id (billing.accounts first; the others colocated with it)';
REVOKE ALL ON FUNCTION billing.tenant_tables() FROM PUBLIC;

-- this node's Citus group (0: the coordinator), NULL without Citus
CREATE FUNCTION billing.local_group() RETURNS integer
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g);
END;
$$;
COMMENT ON FUNCTION billing.local_group() IS 'this node''s Citus group id (0 on the coordinator), NULL without Citus';
REVOKE ALL ON FUNCTION billing.local_group() FROM PUBLIC;

/*
 * This node's own range of every id sequence of billing, as Citus numbers
 * bigserial columns of distributed tables: group g (0: the coordinator)
 * numbers from g * 2^48 + 1 to (g + 1) * 2^48 - 1, never below what the
 * sequence already handed out.  Ids stay unique across the nodes, also for
 * a tenant whose shard moves.  Idempotent: billing.maintenance() (the
 * background worker of every node) runs it each round, so a node added
 * later sets itself up; a charge refuses (ZB101) until then.
 */
CREATE FUNCTION billing.citus_node_setup() RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    g      bigint := billing.local_group();
    seq    regclass;
    lo     bigint;
    hi     bigint;
    last   bigint;
    called boolean;
    nxt    bigint;
    result jsonb := '{}';
BEGIN
    IF g IS NULL OR g OPERATOR(pg_catalog.<) 0 THEN
        RETURN pg_catalog.jsonb_build_object('group', g);
    END IF;
    lo := g OPERATOR(pg_catalog.*) (1::bigint OPERATOR(pg_catalog.<<) 48) OPERATOR(pg_catalog.+) 1;
    hi := (g OPERATOR(pg_catalog.+) 1) OPERATOR(pg_catalog.*) (1::bigint OPERATOR(pg_catalog.<<) 48)
          OPERATOR(pg_catalog.-) 1;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_sequence s
                     JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) s.seqrelid
                    WHERE c.relnamespace OPERATOR(pg_catalog.=) 'billing'::regnamespace
                      AND (s.seqmin OPERATOR(pg_catalog.<>) lo OR s.seqmax OPERATOR(pg_catalog.<>) hi)) THEN
        RETURN pg_catalog.jsonb_build_object('group', g, 'next', 'unchanged');
    END IF;
    -- the extension's sequences, on this node only
    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
    FOR seq IN SELECT c.oid FROM pg_catalog.pg_class c
                WHERE c.relnamespace OPERATOR(pg_catalog.=) 'billing'::regnamespace
                  AND c.relkind OPERATOR(pg_catalog.=) 'S'
                ORDER BY c.relname
    LOOP
        -- the sequence's lock first (a no-op ALTER takes it): a nextval()
        -- of another transaction between the read and the RESTART below
        -- would be handed out again
        EXECUTE pg_catalog.format('ALTER SEQUENCE %s NO CYCLE', seq);
        EXECUTE pg_catalog.format('SELECT last_value, is_called FROM %s', seq) INTO last, called;
        nxt := pg_catalog.int8larger(lo, CASE WHEN called THEN last OPERATOR(pg_catalog.+) 1 ELSE last END);
        IF nxt OPERATOR(pg_catalog.>) hi THEN
            RAISE EXCEPTION 'sequence % is beyond the id range of node group %', seq, g
                USING ERRCODE = 'ZB101',
                      DETAIL = pg_catalog.format('Its next value is %s; the range is %s to %s.', nxt, lo, hi),
                      HINT = 'Each node numbers from group * 2^48; see docs/scaling.md.';
        END IF;
        EXECUTE pg_catalog.format('ALTER SEQUENCE %s MINVALUE %s MAXVALUE %s START WITH %s RESTART WITH %s',
                                  seq, lo, hi, nxt, nxt);
        result := result OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(seq::text, nxt);
    END LOOP;
    RETURN pg_catalog.jsonb_build_object('group', g, 'next', result);
END;
$$;
COMMENT ON FUNCTION billing.citus_node_setup() IS 'Citus: give this node its own range of billing''s ids (group * 2^48 on); idempotent';
REVOKE ALL ON FUNCTION billing.citus_node_setup() FROM PUBLIC;

/*
 * Empty this node's local ("shell") tables of billing's Citus tables: rows
 * nothing reads or writes, left by create_distributed_table (on the
 * coordinator) or present on a node that held billing data before it
 * joined the cluster.  This node only: DDL propagation is off for the
 * TRUNCATE, so the shards are not touched (their triggers would refuse);
 * billing.append_only() lets a TRUNCATE of a Citus table's own heap through.
 */
CREATE FUNCTION billing.citus_clear_local_rows() RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t       regclass;
    n       bigint;
    cleared jsonb := '{}';
BEGIN
    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
    FOREACH t IN ARRAY billing.tenant_tables()
                       OPERATOR(pg_catalog.||) ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[] LOOP
        IF billing.is_citus_table(t) THEN
            n := billing.shell_rows(t);
            IF n OPERATOR(pg_catalog.>) 0 THEN
                EXECUTE pg_catalog.format('TRUNCATE %s', t);
                cleared := cleared OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(t::text, n);
            END IF;
        END IF;
    END LOOP;
    RETURN cleared;
END;
$$;
COMMENT ON FUNCTION billing.citus_clear_local_rows() IS 'Citus: remove the rows of this node''s local tables of billing''s Citus tables (rows nothing reads, left by a migration)';
REVOKE ALL ON FUNCTION billing.citus_clear_local_rows() FROM PUBLIC;

/*
 * Distribute billing on a Citus cluster: the whole migration, in one
 * transaction on the coordinator (docs/scaling.md).  Charges may run
 * meanwhile: they wait for the table locks, then are routed to the shards
 * (a charge that had already chosen a local table chooses again, or is
 * refused with 40001).  Rows already in the tables are copied into the
 * shards and removed from the local tables; nothing is left where a charge
 * could read or write it (ZB102 otherwise).
 */
CREATE FUNCTION billing.citus_distribute(shard_count integer DEFAULT NULL)
    RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t      regclass;
    f      regprocedure;
    nfun   integer := 0;
    left_  bigint;
    setup  jsonb;
    failed text;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = 'ZB101',
                  DETAIL = 'billing.citus_distribute() distributes billing''s tables with Citus.',
                  HINT = 'CREATE EXTENSION citus on every node and add the workers (citus_add_node) first.';
    END IF;
    IF billing.local_group() OPERATOR(pg_catalog.<>) 0 THEN
        RAISE EXCEPTION 'billing.citus_distribute() runs on the coordinator'
            USING ERRCODE = 'ZB101',
                  DETAIL = pg_catalog.format('This node is in Citus group %s; the coordinator is group 0.', billing.local_group()),
                  HINT = 'Connect to the coordinator.';
    END IF;
    -- billing's triggers (append-only tables, the job state machine) must
    -- be created on the shards and fire there: every node needs the setting
    SELECT pg_catalog.string_agg(pg_catalog.format('node %s: %s', r.nodeid, r.result), '; ' ORDER BY r.nodeid)
      INTO failed
      FROM run_command_on_all_nodes('SHOW citus.enable_unsafe_triggers') r
     WHERE NOT r.success OR r.result OPERATOR(pg_catalog.<>) 'on';
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'citus.enable_unsafe_triggers must be on on every node'
            USING ERRCODE = 'ZB101',
                  DETAIL = pg_catalog.format('billing''s append-only and job triggers must fire on the shards; found: %s.', failed),
                  HINT = 'Set citus.enable_unsafe_triggers = on in postgresql.conf of every node and reload.';
    END IF;
    -- every node its own range of ids.  Before the lock below: each node
    -- runs it in a transaction of its own, the coordinator too (over a
    -- connection of its own), whose ALTER SEQUENCE waits for the
    -- transactions that took an id; one of them waiting for our lock would
    -- make a cycle PostgreSQL cannot see (one side waits on a socket).
    SELECT pg_catalog.jsonb_object_agg(r.nodeid, CASE WHEN r.success THEN r.result::jsonb ELSE pg_catalog.to_jsonb(r.result) END),
           pg_catalog.string_agg(pg_catalog.format('node %s: %s', r.nodeid, r.result), '; ')
               FILTER (WHERE NOT r.success)
      INTO setup, failed
      FROM run_command_on_all_nodes('SELECT billing.citus_node_setup()') r;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'billing.citus_node_setup() failed on a node'
            USING ERRCODE = 'ZB101', DETAIL = failed,
                  HINT = 'Nothing was distributed; fix that node and call billing.citus_distribute() again.';
    END IF;
    -- one placement per shard: the direct path writes a tenant's rows on its node
    PERFORM pg_catalog.set_config('citus.shard_replication_factor', '1', true);
    -- no charge writes while the tables move (they wait, then are routed)
    LOCK TABLE billing.accounts, billing.entries, billing.rejections, billing.holds,
               billing.hold_events, billing.api_keys, billing.account_events, billing.prices,
               billing.jobs, billing.job_events, billing.grants, billing.refunds,
               billing.price_overrides, billing.tenant_scopes
        IN EXCLUSIVE MODE;
    IF NOT billing.is_citus_table('billing.prices') THEN
        PERFORM create_reference_table('billing.prices');
    END IF;
    IF NOT billing.is_citus_table('billing.tenant_scopes') THEN
        PERFORM create_reference_table('billing.tenant_scopes');
    END IF;
    IF NOT billing.is_distributed('billing.accounts') THEN
        PERFORM create_distributed_table('billing.accounts', 'tenant_id',
                                         shard_count => coalesce(shard_count,
                                                                 pg_catalog.current_setting('citus.shard_count')::integer));
    END IF;
    FOREACH t IN ARRAY (billing.tenant_tables())[2:] LOOP
        IF NOT billing.is_distributed(t) THEN
            PERFORM create_distributed_table(t, 'tenant_id', colocate_with => 'billing.accounts');
        END IF;
    END LOOP;
    -- every billing_* function that takes a tenant runs on the tenant's node
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::regclass
               AND d.objid OPERATOR(pg_catalog.=) p.oid AND d.deptype OPERATOR(pg_catalog.=) 'e'
          JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
               AND e.extname OPERATOR(pg_catalog.=) 'billing'
         WHERE 'tenant_id' OPERATOR(pg_catalog.=) ANY (p.proargnames)
           AND p.pronamespace OPERATOR(pg_catalog.=) e.extnamespace
         ORDER BY 1
    LOOP
        PERFORM create_distributed_function(f, 'tenant_id', colocate_with => 'billing.accounts',
                                            force_delegation => true);
        nfun := nfun OPERATOR(pg_catalog.+) 1;
    END LOOP;
    -- the rows create_distributed_table copied stay in the local heaps
    FOREACH t IN ARRAY billing.tenant_tables()
                       OPERATOR(pg_catalog.||) ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[] LOOP
        PERFORM truncate_local_data_after_distributing_table(t);
    END LOOP;
    SELECT pg_catalog.sum(billing.shell_rows(x)) INTO left_
      FROM pg_catalog.unnest(billing.tenant_tables()
                             OPERATOR(pg_catalog.||) ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[]) x;
    IF left_ OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION '% rows are still in local tables after the distribution', left_
            USING ERRCODE = 'ZB102',
                  DETAIL = 'A charge must never read or write a row outside the shards.',
                  HINT = 'Nothing was distributed (the transaction rolled back); look for a trigger or rule that writes billing''s tables.';
    END IF;
    RETURN pg_catalog.jsonb_build_object('tables', pg_catalog.cardinality(billing.tenant_tables()) OPERATOR(pg_catalog.+) 2,
                                         'functions', nfun, 'nodes', setup);
END;
$$;
COMMENT ON FUNCTION billing.citus_distribute(integer) IS 'Citus: distribute billing by tenant (tables, reference tables, functions), remove the rows left in local tables, give every node its id range; on the coordinator, once';
REVOKE ALL ON FUNCTION billing.citus_distribute(integer) FROM PUBLIC;
