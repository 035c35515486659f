--
-- 040_errors: every error a caller can get from the SQL API, with its
-- SQLSTATE, message, detail and hint, and proof that a failed call leaves
-- nothing behind.  Tenants start with "err-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never
-- the event times below are fixed dates; charges accept event_at within
-- billing.event_at_window of now (default 7 days; see 045_bounds)
SET billing.event_at_window = '11000d';

SELECT tenant_id FROM billing_account_create('err-a');
SELECT balance_after FROM billing_credit('err-a', 100, 'err-a-seed');

-- The state of the whole billing schema.  Ledger tables only grow, so an
-- unchanged state after a group of failed calls means none of them wrote
-- anything.
CREATE FUNCTION pg_temp.billing_state() RETURNS text
    LANGUAGE sql
AS $$
    SELECT format('err-a balance %s version %s; accounts %s, entries %s, rejections %s, account_events %s',
                  (SELECT balance FROM billing.balances WHERE tenant_id = 'err-a'),
                  (SELECT version FROM billing.balances WHERE tenant_id = 'err-a'),
                  (SELECT count(*) FROM billing.accounts),
                  (SELECT count(*) FROM billing.entries),
                  (SELECT count(*) FROM billing.rejections),
                  (SELECT count(*) FROM billing.account_events))
$$;
SELECT pg_temp.billing_state() AS state0 \gset

-- What a client sees for a failed call: the error is raised, the
-- statement (and an enclosing transaction) is rolled back.
SELECT billing_credit('err-a', -5, 'err-a-1');
BEGIN;
SELECT balance_after FROM billing_credit('err-a', 5, 'err-a-1');
SELECT billing_deduct('err-a', 1000, 'err-a-2');
SELECT billing_balance('err-a');
ROLLBACK;
SELECT pg_temp.billing_state() = :'state0' AS unchanged;

--
-- billing_credit: one error per kind of bad argument.
--
-- required arguments (ZB015): tenant_id, amount, trace_id, and kind
SELECT regress_error($$SELECT billing_credit(NULL, 1, 'err-c-1')$$);
SELECT regress_error($$SELECT billing_credit('err-a', NULL, 'err-c-1')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, NULL)$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-1', kind => NULL)$$);
-- the optional ones may be NULL
SELECT kind, amount, balance_after FROM billing_credit('err-a', 1, 'err-c-1', NULL, NULL, NULL);
SELECT pg_temp.billing_state() AS state0 \gset
-- tenant_id (ZB016): 1 to 255 characters, counted as characters; a valid
-- id of an unknown tenant gets ZB001
SELECT regress_error($$SELECT billing_credit('', 1, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit(repeat('t', 256), 1, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit(repeat('é', 256), 1, 'err-c-2')$$);
SELECT split_part(regress_error($$SELECT billing_credit(repeat('t', 255), 1, 'err-c-2')$$), ' ', 1)
       AS "255 characters pass, the account lookup fails";
SELECT regress_error($$SELECT billing_credit('err-nobody', 1, 'err-c-2')$$);
-- trace_id (ZB014): 1 to 255 characters, counted as characters
SELECT regress_error($$SELECT billing_credit('err-a', 1, '')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, repeat('r', 256))$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, repeat('€', 256))$$);
-- amount: positive (ZB010), finite (ZB011), at most 6 decimals (ZB012),
-- at most 10^12 per call (ZB013)
SELECT regress_error($$SELECT billing_credit('err-a', 0, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 0.000000000, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', -1, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', -0.000001, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 'NaN', 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 'Infinity', 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', '-Infinity', 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 0.0000001, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1.0000001, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1.0000000000000000000001, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1000000000000.000001, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', -1e13, 'err-c-2')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1e30, 'err-c-2')$$);
-- kind (ZB017): topup, grant, refund or adjustment
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', kind => 'deduct')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', kind => 'TOPUP')$$);
-- a kind is an identifier first (ZB018: empty, too long, a control
-- character), so the refusal never shows an unbounded or multi-line value
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', kind => '')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', kind => repeat('k', 100000))$$);
SELECT regress_error($$SELECT billing_deduct('err-a', 1, 'err-c-2', kind => E'x"\nLOG:  forged')$$);
-- metadata (ZB018): a JSON object
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', metadata => '[1, 2]')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', metadata => '"gpt"')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', metadata => '42')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', metadata => 'null')$$);
-- description (ZB018): at most 1000 characters
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', description => repeat('d', 1001))$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', description => repeat('ü', 1001))$$);
-- event_at (ZB019): finite
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', event_at => 'infinity')$$);
SELECT regress_error($$SELECT billing_credit('err-a', 1, 'err-c-2', event_at => '-infinity')$$);
-- Arguments are checked before the account is looked up, and the first
-- problem wins: NULLs first (tenant_id, amount, trace_id, kind), then
-- tenant_id, trace_id, amount, description, metadata, event_at, kind.
SELECT regress_error($$SELECT billing_credit('', -1, '', metadata => '[]', kind => NULL)$$);
SELECT regress_error($$SELECT billing_credit('', -1, '', metadata => '[]', kind => 'x')$$);
SELECT regress_error($$SELECT billing_credit('err-nobody', -1, '', metadata => '[]', kind => 'x')$$);
SELECT regress_error($$SELECT billing_credit('err-nobody', 1, 'err-c-2', repeat('d', 1001), '[]', 'infinity', 'x')$$);
SELECT regress_error($$SELECT billing_credit('err-nobody', 1, 'err-c-2', NULL, '[]', 'infinity', 'x')$$);
SELECT regress_error($$SELECT billing_credit('err-nobody', 1, 'err-c-2', NULL, NULL, 'infinity', 'x')$$);
SELECT regress_error($$SELECT billing_credit('err-nobody', 1, 'err-c-2', NULL, NULL, NULL, 'x')$$);
SELECT pg_temp.billing_state() = :'state0' AS unchanged;

-- The limits themselves are accepted: 255-character ids (multibyte too),
-- 10^12, exactly 6 decimals, 1000-character descriptions.
SELECT length(tenant_id) AS tenant_chars FROM billing_account_create('err-' || repeat('ß', 251));
SELECT length(trace_id) AS trace_chars, octet_length(trace_id) AS trace_bytes, amount, balance_after
  FROM billing_credit('err-' || repeat('ß', 251), 1000000000000, repeat('€', 255),
                      description => repeat('ü', 1000));
SELECT amount, balance_after
  FROM billing_deduct('err-' || repeat('ß', 251), 999999999999.999999, repeat('r', 255));
SELECT length(description) AS description_chars FROM billing.entries
 WHERE tenant_id = 'err-' || repeat('ß', 251) AND trace_id = repeat('€', 255);

--
-- billing_deduct and billing_try_deduct check their arguments the same
-- way; argument errors are raised by the try form too (they are caller
-- bugs, not business rejections) and nothing is recorded.  The debit
-- kinds are deduct and adjustment.
--
SELECT pg_temp.billing_state() AS state0 \gset
CREATE TEMP TABLE arg_cases (n int, label text, args text);
INSERT INTO arg_cases VALUES
    ( 1, 'tenant_id null',         $$NULL, 1, 'err-d-1'$$),
    ( 2, 'amount null',            $$'err-a', NULL, 'err-d-1'$$),
    ( 3, 'trace_id null',          $$'err-a', 1, NULL$$),
    ( 4, 'kind null',              $$'err-a', 1, 'err-d-1', kind => NULL$$),
    ( 5, 'tenant_id empty',        $$'', 1, 'err-d-1'$$),
    ( 6, 'tenant_id 256 chars',    $$repeat('é', 256), 1, 'err-d-1'$$),
    ( 7, 'tenant_id 255, unknown', $$repeat('é', 255), 1, 'err-d-1'$$),
    ( 8, 'trace_id empty',         $$'err-a', 1, ''$$),
    ( 9, 'trace_id 256 chars',     $$'err-a', 1, repeat('€', 256)$$),
    (10, 'amount 0',               $$'err-a', 0, 'err-d-1'$$),
    (11, 'amount negative',        $$'err-a', -1, 'err-d-1'$$),
    (12, 'amount NaN',             $$'err-a', 'NaN', 'err-d-1'$$),
    (13, 'amount Infinity',        $$'err-a', 'Infinity', 'err-d-1'$$),
    (14, 'amount -Infinity',       $$'err-a', '-Infinity', 'err-d-1'$$),
    (15, 'amount 7 decimals',      $$'err-a', 0.0000001, 'err-d-1'$$),
    (16, 'amount > 10^12',         $$'err-a', 1000000000000.000001, 'err-d-1'$$),
    (17, 'kind topup',             $$'err-a', 1, 'err-d-1', kind => 'topup'$$),
    (18, 'kind refund',            $$'err-a', 1, 'err-d-1', kind => 'refund'$$),
    (19, 'metadata array',         $$'err-a', 1, 'err-d-1', metadata => '[]'$$),
    (20, 'metadata scalar',        $$'err-a', 1, 'err-d-1', metadata => 'true'$$),
    (21, 'description 1001 chars', $$'err-a', 1, 'err-d-1', description => repeat('d', 1001)$$),
    (22, 'event_at infinity',      $$'err-a', 1, 'err-d-1', event_at => 'infinity'$$),
    (23, 'unknown tenant',         $$'err-nobody', 1, 'err-d-1'$$);
-- (long runs of one character are shortened to three and "...")
SELECT n, label,
       regexp_replace(split_part(regress_error(format('SELECT billing_deduct(%s)', args)), E'\n', 1),
                      '([^0-9])\1{9,}', '\1\1\1...', 'g') AS billing_deduct
  FROM arg_cases ORDER BY n;
-- the try form: same first line, same detail and hint
SELECT n, label,
       regress_error(format('SELECT billing_try_deduct(%s)', args))
     = regress_error(format('SELECT billing_deduct(%s)', args)) AS same_as_deduct
  FROM arg_cases ORDER BY n;
-- the full texts of the debit kind error
SELECT regress_error($$SELECT billing_deduct('err-a', 1, 'err-d-1', kind => 'grant')$$);
SELECT regress_error($$SELECT billing_try_deduct('err-a', 1, 'err-d-1', kind => 'grant')$$);
SELECT pg_temp.billing_state() = :'state0' AS unchanged;

--
-- Balance overflow (ZB013): the balance is a 64-bit count of micro-units,
-- so it can hold at most 9223372036854.775807.  Ten credits of 10^12 do
-- not fit; the largest balance does, one micro-unit more does not.
--
SELECT tenant_id FROM billing_account_create('err-big');
SELECT g AS credit, balance_after
  FROM generate_series(1, 9) g,
       LATERAL billing_credit('err-big', 1e12, 'err-big-' || g);
SELECT pg_temp.billing_state() AS state0 \gset
SELECT regress_error($$SELECT billing_credit('err-big', 1e12, 'err-big-10')$$);
SELECT pg_temp.billing_state() = :'state0' AS unchanged;
SELECT amount, balance_after FROM billing_credit('err-big', 223372036854.775807, 'err-big-11');
SELECT balance_micros = 9223372036854775807 AS at_bigint_max
  FROM billing.accounts WHERE tenant_id = 'err-big';
SELECT regress_error($$SELECT billing_credit('err-big', 0.000001, 'err-big-12')$$);
SELECT regress_error($$SELECT billing_credit('err-big', 1e12, 'err-big-12', kind => 'refund')$$);
-- it can still be charged and read
SELECT amount, balance_after FROM billing_deduct('err-big', 0.000001, 'err-big-13');
SELECT balance, available FROM billing.balances WHERE tenant_id = 'err-big';
SELECT * FROM billing_verify('err-big');
-- Balance plus credit limit can exceed what a bigint holds: available
-- funds are computed in numeric by billing.balances and without overflow
-- by the charges, so a charge and a hold still fit.  (In a transaction
-- that is rolled back: the account stays as it is for the end of the file.)
BEGIN;
SELECT balance, credit_limit, on_hold, available
  FROM billing_account_update('err-big', credit_limit => 1e12);
SELECT status, amount, balance_after, sqlstate, detail
  FROM billing_try_deduct('err-big', 1, 'err-big-14');
SELECT regress_error($$SELECT billing_hold('err-big', 1, 'err-big-15')$$) AS hold;
SELECT balance, credit_limit, on_hold, available FROM billing.balances WHERE tenant_id = 'err-big';
ROLLBACK;

--
-- Reading functions.
--
-- billing_balance: tenant required (ZB015), 1 to 255 characters (ZB016),
-- unknown tenant (ZB001)
SELECT regress_error($$SELECT billing_balance(NULL)$$);
SELECT regress_error($$SELECT billing_balance('')$$);
SELECT regress_error($$SELECT billing_balance(repeat('t', 256))$$);
SELECT regress_error($$SELECT billing_balance('err-nobody')$$);
-- billing_balance_at: both arguments required, unknown tenant
SELECT regress_error($$SELECT billing_balance_at(NULL, now())$$);
SELECT regress_error($$SELECT billing_balance_at('err-a', NULL)$$);
SELECT regress_error($$SELECT billing_balance_at('err-nobody', now())$$);
-- infinite times are fine: nothing before -infinity, everything before infinity
SELECT billing_balance_at('err-a', '-infinity') AS at_minus_infinity,
       billing_balance_at('err-a', 'infinity') AS at_infinity,
       billing_balance('err-a') AS balance;
-- billing_verify of an unknown tenant is an error (ZB001), not an empty
-- (all is well) result; without an argument it checks every account
SELECT regress_error($$SELECT * FROM billing_verify('err-nobody')$$);

--
-- Accounts (details in 010_accounts): the SQLSTATE of each bad setting.
--
SELECT pg_temp.billing_state() AS state0 \gset
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('create: tenant null',     $$SELECT billing_account_create(NULL)$$),
    ('create: tenant empty',    $$SELECT billing_account_create('')$$),
    ('create: tenant 256',      $$SELECT billing_account_create(repeat('x', 256))$$),
    ('create: currency',        $$SELECT billing_account_create('err-new', currency => 'eur')$$),
    ('create: limit negative',  $$SELECT billing_account_create('err-new', credit_limit => -1)$$),
    ('create: limit NaN',       $$SELECT billing_account_create('err-new', credit_limit => 'NaN')$$),
    ('create: limit decimals',  $$SELECT billing_account_create('err-new', credit_limit => 0.0000001)$$),
    ('create: limit > 10^12',   $$SELECT billing_account_create('err-new', credit_limit => 1e12 + 1)$$),
    ('create: status',          $$SELECT billing_account_create('err-new', status => 'gone')$$),
    ('create: closed',          $$SELECT billing_account_create('err-new', status => 'closed')$$),
    ('create: timezone',        $$SELECT billing_account_create('err-new', timezone => 'Moon/Base')$$),
    ('create: metadata',        $$SELECT billing_account_create('err-new', metadata => '[]')$$),
    ('create: other settings',  $$SELECT billing_account_create('err-a', currency => 'EUR')$$),
    ('update: tenant null',     $$SELECT billing_account_update(NULL)$$),
    ('update: tenant empty',    $$SELECT billing_account_update('')$$),
    ('update: unknown tenant',  $$SELECT billing_account_update('err-nobody', status => 'active')$$),
    ('update: limit negative',  $$SELECT billing_account_update('err-a', credit_limit => -1)$$),
    ('update: limit Infinity',  $$SELECT billing_account_update('err-a', credit_limit => 'Infinity')$$),
    ('update: limit decimals',  $$SELECT billing_account_update('err-a', credit_limit => 1.0000001)$$),
    ('update: limit > 10^12',   $$SELECT billing_account_update('err-a', credit_limit => 1e13)$$),
    ('update: status',          $$SELECT billing_account_update('err-a', status => 'deleted')$$),
    ('update: timezone',        $$SELECT billing_account_update('err-a', timezone => 'Nowhere')$$),
    ('update: metadata',        $$SELECT billing_account_update('err-a', metadata => '1')$$)
  ) AS t(label, sql);
SELECT pg_temp.billing_state() = :'state0' AS unchanged;
-- closed accounts refuse updates (ZB003)
SELECT tenant_id FROM billing_account_create('err-closed');
SELECT status FROM billing_account_update('err-closed', status => 'closed');
SELECT split_part(regress_error($$SELECT billing_account_update('err-closed', reason => 'x', status => 'active')$$),
                  E'\n', 1) AS error;

-- the worker's internal calls check the tenant id's length (ZB016), before
-- the account's lookup could echo it whole in ZB001 ...
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('expire_holds_of: 100,000 characters', $$SELECT billing.expire_holds_of(repeat('x', 100000))$$),
    ('alerts_check: 256 characters',        $$SELECT billing.alerts_check(repeat('x', 256))$$)
  ) AS t(label, sql);
-- ... and only its length: an account of 1.3, which checked no more, may
-- have a line break in its id, and the maintenance must still reach it
BEGIN;
INSERT INTO billing.accounts (tenant_id) VALUES (E'legacy-\nid');
SELECT billing.expire_holds_of(E'legacy-\nid') AS expired, billing.alerts_check(E'legacy-\nid') AS alerted;
ROLLBACK;

-- Everything at the end: the failed calls of this file wrote nothing.
SELECT tenant_id, balance, version FROM billing.balances
 WHERE tenant_id LIKE 'err-%' AND length(tenant_id) < 20 ORDER BY 1;
SELECT tenant_id, count(*) AS entries FROM billing.entries
 WHERE tenant_id LIKE 'err-%' AND length(tenant_id) < 20 GROUP BY 1 ORDER BY 1;
SELECT count(*) AS rejections FROM billing.rejections WHERE tenant_id LIKE 'err-%';
SELECT * FROM billing_verify() WHERE tenant_id LIKE 'err-%';
