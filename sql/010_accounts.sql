--
-- 010_accounts: creating, re-creating and changing accounts, and the audit
-- trail in billing.account_events.  Tenants of this file start with "acc-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

-- An account needs only a tenant id: USD, no credit limit, active, UTC, no
-- metadata, balance 0, nothing on hold, version 0, no entry yet.
SELECT tenant_id, currency, status, balance, credit_limit, on_hold, available, version,
       last_entry_at, timezone, metadata, created_at = updated_at AS never_updated
  FROM billing_account_create('acc-minimal');

-- Every setting can be given at creation.
SELECT tenant_id, currency, status, balance, credit_limit, on_hold, available, version,
       last_entry_at, timezone, metadata
  FROM billing_account_create('acc-full', currency => 'EUR', credit_limit => 25.5,
                              status => 'suspended', timezone => 'Europe/Berlin',
                              metadata => '{"plan": "pro", "seats": 3}');

-- Currencies are 3 to 10 upper-case letters or digits starting with a letter.
SELECT tenant_id, currency
  FROM billing_account_create('acc-credits', currency => 'CREDITS');
SELECT tenant_id, currency
  FROM billing_account_create('acc-10chars', currency => 'ABCDEFGHI0');

-- Creating an account writes one 'create' row with the effective settings.
SELECT tenant_id, action, changes, reason, changed_by
  FROM billing.account_events
 WHERE tenant_id LIKE 'acc-%'
 ORDER BY event_id;

-- Creating again with the same settings, with some of them, or with none
-- returns the existing account unchanged and writes no audit row.
SELECT tenant_id, currency, status, credit_limit, timezone, metadata, version
  FROM billing_account_create('acc-full', currency => 'EUR', credit_limit => 25.5,
                              status => 'suspended', timezone => 'Europe/Berlin',
                              metadata => '{"seats": 3, "plan": "pro"}');
SELECT tenant_id, currency, status, credit_limit, timezone, metadata, version
  FROM billing_account_create('acc-full');
SELECT tenant_id, currency, status, credit_limit, timezone, metadata, version
  FROM billing_account_create('acc-full', credit_limit => 25.500000, timezone => 'Europe/Berlin');
SELECT tenant_id, currency, status, credit_limit, version
  FROM billing_account_create('acc-minimal', currency => 'USD', credit_limit => 0,
                              status => 'active', timezone => 'UTC', metadata => '{}');
SELECT count(*) AS audit_rows FROM billing.account_events WHERE tenant_id LIKE 'acc-%';

-- A differing setting is an error (ZB006) naming every differing field,
-- with existing and requested values; nothing is changed.
SELECT regress_error($$SELECT billing_account_create('acc-full', currency => 'USD')$$);
SELECT regress_error($$SELECT billing_account_create('acc-full', credit_limit => 25.000001)$$);
SELECT regress_error($$SELECT billing_account_create('acc-full', status => 'active')$$);
SELECT regress_error($$SELECT billing_account_create('acc-full', timezone => 'UTC')$$);
SELECT regress_error($$SELECT billing_account_create('acc-full', metadata => '{"plan": "pro"}')$$);
SELECT regress_error($$SELECT billing_account_create('acc-minimal', currency => 'EUR',
        credit_limit => 10, status => 'suspended', timezone => 'Asia/Tokyo',
        metadata => '{"a": 1}')$$);
SELECT tenant_id, currency, status, credit_limit, timezone, metadata, version
  FROM billing.balances WHERE tenant_id IN ('acc-minimal', 'acc-full') ORDER BY 1;

-- Invalid settings are refused before anything is written.
-- tenant id: required, 1 to 255 characters.
SELECT regress_error($$SELECT billing_account_create(NULL)$$);
SELECT regress_error($$SELECT billing_account_create('')$$);
SELECT regress_error($$SELECT billing_account_create(repeat('t', 256))$$);
-- currency
SELECT regress_error($$SELECT billing_account_create('acc-bad', currency => 'usd')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', currency => 'US')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', currency => 'ABCDEFGHIJK')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', currency => '1AB')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', currency => '')$$);
-- credit limit: zero or positive, at most 6 decimals, at most 10^12
SELECT regress_error($$SELECT billing_account_create('acc-bad', credit_limit => -1)$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', credit_limit => 0.0000001)$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', credit_limit => 'NaN')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', credit_limit => 'Infinity')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', credit_limit => 1000000000000.000001)$$);
-- status: active or suspended (a new account cannot be closed)
SELECT regress_error($$SELECT billing_account_create('acc-bad', status => 'deleted')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', status => 'Active')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', status => 'closed')$$);
-- time zone: a name PostgreSQL knows
SELECT regress_error($$SELECT billing_account_create('acc-bad', timezone => 'Mars/Olympus_Mons')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', timezone => '')$$);
-- metadata: a JSON object
SELECT regress_error($$SELECT billing_account_create('acc-bad', metadata => '[1, 2]')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', metadata => '"pro"')$$);
SELECT regress_error($$SELECT billing_account_create('acc-bad', metadata => 'null')$$);
SELECT count(*) AS bad_accounts FROM billing.accounts WHERE tenant_id = 'acc-bad';
SELECT count(*) AS audit_rows FROM billing.account_events WHERE tenant_id LIKE 'acc-%';

-- The largest credit limit is 10^12.
SELECT tenant_id, credit_limit, available
  FROM billing_account_create('acc-biglimit', credit_limit => 1000000000000);

--
-- billing_account_update: every effective change is one 'update' row with
-- old and new values and the reason; the account version goes up by one.
--
SELECT tenant_id, status, credit_limit, available, timezone, metadata, version
  FROM billing_account_update('acc-full', credit_limit => 100, reason => 'upgrade to pro plus');
SELECT tenant_id, status, credit_limit, version
  FROM billing_account_update('acc-full', status => 'active', reason => 'payment received');
SELECT tenant_id, timezone, version
  FROM billing_account_update('acc-full', timezone => 'America/New_York', reason => 'moved');
SELECT tenant_id, metadata, version
  FROM billing_account_update('acc-full', metadata => '{"plan": "enterprise"}', reason => 'contract');
-- several settings at once make one audit row; without a reason it is null
SELECT tenant_id, status, credit_limit, timezone, version, updated_at > created_at AS updated
  FROM billing_account_update('acc-full', credit_limit => 0, status => 'suspended',
                              timezone => 'UTC');
-- settings equal to the current ones, or none at all, change nothing: no
-- audit row, same version
SELECT tenant_id, status, credit_limit, timezone, metadata, version
  FROM billing_account_update('acc-full', credit_limit => 0.000000, status => 'suspended',
                              timezone => 'UTC', metadata => '{"plan": "enterprise"}',
                              reason => 'no-op');
SELECT tenant_id, status, version
  FROM billing_account_update('acc-full', reason => 'nothing');

SELECT action, changes, reason, changed_by
  FROM billing.account_events
 WHERE tenant_id = 'acc-full'
 ORDER BY event_id;

-- Invalid settings and unknown tenants are refused, nothing changes.
SELECT regress_error($$SELECT billing_account_update('acc-full', credit_limit => -0.000001)$$);
SELECT regress_error($$SELECT billing_account_update('acc-full', credit_limit => 1.1234567)$$);
SELECT regress_error($$SELECT billing_account_update('acc-full', status => 'frozen')$$);
SELECT regress_error($$SELECT billing_account_update('acc-full', timezone => 'Nowhere/City')$$);
SELECT regress_error($$SELECT billing_account_update('acc-full', metadata => '[]')$$);
SELECT regress_error($$SELECT billing_account_update(NULL, status => 'active')$$);
SELECT regress_error($$SELECT billing_account_update('', status => 'active')$$);
SELECT regress_error($$SELECT billing_account_update(repeat('x', 256), status => 'active')$$);
SELECT regress_error($$SELECT billing_account_update('acc-nobody', status => 'active')$$);
SELECT regress_error($$SELECT billing_account_update('acc-nobody')$$);
SELECT tenant_id, status, credit_limit, timezone, metadata, version
  FROM billing.balances WHERE tenant_id = 'acc-full';
SELECT count(*) AS audit_rows FROM billing.account_events WHERE tenant_id = 'acc-full';

--
-- Closed is final: closing is an update like any other, after which every
-- change (even to the same status) is refused with ZB003.
--
SELECT tenant_id, status, version
  FROM billing_account_update('acc-minimal', status => 'closed', reason => 'customer left');
SELECT regress_error($$SELECT billing_account_update('acc-minimal', status => 'active')$$);
SELECT regress_error($$SELECT billing_account_update('acc-minimal', credit_limit => 5)$$);
SELECT regress_error($$SELECT billing_account_update('acc-minimal', metadata => '{"x": 1}')$$);
SELECT regress_error($$SELECT billing_account_update('acc-minimal', status => 'closed')$$);
-- creating it again without settings, or with its actual status closed,
-- returns the closed account (only a new account cannot be created
-- closed); asking for it to be active is a differing setting
SELECT tenant_id, status, version FROM billing_account_create('acc-minimal');
SELECT tenant_id, status, version FROM billing_account_create('acc-minimal', status => 'closed');
SELECT regress_error($$SELECT billing_account_create('acc-minimal', status => 'active')$$);
SELECT action, changes, reason
  FROM billing.account_events
 WHERE tenant_id = 'acc-minimal'
 ORDER BY event_id;

-- Tenant ids are case-sensitive and may use any characters; 255 characters
-- (counted in characters, not bytes) is the longest.
SELECT tenant_id FROM billing_account_create('ACC-minimal');
SELECT tenant_id FROM billing_account_create('acc-ünïcødé €');
SELECT length(tenant_id), octet_length(tenant_id)
  FROM billing_account_create('acc-' || repeat('é', 251));
SELECT regress_error($$SELECT billing_account_create('acc-' || repeat('é', 252))$$);
SELECT tenant_id, status FROM billing.balances WHERE tenant_id ILIKE 'acc-%' AND length(tenant_id) < 20 ORDER BY tenant_id COLLATE "C";
