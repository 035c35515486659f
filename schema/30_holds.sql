/* 30_holds: reservations (two-phase charges) and their journal (C) */

CREATE SEQUENCE billing.hold_id_seq;
CREATE TABLE billing.holds (
    tenant_id       text        NOT NULL,
    hold_id         bigint      NOT NULL DEFAULT nextval('billing.hold_id_seq'),
    trace_id        text        NOT NULL,
    amount_micros   bigint      NOT NULL,
    captured_micros bigint      NOT NULL DEFAULT 0,
    released_micros bigint      NOT NULL DEFAULT 0,
    status          text        NOT NULL DEFAULT 'open',
    expires_at      timestamptz NOT NULL,
    api_key         text,
    description     text,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    grant_draws     bigint[],   -- 1.4: what it reserved of grant buckets and has not captured (id, amount, ...)
    CONSTRAINT holds_pkey PRIMARY KEY (tenant_id, hold_id),
    CONSTRAINT holds_trace_key UNIQUE (tenant_id, trace_id),
    CONSTRAINT holds_status_check CHECK (status IN ('open', 'captured', 'released', 'expired')),
    CONSTRAINT holds_amount_check CHECK (amount_micros > 0 AND captured_micros >= 0 AND released_micros >= 0)
);
ALTER SEQUENCE billing.hold_id_seq OWNED BY billing.holds.hold_id;
CREATE INDEX holds_open_idx ON billing.holds (tenant_id, expires_at) WHERE status = 'open';
COMMENT ON TABLE billing.holds IS 'reservations (two-phase charges); remaining = amount - captured - released while open; history in hold_events';

CREATE TRIGGER holds_no_delete
    BEFORE DELETE OR TRUNCATE ON billing.holds
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'Holds are never deleted: release one with billing_release().');
ALTER TABLE billing.holds ENABLE ALWAYS TRIGGER holds_no_delete;
SELECT pg_catalog.pg_extension_config_dump('billing.holds', '');
SELECT pg_catalog.pg_extension_config_dump('billing.hold_id_seq', '');

CREATE SEQUENCE billing.hold_event_id_seq;
CREATE TABLE billing.hold_events (
    tenant_id     text        NOT NULL,
    event_id      bigint      NOT NULL DEFAULT nextval('billing.hold_event_id_seq'),
    hold_id       bigint      NOT NULL,
    trace_id      text,
    action        text        NOT NULL,
    amount_micros bigint      NOT NULL,
    entry_id      bigint,
    expires_at    timestamptz,
    final         boolean     NOT NULL DEFAULT false,   -- a capture that settled the hold on purpose
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT hold_events_pkey PRIMARY KEY (tenant_id, event_id),
    CONSTRAINT hold_events_trace_key UNIQUE (tenant_id, trace_id),
    CONSTRAINT hold_events_action_check CHECK (action IN ('hold', 'capture', 'release', 'extend', 'expire'))
);
ALTER SEQUENCE billing.hold_event_id_seq OWNED BY billing.hold_events.event_id;
COMMENT ON TABLE billing.hold_events IS 'append-only journal of every hold operation (captures also reference their ledger entry)';

CREATE TRIGGER hold_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.hold_events
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'The hold journal is never rewritten: release or capture the hold instead.');
ALTER TABLE billing.hold_events ENABLE ALWAYS TRIGGER hold_events_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.hold_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.hold_event_id_seq', '');

-- billing.balances (10_accounts.sql) again, now that billing.holds exists:
-- balance and on hold as billing.expired_micros(a, now()) and
-- billing.effective_holds(a) compute them, spelled out with a join of the
-- open holds grouped by tenant.  On Citus the query runs on the shards,
-- whose row type is not billing.accounts; a function that queried
-- billing.holds from there, or a correlated subquery inside a call Citus
-- delegated in a transaction block, would be a nested distributed query,
-- while a join on tenant_id is one query on one shard of each table.
CREATE OR REPLACE VIEW billing.balances WITH (security_barrier) AS
SELECT a.tenant_id,
       a.currency,
       a.status,
       billing.to_amount(a.balance_micros
           - CASE WHEN a.grants_state IS NULL THEN 0::bigint
                ELSE billing.grants_expired(a.grants_state, now())
                     + CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN 0::bigint
                            ELSE coalesce(h.expired_shares, 0) END END) AS balance,
       billing.to_amount(a.credit_limit_micros) AS credit_limit,
       billing.to_amount(
           CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN a.holds_micros
                ELSE coalesce(h.open_micros, 0) END) AS on_hold,
       billing.to_amount(a.balance_micros
           - CASE WHEN a.grants_state IS NULL THEN 0::bigint
                ELSE billing.grants_expired(a.grants_state, now())
                     + CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN 0::bigint
                            ELSE coalesce(h.expired_shares, 0) END END)
       + billing.to_amount(a.credit_limit_micros)
       - billing.to_amount(
           CASE WHEN a.holds_next_expiry IS NULL OR a.holds_next_expiry > now() THEN a.holds_micros
                ELSE coalesce(h.open_micros, 0) END) AS available,
       a.version,
       a.last_entry_at,
       a.timezone,
       a.metadata,
       a.created_at,
       a.updated_at
  FROM billing.accounts a
  LEFT JOIN (SELECT h.tenant_id,
                    sum(h.amount_micros - h.captured_micros - h.released_micros)
                        FILTER (WHERE h.expires_at > now())::bigint AS open_micros,
                    sum(billing.shares_expired(o.grants_state, h.grant_draws, h.expires_at, now()))
                        FILTER (WHERE h.expires_at <= now() AND h.grant_draws IS NOT NULL)::bigint AS expired_shares
               FROM billing.holds h
               JOIN billing.accounts o ON o.tenant_id = h.tenant_id
              WHERE h.status = 'open'
              GROUP BY h.tenant_id) h ON h.tenant_id = a.tenant_id
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR a.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));

CREATE TYPE billing.hold_result AS (
    hold_id       bigint,
    tenant_id     text,
    trace_id      text,         -- the hold's trace id
    status        text,         -- open, captured, released, expired
    amount        numeric,
    captured      numeric,
    released      numeric,
    remaining     numeric,
    expires_at    timestamptz,
    available     numeric,      -- the account's available funds after this call
    replayed      boolean
);

CREATE TYPE billing.capture_result AS (
    entry_id       bigint,
    hold_id        bigint,
    tenant_id      text,
    trace_id       text,        -- the capture's trace id
    amount         numeric,     -- signed, as in the ledger
    balance_after  numeric,
    hold_captured  numeric,
    hold_remaining numeric,
    hold_status    text,
    created_at     timestamptz,
    replayed       boolean
);

CREATE FUNCTION @extschema@.billing_hold(tenant_id text, amount numeric, trace_id text,
                             expires_in interval DEFAULT '15 minutes',
                             description text DEFAULT NULL,
                             metadata jsonb DEFAULT NULL,
                             api_key text DEFAULT NULL)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_hold(text, numeric, text, interval, text, jsonb, text) IS
    'reserve funds (lowers available, not the balance) until captured, released or expired; idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_hold(text, numeric, text, interval, text, jsonb, text) FROM PUBLIC;

-- billing_hold under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_hold(tenant_id text, amount numeric, trace_id text,
                                expires_in interval DEFAULT '15 minutes',
                                description text DEFAULT NULL,
                                metadata jsonb DEFAULT NULL,
                                api_key text DEFAULT NULL)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_hold(text, numeric, text, interval, text, jsonb, text) IS
    'billing_hold for the extension''s own SQL (internal)';
REVOKE ALL ON FUNCTION billing.internal_hold(text, numeric, text, interval, text, jsonb, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_capture(tenant_id text, hold_trace_id text, amount numeric, trace_id text,
                                final boolean DEFAULT false,
                                description text DEFAULT NULL,
                                metadata jsonb DEFAULT NULL,
                                event_at timestamptz DEFAULT NULL)
    RETURNS billing.capture_result
    AS 'MODULE_PATHNAME', 'billing_capture'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) IS
    'charge against a hold (a ledger entry of kind capture); final => release the rest; idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) FROM PUBLIC;

-- billing_capture under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_capture(tenant_id text, hold_trace_id text, amount numeric, trace_id text,
                                   final boolean DEFAULT false,
                                   description text DEFAULT NULL,
                                   metadata jsonb DEFAULT NULL,
                                   event_at timestamptz DEFAULT NULL)
    RETURNS billing.capture_result
    AS 'MODULE_PATHNAME', 'billing_capture'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) IS
    'billing_capture for the extension''s own SQL (internal)';
REVOKE ALL ON FUNCTION billing.internal_capture(text, text, numeric, text, boolean, text, jsonb, timestamptz) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_release(tenant_id text, hold_trace_id text, trace_id text)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_release'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_release(text, text, text) IS
    'free what is left on a hold; idempotent by trace_id; a settled or expired hold releases nothing';
REVOKE ALL ON FUNCTION @extschema@.billing_release(text, text, text) FROM PUBLIC;

-- billing_release under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.
CREATE FUNCTION billing.internal_release(tenant_id text, hold_trace_id text, trace_id text)
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_release'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_release(text, text, text) IS
    'billing_release for the extension''s own SQL (internal)';
REVOKE ALL ON FUNCTION billing.internal_release(text, text, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_hold_extend(tenant_id text, hold_trace_id text,
                                    expires_in interval DEFAULT '15 minutes')
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold_extend'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_hold_extend(text, text, interval) IS
    'heartbeat: an open hold now expires at now() + expires_in';
REVOKE ALL ON FUNCTION @extschema@.billing_hold_extend(text, text, interval) FROM PUBLIC;

-- billing_hold_extend under a name in schema billing, for the extension's own
-- SQL (the job functions): the schema of the SQL API is the database
-- owner's, who could rename it and put a function of that name in its
-- place, which SECURITY DEFINER code calling it by name would run as the
-- extension's owner.  No role is granted it.  Unlike billing_hold_extend it
-- returns a hold that expired or was settled meanwhile as it is: a claim or
-- a rescue that waited for the account lock past the hold's expiry goes on
-- (its job sees the expired hold at complete) instead of failing as a whole;
-- so too an open hold whose share of expired grant credit the account's
-- funds cannot cover again (left unextended: it expires as it would have).
CREATE FUNCTION billing.internal_hold_extend(tenant_id text, hold_trace_id text,
                                       expires_in interval DEFAULT '15 minutes')
    RETURNS billing.hold_result
    AS 'MODULE_PATHNAME', 'billing_hold_keep'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.internal_hold_extend(text, text, interval) IS
    'billing_hold_extend for the extension''s own SQL (internal): a hold that is no longer open, or whose expired grant credit the account cannot reserve again, is returned as it is';
REVOKE ALL ON FUNCTION billing.internal_hold_extend(text, text, interval) FROM PUBLIC;

CREATE VIEW billing.open_holds WITH (security_barrier) AS
SELECT h.tenant_id,
       h.hold_id,
       h.trace_id,
       h.api_key,
       billing.to_amount(h.amount_micros)                                         AS amount,
       billing.to_amount(h.captured_micros)                                       AS captured,
       billing.to_amount(h.amount_micros - h.captured_micros - h.released_micros) AS remaining,
       h.expires_at,
       h.description,
       h.created_at
  FROM billing.holds h
 WHERE h.status = 'open' AND h.expires_at > now()
   AND ((SELECT billing.visible_tenants()) IS NULL OR h.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.open_holds IS 'holds that still reserve funds (open and not expired)';
