-- billing_charge (the charge engine) spread over :tenants accounts, unique
-- trace ids, amounts 0.000001 .. 0.999999: deduct.sql's arguments.
\set t random(1, :tenants)
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT entry_id FROM billing_charge('t' || :t::int, :a::int * 0.000001, 'c-' || :client_id::int || '-' || :r::bigint);
