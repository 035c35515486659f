/*
 * 75_events: events out of the database (docs/events.md): the transactional
 * outbox, the alert thresholds of billing_alerts_set(), and the metrics.
 *
 * Every event is a row of billing.events written in the transaction of the
 * change it reports, numbered per tenant under the account row lock (seq),
 * announced with NOTIFY billing_events at commit, copied by the background
 * worker to Redis Streams and pruned after billing.events_retention.  The
 * thresholds and what of them was announced are columns of billing.accounts
 * (alert_*, schema/10_accounts.sql), so a charge checks them for free.
 */

CREATE SEQUENCE billing.event_id_seq;
CREATE TABLE billing.events (
    tenant_id    text        NOT NULL,
    seq          bigint      NOT NULL,   -- per tenant: 1, 2, 3, ... in commit order
    event_id     bigint      NOT NULL DEFAULT nextval('billing.event_id_seq'),
    type         text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,            -- NULL until the worker delivered it to Redis
    CONSTRAINT events_pkey PRIMARY KEY (tenant_id, seq)
);
ALTER SEQUENCE billing.event_id_seq OWNED BY billing.events.event_id;
-- the worker's queue: undelivered events in event_id order (a tenant's
-- event ids grow with its seq: both are taken under its account lock)
CREATE INDEX events_undelivered_idx ON billing.events (event_id) WHERE delivered_at IS NULL;
-- the pruning after billing.events_retention
CREATE INDEX events_created_idx ON billing.events (created_at);
-- a redelivery (Redis lost events: see src/outbox.c) walks the delivered
-- ones in event_id order, a batch at a time from where the last one ended
CREATE INDEX events_id_idx ON billing.events (event_id);
COMMENT ON TABLE billing.events IS 'the outbox: events written in the transaction of their change, numbered per tenant, delivered to Redis Streams by the worker';
SELECT pg_catalog.pg_extension_config_dump('billing.events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.event_id_seq', '');

CREATE VIEW billing.event_log WITH (security_barrier) AS
SELECT e.tenant_id, e.seq, e.event_id, e.type, e.payload, e.created_at, e.delivered_at
  FROM billing.events e
 WHERE ((SELECT billing.visible_tenants()) IS NULL OR e.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]));
COMMENT ON VIEW billing.event_log IS 'the events still in the outbox (undelivered, or delivered within billing.events_retention)';

CREATE VIEW billing.alerts WITH (security_barrier) AS
WITH a AS (
    SELECT a.*,
           (now() AT TIME ZONE a.timezone)::date AS today,
           date_trunc('month', now() AT TIME ZONE a.timezone)::date AS this_month
      FROM billing.accounts a
     WHERE ((SELECT billing.visible_tenants()) IS NULL OR a.tenant_id = ANY ((SELECT billing.visible_tenants())::text[]))
)
SELECT a.tenant_id,
       billing.to_amount(a.alert_low_balance_micros) AS low_balance,
       a.alert_percents AS quota_percents,
       a.alert_grant_lead AS grant_expiring,
       (a.alert_state & 1) = 1 AS low_balance_announced,
       CASE WHEN a.usage_day = a.today THEN a.alert_percents[(a.alert_state >> 4) & 15] END AS daily_requests_announced,
       CASE WHEN a.usage_month = a.this_month THEN a.alert_percents[(a.alert_state >> 8) & 15] END AS monthly_requests_announced,
       CASE WHEN a.usage_day = a.today THEN a.alert_percents[(a.alert_state >> 12) & 15] END AS daily_spend_announced,
       CASE WHEN a.usage_month = a.this_month THEN a.alert_percents[(a.alert_state >> 16) & 15] END AS monthly_spend_announced,
       a.alert_grants_until AS grants_announced_until,
       a.alert_next_at AS next_grant_alert_at,
       a.events_seq AS last_event_seq
  FROM a;
COMMENT ON VIEW billing.alerts IS 'per account: the alert thresholds (billing_alerts_set) and what of them has been announced';

CREATE FUNCTION @extschema@.billing_alerts_set(tenant_id text,
                                   low_balance numeric DEFAULT NULL,
                                   quota_percents integer[] DEFAULT NULL,
                                   grant_expiring interval DEFAULT NULL,
                                   reason text DEFAULT NULL)
    RETURNS SETOF billing.alerts
    AS 'MODULE_PATHNAME', 'billing_alerts_set'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_alerts_set(text, numeric, integer[], interval, text) IS
    'set the alert thresholds of an account (NULL = off): low balance, percentages of its quotas, caps and key budgets, grant expiry lead; recorded in billing.account_events';
REVOKE ALL ON FUNCTION @extschema@.billing_alerts_set(text, numeric, integer[], interval, text) FROM PUBLIC;

-- an event of a tenant, in this transaction (billing_account_update, the
-- worker's mirror.repaired): takes the account lock and the next seq
CREATE FUNCTION billing.event_write(tenant_id text, type text, payload jsonb) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_event_write'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.event_write(text, text, jsonb) IS 'write an event of a tenant into the outbox, in this transaction; returns its sequence number (internal)';
REVOKE ALL ON FUNCTION billing.event_write(text, text, jsonb) FROM PUBLIC;

CREATE FUNCTION billing.alerts_check(tenant_id text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_alerts_check'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing.alerts_check(text) IS 'what falls due by itself on one account (expiries, grant.expiring); true when an event was written (internal)';
REVOKE ALL ON FUNCTION billing.alerts_check(text) FROM PUBLIC;

-- SECURITY DEFINER: the worker's role needs EXECUTE on it only
CREATE FUNCTION billing.alerts_due(max_accounts integer DEFAULT 1000) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s    regclass;
    t    text;
    n    integer := 0;
    seen integer := 0;
BEGIN
    -- this node's accounts: the table, or on Citus each shard placed here
    -- (Citus refuses FOR UPDATE in a query over the distributed table)
    FOR s IN SELECT billing.local_shards('billing.accounts') LOOP
        FOR t IN EXECUTE pg_catalog.format(
                     'SELECT a.tenant_id FROM %s a '
                     'WHERE a.alert_next_at OPERATOR(pg_catalog.<=) pg_catalog.now() '
                     'ORDER BY a.alert_next_at '
                     'LIMIT $1 FOR UPDATE SKIP LOCKED', s)
                 USING max_accounts OPERATOR(pg_catalog.-) seen
        LOOP
            seen := seen OPERATOR(pg_catalog.+) 1;
            -- one account that cannot be checked must not stop the others
            BEGIN
                IF billing.alerts_check(t) THEN
                    n := n OPERATOR(pg_catalog.+) 1;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'billing: the alerts'' sweep skipped account "%": %', t, SQLERRM;
            END;
        END LOOP;
        EXIT WHEN seen OPERATOR(pg_catalog.>=) max_accounts;
    END LOOP;
    RETURN n;
END;
$$;
COMMENT ON FUNCTION billing.alerts_due(integer) IS 'announce the grant.expiring events due on accounts nobody else has locked (the worker runs it)';
REVOKE ALL ON FUNCTION billing.alerts_due(integer) FROM PUBLIC;

CREATE FUNCTION billing.metric_samples()
    RETURNS TABLE (name text, labels jsonb, value double precision, type text, help text)
    AS 'MODULE_PATHNAME', 'billing_metric_samples'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION billing.metric_samples() IS 'the samples of billing_metrics() as rows (the view billing.metrics)';
REVOKE ALL ON FUNCTION billing.metric_samples() FROM PUBLIC;

CREATE VIEW billing.metrics AS SELECT * FROM billing.metric_samples();
COMMENT ON VIEW billing.metrics IS 'the samples of billing_metrics() as rows, for postgres_exporter and dashboards';

CREATE FUNCTION @extschema@.billing_metrics() RETURNS text
    AS 'MODULE_PATHNAME', 'billing_metrics'
    LANGUAGE C VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.billing_metrics() IS 'charges, refusals, entries, holds, jobs, the Redis mirror and the outbox in the Prometheus text exposition format';
REVOKE ALL ON FUNCTION @extschema@.billing_metrics() FROM PUBLIC;
