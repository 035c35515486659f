--
-- 150_direct_writes: a charge writes billing.entries and billing.accounts
-- by direct heap and index access (src/direct.c), not through SQL
-- statements.  What a DBA can rely on all the same: row triggers fire,
-- several charges in one statement or transaction see each other, a
-- rolled-back charge leaves nothing, and the indexes find every row.
-- Tenants start with "dw-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id FROM billing_account_create('dw-a');
SELECT balance_after FROM billing_credit('dw-a', 100, 'dw-a-top');

-- A row trigger added on the ledger sees every entry a charge writes, and
-- one on the accounts every balance change (e.g. a DBA's own audit).  The
-- trigger runs inside the SECURITY DEFINER function, with its pinned
-- search_path: it names its tables with their schema.
CREATE TABLE dw_seen (tbl text, trace_or_balance text);
CREATE FUNCTION dw_entry_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.dw_seen VALUES ('entries', NEW.trace_id);
    RETURN NEW;
END $$;
CREATE FUNCTION dw_account_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.dw_seen VALUES ('accounts', NEW.balance_micros::text);
    RETURN NEW;
END $$;
CREATE TRIGGER dw_entry_seen AFTER INSERT ON billing.entries
    FOR EACH ROW EXECUTE FUNCTION dw_entry_seen();
CREATE TRIGGER dw_account_seen AFTER UPDATE ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION dw_account_seen();
SELECT balance_after FROM billing_deduct('dw-a', 1.5, 'dw-a-1');
SELECT replayed FROM billing_deduct('dw-a', 1.5, 'dw-a-1');   -- a replay writes nothing
SELECT * FROM dw_seen ORDER BY 1;
DROP TRIGGER dw_entry_seen ON billing.entries;
DROP TRIGGER dw_account_seen ON billing.accounts;

-- A BEFORE trigger that rejects the row stops the charge: nothing is written.
CREATE FUNCTION dw_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'refused by a local rule';
END $$;
CREATE TRIGGER dw_refuse BEFORE INSERT ON billing.entries
    FOR EACH ROW EXECUTE FUNCTION dw_refuse();
SELECT billing_deduct('dw-a', 1, 'dw-a-2');
DROP TRIGGER dw_refuse ON billing.entries;
SELECT balance, version FROM billing.balances WHERE tenant_id = 'dw-a';

-- A BEFORE trigger that returns NULL would skip the entry (or the account
-- update) and leave the other half written: refused (09000), nothing written.
CREATE FUNCTION dw_skip() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NULL;
END $$;
CREATE TRIGGER dw_skip BEFORE INSERT ON billing.entries
    FOR EACH ROW EXECUTE FUNCTION dw_skip();
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-skip')$$) AS error;
DROP TRIGGER dw_skip ON billing.entries;
CREATE TRIGGER dw_skip BEFORE UPDATE ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION dw_skip();
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-skip')$$) AS error;
DROP TRIGGER dw_skip ON billing.accounts;

-- Statement-level triggers and rules would not fire for a charge's direct
-- writes, so a charge refuses to run while one exists (55000).
CREATE FUNCTION dw_stmt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NULL;
END $$;
CREATE TRIGGER dw_stmt AFTER INSERT ON billing.entries
    FOR EACH STATEMENT EXECUTE FUNCTION dw_stmt();
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-stmt')$$) AS error;
DROP TRIGGER dw_stmt ON billing.entries;
CREATE TRIGGER dw_stmt AFTER UPDATE ON billing.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION dw_stmt();
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-stmt')$$) AS error;
DROP TRIGGER dw_stmt ON billing.accounts;
SELECT count(*) AS written FROM billing.entries WHERE trace_id IN ('dw-a-skip', 'dw-a-stmt');

-- A read-only transaction refuses a charge, and a replay, as SELECT ...
-- FOR UPDATE would (25006).
BEGIN READ ONLY;
SELECT regress_error($$SELECT billing_deduct('dw-a', 1.5, 'dw-a-1')$$) AS error;
ROLLBACK;
BEGIN READ ONLY;
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-ro')$$) AS error;
ROLLBACK;

-- Many charges of one account in one statement: each sees the one before
-- (balance_after and version climb), and a repeated trace id in the same
-- statement is a replay of the first.
SELECT g, d.balance_after, d.version, d.replayed
  FROM generate_series(1, 4) g,
       LATERAL billing_deduct('dw-a', 1, 'dw-a-loop-' || least(g, 3)) d
 ORDER BY g;

-- In a transaction: a rolled-back savepoint takes its charge with it, the
-- next charge reuses nothing of it.
BEGIN;
SELECT balance_after FROM billing_deduct('dw-a', 10, 'dw-a-tx-1');
SAVEPOINT s;
SELECT balance_after FROM billing_deduct('dw-a', 20, 'dw-a-tx-2');
ROLLBACK TO s;
SELECT balance_after, version FROM billing_deduct('dw-a', 5, 'dw-a-tx-3');
COMMIT;
SELECT count(*) FILTER (WHERE trace_id = 'dw-a-tx-2') AS rolled_back_entries,
       count(*) AS entries
  FROM billing.entries WHERE tenant_id = 'dw-a';

-- The indexes were maintained: lookups by trace id and by entry id (index
-- scans forced) find the rows the direct path wrote.
SET enable_seqscan = off;
SELECT trace_id, amount_micros FROM billing.entries
 WHERE tenant_id = 'dw-a' AND trace_id = 'dw-a-tx-3';
SELECT count(*) FROM billing.entries e
  JOIN billing.entries f USING (tenant_id, entry_id)
 WHERE e.tenant_id = 'dw-a';
RESET enable_seqscan;
SELECT * FROM billing_verify('dw-a');

-- After a column is added to the ledger by hand, the library refuses to
-- insert entries it cannot fill (instead of leaving the column NULL):
-- 55000, and works again once the column is gone.
BEGIN;
ALTER TABLE billing.entries ADD COLUMN dw_extra text DEFAULT 'x';
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-extra')$$) AS error;
ROLLBACK;
SELECT balance_after FROM billing_deduct('dw-a', 1, 'dw-a-extra');

DROP TABLE dw_seen;
DROP FUNCTION dw_entry_seen(), dw_account_seen(), dw_refuse(), dw_skip(), dw_stmt();
