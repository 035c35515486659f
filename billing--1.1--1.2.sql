/* billing--1.1--1.2.sql: upgrade from 1.1 to 1.2 */

\echo Use "ALTER EXTENSION billing UPDATE TO '1.2'" to load this file. \quit

/*
 * 1.2: the background worker's snapshot read is cheap enough to run for
 * every batch of dirty tenants (performance issue: deduct TPS with the
 * worker pushing).
 *
 * billing.sync_snapshot(tenants, after, lim) was one SQL function for both
 * uses (the dirty tenants of a push; a page of all tenants for a resync).
 * Its SET search_path made it impossible to inline, so every call parsed
 * and planned the body again, and its WHERE CASE ... = ANY (tenants)
 * compared every account with every dirty tenant (a sequential scan):
 * profiling showed the worker using a quarter of the machine under load.
 *
 * Now the rows are built in C (src/snapshot.c): each account is read by
 * its primary key and its fields formatted directly; the worker calls that
 * code without SQL for a push, and billing.sync_snapshot_of(tenants) gives
 * the same rows to SQL.  billing.sync_snapshot() stays the interface of
 * resync pages and of tests comparing Redis with the database; it returns
 * the rows in tenant order, each tenant's key hashes first.
 */
CREATE FUNCTION billing.sync_snapshot_of(tenants text[])
    RETURNS TABLE (tenant_id text, key_id text, version bigint, fields text[])
    AS 'MODULE_PATHNAME', 'billing_sync_snapshot_of'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.sync_snapshot_of(text[]) IS
    'the Redis hashes of the given tenants and their API keys (internal: the background worker, through billing.sync_snapshot)';
REVOKE ALL ON FUNCTION billing.sync_snapshot_of(text[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION billing.sync_snapshot(tenants text[], after text, lim integer)
    RETURNS TABLE (tenant_id text, key_id text, version bigint, fields text[])
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tenants IS NULL THEN
        -- a resync page: the tenants after `after`
        tenants := ARRAY(SELECT a.tenant_id FROM billing.accounts a
                          WHERE a.tenant_id > after ORDER BY a.tenant_id LIMIT lim);
    END IF;
    RETURN QUERY
        SELECT s.* FROM billing.sync_snapshot_of(tenants) AS s
         ORDER BY s.tenant_id, s.key_id NULLS LAST;
END
$$;

/*
 * billing_verify() reads every entry once, in C (billing.verify_entries,
 * src/verify.c), walking each tenant's entries in primary-key order
 * (tenant_id, entry_id): no sort of the ledger (the 1.0 window over
 * version order spilled to disk beyond work_mem) and no per-row SQL
 * expressions.  The balance_after chain is still defined in version order:
 * billing's writers take the entry id and the version under the account
 * lock, so the two orders agree; a tenant where they do not (entry_id_seq
 * with CACHE > 1, imported entries) has its chain checked again by SQL in
 * version order.  Results are the same as 1.1's.
 */
CREATE FUNCTION billing.verify_entries(tenant_id text)
    RETURNS TABLE (tenant_id text, total numeric, n bigint, breaks bigint,
                   first_break bigint, max_version bigint, invalid bigint)
    AS 'MODULE_PATHNAME', 'billing_verify_entries'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing.verify_entries(text) IS
    'per-tenant facts of the ledger in one pass (internal: billing_verify); NULL: every tenant';
REVOKE ALL ON FUNCTION billing.verify_entries(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION billing_verify(tenant_id text DEFAULT NULL)
    RETURNS SETOF billing.verify_result
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
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
    RETURN QUERY

    WITH per_tenant AS (
        SELECT * FROM billing.verify_entries(billing_verify.tenant_id)
    )
    , holds AS (
        SELECT h.tenant_id,
               sum(h.amount_micros - h.captured_micros - h.released_micros) AS open_micros
          FROM billing.holds h
         WHERE h.status = 'open' AND (billing_verify.tenant_id IS NULL OR h.tenant_id = billing_verify.tenant_id)
         GROUP BY h.tenant_id
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
               ELSE 'cached holds differ from the open holds'
           END
      FROM billing.accounts a
      FULL JOIN per_tenant p ON p.tenant_id = a.tenant_id
      LEFT JOIN holds h ON h.tenant_id = a.tenant_id
     WHERE (billing_verify.tenant_id IS NULL OR coalesce(a.tenant_id, p.tenant_id) = billing_verify.tenant_id)
       AND (a.tenant_id IS NULL
            OR a.balance_micros <> coalesce(p.total, 0)
            OR coalesce(p.breaks, 0) > 0
            OR a.version < coalesce(p.max_version, 0)
            OR coalesce(p.invalid, 0) > 0
            OR a.holds_micros <> coalesce(h.open_micros, 0))
     ORDER BY 1;
END;
$$;
