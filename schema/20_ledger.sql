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
    actor                text,       -- the role that asked for it (1.4; NULL before)
    grant_id             bigint,     -- 1.4: a grant's credit or expiry: its bucket
    draws                bigint[],   -- 1.4: grant buckets a debit drew from (a refund gave back): id, amount, ...
    refund_of            bigint,     -- 1.4: a refund: the entry_id of the charge
    CONSTRAINT entries_pkey PRIMARY KEY (tenant_id, entry_id),
    CONSTRAINT entries_trace_key UNIQUE (tenant_id, trace_id)
    -- kind IN (topup, grant, refund, adjustment, deduct, capture) and
    -- amount_micros <> 0 are guaranteed by the functions (see accounts)
);
ALTER SEQUENCE billing.entry_id_seq OWNED BY billing.entries.entry_id;
COMMENT ON TABLE billing.entries IS 'append-only ledger: one row per money movement; amount signed (debits negative)';
COMMENT ON COLUMN billing.entries.actor IS 'the role that asked for the entry (the session role after SET ROLE; NULL for entries written before 1.4)';
COMMENT ON COLUMN billing.entries.grant_id IS 'kind grant: the bucket it filled; kind expire: the bucket that expired';
COMMENT ON COLUMN billing.entries.draws IS 'a debit: the grant buckets it drew from; a refund: those it gave back to (grant_id, amount pairs; the wallet is the rest)';
COMMENT ON COLUMN billing.entries.refund_of IS 'a refund: the entry_id of the charge it refunds';

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

CREATE FUNCTION @extschema@.billing_credit(tenant_id text, amount numeric, trace_id text,
                               description text DEFAULT NULL,
                               metadata jsonb DEFAULT NULL,
                               event_at timestamptz DEFAULT NULL,
                               kind text DEFAULT 'topup')
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_credit'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_credit(text, numeric, text, text, jsonb, timestamptz, text) IS
    'add money (kind topup, grant, refund or adjustment); idempotent by trace_id';

REVOKE ALL ON FUNCTION @extschema@.billing_credit(text, numeric, text, text, jsonb, timestamptz, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_deduct(tenant_id text, amount numeric, trace_id text,
                               description text DEFAULT NULL,
                               metadata jsonb DEFAULT NULL,
                               event_at timestamptz DEFAULT NULL,
                               kind text DEFAULT 'deduct',
                               api_key text DEFAULT NULL)
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) IS
    'charge an account (optionally through an API key); idempotent by trace_id; raises on insufficient funds, quotas, caps';
REVOKE ALL ON FUNCTION @extschema@.billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) FROM PUBLIC;

-- billing_deduct under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_deduct(tenant_id text, amount numeric, trace_id text,
                                  description text DEFAULT NULL,
                                  metadata jsonb DEFAULT NULL,
                                  event_at timestamptz DEFAULT NULL,
                                  kind text DEFAULT 'deduct',
                                  api_key text DEFAULT NULL,
                                  counts_request boolean DEFAULT true)
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_deduct(text, numeric, text, text, jsonb, timestamptz, text, text, boolean) IS
    'billing_deduct for the extension''s own SQL (internal); counts_request => false: no new request (a job''s charge, whose hold counted it)';
REVOKE ALL ON FUNCTION billing.internal_deduct(text, numeric, text, text, jsonb, timestamptz, text, text, boolean) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_try_deduct(tenant_id text, amount numeric, trace_id text,
                                   description text DEFAULT NULL,
                                   metadata jsonb DEFAULT NULL,
                                   event_at timestamptz DEFAULT NULL,
                                   kind text DEFAULT 'deduct',
                                   api_key text DEFAULT NULL)
    RETURNS billing.charge_outcome
    AS 'MODULE_PATHNAME', 'billing_try_deduct'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) IS
    'like billing_deduct, but a business rejection is returned and recorded (a replay returns it again)';
REVOKE ALL ON FUNCTION @extschema@.billing_try_deduct(text, numeric, text, text, jsonb, timestamptz, text, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_deduct_many(tenant_ids text[], amounts numeric[], trace_ids text[],
                                    descriptions text[] DEFAULT NULL,
                                    metadata jsonb[] DEFAULT NULL,
                                    api_keys text[] DEFAULT NULL,
                                    on_reject text DEFAULT 'raise')
    RETURNS SETOF billing.charge_outcome
    AS 'MODULE_PATHNAME', 'billing_deduct_many'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_deduct_many(text[], numeric[], text[], text[], jsonb[], text[], text) IS
    'charge many items in one call (same rules per item); on_reject raise: a rejection aborts the batch, record: returned per item';
REVOKE ALL ON FUNCTION @extschema@.billing_deduct_many(text[], numeric[], text[], text[], jsonb[], text[], text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_balance(tenant_id text) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_balance'
    LANGUAGE C STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_balance(text) IS 'cached balance of an account, O(1)';
REVOKE ALL ON FUNCTION @extschema@.billing_balance(text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_balance_at(tenant_id text, at timestamptz) RETURNS numeric
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    total numeric;
    acc   billing.accounts;
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
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_balance_at.tenant_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', billing_balance_at.tenant_id
            USING ERRCODE = 'ZB001',
                  HINT = format('Create it first with billing_account_create(%L).', billing_balance_at.tenant_id);
    END IF;
    -- An expiry counts from the moment the grant expired (its event_at), even
    -- when its entry was written later; a grant that expired by then but whose
    -- entry is not written yet still holds its remainder in grants_state (and
    -- holds that expired by then, what they had reserved of it).
    SELECT coalesce(sum(e.amount_micros), 0) INTO total
      FROM billing.entries e
     WHERE e.tenant_id = billing_balance_at.tenant_id
       AND CASE WHEN e.kind = 'expire' THEN LEAST(e.event_at, e.created_at)
                ELSE e.created_at END <= billing_balance_at.at;
    -- (of the row read above: on Citus a query's rows are of the shard's type)
    RETURN billing.to_amount((total - billing.expired_micros(acc, billing_balance_at.at))::bigint);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_balance_at(text, timestamptz) IS
    'balance at a point in time: SUM of the entries created up to then, grants that had expired by then taken off';
REVOKE ALL ON FUNCTION @extschema@.billing_balance_at(text, timestamptz) FROM PUBLIC;

CREATE VIEW billing.ledger WITH (security_barrier) AS
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
       e.created_at,
       e.actor,
       e.grant_id,
       e.refund_of
  FROM billing.entries e
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
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
                   first_break bigint, max_version bigint, invalid bigint,
                   grants bigint[], grants_negative bigint)
    AS 'MODULE_PATHNAME', 'billing_verify_entries'
    LANGUAGE C STABLE;

COMMENT ON FUNCTION billing.verify_entries(text) IS
    'per-tenant facts of the ledger in one pass (internal: billing_verify); NULL: every tenant';

REVOKE ALL ON FUNCTION billing.verify_entries(text) FROM PUBLIC;

-- the checks of billing_verify() on this node's tenants (all, or one): over
-- the tables, or on Citus over the shards placed on this node (each tenant
-- lives in one shard of each table, all on one node); on Citus also one row
-- per local table of a Citus table that still holds rows, outside every
-- shard (nothing reads them; a migration left them)
CREATE FUNCTION billing.verify_local(tenant_id text)
    RETURNS SETOF billing.verify_result
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    -- no JIT: the grant-state arrays' generate_series is estimated at 1,000
    -- rows per account, which puts this plan over jit_optimize_above_cost,
    -- and compiling it took 0.8 s of a 1 s audit of 300,000 entries; the
    -- work is in verify_entries (C), which JIT does not speed up
    SET jit = off
AS $$
DECLARE
    src  text[] := '{}';
    t    regclass;
    n    bigint;
BEGIN
    -- each table as this node holds it: the table itself, or the union of
    -- its shards placed here (colocated: a tenant's rows are all here or
    -- all elsewhere); none, no tenant of this node to check
    FOREACH t IN ARRAY ARRAY['billing.accounts', 'billing.holds', 'billing.jobs', 'billing.entries']::regclass[] LOOP
        src := src || (SELECT CASE WHEN NOT billing.is_distributed(t) THEN t::text
                                   ELSE '(' || string_agg(format('SELECT * FROM %s', s), ' UNION ALL ') || ')' END
                         FROM billing.local_shards(t) s);
    END LOOP;
    IF array_position(src, NULL) IS NULL THEN
        RETURN QUERY EXECUTE format($q$
    WITH per_tenant AS (
        SELECT * FROM billing.verify_entries($1)
    )
    , holds AS (
        SELECT h.tenant_id,
               sum(h.amount_micros - h.captured_micros - h.released_micros) AS open_micros
          FROM %2$s h
         WHERE h.status = 'open' AND ($1 IS NULL OR h.tenant_id = $1)
         GROUP BY h.tenant_id
    )
    -- what each grant bucket holds by the account (remaining and reserved by
    -- holds): the ledger's replay (verify_entries) must say the same
    , state AS (
        SELECT a.tenant_id, a.grants_state[i] AS g, a.grants_state[i + 1] AS remaining,
               a.grants_state[i + 2] AS reserved
          FROM %1$s a,
               generate_series(1, coalesce(array_length(a.grants_state, 1), 0), 5) AS i
         WHERE $1 IS NULL OR a.tenant_id = $1
    )
    , grants AS (
        SELECT s.tenant_id, array_agg(v.x ORDER BY s.g, v.k) AS state
          FROM state s, LATERAL (VALUES (1, s.g), (2, s.remaining + s.reserved)) AS v(k, x)
         WHERE s.remaining + s.reserved <> 0
         GROUP BY 1
    )
    -- and what it says open holds reserved must be what they did
    , reservations AS (
        SELECT coalesce(s.tenant_id, o.tenant_id) AS tenant_id
          FROM (SELECT * FROM state WHERE reserved <> 0) s
          FULL JOIN (SELECT h.tenant_id, h.grant_draws[i] AS g, sum(h.grant_draws[i + 1]) AS reserved
                       FROM %2$s h,
                            generate_series(1, coalesce(array_length(h.grant_draws, 1), 0), 2) AS i
                      WHERE h.status = 'open'
                        AND ($1 IS NULL OR h.tenant_id = $1)
                      GROUP BY 1, 2) o
            ON o.tenant_id = s.tenant_id AND o.g = s.g
         WHERE s.reserved IS DISTINCT FROM o.reserved
         GROUP BY 1
    )
    -- finished jobs against their charge and hold (what the job guard checks
    -- as each job changes; a restore loads jobs without their order): one
    -- index probe per finished job, not a second pass over the ledger
    , jobs AS (
        SELECT j.tenant_id, count(*) AS bad
          FROM %3$s j
         WHERE j.state IN ('completed', 'failed', 'cancelled')
           AND ($1 IS NULL OR j.tenant_id = $1)
           AND ((j.state = 'completed'
                 AND CASE WHEN j.charge_entry_id IS NULL THEN j.actual_micros IS DISTINCT FROM 0
                          ELSE NOT EXISTS (SELECT FROM %4$s e
                                            WHERE e.tenant_id = j.tenant_id AND e.entry_id = j.charge_entry_id
                                              AND e.trace_id = format('job:%%s:charge', j.job_id)
                                              AND e.amount_micros = -j.actual_micros) END)
                OR EXISTS (SELECT FROM %2$s h
                            WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
                              AND h.status = 'open' AND h.expires_at > now()))
         GROUP BY j.tenant_id
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
               WHEN coalesce(p.grants_negative, 0) > 0 THEN 'a grant bucket went below zero'
               WHEN coalesce(p.grants, '{}') <> coalesce(g.state, '{}') THEN 'grant buckets differ from the ledger'
               WHEN r.tenant_id IS NOT NULL THEN 'grant reservations differ from the open holds'
               WHEN a.holds_micros <> coalesce(h.open_micros, 0) THEN 'cached holds differ from the open holds'
               ELSE 'finished jobs without their own charge or with their hold open'
           END
      FROM %1$s a
      FULL JOIN per_tenant p ON p.tenant_id = a.tenant_id
      LEFT JOIN holds h ON h.tenant_id = a.tenant_id
      LEFT JOIN grants g ON g.tenant_id = a.tenant_id
      LEFT JOIN reservations r ON r.tenant_id = a.tenant_id
      LEFT JOIN jobs jb ON jb.tenant_id = a.tenant_id
     WHERE ($1 IS NULL OR coalesce(a.tenant_id, p.tenant_id) = $1)
       AND (a.tenant_id IS NULL
            OR a.balance_micros <> coalesce(p.total, 0)
            OR coalesce(p.breaks, 0) > 0
            OR a.version < coalesce(p.max_version, 0)
            OR coalesce(p.invalid, 0) > 0
            OR coalesce(p.grants_negative, 0) > 0
            OR coalesce(p.grants, '{}') <> coalesce(g.state, '{}')
            OR r.tenant_id IS NOT NULL
            OR a.holds_micros <> coalesce(h.open_micros, 0)
            OR jb.bad > 0)
     ORDER BY 1
    $q$, src[1], src[2], src[3], src[4]) USING verify_local.tenant_id;
    END IF;
    -- Citus: rows in a Citus table's local heap are read by no one
    IF billing.is_distributed('billing.accounts') THEN
        FOREACH t IN ARRAY billing.tenant_tables() || ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[] LOOP
            n := billing.shell_rows(t);
            IF n > 0 THEN
                RETURN NEXT ROW(NULL, NULL, NULL, n, 0, NULL,
                                format('%s rows left in the local table %s of node group %s, outside every shard: SELECT billing.citus_clear_local_rows() on that node',
                                       n, t, billing.local_group()))::billing.verify_result;
            END IF;
        END LOOP;
    END IF;
END;
$$;
COMMENT ON FUNCTION billing.verify_local(text) IS
    'the checks of billing_verify() on this node''s tenants (internal); on Citus also rows left in local tables';
REVOKE ALL ON FUNCTION billing.verify_local(text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_verify(tenant_id text DEFAULT NULL)
    RETURNS SETOF billing.verify_result
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r      record;
    found  jsonb := '[]';
    failed text;
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
    -- one tenant (on Citus the call runs on its node), or a single node
    IF billing_verify.tenant_id IS NOT NULL OR NOT billing.is_distributed('billing.accounts') THEN
        RETURN QUERY SELECT * FROM billing.verify_local(billing_verify.tenant_id);
        RETURN;
    END IF;
    -- Citus: every node checks its own shards (and its local tables); a
    -- node that cannot be asked fails the audit, which must not look clean
    FOR r IN SELECT * FROM run_command_on_all_nodes(
                 'SELECT coalesce(pg_catalog.json_agg(v), ''[]'') FROM billing.verify_local(NULL) v')
    LOOP
        IF r.success THEN
            found := found || r.result::jsonb;
        ELSE
            failed := concat_ws('; ', failed, format('node %s: %s', r.nodeid, r.result));
        END IF;
    END LOOP;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'billing_verify() could not check every node'
            USING ERRCODE = 'ZB104', DETAIL = billing.show(failed, 1000),
                  HINT = 'Bring the node back (or remove it from the cluster) and verify again.';
    END IF;
    RETURN QUERY
        SELECT v.* FROM jsonb_populate_recordset(NULL::billing.verify_result, found) v ORDER BY 1, 7;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_verify(text) IS
    'audit: one row per account whose cached balance differs from SUM(entries), whose balance_after chain is broken, whose version lags its entries, with invalid entries, whose grant buckets differ from what the ledger says (or went below zero) or from what open holds reserved, whose cached holds differ from its open holds, or with a finished job without its own charge or with its hold open; on Citus also rows left in local tables; no rows when consistent';
REVOKE ALL ON FUNCTION @extschema@.billing_verify(text) FROM PUBLIC;
