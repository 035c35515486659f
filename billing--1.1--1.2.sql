/* billing--1.1--1.2.sql: upgrade from 1.1 to 1.2 */

\echo Use "ALTER EXTENSION billing UPDATE TO '1.2'" to load this file. \quit

/*
 * 1.2: the background worker's snapshot read is cheap enough to run every
 * few milliseconds (performance issue: deduct TPS with the worker pushing).
 *
 * billing.sync_snapshot(tenants, after, lim) was one SQL function for both
 * uses (the dirty tenants of a push; a page of all tenants for a resync).
 * Its SET search_path made it impossible to inline, so every call parsed
 * and planned the body again, and its WHERE CASE ... = ANY (tenants)
 * compared every account with every dirty tenant (a sequential scan):
 * profiling showed the worker using a quarter of the machine under load.
 *
 * Now the rows are built by billing.sync_snapshot_of(tenants), an
 * inlinable SQL function (no SET clause) that finds each tenant through the
 * primary key, and billing.sync_snapshot() is a PL/pgSQL wrapper whose two
 * queries are planned once per session (the worker is one long session)
 * with the inlined body in those cached plans.  The body is inlined and
 * planned under the wrapper's pinned search_path; sync_snapshot_of() is
 * revoked from PUBLIC like the wrapper.
 */
CREATE FUNCTION billing.sync_snapshot_of(tenants text[])
    RETURNS TABLE (tenant_id text, key_id text, version bigint, fields text[])
    LANGUAGE sql STABLE
AS $$
    WITH acc AS (
        SELECT a.*,
               (now() AT TIME ZONE a.timezone)::date AS today,
               date_trunc('month', now() AT TIME ZONE a.timezone)::date AS this_month,
               -- billing.effective_holds(a), inlined (it is SECURITY DEFINER for readers)
               CASE
                   WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN a.holds_micros
                   ELSE (SELECT coalesce(sum(h.amount_micros - h.captured_micros - h.released_micros), 0)::bigint
                           FROM billing.holds h
                          WHERE h.tenant_id = a.tenant_id AND h.status = 'open' AND h.expires_at > now())
               END AS eff_holds
          FROM pg_catalog.unnest(tenants) AS t(id)
          JOIN billing.accounts a ON a.tenant_id = t.id
    ), now_ms AS (
        SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint::text AS ms
    )
    SELECT acc.tenant_id, NULL::text, acc.version,
           ARRAY['status', acc.status,
                 'currency', acc.currency,
                 'balance', acc.balance_micros::text,
                 'credit_limit', acc.credit_limit_micros::text,
                 'holds', acc.eff_holds::text,
                 'available', (acc.balance_micros::numeric + acc.credit_limit_micros - acc.eff_holds)::text,
                 'day_requests', (CASE WHEN acc.usage_day = acc.today THEN acc.day_requests ELSE 0 END)::text,
                 'day_spend', (CASE WHEN acc.usage_day = acc.today THEN acc.day_spend_micros ELSE 0 END)::text,
                 'month_requests', (CASE WHEN acc.usage_month = acc.this_month THEN acc.month_requests ELSE 0 END)::text,
                 'month_spend', (CASE WHEN acc.usage_month = acc.this_month THEN acc.month_spend_micros ELSE 0 END)::text,
                 'day_resets_at_ms', (extract(epoch FROM ((acc.today + 1)::timestamp AT TIME ZONE acc.timezone)) * 1000)::bigint::text,
                 'month_resets_at_ms', (extract(epoch FROM ((acc.this_month + interval '1 month')::timestamp AT TIME ZONE acc.timezone)) * 1000)::bigint::text,
                 'synced_at_ms', now_ms.ms]
           || CASE WHEN acc.max_charge_micros IS NULL THEN '{}'::text[] ELSE ARRAY['max_charge', acc.max_charge_micros::text] END
           || CASE WHEN acc.daily_request_quota IS NULL THEN '{}'::text[] ELSE ARRAY['daily_requests_quota', acc.daily_request_quota::text] END
           || CASE WHEN acc.monthly_request_quota IS NULL THEN '{}'::text[] ELSE ARRAY['monthly_requests_quota', acc.monthly_request_quota::text] END
           || CASE WHEN acc.daily_spend_cap_micros IS NULL THEN '{}'::text[] ELSE ARRAY['daily_spend_cap', acc.daily_spend_cap_micros::text] END
           || CASE WHEN acc.monthly_spend_cap_micros IS NULL THEN '{}'::text[] ELSE ARRAY['monthly_spend_cap', acc.monthly_spend_cap_micros::text] END
      FROM acc, now_ms
    UNION ALL
    SELECT k.tenant_id, k.key_id, acc.version,
           ARRAY['status', k.status,
                 'period', coalesce(k.budget_period, 'lifetime'),
                 'spent', (CASE WHEN k.budget_period IS NULL OR k.budget_period = 'lifetime'
                                  OR k.period_start = CASE k.budget_period WHEN 'day' THEN acc.today ELSE acc.this_month END
                                THEN k.period_spend_micros ELSE 0 END)::text,
                 'synced_at_ms', now_ms.ms]
           || CASE WHEN k.budget_micros IS NULL THEN '{}'::text[] ELSE ARRAY['budget', k.budget_micros::text] END
           || CASE k.budget_period
                  WHEN 'day' THEN ARRAY['resets_at_ms', (extract(epoch FROM ((acc.today + 1)::timestamp AT TIME ZONE acc.timezone)) * 1000)::bigint::text]
                  WHEN 'month' THEN ARRAY['resets_at_ms', (extract(epoch FROM ((acc.this_month + interval '1 month')::timestamp AT TIME ZONE acc.timezone)) * 1000)::bigint::text]
                  ELSE '{}'::text[]
              END
      FROM billing.api_keys k
      JOIN acc ON acc.tenant_id = k.tenant_id, now_ms
     ORDER BY 1, 2 NULLS LAST    -- key hashes before their tenant hash (see lua/README.md)
$$;
COMMENT ON FUNCTION billing.sync_snapshot_of(text[]) IS
    'the Redis hashes of the given tenants and their API keys (internal: the background worker, through billing.sync_snapshot)';
REVOKE ALL ON FUNCTION billing.sync_snapshot_of(text[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION billing.sync_snapshot(tenants text[], after text, lim integer)
    RETURNS TABLE (tenant_id text, key_id text, version bigint, fields text[])
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tenants IS NOT NULL THEN
        -- a push: the dirty tenants
        RETURN QUERY SELECT * FROM billing.sync_snapshot_of(tenants);
    ELSE
        -- a resync: the next page of tenants after `after`
        RETURN QUERY
            SELECT * FROM billing.sync_snapshot_of(ARRAY(
                SELECT a.tenant_id FROM billing.accounts a
                 WHERE a.tenant_id > after ORDER BY a.tenant_id LIMIT lim));
    END IF;
END
$$;

/*
 * billing_verify() reads every entry once, in C (billing.verify_entries,
 * src/verify.c), walking each tenant's entries in primary-key order
 * (tenant_id, entry_id): no sort of the ledger (the 1.0 window over
 * version order spilled to disk beyond work_mem) and no per-row SQL
 * expressions.  Every billing writer takes the entry id and the new version
 * under the account lock, so both increase together; that is now checked
 * too ('entry versions do not increase with entry_id', counted in
 * chain_breaks).
 */
CREATE FUNCTION billing.verify_entries(tenant_id text)
    RETURNS TABLE (tenant_id text, total numeric, n bigint, breaks bigint,
                   balance_breaks bigint, first_break bigint,
                   max_version bigint, invalid bigint)
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
               WHEN coalesce(p.balance_breaks, 0) > 0 THEN 'balance_after chain is broken'
               WHEN coalesce(p.breaks, 0) > 0 THEN 'entry versions do not increase with entry_id'
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
