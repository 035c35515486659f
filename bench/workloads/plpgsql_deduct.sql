-- Baseline: the PL/pgSQL deduct of bench/plpgsql_deduct.sql, spread over
-- :tenants accounts, unique trace ids, amounts 0.000001 .. 0.999999.
\set t random(1, :tenants)
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT entry_id FROM plb.deduct('t' || :t::int, :a::int * 0.000001, 'p-' || :client_id::int || '-' || :r::bigint);
