/*
 * 22_engine: the charge engine (issue 18).  billing_charge() takes
 * billing_deduct's arguments and returns its result; the charge is applied
 * and committed by an engine worker that batches the charges of many
 * callers into one transaction (src/engine.c, src/engine_worker.c).  It
 * needs billing in shared_preload_libraries (ZB112 without).
 *
 * billing_charge is not SECURITY DEFINER: in the caller it only checks the
 * arguments (on Citus also, from Citus's catalogs, that the tenant is
 * stored on this node) and waits (no table of billing, no SQL); the engine
 * applies the charge as the extension's owner.  (A SECURITY DEFINER call
 * with its SET search_path cost a tenth of the caller's CPU.)
 */
CREATE FUNCTION @extschema@.billing_charge(tenant_id text, amount numeric, trace_id text,
                               description text DEFAULT NULL,
                               metadata jsonb DEFAULT NULL,
                               event_at timestamptz DEFAULT NULL,
                               kind text DEFAULT 'deduct',
                               api_key text DEFAULT NULL)
    RETURNS billing.entry_result
    AS 'MODULE_PATHNAME', 'billing_charge'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.billing_charge(text, numeric, text, text, jsonb, timestamptz, text, text) IS
    'billing_deduct committed by the charge engine, batched with other callers'' charges; outside transaction blocks only; idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_charge(text, numeric, text, text, jsonb, timestamptz, text, text) FROM PUBLIC;

CREATE TYPE billing.engine_info AS (
    database      text,
    worker        integer,      -- 1 .. billing.engine_workers
    pid           integer,      -- NULL unless running
    state         text,         -- running, starting, stopped
    queued        integer,      -- charges waiting for this worker now
    free_slots    integer,      -- places left in the shared queue (all workers)
    batches       bigint,       -- since the server started
    charges       bigint,       -- results handed back
    largest_batch bigint,
    retries       bigint,       -- batches applied again after an error
    deferrals     bigint,       -- tenants put off to the next batch (account locked elsewhere)
    last_batch_at timestamptz
);

CREATE FUNCTION @extschema@.billing_engine_status() RETURNS SETOF billing.engine_info
    AS 'MODULE_PATHNAME', 'billing_engine_status'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.billing_engine_status() IS 'the charge engine''s workers: state, queue, batches';
REVOKE ALL ON FUNCTION @extschema@.billing_engine_status() FROM PUBLIC;

-- for tests only (superuser): make the charges queued meanwhile one batch
CREATE FUNCTION billing.engine_test_gate(on_ boolean) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_engine_test_gate'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.engine_test_gate(boolean) IS
    'tests only: true holds the charge engine (and billing_charge''s callers, on an advisory lock) until false, so that what was queued meanwhile is one batch';
REVOKE ALL ON FUNCTION billing.engine_test_gate(boolean) FROM PUBLIC;
