-- The batch API: one billing_deduct_many call of :items charges (run.sh
-- passes -D items=BENCH_BATCH_ITEMS), each on a random tenant of :tenants
-- with a random amount 0.000001 .. 0.999999 and a unique trace id
-- 'b-<client>-<random>-<item>'.  One pgbench transaction = one call = :items
-- deductions; run.sh reports deductions/s = TPS × :items.  The function
-- locks the accounts in tenant order, so concurrent batches wait for each
-- other instead of deadlocking.
\set r random(1, 9000000000000000)
SELECT count(*)
  FROM (SELECT array_agg('t' || (1 + floor(random() * :tenants::int))::int) AS tenants,
               array_agg((1 + floor(random() * 999999))::int * 0.000001) AS amounts,
               array_agg('b-' || :client_id::int || '-' || :r::bigint || '-' || g) AS traces
          FROM generate_series(1, :items::int) AS g) AS b,
       billing_deduct_many(b.tenants, b.amounts, b.traces) AS d;
