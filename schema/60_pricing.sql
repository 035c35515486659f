/* 60_pricing: token prices with history, and charges priced from usage */

CREATE TABLE billing.prices (
    model                 text        NOT NULL,
    currency              text        NOT NULL,
    effective_from        timestamptz NOT NULL,
    input_per_1k_micros   bigint      NOT NULL,
    output_per_1k_micros  bigint      NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT prices_pkey PRIMARY KEY (model, currency, effective_from),
    CONSTRAINT prices_check CHECK (input_per_1k_micros >= 0 AND output_per_1k_micros >= 0)
);
COMMENT ON TABLE billing.prices IS 'price per 1,000 tokens per model and currency, with history: a charge uses the price effective at its event time';

CREATE TRIGGER prices_no_rewrite
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.prices
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Prices keep their history: add a new price with a later effective_from via billing_price_set().');
ALTER TABLE billing.prices ENABLE ALWAYS TRIGGER prices_no_rewrite;
SELECT pg_catalog.pg_extension_config_dump('billing.prices', '');

CREATE VIEW billing.price_list AS
SELECT p.model,
       p.currency,
       billing.to_amount(p.input_per_1k_micros)  AS input_per_1k,
       billing.to_amount(p.output_per_1k_micros) AS output_per_1k,
       p.effective_from,
       lead(p.effective_from) OVER w AS effective_until,
       p.effective_from <= now() AND coalesce(lead(p.effective_from) OVER w > now(), true) AS is_current
  FROM billing.prices p
WINDOW w AS (PARTITION BY p.model, p.currency ORDER BY p.effective_from);
COMMENT ON VIEW billing.price_list IS 'prices per model and currency with their validity window';

CREATE FUNCTION billing_price_set(model text, input_per_1k numeric, output_per_1k numeric,
                                  effective_from timestamptz DEFAULT now(),
                                  currency text DEFAULT 'USD')
    RETURNS SETOF billing.price_list
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    p_in  bigint;
    p_out bigint;
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
    IF billing_price_set.input_per_1k IS NULL OR billing_price_set.output_per_1k IS NULL THEN
        RAISE EXCEPTION 'input_per_1k and output_per_1k must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass 0 for a side that is free.';
    END IF;
    p_in := billing.to_micros(billing_price_set.input_per_1k, 'input_per_1k', true);
    p_out := billing.to_micros(billing_price_set.output_per_1k, 'output_per_1k', true);
    INSERT INTO billing.prices (model, currency, effective_from, input_per_1k_micros, output_per_1k_micros)
    VALUES (billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from, p_in, p_out)
    ON CONFLICT (model, currency, effective_from) DO NOTHING;
    IF NOT FOUND AND NOT EXISTS (
        SELECT FROM billing.prices p
         WHERE p.model = billing_price_set.model AND p.currency = billing_price_set.currency
           AND p.effective_from = billing_price_set.effective_from
           AND p.input_per_1k_micros = p_in AND p.output_per_1k_micros = p_out) THEN
        RAISE EXCEPTION 'a different price for % in % is already effective from %',
                        billing_price_set.model, billing_price_set.currency, billing_price_set.effective_from
            USING ERRCODE = 'ZB006',
                  HINT = 'Prices are history: add the new price with a later effective_from.';
    END IF;
    RETURN QUERY SELECT * FROM billing.price_list l
                  WHERE l.model = billing_price_set.model AND l.currency = billing_price_set.currency;
END;
$$;
COMMENT ON FUNCTION billing_price_set(text, numeric, numeric, timestamptz, text) IS
    'add a price per 1,000 input/output tokens for a model, effective from a time (history is kept)';
REVOKE ALL ON FUNCTION billing_price_set(text, numeric, numeric, timestamptz, text) FROM PUBLIC;

-- the price effective at a time, or ZB060
CREATE FUNCTION billing.price_at(model text, currency text, at timestamptz) RETURNS billing.prices
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p billing.prices;
    first_from timestamptz;
BEGIN
    SELECT * INTO p FROM billing.prices x
     WHERE x.model = price_at.model AND x.currency = price_at.currency AND x.effective_from <= price_at.at
     ORDER BY x.effective_from DESC LIMIT 1;
    IF NOT FOUND THEN
        SELECT min(x.effective_from) INTO first_from FROM billing.prices x
         WHERE x.model = price_at.model AND x.currency = price_at.currency;
        IF first_from IS NULL THEN
            RAISE EXCEPTION 'unknown model "%"', price_at.model
                USING ERRCODE = 'ZB060',
                      DETAIL = format('No price for %s in %s.', price_at.model, price_at.currency),
                      HINT = 'Add one with billing_price_set().';
        END IF;
        RAISE EXCEPTION 'no price for model "%" at %', price_at.model, price_at.at
            USING ERRCODE = 'ZB060',
                  DETAIL = format('The first price for %s in %s is effective from %s.',
                                  price_at.model, price_at.currency, first_from),
                  HINT = 'Add an earlier price with billing_price_set(), or charge a later event time.';
    END IF;
    RETURN p;
END;
$$;
REVOKE ALL ON FUNCTION billing.price_at(text, text, timestamptz) FROM PUBLIC;

-- tokens -> micros, exactly, rounded half up once on the total
CREATE FUNCTION billing.cost_micros(p billing.prices, input_tokens bigint, output_tokens bigint) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cost numeric;
BEGIN
    IF input_tokens IS NULL OR output_tokens IS NULL THEN
        RAISE EXCEPTION 'input_tokens and output_tokens must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass 0 for a side that was not used.';
    END IF;
    IF input_tokens < 0 OR output_tokens < 0 THEN
        RAISE EXCEPTION 'token counts must be zero or positive'
            USING ERRCODE = 'ZB061',
                  DETAIL = format('input_tokens %s, output_tokens %s.', input_tokens, output_tokens),
                  HINT = 'Pass the counts the provider reported.';
    END IF;
    cost := round((input_tokens::numeric * p.input_per_1k_micros
                   + output_tokens::numeric * p.output_per_1k_micros) / 1000);
    IF cost > 1000000000000000000 THEN      -- 10^12 units, the limit of one charge
        RAISE EXCEPTION 'cost is out of range'
            USING ERRCODE = 'ZB013',
                  DETAIL = format('%s input and %s output tokens of %s cost %s; the largest charge is 1000000000000.',
                                  input_tokens, output_tokens, p.model, round(cost / 1000000, 6)),
                  HINT = 'Check the token counts; split a huge usage into several charges.';
    END IF;
    RETURN cost::bigint;
END;
$$;
REVOKE ALL ON FUNCTION billing.cost_micros(billing.prices, bigint, bigint) FROM PUBLIC;

CREATE FUNCTION billing_cost(model text, input_tokens bigint, output_tokens bigint,
                             at timestamptz DEFAULT now(), currency text DEFAULT 'USD')
    RETURNS numeric
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF billing_cost.model IS NULL OR billing_cost.at IS NULL OR billing_cost.currency IS NULL THEN
        RAISE EXCEPTION 'model, at and currency must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the model name; at and currency have defaults.';
    END IF;
    RETURN billing.to_amount(billing.cost_micros(
        billing.price_at(billing_cost.model, billing_cost.currency, billing_cost.at),
        billing_cost.input_tokens, billing_cost.output_tokens));
END;
$$;
COMMENT ON FUNCTION billing_cost(text, bigint, bigint, timestamptz, text) IS
    'exact cost of a usage: (input_tokens * input_per_1k + output_tokens * output_per_1k) / 1000, rounded half up to 6 decimals';
REVOKE ALL ON FUNCTION billing_cost(text, bigint, bigint, timestamptz, text) FROM PUBLIC;

CREATE FUNCTION billing_deduct_usage(tenant_id text, model text,
                                     input_tokens bigint, output_tokens bigint,
                                     trace_id text,
                                     description text DEFAULT NULL,
                                     metadata jsonb DEFAULT NULL,
                                     event_at timestamptz DEFAULT NULL,
                                     api_key text DEFAULT NULL)
    RETURNS billing.entry_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acc     billing.accounts;
    priced  timestamptz;
    p       billing.prices;
    cost    bigint;
BEGIN
    IF billing_deduct_usage.model IS NULL THEN
        RAISE EXCEPTION 'model must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass the model name.';
    END IF;
    IF billing_deduct_usage.trace_id IS NULL THEN
        RAISE EXCEPTION 'trace_id must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass a value for trace_id.';
    END IF;
    PERFORM billing.check_json(billing_deduct_usage.metadata, 'metadata');
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = billing_deduct_usage.tenant_id;
    IF NOT FOUND THEN
        PERFORM billing.lock_account(billing_deduct_usage.tenant_id);   -- raises ZB015 / ZB001
    END IF;
    -- price at the usage time; a replay is priced when the original was recorded
    SELECT e.created_at INTO priced FROM billing.entries e
     WHERE e.tenant_id = billing_deduct_usage.tenant_id AND e.trace_id = billing_deduct_usage.trace_id;
    IF NOT FOUND THEN
        -- a new charge: it is priced at its event time, which must be in the
        -- accepted window (ZB019)
        PERFORM billing.check_event_at(billing_deduct_usage.event_at);
    END IF;
    priced := coalesce(billing_deduct_usage.event_at, priced, now());
    p := billing.price_at(billing_deduct_usage.model, acc.currency, priced);
    cost := billing.cost_micros(p, billing_deduct_usage.input_tokens, billing_deduct_usage.output_tokens);
    IF cost = 0 THEN
        RAISE EXCEPTION 'usage costs nothing'
            USING ERRCODE = 'ZB010',
                  DETAIL = format('%s input and %s output tokens of %s cost 0.000000.',
                                  billing_deduct_usage.input_tokens, billing_deduct_usage.output_tokens,
                                  billing_deduct_usage.model),
                  HINT = 'Skip the charge for empty usage.';
    END IF;
    RETURN @extschema@.billing_deduct(billing_deduct_usage.tenant_id, billing.to_amount(cost), billing_deduct_usage.trace_id,
                          description => billing_deduct_usage.description,
                          metadata => coalesce(billing_deduct_usage.metadata, '{}') || jsonb_build_object(
                              'model', billing_deduct_usage.model,
                              'input_tokens', billing_deduct_usage.input_tokens,
                              'output_tokens', billing_deduct_usage.output_tokens,
                              'input_per_1k', billing.to_amount(p.input_per_1k_micros),
                              'output_per_1k', billing.to_amount(p.output_per_1k_micros),
                              'price_effective_from',
                              to_char(p.effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
                          event_at => billing_deduct_usage.event_at,
                          api_key => billing_deduct_usage.api_key);
END;
$$;
COMMENT ON FUNCTION billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text) IS
    'charge token usage at the model price effective at event time; model, tokens and unit prices go into the entry metadata';
REVOKE ALL ON FUNCTION billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text) FROM PUBLIC;
