-- billing_charge (the charge engine), every client charging the same account
-- ("hot"): deduct_hot.sql's arguments.  The engine applies what the clients
-- queued meanwhile with one lock and one write of the account.
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT entry_id FROM billing_charge('hot', :a::int * 0.000001, 'ch-' || :client_id::int || '-' || :r::bigint);
