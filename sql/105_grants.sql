--
-- 105_grants: credit buckets and linked refunds.
--
-- Every credit goes into a bucket: billing_credit() into the wallet (paid,
-- never expiring, spent last), billing_grant() into a bucket of its own.
-- Debits draw in burn order: higher priority first, then earliest expiry
-- (never-expiring last), then oldest; the wallet last; beyond it the credit
-- limit (debt), which the next credit pays back first.  What is left of a
-- grant at its expiry leaves the balance through an 'expire' entry.
-- Refunds give a charge back to the buckets it came from.  Tenants start
-- with "gr-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

CREATE FUNCTION pg_temp.buckets(t text) RETURNS TABLE (grant_id bigint, trace_id text, category text,
    priority integer, remaining numeric, reserved numeric, expired numeric, status text)
    LANGUAGE sql AS $$
    SELECT g.grant_id - (SELECT min(x.grant_id) FROM billing.grants x) + 1, g.trace_id, g.category,
           g.priority, g.remaining, g.reserved, g.expired, g.status
      FROM billing.grant_balances g WHERE g.tenant_id = t ORDER BY g.grant_id
$$;

-- waits until the tenant's grants (and with holds => true, its holds) have
-- expired, however slow the machine.  The grants and holds below live 8 to
-- 16 s: what must happen before they expire (a few statements; in gr-i 64
-- grants) takes a fraction of that, also when a commit stalls for seconds.
CREATE FUNCTION pg_temp.sleep_past_expiry(t text, holds boolean DEFAULT false) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    e timestamptz;
BEGIN
    SELECT max(x) INTO e FROM (SELECT g.expires_at FROM billing.grants g WHERE g.tenant_id = t
                               UNION ALL
                               SELECT h.expires_at FROM billing.holds h WHERE h.tenant_id = t AND holds) y(x);
    WHILE clock_timestamp() <= e LOOP
        PERFORM pg_sleep(0.1);
    END LOOP;
END;
$$;
--
-- The worked example: a trial grant of 5.00 expiring in 14 days, with
-- priority over a 20.00 top-up.
--
SELECT tenant_id FROM billing_account_create('gr-a');
SELECT kind, amount, balance_after FROM billing_credit('gr-a', 20, 'gr-a-topup');
SELECT category, priority, granted, amount, balance_after, replayed
  FROM billing_grant('gr-a', 5, 'gr-a-trial', expires_at => now() + interval '14 days',
                     priority => 10, category => 'promotional', description => 'trial');
-- a charge of 3 comes out of the trial first ...
SELECT amount, balance_after FROM billing_deduct('gr-a', 3, 'gr-a-c1');
SELECT * FROM pg_temp.buckets('gr-a');
-- ... one of 4 takes the trial's last 2 and 2 of the wallet
SELECT amount, balance_after FROM billing_deduct('gr-a', 4, 'gr-a-c2');
SELECT * FROM pg_temp.buckets('gr-a');
SELECT trace_id, kind, billing.to_amount(amount_micros) AS amount, draws IS NOT NULL AS names_grants FROM billing.entries
 WHERE tenant_id = 'gr-a' ORDER BY entry_id;
-- a refund of 3 of the second charge: the wallet's 2 first, then 1 to the trial
SELECT amount, refunded, refundable, balance_after, replayed
  FROM billing_refund('gr-a', 'gr-a-c2', 3, 'gr-a-r1', reason => 'outage');
SELECT * FROM pg_temp.buckets('gr-a');
-- the same refund again is a replay; the rest of the charge can still go back ...
SELECT amount, refunded, refundable, replayed FROM billing_refund('gr-a', 'gr-a-c2', 3, 'gr-a-r1', reason => 'outage');
SELECT regress_error($$SELECT billing_refund('gr-a', 'gr-a-c2', 1.000001, 'gr-a-r2')$$);
BEGIN;
SELECT pg_sleep(0.1);  -- the transaction started before the refund
SELECT amount, refunded, refundable FROM billing_refund('gr-a', 'gr-a-c2', 1, 'gr-a-r2');
COMMIT;
-- (the refund's row is dated as its entry, not at the transaction's start)
SELECT r.created_at = e.created_at AS dated_as_entry
  FROM billing.refunds r JOIN billing.entries e ON e.tenant_id = r.tenant_id AND e.entry_id = r.refund_entry_id
 WHERE e.tenant_id = 'gr-a' AND e.trace_id = 'gr-a-r2';
-- ... and nothing more
SELECT regress_error($$SELECT billing_refund('gr-a', 'gr-a-c2', 0.000001, 'gr-a-r3')$$);
SELECT * FROM pg_temp.buckets('gr-a');
SELECT charge_trace_id, charged, refunded, refundable, refunds FROM billing.refunded_charges
 WHERE tenant_id = 'gr-a';
-- what each entry took from the trial and gave back to it (the rest is the wallet's)
SELECT trace_id, kind, grant_trace_id, amount FROM billing.grant_draws WHERE tenant_id = 'gr-a' ORDER BY entry_id;
SELECT count(*) AS problems FROM billing_verify('gr-a');

--
-- Burn order among grants: priority, then earliest expiry (never last),
-- then oldest; the wallet after every grant.
--
SELECT tenant_id FROM billing_account_create('gr-b');
SELECT kind FROM billing_credit('gr-b', 100, 'gr-b-wallet');
SELECT amount FROM billing_grant('gr-b', 1, 'gr-b-low-never', priority => 0);
SELECT amount FROM billing_grant('gr-b', 1, 'gr-b-low-late', priority => 0, expires_at => now() + interval '30 days');
SELECT amount FROM billing_grant('gr-b', 1, 'gr-b-low-soon', priority => 0, expires_at => now() + interval '2 days');
SELECT amount FROM billing_grant('gr-b', 1, 'gr-b-high', priority => 5, category => 'paid');
SELECT amount FROM billing_grant('gr-b', 1, 'gr-b-low-never-2', priority => 0);
-- five charges of 1: high, low-soon, low-late, low-never, low-never-2; then the wallet
SELECT count(*) FROM (SELECT billing_deduct('gr-b', 1, 'gr-b-c' || g) FROM generate_series(1, 6) g) x;
SELECT e.trace_id, g.trace_id AS drawn_from
  FROM billing.entries e
  LEFT JOIN billing.grants g ON g.tenant_id = e.tenant_id AND g.grant_id = e.draws[1]
 WHERE e.tenant_id = 'gr-b' AND e.kind = 'deduct' ORDER BY e.entry_id;
SELECT trace_id, status FROM pg_temp.buckets('gr-b');

--
-- Debt under a credit limit is paid back first by the next credit: a grant
-- into debt fills its bucket with what is left after the debt.
--
SELECT tenant_id FROM billing_account_create('gr-c', credit_limit => 10);
SELECT balance_after FROM billing_deduct('gr-c', 4, 'gr-c-c1');
SELECT granted, amount, balance_after FROM billing_grant('gr-c', 6, 'gr-c-g1', expires_at => now() + interval '1 day');
SELECT remaining, status FROM pg_temp.buckets('gr-c');
SELECT balance_after FROM billing_deduct('gr-c', 2, 'gr-c-c2');
SELECT remaining, status FROM pg_temp.buckets('gr-c');
SELECT count(*) AS problems FROM billing_verify('gr-c');

--
-- Expiry: at expires_at what is left leaves the balance.  Every reader
-- subtracts it at once, before the first call on the account writes the
-- 'expire' entry.
--
SELECT tenant_id FROM billing_account_create('gr-d');
SELECT kind FROM billing_credit('gr-d', 1, 'gr-d-wallet');
SELECT amount FROM billing_grant('gr-d', 2.5, 'gr-d-short', expires_at => clock_timestamp() + interval '8 seconds');
SELECT billing_balance('gr-d') AS before_expiry;
SELECT pg_temp.sleep_past_expiry('gr-d');
-- not written yet: the balance and the views already leave it out
SELECT count(*) AS expire_entries FROM billing.entries WHERE tenant_id = 'gr-d' AND kind = 'expire';
SELECT billing_balance('gr-d') AS balance, (SELECT balance FROM billing.balances WHERE tenant_id = 'gr-d') AS view_balance,
       (SELECT available FROM billing.balances WHERE tenant_id = 'gr-d') AS available;
SELECT remaining, expired, status FROM pg_temp.buckets('gr-d');
-- expires_at is the first instant the credit is gone, in the history too
SELECT billing_balance_at('gr-d', g.expires_at - interval '1 microsecond') AS just_before,
       billing_balance_at('gr-d', g.expires_at) AS at_expires_at
  FROM billing.grants g WHERE g.tenant_id = 'gr-d';
-- a hold cannot reserve expired credit (the refusal rolls its expiry back too) ...
SELECT regress_error($$SELECT billing_hold('gr-d', 2, 'gr-d-h1')$$);
-- ... and the next call that commits writes the expiry, dated at the expiry time
SELECT amount, balance_after FROM billing_deduct('gr-d', 0.5, 'gr-d-c1');
SELECT kind, billing.to_amount(amount_micros) AS amount, billing.to_amount(balance_after_micros) AS balance_after,
       grant_id IS NOT NULL AS of_grant, event_at < created_at AS dated_at_expiry
  FROM billing.entries WHERE tenant_id = 'gr-d' ORDER BY entry_id;
SELECT month IS NOT NULL AS has_month, category, expiries, expired FROM billing.breakage WHERE tenant_id = 'gr-d';
-- a retry of the grant after its expiry replays it
SELECT replayed FROM billing_grant('gr-d', 2.5, 'gr-d-short',
                                   expires_at => (SELECT expires_at FROM billing.grants WHERE trace_id = 'gr-d-short'));
-- the same history once the entry is written
SELECT billing_balance_at('gr-d', g.expires_at - interval '1 microsecond') AS just_before,
       billing_balance_at('gr-d', g.expires_at) AS at_expires_at
  FROM billing.grants g WHERE g.tenant_id = 'gr-d';
SELECT count(*) AS problems FROM billing_verify('gr-d');
-- expires_at is the first instant the credit is gone (the boundary)
-- (grants_state: grant id, remaining, reserved, priority, expires_at in microseconds since 2000)
-- (789004800 s after 2000-01-01 is 2025-01-01 00:00:00 UTC)
SELECT billing.grants_expired(ARRAY[1, 5000000, 0, 0, 789004800000000], '2025-01-01 00:00:00+00') AS at_expires_at,
       billing.grants_expired(ARRAY[1, 5000000, 0, 0, 789004800000001], '2025-01-01 00:00:00+00') AS one_microsecond_before,
       '2000-01-01 00:00:00+00'::timestamptz + interval '789004800 seconds' = '2025-01-01 00:00:00+00' AS expires_at_is_the_instant;

--
-- A hold takes its share of the buckets when it is placed: a grant that
-- expires while the hold is open cannot leave it unfunded; what the hold
-- does not capture goes back, and a share of an expired grant expires then.
--
SELECT tenant_id FROM billing_account_create('gr-e');
SELECT amount FROM billing_grant('gr-e', 3, 'gr-e-g', expires_at => clock_timestamp() + interval '8 seconds');
SELECT status, amount FROM billing_hold('gr-e', 3, 'gr-e-h1');
SELECT remaining, reserved, status FROM pg_temp.buckets('gr-e');
SELECT pg_temp.sleep_past_expiry('gr-e');
-- the grant expired; the hold still holds its 3 and captures 1 of them
SELECT amount, balance_after, hold_status FROM billing_capture('gr-e', 'gr-e-h1', 1, 'gr-e-c1');
-- releasing the rest gives 2 back to the expired grant: they expire on the spot
SELECT status, released FROM billing_release('gr-e', 'gr-e-h1', 'gr-e-r1');
SELECT kind, billing.to_amount(amount_micros) AS amount, billing.to_amount(balance_after_micros) AS balance_after
  FROM billing.entries WHERE tenant_id = 'gr-e' ORDER BY entry_id;
SELECT remaining, reserved, expired, status FROM pg_temp.buckets('gr-e');
SELECT billing_balance('gr-e') AS balance, count(*) AS problems FROM billing_verify('gr-e');

--
-- A hold keeps its share past the grant's expiry until it ends, but an
-- extension does not carry expired credit further: the share expires when
-- the hold is extended, and the hold reserves as much again from the
-- account's funds (here the wallet).  With the funds short, the extension
-- is refused (ZB004) and the hold keeps its expiry; a job's keep-alive
-- (billing.internal_hold_extend) then leaves it unextended.
--
SELECT tenant_id FROM billing_account_create('gr-x');
SELECT kind FROM billing_credit('gr-x', 2, 'gr-x-wallet');
SELECT amount FROM billing_grant('gr-x', 3, 'gr-x-g', expires_at => clock_timestamp() + interval '8 seconds', priority => 10);
-- 3 of the grant and 1 of the wallet; then the wallet's last 1
SELECT status, amount FROM billing_hold('gr-x', 4, 'gr-x-h1', expires_in => '1 hour');
SELECT status, amount FROM billing_hold('gr-x', 1, 'gr-x-h2', expires_in => '1 hour');
SELECT remaining, reserved, status FROM pg_temp.buckets('gr-x');
SELECT pg_temp.sleep_past_expiry('gr-x');
SELECT regress_error($$SELECT billing_hold_extend('gr-x', 'gr-x-h1', '2 hours')$$);
SELECT status FROM billing.internal_hold_extend('gr-x', 'gr-x-h1', '2 hours');
SELECT expires_at = created_at + interval '1 hour' AS unextended,
       billing.to_amount(grant_draws[2]) AS share_of_the_expired_grant
  FROM billing.holds WHERE tenant_id = 'gr-x' AND trace_id = 'gr-x-h1';
-- with h2 released and a grant of 2 that lasts, h1's 3 can be reserved
-- again: 2 of that grant (burn order), 1 of the wallet
SELECT status FROM billing_release('gr-x', 'gr-x-h2', 'gr-x-r2');
SELECT amount FROM billing_grant('gr-x', 2, 'gr-x-g2', expires_at => now() + interval '30 days');
SELECT status FROM billing_hold_extend('gr-x', 'gr-x-h1', '2 hours');
SELECT expires_at > created_at + interval '1 hour' AS extended,
       grant_draws[1] = (SELECT grant_id FROM billing.grants WHERE trace_id = 'gr-x-g2') AS of_the_lasting_grant,
       billing.to_amount(grant_draws[2]) AS share, cardinality(grant_draws) AS numbers
  FROM billing.holds WHERE tenant_id = 'gr-x' AND trace_id = 'gr-x-h1';
SELECT kind, billing.to_amount(amount_micros) AS amount, billing.to_amount(balance_after_micros) AS balance_after, description
  FROM billing.entries WHERE tenant_id = 'gr-x' ORDER BY entry_id;
SELECT remaining, reserved, expired, status FROM pg_temp.buckets('gr-x');
-- the capture spends the lasting grant's 2 and the wallet: nothing of the
-- expired grant
SELECT amount, balance_after, hold_status FROM billing_capture('gr-x', 'gr-x-h1', 4, 'gr-x-c1');
SELECT draws[1] = (SELECT grant_id FROM billing.grants WHERE trace_id = 'gr-x-g2') AS of_the_lasting_grant,
       billing.to_amount(draws[2]) AS drawn, cardinality(draws) AS numbers
  FROM billing.entries WHERE tenant_id = 'gr-x' AND trace_id = 'gr-x-c1';
SELECT billing_balance('gr-x') AS balance, count(*) AS problems FROM billing_verify('gr-x');

--
-- A refund of a charge whose grant has expired since: that share comes
-- back and expires again at once; the wallet's share stays.
--
SELECT tenant_id FROM billing_account_create('gr-f');
SELECT kind FROM billing_credit('gr-f', 10, 'gr-f-wallet');
SELECT amount FROM billing_grant('gr-f', 2, 'gr-f-g', expires_at => clock_timestamp() + interval '8 seconds');
SELECT amount, balance_after FROM billing_deduct('gr-f', 3, 'gr-f-c1');
SELECT pg_temp.sleep_past_expiry('gr-f');
SELECT amount, balance_after FROM billing_refund('gr-f', 'gr-f-c1', 3, 'gr-f-r1');
SELECT kind, billing.to_amount(amount_micros) AS amount, billing.to_amount(balance_after_micros) AS balance_after
  FROM billing.entries WHERE tenant_id = 'gr-f' ORDER BY entry_id;
SELECT billing_balance('gr-f') AS balance, count(*) AS problems FROM billing_verify('gr-f');

--
-- Refunds: what can be refunded, and the counters they give back.
--
SELECT tenant_id FROM billing_account_create('gr-g');
SELECT daily_request_quota FROM billing_limits_set('gr-g', daily_spend => 5);
SELECT kind FROM billing_credit('gr-g', 100, 'gr-g-top');
SELECT amount FROM billing_deduct('gr-g', 5, 'gr-g-c1');
SELECT regress_error($$SELECT billing_deduct('gr-g', 1, 'gr-g-c2')$$) ~ '^ZB042' AS cap_reached;
SELECT amount FROM billing_refund('gr-g', 'gr-g-c1', 2, 'gr-g-r1');
SELECT spent_today FROM billing.quota_usage WHERE tenant_id = 'gr-g';
SELECT amount FROM billing_deduct('gr-g', 1, 'gr-g-c3');
-- not a charge, no such charge, a trace id used for something else
SELECT regress_error($$SELECT billing_refund('gr-g', 'gr-g-top', 1, 'gr-g-r2')$$);
SELECT regress_error($$SELECT billing_refund('gr-g', 'gr-g-nope', 1, 'gr-g-r3')$$);
SELECT regress_error($$SELECT billing_refund('gr-g', 'gr-g-c1', 1, 'gr-g-c3')$$);
SELECT regress_error($$SELECT billing_refund('gr-g', 'gr-g-c1', 1, 'gr-g-r1')$$);
SELECT regress_error($$SELECT billing_refund('gr-g', 'gr-g-c1', 0, 'gr-g-r4')$$);

--
-- Arguments and replays of grants.
--
SELECT granted, replayed FROM billing_grant('gr-g', 1, 'gr-g-g1', expires_at => '2030-01-01 00:00:00+00');
SELECT granted, replayed FROM billing_grant('gr-g', 1, 'gr-g-g1', expires_at => '2030-01-01 00:00:00+00');
SELECT regress_error($$SELECT billing_grant('gr-g', 1, 'gr-g-g1', expires_at => '2031-01-01 00:00:00+00', priority => 3)$$);
SELECT regress_error($$SELECT billing_grant('gr-g', 1, 'gr-g-top')$$);
-- a wallet credit of kind grant (billing_credit) is no grant of billing_grant:
-- the conflict says which is which
SELECT kind FROM billing_credit('gr-g', 1, 'gr-g-wallet-grant', kind => 'grant');
SELECT regress_error($$SELECT billing_grant('gr-g', 1, 'gr-g-wallet-grant')$$);
SELECT split_part(regress_error($$SELECT billing_grant('gr-g', 1, 'gr-g-g2', expires_at => now() - interval '1 second')$$), E'\n', 1);
SELECT regress_error($$SELECT billing_grant('gr-g', 1, 'gr-g-g2', priority => 1001)$$);
SELECT regress_error($$SELECT billing_grant('gr-g', 1, 'gr-g-g2', category => 'gift')$$);
SELECT regress_error($$SELECT billing_grant('gr-g', 1, 'gr-g-g2', priority => NULL)$$);
SELECT regress_error($$SELECT billing_grant('gr-g', 1.0000001, 'gr-g-g2')$$);
SELECT regress_error($$SELECT billing_grant('gr-g', 1, 'billing:expire:1:1')$$);
SELECT regress_error($$SELECT billing_deduct('gr-g', 1, 'billing:mine')$$);
-- at most 64 open grants per account
SELECT tenant_id FROM billing_account_create('gr-h');
SELECT count(*) FROM (SELECT billing_grant('gr-h', 1, 'gr-h-' || g) FROM generate_series(1, 64) g) x;
SELECT regress_error($$SELECT billing_grant('gr-h', 1, 'gr-h-65')$$);
SELECT kind FROM billing_deduct('gr-h', 1, 'gr-h-c1');
SELECT granted FROM billing_grant('gr-h', 1, 'gr-h-65');

-- A grant a hold reserved in full is still open: it counts towards the 64,
-- and the hold's expiry gives its share back whatever the count
SELECT tenant_id FROM billing_account_create('gr-i');
SELECT amount FROM billing_grant('gr-i', 1, 'gr-i-a');
SELECT status FROM billing_hold('gr-i', 1, 'gr-i-h', expires_in => '10 seconds');
SELECT count(*) FROM (SELECT billing_grant('gr-i', 1, 'gr-i-' || g) FROM generate_series(1, 63) g) x;
SELECT regress_error($$SELECT billing_grant('gr-i', 1, 'gr-i-64')$$);
SELECT pg_temp.sleep_past_expiry('gr-i', holds => true);
SELECT balance_after FROM billing_deduct('gr-i', 0.1, 'gr-i-c1');
SELECT trace_id, remaining, reserved, status FROM pg_temp.buckets('gr-i') WHERE trace_id IN ('gr-i-a', 'gr-i-1');
SELECT count(*) AS problems FROM billing_verify('gr-i');

-- A grant that only repays debt opens no bucket: the 64 open ones do not
-- stop it.  64 grants a hold reserved in full, then a charge into the
-- credit limit: 5.00 of debt.  6.00 would leave 1.00 in a 65th bucket.
SELECT tenant_id FROM billing_account_create('gr-debt', credit_limit => 10);
SELECT count(*) FROM (SELECT billing_grant('gr-debt', 1, 'gr-debt-' || g) FROM generate_series(1, 64) g) x;
SELECT status FROM billing_hold('gr-debt', 64, 'gr-debt-h');
SELECT balance_after FROM billing_deduct('gr-debt', 5, 'gr-debt-c1');
SELECT regress_error($$SELECT billing_grant('gr-debt', 6, 'gr-debt-65')$$);
SELECT granted, amount FROM billing_grant('gr-debt', 5, 'gr-debt-repay');
SELECT billing_balance('gr-debt') AS balance, (SELECT count(*) FROM pg_temp.buckets('gr-debt') WHERE status = 'open') AS open_grants;
SELECT count(*) AS problems FROM billing_verify('gr-debt');
SELECT status FROM billing_release('gr-debt', 'gr-debt-h', 'gr-debt-r');

-- A hold that expires before its grant: its share comes back when the hold
-- expires and expires with the grant, one entry dated at the grant's
-- expiry.  Every reader leaves it out before anything is written.
SELECT tenant_id FROM billing_account_create('gr-j');
SELECT amount FROM billing_grant('gr-j', 5, 'gr-j-g', expires_at => clock_timestamp() + interval '16 seconds');
SELECT status FROM billing_hold('gr-j', 5, 'gr-j-h', expires_in => '8 seconds');
SELECT pg_temp.sleep_past_expiry('gr-j', holds => true);
SELECT billing_balance('gr-j') AS balance,
       (SELECT balance FROM billing.balances WHERE tenant_id = 'gr-j') AS view_balance,
       (SELECT available FROM billing.balances WHERE tenant_id = 'gr-j') AS available,
       billing_balance_at('gr-j', clock_timestamp()) AS balance_at;
SELECT remaining, reserved, expired, status FROM pg_temp.buckets('gr-j');
SELECT billing.expire_holds_of('gr-j');
SELECT kind, billing.to_amount(e.amount_micros) AS amount, e.event_at = g.expires_at AS dated_at_grant_expiry
  FROM billing.entries e JOIN billing.grants g USING (tenant_id, grant_id)
 WHERE e.tenant_id = 'gr-j' ORDER BY e.entry_id;
SELECT billing_balance('gr-j') AS balance, count(*) AS problems FROM billing_verify('gr-j');

-- A hold that expires after its grant: the grant's own remainder expires at
-- the grant's expiry, the hold's share when the hold expires; the history
-- (billing_balance_at) is the same before and after the entries are written
SELECT tenant_id FROM billing_account_create('gr-k');
SELECT kind FROM billing_credit('gr-k', 10, 'gr-k-top');
SELECT amount FROM billing_grant('gr-k', 5, 'gr-k-g', expires_at => clock_timestamp() + interval '8 seconds');
SELECT status FROM billing_hold('gr-k', 3, 'gr-k-h', expires_in => '13 seconds');
SELECT pg_temp.sleep_past_expiry('gr-k', holds => true);
CREATE TEMP TABLE gr_k_times AS
SELECT g.expires_at AS grant_expiry, h.expires_at AS hold_expiry,
       g.expires_at + (h.expires_at - g.expires_at) / 2 AS between
  FROM billing.grants g JOIN billing.holds h USING (tenant_id) WHERE g.tenant_id = 'gr-k';
SELECT billing_balance_at('gr-k', t.grant_expiry - interval '1 microsecond') AS before_grant_expiry,
       billing_balance_at('gr-k', t.between) AS between,
       billing_balance_at('gr-k', t.hold_expiry) AS at_hold_expiry,
       billing_balance('gr-k') AS now
  FROM gr_k_times t;
SELECT billing.expire_holds_of('gr-k');
SELECT billing_balance_at('gr-k', t.grant_expiry - interval '1 microsecond') AS before_grant_expiry,
       billing_balance_at('gr-k', t.between) AS between,
       billing_balance_at('gr-k', t.hold_expiry) AS at_hold_expiry,
       billing_balance('gr-k') AS now
  FROM gr_k_times t;
SELECT kind, billing.to_amount(amount_micros) AS amount,
       CASE e.event_at WHEN t.grant_expiry THEN 'grant expiry' WHEN t.hold_expiry THEN 'hold expiry' END AS dated_at
  FROM billing.entries e, gr_k_times t WHERE e.tenant_id = 'gr-k' ORDER BY entry_id;
SELECT count(*) AS problems FROM billing_verify('gr-k');

-- Debt is the wallet's: a hold that reserved a grant does not hide it
SELECT tenant_id FROM billing_account_create('gr-l', credit_limit => 10);
SELECT amount FROM billing_grant('gr-l', 5, 'gr-l-a');
SELECT status FROM billing_hold('gr-l', 5, 'gr-l-h');
SELECT balance_after FROM billing_deduct('gr-l', 5, 'gr-l-c1');
SELECT granted, amount, balance_after FROM billing_grant('gr-l', 5, 'gr-l-b');
SELECT status FROM billing_release('gr-l', 'gr-l-h', 'gr-l-r');
SELECT trace_id, remaining, status FROM pg_temp.buckets('gr-l');
SELECT billing_balance('gr-l') AS balance, count(*) AS problems FROM billing_verify('gr-l');

-- A new entry asking for the very trace id that the expiry the same call
-- writes first takes ('billing:expire:<grant>:<version>'): ZB014 like any
-- trace id of billing's own, not an internal error or a conflict with an
-- "original expire", whatever writes it
SELECT tenant_id FROM billing_account_create('gr-m');
SELECT amount FROM billing_credit('gr-m', 10, 'gr-m-top-up');
SELECT amount FROM billing_grant('gr-m', 2, 'gr-m-g', expires_at => clock_timestamp() + interval '8 seconds');
SELECT amount FROM billing_deduct('gr-m', 0.5, 'gr-m-d');
SELECT status FROM billing_hold('gr-m', 0.5, 'gr-m-h');
SELECT pg_temp.sleep_past_expiry('gr-m');
-- (every function that writes an entry of gr-m, with trace id t: its error)
CREATE FUNCTION pg_temp.gr_m_writers(t text) RETURNS TABLE (f text, error text)
    LANGUAGE sql AS $f$
SELECT f, split_part(regress_error(format(f, t)), ' "', 1)
  FROM unnest(ARRAY[$$SELECT billing_credit('gr-m', 1, %L)$$,
                    $$SELECT billing_deduct('gr-m', 1, %L)$$,
                    $$SELECT billing_grant('gr-m', 1, %L)$$,
                    $$SELECT billing_refund('gr-m', 'gr-m-d', 0.1, %L)$$,
                    $$SELECT billing_capture('gr-m', 'gr-m-h', 0.1, %L)$$]) f
$f$;
SELECT * FROM pg_temp.gr_m_writers('billing:expire:' || (SELECT grant_id FROM billing.grants WHERE tenant_id = 'gr-m')
                                   || ':' || (SELECT version + 1 FROM billing.accounts WHERE tenant_id = 'gr-m'));
-- nothing was written; the next call writes the expiry
SELECT balance_after FROM billing_credit('gr-m', 1, 'gr-m-c1');
SELECT count(*) AS expire_entries, sum(amount_micros) AS amount_micros
  FROM billing.entries WHERE tenant_id = 'gr-m' AND kind = 'expire';
-- and once written, its trace id is ZB014 for every function, not a
-- conflict (ZB005) with an "original expire" (grant and refund probe for a
-- replay first)
SELECT * FROM pg_temp.gr_m_writers((SELECT trace_id FROM billing.entries WHERE tenant_id = 'gr-m' AND kind = 'expire'));

SELECT count(*) AS problems FROM billing_verify();
