-- billing_deduct, every client charging the same account ("hot"): all
-- charges of a tenant serialize on its account row.
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT entry_id FROM billing_deduct('hot', :a::int * 0.000001, 'h-' || :client_id::int || '-' || :r::bigint);
