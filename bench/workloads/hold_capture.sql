-- The streaming case: billing_hold an estimate (1.00), then billing_capture
-- what was used (0.000001 .. 0.999999) with final => true, which settles the
-- hold and releases the rest.  Two autocommit statements: one pgbench
-- transaction = hold + capture = 2 commits.  Random tenant of :tenants; the
-- hold's trace id is unique per client ('hc-<client>-<random>'), the
-- capture's (it names a ledger entry) is that plus '-c'.
\set t random(1, :tenants)
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT hold_id FROM billing_hold('t' || :t::int, 1.0, 'hc-' || :client_id::int || '-' || :r::bigint);
SELECT entry_id FROM billing_capture('t' || :t::int, 'hc-' || :client_id::int || '-' || :r::bigint,
                                     :a::int * 0.000001, 'hc-' || :client_id::int || '-' || :r::bigint || '-c',
                                     final => true);
