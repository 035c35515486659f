-- A job's life: billing_job_submit (holds the estimate, 1.00) on a random
-- tenant of :tenants, billing_job_claim of the oldest queued job of kind
-- "bench" (FOR UPDATE SKIP LOCKED: with 8 clients it is usually another
-- client's job), billing_job_complete of the job claimed with the actual
-- cost (0.000001 .. 0.999999; the rest of the hold is released).  Three
-- autocommit statements: one pgbench transaction = 3 commits.
--
-- The claim is wrapped in an aggregate so it always returns one row: \gset
-- aborts the client on zero rows, and a claim can come back empty when
-- every queued job it sees is being claimed by others while the jobs
-- submitted since its snapshot are invisible to it.  An empty claim skips
-- the complete and leaves one job queued: run.sh counts the jobs still
-- queued after the run (= empty claims) and shows them.
\set t random(1, :tenants)
\set r random(1, 9000000000000000)
\set a random(1, 999999)
SELECT job_id FROM billing_job_submit('t' || :t::int, 'bench', 'j-' || :client_id::int || '-' || :r::bigint, 1.0);
SELECT coalesce(max(tenant_id), '') AS jt, coalesce(max(job_id), 0) AS jid
  FROM billing_job_claim('w-' || :client_id::int, kinds => '{bench}') \gset
\if :jid > 0
SELECT state FROM billing_job_complete(:jt, :jid::bigint, :a::int * 0.000001, NULL, 'w-' || :client_id::int);
\endif
