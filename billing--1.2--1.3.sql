/* billing--1.2--1.3.sql: upgrade from 1.2 to 1.3 */

\echo Use "ALTER EXTENSION billing UPDATE TO '1.3'" to load this file. \quit

/*
 * 1.3: the background worker's hold expiry skips accounts that someone
 * else holds locked (a long transaction, a session idle in transaction).
 *
 * billing.expire_due_holds() waited for each account's row lock; the worker
 * runs it between pushes, so one account locked for minutes stopped the
 * Redis mirror of every tenant for minutes.  Now the due accounts are
 * locked with SKIP LOCKED: a locked one is left for the next round (its
 * holds stop counting at expires_at all the same; only their status and
 * the account's cache wait).  The worker also runs maintenance with a
 * lock_timeout, after the pushes, for the locks this does not cover.
 */
CREATE OR REPLACE FUNCTION billing.expire_due_holds(max_accounts integer DEFAULT 1000) RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
    n integer := 0;
BEGIN
    FOR t IN SELECT a.tenant_id FROM billing.accounts a
              WHERE a.holds_next_expiry <= now()
              ORDER BY a.holds_next_expiry
              LIMIT max_accounts
              FOR UPDATE SKIP LOCKED
    LOOP
        IF billing.expire_holds_of(t) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END;
$$;
COMMENT ON FUNCTION billing.expire_due_holds(integer) IS 'expire due holds of accounts nobody else has locked (the worker runs it; correctness never depends on it)';
