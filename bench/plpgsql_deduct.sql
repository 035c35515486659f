/*
 * bench/plpgsql_deduct.sql -- the baseline "what a DBA would write": a plain
 * PL/pgSQL deduct with the same guarantees as billing_deduct(), on its own
 * tables in schema plb (loaded into database bench by bench/run.sh).
 *
 * Guarantees, as in billing_deduct():
 *   - every charge of a tenant serializes on its account row (FOR UPDATE,
 *     taken first), so the trace id probe below sees every earlier charge
 *     and the unique index is only a backstop;
 *   - idempotent by (tenant_id, trace_id): a replay returns the recorded
 *     entry, a replay with another amount is an error;
 *   - no overdraft beyond the credit limit;
 *   - each entry records balance_after, the account keeps the balance and
 *     a version, in the same transaction.
 * Differences that favour this baseline: numeric(20,6) money instead of
 * checked bigint micro-units, no kind/description/metadata/event_at checks,
 * no rejection log, not SECURITY DEFINER (no per-call search_path switch),
 * and, like billing.entries, no foreign key to the accounts table.
 */
CREATE SCHEMA plb;

CREATE TABLE plb.accounts (
    tenant_id    text          PRIMARY KEY,
    balance      numeric(20,6) NOT NULL DEFAULT 0,
    credit_limit numeric(20,6) NOT NULL DEFAULT 0,
    version      bigint        NOT NULL DEFAULT 0,
    updated_at   timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE plb.entries (
    entry_id      bigserial     PRIMARY KEY,
    tenant_id     text          NOT NULL,
    trace_id      text          NOT NULL,
    amount        numeric(20,6) NOT NULL,      -- signed: debits negative
    balance_after numeric(20,6) NOT NULL,
    version       bigint        NOT NULL,
    created_at    timestamptz   NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, trace_id)
);

CREATE FUNCTION plb.deduct(p_tenant text, p_amount numeric, p_trace text)
    RETURNS plb.entries
    LANGUAGE plpgsql
AS $$
DECLARE
    acc plb.accounts;
    e   plb.entries;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 OR p_amount <> round(p_amount, 6) THEN
        RAISE EXCEPTION 'amount must be positive with at most 6 decimals, got %', p_amount;
    END IF;

    SELECT * INTO acc FROM plb.accounts WHERE tenant_id = p_tenant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account "%" does not exist', p_tenant;
    END IF;

    SELECT * INTO e FROM plb.entries WHERE tenant_id = p_tenant AND trace_id = p_trace;
    IF FOUND THEN
        IF e.amount <> -p_amount THEN
            RAISE EXCEPTION 'trace id "%" was already used with amount %', p_trace, -e.amount;
        END IF;
        RETURN e;                                  -- replay
    END IF;

    IF acc.balance - p_amount < -acc.credit_limit THEN
        RAISE EXCEPTION 'insufficient funds in account "%"', p_tenant;
    END IF;

    INSERT INTO plb.entries (tenant_id, trace_id, amount, balance_after, version)
    VALUES (p_tenant, p_trace, -p_amount, acc.balance - p_amount, acc.version + 1)
    RETURNING * INTO e;

    UPDATE plb.accounts
       SET balance = e.balance_after, version = e.version, updated_at = now()
     WHERE tenant_id = p_tenant;
    RETURN e;
END;
$$;
