/*
 * 60_pricing: prices per model the way providers quote them, with history;
 * per-tenant overrides; charges priced from a usage breakdown.
 *
 * A price is per model and currency, effective from a point in time:
 * rates per 1M input, cached input (cache read), cache write, output and
 * reasoning tokens, a fee per request and a rate per second.  The token
 * counts of a usage are disjoint (input excludes the cached and cache-write
 * tokens, output excludes the reasoning tokens).  A rate that is NULL is
 * not offered: cached input and cache write fall back to the input rate,
 * reasoning to the output rate, a missing per-request fee is 0; a usage of
 * a kind that still has no rate cannot be priced (ZB062).  A tenant's
 * override (an enterprise plan's own prices) is a whole price that wins
 * over the list price for that tenant from its effective_from on, until
 * the next override or billing_price_override_end().  Rates are stored
 * exactly as bigint micro-units per 1M tokens (per request, per second);
 * the cost of a usage is summed exactly in numeric and rounded half up to
 * a micro-unit once.
 */

CREATE TABLE billing.prices (
    model                       text        NOT NULL,
    currency                    text        NOT NULL,
    effective_from              timestamptz NOT NULL,
    input_per_1m_micros         bigint,
    output_per_1m_micros        bigint,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    cached_input_per_1m_micros  bigint,
    cache_write_per_1m_micros   bigint,
    reasoning_per_1m_micros     bigint,
    per_request_micros          bigint,
    per_second_micros           bigint,
    CONSTRAINT prices_pkey PRIMARY KEY (model, currency, effective_from),
    CONSTRAINT prices_check CHECK (
        input_per_1m_micros >= 0 AND output_per_1m_micros >= 0
        AND cached_input_per_1m_micros >= 0 AND cache_write_per_1m_micros >= 0
        AND reasoning_per_1m_micros >= 0 AND per_request_micros >= 0 AND per_second_micros >= 0
        AND num_nonnulls(input_per_1m_micros, output_per_1m_micros, cached_input_per_1m_micros,
                         cache_write_per_1m_micros, reasoning_per_1m_micros, per_request_micros,
                         per_second_micros) > 0)
);
COMMENT ON TABLE billing.prices IS 'list prices per model and currency, with history (per 1M tokens of each kind, per request, per second; NULL: not offered): a charge uses the price effective at its event time';

CREATE TRIGGER prices_no_rewrite
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.prices
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Prices keep their history: add a new price with a later effective_from via billing_price_set().');
ALTER TABLE billing.prices ENABLE ALWAYS TRIGGER prices_no_rewrite;
SELECT pg_catalog.pg_extension_config_dump('billing.prices', '');

CREATE TABLE billing.price_overrides (
    tenant_id                   text        NOT NULL,
    model                       text        NOT NULL,
    currency                    text        NOT NULL,
    effective_from              timestamptz NOT NULL,
    list_price                  boolean     NOT NULL DEFAULT false,
    input_per_1m_micros         bigint,
    cached_input_per_1m_micros  bigint,
    cache_write_per_1m_micros   bigint,
    output_per_1m_micros        bigint,
    reasoning_per_1m_micros     bigint,
    per_request_micros          bigint,
    per_second_micros           bigint,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT price_overrides_pkey PRIMARY KEY (tenant_id, model, currency, effective_from),
    CONSTRAINT price_overrides_check CHECK (
        input_per_1m_micros >= 0 AND output_per_1m_micros >= 0
        AND cached_input_per_1m_micros >= 0 AND cache_write_per_1m_micros >= 0
        AND reasoning_per_1m_micros >= 0 AND per_request_micros >= 0 AND per_second_micros >= 0
        AND CASE WHEN list_price
                 THEN num_nonnulls(input_per_1m_micros, output_per_1m_micros, cached_input_per_1m_micros,
                                   cache_write_per_1m_micros, reasoning_per_1m_micros, per_request_micros,
                                   per_second_micros) = 0
                 ELSE num_nonnulls(input_per_1m_micros, output_per_1m_micros, cached_input_per_1m_micros,
                                   cache_write_per_1m_micros, reasoning_per_1m_micros, per_request_micros,
                                   per_second_micros) > 0 END)
);
COMMENT ON TABLE billing.price_overrides IS 'a tenant''s own prices (enterprise plans), with history: each row wins over the list price for that tenant from effective_from on; a list_price row ends the override';
COMMENT ON COLUMN billing.price_overrides.list_price IS 'true: from effective_from on the tenant pays the list price again (no rates)';

CREATE TRIGGER price_overrides_no_rewrite
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.price_overrides
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Price overrides keep their history: add a new one with a later effective_from via billing_price_override_set() or billing_price_override_end().');
ALTER TABLE billing.price_overrides ENABLE ALWAYS TRIGGER price_overrides_no_rewrite;
SELECT pg_catalog.pg_extension_config_dump('billing.price_overrides', '');

CREATE VIEW billing.price_list AS
SELECT p.model,
       p.currency,
       billing.to_amount(p.input_per_1m_micros)        AS input_per_1m,
       billing.to_amount(p.cached_input_per_1m_micros) AS cached_input_per_1m,
       billing.to_amount(p.cache_write_per_1m_micros)  AS cache_write_per_1m,
       billing.to_amount(p.output_per_1m_micros)       AS output_per_1m,
       billing.to_amount(p.reasoning_per_1m_micros)    AS reasoning_per_1m,
       billing.to_amount(p.per_request_micros)         AS per_request,
       billing.to_amount(p.per_second_micros)          AS per_second,
       p.effective_from,
       lead(p.effective_from) OVER w AS effective_until,
       p.effective_from <= now() AND coalesce(lead(p.effective_from) OVER w > now(), true) AS is_current
  FROM billing.prices p
WINDOW w AS (PARTITION BY p.model, p.currency ORDER BY p.effective_from);
COMMENT ON VIEW billing.price_list IS 'list prices per model and currency (per 1M tokens, per request, per second; NULL: not offered) with their validity window';

CREATE VIEW billing.price_override_list WITH (security_barrier) AS
SELECT o.tenant_id,
       o.model,
       o.currency,
       billing.to_amount(o.input_per_1m_micros)        AS input_per_1m,
       billing.to_amount(o.cached_input_per_1m_micros) AS cached_input_per_1m,
       billing.to_amount(o.cache_write_per_1m_micros)  AS cache_write_per_1m,
       billing.to_amount(o.output_per_1m_micros)       AS output_per_1m,
       billing.to_amount(o.reasoning_per_1m_micros)    AS reasoning_per_1m,
       billing.to_amount(o.per_request_micros)         AS per_request,
       billing.to_amount(o.per_second_micros)          AS per_second,
       o.effective_from,
       o.effective_until,
       o.effective_from <= now() AND coalesce(o.effective_until > now(), true) AS is_current
  FROM (SELECT x.*, lead(x.effective_from) OVER w AS effective_until
          FROM billing.price_overrides x
         WHERE ((SELECT billing.visible_tenants()) IS NULL OR x.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
        WINDOW w AS (PARTITION BY x.tenant_id, x.model, x.currency ORDER BY x.effective_from)) o
 WHERE NOT o.list_price;
COMMENT ON VIEW billing.price_override_list IS 'tenants'' own prices per model with their validity window (an override ends at the next one, or where the tenant goes back to the list price)';

-- the rates of a price as micro-units, checked: each one NULL (not offered)
-- or an amount >= 0 with at most 6 decimals (ZB010-ZB013); at least one
-- given (ZB015).  Order: input, output, cached input, cache write,
-- reasoning (per 1M tokens), per request, per second.
CREATE FUNCTION billing.check_rates(input_per_1m numeric, output_per_1m numeric,
                                    cached_input_per_1m numeric, cache_write_per_1m numeric,
                                    reasoning_per_1m numeric, per_request numeric, per_second numeric)
    RETURNS bigint[]
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF num_nonnulls(input_per_1m, output_per_1m, cached_input_per_1m, cache_write_per_1m,
                    reasoning_per_1m, per_request, per_second) = 0 THEN
        RAISE EXCEPTION 'a price needs at least one rate'
            USING ERRCODE = 'ZB015',
                  HINT = 'Pass the rates the provider quotes, e.g. input_per_1m => 3, output_per_1m => 15; 0 for a free one.';
    END IF;
    RETURN ARRAY[billing.to_micros(input_per_1m, 'input_per_1m', true),
                 billing.to_micros(output_per_1m, 'output_per_1m', true),
                 billing.to_micros(cached_input_per_1m, 'cached_input_per_1m', true),
                 billing.to_micros(cache_write_per_1m, 'cache_write_per_1m', true),
                 billing.to_micros(reasoning_per_1m, 'reasoning_per_1m', true),
                 billing.to_micros(per_request, 'per_request', true),
                 billing.to_micros(per_second, 'per_second', true)];
END;
$$;
REVOKE ALL ON FUNCTION billing.check_rates(numeric, numeric, numeric, numeric, numeric, numeric, numeric) FROM PUBLIC;

-- a rate of 1.3's API (per 1,000 tokens) as micro-units per 1M tokens,
-- exactly (x 1000); the per-1M limit is that of every amount
CREATE FUNCTION billing.rate_per_1k(per_1k numeric, argname text) RETURNS numeric
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    micros bigint := billing.to_micros(per_1k, argname, true);   -- ZB010-ZB013, as in 1.3
BEGIN
    IF micros > 1000000000000000 THEN
        RAISE EXCEPTION '% is out of range', argname
            USING ERRCODE = 'ZB013',
                  DETAIL = format('The value given was %s; the largest allowed is 1000000000 (10^12 per 1M tokens).',
                                  billing.to_amount(micros)),
                  HINT = 'Pass the rate per 1M tokens instead (input_per_1m, output_per_1m).';
    END IF;
    RETURN billing.to_amount(micros) * 1000;
END;
$$;
REVOKE ALL ON FUNCTION billing.rate_per_1k(numeric, text) FROM PUBLIC;

-- "input_per_1m: existing 3.000000, requested 2.500000; ..." for ZB006
CREATE FUNCTION billing.rates_differ(was bigint[], requested bigint[]) RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(format('%s: existing %s, requested %s', n.name,
                             coalesce(billing.to_amount(was[n.i])::text, 'none'),
                             coalesce(billing.to_amount(requested[n.i])::text, 'none')), '; ' ORDER BY n.i) || '.'
      FROM unnest(ARRAY['input_per_1m', 'output_per_1m', 'cached_input_per_1m', 'cache_write_per_1m',
                        'reasoning_per_1m', 'per_request', 'per_second']) WITH ORDINALITY AS n(name, i)
     WHERE was[n.i] IS DISTINCT FROM requested[n.i]
$$;
REVOKE ALL ON FUNCTION billing.rates_differ(bigint[], bigint[]) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_price_set(model text, input_per_1k numeric DEFAULT NULL,
                                  output_per_1k numeric DEFAULT NULL,
                                  effective_from timestamptz DEFAULT now(),
                                  currency text DEFAULT 'USD',
                                  input_per_1m numeric DEFAULT NULL,
                                  output_per_1m numeric DEFAULT NULL,
                                  cached_input_per_1m numeric DEFAULT NULL,
                                  cache_write_per_1m numeric DEFAULT NULL,
                                  reasoning_per_1m numeric DEFAULT NULL,
                                  per_request numeric DEFAULT NULL,
                                  per_second numeric DEFAULT NULL)
    RETURNS SETOF billing.price_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r bigint[];
    was billing.prices;
BEGIN
    IF billing_price_set.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name as gateways report it, e.g. gpt-4o.';
    END IF;
    PERFORM billing.check_id(billing_price_set.model, 'model', 'ZB018');
    IF billing_price_set.effective_from IS NULL OR NOT isfinite(billing_price_set.effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite timestamp'
            USING ERRCODE = CASE WHEN billing_price_set.effective_from IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass when the price starts to apply, e.g. now() or ''2027-01-01 00:00+00''.';
    END IF;
    PERFORM billing.check_account_settings('-', billing_price_set.currency, NULL, NULL, NULL);
    IF billing_price_set.currency IS NULL THEN
        RAISE EXCEPTION 'currency must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass e.g. USD.';
    END IF;
    IF billing_price_set.input_per_1k IS NOT NULL AND billing_price_set.input_per_1m IS NOT NULL
       OR billing_price_set.output_per_1k IS NOT NULL AND billing_price_set.output_per_1m IS NOT NULL THEN
        RAISE EXCEPTION 'pass a rate per 1M tokens or per 1,000 tokens, not both'
            USING ERRCODE = 'ZB018',
                  HINT = 'Pass input_per_1m and output_per_1m (input_per_1k and output_per_1k are 1.3''s arguments).';
    END IF;
    -- 1.3's rates per 1,000 tokens are stored exactly, per 1M tokens
    r := billing.check_rates(coalesce(billing_price_set.input_per_1m,
                                      billing.rate_per_1k(billing_price_set.input_per_1k, 'input_per_1k')),
                             coalesce(billing_price_set.output_per_1m,
                                      billing.rate_per_1k(billing_price_set.output_per_1k, 'output_per_1k')),
                             billing_price_set.cached_input_per_1m, billing_price_set.cache_write_per_1m,
                             billing_price_set.reasoning_per_1m, billing_price_set.per_request,
                             billing_price_set.per_second);
    INSERT INTO billing.prices (model, currency, effective_from, input_per_1m_micros, output_per_1m_micros,
                                cached_input_per_1m_micros, cache_write_per_1m_micros, reasoning_per_1m_micros,
                                per_request_micros, per_second_micros)
    VALUES (billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from,
            r[1], r[2], r[3], r[4], r[5], r[6], r[7])
    ON CONFLICT (model, currency, effective_from) DO NOTHING;
    IF NOT FOUND THEN
        SELECT * INTO was FROM billing.prices p
         WHERE p.model = billing_price_set.model AND p.currency = billing_price_set.currency
           AND p.effective_from = billing_price_set.effective_from;
        IF ARRAY[was.input_per_1m_micros, was.output_per_1m_micros, was.cached_input_per_1m_micros,
                 was.cache_write_per_1m_micros, was.reasoning_per_1m_micros, was.per_request_micros,
                 was.per_second_micros] IS DISTINCT FROM r THEN
            RAISE EXCEPTION 'a different price for % in % is already effective from %',
                            billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from
                USING ERRCODE = 'ZB006',
                      DETAIL = billing.rates_differ(ARRAY[was.input_per_1m_micros, was.output_per_1m_micros,
                                                          was.cached_input_per_1m_micros, was.cache_write_per_1m_micros,
                                                          was.reasoning_per_1m_micros, was.per_request_micros,
                                                          was.per_second_micros], r),
                      HINT = 'Prices are history: add the new price with a later effective_from.';
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM billing.price_list l
                  WHERE l.model = billing_price_set.model AND l.currency = billing_price_set.currency;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_price_set(text, numeric, numeric, timestamptz, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric) IS
    'add a list price for a model (per 1M input, cached input, cache write, output and reasoning tokens, per request, per second), effective from a time (history is kept)';
REVOKE ALL ON FUNCTION @extschema@.billing_price_set(text, numeric, numeric, timestamptz, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric) FROM PUBLIC;

-- the account of an override, or ZB001 / ZB003; its currency
CREATE FUNCTION billing.override_account(tenant_id text) RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc billing.accounts;
BEGIN
    PERFORM billing.check_account_settings(override_account.tenant_id, NULL, NULL, NULL, NULL);
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = override_account.tenant_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', override_account.tenant_id
            USING ERRCODE = 'ZB001',
                  HINT = format('Create it first with billing_account_create(%L).', override_account.tenant_id);
    END IF;
    IF acc.status = 'closed' THEN
        RAISE EXCEPTION 'account "%" is closed', override_account.tenant_id
            USING ERRCODE = 'ZB003',
                  DETAIL = 'A closed account cannot be changed or reopened.',
                  HINT = 'Closed is final: open a new account for this customer.';
    END IF;
    RETURN acc.currency;
END;
$$;
REVOKE ALL ON FUNCTION billing.override_account(text) FROM PUBLIC;

-- record one override row (rates, or a return to the list price) unless the
-- same row exists; another row at the same time is ZB006
CREATE FUNCTION billing.override_insert(o billing.price_overrides) RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was billing.price_overrides;
BEGIN
    INSERT INTO billing.price_overrides (tenant_id, model, currency, effective_from, list_price,
                                         input_per_1m_micros, cached_input_per_1m_micros,
                                         cache_write_per_1m_micros, output_per_1m_micros,
                                         reasoning_per_1m_micros, per_request_micros, per_second_micros)
    VALUES (o.tenant_id, o.model, o.currency, o.effective_from, o.list_price,
            o.input_per_1m_micros, o.cached_input_per_1m_micros, o.cache_write_per_1m_micros,
            o.output_per_1m_micros, o.reasoning_per_1m_micros, o.per_request_micros, o.per_second_micros)
    ON CONFLICT (tenant_id, model, currency, effective_from) DO NOTHING;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO was FROM billing.price_overrides x
     WHERE x.tenant_id = o.tenant_id AND x.model = o.model AND x.currency = o.currency
       AND x.effective_from = o.effective_from;
    IF was.list_price IS DISTINCT FROM o.list_price
       OR ARRAY[was.input_per_1m_micros, was.output_per_1m_micros, was.cached_input_per_1m_micros,
                was.cache_write_per_1m_micros, was.reasoning_per_1m_micros, was.per_request_micros,
                was.per_second_micros]
          IS DISTINCT FROM
          ARRAY[o.input_per_1m_micros, o.output_per_1m_micros, o.cached_input_per_1m_micros,
                o.cache_write_per_1m_micros, o.reasoning_per_1m_micros, o.per_request_micros,
                o.per_second_micros] THEN
        RAISE EXCEPTION 'a different price override for % of tenant "%" is already effective from %',
                        o.model, o.tenant_id, o.effective_from
            USING ERRCODE = 'ZB006',
                  DETAIL = CASE WHEN was.list_price THEN 'From then on the tenant pays the list price.'
                                WHEN o.list_price THEN 'From then on the tenant has its own price.'
                                ELSE billing.rates_differ(
                                         ARRAY[was.input_per_1m_micros, was.output_per_1m_micros,
                                               was.cached_input_per_1m_micros, was.cache_write_per_1m_micros,
                                               was.reasoning_per_1m_micros, was.per_request_micros,
                                               was.per_second_micros],
                                         ARRAY[o.input_per_1m_micros, o.output_per_1m_micros,
                                               o.cached_input_per_1m_micros, o.cache_write_per_1m_micros,
                                               o.reasoning_per_1m_micros, o.per_request_micros,
                                               o.per_second_micros]) END,
                  HINT = 'Overrides are history: add the new one with a later effective_from.';
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.override_insert(billing.price_overrides) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_price_override_set(tenant_id text, model text,
                                           input_per_1m numeric DEFAULT NULL,
                                           output_per_1m numeric DEFAULT NULL,
                                           cached_input_per_1m numeric DEFAULT NULL,
                                           cache_write_per_1m numeric DEFAULT NULL,
                                           reasoning_per_1m numeric DEFAULT NULL,
                                           per_request numeric DEFAULT NULL,
                                           per_second numeric DEFAULT NULL,
                                           effective_from timestamptz DEFAULT now())
    RETURNS SETOF billing.price_override_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o billing.price_overrides;
    r bigint[];
BEGIN
    o.currency := billing.override_account(billing_price_override_set.tenant_id);
    IF billing_price_override_set.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name as gateways report it, e.g. gpt-4o.';
    END IF;
    PERFORM billing.check_id(billing_price_override_set.model, 'model', 'ZB018');
    IF billing_price_override_set.effective_from IS NULL OR NOT isfinite(billing_price_override_set.effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite timestamp'
            USING ERRCODE = CASE WHEN billing_price_override_set.effective_from IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass when the price starts to apply, e.g. now() or ''2027-01-01 00:00+00''.';
    END IF;
    r := billing.check_rates(billing_price_override_set.input_per_1m, billing_price_override_set.output_per_1m,
                             billing_price_override_set.cached_input_per_1m,
                             billing_price_override_set.cache_write_per_1m,
                             billing_price_override_set.reasoning_per_1m, billing_price_override_set.per_request,
                             billing_price_override_set.per_second);
    o.tenant_id := billing_price_override_set.tenant_id;
    o.model := billing_price_override_set.model;
    o.effective_from := billing_price_override_set.effective_from;
    o.list_price := false;
    o.input_per_1m_micros := r[1];
    o.output_per_1m_micros := r[2];
    o.cached_input_per_1m_micros := r[3];
    o.cache_write_per_1m_micros := r[4];
    o.reasoning_per_1m_micros := r[5];
    o.per_request_micros := r[6];
    o.per_second_micros := r[7];
    PERFORM billing.override_insert(o);
    RETURN QUERY SELECT * FROM billing.price_override_list l
                  WHERE l.tenant_id = o.tenant_id AND l.model = o.model AND l.currency = o.currency;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_price_override_set(text, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric, timestamptz) IS
    'give a tenant its own price for a model (wins over the list price), effective from a time (history is kept)';
REVOKE ALL ON FUNCTION @extschema@.billing_price_override_set(text, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric, timestamptz) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_price_override_end(tenant_id text, model text,
                                           effective_from timestamptz DEFAULT now())
    RETURNS SETOF billing.price_override_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o billing.price_overrides;
    before billing.price_overrides;
BEGIN
    o.currency := billing.override_account(billing_price_override_end.tenant_id);
    IF billing_price_override_end.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name of the override.';
    END IF;
    PERFORM billing.check_id(billing_price_override_end.model, 'model', 'ZB018');
    IF billing_price_override_end.effective_from IS NULL OR NOT isfinite(billing_price_override_end.effective_from) THEN
        RAISE EXCEPTION 'effective_from must be a finite timestamp'
            USING ERRCODE = CASE WHEN billing_price_override_end.effective_from IS NULL THEN 'ZB015' ELSE 'ZB018' END,
                  HINT = 'Pass when the list price applies again, e.g. now().';
    END IF;
    o.tenant_id := billing_price_override_end.tenant_id;
    o.model := billing_price_override_end.model;
    o.effective_from := billing_price_override_end.effective_from;
    o.list_price := true;
    -- an override must be in effect just before (unless this is a replay)
    SELECT * INTO before FROM billing.price_overrides x
     WHERE x.tenant_id = o.tenant_id AND x.model = o.model AND x.currency = o.currency
       AND x.effective_from <= o.effective_from
     ORDER BY x.effective_from DESC LIMIT 1;
    IF NOT FOUND OR (before.list_price AND before.effective_from < o.effective_from) THEN
        RAISE EXCEPTION 'tenant "%" has no price override for % to end at %',
                        o.tenant_id, o.model, o.effective_from
            USING ERRCODE = 'ZB060',
                  DETAIL = CASE WHEN FOUND THEN format('It pays the list price since %s.', before.effective_from)
                                ELSE format('It has no override for %s in %s before then.', o.model, o.currency) END,
                  HINT = 'See billing.price_override_list.';
    END IF;
    PERFORM billing.override_insert(o);
    RETURN QUERY SELECT * FROM billing.price_override_list l
                  WHERE l.tenant_id = o.tenant_id AND l.model = o.model AND l.currency = o.currency;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_price_override_end(text, text, timestamptz) IS
    'end a tenant''s own price for a model: from effective_from on it pays the list price again';
REVOKE ALL ON FUNCTION @extschema@.billing_price_override_end(text, text, timestamptz) FROM PUBLIC;

-- the price a tenant (NULL: anyone) pays for a model at a time: its override
-- effective then, else the list price (list_price true, tenant_id NULL);
-- or ZB060 (ZB018 for a model or currency that cannot be one)
CREATE FUNCTION billing.price_for(tenant_id text, model text, currency text, at timestamptz)
    RETURNS billing.price_overrides
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o billing.price_overrides;
    first_from timestamptz;
BEGIN
    IF price_for.tenant_id IS NOT NULL THEN
        SELECT * INTO o FROM billing.price_overrides x
         WHERE x.tenant_id = price_for.tenant_id AND x.model = price_for.model
           AND x.currency = price_for.currency AND x.effective_from <= price_for.at
         ORDER BY x.effective_from DESC LIMIT 1;
        IF FOUND AND NOT o.list_price THEN
            RETURN o;
        END IF;
    END IF;
    -- the list price, as a row of price_overrides (tenant_id NULL, list_price)
    SELECT NULL, x.model, x.currency, x.effective_from, true, x.input_per_1m_micros,
           x.cached_input_per_1m_micros, x.cache_write_per_1m_micros, x.output_per_1m_micros,
           x.reasoning_per_1m_micros, x.per_request_micros, x.per_second_micros, x.created_at
      INTO o
      FROM billing.prices x
     WHERE x.model = price_for.model AND x.currency = price_for.currency AND x.effective_from <= price_for.at
     ORDER BY x.effective_from DESC LIMIT 1;
    IF NOT FOUND THEN
        -- the errors name them: bounded (ZB018) before they are shown
        PERFORM billing.check_id(price_for.model, 'model', 'ZB018');
        PERFORM billing.check_account_settings('-', price_for.currency, NULL, NULL, NULL);
        SELECT min(x.effective_from) INTO first_from FROM billing.prices x
         WHERE x.model = price_for.model AND x.currency = price_for.currency;
        IF first_from IS NULL THEN
            RAISE EXCEPTION 'unknown model "%"', price_for.model
                USING ERRCODE = 'ZB060',
                      DETAIL = format('No price for %s in %s.', price_for.model, price_for.currency),
                      HINT = 'Add one with billing_price_set().';
        END IF;
        RAISE EXCEPTION 'no price for model "%" at %', price_for.model, price_for.at
            USING ERRCODE = 'ZB060',
                  DETAIL = format('The first price for %s in %s is effective from %s.',
                                  price_for.model, price_for.currency, first_from),
                  HINT = 'Add an earlier price with billing_price_set(), or charge a later event time.';
    END IF;
    RETURN o;
END;
$$;
REVOKE ALL ON FUNCTION billing.price_for(text, text, text, timestamptz) FROM PUBLIC;

-- the rates a usage is priced at, after the fallbacks: input, cached input
-- (else input), cache write (else input), output, reasoning (else output)
-- per 1M tokens, the fee per request (else 0), per second; NULL: no rate.
-- (No SET search_path: it names no function or operator, and without one
-- the planner inlines it into its caller's expression.)
CREATE FUNCTION billing.effective_rates(p billing.price_overrides) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[p.input_per_1m_micros,
                 coalesce(p.cached_input_per_1m_micros, p.input_per_1m_micros),
                 coalesce(p.cache_write_per_1m_micros, p.input_per_1m_micros),
                 p.output_per_1m_micros,
                 coalesce(p.reasoning_per_1m_micros, p.output_per_1m_micros),
                 coalesce(p.per_request_micros, 0),
                 p.per_second_micros]
$$;
REVOKE ALL ON FUNCTION billing.effective_rates(billing.price_overrides) FROM PUBLIC;

-- a usage -> micros, exactly: every quantity times its rate, summed in
-- numeric, rounded half up once.  Quantities: input, cached input, cache
-- write, output and reasoning tokens, requests, seconds.  Errors: ZB015
-- (NULL), ZB061 (negative, or seconds not a finite number with at most 6
-- decimals up to 10^12), ZB062 (a quantity without a rate), ZB013 (more
-- than one charge may be).
CREATE FUNCTION billing.cost_micros(p billing.price_overrides, quantities numeric[]) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    names CONSTANT text[] := ARRAY['input_tokens', 'cached_input_tokens', 'cache_write_tokens',
                                   'output_tokens', 'reasoning_tokens', 'requests', 'seconds'];
    what CONSTANT text[] := ARRAY['input tokens', 'cached input tokens', 'cache write tokens',
                                  'output tokens', 'reasoning tokens', 'requests', 'seconds'];
    rates bigint[] := billing.effective_rates(p);
    bad text;
    cost numeric;
    seconds numeric := quantities[7];
BEGIN
    IF array_position(quantities, NULL) IS NOT NULL THEN
        RAISE EXCEPTION '% must not be null', names[array_position(quantities, NULL)]
            USING ERRCODE = 'ZB015', HINT = 'Pass 0 for a kind of usage that did not occur.';
    END IF;
    IF 0 > ANY (quantities) THEN
        SELECT string_agg(format('%s %s', names[i],
                                  CASE WHEN length(quantities[i]::text) <= 64 THEN quantities[i]::text
                                       ELSE billing.show(quantities[i]::text) END), ', ' ORDER BY i) INTO bad
          FROM generate_subscripts(quantities, 1) i
         WHERE quantities[i] < 0;
        RAISE EXCEPTION 'usage counts must be zero or positive'
            USING ERRCODE = 'ZB061',
                  DETAIL = bad || '.',
                  HINT = 'Pass the counts the provider reported.';
    END IF;
    IF seconds IN ('NaN', 'Infinity') OR seconds > 1000000000000 OR seconds <> round(seconds, 6) THEN
        RAISE EXCEPTION 'seconds must be a finite number of seconds with at most 6 decimal places, at most 10^12'
            USING ERRCODE = 'ZB061',
                  DETAIL = format('The value given was %s.', billing.show(seconds::text)),
                  HINT = 'Pass the duration the provider billed, e.g. 12.5.';
    END IF;
    IF quantities[1] > 0 AND rates[1] IS NULL OR quantities[2] > 0 AND rates[2] IS NULL
       OR quantities[3] > 0 AND rates[3] IS NULL OR quantities[4] > 0 AND rates[4] IS NULL
       OR quantities[5] > 0 AND rates[5] IS NULL OR quantities[7] > 0 AND rates[7] IS NULL THEN
        FOR i IN 1 .. 7 LOOP
            IF quantities[i] > 0 AND rates[i] IS NULL THEN
                RAISE EXCEPTION 'the price of model "%" has no rate for %', p.model, what[i]
                    USING ERRCODE = 'ZB062',
                          DETAIL = format('%s %s; the %s effective from %s sets no %s rate.',
                                          names[i], quantities[i],
                                          CASE WHEN p.list_price THEN 'list price'
                                               ELSE format('override of tenant "%s"', p.tenant_id) END,
                                          p.effective_from,
                                          CASE i WHEN 1 THEN 'input' WHEN 2 THEN 'cached input (nor input)'
                                                 WHEN 3 THEN 'cache write (nor input)' WHEN 4 THEN 'output'
                                                 WHEN 5 THEN 'reasoning (nor output)' ELSE 'per-second' END),
                          HINT = 'Add a price that sets the rate (billing_price_set, billing_price_override_set), or report this usage under a kind the model has a rate for.';
            END IF;
        END LOOP;
    END IF;
    -- per 1M tokens: times 0.000001, not divided (a numeric division rounds
    -- its quotient to a scale of its choosing); a count of 0 adds 0 whatever
    -- its rate
    cost := (quantities[1] * coalesce(rates[1], 0) + quantities[2] * coalesce(rates[2], 0)
             + quantities[3] * coalesce(rates[3], 0) + quantities[4] * coalesce(rates[4], 0)
             + quantities[5] * coalesce(rates[5], 0)) * 0.000001
            + quantities[6] * rates[6] + quantities[7] * coalesce(rates[7], 0);
    cost := round(cost);        -- exact so far; half up (away from zero, all terms are >= 0)
    IF cost > 1000000000000000000 THEN      -- 10^12 units, the limit of one charge
        RAISE EXCEPTION 'cost is out of range'
            USING ERRCODE = 'ZB013',
                  DETAIL = format('The usage of %s costs %s; the largest charge is 1000000000000.',
                                  p.model, cost * 0.000001),
                  HINT = 'Check the counts; split a huge usage into several charges.';
    END IF;
    RETURN cost::bigint;
END;
$$;
REVOKE ALL ON FUNCTION billing.cost_micros(billing.price_overrides, numeric[]) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_cost(model text, input_tokens bigint DEFAULT 0, output_tokens bigint DEFAULT 0,
                             at timestamptz DEFAULT now(), currency text DEFAULT NULL,
                             cached_input_tokens bigint DEFAULT 0, cache_write_tokens bigint DEFAULT 0,
                             reasoning_tokens bigint DEFAULT 0, requests bigint DEFAULT 1,
                             seconds numeric DEFAULT 0, tenant_id text DEFAULT NULL)
    RETURNS numeric
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur text := billing_cost.currency;
    acc_currency text;
BEGIN
    IF billing_cost.model IS NULL OR billing_cost.at IS NULL THEN
        RAISE EXCEPTION 'model and at must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name; at has a default (now).';
    END IF;
    IF billing_cost.tenant_id IS NOT NULL THEN
        -- the tenant's price: its override, else the list price in its currency
        PERFORM billing.check_account_settings(billing_cost.tenant_id, NULL, NULL, NULL, NULL);
        SELECT a.currency INTO acc_currency FROM billing.accounts a WHERE a.tenant_id = billing_cost.tenant_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'account "%" does not exist', billing_cost.tenant_id
                USING ERRCODE = 'ZB001',
                      HINT = format('Create it first with billing_account_create(%L).', billing_cost.tenant_id);
        END IF;
        IF cur IS NOT NULL AND cur <> acc_currency THEN
            RAISE EXCEPTION 'account "%" is billed in %, not %', billing_cost.tenant_id, acc_currency, billing.show(cur)
                USING ERRCODE = 'ZB018',
                      HINT = 'Leave currency out: a tenant''s cost is in its account''s currency.';
        END IF;
        cur := acc_currency;
    END IF;
    cur := coalesce(cur, 'USD');
    RETURN billing.to_amount(billing.cost_micros(
        billing.price_for(billing_cost.tenant_id, billing_cost.model, cur, billing_cost.at),
        ARRAY[billing_cost.input_tokens, billing_cost.cached_input_tokens, billing_cost.cache_write_tokens,
              billing_cost.output_tokens, billing_cost.reasoning_tokens, billing_cost.requests,
              billing_cost.seconds]));
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text) IS
    'exact cost of a usage at the price effective at `at` (a tenant''s override, else the list price): each count times its rate, summed, rounded half up to 6 decimals once';
REVOKE ALL ON FUNCTION @extschema@.billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_deduct_usage(tenant_id text, model text,
                                     input_tokens bigint, output_tokens bigint,
                                     trace_id text,
                                     description text DEFAULT NULL,
                                     metadata jsonb DEFAULT NULL,
                                     event_at timestamptz DEFAULT NULL,
                                     api_key text DEFAULT NULL,
                                     cached_input_tokens bigint DEFAULT 0,
                                     cache_write_tokens bigint DEFAULT 0,
                                     reasoning_tokens bigint DEFAULT 0,
                                     requests bigint DEFAULT 1,
                                     seconds numeric DEFAULT 0)
    RETURNS billing.entry_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc     billing.accounts;
    priced  timestamptz;
    was     jsonb;
    p       billing.price_overrides;
    r       bigint[];
    q       numeric[];
    cost    bigint;
    usage   jsonb;
    used    boolean;                -- the trace id has an entry
    replay  boolean := false;       -- ... of a usage charge: p is its prices
BEGIN
    IF billing_deduct_usage.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the model name.';
    END IF;
    IF billing_deduct_usage.trace_id IS NULL THEN
        RAISE EXCEPTION 'trace_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass a value for trace_id.';
    END IF;
    -- bounded before anything shows it (a replay's error messages do); only
    -- its length, as 1.3's billing_price_set checked the models it priced
    PERFORM billing.check_text(billing_deduct_usage.model, 'model', 255);
    PERFORM billing.check_json(billing_deduct_usage.metadata, 'metadata');
    -- the account row lock first, as billing_deduct takes it: the charge is
    -- priced at the moment it is made (its created_at), not when the
    -- transaction started
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_deduct_usage.tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM billing.lock_account(billing_deduct_usage.tenant_id);   -- raises ZB015 / ZB001
    END IF;
    SELECT e.metadata INTO was FROM billing.entries e
     WHERE e.tenant_id = billing_deduct_usage.tenant_id AND e.trace_id = billing_deduct_usage.trace_id;
    used := FOUND;
    IF used AND (was ? 'input_per_1m' OR was ? 'input_per_1k') AND was ? 'price_effective_from' THEN
        BEGIN
            -- a replay: priced with the unit prices its entry records, whatever
            -- the price history says since (a price set or backdated later, an
            -- override ended), so the same request always replays
            p := ROW(billing_deduct_usage.tenant_id, billing_deduct_usage.model, acc.currency,
                     (was->>'price_effective_from')::timestamptz,
                     NOT coalesce((was->>'price_override')::boolean, false),
                     CASE WHEN was ? 'input_per_1m' THEN ((was->>'input_per_1m')::numeric * 1000000)::bigint
                          ELSE ((was->>'input_per_1k')::numeric * 1000000000)::bigint END,
                     ((was->>'cached_input_per_1m')::numeric * 1000000)::bigint,
                     ((was->>'cache_write_per_1m')::numeric * 1000000)::bigint,
                     CASE WHEN was ? 'output_per_1m' THEN ((was->>'output_per_1m')::numeric * 1000000)::bigint
                          ELSE ((was->>'output_per_1k')::numeric * 1000000000)::bigint END,
                     ((was->>'reasoning_per_1m')::numeric * 1000000)::bigint,
                     ((was->>'per_request')::numeric * 1000000)::bigint,
                     ((was->>'per_second')::numeric * 1000000)::bigint,
                     NULL)::billing.price_overrides;
            replay := true;
        EXCEPTION WHEN data_exception THEN
            -- not a usage charge's metadata (a billing_deduct's, written by its
            -- caller): priced as new, and the trace id's conflict is ZB005 below
            replay := false;
        END;
    END IF;
    IF NOT replay THEN
        IF NOT used THEN
            -- a new charge: it is priced at its event time, which must be in
            -- the accepted window (ZB019)
            PERFORM billing.check_event_at(billing_deduct_usage.event_at);
        END IF;
        priced := coalesce(billing_deduct_usage.event_at, clock_timestamp());
        p := billing.price_for(billing_deduct_usage.tenant_id, billing_deduct_usage.model, acc.currency, priced);
    END IF;
    q := ARRAY[billing_deduct_usage.input_tokens, billing_deduct_usage.cached_input_tokens,
               billing_deduct_usage.cache_write_tokens, billing_deduct_usage.output_tokens,
               billing_deduct_usage.reasoning_tokens, billing_deduct_usage.requests,
               billing_deduct_usage.seconds];
    cost := billing.cost_micros(p, q);
    IF cost = 0 THEN
        RAISE EXCEPTION 'usage costs nothing'
            USING ERRCODE = 'ZB010',
                  DETAIL = format('The usage (%s) of %s costs 0.000000.',
                                  coalesce((SELECT string_agg(format('%s %s', x.name, x.quantity), ', ' ORDER BY x.i)
                                              FROM unnest(ARRAY['input_tokens', 'cached_input_tokens',
                                                                'cache_write_tokens', 'output_tokens',
                                                                'reasoning_tokens', 'requests', 'seconds'], q)
                                                   WITH ORDINALITY AS x(name, quantity, i)
                                             WHERE x.quantity <> 0), 'none'),
                                  billing_deduct_usage.model),
                  HINT = 'Skip the charge for empty usage.';
    END IF;
    r := billing.effective_rates(p);
    IF was ? 'input_per_1k' AND NOT was ? 'input_per_1m' AND q[2] = 0 AND q[3] = 0 AND q[5] = 0
       AND q[6] = 1 AND q[7] = 0 AND p.list_price AND r[1] % 1000 = 0 AND r[4] % 1000 = 0 THEN
        -- the replay of a usage charged by 1.3: its metadata as 1.3 wrote it
        -- (prices per 1,000 tokens), so that the same request replays
        usage := jsonb_build_object(
            'model', billing_deduct_usage.model,
            'input_tokens', billing_deduct_usage.input_tokens,
            'output_tokens', billing_deduct_usage.output_tokens,
            'input_per_1k', billing.to_amount(r[1] / 1000),
            'output_per_1k', billing.to_amount(r[4] / 1000),
            'price_effective_from',
            to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
    ELSE
        usage := jsonb_build_object(
            'model', billing_deduct_usage.model,
            'input_tokens', billing_deduct_usage.input_tokens,
            'cached_input_tokens', billing_deduct_usage.cached_input_tokens,
            'cache_write_tokens', billing_deduct_usage.cache_write_tokens,
            'output_tokens', billing_deduct_usage.output_tokens,
            'reasoning_tokens', billing_deduct_usage.reasoning_tokens,
            'requests', billing_deduct_usage.requests,
            'seconds', billing_deduct_usage.seconds,
            'input_per_1m', billing.to_amount(r[1]),
            'cached_input_per_1m', billing.to_amount(r[2]),
            'cache_write_per_1m', billing.to_amount(r[3]),
            'output_per_1m', billing.to_amount(r[4]),
            'reasoning_per_1m', billing.to_amount(r[5]),
            'per_request', billing.to_amount(r[6]),
            'per_second', billing.to_amount(r[7]),
            'price_effective_from',
            to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'price_override', NOT p.list_price);
    END IF;
    -- the caller's metadata was checked above; with the breakdown added it
    -- must still fit, and the error says what was added
    usage := billing.check_json(coalesce(billing_deduct_usage.metadata, '{}') || usage,
                                'metadata with the usage breakdown');
    RETURN billing.internal_deduct(billing_deduct_usage.tenant_id, billing.to_amount(cost), billing_deduct_usage.trace_id,
                          description => billing_deduct_usage.description,
                          metadata => usage,
                          event_at => billing_deduct_usage.event_at,
                          api_key => billing_deduct_usage.api_key);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric) IS
    'charge a usage (tokens of each kind, requests, seconds) at the price effective at event time (the tenant''s override, else the list price); the breakdown and the unit prices go into the entry metadata';
REVOKE ALL ON FUNCTION @extschema@.billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric) FROM PUBLIC;
