-- One event per transaction: on one of 100 accounts x1..x100 that sit below
-- their low-balance threshold (balance 0.50, low_balance 1.00; setup_events_lag
-- in run.sh), a credit of 1.00 re-arms the threshold and a charge of 1.00
-- crosses it again: a balance.low event, committed with the charge.  Mixed
-- 1:9 with deduct.sql by the events lag run.
\set x random(1, 100)
\set r random(1, 9000000000000000)
BEGIN;
SELECT entry_id FROM billing_credit('x' || :x::int, 1, 'xc-' || :client_id::int || '-' || :r::bigint);
SELECT entry_id FROM billing_deduct('x' || :x::int, 1, 'xd-' || :client_id::int || '-' || :r::bigint);
COMMIT;
