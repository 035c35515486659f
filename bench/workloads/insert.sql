-- Baseline: a bare one-row INSERT with a unique text key, one per transaction.
-- The key has the shape of a trace id; a collision (1 in ~10^15 per pair)
-- would abort the client, so it practically never happens.
\set r random(1, 9000000000000000)
INSERT INTO bench_insert (k) VALUES ('i-' || :client_id::int || '-' || :r::bigint);
