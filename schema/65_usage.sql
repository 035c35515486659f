/* 65_usage: usage reports (views) */

-- usage = charges: entries of kind deduct and capture
CREATE VIEW billing.usage_daily WITH (security_barrier) AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       count(*) FILTER (WHERE e.kind IN ('deduct', 'capture'))                      AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind IN ('deduct', 'capture')), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)::bigint) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_daily IS 'per tenant and day (account time zone, by event time): charges and credits';

CREATE VIEW billing.usage_monthly WITH (security_barrier) AS
SELECT e.tenant_id,
       date_trunc('month', coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS month,
       count(*) FILTER (WHERE e.kind IN ('deduct', 'capture'))                      AS charges,
       billing.to_amount(coalesce(-sum(e.amount_micros) FILTER (WHERE e.kind IN ('deduct', 'capture')), 0)::bigint) AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                 AS credits,
       billing.to_amount(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)::bigint) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_monthly IS 'per tenant and calendar month (account time zone, by event time): charges and credits';

CREATE VIEW billing.usage_by_model WITH (security_barrier) AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.metadata->>'model', h.metadata->>'model')       AS model,
       coalesce(e.metadata->>'provider', h.metadata->>'provider') AS provider,
       count(*)                AS charges,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS spent,
       sum(CASE WHEN jsonb_typeof(e.metadata->'input_tokens') = 'number'
                THEN (e.metadata->>'input_tokens')::numeric END)  AS input_tokens,
       sum(CASE WHEN jsonb_typeof(e.metadata->'output_tokens') = 'number'
                THEN (e.metadata->>'output_tokens')::numeric END) AS output_tokens
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN billing.holds h ON h.tenant_id = e.tenant_id AND h.hold_id = e.hold_id
 WHERE e.kind IN ('deduct', 'capture')
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_model IS 'charges per tenant, day, model and provider (from entry metadata; a capture without a model takes its hold''s)';

CREATE VIEW billing.usage_by_api_key WITH (security_barrier) AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.api_key, e.metadata->>'api_key') AS api_key,
       count(*)                AS charges,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS spent
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 WHERE e.kind IN ('deduct', 'capture')
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.usage_by_api_key IS 'charges per tenant, day and api key (the api_key argument, else metadata->>''api_key'')';

-- grants: every grant with what is left of it (open ones: on the account
-- row), what open holds reserve of it, what expired of it, and its status.
-- A share of an expired hold came back to its grant when the hold expired:
-- spendable, or expired with the grant (as billing.balances counts it).
CREATE VIEW billing.grant_balances WITH (security_barrier) AS
WITH state AS (
    SELECT a.tenant_id, a.grants_state[i] AS grant_id, a.grants_state[i + 1] AS remaining
      FROM billing.accounts a,
           generate_series(1, coalesce(array_length(a.grants_state, 1), 0), 5) AS i
), held AS (
    SELECT h.tenant_id, h.grant_draws[i] AS grant_id,
           coalesce(sum(h.grant_draws[i + 1]) FILTER (WHERE h.expires_at > now()), 0) AS reserved,
           coalesce(sum(h.grant_draws[i + 1]) FILTER (WHERE h.expires_at <= now()), 0) AS freed
      FROM billing.holds h,
           generate_series(1, coalesce(array_length(h.grant_draws, 1), 0), 2) AS i
     WHERE h.status = 'open'
     GROUP BY 1, 2
), expired AS (
    SELECT e.tenant_id, e.grant_id, -sum(e.amount_micros) AS expired
      FROM billing.entries e
     WHERE e.kind = 'expire'
     GROUP BY 1, 2
)
SELECT g.tenant_id,
       g.grant_id,
       g.trace_id,
       g.category,
       g.priority,
       billing.to_amount(g.granted_micros) AS granted,
       billing.to_amount(CASE WHEN g.expires_at <= now() THEN 0
                              ELSE coalesce(s.remaining, 0) + coalesce(r.freed, 0) END::bigint) AS remaining,
       billing.to_amount(coalesce(r.reserved, 0)::bigint) AS reserved,
       billing.to_amount((coalesce(x.expired, 0)
                          + CASE WHEN g.expires_at <= now() THEN coalesce(s.remaining, 0) + coalesce(r.freed, 0)
                                 ELSE 0 END)::bigint) AS expired,
       g.expires_at,
       CASE WHEN coalesce(r.reserved, 0) > 0 THEN 'open'
            WHEN g.expires_at <= now() THEN 'expired'
            WHEN coalesce(s.remaining, 0) + coalesce(r.freed, 0) > 0 THEN 'open'
            ELSE 'used' END AS status,
       g.description,
       g.created_at
  FROM billing.grants g
  LEFT JOIN state s ON s.tenant_id = g.tenant_id AND s.grant_id = g.grant_id
  LEFT JOIN held r ON r.tenant_id = g.tenant_id AND r.grant_id = g.grant_id
  LEFT JOIN expired x ON x.tenant_id = g.tenant_id AND x.grant_id = g.grant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR g.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.grant_balances IS 'every grant: granted, left (remaining, reserved by open holds), expired, status (open: something left or reserved; used; expired)';

-- which grant buckets each charge drew from, each refund gave back to, and
-- each grant filled
CREATE VIEW billing.grant_draws WITH (security_barrier) AS
SELECT e.tenant_id,
       e.entry_id,
       e.trace_id,
       e.kind,
       g.grant_id,
       g.trace_id AS grant_trace_id,
       g.category,
       billing.to_amount(CASE WHEN e.amount_micros > 0 THEN e.draws[i + 1] ELSE -e.draws[i + 1] END) AS amount,
       e.refund_of,
       e.created_at
  FROM billing.entries e
 CROSS JOIN LATERAL generate_series(1, coalesce(array_length(e.draws, 1), 0), 2) AS i
  JOIN billing.grants g ON g.tenant_id = e.tenant_id AND g.grant_id = e.draws[i]
 WHERE e.draws IS NOT NULL
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.grant_draws IS 'what charges drew from grant buckets (negative), and grants and refunds put into them (positive); the rest of each entry is the wallet''s';

-- breakage: credit that expired unused, per tenant, month (account time zone)
-- and category
CREATE VIEW billing.breakage WITH (security_barrier) AS
SELECT e.tenant_id,
       date_trunc('month', e.event_at AT TIME ZONE a.timezone)::date AS month,
       g.category,
       count(*) AS expiries,
       billing.to_amount(-sum(e.amount_micros)::bigint) AS expired
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN billing.grants g ON g.tenant_id = e.tenant_id AND g.grant_id = e.grant_id
 WHERE e.kind = 'expire'
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.breakage IS 'grant credit that expired unused, per tenant, month (account time zone, by expiry time) and category';

-- refunds per charge
CREATE VIEW billing.refunded_charges WITH (security_barrier) AS
SELECT c.tenant_id,
       c.trace_id AS charge_trace_id,
       c.entry_id AS charge_entry_id,
       c.kind,
       billing.to_amount(-c.amount_micros) AS charged,
       billing.to_amount(sum(r.amount_micros)::bigint) AS refunded,
       billing.to_amount((-c.amount_micros - sum(r.amount_micros))::bigint) AS refundable,
       count(*) AS refunds,
       max(r.created_at) AS last_refunded_at
  FROM billing.refunds r
  JOIN billing.entries c ON c.tenant_id = r.tenant_id AND c.entry_id = r.charge_entry_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4, 5;
COMMENT ON VIEW billing.refunded_charges IS 'charges that were refunded: charged, refunded so far, still refundable';
