--
-- 100_holds: two-phase charges.  billing_hold reserves funds: it lowers
-- available (balance + credit limit - open holds), not the balance.
-- billing_capture charges against the hold, in one or several captures,
-- each a ledger entry of kind 'capture'; billing_release frees what is
-- left; a hold expires at its expires_at without anything running.  Every
-- operation is idempotent by its own trace id and journalled in
-- billing.hold_events.  Tenants start with "hold-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never
-- the event times below are fixed dates; charges accept event_at within
-- billing.event_at_window of now (default 7 days; see 045_bounds)
SET billing.event_at_window = '11000d';

SELECT tenant_id, balance, credit_limit, on_hold, available
  FROM billing_account_create('hold-a', credit_limit => 10);
SELECT balance_after FROM billing_credit('hold-a', 100, 'hold-a-topup');

--
-- A hold: open, nothing captured or released, expiring after expires_in
-- (15 minutes by default).  The result carries the account's available
-- funds after the call.
--
SELECT tenant_id, trace_id, status, amount, captured, released, remaining,
       expires_at - now() >= interval '15 minutes'
           AND expires_at - now() < interval '16 minutes' AS expires_in_15_minutes,
       available, replayed
  FROM billing_hold('hold-a', 30, 'hold-a-h1', description => 'chat session',
                    metadata => '{"model": "m1"}');
SELECT hold_id AS h1_id FROM billing.holds WHERE tenant_id = 'hold-a' AND trace_id = 'hold-a-h1' \gset
-- the balance is untouched; on_hold and available show the reservation
SELECT billing_balance('hold-a') AS balance;
SELECT balance, credit_limit, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-a';
SELECT hold_id = :h1_id AS same_hold, trace_id, api_key, amount, captured, remaining,
       expires_at > now() AS not_expired, description
  FROM billing.open_holds WHERE tenant_id = 'hold-a';
-- a hold writes no ledger entry (the only one is the top-up)
SELECT trace_id, kind FROM billing.entries WHERE tenant_id = 'hold-a';

-- The same hold again (same trace id, same amount) is a replay: the same
-- hold, replayed = true, nothing reserved twice.
SELECT hold_id = :h1_id AS same_hold, status, amount, remaining, available, replayed
  FROM billing_hold('hold-a', 30, 'hold-a-h1', description => 'chat session',
                    metadata => '{"model": "m1"}');
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'hold-a';
-- the same trace id with another amount is a conflict (ZB005), and so is
-- the same hold through an API key (SQLSTATE only)
SELECT regress_error($$SELECT billing_hold('hold-a', 31, 'hold-a-h1')$$);
SELECT key_id FROM billing_api_key_create('hold-a', 'hold-a-key');
SELECT split_part(regress_error($$SELECT billing_hold('hold-a', 30, 'hold-a-h1',
        description => 'chat session', metadata => '{"model": "m1"}', api_key => 'hold-a-key')$$),
        ':', 1) AS sqlstate;

-- Holds count against charges: available is what a deduct or another
-- hold can take (ZB004 names the amount on hold).
SELECT regress_error($$SELECT billing_deduct('hold-a', 80.000001, 'hold-a-d1')$$);
SELECT regress_error($$SELECT billing_hold('hold-a', 80.000001, 'hold-a-h9')$$);

--
-- Captures: each one is a ledger entry of kind 'capture' that references
-- the hold.  Within the hold a capture moves money from "on hold" to
-- "charged": the balance goes down, available stays the same.
--
SELECT hold_id = :h1_id AS same_hold, tenant_id, trace_id, amount, balance_after,
       hold_captured, hold_remaining, hold_status, replayed
  FROM billing_capture('hold-a', 'hold-a-h1', 10, 'hold-a-c1', description => 'first turn');
SELECT entry_id AS cap1_id FROM billing.entries WHERE tenant_id = 'hold-a' AND trace_id = 'hold-a-c1' \gset
SELECT trace_id, amount, balance_after, hold_captured, hold_remaining, hold_status, replayed
  FROM billing_capture('hold-a', 'hold-a-h1', 5, 'hold-a-c2');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-a';
SELECT trace_id, kind, amount, balance_after, description, hold_id = :h1_id AS on_hold_h1
  FROM billing.ledger WHERE tenant_id = 'hold-a' ORDER BY version;

-- A capture replayed by its trace id returns the original entry (amount
-- and balance_after as they were) and the hold as it is now; nothing is
-- charged twice.
SELECT entry_id = :cap1_id AS same_entry, amount, balance_after, hold_captured,
       hold_remaining, hold_status, replayed
  FROM billing_capture('hold-a', 'hold-a-h1', 10, 'hold-a-c1', description => 'first turn');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-a';

-- Trace id conflicts (ZB005): a capture trace id reused with another
-- amount or for another hold, a trace id already used by a deduct (hold
-- operations and ledger entries share the trace ids of the captures), a
-- deduct reusing a capture's trace id, and any other hold operation
-- under a used trace id.
SELECT status FROM billing_hold('hold-a', 5, 'hold-a-h2');
SELECT balance_after FROM billing_deduct('hold-a', 1, 'hold-a-d2');
SELECT regress_error($$SELECT billing_capture('hold-a', 'hold-a-h1', 6, 'hold-a-c1')$$);
SELECT regress_error($$SELECT billing_capture('hold-a', 'hold-a-h2', 10, 'hold-a-c1')$$);
SELECT regress_error($$SELECT billing_capture('hold-a', 'hold-a-h1', 1, 'hold-a-d2')$$);
SELECT regress_error($$SELECT billing_deduct('hold-a', 10, 'hold-a-c1')$$);
SELECT regress_error($$SELECT billing_capture('hold-a', 'hold-a-h1', 1, 'hold-a-h1')$$);
SELECT regress_error($$SELECT billing_release('hold-a', 'hold-a-h1', 'hold-a-c2')$$);
SELECT regress_error($$SELECT billing_hold('hold-a', 5, 'hold-a-c2')$$);
-- a replay must be the same request: the same capture with final => true
-- (which would release the rest of the hold) is a conflict too
SELECT split_part(regress_error($$SELECT billing_capture('hold-a', 'hold-a-h1', 10, 'hold-a-c1',
        final => true, description => 'first turn')$$), ':', 1) AS sqlstate;
-- none of them changed anything
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-a';

--
-- Release frees what is left and settles the hold (status 'released').
-- A release is idempotent by its trace id; releasing a hold that is
-- already settled or expired frees nothing (0) and is not an error.
--
SELECT hold_id = :h1_id AS same_hold, trace_id, status, amount, captured, released, remaining,
       available, replayed
  FROM billing_release('hold-a', 'hold-a-h1', 'hold-a-r1');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-a';
SELECT status, captured, released, remaining, available, replayed
  FROM billing_release('hold-a', 'hold-a-h1', 'hold-a-r1');
SELECT status, captured, released, remaining, available, replayed
  FROM billing_release('hold-a', 'hold-a-h1', 'hold-a-r2');
SELECT count(*) AS open_holds FROM billing.open_holds WHERE tenant_id = 'hold-a' AND trace_id = 'hold-a-h1';
-- a settled hold can be neither captured nor extended (ZB032)
SELECT regress_error($$SELECT billing_capture('hold-a', 'hold-a-h1', 1, 'hold-a-c3')$$);
SELECT regress_error($$SELECT billing_hold_extend('hold-a', 'hold-a-h1')$$);
-- a hold that does not exist (ZB030): hold trace ids are per tenant
SELECT tenant_id FROM billing_account_create('hold-other');
SELECT regress_error($$SELECT billing_capture('hold-a', 'hold-a-nope', 1, 'hold-a-c3')$$);
SELECT regress_error($$SELECT billing_release('hold-a', 'hold-a-nope', 'hold-a-r3')$$);
SELECT regress_error($$SELECT billing_hold_extend('hold-a', 'hold-a-nope')$$);
SELECT regress_error($$SELECT billing_release('hold-other', 'hold-a-h2', 'hold-a-r3')$$);

-- Capturing exactly what remains settles the hold (status 'captured')
-- with nothing to release.
SELECT trace_id, amount, hold_captured, hold_remaining, hold_status
  FROM billing_capture('hold-a', 'hold-a-h2', 3, 'hold-a-c4');
SELECT trace_id, amount, hold_captured, hold_remaining, hold_status
  FROM billing_capture('hold-a', 'hold-a-h2', 2, 'hold-a-c5');
-- final => true settles the hold after a partial capture: the rest is
-- released at once
SELECT status, remaining FROM billing_hold('hold-a', 20, 'hold-a-h3');
SELECT trace_id, amount, hold_captured, hold_remaining, hold_status
  FROM billing_capture('hold-a', 'hold-a-h3', 7.5, 'hold-a-c6', final => true);
SELECT trace_id, status, amount_micros, captured_micros, released_micros
  FROM billing.holds WHERE tenant_id = 'hold-a' ORDER BY hold_id;
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-a';

-- The journal: every hold operation in order, with its amount; captures
-- reference their ledger entry; the release done by a settling capture
-- has no trace id of its own.
SELECT h.trace_id AS hold, e.action, e.trace_id, e.amount_micros,
       e.entry_id IS NOT NULL AS has_entry
  FROM billing.hold_events e
  JOIN billing.holds h ON h.tenant_id = e.tenant_id AND h.hold_id = e.hold_id
 WHERE e.tenant_id = 'hold-a'
 ORDER BY e.event_id;
-- captures are charges in the usage views
SELECT sum(charges) AS charges, sum(spent) AS spent
  FROM billing.usage_daily WHERE tenant_id = 'hold-a';
SELECT * FROM billing_verify('hold-a');

--
-- Capturing more than remains: the excess is charged only if available
-- funds cover it (ZB033 otherwise, with the hold's remainder in the
-- detail, and nothing changes).  Such a capture settles the hold.
--
SELECT tenant_id, credit_limit FROM billing_account_create('hold-b', credit_limit => 5);
SELECT balance_after FROM billing_credit('hold-b', 20, 'hold-b-topup');
SELECT trace_id, remaining, available FROM billing_hold('hold-b', 10, 'hold-b-h1');
SELECT trace_id, remaining, available FROM billing_hold('hold-b', 10, 'hold-b-h2');
-- 14 on a hold of 10: the excess 4 fits into the available 5
SELECT trace_id, amount, balance_after, hold_captured, hold_remaining, hold_status
  FROM billing_capture('hold-b', 'hold-b-h1', 14, 'hold-b-c1');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-b';
-- an excess of one micro-unit more than available is refused
SELECT regress_error($$SELECT billing_capture('hold-b', 'hold-b-h2', 11.000001, 'hold-b-c2')$$);
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-b';
SELECT status, captured_micros FROM billing.holds WHERE tenant_id = 'hold-b' AND trace_id = 'hold-b-h2';
-- an excess of exactly the available funds goes through
SELECT trace_id, amount, balance_after, hold_captured, hold_remaining, hold_status
  FROM billing_capture('hold-b', 'hold-b-h2', 11, 'hold-b-c2');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-b';
SELECT trace_id, status, amount_micros, captured_micros, released_micros
  FROM billing.holds WHERE tenant_id = 'hold-b' ORDER BY hold_id;
SELECT * FROM billing_verify('hold-b');

--
-- Account status.  What a hold reserved can still be captured while the
-- account is suspended (the money is set aside), but no new hold and no
-- excess (ZB002); a closed account cannot capture at all (ZB003), and its
-- holds can still be released.
--
SELECT tenant_id FROM billing_account_create('hold-s');
SELECT balance_after FROM billing_credit('hold-s', 50, 'hold-s-topup');
SELECT status FROM billing_hold('hold-s', 10, 'hold-s-h1');
SELECT status FROM billing_hold('hold-s', 10, 'hold-s-h2');
SELECT status FROM billing_account_update('hold-s', status => 'suspended');
SELECT regress_error($$SELECT billing_hold('hold-s', 1, 'hold-s-h3')$$);
SELECT regress_error($$SELECT billing_capture('hold-s', 'hold-s-h1', 10.000001, 'hold-s-c1')$$);
SELECT amount, hold_remaining, hold_status FROM billing_capture('hold-s', 'hold-s-h1', 4, 'hold-s-c1');
SELECT status FROM billing_account_update('hold-s', status => 'closed');
SELECT regress_error($$SELECT billing_capture('hold-s', 'hold-s-h1', 1, 'hold-s-c2')$$);
SELECT status, released, remaining FROM billing_release('hold-s', 'hold-s-h1', 'hold-s-r1');
SELECT status, released, remaining FROM billing_release('hold-s', 'hold-s-h2', 'hold-s-r2');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-s';
SELECT * FROM billing_verify('hold-s');

--
-- Expiry.  A hold stops counting at its expires_at whether or not
-- anything runs: the views see it at once, and the next call on the
-- account records it.  An expired hold can be neither captured nor
-- extended (ZB031); releasing it frees nothing.
--
SELECT tenant_id FROM billing_account_create('hold-e');
SELECT balance_after FROM billing_credit('hold-e', 100, 'hold-e-topup');
SELECT trace_id, status, remaining, available
  FROM billing_hold('hold-e', 40, 'hold-e-h1');
SELECT trace_id, status, remaining, available FROM billing_hold('hold-e', 10, 'hold-e-h2');
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'hold-e';
-- h1 now expires in a millisecond (shortened, so that nothing above
-- depended on how fast the machine got here); wait until it is past
SELECT status FROM billing_hold_extend('hold-e', 'hold-e-h1', '1 millisecond');
SELECT pg_sleep(greatest(extract(epoch FROM expires_at - clock_timestamp()), 0) + 0.1)
  FROM billing.holds WHERE tenant_id = 'hold-e' AND trace_id = 'hold-e-h1';
-- no call on the account since: the views already leave the hold out
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'hold-e';
SELECT trace_id, remaining FROM billing.open_holds WHERE tenant_id = 'hold-e';
-- (the row itself is marked by the next call on the account)
SELECT trace_id, status, expires_at <= now() AS past_expiry
  FROM billing.holds WHERE tenant_id = 'hold-e' ORDER BY hold_id;
SELECT * FROM billing_verify('hold-e');
-- capture and extend are refused; the detail tells when it expired and
-- how much had been captured
SELECT regress_error($$SELECT billing_capture('hold-e', 'hold-e-h1', 1, 'hold-e-c1')$$);
SELECT regress_error($$SELECT billing_hold_extend('hold-e', 'hold-e-h1', '1 hour')$$);
-- release: not an error, frees nothing, and the call records the expiry
SELECT trace_id, status, captured, released, remaining, available, replayed
  FROM billing_release('hold-e', 'hold-e-h1', 'hold-e-r1');
SELECT trace_id, status, released_micros
  FROM billing.holds WHERE tenant_id = 'hold-e' ORDER BY hold_id;
SELECT * FROM billing_verify('hold-e');
-- the freed funds can be charged
SELECT amount, balance_after FROM billing_deduct('hold-e', 85, 'hold-e-d1');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-e';

-- billing_hold_extend: the hold now expires at now() + expires_in (15
-- minutes by default); only an open hold can be extended.
SELECT trace_id, status, remaining,
       expires_at - now() >= interval '2 hours'
           AND expires_at - now() < interval '2 hours 1 minute' AS expires_in_2_hours
  FROM billing_hold_extend('hold-e', 'hold-e-h2', '2 hours');
SELECT trace_id, expires_at - now() > interval '1 hour' AS extended
  FROM billing.open_holds WHERE tenant_id = 'hold-e';
SELECT trace_id, status,
       expires_at - now() >= interval '15 minutes'
           AND expires_at - now() < interval '16 minutes' AS expires_in_15_minutes
  FROM billing_hold_extend('hold-e', 'hold-e-h2');

-- The journal of hold-e: the expiry is an event of its own (no trace id),
-- the release of the expired hold is journalled with amount 0.
SELECT h.trace_id AS hold, e.action, e.trace_id, e.amount_micros
  FROM billing.hold_events e
  JOIN billing.holds h ON h.tenant_id = e.tenant_id AND h.hold_id = e.hold_id
 WHERE e.tenant_id = 'hold-e'
 ORDER BY e.event_id;

--
-- expires_in: positive and at most 31 days, as days and time (not
-- months); NULL is a missing argument (ZB015).  The same rule for
-- billing_hold_extend.
--
SELECT trace_id, expires_at - now() >= interval '31 days' AS expires_in_31_days
  FROM billing_hold('hold-e', 1, 'hold-e-h3', expires_in => '31 days');
SELECT trace_id, expires_at - now() >= interval '744 hours' AS expires_in_744_hours
  FROM billing_hold('hold-e', 1, 'hold-e-h4', expires_in => '744 hours');
SELECT regress_error($$SELECT billing_hold('hold-e', 1, 'hold-e-h5', expires_in => '0')$$);
SELECT regress_error($$SELECT billing_hold('hold-e', 1, 'hold-e-h5', expires_in => '-1 minute')$$);
SELECT regress_error($$SELECT billing_hold('hold-e', 1, 'hold-e-h5', expires_in => '1 month')$$);
SELECT regress_error($$SELECT billing_hold('hold-e', 1, 'hold-e-h5', expires_in => '32 days')$$);
SELECT regress_error($$SELECT billing_hold('hold-e', 1, 'hold-e-h5', expires_in => '31 days 00:00:01')$$);
SELECT regress_error($$SELECT billing_hold('hold-e', 1, 'hold-e-h5', expires_in => '745 hours')$$);
SELECT regress_error($$SELECT billing_hold('hold-e', 1, 'hold-e-h5', expires_in => NULL)$$);
SELECT regress_error($$SELECT billing_hold_extend('hold-e', 'hold-e-h2', '0')$$);
SELECT regress_error($$SELECT billing_hold_extend('hold-e', 'hold-e-h2', '1 month')$$);
SELECT regress_error($$SELECT billing_hold_extend('hold-e', 'hold-e-h2', NULL)$$);
SELECT count(*) AS holds FROM billing.holds WHERE tenant_id = 'hold-e';

--
-- The other arguments are checked like those of billing_deduct (first
-- lines of the errors; details in 040_errors).
--
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('hold: tenant null',        $$SELECT billing_hold(NULL, 1, 'hold-x')$$),
    ('hold: tenant empty',       $$SELECT billing_hold('', 1, 'hold-x')$$),
    ('hold: unknown tenant',     $$SELECT billing_hold('hold-nobody', 1, 'hold-x')$$),
    ('hold: amount null',        $$SELECT billing_hold('hold-e', NULL, 'hold-x')$$),
    ('hold: amount 0',           $$SELECT billing_hold('hold-e', 0, 'hold-x')$$),
    ('hold: amount 7 decimals',  $$SELECT billing_hold('hold-e', 0.0000001, 'hold-x')$$),
    ('hold: amount > 10^12',     $$SELECT billing_hold('hold-e', 1e12 + 1, 'hold-x')$$),
    ('hold: trace null',         $$SELECT billing_hold('hold-e', 1, NULL)$$),
    ('hold: trace empty',        $$SELECT billing_hold('hold-e', 1, '')$$),
    ('hold: description 1001',   $$SELECT billing_hold('hold-e', 1, 'hold-x', description => repeat('d', 1001))$$),
    ('hold: metadata array',     $$SELECT billing_hold('hold-e', 1, 'hold-x', metadata => '[]')$$),
    ('hold: api_key empty',      $$SELECT billing_hold('hold-e', 1, 'hold-x', api_key => '')$$),
    ('hold: unknown api_key',    $$SELECT billing_hold('hold-e', 1, 'hold-x', api_key => 'nokey')$$),
    ('capture: hold trace null', $$SELECT billing_capture('hold-e', NULL, 1, 'hold-x')$$),
    ('capture: amount 0',        $$SELECT billing_capture('hold-e', 'hold-e-h2', 0, 'hold-x')$$),
    ('capture: trace empty',     $$SELECT billing_capture('hold-e', 'hold-e-h2', 1, '')$$),
    ('capture: final null',      $$SELECT billing_capture('hold-e', 'hold-e-h2', 1, 'hold-x', final => NULL)$$),
    ('capture: event_at inf',    $$SELECT billing_capture('hold-e', 'hold-e-h2', 1, 'hold-x', event_at => 'infinity')$$),
    ('capture: unknown tenant',  $$SELECT billing_capture('hold-nobody', 'hold-e-h2', 1, 'hold-x')$$),
    ('release: trace null',      $$SELECT billing_release('hold-e', 'hold-e-h2', NULL)$$),
    ('release: hold trace empty', $$SELECT billing_release('hold-e', '', 'hold-x')$$),
    ('extend: tenant empty',     $$SELECT billing_hold_extend('', 'hold-e-h2')$$)
  ) AS t(label, sql);

-- All accounts of this file are consistent, cached holds included.
SELECT tenant_id, balance, on_hold, available FROM billing.balances
 WHERE tenant_id LIKE 'hold-%' ORDER BY tenant_id;
SELECT * FROM billing_verify() WHERE tenant_id LIKE 'hold-%';

-- A replay that arrives after a hold of the account expired: the expiry is
-- recorded on the way, but the replay charges nothing - neither the cached
-- balance nor the usage counters move (this once charged the cache a second
-- time while the ledger stayed right, so billing_verify() saw the drift).
SELECT tenant_id FROM billing_account_create('hold-r');
SELECT balance_after FROM billing_credit('hold-r', 10, 'hold-r-top');
SELECT balance_after FROM billing_deduct('hold-r', 1, 'hold-r-d1');
SELECT status FROM billing_hold('hold-r', 2, 'hold-r-h', expires_in => '1 second');
SELECT pg_sleep(1.1);
SELECT balance_after, replayed FROM billing_deduct('hold-r', 1, 'hold-r-d1');
SELECT balance_after, replayed FROM billing_credit('hold-r', 10, 'hold-r-top');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'hold-r';
SELECT requests_today, spent_today FROM billing.quota_usage WHERE tenant_id = 'hold-r';
SELECT status FROM billing.holds WHERE tenant_id = 'hold-r';
SELECT * FROM billing_verify('hold-r');

-- Streaming: the model is given to billing_hold, the captures only carry
-- the amounts; usage per model files the captures under the hold's model
-- (a capture that names a model keeps its own).
SELECT tenant_id FROM billing_account_create('hold-m');
SELECT balance_after FROM billing_credit('hold-m', 10, 'hold-m-top');
SELECT remaining FROM billing_hold('hold-m', 2, 'hold-m-h1',
                                   metadata => '{"model": "gpt-x", "provider": "acme"}');
SELECT amount FROM billing_capture('hold-m', 'hold-m-h1', 0.5, 'hold-m-c1');
SELECT amount FROM billing_capture('hold-m', 'hold-m-h1', 0.25, 'hold-m-c2',
                                   metadata => '{"model": "gpt-y", "output_tokens": 40}');
SELECT model, provider, charges, spent, output_tokens
  FROM billing.usage_by_model WHERE tenant_id = 'hold-m' ORDER BY model;
