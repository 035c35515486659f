-- billing_deduct with 20 % replays: one call in five resends a charge made
-- at load time (trace ids seed-1 .. seed-:seeds, see bench/setup.sql: seed s
-- went to tenant t((s - 1) % tenants + 1) for (s % 997 + 1) micro-units),
-- so it returns the recorded entry (replayed = true) instead of charging.
\set p random(1, 100)
\if :p <= 20
\set s random(1, :seeds)
\set t (:s - 1) % :tenants + 1
\set a :s % 997 + 1
SELECT entry_id FROM billing_deduct('t' || :t::int, :a::int * 0.000001, 'seed-' || :s::int);
\else
\set t random(1, :tenants)
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT entry_id FROM billing_deduct('t' || :t::int, :a::int * 0.000001, 'm-' || :client_id::int || '-' || :r::bigint);
\endif
