--
-- 130_pricing: token prices per model and currency, with history, through
-- the API of 1.3 (billing_price_set with prices per 1,000 input and output
-- tokens, billing_cost and billing_deduct_usage with input and output
-- tokens), which 1.4 keeps: a price per 1,000 tokens is stored exactly as a
-- price per 1M tokens (x 1000), billing.price_list shows it per 1M;
-- billing_cost() computes (input_tokens * input_per_1m + output_tokens *
-- output_per_1m) / 1M exactly and rounds half up once, to micro-units;
-- billing_deduct_usage() charges a usage at the price effective at its
-- event time and records model, tokens and unit prices in the entry's
-- metadata.  The other kinds of tokens, fees, per-second rates and
-- overrides: 132_pricing_tokens.  Models and tenants start with "prc-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never
-- the event times below are fixed dates; charges accept event_at within
-- billing.event_at_window of now (default 7 days; see 045_bounds)
SET billing.event_at_window = '11000d';

--
-- Price history.  billing_price_set returns the model's price list in
-- that currency: each price is effective until the next one starts.
--
SELECT model, currency, input_per_1m, output_per_1m, effective_from, effective_until, is_current
  FROM billing_price_set('prc-gpt', 2.5, 10, '2024-01-01 00:00:00+00');
SELECT model, currency, input_per_1m, output_per_1m, effective_from, effective_until, is_current
  FROM billing_price_set('prc-gpt', 1.25, 5, '2024-06-01 00:00:00+00');
-- a price in the future is not current yet
SELECT model, currency, input_per_1m, output_per_1m, effective_from, effective_until, is_current
  FROM billing_price_set('prc-gpt', 1, 4, '2100-01-01 00:00:00+00');
-- the same price again changes nothing; another price at the same time is
-- a conflict (ZB006): history is not rewritten
SELECT count(*) AS prices
  FROM billing_price_set('prc-gpt', 1.250000, 5.0, '2024-06-01 02:00:00+02');
SELECT regress_error($$SELECT billing_price_set('prc-gpt', 1.25, 5.000001, '2024-06-01 00:00:00+00')$$);
SELECT regress_error($$SELECT billing_price_set('prc-gpt', 1.3, 5, '2024-06-01 00:00:00+00')$$);
-- each currency has its own history
SELECT model, currency, input_per_1m, output_per_1m, effective_from, is_current
  FROM billing_price_set('prc-gpt', 2, 8, '2024-01-01 00:00:00+00', 'EUR');
SELECT count(*) AS prices FROM billing.prices WHERE model = 'prc-gpt';
-- prices are append-only (ZB020), even for the owner
BEGIN;
SELECT regress_error($$UPDATE billing.prices SET input_per_1m_micros = 0 WHERE model = 'prc-gpt'$$);
SELECT regress_error($$DELETE FROM billing.prices WHERE model = 'prc-gpt'$$);
ROLLBACK;

-- Invalid prices (first lines; nothing is added).
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('model null',          $$SELECT billing_price_set(NULL, 1, 1, '2024-01-01 00:00:00+00')$$),
    ('model empty',         $$SELECT billing_price_set('', 1, 1, '2024-01-01 00:00:00+00')$$),
    ('model 256 chars',     $$SELECT billing_price_set(repeat('m', 256), 1, 1, '2024-01-01 00:00:00+00')$$),
    ('no rate',             $$SELECT billing_price_set('prc-x', NULL, NULL, '2024-01-01 00:00:00+00')$$),
    ('per 1k and per 1M',   $$SELECT billing_price_set('prc-x', 1, 1, '2024-01-01 00:00:00+00', input_per_1m => 1000)$$),
    ('input 10^9 per 1k',   $$SELECT billing_price_set('prc-x', 1000000000.000001, 1, '2024-01-01 00:00:00+00')$$),
    ('input negative',      $$SELECT billing_price_set('prc-x', -0.000001, 1, '2024-01-01 00:00:00+00')$$),
    ('output NaN',          $$SELECT billing_price_set('prc-x', 1, 'NaN', '2024-01-01 00:00:00+00')$$),
    ('input 7 decimals',    $$SELECT billing_price_set('prc-x', 0.0000001, 1, '2024-01-01 00:00:00+00')$$),
    ('effective_from null', $$SELECT billing_price_set('prc-x', 1, 1, NULL)$$),
    ('effective_from inf',  $$SELECT billing_price_set('prc-x', 1, 1, 'infinity')$$),
    ('currency lower case', $$SELECT billing_price_set('prc-x', 1, 1, '2024-01-01 00:00:00+00', 'usd')$$),
    ('currency null',       $$SELECT billing_price_set('prc-x', 1, 1, '2024-01-01 00:00:00+00', NULL)$$)
  ) AS t(label, sql);
SELECT regress_error($$SELECT billing_price_set('prc-x', -1, 1, '2024-01-01 00:00:00+00')$$);
SELECT count(*) AS prices FROM billing.prices WHERE model = 'prc-x';

--
-- billing_cost: the price effective at `at` (default now()); a price
-- applies from its effective_from on, inclusive.
--
SELECT billing_cost('prc-gpt', 1000, 1000, '2024-03-01 00:00:00+00') AS march,
       billing_cost('prc-gpt', 1000, 1000, '2024-05-31 23:59:59.999999+00') AS last_old,
       billing_cost('prc-gpt', 1000, 1000, '2024-06-01 00:00:00+00') AS first_new,
       billing_cost('prc-gpt', 1000, 1000) AS now,
       billing_cost('prc-gpt', 1000, 1000, '2100-01-01 00:00:00+00') AS in_2100,
       billing_cost('prc-gpt', 1000, 1000, '2024-03-01 00:00:00+00', 'EUR') AS march_eur;
SELECT billing_cost('prc-gpt', 0, 0) AS nothing,
       billing_cost('prc-gpt', 1, 0) AS one_input_token,
       billing_cost('prc-gpt', 0, 1) AS one_output_token,
       billing_cost('prc-gpt', 1000000000, 1000000000) AS a_billion_each;

-- Rounding: exact arithmetic on the total, then half up to a micro-unit.
-- At 0.000001 per 1,000 tokens, 500 tokens cost exactly half a micro-unit
-- (rounded up to 0.000001) and 499 tokens a bit less (rounded down to 0).
SELECT model, input_per_1m, output_per_1m
  FROM billing_price_set('prc-round', 0.000001, 0.000001, '2024-01-01 00:00:00+00');
SELECT t.input_tokens, t.output_tokens,
       billing_cost('prc-round', t.input_tokens, t.output_tokens) AS cost
  FROM (VALUES (499, 0), (500, 0), (501, 0), (1499, 0), (1500, 0), (2500, 0),
               (0, 500), (0, 499),
               -- rounded once on the total: two halves make one micro-unit, not two
               (500, 500), (499, 500), (250, 250)) AS t(input_tokens, output_tokens);
SELECT model, input_per_1m, output_per_1m
  FROM billing_price_set('prc-odd', 0.000003, 0.000007, '2024-01-01 00:00:00+00');
SELECT billing_cost('prc-odd', 100, 50) AS "650/1000 micro",
       billing_cost('prc-odd', 100, 7) AS "349/1000 micro",
       billing_cost('prc-odd', 1, 71) AS "500/1000 micro";

-- Errors: unknown model or currency, a time before the first price
-- (ZB060); negative token counts (ZB061); NULLs (ZB015).
SELECT regress_error($$SELECT billing_cost('prc-nope', 1, 1)$$);
SELECT regress_error($$SELECT billing_cost('prc-gpt', 1, 1, currency => 'GBP')$$);
SELECT regress_error($$SELECT billing_cost('prc-gpt', 1, 1, '2023-12-31 23:59:59.999999+00')$$);
SELECT regress_error($$SELECT billing_cost('prc-gpt', -1, 0)$$);
SELECT regress_error($$SELECT billing_cost('prc-gpt', 5, -2)$$);
SELECT regress_error($$SELECT billing_cost('prc-gpt', NULL, 0)$$);
SELECT regress_error($$SELECT billing_cost('prc-gpt', 1, 1, NULL)$$);
SELECT regress_error($$SELECT billing_cost(NULL, 1, 1)$$);

--
-- billing_deduct_usage: a deduct of the usage's cost, at the price
-- effective at event_at.  The entry's metadata gets the model, the token
-- counts, the unit prices and when that price took effect, on top of the
-- caller's metadata.
--
SELECT tenant_id FROM billing_account_create('prc-a');
SELECT balance_after FROM billing_credit('prc-a', 100, 'prc-a-topup');
SELECT tenant_id, trace_id, kind, amount, balance_after, version, replayed
  FROM billing_deduct_usage('prc-a', 'prc-gpt', 1200, 300, 'prc-a-u1', 'chat',
                            '{"request": "r-1", "model": "not this one"}',
                            '2024-03-01 12:00:00+00');
SELECT trace_id, kind, amount, description, model, event_at,
       metadata - 'price_effective_from' AS metadata,
       (metadata->>'price_effective_from')::timestamptz = '2024-01-01 00:00:00+00' AS price_from_2024_01_01
  FROM billing.ledger WHERE tenant_id = 'prc-a' AND trace_id = 'prc-a-u1';
-- the cost is the one billing_cost gives for the same usage and time
SELECT billing_cost('prc-gpt', 1200, 300, '2024-03-01 12:00:00+00') AS cost;

-- A replay returns the original entry, also from a session with another
-- time zone setting; the same trace id with other tokens is a conflict.
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct_usage('prc-a', 'prc-gpt', 1200, 300, 'prc-a-u1', 'chat',
                            '{"request": "r-1", "model": "not this one"}',
                            '2024-03-01 12:00:00+00');
SET timezone = 'Asia/Kolkata';
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct_usage('prc-a', 'prc-gpt', 1200, 300, 'prc-a-u1', 'chat',
                            '{"request": "r-1", "model": "not this one"}',
                            '2024-03-01 12:00:00+00');
RESET timezone;
SELECT split_part(regress_error($$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 1200, 301, 'prc-a-u1', 'chat',
        '{"request": "r-1", "model": "not this one"}', '2024-03-01 12:00:00+00')$$), E'\n', 1) AS error;
SELECT count(*) AS entries, billing_balance('prc-a') AS balance
  FROM billing.entries WHERE tenant_id = 'prc-a';

-- Usage after the price change is charged at the new price; the usage
-- views see model and tokens.
SELECT trace_id, amount, balance_after
  FROM billing_deduct_usage('prc-a', 'prc-gpt', 1200, 300, 'prc-a-u2',
                            event_at => '2024-07-01 12:00:00+00');
SELECT day, model, charges, spent, input_tokens, output_tokens
  FROM billing.usage_by_model WHERE tenant_id = 'prc-a' ORDER BY day;

-- Without event_at the price is the one effective now; a replay is priced
-- when the original was recorded, so a price added since does not turn it
-- into a conflict.
SELECT model FROM billing_price_set('prc-live', 1, 1, '2024-01-01 00:00:00+00') LIMIT 1;
SELECT trace_id, amount, balance_after FROM billing_deduct_usage('prc-a', 'prc-live', 1000, 0, 'prc-a-u3');
SELECT count(*) AS prices FROM billing_price_set('prc-live', 3, 3, now());
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct_usage('prc-a', 'prc-live', 1000, 0, 'prc-a-u3');
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct_usage('prc-a', 'prc-live', 1000, 0, 'prc-a-u4');

-- The account's currency picks the price list.
SELECT tenant_id, currency FROM billing_account_create('prc-e', currency => 'EUR');
SELECT balance_after FROM billing_credit('prc-e', 10, 'prc-e-topup');
SELECT trace_id, amount
  FROM billing_deduct_usage('prc-e', 'prc-gpt', 1000, 0, 'prc-e-u1', event_at => '2024-03-01 00:00:00+00');
SELECT trace_id, metadata->>'input_per_1m' AS input_per_1m, metadata->>'output_per_1m' AS output_per_1m
  FROM billing.entries WHERE tenant_id = 'prc-e' AND trace_id = 'prc-e-u1';
SELECT regress_error($$SELECT billing_deduct_usage('prc-e', 'prc-round', 1000, 0, 'prc-e-u2')$$);

-- Through an API key: the key is on the entry, its budget applies.
SELECT key_id, budget FROM billing_api_key_create('prc-a', 'prc-key', 1, 'lifetime');
SELECT trace_id, amount FROM billing_deduct_usage('prc-a', 'prc-gpt', 200, 0, 'prc-a-u5',
                                                  event_at => '2024-07-01 12:00:00+00',
                                                  api_key => 'prc-key');
SELECT trace_id, api_key, model FROM billing.ledger WHERE tenant_id = 'prc-a' AND trace_id = 'prc-a-u5';
SELECT regress_error($$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 800, 1, 'prc-a-u6',
        event_at => '2024-07-01 12:00:00+00', api_key => 'prc-key')$$);

-- Refused usages charge nothing: an unknown model, an event before the
-- first price (ZB060), negative tokens (ZB061), a usage that costs nothing
-- (ZB010), and the usual argument errors.
SELECT regress_error($$SELECT billing_deduct_usage('prc-a', 'prc-nope', 1, 1, 'prc-a-x')$$);
SELECT regress_error($$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 1, 1, 'prc-a-x',
        event_at => '2023-06-01 00:00:00+00')$$);
SELECT regress_error($$SELECT billing_deduct_usage('prc-a', 'prc-gpt', -1, 1, 'prc-a-x')$$);
SELECT regress_error($$SELECT billing_deduct_usage('prc-a', 'prc-round', 499, 0, 'prc-a-x')$$);
SELECT regress_error($$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 0, 0, 'prc-a-x')$$);
-- The model is bounded before a replay's messages show it (ZB018), and an
-- entry whose metadata its caller wrote (a billing_deduct's, with strings
-- where a usage charge records its prices) is no usage charge to replay: the
-- trace id conflicts (ZB005), not 22P02 from reading those strings.  (1.3's
-- billing_deduct wrote such metadata; 1.4's refuses the key
-- price_effective_from, test 132, so the entry is written here through
-- billing.internal_deduct, which only the extension's own SQL calls.)
SELECT split_part(regress_error($$SELECT billing_deduct_usage('prc-a', repeat('m', 100000), 0, 0, 'prc-a-u5', requests => 0)$$), E'\n', 1);
SELECT tenant_id FROM billing_account_create('prc-nu');
SELECT balance_after FROM billing_credit('prc-nu', 1, 'prc-nu-top-up');
SELECT entry_id > 0 AS deducted FROM billing.internal_deduct('prc-nu', 0.01, 'prc-nu-1',
       metadata => '{"input_per_1m": "many", "price_effective_from": "yesterday-ish"}');
SELECT split_part(regress_error($$SELECT billing_deduct_usage('prc-nu', 'prc-gpt', 1, 1, 'prc-nu-1')$$), E'\n', 1);
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('tenant null',       $$SELECT billing_deduct_usage(NULL, 'prc-gpt', 1, 1, 'prc-a-x')$$),
    ('unknown tenant',    $$SELECT billing_deduct_usage('prc-nobody', 'prc-gpt', 1, 1, 'prc-a-x')$$),
    ('model null',        $$SELECT billing_deduct_usage('prc-a', NULL, 1, 1, 'prc-a-x')$$),
    ('tokens null',       $$SELECT billing_deduct_usage('prc-a', 'prc-gpt', NULL, 1, 'prc-a-x')$$),
    ('trace null',        $$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 1, 1, NULL)$$),
    ('trace empty',       $$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 1, 1, '')$$),
    ('metadata array',    $$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 1, 1, 'prc-a-x', metadata => '[]')$$),
    ('event_at infinity', $$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 1, 1, 'prc-a-x', event_at => 'infinity')$$),
    ('unknown api_key',   $$SELECT billing_deduct_usage('prc-a', 'prc-gpt', 1, 1, 'prc-a-x', api_key => 'nokey')$$)
  ) AS t(label, sql);
-- an empty tenant id is an invalid tenant id (ZB016), as for billing_deduct
SELECT split_part(regress_error($$SELECT billing_deduct_usage('', 'prc-gpt', 1, 1, 'prc-a-x')$$),
                  ':', 1) AS sqlstate;
SELECT trace_id, kind, amount, balance_after FROM billing.ledger
 WHERE tenant_id = 'prc-a' ORDER BY version;

--
-- billing.price_list: every price with its validity window.
--
SELECT model, currency, input_per_1m, output_per_1m, effective_from, effective_until, is_current
  FROM billing.price_list WHERE model LIKE 'prc-%' AND model <> 'prc-live'
 ORDER BY model, currency, effective_from;
SELECT model, input_per_1m, effective_until IS NOT NULL AS ended, is_current
  FROM billing.price_list WHERE model = 'prc-live' ORDER BY effective_from;

SELECT * FROM billing_verify() WHERE tenant_id LIKE 'prc-%';
