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
