/* 65_usage: usage reports (views) */

-- Usage = charges, net of their refunds.  A charge is every debit that counts
-- as spend in the quota counters: kind deduct, capture, or adjustment with a
-- negative amount (an expiry is not a charge).  A refund tied to its charge
-- (billing_refund: refund_of) is netted against the charge's day, model and
-- api key, however much later it was made; a credit of kind refund without
-- a charge (billing_credit) is a credit.  Days and months are those of the
-- account's time zone, by usage time (event_at, else created_at).
CREATE VIEW billing.usage_daily WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       count(*) FILTER (WHERE e.amount_micros < 0)                                           AS charges,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)) AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))                                     AS refunded,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)
                              - coalesce(sum(r.micros), 0))                                  AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                           AS credits,
       billing.to_amount_sum(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.kind <> 'expire' AND NOT (e.kind = 'refund' AND e.refund_of IS NOT NULL)
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_daily IS 'per tenant and day (account time zone, by usage time): charges, what was refunded of them, net spend; credits';

CREATE VIEW billing.usage_monthly WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       date_trunc('month', coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS month,
       count(*) FILTER (WHERE e.amount_micros < 0)                                           AS charges,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)) AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))                                     AS refunded,
       billing.to_amount_sum(coalesce(-sum(e.amount_micros) FILTER (WHERE e.amount_micros < 0), 0)
                              - coalesce(sum(r.micros), 0))                                  AS spent,
       count(*) FILTER (WHERE e.amount_micros > 0)                                           AS credits,
       billing.to_amount_sum(coalesce(sum(e.amount_micros) FILTER (WHERE e.amount_micros > 0), 0)) AS credited
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.kind <> 'expire' AND NOT (e.kind = 'refund' AND e.refund_of IS NOT NULL)
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.usage_monthly IS 'per tenant and calendar month (account time zone, by usage time): charges, what was refunded of them, net spend; credits';

CREATE VIEW billing.usage_by_model WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.metadata->>'model', h.metadata->>'model')       AS model,
       coalesce(e.metadata->>'provider', h.metadata->>'provider') AS provider,
       count(*)                                                    AS charges,
       billing.to_amount_sum(-sum(e.amount_micros))                AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))           AS refunded,
       billing.to_amount_sum(-sum(e.amount_micros) - coalesce(sum(r.micros), 0)) AS spent,
       sum(CASE WHEN jsonb_typeof(e.metadata->'input_tokens') = 'number'
                THEN (e.metadata->>'input_tokens')::numeric END)  AS input_tokens,
       sum(CASE WHEN jsonb_typeof(e.metadata->'output_tokens') = 'number'
                THEN (e.metadata->>'output_tokens')::numeric END) AS output_tokens
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN billing.holds h ON h.tenant_id = e.tenant_id AND h.hold_id = e.hold_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.amount_micros < 0 AND e.kind <> 'expire'
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_model IS 'charges per tenant, day, model and provider, net of their refunds (from entry metadata; a capture without a model takes its hold''s)';

CREATE VIEW billing.usage_by_api_key WITH (security_barrier) AS
WITH refunded AS (
    SELECT r.tenant_id, r.refund_of AS entry_id, sum(r.amount_micros) AS micros
      FROM billing.entries r
     WHERE r.kind = 'refund' AND r.refund_of IS NOT NULL
       AND ((SELECT billing.visible_tenants()) IS NULL OR r.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
     GROUP BY 1, 2
)
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       coalesce(e.api_key, e.metadata->>'api_key')                 AS api_key,
       count(*)                                                    AS charges,
       billing.to_amount_sum(-sum(e.amount_micros))                AS charged,
       billing.to_amount_sum(coalesce(sum(r.micros), 0))           AS refunded,
       billing.to_amount_sum(-sum(e.amount_micros) - coalesce(sum(r.micros), 0)) AS spent
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
  LEFT JOIN refunded r ON r.tenant_id = e.tenant_id AND r.entry_id = e.entry_id
 WHERE e.amount_micros < 0 AND e.kind <> 'expire'
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.usage_by_api_key IS 'charges per tenant, day and api key (the api_key argument, else metadata->>''api_key''), net of their refunds';

-- usage by token type: the breakdown billing_deduct_usage() recorded in a
-- charge's metadata (the counts and the unit prices it was priced at,
-- 1.3's prices per 1,000 tokens included).  cost is each part's exact
-- share before the charge's one rounding (12 decimal places hold it);
-- refunds are not split by type.
CREATE VIEW billing.usage_by_token_type WITH (security_barrier) AS
SELECT e.tenant_id,
       (coalesce(e.event_at, e.created_at) AT TIME ZONE a.timezone)::date AS day,
       e.metadata->>'model' AS model,
       t.token_type,
       count(*)             AS charges,
       sum(t.quantity)      AS quantity,
       round(sum(t.quantity * t.rate * t.unit), 12) AS cost
  FROM billing.entries e
  JOIN billing.accounts a ON a.tenant_id = e.tenant_id
 CROSS JOIN LATERAL (
     SELECT CASE WHEN jsonb_typeof(e.metadata->'input_tokens') = 'number' THEN (e.metadata->>'input_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'cached_input_tokens') = 'number' THEN (e.metadata->>'cached_input_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'cache_write_tokens') = 'number' THEN (e.metadata->>'cache_write_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'output_tokens') = 'number' THEN (e.metadata->>'output_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'reasoning_tokens') = 'number' THEN (e.metadata->>'reasoning_tokens')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'requests') = 'number' THEN (e.metadata->>'requests')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'seconds') = 'number' THEN (e.metadata->>'seconds')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'input_per_1m') = 'number' THEN (e.metadata->>'input_per_1m')::numeric
                 WHEN jsonb_typeof(e.metadata->'input_per_1k') = 'number' THEN (e.metadata->>'input_per_1k')::numeric * 1000 END,
            CASE WHEN jsonb_typeof(e.metadata->'cached_input_per_1m') = 'number' THEN (e.metadata->>'cached_input_per_1m')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'cache_write_per_1m') = 'number' THEN (e.metadata->>'cache_write_per_1m')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'output_per_1m') = 'number' THEN (e.metadata->>'output_per_1m')::numeric
                 WHEN jsonb_typeof(e.metadata->'output_per_1k') = 'number' THEN (e.metadata->>'output_per_1k')::numeric * 1000 END,
            CASE WHEN jsonb_typeof(e.metadata->'reasoning_per_1m') = 'number' THEN (e.metadata->>'reasoning_per_1m')::numeric END,
            CASE WHEN jsonb_typeof(e.metadata->'per_request') = 'number' THEN (e.metadata->>'per_request')::numeric ELSE 0 END,
            CASE WHEN jsonb_typeof(e.metadata->'per_second') = 'number' THEN (e.metadata->>'per_second')::numeric END
 ) AS u(input, cached_input, cache_write, output, reasoning, requests, seconds,
        input_rate, cached_input_rate, cache_write_rate, output_rate, reasoning_rate, request_rate, second_rate)
 CROSS JOIN LATERAL (VALUES
     ('input',        u.input,        u.input_rate,        0.000001),
     ('cached_input', u.cached_input, u.cached_input_rate, 0.000001),
     ('cache_write',  u.cache_write,  u.cache_write_rate,  0.000001),
     ('output',       u.output,       u.output_rate,       0.000001),
     ('reasoning',    u.reasoning,    u.reasoning_rate,    0.000001),
     ('request',      u.requests,     u.request_rate,      1),
     ('second',       u.seconds,      u.second_rate,       1)
 ) AS t(token_type, quantity, rate, unit)
 WHERE e.kind = 'deduct' AND e.metadata ? 'price_effective_from' AND t.quantity > 0
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW billing.usage_by_token_type IS 'priced usage (billing_deduct_usage) per tenant, day, model and token type (input, cached_input, cache_write, output, reasoning; request, second): quantity and exact cost before rounding';

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
       billing.to_amount_sum(-sum(e.amount_micros)) AS expired
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
