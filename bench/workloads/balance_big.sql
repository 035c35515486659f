-- billing_balance of the account with BENCH_BALANCE_ENTRIES entries: a cached
-- read, so it should take as long as on the small account.
SELECT billing_balance('bal-big');
