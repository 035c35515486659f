-- billing_balance of the account with 1,000 entries (BENCH_BALANCE=1); run
-- together with balance_big.sql, each transaction picking one at random.
SELECT billing_balance('bal-small');
