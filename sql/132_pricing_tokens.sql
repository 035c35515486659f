--
-- 132_pricing_tokens: prices the way providers quote them.  A price has
-- rates per 1M input, cached input (cache read), cache write, output and
-- reasoning tokens, a fee per request and a rate per second (NULL: not
-- offered); cached input and cache write fall back to the input rate,
-- reasoning to the output rate, a missing fee is 0.  The counts of a usage
-- are disjoint (input without the cached and cache-write tokens, output
-- without the reasoning tokens).  A tenant's override wins over the list
-- price, with history of its own.  The cost is every count times its rate,
-- summed exactly, rounded half up to a micro-unit once.  Models and tenants
-- start with "tok-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never
-- the event times below are fixed dates; charges accept event_at within
-- billing.event_at_window of now (default 7 days; see 045_bounds)
SET billing.event_at_window = '11000d';
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

--
-- The worked example of docs/sql-api.md: $3 per 1M input tokens, $0.30 per
-- 1M cached input tokens, $3.75 per 1M cache-write tokens, $15 per 1M
-- output tokens (reasoning tokens: the output rate).
--
SELECT model, currency, input_per_1m, cached_input_per_1m, cache_write_per_1m, output_per_1m,
       reasoning_per_1m, per_request, per_second, effective_from, effective_until, is_current
  FROM billing_price_set('tok-sonnet', input_per_1m => 3, output_per_1m => 15, cached_input_per_1m => 0.30,
                         cache_write_per_1m => 3.75, effective_from => '2025-01-01 00:00:00+00');
-- every token type alone, a million of each
SELECT billing_cost('tok-sonnet', input_tokens => 1000000) AS input,
       billing_cost('tok-sonnet', cached_input_tokens => 1000000) AS cached_input,
       billing_cost('tok-sonnet', cache_write_tokens => 1000000) AS cache_write,
       billing_cost('tok-sonnet', output_tokens => 1000000) AS output,
       billing_cost('tok-sonnet', reasoning_tokens => 1000000) AS reasoning;
-- a request: 1,200 new input tokens, 48,000 read from the cache, 2,000
-- written to it, 850 output tokens and 300 reasoning tokens:
-- (1200 * 3 + 48000 * 0.30 + 2000 * 3.75 + 850 * 15 + 300 * 15) / 1M
-- = (3600 + 14400 + 7500 + 12750 + 4500) / 1M = 0.042750
SELECT billing_cost('tok-sonnet', 1200, 850, cached_input_tokens => 48000, cache_write_tokens => 2000,
                    reasoning_tokens => 300) AS cost;
-- 1.3's positional call (input, output, at, currency) is unchanged
SELECT billing_cost('tok-sonnet', 1200, 850, '2025-02-01 00:00:00+00', 'USD') AS input_and_output;

--
-- Fallbacks: a price without cached-input, cache-write and reasoning rates
-- charges cached input and cache writes at the input rate and reasoning at
-- the output rate; a reasoning rate of its own wins.
--
SELECT model, input_per_1m, output_per_1m
  FROM billing_price_set('tok-plain', input_per_1m => 2, output_per_1m => 8, effective_from => '2025-01-01 00:00:00+00');
SELECT billing_cost('tok-plain', cached_input_tokens => 1000000) AS cached_as_input,
       billing_cost('tok-plain', cache_write_tokens => 1000000) AS cache_write_as_input,
       billing_cost('tok-plain', reasoning_tokens => 1000000) AS reasoning_as_output;
SELECT model, output_per_1m, reasoning_per_1m
  FROM billing_price_set('tok-o1', input_per_1m => 15, output_per_1m => 60, reasoning_per_1m => 75,
                         effective_from => '2025-01-01 00:00:00+00');
SELECT billing_cost('tok-o1', output_tokens => 1000, reasoning_tokens => 1000) AS output_and_reasoning;

--
-- A fee per request and a rate per second, alone or with tokens.
--
SELECT model, per_request, per_second
  FROM billing_price_set('tok-image', per_request => 0.04, effective_from => '2025-01-01 00:00:00+00');
SELECT billing_cost('tok-image') AS one_image,
       billing_cost('tok-image', requests => 3) AS three_images,
       billing_cost('tok-image', requests => 0) AS none;
SELECT model, per_request, per_second
  FROM billing_price_set('tok-whisper', per_second => 0.0001, effective_from => '2025-01-01 00:00:00+00');
SELECT billing_cost('tok-whisper', seconds => 60) AS one_minute,
       billing_cost('tok-whisper', seconds => 12.5) AS twelve_and_a_half,
       billing_cost('tok-whisper', seconds => 0.000001) AS a_microsecond;
SELECT model, input_per_1m, output_per_1m, per_request, per_second
  FROM billing_price_set('tok-realtime', input_per_1m => 5, output_per_1m => 20, per_request => 0.001,
                         per_second => 0.0002, effective_from => '2025-01-01 00:00:00+00');
-- 100 * 5 / 1M + 50 * 20 / 1M + 2 * 0.001 + 1.5 * 0.0002 = 0.0005 + 0.001 + 0.002 + 0.0003
SELECT billing_cost('tok-realtime', 100, 50, requests => 2, seconds => 1.5) AS cost;

--
-- Rounding: exact on the total, then half up to a micro-unit, once.
-- At 0.000001 per 1M tokens, 500,000 tokens cost exactly half a micro-unit.
--
SELECT model FROM billing_price_set('tok-round', input_per_1m => 0.000001, output_per_1m => 0.000001,
                                    per_second => 0.000001, per_request => 0,
                                    effective_from => '2025-01-01 00:00:00+00');
SELECT t.label, billing_cost('tok-round', t.i, t.o, cached_input_tokens => t.c, reasoning_tokens => t.r,
                             seconds => t.s) AS cost
  FROM (VALUES ('499999 input',                 499999, 0, 0, 0, 0),
               ('500000 input: half',           500000, 0, 0, 0, 0),
               ('1499999 input',               1499999, 0, 0, 0, 0),
               ('1500000 input: one and a half', 1500000, 0, 0, 0, 0),
               ('0.499999 s',                        0, 0, 0, 0, 0.499999),
               ('0.5 s: half',                       0, 0, 0, 0, 0.5),
               -- four quarters of a micro-unit in four types: one micro-unit,
               -- not four times zero
               ('250000 of each of four types', 250000, 250000, 250000, 250000, 0),
               ('halves of two kinds',          500000, 0, 0, 0, 0.5)) AS t(label, i, o, c, r, s);
-- exact at the largest counts too (no float anywhere)
SELECT model FROM billing_price_set('tok-big', input_per_1m => 0.000003, output_per_1m => 1000000000000,
                                    effective_from => '2025-01-01 00:00:00+00');
SELECT billing_cost('tok-big', 9223372036854775807, 0) AS all_the_tokens,
       billing_cost('tok-big', 9223372036854775807, 1) AS plus_one_output_token;

--
-- Errors.  A usage of a kind the price has no rate for (after the
-- fallbacks) cannot be priced (ZB062); negative counts and bad seconds are
-- ZB061; a cost over 10^12 is ZB013; NULL counts are ZB015.
--
SELECT model FROM billing_price_set('tok-out-only', output_per_1m => 1, effective_from => '2025-01-01 00:00:00+00');
SELECT regress_error($$SELECT billing_cost('tok-image', 10, 0)$$);
SELECT regress_error($$SELECT billing_cost('tok-plain', 10, 10, seconds => 1)$$);
SELECT regress_error($$SELECT billing_cost('tok-out-only', 0, 10, cached_input_tokens => 5)$$);
SELECT label, regress_error(sql) AS error
  FROM (VALUES
    ('negative counts',   $$SELECT billing_cost('tok-sonnet', -1, 0, cached_input_tokens => -2, requests => -1)$$),
    ('negative seconds',  $$SELECT billing_cost('tok-whisper', seconds => -0.5)$$),
    ('seconds NaN',       $$SELECT billing_cost('tok-whisper', seconds => 'NaN')$$),
    ('seconds infinite',  $$SELECT billing_cost('tok-whisper', seconds => 'Infinity')$$),
    ('seconds 7 places',  $$SELECT billing_cost('tok-whisper', seconds => 0.0000001)$$),
    ('seconds > 10^12',   $$SELECT billing_cost('tok-whisper', seconds => 1000000000000.000001)$$),
    ('cost > 10^12',      $$SELECT billing_cost('tok-big', 0, 1000001)$$),
    -- a count is a bigint: PostgreSQL refuses a larger one before the call
    ('tokens overflow',   $$SELECT billing_cost('tok-sonnet', '9223372036854775808', 0)$$)
  ) AS t(label, sql);
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('cached null',       $$SELECT billing_cost('tok-sonnet', 1, 1, cached_input_tokens => NULL)$$),
    ('requests null',     $$SELECT billing_cost('tok-sonnet', 1, 1, requests => NULL)$$),
    ('seconds null',      $$SELECT billing_cost('tok-sonnet', 1, 1, seconds => NULL)$$),
    ('model 256 chars',   $$SELECT billing_cost(repeat('m', 256), 1, 1)$$),
    ('currency garbage',  $$SELECT billing_cost('tok-sonnet', 1, 1, currency => repeat('x', 100))$$),
    ('unknown tenant',    $$SELECT billing_cost('tok-sonnet', 1, 1, tenant_id => 'tok-nobody')$$)
  ) AS t(label, sql);

-- Invalid rates (nothing is added): at most 6 decimals (ZB012), not
-- negative (ZB010), at most 10^12 (ZB013), at least one rate (ZB015).
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('7 decimals',        $$SELECT billing_price_set('tok-x', input_per_1m => 0.0000001)$$),
    ('negative',          $$SELECT billing_price_set('tok-x', cache_write_per_1m => -1)$$),
    ('NaN',               $$SELECT billing_price_set('tok-x', per_second => 'NaN')$$),
    ('over 10^12',        $$SELECT billing_price_set('tok-x', reasoning_per_1m => 1000000000000.000001)$$),
    ('no rate',           $$SELECT billing_price_set('tok-x')$$),
    ('per 1k and per 1M', $$SELECT billing_price_set('tok-x', output_per_1k => 1, output_per_1m => 1000)$$)
  ) AS t(label, sql);
SELECT count(*) AS prices FROM billing.prices WHERE model = 'tok-x';
-- the same price again is a no-op; another one at the same time is ZB006,
-- naming the rates that differ
SELECT count(*) AS prices
  FROM billing_price_set('tok-sonnet', input_per_1m => 3.0, output_per_1m => 15, cached_input_per_1m => 0.3,
                         cache_write_per_1m => 3.75, effective_from => '2025-01-01 00:00:00+00');
SELECT regress_error($$SELECT billing_price_set('tok-sonnet', input_per_1m => 3, output_per_1m => 15,
        cached_input_per_1m => 0.3, effective_from => '2025-01-01 00:00:00+00')$$);

--
-- History: a usage is priced at its event time.  From 2025-06-01 cached
-- input costs $0.25 per 1M.
--
SELECT model, cached_input_per_1m, effective_from, effective_until, is_current
  FROM billing_price_set('tok-sonnet', input_per_1m => 3, output_per_1m => 15, cached_input_per_1m => 0.25,
                         cache_write_per_1m => 3.75, effective_from => '2025-06-01 00:00:00+00');
SELECT billing_cost('tok-sonnet', cached_input_tokens => 1000000, at => '2025-05-31 23:59:59.999999+00') AS before,
       billing_cost('tok-sonnet', cached_input_tokens => 1000000, at => '2025-06-01 00:00:00+00') AS after;

SELECT tenant_id FROM billing_account_create('tok-std');
SELECT balance_after FROM billing_credit('tok-std', 100, 'tok-std-top');
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct_usage('tok-std', 'tok-sonnet', 1200, 850, 'tok-std-u1',
                            event_at => '2025-05-31 23:59:59+00', cached_input_tokens => 48000,
                            cache_write_tokens => 2000, reasoning_tokens => 300);
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct_usage('tok-std', 'tok-sonnet', 1200, 850, 'tok-std-u2',
                            event_at => '2025-06-01 00:00:00+00', cached_input_tokens => 48000,
                            cache_write_tokens => 2000, reasoning_tokens => 300);
-- the entry's metadata: the breakdown, the unit prices it was charged at
-- (after the fallbacks: reasoning at the output rate, no fee), when that
-- price took effect, whether it was the tenant's own
SELECT jsonb_pretty(metadata) FROM billing.entries WHERE tenant_id = 'tok-std' AND trace_id = 'tok-std-u2';
-- a replay returns the original; another breakdown under the same trace id
-- is a conflict (ZB005)
SELECT trace_id, amount, replayed
  FROM billing_deduct_usage('tok-std', 'tok-sonnet', 1200, 850, 'tok-std-u2',
                            event_at => '2025-06-01 00:00:00+00', cached_input_tokens => 48000,
                            cache_write_tokens => 2000, reasoning_tokens => 300);
SELECT split_part(regress_error($$SELECT billing_deduct_usage('tok-std', 'tok-sonnet', 1200, 850, 'tok-std-u2',
        event_at => '2025-06-01 00:00:00+00', cached_input_tokens => 48001, cache_write_tokens => 2000,
        reasoning_tokens => 300)$$), E'\n', 1) AS error;
-- fees and seconds through billing_deduct_usage
SELECT trace_id, amount FROM billing_deduct_usage('tok-std', 'tok-image', 0, 0, 'tok-std-img', requests => 2,
                                                  event_at => '2025-08-01 00:00:00+00');
SELECT trace_id, amount FROM billing_deduct_usage('tok-std', 'tok-whisper', 0, 0, 'tok-std-audio', seconds => 42.25,
                                                  event_at => '2025-08-01 00:00:00+00');
SELECT trace_id, amount FROM billing_deduct_usage('tok-std', 'tok-realtime', 100, 50, 'tok-std-rt', requests => 2,
                                                  seconds => 1.5, event_at => '2025-08-01 00:00:00+00');
-- refused usages charge nothing
SELECT regress_error($$SELECT billing_deduct_usage('tok-std', 'tok-image', 0, 0, 'tok-std-x', requests => 0)$$);
SELECT regress_error($$SELECT billing_deduct_usage('tok-std', 'tok-image', 1, 0, 'tok-std-x')$$);
SELECT regress_error($$SELECT billing_deduct_usage('tok-std', 'tok-whisper', 0, 0, 'tok-std-x', seconds => -1)$$);
SELECT count(*) AS entries, billing_balance('tok-std') AS balance FROM billing.entries WHERE tenant_id = 'tok-std';

--
-- Overrides: an enterprise tenant's own price wins over the list price
-- from its effective_from on.  An override is a whole price: a rate it
-- leaves out falls back within it (here cached input at the override's
-- input rate), not to the list price.
--
SELECT tenant_id, currency FROM billing_account_create('tok-ent');
SELECT balance_after FROM billing_credit('tok-ent', 100, 'tok-ent-top');
SELECT tenant_id, model, currency, input_per_1m, cached_input_per_1m, output_per_1m, effective_from,
       effective_until, is_current
  FROM billing_price_override_set('tok-ent', 'tok-sonnet', input_per_1m => 2, output_per_1m => 10,
                                  effective_from => '2025-03-01 00:00:00+00');
SELECT billing_cost('tok-sonnet', 1000000, 0, '2025-02-28 23:59:59+00', tenant_id => 'tok-ent') AS list_before,
       billing_cost('tok-sonnet', 1000000, 0, '2025-03-01 00:00:00+00', tenant_id => 'tok-ent') AS own_after,
       billing_cost('tok-sonnet', 1000000, 0, '2025-03-01 00:00:00+00', tenant_id => 'tok-std') AS other_tenant,
       billing_cost('tok-sonnet', 1000000, 0, '2025-03-01 00:00:00+00') AS list;
SELECT billing_cost('tok-sonnet', cached_input_tokens => 1000000, at => '2025-03-01 00:00:00+00',
                    tenant_id => 'tok-ent') AS cached_at_own_input_rate;
SELECT trace_id, amount
  FROM billing_deduct_usage('tok-ent', 'tok-sonnet', 1000, 1000, 'tok-ent-u1', event_at => '2025-02-15 00:00:00+00');
SELECT trace_id, amount
  FROM billing_deduct_usage('tok-ent', 'tok-sonnet', 1000, 1000, 'tok-ent-u2', event_at => '2025-03-15 00:00:00+00');
SELECT trace_id, metadata->>'input_per_1m' AS input_per_1m, metadata->>'price_override' AS price_override,
       metadata->>'price_effective_from' AS price_effective_from
  FROM billing.entries WHERE tenant_id = 'tok-ent' AND trace_id LIKE 'tok-ent-u%' ORDER BY entry_id;
-- a new override, then back to the list price
SELECT tenant_id, model, input_per_1m, output_per_1m, effective_from, effective_until
  FROM billing_price_override_set('tok-ent', 'tok-sonnet', input_per_1m => 1.5, output_per_1m => 7.5,
                                  effective_from => '2025-07-01 00:00:00+00');
SELECT tenant_id, model, input_per_1m, effective_from, effective_until
  FROM billing_price_override_end('tok-ent', 'tok-sonnet', '2025-09-01 00:00:00+00');
SELECT billing_cost('tok-sonnet', 1000000, 0, '2025-06-30 23:59:59+00', tenant_id => 'tok-ent') AS first_own,
       billing_cost('tok-sonnet', 1000000, 0, '2025-07-01 00:00:00+00', tenant_id => 'tok-ent') AS second_own,
       billing_cost('tok-sonnet', 1000000, 0, '2025-09-01 00:00:00+00', tenant_id => 'tok-ent') AS list_again;
SELECT trace_id, amount
  FROM billing_deduct_usage('tok-ent', 'tok-sonnet', 1000, 1000, 'tok-ent-u3', event_at => '2025-09-15 00:00:00+00');
SELECT trace_id, metadata->>'input_per_1m' AS input_per_1m, metadata->>'price_override' AS price_override
  FROM billing.entries WHERE tenant_id = 'tok-ent' AND trace_id = 'tok-ent-u3';
-- a model only one tenant has a price for (a private fine-tune)
SELECT tenant_id, model, per_request
  FROM billing_price_override_set('tok-ent', 'tok-private', per_request => 0.5,
                                  effective_from => '2025-01-01 00:00:00+00');
SELECT billing_cost('tok-private', tenant_id => 'tok-ent') AS own;
SELECT regress_error($$SELECT billing_cost('tok-private', tenant_id => 'tok-std')$$);
-- the same override again is a no-op, as is ending it twice; errors
SELECT count(*) AS overrides
  FROM billing_price_override_set('tok-ent', 'tok-private', per_request => 0.500000,
                                  effective_from => '2025-01-01 00:00:00+00');
SELECT count(*) AS overrides FROM billing_price_override_end('tok-ent', 'tok-sonnet', '2025-09-01 00:00:00+00');
SELECT tenant_id FROM billing_account_create('tok-closed');
SELECT status FROM billing_account_update('tok-closed', status => 'closed');
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('unknown tenant',     $$SELECT billing_price_override_set('tok-nobody', 'tok-sonnet', 1, 1)$$),
    ('closed account',     $$SELECT billing_price_override_set('tok-closed', 'tok-sonnet', 1, 1)$$),
    ('tenant null',        $$SELECT billing_price_override_set(NULL, 'tok-sonnet', 1, 1)$$),
    ('model null',         $$SELECT billing_price_override_set('tok-ent', NULL, 1, 1)$$),
    ('no rate',            $$SELECT billing_price_override_set('tok-ent', 'tok-sonnet')$$),
    ('7 decimals',         $$SELECT billing_price_override_set('tok-ent', 'tok-sonnet', 0.0000001)$$),
    ('effective_from inf', $$SELECT billing_price_override_set('tok-ent', 'tok-sonnet', 1, effective_from => 'infinity')$$),
    ('other price then',   $$SELECT billing_price_override_set('tok-ent', 'tok-private', per_request => 0.4,
                                                                effective_from => '2025-01-01 00:00:00+00')$$),
    ('rates where it ends', $$SELECT billing_price_override_set('tok-ent', 'tok-sonnet', 1, 1,
                                                                 effective_from => '2025-09-01 00:00:00+00')$$),
    ('end: no override',   $$SELECT billing_price_override_end('tok-std', 'tok-sonnet', '2025-05-01 00:00:00+00')$$),
    ('end: ended already', $$SELECT billing_price_override_end('tok-ent', 'tok-sonnet', '2025-10-01 00:00:00+00')$$),
    ('currency of another', $$SELECT billing_cost('tok-sonnet', 1, 1, currency => 'EUR', tenant_id => 'tok-ent')$$)
  ) AS t(label, sql);
SELECT regress_error($$SELECT billing_price_override_set('tok-ent', 'tok-private', per_request => 0.4,
        effective_from => '2025-01-01 00:00:00+00')$$);
-- overrides are history: never rewritten (ZB020)
BEGIN;
SELECT regress_error($$UPDATE billing.price_overrides SET per_request_micros = 0$$);
SELECT regress_error($$DELETE FROM billing.price_overrides$$);
ROLLBACK;

--
-- billing.price_override_list: each tenant's own prices with their windows
-- (the return to the list price ends the second one and is no row itself).
--
SELECT tenant_id, model, currency, input_per_1m, cached_input_per_1m, cache_write_per_1m, output_per_1m,
       reasoning_per_1m, per_request, per_second, effective_from, effective_until, is_current
  FROM billing.price_override_list WHERE tenant_id LIKE 'tok-%' ORDER BY tenant_id, model, effective_from;

--
-- billing.usage_by_token_type: the breakdown of the priced charges per day,
-- model and type; cost is each part's exact share before the charge's one
-- rounding, so per charge the parts add up to the amount within half a
-- micro-unit.
--
SELECT day, model, token_type, charges, quantity, cost
  FROM billing.usage_by_token_type WHERE tenant_id = 'tok-std' ORDER BY day, model, token_type;
SELECT u.model, u.cost AS parts, -sum(e.amount_micros) * 0.000001 AS charged,
       abs(u.cost + sum(e.amount_micros) * 0.000001) <= 0.0000005 * count(*) AS within_rounding
  FROM (SELECT model, sum(cost) AS cost FROM billing.usage_by_token_type WHERE tenant_id IN ('tok-std', 'tok-ent')
         GROUP BY model) u
  JOIN billing.entries e ON e.metadata->>'model' = u.model AND e.tenant_id IN ('tok-std', 'tok-ent')
                        AND e.kind = 'deduct'
 GROUP BY u.model, u.cost ORDER BY u.model;

--
-- billing.price_list: the list prices per 1M tokens, per request, per
-- second, with their windows.
--
SELECT model, currency, input_per_1m, cached_input_per_1m, cache_write_per_1m, output_per_1m,
       reasoning_per_1m, per_request, per_second, effective_from, effective_until, is_current
  FROM billing.price_list WHERE model LIKE 'tok-%' ORDER BY model, currency, effective_from;

--
-- A replay is priced with the unit prices its entry records: a price set,
-- backdated or ended after the charge never turns the same request into a
-- conflict (ZB005) or an unknown model (ZB060).
--
SELECT tenant_id FROM billing_account_create('tok-rp');
SELECT kind FROM billing_credit('tok-rp', 100, 'tok-rp-top');
SELECT model FROM billing_price_set('rp-model', input_per_1m => 1, output_per_1m => 2,
                                    effective_from => '2020-01-01 00:00+00');
SELECT amount, replayed FROM billing_deduct_usage('tok-rp', 'rp-model', 1000000, 0, 'tok-rp-u1');
-- a new price from now on, and one backdated over the charge
SELECT model FROM billing_price_set('rp-model', input_per_1m => 5, output_per_1m => 5);
SELECT model FROM billing_price_set('rp-model', input_per_1m => 7, output_per_1m => 7,
                                    effective_from => now() - interval '1 hour');
SELECT amount, replayed FROM billing_deduct_usage('tok-rp', 'rp-model', 1000000, 0, 'tok-rp-u1');
-- a new request is priced at today's price
SELECT amount, replayed FROM billing_deduct_usage('tok-rp', 'rp-model', 1000000, 0, 'tok-rp-u2');
-- the same trace id with other counts is still a conflict
SELECT split_part(regress_error($$SELECT billing_deduct_usage('tok-rp', 'rp-model', 2000000, 0, 'tok-rp-u1')$$),
                  E'\n', 1);
-- an override for a model without a list price, ended after a charge
SELECT model FROM billing_price_override_set('tok-rp', 'rp-private', per_request => 0.01,
                                             effective_from => '2020-01-01 00:00+00');
SELECT amount FROM billing_deduct_usage('tok-rp', 'rp-private', 0, 0, 'tok-rp-p1');
SELECT model FROM billing_price_override_end('tok-rp', 'rp-private', now() - interval '1 minute');
SELECT amount, replayed FROM billing_deduct_usage('tok-rp', 'rp-private', 0, 0, 'tok-rp-p1');
SELECT split_part(regress_error($$SELECT billing_deduct_usage('tok-rp', 'rp-private', 0, 0, 'tok-rp-p2')$$),
                  E'\n', 1);

--
-- Only billing_deduct_usage() marks a charge as priced usage (the metadata
-- key price_effective_from, which billing.usage_by_token_type reads): any
-- other charge with that key is refused (ZB018), so the view never shows a
-- breakdown the caller made up.  A usage charge's own metadata may carry the
-- key: the breakdown's keys replace the caller's.
--
SELECT tenant_id FROM billing_account_create('tok-fake');
SELECT kind FROM billing_credit('tok-fake', 100, 'tok-fake-top');
SELECT regress_error($$SELECT billing_deduct('tok-fake', 1, 'tok-fake-1',
    metadata => '{"model": "gpt-4o", "input_tokens": 1000000, "input_per_1m": 500,
                  "price_effective_from": "2020-01-01T00:00:00.000000Z"}')$$);
SELECT split_part(regress_error($$SELECT billing_try_deduct('tok-fake', 1, 'tok-fake-2',
    metadata => '{"price_effective_from": null}')$$), E'\n', 1);
SELECT split_part(regress_error($$SELECT * FROM billing_deduct_many(ARRAY['tok-fake', 'tok-fake'], ARRAY[1, 1],
    ARRAY['tok-fake-3', 'tok-fake-4'], NULL,
    ARRAY['{}', '{"price_effective_from": 1}']::jsonb[], NULL)$$), E'\n', 1);
-- ... and the refused try_deduct recorded no rejection
SELECT count(*) AS rejections FROM billing.rejections WHERE tenant_id = 'tok-fake';
-- a capture is no priced usage either: refused, and the hold is untouched
-- (a capture without the key, with the same trace id, then goes through)
SELECT status FROM billing_hold('tok-fake', 2, 'tok-fake-hold');
SELECT regress_error($$SELECT billing_capture('tok-fake', 'tok-fake-hold', 1, 'tok-fake-cap',
    metadata => '{"model": "gpt-4o", "price_effective_from": "2020-01-01T00:00:00.000000Z"}')$$);
SELECT status, captured_micros FROM billing.holds WHERE trace_id = 'tok-fake-hold';
SELECT amount, hold_status, replayed FROM billing_capture('tok-fake', 'tok-fake-hold', 1, 'tok-fake-cap',
    final => true, metadata => '{"model": "gpt-4o"}');
-- A replay is no new charge: one that has the key (1.3's billing_deduct let
-- it through; written here through billing.internal_deduct, which only the
-- extension's own SQL calls) returns its entry, as every replay does.
SELECT amount FROM billing.internal_deduct('tok-fake', 0.5, 'tok-fake-13', metadata => '{"price_effective_from": "1.3"}');
SELECT amount, replayed FROM billing_deduct('tok-fake', 0.5, 'tok-fake-13', metadata => '{"price_effective_from": "1.3"}');
SELECT status, replayed FROM billing_try_deduct('tok-fake', 0.5, 'tok-fake-13', metadata => '{"price_effective_from": "1.3"}');
SELECT status, replayed FROM billing_deduct_many(ARRAY['tok-fake'], ARRAY[0.5], ARRAY['tok-fake-13'], NULL,
                                                 ARRAY['{"price_effective_from": "1.3"}']::jsonb[], NULL);
-- the key nested deeper, or under another name, is the caller's own
SELECT amount, replayed FROM billing_deduct('tok-fake', 1, 'tok-fake-5',
    metadata => '{"request": {"price_effective_from": "x"}, "price_effective": "y"}');
SELECT amount FROM billing_deduct_usage('tok-fake', 'tok-plain', 1000, 0, 'tok-fake-u1',
                                        metadata => '{"price_effective_from": "forged", "input_per_1m": 1}');
SELECT metadata->>'price_effective_from' AS price_effective_from, metadata->>'input_per_1m' AS input_per_1m
  FROM billing.entries WHERE trace_id = 'tok-fake-u1';
SELECT token_type, charges, quantity FROM billing.usage_by_token_type WHERE tenant_id = 'tok-fake';
-- the breakdown counts against the metadata's 16 kB: metadata that fits alone
-- but not with it is refused naming both (ZB018)
SELECT regress_error(format($$SELECT billing_deduct_usage('tok-fake', 'tok-plain', 1000, 0, 'tok-fake-u2', metadata => %L)$$,
                            jsonb_build_object('note', repeat('x', 16000))));
-- the same once the account has a recorded rejection (the idempotency probe
-- then runs before the key is looked at); and the trace id of such a charge
-- with other metadata is a conflict (ZB005), as for any replay
SELECT status FROM billing_try_deduct('tok-fake', 1000, 'tok-fake-poor');
SELECT split_part(regress_error($$SELECT billing_deduct('tok-fake', 1, 'tok-fake-6', metadata => '{"price_effective_from": 1}')$$), E'\n', 1);
SELECT amount, replayed FROM billing_deduct('tok-fake', 0.5, 'tok-fake-13', metadata => '{"price_effective_from": "1.3"}');
SELECT split_part(regress_error($$SELECT billing_deduct('tok-fake', 0.5, 'tok-fake-13', metadata => '{"price_effective_from": "2"}')$$), E'\n', 1);
-- nothing was charged by the refused calls
SELECT trace_id FROM billing.entries WHERE tenant_id = 'tok-fake' ORDER BY entry_id;

SELECT * FROM billing_verify() WHERE tenant_id LIKE 'tok-%';
RESET timezone;
RESET datestyle;
