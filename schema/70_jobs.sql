/* 70_jobs: billable jobs; the C trigger billing.job_guard enforces the state machine */

CREATE FUNCTION billing.job_guard() RETURNS trigger
    AS 'MODULE_PATHNAME', 'billing_job_guard'
    LANGUAGE C;
COMMENT ON FUNCTION billing.job_guard() IS 'trigger: job state machine and invariants (ZB070, ZB072)';
REVOKE ALL ON FUNCTION billing.job_guard() FROM PUBLIC;

CREATE SEQUENCE billing.job_id_seq;
CREATE TABLE billing.jobs (
    tenant_id        text        NOT NULL,
    job_id           bigint      NOT NULL DEFAULT nextval('billing.job_id_seq'),
    idempotency_key  text        NOT NULL,
    kind             text        NOT NULL,
    state            text        NOT NULL DEFAULT 'queued',
    input            jsonb       NOT NULL DEFAULT '{}',
    output           jsonb,
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 3,
    run_at           timestamptz NOT NULL DEFAULT now(),
    worker           text,
    lease_until      timestamptz,
    heartbeat_at     timestamptz,
    estimated_micros bigint      NOT NULL,
    actual_micros    bigint,
    hold_trace_id    text,
    hold_seq         integer     NOT NULL DEFAULT 0,
    hold_ttl         interval    NOT NULL DEFAULT '1 hour',
    charge_entry_id  bigint,
    last_error       text,
    note             text,      -- why this write happens; moved into job_events by the trigger
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CONSTRAINT jobs_pkey PRIMARY KEY (tenant_id, job_id),
    CONSTRAINT jobs_idempotency_key UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT jobs_state_check CHECK (state IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    CONSTRAINT jobs_attempt_check CHECK (attempt >= 0 AND max_attempts BETWEEN 1 AND 100),
    CONSTRAINT jobs_estimate_check CHECK (estimated_micros > 0 AND actual_micros >= 0)
);
ALTER SEQUENCE billing.job_id_seq OWNED BY billing.jobs.job_id;
CREATE INDEX jobs_queued_idx ON billing.jobs (run_at, job_id) WHERE state = 'queued';
CREATE INDEX jobs_processing_idx ON billing.jobs (lease_until) WHERE state = 'processing';
COMMENT ON TABLE billing.jobs IS 'billable jobs; state machine and billing invariants enforced by the job_guard trigger';
CREATE TRIGGER jobs_guard
    BEFORE INSERT OR UPDATE ON billing.jobs
    FOR EACH ROW EXECUTE FUNCTION billing.job_guard();
ALTER TABLE billing.jobs ENABLE ALWAYS TRIGGER jobs_guard;

CREATE TRIGGER jobs_no_delete
    BEFORE DELETE OR TRUNCATE ON billing.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Jobs are never deleted: cancel one with billing_job_cancel().');
ALTER TABLE billing.jobs ENABLE ALWAYS TRIGGER jobs_no_delete;
SELECT pg_catalog.pg_extension_config_dump('billing.jobs', '');
SELECT pg_catalog.pg_extension_config_dump('billing.job_id_seq', '');

CREATE SEQUENCE billing.job_event_id_seq;
CREATE TABLE billing.job_events (
    tenant_id   text        NOT NULL,
    event_id    bigint      NOT NULL DEFAULT nextval('billing.job_event_id_seq'),
    job_id      bigint      NOT NULL,
    from_state  text,
    to_state    text        NOT NULL,
    attempt     integer     NOT NULL,
    reason      text,
    worker      text,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT job_events_pkey PRIMARY KEY (tenant_id, event_id)
);
ALTER SEQUENCE billing.job_event_id_seq OWNED BY billing.job_events.event_id;
CREATE INDEX job_events_job_idx ON billing.job_events (tenant_id, job_id, event_id);
COMMENT ON TABLE billing.job_events IS 'append-only business log of job transitions (from, to, attempt, reason, worker, when)';

CREATE TRIGGER job_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.job_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'The job log is never rewritten.');
ALTER TABLE billing.job_events ENABLE ALWAYS TRIGGER job_events_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.job_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.job_event_id_seq', '');

CREATE TYPE billing.job_result AS (
    job_id          bigint,
    tenant_id       text,
    idempotency_key text,
    kind            text,
    state           text,
    attempt         integer,
    max_attempts    integer,
    run_at          timestamptz,
    worker          text,
    lease_until     timestamptz,
    estimated_cost  numeric,
    actual_cost     numeric,
    hold_trace_id   text,
    charge_entry_id bigint,
    last_error      text,
    input           jsonb,
    output          jsonb,
    created_at      timestamptz,
    finished_at     timestamptz,
    replayed        boolean
);

-- the result row of a job.  No SET search_path (its body names everything
-- with its schema): a function with settings is never inlined, and run as a
-- function of its own it would parse its body again at every call.
CREATE FUNCTION billing.job_result(j billing.jobs, replayed boolean) RETURNS billing.job_result
    LANGUAGE sql IMMUTABLE
AS $$
    SELECT ROW(j.job_id, j.tenant_id, j.idempotency_key, j.kind, j.state, j.attempt, j.max_attempts,
               j.run_at, j.worker, j.lease_until, billing.to_amount(j.estimated_micros),
               billing.to_amount(j.actual_micros), j.hold_trace_id, j.charge_entry_id, j.last_error,
               j.input, j.output, j.created_at, j.finished_at, replayed)::billing.job_result
$$;
REVOKE ALL ON FUNCTION billing.job_result(billing.jobs, boolean) FROM PUBLIC;

-- lock a job (FOR UPDATE) or raise ZB071
CREATE FUNCTION billing.job_lock(tenant_id text, job_id bigint) RETURNS billing.jobs
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs;
BEGIN
    IF job_lock.tenant_id IS NULL OR job_lock.job_id IS NULL THEN
        RAISE EXCEPTION 'tenant_id and job_id must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass the tenant and the job_id that billing_job_submit() returned.';
    END IF;
    PERFORM billing.check_id(job_lock.tenant_id, 'tenant_id', 'ZB016');
    SELECT * INTO j FROM billing.jobs x
     WHERE x.tenant_id = job_lock.tenant_id AND x.job_id = job_lock.job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist for tenant "%"', job_lock.job_id, job_lock.tenant_id
            USING ERRCODE = 'ZB071', HINT = 'Pass the job_id that billing_job_submit() returned.';
    END IF;
    RETURN j;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_lock(text, bigint) FROM PUBLIC;

-- is the job's hold open, safely before its expiry?  (PL/pgSQL: Citus
-- cannot plan an SQL function's query with parameters on a distributed table)
CREATE FUNCTION billing.job_hold_open(j billing.jobs, margin interval DEFAULT '1 second') RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (SELECT FROM billing.holds h
                    WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
                      AND h.status = 'open' AND h.expires_at > clock_timestamp() + margin);
END;
$$;
REVOKE ALL ON FUNCTION billing.job_hold_open(billing.jobs, interval) FROM PUBLIC;

-- keep the job's hold alive past `until` (if it is still open), to `until`
-- + hold_ttl (at most 31 days from now).  A queued job (a retry waiting for
-- run_at = until) always gets that, as at submit.  A processing job (a claim
-- or a heartbeat: until is the lease's end) keeps a hold that outlives the
-- lease by half its hold_ttl or more as it is: the slack that spares most
-- claims and heartbeats an extension (a hold update, a journal row and an
-- account write each).  A lease that runs out is rescued into a retry, which
-- extends the hold again.
CREATE FUNCTION billing.job_keep_hold(j billing.jobs, until timestamptz) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted interval := least(until - now() + j.hold_ttl, interval '31 days');
    short_of timestamptz := now() + wanted;
BEGIN
    IF j.state = 'processing' THEN
        short_of := least(until + j.hold_ttl / 2, short_of);
    END IF;
    -- open, safely before its expiry (as billing.job_hold_open), and short:
    -- one lookup, with no function call in it (with Citus a query on
    -- billing.holds that calls a function querying it again is a nested
    -- distributed query)
    IF EXISTS (SELECT FROM billing.holds h
                WHERE h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
                  AND h.status = 'open' AND h.expires_at > clock_timestamp() + interval '1 second'
                  AND h.expires_at < short_of) THEN
        PERFORM billing.internal_hold_extend(j.tenant_id, j.hold_trace_id, wanted);
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_keep_hold(billing.jobs, timestamptz) FROM PUBLIC;

-- release the job's hold (nothing happens if it is settled or expired)
CREATE FUNCTION billing.job_release_hold(j billing.jobs) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF j.hold_trace_id IS NOT NULL THEN
        PERFORM billing.internal_release(j.tenant_id, j.hold_trace_id, j.hold_trace_id || ':release');
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_release_hold(billing.jobs) FROM PUBLIC;

-- a failed attempt: retry with backoff while attempts remain, else failed (hold released)
CREATE FUNCTION billing.job_fail_attempt(j billing.jobs, error text, retryable boolean) RETURNS billing.jobs
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    j.last_error := error;
    j.lease_until := NULL;
    j.updated_at := now();
    IF retryable AND j.attempt < j.max_attempts THEN
        -- River-style backoff: attempt^4 seconds, +-10 % jitter, at most 30
        -- days (as submit's run_at: the hold, at most 31 days, outlives it)
        j.state := 'queued';
        j.run_at := now() + least(make_interval(secs => power(j.attempt, 4) * (0.9 + 0.2 * random())),
                                  interval '30 days');
        PERFORM billing.job_keep_hold(j, j.run_at);
    ELSE
        PERFORM billing.job_release_hold(j);
        j.state := 'failed';
        j.finished_at := now();
    END IF;
    UPDATE billing.jobs x
       SET state = j.state, run_at = j.run_at, lease_until = NULL, last_error = j.last_error,
           updated_at = j.updated_at, finished_at = j.finished_at, note = error
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN j;
END;
$$;
REVOKE ALL ON FUNCTION billing.job_fail_attempt(billing.jobs, text, boolean) FROM PUBLIC;

-- processing, and (if a worker is named) leased by that worker, or ZB073
CREATE FUNCTION billing.job_check_lease(j billing.jobs, worker text, wanted text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF j.state = 'processing' AND (worker IS NULL OR worker = j.worker) THEN
        RETURN;
    END IF;
    IF j.state = 'processing' OR (j.state = 'queued' AND j.attempt > 0) THEN
        RAISE EXCEPTION 'job % is no longer leased by %', j.job_id, coalesce(billing.show(worker), 'this worker')
            USING ERRCODE = 'ZB073',
                  DETAIL = format('The job is %s (attempt %s, worker %s).', j.state, j.attempt, coalesce(j.worker, 'none')),
                  HINT = 'Its lease expired and it was rescued; drop this result, another attempt will run.';
    END IF;
    RAISE EXCEPTION 'illegal job transition from % to %', j.state, wanted
        USING ERRCODE = 'ZB070',
              DETAIL = format('Job %s of tenant "%s" is %s.', j.job_id, j.tenant_id, j.state),
              HINT = 'Only a processing job can be completed, failed or heartbeaten.';
END;
$$;
REVOKE ALL ON FUNCTION billing.job_check_lease(billing.jobs, text, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_submit(tenant_id text, kind text, idempotency_key text,
                                   estimated_cost numeric,
                                   input jsonb DEFAULT NULL,
                                   max_attempts integer DEFAULT 3,
                                   run_at timestamptz DEFAULT NULL,
                                   hold_ttl interval DEFAULT '1 hour')
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    j        billing.jobs;
    est      bigint;
    new_id   bigint;
    diffs    text[] := '{}';
BEGIN
    IF billing_job_submit.tenant_id IS NULL OR billing_job_submit.kind IS NULL
       OR billing_job_submit.idempotency_key IS NULL OR billing_job_submit.estimated_cost IS NULL
       OR billing_job_submit.max_attempts IS NULL OR billing_job_submit.hold_ttl IS NULL THEN
        RAISE EXCEPTION 'tenant_id, kind, idempotency_key, estimated_cost, max_attempts and hold_ttl must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass every required argument.';
    END IF;
    PERFORM billing.check_id(billing_job_submit.kind, 'kind', 'ZB018');
    PERFORM billing.check_id(billing_job_submit.idempotency_key, 'idempotency_key', 'ZB018');
    IF billing_job_submit.max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 100'
            USING ERRCODE = 'ZB018', DETAIL = format('The value given was %s.', billing_job_submit.max_attempts),
                  HINT = 'Most jobs want 3 to 25 attempts.';
    END IF;
    IF billing_job_submit.hold_ttl <= interval '0' OR billing_job_submit.hold_ttl > interval '31 days'
       OR extract(month FROM billing_job_submit.hold_ttl) <> 0 OR extract(year FROM billing_job_submit.hold_ttl) <> 0
       OR (billing_job_submit.run_at IS NOT NULL AND (NOT isfinite(billing_job_submit.run_at)
           OR billing_job_submit.run_at > now() + interval '30 days')) THEN
        RAISE EXCEPTION 'hold_ttl must be in (0, 31 days] and run_at finite and at most 30 days ahead'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('hold_ttl %s, run_at %s.', billing_job_submit.hold_ttl, billing_job_submit.run_at),
                  HINT = 'The hold reserving the estimate must outlive the wait for the job.';
    END IF;
    PERFORM billing.check_account_settings(billing_job_submit.tenant_id, NULL, NULL, NULL, NULL);
    -- a json object of at most 16 kB: references to the work, not the work
    PERFORM billing.check_json(billing_job_submit.input, 'input');
    est := billing.to_micros(billing_job_submit.estimated_cost, 'estimated_cost', false);

    new_id := nextval('billing.job_id_seq');
    INSERT INTO billing.jobs AS x (tenant_id, job_id, idempotency_key, kind, input, max_attempts, run_at,
                                   estimated_micros, hold_trace_id, hold_seq, hold_ttl, note)
    VALUES (billing_job_submit.tenant_id, new_id, billing_job_submit.idempotency_key, billing_job_submit.kind,
            coalesce(billing_job_submit.input, '{}'), billing_job_submit.max_attempts,
            coalesce(billing_job_submit.run_at, now()), est,
            format('job:%s:1', new_id), 1, billing_job_submit.hold_ttl, NULL)
    ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
    RETURNING * INTO j;

    IF NOT FOUND THEN
        -- a duplicate submit (maybe concurrent: ON CONFLICT waited for it)
        SELECT * INTO j FROM billing.jobs x
         WHERE x.tenant_id = billing_job_submit.tenant_id AND x.idempotency_key = billing_job_submit.idempotency_key;
        IF j.kind <> billing_job_submit.kind THEN diffs := diffs || 'kind'::text; END IF;
        IF j.estimated_micros <> est THEN diffs := diffs || 'estimated_cost'::text; END IF;
        IF j.input <> coalesce(billing_job_submit.input, '{}') THEN diffs := diffs || 'input'::text; END IF;
        IF j.max_attempts <> billing_job_submit.max_attempts THEN diffs := diffs || 'max_attempts'::text; END IF;
        IF cardinality(diffs) > 0 THEN
            RAISE EXCEPTION 'idempotency key "%" was already used with a different %',
                            billing_job_submit.idempotency_key, array_to_string(diffs, ', ')
                USING ERRCODE = 'ZB005',
                      DETAIL = format('Existing job %s: kind %s, estimated_cost %s, max_attempts %s, input of %s bytes.',
                                      j.job_id, billing.show(j.kind), billing.to_amount(j.estimated_micros), j.max_attempts,
                                      pg_column_size(j.input)),
                      HINT = 'Resend the original submit unchanged to get the job, or use a new idempotency key.';
        END IF;
        RETURN billing.job_result(j, true);
    END IF;

    -- reserve the estimate; not enough funds -> the error aborts the submit: no job
    PERFORM billing.internal_hold(j.tenant_id, billing.to_amount(est), j.hold_trace_id,
                                    expires_in => least(greatest(j.run_at - now(), interval '0') + j.hold_ttl,
                                                        interval '31 days'),
                                    description => format('job %s (%s)', j.job_id, j.kind));
    -- the first line of the job's log (the trigger logs the transitions;
    -- a direct INSERT, e.g. by pg_restore, brings its log along)
    INSERT INTO billing.job_events (tenant_id, job_id, from_state, to_state, attempt, reason)
    VALUES (j.tenant_id, j.job_id, NULL, 'queued', 0, 'submitted');
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_submit(text, text, text, numeric, jsonb, integer, timestamptz, interval) IS
    'create a job and hold its estimated cost in one transaction; a duplicate idempotency key returns the existing job';
REVOKE ALL ON FUNCTION @extschema@.billing_job_submit(text, text, text, numeric, jsonb, integer, timestamptz, interval) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_claim(worker text,
                                  kinds text[] DEFAULT NULL,
                                  max_jobs integer DEFAULT 1,
                                  lease interval DEFAULT '5 minutes',
                                  tenant_id text DEFAULT NULL)
    RETURNS SETOF billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    j       billing.jobs;
    claimed billing.jobs[] := '{}';
    shards  regclass[];
    s       regclass;
    k       record;
    start   integer;
BEGIN
    IF billing_job_claim.worker IS NULL OR billing_job_claim.max_jobs IS NULL OR billing_job_claim.lease IS NULL THEN
        RAISE EXCEPTION 'worker, max_jobs and lease must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Name the worker, e.g. its host and pid.';
    END IF;
    PERFORM billing.check_id(billing_job_claim.worker, 'worker', 'ZB018');
    IF billing_job_claim.max_jobs NOT BETWEEN 1 AND 1000
       OR billing_job_claim.lease <= interval '0' OR billing_job_claim.lease > interval '1 day' THEN
        RAISE EXCEPTION 'max_jobs must be 1 to 1000 and lease in (0, 1 day]'
            USING ERRCODE = 'ZB018',
                  DETAIL = format('max_jobs %s, lease %s.', billing_job_claim.max_jobs, billing_job_claim.lease),
                  HINT = 'Keep leases short and renew them with billing_job_heartbeat().';
    END IF;
    IF billing_job_claim.tenant_id IS NOT NULL THEN
        -- one tenant (on Citus the call runs on its node, and every query of
        -- a delegated call must name the tenant: no "tenant_id IS NULL OR")
        FOR j IN
            WITH due AS (
                SELECT x.tenant_id, x.job_id
                  FROM billing.jobs x
                 WHERE x.tenant_id = billing_job_claim.tenant_id
                   AND x.state = 'queued' AND x.run_at <= now()
                   AND (billing_job_claim.kinds IS NULL OR x.kind = ANY (billing_job_claim.kinds))
                 ORDER BY x.run_at, x.job_id
                 LIMIT billing_job_claim.max_jobs
                   FOR UPDATE SKIP LOCKED
            )
            UPDATE billing.jobs x
               SET state = 'processing', attempt = x.attempt + 1, worker = billing_job_claim.worker,
                   lease_until = now() + billing_job_claim.lease, heartbeat_at = now(), updated_at = now(),
                   note = 'claimed'
              FROM due
             WHERE x.tenant_id = billing_job_claim.tenant_id
               AND x.tenant_id = due.tenant_id AND x.job_id = due.job_id
            RETURNING x.*
        LOOP
            j.note := NULL;
            claimed := claimed || j;
        END LOOP;
    ELSIF NOT billing.is_distributed('billing.jobs') THEN
        -- a single node: every tenant's due jobs
        FOR j IN
            WITH due AS (
                SELECT x.tenant_id, x.job_id
                  FROM billing.jobs x
                 WHERE x.state = 'queued' AND x.run_at <= now()
                   AND (billing_job_claim.kinds IS NULL OR x.kind = ANY (billing_job_claim.kinds))
                 ORDER BY x.run_at, x.job_id
                 LIMIT billing_job_claim.max_jobs
                   FOR UPDATE SKIP LOCKED
            )
            UPDATE billing.jobs x
               SET state = 'processing', attempt = x.attempt + 1, worker = billing_job_claim.worker,
                   lease_until = now() + billing_job_claim.lease, heartbeat_at = now(), updated_at = now(),
                   note = 'claimed'
              FROM due
             WHERE x.tenant_id = due.tenant_id AND x.job_id = due.job_id
            RETURNING x.*
        LOOP
            j.note := NULL;
            claimed := claimed || j;
        END LOOP;
    ELSE
        -- Citus, no tenant: the due jobs of this node's shards, from a random
        -- shard on (claimers of one node spread over its shards); each is
        -- locked in its shard (SKIP LOCKED) and claimed through Citus
        PERFORM billing.require_local_shards('billing.jobs', 'billing_job_claim() without a tenant_id');
        shards := ARRAY(SELECT billing.local_shards('billing.jobs'));
        start := floor(random() * cardinality(shards))::integer;
        FOR i IN 0 .. cardinality(shards) - 1 LOOP
            EXIT WHEN cardinality(claimed) >= billing_job_claim.max_jobs;
            s := shards[1 + (start + i) % cardinality(shards)];
            FOR k IN EXECUTE format('SELECT x.tenant_id, x.job_id FROM %s x '
                                    'WHERE x.state = ''queued'' AND x.run_at <= now() '
                                    '  AND ($1 IS NULL OR x.kind = ANY ($1)) '
                                    'ORDER BY x.run_at, x.job_id LIMIT $2 FOR UPDATE SKIP LOCKED', s)
                     USING billing_job_claim.kinds, billing_job_claim.max_jobs - cardinality(claimed)
            LOOP
                UPDATE billing.jobs x
                   SET state = 'processing', attempt = x.attempt + 1, worker = billing_job_claim.worker,
                       lease_until = now() + billing_job_claim.lease, heartbeat_at = now(), updated_at = now(),
                       note = 'claimed'
                 WHERE x.tenant_id = k.tenant_id AND x.job_id = k.job_id
                RETURNING x.* INTO j;
                j.note := NULL;
                claimed := claimed || j;
            END LOOP;
        END LOOP;
    END IF;
    -- keep the holds alive past the leases, locking the accounts in tenant
    -- order: two claimers never wait on each other's accounts in a cycle
    FOR j IN SELECT * FROM unnest(claimed) c ORDER BY c.tenant_id, c.job_id LOOP
        PERFORM billing.job_keep_hold(j, j.lease_until);
    END LOOP;
    FOR j IN SELECT * FROM unnest(claimed) c ORDER BY c.run_at, c.job_id LOOP
        RETURN NEXT billing.job_result(j, false);
    END LOOP;
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_claim(text, text[], integer, interval, text) IS
    'hand due queued jobs to a worker (FOR UPDATE SKIP LOCKED): attempt + 1, lease set; two workers never get the same job; on Citus without a tenant: the jobs of this node';
REVOKE ALL ON FUNCTION @extschema@.billing_job_claim(text, text[], integer, interval, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_heartbeat(tenant_id text, job_id bigint, worker text,
                                      lease interval DEFAULT '5 minutes')
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_heartbeat.tenant_id, billing_job_heartbeat.job_id);
BEGIN
    IF billing_job_heartbeat.lease IS NULL OR billing_job_heartbeat.worker IS NULL THEN
        RAISE EXCEPTION 'worker and lease must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Name the worker that claimed the job.';
    END IF;
    IF billing_job_heartbeat.lease <= interval '0' OR billing_job_heartbeat.lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be in (0, 1 day]'
            USING ERRCODE = 'ZB018', HINT = 'Pass e.g. interval ''5 minutes''.';
    END IF;
    PERFORM billing.job_check_lease(j, billing_job_heartbeat.worker, 'processing');
    j.lease_until := now() + billing_job_heartbeat.lease;
    j.heartbeat_at := now();
    UPDATE billing.jobs x SET lease_until = j.lease_until, heartbeat_at = j.heartbeat_at, updated_at = now()
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    PERFORM billing.job_keep_hold(j, j.lease_until);
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_heartbeat(text, bigint, text, interval) IS
    'extend the lease of a processing job (and the expiry of its hold)';
REVOKE ALL ON FUNCTION @extschema@.billing_job_heartbeat(text, bigint, text, interval) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_complete(tenant_id text, job_id bigint, actual_cost numeric,
                                     output jsonb DEFAULT NULL, worker text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j       billing.jobs := billing.job_lock(billing_job_complete.tenant_id, billing_job_complete.job_id);
    actual  bigint;
    entry   bigint;
BEGIN
    IF billing_job_complete.actual_cost IS NULL THEN
        RAISE EXCEPTION 'actual_cost must not be null'
            USING ERRCODE = 'ZB015', HINT = 'Pass what the job really cost (0 if nothing).';
    END IF;
    actual := billing.to_micros(billing_job_complete.actual_cost, 'actual_cost', true);
    PERFORM billing.check_json(billing_job_complete.output, 'output');
    IF j.state = 'completed' AND j.actual_micros = actual THEN
        RETURN billing.job_result(j, true);           -- a retried complete
    END IF;
    PERFORM billing.job_check_lease(j, billing_job_complete.worker, 'completed');

    -- the charge; if it fails, the error leaves the job processing
    IF actual > 0 AND billing.job_hold_open(j) THEN
        SELECT c.entry_id INTO entry
          FROM billing.internal_capture(j.tenant_id, j.hold_trace_id, billing.to_amount(actual),
                                          format('job:%s:charge', j.job_id), final => true,
                                          description => format('job %s (%s)', j.job_id, j.kind)) c;
    ELSE
        PERFORM billing.job_release_hold(j);         -- hold expired or nothing to charge
        IF actual > 0 THEN
            SELECT d.entry_id INTO entry
              FROM billing.internal_deduct(j.tenant_id, billing.to_amount(actual), format('job:%s:charge', j.job_id),
                                             description => format('job %s (%s)', j.job_id, j.kind),
                                             metadata => jsonb_build_object('job_id', j.job_id, 'kind', j.kind),
                                             counts_request => false) d;   -- the hold counted it
        END IF;
    END IF;

    j.state := 'completed';
    j.actual_micros := actual;
    j.charge_entry_id := entry;
    j.output := billing_job_complete.output;
    j.finished_at := now();
    j.lease_until := NULL;
    UPDATE billing.jobs x
       SET state = 'completed', actual_micros = actual, charge_entry_id = entry, output = j.output,
           lease_until = NULL, finished_at = j.finished_at, updated_at = now(),
           note = format('charged %s', billing.to_amount(actual))
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_complete(text, bigint, numeric, jsonb, text) IS
    'capture the actual cost and mark the job completed in one transaction; if the charge fails nothing changes';
REVOKE ALL ON FUNCTION @extschema@.billing_job_complete(text, bigint, numeric, jsonb, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_fail(tenant_id text, job_id bigint, error text,
                                 retryable boolean DEFAULT true, worker text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_fail.tenant_id, billing_job_fail.job_id);
BEGIN
    IF billing_job_fail.retryable IS NULL THEN
        RAISE EXCEPTION 'retryable must not be null' USING ERRCODE = 'ZB015', HINT = 'Pass true or false.';
    END IF;
    PERFORM billing.check_text(billing_job_fail.error, 'error');
    PERFORM billing.job_check_lease(j, billing_job_fail.worker, 'failed');
    j := billing.job_fail_attempt(j, coalesce(billing_job_fail.error, 'failed'), billing_job_fail.retryable);
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_fail(text, bigint, text, boolean, text) IS
    'a failed attempt: queued again with backoff while attempts remain (hold kept), else failed with the hold released';
REVOKE ALL ON FUNCTION @extschema@.billing_job_fail(text, bigint, text, boolean, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_cancel(tenant_id text, job_id bigint, reason text DEFAULT NULL)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_cancel.tenant_id, billing_job_cancel.job_id);
BEGIN
    PERFORM billing.check_text(billing_job_cancel.reason, 'reason');
    IF j.state = 'cancelled' THEN
        RETURN billing.job_result(j, true);
    END IF;
    IF j.state NOT IN ('queued', 'processing') THEN
        RAISE EXCEPTION 'illegal job transition from % to cancelled', j.state
            USING ERRCODE = 'ZB070',
                  DETAIL = format('Job %s of tenant "%s" is %s.', j.job_id, j.tenant_id, j.state),
                  HINT = 'Only queued or processing jobs can be cancelled.';
    END IF;
    PERFORM billing.job_release_hold(j);
    j.state := 'cancelled';
    j.finished_at := now();
    j.lease_until := NULL;
    j.last_error := coalesce(billing_job_cancel.reason, j.last_error);
    UPDATE billing.jobs x SET state = 'cancelled', lease_until = NULL, finished_at = j.finished_at,
                              last_error = j.last_error, updated_at = now(),
                              note = coalesce(billing_job_cancel.reason, 'cancelled')
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_cancel(text, bigint, text) IS 'cancel a queued or processing job and release its hold';
REVOKE ALL ON FUNCTION @extschema@.billing_job_cancel(text, bigint, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_retry(tenant_id text, job_id bigint)
    RETURNS billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j billing.jobs := billing.job_lock(billing_job_retry.tenant_id, billing_job_retry.job_id);
BEGIN
    IF j.state <> 'failed' THEN
        RAISE EXCEPTION 'illegal job transition from % to queued', j.state
            USING ERRCODE = 'ZB070',
                  DETAIL = format('Job %s of tenant "%s" is %s.', j.job_id, j.tenant_id, j.state),
                  HINT = 'Only a failed job can be retried.';
    END IF;
    j.hold_seq := j.hold_seq + 1;
    j.hold_trace_id := format('job:%s:%s', j.job_id, j.hold_seq);
    -- a new hold for the estimate; not enough funds -> error, the job stays failed
    PERFORM billing.internal_hold(j.tenant_id, billing.to_amount(j.estimated_micros), j.hold_trace_id,
                                    expires_in => j.hold_ttl,
                                    description => format('job %s (%s), retry %s', j.job_id, j.kind, j.hold_seq - 1));
    j.state := 'queued';
    j.attempt := 0;
    j.run_at := now();
    j.finished_at := NULL;
    j.worker := NULL;
    UPDATE billing.jobs x
       SET state = 'queued', attempt = 0, run_at = j.run_at, hold_seq = j.hold_seq, hold_trace_id = j.hold_trace_id,
           finished_at = NULL, worker = NULL, updated_at = now(), note = 'retried'
     WHERE x.tenant_id = j.tenant_id AND x.job_id = j.job_id;
    RETURN billing.job_result(j, false);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_retry(text, bigint) IS 'requeue a failed job with a new hold for its estimate (attempts start over)';
REVOKE ALL ON FUNCTION @extschema@.billing_job_retry(text, bigint) FROM PUBLIC;

-- the jobs of this node whose lease expired, as failed attempts (the table,
-- or on Citus each shard placed here); the background worker of every node
-- runs it (billing.maintenance)
CREATE FUNCTION billing.job_rescue_local(max_jobs integer) RETURNS SETOF billing.job_result
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s    regclass;
    j    billing.jobs;
    seen integer := 0;
BEGIN
    FOR s IN SELECT billing.local_shards('billing.jobs') LOOP
        FOR j IN EXECUTE pg_catalog.format(
                     'SELECT * FROM %s x '
                     'WHERE x.state OPERATOR(pg_catalog.=) ''processing'' '
                     '  AND x.lease_until OPERATOR(pg_catalog.<) pg_catalog.now() '
                     'ORDER BY x.lease_until LIMIT $1 FOR UPDATE SKIP LOCKED', s)
                 USING max_jobs OPERATOR(pg_catalog.-) seen
        LOOP
            seen := seen OPERATOR(pg_catalog.+) 1;
            j := billing.job_fail_attempt(j, pg_catalog.format('lease expired (worker %s, attempt %s)', j.worker, j.attempt), true);
            RETURN NEXT billing.job_result(j, false);
        END LOOP;
        EXIT WHEN seen OPERATOR(pg_catalog.>=) max_jobs;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION billing.job_rescue_local(integer) IS 'the jobs of this node whose lease expired count as failed attempts (internal: billing_job_rescue, billing.maintenance)';
REVOKE ALL ON FUNCTION billing.job_rescue_local(integer) FROM PUBLIC;

-- per-node work on a node without shards of a distributed table: ZB103
CREATE FUNCTION billing.require_local_shards(tbl regclass, what text) RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF billing.is_distributed(tbl) AND NOT EXISTS (SELECT FROM billing.local_shards(tbl)) THEN
        RAISE EXCEPTION '% runs per node, and this node holds no shard of %', what, tbl
            USING ERRCODE = 'ZB103',
                  DETAIL = format('This is Citus node group %s.', billing.local_group()),
                  HINT = 'Call it on the worker nodes (each works on its own shards), or pass a tenant_id.';
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION billing.require_local_shards(regclass, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_job_rescue(max_jobs integer DEFAULT 100)
    RETURNS SETOF billing.job_result
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF max_jobs IS NULL THEN
        RAISE EXCEPTION 'max_jobs must not be null' USING ERRCODE = 'ZB015', HINT = 'Leave it out for 100.';
    END IF;
    IF max_jobs NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'max_jobs must be 1 to 10000' USING ERRCODE = 'ZB018', HINT = 'Rescue in batches.';
    END IF;
    PERFORM billing.require_local_shards('billing.jobs', 'billing_job_rescue()');
    RETURN QUERY SELECT * FROM billing.job_rescue_local(max_jobs);
END;
$$;
COMMENT ON FUNCTION @extschema@.billing_job_rescue(integer) IS
    'jobs whose lease expired count as a failed attempt: queued again with backoff, or failed with the hold released; on Citus the jobs of this node';
REVOKE ALL ON FUNCTION @extschema@.billing_job_rescue(integer) FROM PUBLIC;

CREATE VIEW billing.jobs_by_state WITH (security_barrier) AS
SELECT j.tenant_id, j.kind, j.state,
       count(*)                AS jobs,
       min(j.created_at)       AS oldest_created_at,
       min(j.run_at) FILTER (WHERE j.state = 'queued') AS next_run_at
  FROM billing.jobs j
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR j.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.jobs_by_state IS 'job counts per tenant, kind and state';

CREATE VIEW billing.job_failures WITH (security_barrier) AS
SELECT e.tenant_id, j.kind, e.reason AS error,
       count(*)          AS failures,
       count(DISTINCT e.job_id) AS jobs,
       max(e.created_at) AS last_seen
  FROM billing.job_events e
  JOIN billing.jobs j ON j.tenant_id = e.tenant_id AND j.job_id = e.job_id
 WHERE e.from_state = 'processing' AND e.to_state IN ('queued', 'failed')
   AND ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2, 3;
COMMENT ON VIEW billing.job_failures IS 'failed attempts (including rescued ones) per tenant, kind and error';

CREATE VIEW billing.job_costs WITH (security_barrier) AS
SELECT j.tenant_id, j.kind,
       count(*) AS completed_jobs,
       billing.to_amount_sum(sum(j.estimated_micros)) AS estimated,
       billing.to_amount_sum(sum(j.actual_micros))    AS actual,
       round(sum(j.actual_micros)::numeric / nullif(sum(j.estimated_micros), 0), 4) AS actual_to_estimate
  FROM billing.jobs j
 WHERE j.state = 'completed'
   AND ((SELECT billing.visible_tenants()) IS NULL OR j.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
 GROUP BY 1, 2;
COMMENT ON VIEW billing.job_costs IS 'estimated vs actual cost of completed jobs per tenant and kind';

CREATE VIEW billing.job_time_in_state WITH (security_barrier) AS
WITH spans AS (
    SELECT e.tenant_id, e.job_id, e.to_state AS state,
           lead(e.created_at) OVER (PARTITION BY e.tenant_id, e.job_id ORDER BY e.event_id) - e.created_at AS spent
      FROM billing.job_events e
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
)
SELECT j.kind, s.state,
       count(*) AS spans,
       avg(s.spent) AS avg_time,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY s.spent) AS p50_time,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY s.spent) AS p95_time,
       max(s.spent) AS max_time
  FROM spans s
  JOIN billing.jobs j ON j.tenant_id = s.tenant_id AND j.job_id = s.job_id
 WHERE s.spent IS NOT NULL
 GROUP BY 1, 2;
COMMENT ON VIEW billing.job_time_in_state IS 'how long jobs stay in each state (finished spans only), per kind';
