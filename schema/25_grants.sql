/*
 * 25_grants: credit buckets (grants that expire and are spent in a burn
 * order) and refunds tied to the charge they give back.  See src/grants.h.
 *
 * Every credit goes into a bucket: billing_credit() into the account's
 * wallet (paid, never expiring, spent last), billing_grant() into a bucket
 * of its own.  The open buckets' remaining amounts live on the account row
 * (accounts.grants_state); this table keeps each grant's facts.
 */
CREATE SEQUENCE billing.grant_id_seq;
CREATE TABLE billing.grants (
    tenant_id       text        NOT NULL,
    grant_id        bigint      NOT NULL DEFAULT nextval('billing.grant_id_seq'),
    entry_id        bigint      NOT NULL,   -- the grant's ledger entry
    trace_id        text        NOT NULL,
    category        text        NOT NULL,
    priority        integer     NOT NULL,
    granted_micros  bigint      NOT NULL,   -- the credit
    amount_micros   bigint      NOT NULL,   -- what went into the bucket (debt was paid back first)
    expires_at      timestamptz,            -- NULL: never
    description     text,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL,
    CONSTRAINT grants_pkey PRIMARY KEY (tenant_id, grant_id),
    CONSTRAINT grants_entry_key UNIQUE (tenant_id, entry_id),
    CONSTRAINT grants_category_check CHECK (category IN ('promotional', 'paid')),
    CONSTRAINT grants_priority_check CHECK (priority BETWEEN 0 AND 1000),
    CONSTRAINT grants_amount_check CHECK (granted_micros > 0 AND amount_micros BETWEEN 0 AND granted_micros)
);
ALTER SEQUENCE billing.grant_id_seq OWNED BY billing.grants.grant_id;
COMMENT ON TABLE billing.grants IS 'grants (credit buckets with a category, a priority and an optional expiry); what is left in an open one is on its account row (grants_state)';
CREATE TRIGGER grants_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.grants
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'A grant is never rewritten: what is left of it is on its account row.');
ALTER TABLE billing.grants ENABLE ALWAYS TRIGGER grants_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.grants', '');
SELECT pg_catalog.pg_extension_config_dump('billing.grant_id_seq', '');

CREATE TABLE billing.refunds (
    tenant_id        text        NOT NULL,
    charge_entry_id  bigint      NOT NULL,
    refund_entry_id  bigint      NOT NULL,
    amount_micros    bigint      NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT refunds_pkey PRIMARY KEY (tenant_id, charge_entry_id, refund_entry_id),
    CONSTRAINT refunds_amount_check CHECK (amount_micros > 0)
);
COMMENT ON TABLE billing.refunds IS 'append-only: which refund entry gave back how much of which charge';
CREATE TRIGGER refunds_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON billing.refunds
    FOR EACH STATEMENT EXECUTE FUNCTION billing.append_only(
        'A refund is final: refund the rest with another billing_refund().');
ALTER TABLE billing.refunds ENABLE ALWAYS TRIGGER refunds_append_only;
SELECT pg_catalog.pg_extension_config_dump('billing.refunds', '');

CREATE TYPE billing.grant_result AS (
    grant_id        bigint,
    tenant_id       text,
    trace_id        text,
    category        text,
    priority        integer,
    granted         numeric,      -- the credit
    amount          numeric,      -- what went into the bucket (debt is paid back first)
    expires_at      timestamptz,
    entry_id        bigint,
    balance_after   numeric,
    version         bigint,
    created_at      timestamptz,
    replayed        boolean
);

CREATE TYPE billing.refund_result AS (
    entry_id         bigint,
    tenant_id        text,
    trace_id         text,        -- the refund's
    charge_trace_id  text,
    charge_entry_id  bigint,
    amount           numeric,
    refunded         numeric,     -- of the charge, by every refund so far
    refundable       numeric,     -- of the charge, still
    balance_after    numeric,
    version          bigint,
    created_at       timestamptz,
    replayed         boolean
);

CREATE FUNCTION @extschema@.billing_grant(tenant_id text, amount numeric, trace_id text,
                              expires_at timestamptz DEFAULT NULL,
                              priority integer DEFAULT 0,
                              category text DEFAULT 'promotional',
                              description text DEFAULT NULL,
                              metadata jsonb DEFAULT NULL)
    RETURNS billing.grant_result
    AS 'MODULE_PATHNAME', 'billing_grant'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_grant(text, numeric, text, timestamptz, integer, text, text, jsonb) IS
    'credit a bucket of its own: spent before the wallet in burn order (priority, then earliest expiry, then oldest); what is left of it at expires_at leaves the balance; idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_grant(text, numeric, text, timestamptz, integer, text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION @extschema@.billing_refund(tenant_id text, charge_trace_id text, amount numeric, trace_id text,
                               reason text DEFAULT NULL)
    RETURNS billing.refund_result
    AS 'MODULE_PATHNAME', 'billing_refund'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_refund(text, text, numeric, text, text) IS
    'give back (part of) a charge, to the buckets it came from; never more than it charged minus earlier refunds (ZB091); idempotent by trace_id';
REVOKE ALL ON FUNCTION @extschema@.billing_refund(text, text, numeric, text, text) FROM PUBLIC;
