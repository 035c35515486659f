-- billing_deduct spread over :tenants accounts, unique trace ids,
-- amounts 0.000001 .. 0.999999 (same arguments as plpgsql_deduct.sql).
\set t random(1, :tenants)
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT entry_id FROM billing_deduct('t' || :t::int, :a::int * 0.000001, 'd-' || :client_id::int || '-' || :r::bigint);
