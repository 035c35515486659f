--
-- 070_verify: billing_verify() audits the ledger.  It returns one row per
-- inconsistent account and nothing when all is well.  To show each
-- problem, this file corrupts data as the superuser (accounts can be
-- updated; entries only with their append-only trigger switched off) and
-- rolls the corruption back or repairs it.  Tenants start with "ver-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id FROM billing_account_create('ver-a');
SELECT tenant_id FROM billing_account_create('ver-b', credit_limit => 5);
SELECT balance_after FROM billing_credit('ver-a', 10, 'ver-a-1');
SELECT balance_after FROM billing_deduct('ver-a', 4, 'ver-a-2');
SELECT balance_after FROM billing_credit('ver-b', 1, 'ver-b-1');
SELECT balance_after FROM billing_deduct('ver-b', 3, 'ver-b-2');
SELECT balance_after FROM billing_credit('ver-b', 7, 'ver-b-3', kind => 'refund');
SELECT entry_id AS b2_id FROM billing.entries WHERE tenant_id = 'ver-b' AND trace_id = 'ver-b-2' \gset
SELECT entry_id AS b3_id FROM billing.entries WHERE tenant_id = 'ver-b' AND trace_id = 'ver-b-3' \gset

-- A consistent database: no rows, for all accounts and for one.
SELECT count(*) AS problems FROM billing_verify();
SELECT * FROM billing_verify('ver-a');
SELECT * FROM billing_verify('ver-b');

-- 1. The cached balance differs from the sum of the entries.
UPDATE billing.accounts SET balance_micros = balance_micros + 1 WHERE tenant_id = 'ver-a';
SELECT * FROM billing_verify();
SELECT * FROM billing_verify('ver-a');
SELECT * FROM billing_verify('ver-b');
-- repaired
UPDATE billing.accounts SET balance_micros = balance_micros - 1 WHERE tenant_id = 'ver-a';
SELECT * FROM billing_verify();

-- 2. A rewritten balance_after breaks the chain at that entry and the next
-- one (each balance_after must be the previous one plus the amount).
BEGIN;
ALTER TABLE billing.entries DISABLE TRIGGER entries_append_only;
UPDATE billing.entries SET balance_after_micros = balance_after_micros + 5000000
 WHERE tenant_id = 'ver-b' AND trace_id = 'ver-b-2';
SELECT tenant_id, cached_balance, ledger_sum, entries, chain_breaks,
       first_break_entry_id = :b2_id AS first_break_is_b2, problem
  FROM billing_verify();
ROLLBACK;

-- 3. A rewritten amount: the sum no longer matches, and the chain breaks
-- at that entry.
BEGIN;
ALTER TABLE billing.entries DISABLE TRIGGER entries_append_only;
UPDATE billing.entries SET amount_micros = amount_micros + 1
 WHERE tenant_id = 'ver-b' AND trace_id = 'ver-b-3';
SELECT tenant_id, cached_balance, ledger_sum, entries, chain_breaks,
       first_break_entry_id = :b3_id AS first_break_is_b3, problem
  FROM billing_verify('ver-b');
ROLLBACK;

-- 4. The account version is behind its entries (a lost account update).
BEGIN;
UPDATE billing.accounts SET version = version - 1 WHERE tenant_id = 'ver-a';
SELECT * FROM billing_verify('ver-a');
ROLLBACK;

-- 5. Entries without an account (inserting is possible for the owner,
-- deleting the account only with its trigger off).
BEGIN;
INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros, balance_after_micros, version)
VALUES ('ver-ghost', 'ver-ghost-1', 'topup', 2500000, 2500000, 1);
SELECT * FROM billing_verify('ver-ghost');
ALTER TABLE billing.accounts DISABLE TRIGGER accounts_no_delete;
DELETE FROM billing.accounts WHERE tenant_id = 'ver-a';
-- every problem at once, one row per tenant, ordered by tenant id
UPDATE billing.accounts SET balance_micros = 0 WHERE tenant_id = 'ver-b';
SELECT * FROM billing_verify();
ROLLBACK;

-- 6. The cached sum of what is left on the open holds differs from the
-- holds themselves (a lost update of the account row).
BEGIN;
SELECT status, amount FROM billing_hold('ver-a', 1.5, 'ver-a-h1');
SELECT count(*) AS problems FROM billing_verify('ver-a');
UPDATE billing.accounts SET holds_micros = holds_micros - 1 WHERE tenant_id = 'ver-a';
SELECT * FROM billing_verify('ver-a');
ROLLBACK;

-- 7. Entry ids that do not rise with versions (entry_id_seq with a CACHE
-- above 1, imported entries): the chain is still checked in version order.
-- a) two entries' versions swapped: in version order their balance_after
--    values no longer follow each other, so the chain breaks at both.
BEGIN;
ALTER TABLE billing.entries DISABLE TRIGGER entries_append_only;
UPDATE billing.entries e SET version = s.v
  FROM (VALUES ('ver-b-2', (SELECT version FROM billing.entries WHERE tenant_id = 'ver-b' AND trace_id = 'ver-b-3')),
               ('ver-b-3', (SELECT version FROM billing.entries WHERE tenant_id = 'ver-b' AND trace_id = 'ver-b-2'))) AS s(t, v)
 WHERE e.tenant_id = 'ver-b' AND e.trace_id = s.t;
SELECT tenant_id, cached_balance, ledger_sum, entries, chain_breaks,
       first_break_entry_id = :b2_id AS first_break_is_b2, problem
  FROM billing_verify('ver-b');
ROLLBACK;
-- b) a consistent ledger written with interleaved entry ids: entries of
--    tenant ver-c get ids in the opposite order of their versions.  No
--    problem is reported.
BEGIN;
SELECT tenant_id FROM billing_account_create('ver-c');
INSERT INTO billing.entries (tenant_id, entry_id, trace_id, kind, amount_micros, balance_after_micros, version)
VALUES ('ver-c', 3000000003, 'ver-c-1', 'topup', 5000000, 5000000, 1),
       ('ver-c', 3000000002, 'ver-c-2', 'deduct', -1000000, 4000000, 2),
       ('ver-c', 3000000001, 'ver-c-3', 'deduct', -500000, 3500000, 3);
UPDATE billing.accounts SET balance_micros = 3500000, version = 3 WHERE tenant_id = 'ver-c';
SELECT count(*) AS problems FROM billing_verify('ver-c');
-- ... while a real break among them is still found (first_break_entry_id
-- is the lowest id among the broken entries, as always)
ALTER TABLE billing.entries DISABLE TRIGGER entries_append_only;
UPDATE billing.entries SET balance_after_micros = 4100000 WHERE tenant_id = 'ver-c' AND trace_id = 'ver-c-2';
SELECT tenant_id, entries, chain_breaks, first_break_entry_id, problem FROM billing_verify('ver-c');
ROLLBACK;
-- c) a restored ledger whose values are near bigint's limits: a break
--    there is reported, not raised as 22003 (the check in version order
--    adds in numeric)
BEGIN;
SELECT tenant_id FROM billing_account_create('ver-d');
ALTER TABLE billing.entries DISABLE TRIGGER entries_append_only;
INSERT INTO billing.entries (tenant_id, entry_id, trace_id, kind, amount_micros, balance_after_micros, version)
VALUES ('ver-d', 3000000005, 'ver-d-1', 'topup', 9000000000000000000, 9000000000000000000, 1),
       ('ver-d', 3000000004, 'ver-d-2', 'topup', 9000000000000000000, 9000000000000000000, 2);
SELECT tenant_id, entries, chain_breaks, first_break_entry_id, problem FROM billing_verify('ver-d');
ROLLBACK;

-- Back to consistent: the corruptions above were repaired or rolled back.
SELECT count(*) AS problems FROM billing_verify();
SELECT tenant_id, balance, version FROM billing.balances WHERE tenant_id LIKE 'ver-%' ORDER BY 1;
SELECT tgrelid::regclass, tgname, tgenabled FROM pg_trigger
 WHERE tgname IN ('entries_append_only', 'accounts_no_delete') ORDER BY 2;
