--
-- demo/workload.sql: a day and a half of a usage-billing platform, told with
-- the billing extension.  demo/run.sh feeds it to psql -e (every query is
-- echoed before its result) in a fresh database with CREATE EXTENSION billing.
--
-- Cast:
--   acme-ai      an AI gateway customer: USD, may go up to 50 USD into credit
--   lingua-gmbh  a translation shop in Berlin: EUR, days are Berlin days
--   trial-7f3a   a trial tenant living on a 5 USD welcome grant
--
-- The story happens the day before yesterday and yesterday (UTC): every
-- money call passes event_at (when the usage happened), so the daily reports
-- come out the same on every run but for the dates, and event_at stays in
-- the accepted window (billing.event_at_window, 7 days).  Statements that are
-- meant to fail are wrapped in ON_ERROR_STOP off/on; any other error stops
-- the demo.
--
\pset footer off
\pset pager off
\pset null '(null)'
\set SHOW_CONTEXT never
\set VERBOSITY default
\set ON_ERROR_STOP on
SET TIME ZONE 'UTC';
SELECT to_char(current_date - 2, 'YYYY-MM-DD') AS d1, to_char(current_date - 1, 'YYYY-MM-DD') AS d2 \gset
\echo 'The story: day 1 is' :d1 ', day 2 is' :d2 '(UTC).'

\echo
\echo '== 1. Three tenants sign up'
\echo '   billing_account_create() returns the new row of billing.balances.'
SELECT tenant_id, currency, status, balance, credit_limit, available, timezone
  FROM billing_account_create('acme-ai', currency => 'USD', credit_limit => 50,
                              metadata => '{"plan": "enterprise"}');
SELECT tenant_id, currency, status, balance, credit_limit, available, timezone
  FROM billing_account_create('lingua-gmbh', currency => 'EUR', timezone => 'Europe/Berlin',
                              metadata => '{"plan": "pro"}');
SELECT tenant_id, currency, status, balance, credit_limit, available, timezone
  FROM billing_account_create('trial-7f3a', metadata => '{"plan": "trial"}');

\echo
\echo '== 2. Money comes in: two Stripe top-ups and a welcome grant that expires in 14 days'
\echo '   The trace id is the payment id, so a re-delivered Stripe webhook cannot credit twice.'
SELECT tenant_id, trace_id, kind, amount, balance_after, replayed
  FROM billing_credit('acme-ai', 100.00, 'stripe-pi_3QdemoA1acme',
                      description => 'Stripe top-up', event_at => (:'d1' || ' 09:00+00')::timestamptz);
SELECT tenant_id, trace_id, kind, amount, balance_after, replayed
  FROM billing_credit('lingua-gmbh', 150.00, 'stripe-pi_3QdemoB2lingua',
                      description => 'Stripe top-up', event_at => (:'d1' || ' 09:15+00')::timestamptz);
SELECT tenant_id, trace_id, category, granted, expires_at::date AS expires, balance_after, replayed
  FROM billing_grant('trial-7f3a', 5, 'grant-welcome-trial-7f3a', expires_at => current_date + 14,
                     category => 'promotional', priority => 10, description => 'welcome credit');

\echo
\echo '== 3. A burst of 200 API calls, each charged by billing_deduct()'
\echo '   One SELECT: generate_series makes the requests (tenant, model, api key, tokens,'
\echo '   a deterministic trace id req-0001..req-0200), the price is per million tokens.'
WITH price(model, provider, usd_per_m_in, usd_per_m_out) AS (VALUES
         ('gpt-4o',            'openai',    2.50, 10.00),
         ('claude-3-5-sonnet', 'anthropic', 3.00, 15.00),
         ('gemini-1.5-pro',    'google',    1.25,  5.00),
         ('gpt-4o-mini',       'openai',    0.15,  0.60),
         ('claude-3-haiku',    'anthropic', 0.25,  1.25)),
     tenant(tenant_id, slot_lo, slot_hi, models, api_keys, description) AS (VALUES
         ('acme-ai',     0, 5, '{gpt-4o,claude-3-5-sonnet,gemini-1.5-pro}'::text[],
                               '{ak_acme_prod,ak_acme_batch}'::text[], 'chat completion'),
         ('lingua-gmbh', 6, 8, '{gpt-4o-mini,claude-3-haiku}', '{ak_lingua_cat}', 'segment translation'),
         ('trial-7f3a',  9, 9, '{gpt-4o-mini}',                '{ak_trial_playground}', 'playground')),
     request AS (
         SELECT g.i, t.tenant_id, t.description,
                t.models[1 + g.i % cardinality(t.models)]       AS model,
                t.api_keys[1 + g.i % cardinality(t.api_keys)]   AS api_key,
                200 + g.i * 37 % 1800                           AS input_tokens,
                50 + g.i * 53 % 700                             AS output_tokens,
                (:'d1' || ' 20:00+00')::timestamptz + g.i * interval '8 minutes' AS event_at
           FROM generate_series(1, 200) AS g(i)
           JOIN tenant t ON g.i % 10 BETWEEN t.slot_lo AND t.slot_hi)
SELECT d.tenant_id,
       count(*)             AS charges,
       -sum(d.amount)       AS spent,
       min(d.balance_after) AS balance_after_burst
  FROM request r
  JOIN price p USING (model)
  CROSS JOIN LATERAL billing_deduct(
         r.tenant_id,
         round((r.input_tokens * p.usd_per_m_in + r.output_tokens * p.usd_per_m_out) / 1000000, 6),
         format('req-%s', lpad(r.i::text, 4, '0')),
         description => r.description,
         metadata => jsonb_build_object('model', r.model, 'provider', p.provider,
                                        'api_key', r.api_key,
                                        'input_tokens', r.input_tokens,
                                        'output_tokens', r.output_tokens),
         event_at => r.event_at) AS d
 GROUP BY d.tenant_id
 ORDER BY d.tenant_id;

\echo
\echo '== 3b. A streaming response: hold an estimate, capture as tokens arrive, release the rest'
\echo '   The hold lowers "available" but not the balance; each capture is a ledger entry.'
SELECT trace_id, status, amount, remaining, available
  FROM billing_hold('acme-ai', 0.50, 'stream-0001', expires_in => '10 minutes',
                    description => 'streamed chat completion', metadata => '{"model": "gpt-4o"}');
SELECT tenant_id, balance, on_hold, available FROM billing.balances WHERE tenant_id = 'acme-ai';
SELECT trace_id, amount, balance_after, hold_captured, hold_remaining, hold_status
  FROM billing_capture('acme-ai', 'stream-0001', 0.120000, 'stream-0001-part-1');
SELECT trace_id, amount, balance_after, hold_captured, hold_remaining, hold_status
  FROM billing_capture('acme-ai', 'stream-0001', 0.080000, 'stream-0001-part-2');
SELECT trace_id, status, captured, released, remaining, available
  FROM billing_release('acme-ai', 'stream-0001', 'stream-0001-done');

\echo
\echo '== 3c. Jobs: a document translation that completes (charged once) and one that fails (hold released)'
\echo '   Submit holds the estimate; complete captures the actual cost in the same transaction.'
SELECT job_id AS job_ok, state, estimated_cost, hold_trace_id
  FROM billing_job_submit('lingua-gmbh', 'translate', 'doc-8812', 2.00,
                          input => '{"document": "contract-8812.docx", "words": 912}') \gset
SELECT job_id AS job_bad, state, estimated_cost
  FROM billing_job_submit('lingua-gmbh', 'translate', 'doc-8813', 1.50,
                          input => '{"document": "scan-8813.pdf"}', max_attempts => 1) \gset
SELECT tenant_id, balance, on_hold, available FROM billing.balances WHERE tenant_id = 'lingua-gmbh';
SELECT job_id, kind, state, attempt, worker FROM billing_job_claim('translator-1', max_jobs => 2);
SELECT job_id, state, estimated_cost, actual_cost, charge_entry_id IS NOT NULL AS charged
  FROM billing_job_complete('lingua-gmbh', :job_ok, 1.37, '{"words": 912}', 'translator-1');
SELECT job_id, state, attempt, last_error
  FROM billing_job_fail('lingua-gmbh', :job_bad, 'OCR failed: unreadable scan', retryable => false,
                        worker => 'translator-1');
SELECT tenant_id, balance, on_hold, available FROM billing.balances WHERE tenant_id = 'lingua-gmbh';
\echo '   The state machine holds for the table owner too: a failed job cannot be marked completed,'
\echo '   nor queued again without a new hold (billing_job_retry takes one):'
\set ON_ERROR_STOP off
UPDATE billing.jobs SET state = 'completed' WHERE job_id = :job_bad;
\if :ERROR
\echo '   -> refused with SQLSTATE' :LAST_ERROR_SQLSTATE
\endif
UPDATE billing.jobs SET state = 'queued' WHERE job_id = :job_bad;
\if :ERROR
\echo '   -> refused with SQLSTATE' :LAST_ERROR_SQLSTATE
\endif
\set ON_ERROR_STOP on
\echo '   The business log of both jobs (billing.job_events):'
SELECT job_id, from_state, to_state, attempt, reason, worker
  FROM billing.job_events WHERE job_id IN (:job_ok, :job_bad) ORDER BY event_id;

\echo
\echo '== 4. A network retry: the gateway sends the same charge twice'
\echo '   The second call is a replay: same entry_id, replayed = t, nothing charged again.'
SELECT entry_id, trace_id, amount, balance_after, version, replayed
  FROM billing_deduct('acme-ai', 0.003790, 'req-0201', description => 'chat completion',
                      metadata => '{"model": "gpt-4o", "provider": "openai", "api_key": "ak_acme_prod",
                                    "input_tokens": 812, "output_tokens": 176}',
                      event_at => (:'d2' || ' 23:05+00')::timestamptz);
SELECT entry_id, trace_id, amount, balance_after, version, replayed
  FROM billing_deduct('acme-ai', 0.003790, 'req-0201', description => 'chat completion',
                      metadata => '{"model": "gpt-4o", "provider": "openai", "api_key": "ak_acme_prod",
                                    "input_tokens": 812, "output_tokens": 176}',
                      event_at => (:'d2' || ' 23:05+00')::timestamptz);
SELECT billing_balance('acme-ai') AS acme_balance;

\echo
\echo '== 5. A buggy client reuses trace id req-0201 for a different amount'
\echo '   Expected: error ZB005 naming the differing field, with both values.'
\set ON_ERROR_STOP off
SELECT entry_id, trace_id, amount, balance_after, replayed
  FROM billing_deduct('acme-ai', 0.037900, 'req-0201', description => 'chat completion',
                      metadata => '{"model": "gpt-4o", "provider": "openai", "api_key": "ak_acme_prod",
                                    "input_tokens": 812, "output_tokens": 176}',
                      event_at => (:'d2' || ' 23:05+00')::timestamptz);
\if :ERROR
\echo '   -> refused with SQLSTATE' :LAST_ERROR_SQLSTATE
\endif
\set ON_ERROR_STOP on

\echo
\echo '== 6. Credit limit: acme-ai may go down to -50 USD, not further'
\echo '   A 120 USD fine-tuning run takes the balance below zero (allowed: credit limit 50).'
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct('acme-ai', 120, 'ft-job-0042', description => 'fine-tuning run',
                      metadata => '{"model": "gpt-4o-mini", "provider": "openai", "api_key": "ak_acme_batch"}',
                      event_at => (:'d2' || ' 23:10+00')::timestamptz);
SELECT tenant_id, balance, credit_limit, available FROM billing.balances WHERE tenant_id = 'acme-ai';
\echo '   The next 40 USD run does not fit. Expected: error ZB004 with required and available.'
\set ON_ERROR_STOP off
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct('acme-ai', 40, 'ft-job-0043', description => 'fine-tuning run',
                      metadata => '{"model": "gpt-4o-mini", "provider": "openai", "api_key": "ak_acme_batch"}',
                      event_at => (:'d2' || ' 23:12+00')::timestamptz);
\if :ERROR
\echo '   -> refused with SQLSTATE' :LAST_ERROR_SQLSTATE
\endif
\set ON_ERROR_STOP on

\echo
\echo '== 7. billing_try_deduct: a rejection is an answer, recorded for replays'
\echo '   The trial tenant starts a 12 USD batch with only its grant left: rejected, no error raised.'
\echo '   (one record, shown vertically)'
\x on
SELECT status, replayed, entry_id, trace_id, amount, balance_after, sqlstate, reason, detail
  FROM billing_try_deduct('trial-7f3a', 12, 'batch-emb-0007', description => 'embedding batch',
                          metadata => '{"model": "text-embedding-3-large", "provider": "openai",
                                        "api_key": "ak_trial_playground"}',
                          event_at => (:'d2' || ' 23:20+00')::timestamptz);
\x off
\echo '   The customer upgrades and pays 20 USD.'
SELECT tenant_id, trace_id, kind, amount, balance_after
  FROM billing_credit('trial-7f3a', 20, 'stripe-pi_3QdemoC3trial', description => 'Stripe top-up',
                      event_at => (:'d2' || ' 23:25+00')::timestamptz);
\echo '   A retry of batch-emb-0007 is a replay of the recorded rejection, even though the money is there now:'
SELECT status, replayed, entry_id, trace_id, amount, sqlstate, reason
  FROM billing_try_deduct('trial-7f3a', 12, 'batch-emb-0007', description => 'embedding batch',
                          metadata => '{"model": "text-embedding-3-large", "provider": "openai",
                                        "api_key": "ak_trial_playground"}',
                          event_at => (:'d2' || ' 23:20+00')::timestamptz);
\echo '   The same batch sent as a new request (new trace id) is charged:'
SELECT status, replayed, entry_id, trace_id, amount, balance_after
  FROM billing_try_deduct('trial-7f3a', 12, 'batch-emb-0008', description => 'embedding batch',
                          metadata => '{"model": "text-embedding-3-large", "provider": "openai",
                                        "api_key": "ak_trial_playground"}',
                          event_at => (:'d2' || ' 23:26+00')::timestamptz);
\echo '   The recorded rejection (table billing.rejections, append-only):'
SELECT tenant_id, trace_id, kind, billing.to_amount(amount_micros) AS amount, sqlstate, reason
  FROM billing.rejections
 ORDER BY rejection_id;

\echo
\echo '== 8. A suspended account refuses charges'
\echo '   lingua-gmbh has a card dispute open: support suspends the account.'
SELECT tenant_id, status, balance, version
  FROM billing_account_update('lingua-gmbh', status => 'suspended',
                              reason => 'dispute du_demo42 opened');
\echo '   Expected: error ZB002; billing_deduct rolls back, so nothing is recorded.'
\set ON_ERROR_STOP off
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct('lingua-gmbh', 0.004210, 'req-0202', description => 'segment translation',
                      metadata => '{"model": "claude-3-haiku", "provider": "anthropic", "api_key": "ak_lingua_cat",
                                    "input_tokens": 1480, "output_tokens": 3072}',
                      event_at => (:'d2' || ' 23:30+00')::timestamptz);
\if :ERROR
\echo '   -> refused with SQLSTATE' :LAST_ERROR_SQLSTATE
\endif
\set ON_ERROR_STOP on
\echo '   The dispute is won and the account reactivated; the client retries the same call and it is charged:'
SELECT tenant_id, status, balance, version
  FROM billing_account_update('lingua-gmbh', status => 'active',
                              reason => 'dispute du_demo42 won');
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct('lingua-gmbh', 0.004210, 'req-0202', description => 'segment translation',
                      metadata => '{"model": "claude-3-haiku", "provider": "anthropic", "api_key": "ak_lingua_cat",
                                    "input_tokens": 1480, "output_tokens": 3072}',
                      event_at => (:'d2' || ' 23:30+00')::timestamptz);

\echo
\echo '== 9. The ledger is append-only, even for a superuser'
\echo '   Someone tries to "fix" a charge in place, then to delete it. Expected: ZB020 twice.'
\set ON_ERROR_STOP off
UPDATE billing.entries SET amount_micros = 0 WHERE tenant_id = 'acme-ai' AND trace_id = 'req-0201';
\if :ERROR
\echo '   -> refused with SQLSTATE' :LAST_ERROR_SQLSTATE
\endif
DELETE FROM billing.entries WHERE tenant_id = 'acme-ai' AND trace_id = 'req-0201';
\if :ERROR
\echo '   -> refused with SQLSTATE' :LAST_ERROR_SQLSTATE
\endif
\set ON_ERROR_STOP on
\echo '   A correction is a new entry: refund the request (its upstream call timed out).'
\echo '   billing_refund() ties the refund to its charge and never gives back more than it took.'
SELECT entry_id, trace_id, charge_trace_id, amount, refundable, balance_after
  FROM billing_refund('acme-ai', 'req-0201', 0.003790, 'refund-req-0201', reason => 'upstream timeout');

\echo
\echo '== 10. The last 10 ledger entries (view billing.ledger)'
SELECT entry_id, tenant_id, trace_id, kind, amount, balance_after, model, description
  FROM (SELECT * FROM billing.ledger ORDER BY entry_id DESC LIMIT 10) AS last10
 ORDER BY entry_id;

\echo
\echo '== 11. Balances (view billing.balances); available = what can still be charged (balance + credit limit)'
SELECT tenant_id, currency, status, balance, credit_limit, available, version, timezone
  FROM billing.balances
 ORDER BY tenant_id;

\echo '   The trial''s welcome grant was spent before its top-up (view billing.grant_balances):'
SELECT tenant_id, trace_id, category, granted, remaining, expires_at::date AS expires, status
  FROM billing.grant_balances ORDER BY grant_id;

\echo
\echo '== 12. Usage per day (view billing.usage_daily), in each account''s time zone'
\echo '   lingua-gmbh''s charges after 23:00 UTC on day 2 (' :d2 ') fall on the next day in Berlin.'
SELECT tenant_id, day, charges, spent, credits, credited
  FROM billing.usage_daily
 ORDER BY tenant_id, day;

\echo
\echo '== 13. Usage per model (view billing.usage_by_model; tokens from the metadata)'
SELECT tenant_id, day, model, provider, charges, spent, input_tokens, output_tokens
  FROM billing.usage_by_model
 ORDER BY tenant_id, day, model;

\echo
\echo '== 14. Usage per API key (view billing.usage_by_api_key)'
SELECT tenant_id, day, api_key, charges, spent
  FROM billing.usage_by_api_key
 ORDER BY tenant_id, day, api_key;

\echo
\echo '== 15. Audit trail of account settings (table billing.account_events)'
\echo '   One row per setting in the jsonb column "changes": a create records every initial'
\echo '   setting, an update {"setting": {"old": ..., "new": ...}} for each changed one.'
SELECT e.event_id, e.tenant_id, e.action, c.key AS setting,
       CASE e.action WHEN 'update' THEN c.value->>'old' ELSE '' END AS old,
       CASE e.action WHEN 'update' THEN c.value->>'new' ELSE c.value #>> '{}' END AS new,
       coalesce(e.reason, '') AS reason, e.changed_by
  FROM billing.account_events AS e
  CROSS JOIN LATERAL jsonb_each(e.changes) AS c
 ORDER BY e.event_id, c.key;

\echo
\echo '== 16. billing_verify(): cached balances == SUM(ledger), balance_after chains unbroken'
\echo '   No rows below means every account is consistent.'
SELECT * FROM billing_verify();
