-- billing_try_deduct spread over :tenants accounts (never rejected here:
-- every account holds 1e9), unique trace ids.
\set t random(1, :tenants)
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT status FROM billing_try_deduct('t' || :t::int, :a::int * 0.000001, 'x-' || :client_id::int || '-' || :r::bigint);
