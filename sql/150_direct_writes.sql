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

-- A table renamed and another made in its place "LIKE ... INCLUDING ALL"
-- (a rebuild by swapping): the old index keeps its name, and its row
-- positions are the old table's.  The direct path finds indexes by name and
-- checks the one it found is on the table it opened: 55000, no other
-- tenant's row is read or written.
BEGIN;
ALTER TABLE billing.accounts RENAME TO accounts_old;
CREATE TABLE billing.accounts (LIKE billing.accounts_old INCLUDING ALL);
INSERT INTO billing.accounts SELECT * FROM billing.accounts_old ORDER BY tenant_id DESC;
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-swap')$$) AS error;
ROLLBACK;
-- ... and a view in its place (no heap): 55000, not a crash
BEGIN;
ALTER TABLE billing.entries RENAME TO entries_old;
CREATE VIEW billing.entries AS SELECT * FROM billing.entries_old;
SELECT regress_error($$SELECT billing_deduct('dw-a', 1, 'dw-a-view')$$) AS error;
ROLLBACK;
SELECT balance_after FROM billing_deduct('dw-a', 1, 'dw-a-swap');

-- Holds: billing_hold, billing_capture, billing_release and
-- billing_hold_extend read and write billing.holds and its journal
-- billing.hold_events the same way.  Row triggers see every hold row and
-- every journal row of hold -> extend -> capture (final, which also
-- journals the release of the rest) -> release (of a settled hold: amount 0).
SELECT tenant_id FROM billing_account_create('dw-h');
SELECT balance_after FROM billing_credit('dw-h', 100, 'dw-h-top');
CREATE TABLE dw_hold_rows (n serial, tbl text, what text);
CREATE FUNCTION dw_hold_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'holds' THEN
        INSERT INTO public.dw_hold_rows (tbl, what)
        VALUES ('holds ' || lower(TG_OP), NEW.trace_id || ' ' || NEW.status || ' '
                || NEW.captured_micros || '/' || NEW.released_micros);
    ELSE
        INSERT INTO public.dw_hold_rows (tbl, what)
        VALUES ('hold_events ' || lower(TG_OP),
                NEW.action || ' ' || coalesce(NEW.trace_id, '-') || ' ' || NEW.amount_micros);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER dw_hold_seen AFTER INSERT OR UPDATE ON billing.holds
    FOR EACH ROW EXECUTE FUNCTION dw_hold_seen();
CREATE TRIGGER dw_hold_seen AFTER INSERT ON billing.hold_events
    FOR EACH ROW EXECUTE FUNCTION dw_hold_seen();
SELECT status, remaining, available FROM billing_hold('dw-h', 10, 'dw-h-1');
SELECT status FROM billing_hold_extend('dw-h', 'dw-h-1', '1 hour');
SELECT amount, balance_after, hold_status, hold_remaining
  FROM billing_capture('dw-h', 'dw-h-1', 4, 'dw-h-1-cap', final => true);
SELECT status, released, replayed FROM billing_release('dw-h', 'dw-h-1', 'dw-h-1-rel');
SELECT replayed FROM billing_hold('dw-h', 10, 'dw-h-1');              -- replays write nothing
SELECT replayed, amount, balance_after
  FROM billing_capture('dw-h', 'dw-h-1', 4, 'dw-h-1-cap', final => true);
SELECT replayed FROM billing_release('dw-h', 'dw-h-1', 'dw-h-1-rel');
SELECT tbl, what FROM dw_hold_rows ORDER BY n;
DROP TRIGGER dw_hold_seen ON billing.holds;
DROP TRIGGER dw_hold_seen ON billing.hold_events;

-- A BEFORE trigger that returns NULL for a hold's row (09000) and a
-- statement trigger on the journal (55000) refuse the call: no hold, no
-- journal row, the account unchanged.
CREATE TRIGGER dw_skip BEFORE INSERT ON billing.holds
    FOR EACH ROW EXECUTE FUNCTION dw_skip();
SELECT regress_error($$SELECT billing_hold('dw-h', 1, 'dw-h-skip')$$) AS error;
DROP TRIGGER dw_skip ON billing.holds;
CREATE TRIGGER dw_stmt AFTER INSERT ON billing.hold_events
    FOR EACH STATEMENT EXECUTE FUNCTION dw_stmt();
SELECT regress_error($$SELECT billing_hold('dw-h', 1, 'dw-h-stmt')$$) AS error;
DROP TRIGGER dw_stmt ON billing.hold_events;
CREATE TRIGGER dw_stmt AFTER UPDATE ON billing.holds
    FOR EACH STATEMENT EXECUTE FUNCTION dw_stmt();
SELECT status FROM billing_hold('dw-h', 2, 'dw-h-2');   -- an insert: allowed
SELECT regress_error($$SELECT billing_release('dw-h', 'dw-h-2', 'dw-h-2-rel')$$) AS error;
DROP TRIGGER dw_stmt ON billing.holds;
SELECT (SELECT count(*) FROM billing.holds WHERE trace_id IN ('dw-h-skip', 'dw-h-stmt')) AS holds,
       (SELECT count(*) FROM billing.hold_events
         WHERE trace_id IN ('dw-h-skip', 'dw-h-stmt', 'dw-h-2-rel')) AS journal,
       (SELECT status FROM billing.holds WHERE trace_id = 'dw-h-2') AS still;

-- In a transaction: a hold is captured by the next statement; a hold in a
-- rolled-back savepoint is gone, and its trace id is free again.
BEGIN;
SELECT status FROM billing_hold('dw-h', 5, 'dw-h-tx');
SELECT hold_status, hold_remaining FROM billing_capture('dw-h', 'dw-h-tx', 1, 'dw-h-tx-cap');
SAVEPOINT s;
SELECT status FROM billing_hold('dw-h', 7, 'dw-h-sp');
ROLLBACK TO s;
SELECT regress_error($$SELECT billing_capture('dw-h', 'dw-h-sp', 1, 'dw-h-sp-cap')$$) AS error;
SELECT status, remaining FROM billing_hold('dw-h', 3, 'dw-h-sp');
SELECT status, released FROM billing_release('dw-h', 'dw-h-tx', 'dw-h-tx-rel');
COMMIT;

-- The indexes were maintained: index scans (forced) by trace id and by hold
-- id find every hold and journal row the calls wrote.
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT h.trace_id, h.status, (SELECT count(*) FROM billing.holds i
                               WHERE i.tenant_id = h.tenant_id AND i.hold_id = h.hold_id) AS by_id
  FROM billing.holds h
 WHERE h.tenant_id = 'dw-h' AND h.trace_id IN ('dw-h-1', 'dw-h-2', 'dw-h-tx', 'dw-h-sp')
 ORDER BY h.hold_id;
SELECT e.trace_id, e.action FROM billing.hold_events e
 WHERE e.tenant_id = 'dw-h' AND e.trace_id IN ('dw-h-1-cap', 'dw-h-1-rel', 'dw-h-tx-rel')
 ORDER BY e.event_id;
RESET enable_seqscan;
RESET enable_bitmapscan;
SELECT * FROM billing_verify('dw-h');

-- A CHECK constraint a DBA adds is enforced on every direct write (23514,
-- nothing written), and a changed or dropped one takes effect at once
-- (the planned constraints are kept per backend until the table changes).
-- NOT VALID: the rows already there are not checked, new ones are.  Only
-- the first line of each error is shown (its DETAIL names the whole row).
ALTER TABLE billing.entries ADD CONSTRAINT dw_max_debit CHECK (amount_micros >= -5000000) NOT VALID;
SELECT split_part(regress_error($$SELECT billing_deduct('dw-h', 6, 'dw-h-big')$$), E'\n', 1) AS error;
SELECT amount FROM billing_deduct('dw-h', 2, 'dw-h-small');
ALTER TABLE billing.entries DROP CONSTRAINT dw_max_debit;
ALTER TABLE billing.entries ADD CONSTRAINT dw_max_debit CHECK (amount_micros >= -1000000) NOT VALID;
SELECT split_part(regress_error($$SELECT billing_deduct('dw-h', 2, 'dw-h-small-2')$$), E'\n', 1) AS error;
ALTER TABLE billing.entries DROP CONSTRAINT dw_max_debit;
SELECT amount FROM billing_deduct('dw-h', 2, 'dw-h-small-2');
-- A constraint calling a function: planning folds the function's body
-- into the constraint, so replacing the function plans it again.
CREATE FUNCTION dw_max_debit() RETURNS bigint LANGUAGE sql IMMUTABLE AS 'SELECT 5000000::bigint';
ALTER TABLE billing.entries ADD CONSTRAINT dw_max_debit CHECK (amount_micros >= -dw_max_debit()) NOT VALID;
SELECT amount FROM billing_deduct('dw-h', 2, 'dw-h-fn-1');
CREATE OR REPLACE FUNCTION dw_max_debit() RETURNS bigint LANGUAGE sql IMMUTABLE AS 'SELECT 1000000::bigint';
SELECT split_part(regress_error($$SELECT billing_deduct('dw-h', 2, 'dw-h-fn-2')$$), E'\n', 1) AS error;
ALTER TABLE billing.entries DROP CONSTRAINT dw_max_debit;
DROP FUNCTION dw_max_debit();
ALTER TABLE billing.holds ADD CONSTRAINT dw_max_hold CHECK (amount_micros <= 50000000) NOT VALID;
SELECT split_part(regress_error($$SELECT billing_hold('dw-h', 51, 'dw-h-big')$$), E'\n', 1) AS error;
SELECT status FROM billing_hold('dw-h', 50, 'dw-h-50');
ALTER TABLE billing.holds DROP CONSTRAINT dw_max_hold;
SELECT (SELECT count(*) FROM billing.entries WHERE trace_id = 'dw-h-big') AS big_entries,
       (SELECT count(*) FROM billing.entries WHERE trace_id = 'dw-h-small-2') AS small_2_entries,
       (SELECT count(*) FROM billing.holds WHERE trace_id = 'dw-h-big') AS big_holds;

-- An update that keeps a unique index's columns skips that index's unique
-- check (src/direct.c: it could find nothing, and it visited every version
-- of the row the transaction had written).  Many charges of one account in
-- one statement move its row across pages, each move a new entry in
-- accounts_pkey: an index scan still finds one row, the ledger agrees.
SELECT count(billing_credit('dw-h', 0.000001, 'dw-h-many-' || g)) AS credits
  FROM generate_series(1, 500) g;
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT count(*) AS rows_by_index, min(version) = max(version) AS one_version
  FROM billing.accounts WHERE tenant_id = 'dw-h';
RESET enable_seqscan;
RESET enable_bitmapscan;
SELECT * FROM billing_verify('dw-h');
-- A BEFORE UPDATE trigger could change the key after the call: then the
-- check is not skipped, and a duplicate key is refused (23505).
CREATE FUNCTION dw_rekey() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.tenant_id := 'dw-a';
    RETURN NEW;
END $$;
CREATE TRIGGER dw_rekey BEFORE UPDATE ON billing.accounts
    FOR EACH ROW WHEN (OLD.tenant_id = 'dw-h') EXECUTE FUNCTION dw_rekey();
SELECT split_part(regress_error($$SELECT billing_deduct('dw-h', 1, 'dw-h-rekey')$$), E'\n', 1) AS error;
DROP TRIGGER dw_rekey ON billing.accounts;
SELECT tenant_id, count(*) FROM billing.accounts WHERE tenant_id IN ('dw-a', 'dw-h')
 GROUP BY tenant_id ORDER BY tenant_id;

-- Every index of the four tables billing writes directly holds an entry
-- for every row version its table has (amcheck's heapallindexed): the
-- unique indexes src/direct.c inserts into itself when an update keeps
-- their columns (the 500 credits above moved the account across pages), and
-- the executor's own for entries, holds and the journal.  A missing entry
-- fails here, before any query could miss the row.
CREATE EXTENSION amcheck;
SELECT i.indexrelid::regclass AS index, bt_index_check(i.indexrelid, true) IS NOT NULL AS checked
  FROM pg_index i
  JOIN pg_class t ON t.oid = i.indrelid
 WHERE t.relnamespace = 'billing'::regnamespace
   AND t.relname IN ('accounts', 'entries', 'holds', 'hold_events')
   AND i.indisvalid
 ORDER BY i.indexrelid::regclass::text;
DROP EXTENSION amcheck;

-- A column added to billing.holds by hand: a hold is refused (55000)
-- rather than leaving it NULL.
BEGIN;
ALTER TABLE billing.holds ADD COLUMN dw_extra text DEFAULT 'x';
SELECT regress_error($$SELECT billing_hold('dw-h', 1, 'dw-h-extra')$$) AS error;
ROLLBACK;

-- A table rewritten by the transaction that charged (CLUSTER, an ALTER
-- TABLE that rewrites it) moves its rows: the account's next charge finds
-- the row again by its index, not where it was in the old file, which may
-- lie past the new file's end (it read that block: XX001).  3,000 accounts
-- created and rolled back put the account's row far out in the old file;
-- CLUSTER leaves them out of the new one.
BEGIN;
SAVEPOINT pad;
SELECT count(*) AS padding FROM generate_series(1, 3000) i, billing_account_create('dw-pad-' || i);
ROLLBACK TO pad;
SELECT tenant_id FROM billing_account_create('dw-cl');
SELECT balance_after FROM billing_credit('dw-cl', 10, 'dw-cl-top');
SELECT balance_after FROM billing_deduct('dw-cl', 1, 'dw-cl-1');
CREATE TEMP TABLE dw_place AS
  SELECT (ctid::text::point)[0] AS block FROM billing.accounts WHERE tenant_id = 'dw-cl';
CLUSTER billing.accounts USING accounts_pkey;
ALTER TABLE billing.accounts SET WITHOUT CLUSTER;
-- the place the transaction remembers lies past the new file's end
SELECT block >= pg_relation_size('billing.accounts') / 8192 AS past_the_end FROM dw_place;
SELECT balance_after FROM billing_deduct('dw-cl', 1, 'dw-cl-2');
COMMIT;
SELECT balance, version FROM billing.balances WHERE tenant_id = 'dw-cl';
SELECT count(*) AS problems FROM billing_verify('dw-cl');
DROP TABLE dw_place;

DROP TABLE dw_seen, dw_hold_rows;
DROP FUNCTION dw_entry_seen(), dw_account_seen(), dw_refuse(), dw_skip(), dw_stmt(),
              dw_hold_seen(), dw_rekey();
