/*-------------------------------------------------------------------------
 *
 * metrics.c
 *	  The counters behind billing_metrics() and the events' part of
 *	  billing_sync_status(); billing_metrics() and billing.metric_samples().
 *
 * A backend counts in its own memory what its transaction does (ledger
 * entries by kind, charges, job transitions, events written; refusals by
 * SQLSTATE) and adds it to shared memory when the transaction ends: what
 * it committed on COMMIT, refusals either way (a refused billing_deduct
 * rolls back, and was refused all the same).  One atomic addition per
 * counter that changed, only with billing in shared_preload_libraries;
 * without, the counters are not kept and billing_metrics() shows what the
 * tables say.  Counters start at 0 when the server starts (Prometheus'
 * rate() handles the reset).  A savepoint rolled back inside a
 * transaction that commits is counted as committed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "billing.h"
#include "catalog/pg_type.h"
#include "events.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "spi.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/shmem.h"
#include "sync.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(billing_metrics);
PG_FUNCTION_INFO_V1(billing_metric_samples);

EventsShared *billing_events = NULL;

const char *const metric_entry_kinds[MK_COUNT] = {
	"topup", "grant", "refund", "adjustment", "deduct", "capture", "expire", "other"
};
const char *const metric_refusal_codes[METRIC_REFUSAL_CODES] = {
	"ZB002", "ZB003", "ZB004", "ZB033", "ZB040", "ZB041", "ZB042", "ZB043",
	"ZB044", "ZB045", "ZB051", "ZB052", "other"
};
const char *const metric_job_states[METRIC_JOB_STATES] = {
	"queued", "processing", "completed", "failed", "cancelled"
};
const char *const metric_event_types[METRIC_EVENT_TYPES] = {
	"balance.low", "quota.threshold", "hold.expired", "job.completed", "job.failed",
	"account.status_changed", "mirror.repaired", "grant.expiring", "grant.expired", "other"
};

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* this transaction's counts */
static bool counted = false;
static int64 l_entries[MK_COUNT];
static int64 l_charges;
static int64 l_refusals[METRIC_REFUSAL_CODES];
static int64 l_jobs[METRIC_JOB_STATES];
static int64 l_written[METRIC_EVENT_TYPES];

static void
metrics_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(EventsShared)));
	RequestNamedLWLockTranche("billing events", 1);
}

static void
metrics_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	billing_events = ShmemInitStruct("billing events", sizeof(EventsShared), &found);
	if (!found)
	{
		memset(billing_events, 0, sizeof(EventsShared));
		billing_events->lock = &(GetNamedLWLockTranche("billing events"))->lock;
		for (int i = 0; i < MK_COUNT; i++)
			pg_atomic_init_u64(&billing_events->entries[i], 0);
		pg_atomic_init_u64(&billing_events->charges, 0);
		for (int i = 0; i < METRIC_REFUSAL_CODES; i++)
			pg_atomic_init_u64(&billing_events->refusals[i], 0);
		for (int i = 0; i < METRIC_JOB_STATES; i++)
			pg_atomic_init_u64(&billing_events->jobs[i], 0);
		for (int i = 0; i < METRIC_EVENT_TYPES; i++)
			pg_atomic_init_u64(&billing_events->written[i], 0);
		pg_atomic_init_u64(&billing_events->committed, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

void
metrics_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = metrics_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = metrics_shmem_startup;
}

static int
slot_of(const char *const *names, int n, const char *name)
{
	for (int i = 0; i < n - 1; i++)
		if (strcmp(names[i], name) == 0)
			return i;
	return n - 1;				/* other */
}

/* a ledger entry this transaction wrote (ledger.c) */
void
metrics_count_entry(const char *kind, int64 amount)
{
	l_entries[slot_of(metric_entry_kinds, MK_COUNT, kind)]++;
	if (amount < 0 && strcmp(kind, "expire") != 0)
		l_charges++;
	counted = true;
}

/* a business rejection, raised or recorded */
void
metrics_count_refusal(int sqlerrcode)
{
	l_refusals[slot_of(metric_refusal_codes, METRIC_REFUSAL_CODES,
					   unpack_sql_state(sqlerrcode))]++;
	counted = true;
}

/* a job transition into `state` (jobs.c) */
void
metrics_count_job(const char *state)
{
	int			i;

	for (i = 0; i < METRIC_JOB_STATES; i++)
		if (strcmp(metric_job_states[i], state) == 0)
			break;
	if (i < METRIC_JOB_STATES)
	{
		l_jobs[i]++;
		counted = true;
	}
}

/* an event written (events.c) */
void
metrics_count_event(const char *type)
{
	l_written[slot_of(metric_event_types, METRIC_EVENT_TYPES, type)]++;
	counted = true;
}

/*
 * The transaction ends: add its counts to shared memory; on a commit that
 * wrote events, wake the worker (its database's only).
 */
void
metrics_xact_end(bool commit)
{
	int64		events = 0;

	if (!counted)
		return;
	if (billing_events != NULL)
	{
		for (int i = 0; i < METRIC_REFUSAL_CODES; i++)
			if (l_refusals[i])
				pg_atomic_fetch_add_u64(&billing_events->refusals[i], l_refusals[i]);
		if (commit)
		{
			for (int i = 0; i < MK_COUNT; i++)
				if (l_entries[i])
					pg_atomic_fetch_add_u64(&billing_events->entries[i], l_entries[i]);
			if (l_charges)
				pg_atomic_fetch_add_u64(&billing_events->charges, l_charges);
			for (int i = 0; i < METRIC_JOB_STATES; i++)
				if (l_jobs[i])
					pg_atomic_fetch_add_u64(&billing_events->jobs[i], l_jobs[i]);
			for (int i = 0; i < METRIC_EVENT_TYPES; i++)
				if (l_written[i])
				{
					pg_atomic_fetch_add_u64(&billing_events->written[i], l_written[i]);
					events += l_written[i];
				}
		}
		if (events > 0)
		{
			Latch	   *latch = NULL;

			pg_atomic_fetch_add_u64(&billing_events->committed, events);
			if (billing_sync != NULL)
			{
				LWLockAcquire(billing_sync->lock, LW_SHARED);
				if (!OidIsValid(billing_sync->database) || billing_sync->database == MyDatabaseId)
					latch = billing_sync->worker_latch;
				LWLockRelease(billing_sync->lock);
			}
			if (latch && latch != MyLatch)
				SetLatch(latch);
		}
	}
	memset(l_entries, 0, sizeof(l_entries));
	l_charges = 0;
	memset(l_refusals, 0, sizeof(l_refusals));
	memset(l_jobs, 0, sizeof(l_jobs));
	memset(l_written, 0, sizeof(l_written));
	counted = false;
}

static int
cmp_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * The events' columns of billing_sync_status() (after the mirror's 17):
 * events_backlog, events_lag, events_delivered, events_last_delivered_at,
 * events_recent_lag_p50_ms, events_recent_lag_p99_ms, events_last_error
 * (NULL for a scoped role), events_last_error_at.  The backlog and its age
 * come from the outbox (SPI; billing_sync_status is SECURITY DEFINER since
 * 1.4), the rest from the worker's statistics (NULL when billing is not
 * preloaded).
 */
void
metrics_sync_status(Datum *values, bool *nulls, int n, bool scoped)
{
	char		last_error[EVENTS_ERROR_LEN];
	TimestampTz last_error_at = 0;
	int64		lags[EVENTS_LAG_RING];
	int			nlags = 0;
	int64		delivered = 0;
	TimestampTz last = 0;

	for (int i = 0; i < n; i++)
		nulls[i] = true;
	if (n < 6)
		return;
	if (events_table_exists())
	{
		bool		isnull;
		Datum		d;
		MemoryContext outer = billing_spi_connect();
		Interval   *age = MemoryContextAllocZero(outer, sizeof(Interval));

		if (SPI_execute("SELECT count(*), pg_catalog.now() OPERATOR(pg_catalog.-) min(created_at) "
						"FROM billing.events WHERE delivered_at IS NULL", true, 0) != SPI_OK_SELECT)
			elog(ERROR, "billing: reading the outbox backlog failed");
		values[0] = Int64GetDatum(billing_col_int64(0, 1, 0));
		nulls[0] = false;
		d = billing_col(0, 2, &isnull);
		if (!isnull)
			memcpy(age, DatumGetIntervalP(d), sizeof(Interval));
		values[1] = IntervalPGetDatum(age);
		nulls[1] = false;
		SPI_finish();
	}
	if (billing_events == NULL)
		return;
	LWLockAcquire(billing_events->lock, LW_SHARED);
	delivered = billing_events->delivered;
	last = billing_events->last_delivered_at;
	nlags = Max(Min(billing_events->lag_count, EVENTS_LAG_RING), 0);
	memcpy(lags, billing_events->lag_us, sizeof(int64) * nlags);
	strlcpy(last_error, billing_events->last_error, sizeof(last_error));
	last_error_at = billing_events->last_error_at;
	LWLockRelease(billing_events->lock);
	qsort(lags, nlags, sizeof(int64), cmp_int64);
	values[2] = Int64GetDatum(delivered);
	nulls[2] = false;
	values[3] = TimestampTzGetDatum(last);
	nulls[3] = last == 0;
	values[4] = Float8GetDatum(nlags ? lags[nlags / 2] / 1000.0 : 0);
	nulls[4] = nlags == 0;
	values[5] = Float8GetDatum(nlags ? lags[Min(nlags - 1, (int) (nlags * 0.99))] / 1000.0 : 0);
	nulls[5] = nlags == 0;
	if (n < 8)
		return;
	/* it may name a tenant ("delivery failed for tenant ..."): not for a scoped role */
	values[6] = CStringGetTextDatum(last_error);
	nulls[6] = last_error[0] == '\0' || scoped;
	values[7] = TimestampTzGetDatum(last_error_at);
	nulls[7] = last_error_at == 0;
}

/* ---------------------------------------------------------------------
 * billing_metrics()
 * ---------------------------------------------------------------------
 */
typedef struct Sample
{
	const char *name;			/* the family */
	const char *type;			/* counter, gauge */
	const char *help;
	const char *label;			/* NULL: none */
	char	   *label_value;
	double		value;
} Sample;

typedef struct Samples
{
	int			n;
	int			max;
	Sample	   *s;
} Samples;

static void
add(Samples *all, const char *name, const char *type, const char *help,
	const char *label, const char *label_value, double value)
{
	if (all->n == all->max)
	{
		all->max = all->max ? all->max * 2 : 64;
		all->s = all->s ? repalloc(all->s, sizeof(Sample) * all->max) :
			palloc(sizeof(Sample) * all->max);
	}
	all->s[all->n].name = name;
	all->s[all->n].type = type;
	all->s[all->n].help = help;
	all->s[all->n].label = label;
	all->s[all->n].label_value = label_value ? pstrdup(label_value) : NULL;
	all->s[all->n].value = value;
	all->n++;
}

static double
interval_seconds(Datum d)
{
	Interval   *iv = DatumGetIntervalP(d);

	return (iv->time + (double) iv->day * USECS_PER_DAY +
			(double) iv->month * DAYS_PER_MONTH * USECS_PER_DAY) / 1000000.0;
}

/* every sample, families in a fixed order (SPI connected) */
static void
collect(Samples *all)
{
	bool		isnull;

	/* from the tables */
	if (SPI_execute("SELECT status, count(*) FROM billing.accounts GROUP BY status ORDER BY status",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing: reading billing.accounts failed");
	for (uint64 r = 0; r < SPI_processed; r++)
		add(all, "billing_accounts", "gauge", "Accounts by status.", "status",
			billing_col_cstring((int) r, 1, CurrentMemoryContext),
			(double) billing_col_int64((int) r, 2, 0));

	if (SPI_execute("SELECT a.currency, count(*), "
					"  (coalesce(sum(h.amount_micros - h.captured_micros - h.released_micros), 0) "
					"   OPERATOR(pg_catalog./) 1000000)::pg_catalog.float8 "	/* may pass bigint */
					"FROM billing.holds h JOIN billing.accounts a ON a.tenant_id = h.tenant_id "
					"WHERE h.status = 'open' AND h.expires_at > pg_catalog.now() "
					"GROUP BY a.currency ORDER BY a.currency", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing: reading billing.holds failed");
	{
		uint64		n = SPI_processed;

		for (uint64 r = 0; r < n; r++)
		{
			add(all, "billing_open_holds", "gauge", "Open holds (not expired), by currency.",
				"currency", billing_col_cstring((int) r, 1, CurrentMemoryContext),
				(double) billing_col_int64((int) r, 2, 0));
		}
		for (uint64 r = 0; r < n; r++)
		{
			add(all, "billing_open_holds_amount", "gauge",
				"What remains on open holds, in units of the currency.",
				"currency", billing_col_cstring((int) r, 1, CurrentMemoryContext),
				DatumGetFloat8(billing_col((int) r, 3, &isnull)));
		}
	}

	if (SPI_execute("SELECT (SELECT count(*) FROM billing.jobs WHERE state = 'queued'), "
					"       (SELECT count(*) FROM billing.jobs WHERE state = 'processing')",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing: reading billing.jobs failed");
	add(all, "billing_jobs", "gauge", "Jobs waiting or running, by state.", "state", "queued",
		(double) billing_col_int64(0, 1, 0));
	add(all, "billing_jobs", "gauge", "Jobs waiting or running, by state.", "state", "processing",
		(double) billing_col_int64(0, 2, 0));

	if (events_table_exists())
	{
		Datum		d;

		if (SPI_execute("SELECT count(*), pg_catalog.now() OPERATOR(pg_catalog.-) min(created_at) "
						"FROM billing.events WHERE delivered_at IS NULL", true, 0) != SPI_OK_SELECT)
			elog(ERROR, "billing: reading the outbox backlog failed");
		add(all, "billing_events_backlog", "gauge",
			"Events in the outbox not yet delivered to Redis.", NULL, NULL,
			(double) billing_col_int64(0, 1, 0));
		d = billing_col(0, 2, &isnull);
		add(all, "billing_events_delivery_lag_seconds", "gauge",
			"Age of the oldest event not yet delivered (0 when none).", NULL, NULL,
			isnull ? 0 : interval_seconds(d));
	}

	/* the mirror (billing.sync_status: the worker's shared memory) */
	if (SPI_execute("SELECT enabled, worker_pid IS NOT NULL, connected, dirty_accounts, "
					"  pg_catalog.date_part('epoch', lag), pushed, failed, full_resyncs, repaired, "
					"  full_resync_pending, recent_lag_p99_ms "
					"FROM billing.sync_status", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing: reading billing.sync_status failed");
	if (SPI_processed == 1 && DatumGetBool(billing_col(0, 1, &isnull)))
	{
		Datum		d;

		add(all, "billing_mirror_worker_up", "gauge", "1 when the background worker runs.",
			NULL, NULL, DatumGetBool(billing_col(0, 2, &isnull)) ? 1 : 0);
		add(all, "billing_mirror_connected", "gauge", "1 when the worker holds a Redis connection.",
			NULL, NULL, DatumGetBool(billing_col(0, 3, &isnull)) ? 1 : 0);
		add(all, "billing_mirror_dirty_accounts", "gauge",
			"Accounts committed but not yet pushed to Redis.", NULL, NULL,
			(double) billing_col_int64(0, 4, 0));
		d = billing_col(0, 5, &isnull);
		add(all, "billing_mirror_lag_seconds", "gauge",
			"Age of the oldest committed change not yet in Redis (0 when none).", NULL, NULL,
			isnull ? 0 : DatumGetFloat8(d));
		add(all, "billing_mirror_pushes_total", "counter",
			"Account snapshots pushed to Redis since the server started.", NULL, NULL,
			(double) billing_col_int64(0, 6, 0));
		add(all, "billing_mirror_push_failures_total", "counter",
			"Pushes that failed since the server started.", NULL, NULL,
			(double) billing_col_int64(0, 7, 0));
		add(all, "billing_mirror_full_resyncs_total", "counter",
			"Full resyncs of every account since the server started.", NULL, NULL,
			(double) billing_col_int64(0, 8, 0));
		add(all, "billing_mirror_repairs_total", "counter",
			"Redis hashes the consistency check found different and rewrote.", NULL, NULL,
			(double) billing_col_int64(0, 9, 0));
		add(all, "billing_mirror_full_resync_pending", "gauge",
			"1 while a full resync is due or running.", NULL, NULL,
			DatumGetBool(billing_col(0, 10, &isnull)) ? 1 : 0);
		d = billing_col(0, 11, &isnull);
		if (!isnull)
			add(all, "billing_mirror_recent_lag_p99_seconds", "gauge",
				"Commit to Redis lag, 99th percentile of the last 1,024 pushes.", NULL, NULL,
				DatumGetFloat8(d) / 1000.0);
	}

	/* the counters (shared memory) */
	if (billing_events != NULL)
	{
		int64		lags[EVENTS_LAG_RING];
		int			nlags;
		int64		delivered;
		int64		failed;
		int64		pruned;
		TimestampTz last;

		for (int i = 0; i < MK_COUNT; i++)
			add(all, "billing_entries_total", "counter",
				"Ledger entries committed since the server started, by kind.", "kind",
				metric_entry_kinds[i], (double) pg_atomic_read_u64(&billing_events->entries[i]));
		add(all, "billing_charges_total", "counter",
			"Charges committed since the server started (debit entries: deduct, capture, debit adjustment).",
			NULL, NULL, (double) pg_atomic_read_u64(&billing_events->charges));
		for (int i = 0; i < METRIC_REFUSAL_CODES; i++)
			add(all, "billing_charge_refusals_total", "counter",
				"Charges and holds refused by a business rule since the server started, by SQLSTATE.",
				"sqlstate", metric_refusal_codes[i],
				(double) pg_atomic_read_u64(&billing_events->refusals[i]));
		for (int i = 0; i < METRIC_JOB_STATES; i++)
			add(all, "billing_job_transitions_total", "counter",
				"Job state changes committed since the server started, by the state entered.",
				"state", metric_job_states[i], (double) pg_atomic_read_u64(&billing_events->jobs[i]));
		for (int i = 0; i < METRIC_EVENT_TYPES; i++)
			add(all, "billing_events_written_total", "counter",
				"Events committed to the outbox since the server started, by type.", "type",
				metric_event_types[i], (double) pg_atomic_read_u64(&billing_events->written[i]));

		LWLockAcquire(billing_events->lock, LW_SHARED);
		delivered = billing_events->delivered;
		failed = billing_events->failed;
		pruned = billing_events->pruned;
		last = billing_events->last_delivered_at;
		nlags = Max(Min(billing_events->lag_count, EVENTS_LAG_RING), 0);
		memcpy(lags, billing_events->lag_us, sizeof(int64) * nlags);
		LWLockRelease(billing_events->lock);
		add(all, "billing_events_delivered_total", "counter",
			"Events delivered to Redis Streams since the server started.", NULL, NULL,
			(double) delivered);
		add(all, "billing_events_delivery_failures_total", "counter",
			"Event deliveries that failed (Redis errors) since the server started.", NULL, NULL,
			(double) failed);
		add(all, "billing_events_pruned_total", "counter",
			"Events removed from the outbox after billing.events_retention since the server started.",
			NULL, NULL, (double) pruned);
		if (last != 0)
			add(all, "billing_events_last_delivery_timestamp_seconds", "gauge",
				"When the worker last delivered events (Unix time).", NULL, NULL,
				(double) (last / USECS_PER_SEC) +
				(double) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY);
		if (nlags > 0)
		{
			qsort(lags, nlags, sizeof(int64), cmp_int64);
			add(all, "billing_events_recent_delivery_lag_p99_seconds", "gauge",
				"Event commit to stream lag, 99th percentile of the last 1,024 events delivered.",
				NULL, NULL, lags[Min(nlags - 1, (int) (nlags * 0.99))] / 1000000.0);
		}
	}
}

/* a label value in the exposition format: \ " and newline escaped */
static void
append_label_value(StringInfo buf, const char *v)
{
	for (const char *p = v; *p; p++)
	{
		if (*p == '\\' || *p == '"')
			appendStringInfoChar(buf, '\\');
		if (*p == '\n')
		{
			appendStringInfoString(buf, "\\n");
			continue;
		}
		appendStringInfoChar(buf, *p);
	}
}

static void
append_value(StringInfo buf, double v)
{
	if (v == (double) (int64) v && v > -1e15 && v < 1e15)
		appendStringInfo(buf, INT64_FORMAT, (int64) v);
	else
		appendStringInfo(buf, "%.9g", v);
}

/*
 * The metrics are sums over every tenant (accounts by status, open holds
 * per currency, charges and refusals): a session limited to some tenants
 * (billing_scope_role) must not read them.
 */
static void
refuse_scoped_caller(void)
{
	int			ntenants;

	if (billing_caller_scope(&ntenants))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("a session limited to some tenants cannot read the metrics"),
				 errdetail("The metrics sum over every tenant; this session may see %d tenant%s (billing_scope_role).",
						   ntenants, ntenants == 1 ? "" : "s"),
				 errhint("Read the metrics as a role without a tenant scope (billing_unscope_role() lifts one).")));
}

/*
 * billing_metrics() -> text: every sample in the Prometheus text exposition
 * format (version 0.0.4), one HELP and TYPE per family.
 */
Datum
billing_metrics(PG_FUNCTION_ARGS)
{
	Samples		all = {0};
	StringInfoData buf;
	MemoryContext outer;
	text	   *result;

	refuse_scoped_caller();
	outer = billing_spi_connect();
	collect(&all);
	initStringInfo(&buf);
	for (int i = 0; i < all.n; i++)
	{
		Sample	   *s = &all.s[i];

		if (i == 0 || strcmp(all.s[i - 1].name, s->name) != 0)
			appendStringInfo(&buf, "# HELP %s %s\n# TYPE %s %s\n", s->name, s->help,
							 s->name, s->type);
		appendStringInfoString(&buf, s->name);
		if (s->label)
		{
			appendStringInfo(&buf, "{%s=\"", s->label);
			append_label_value(&buf, s->label_value);
			appendStringInfoString(&buf, "\"}");
		}
		appendStringInfoChar(&buf, ' ');
		append_value(&buf, s->value);
		appendStringInfoChar(&buf, '\n');
	}
	result = (text *) MemoryContextAlloc(outer, VARHDRSZ + buf.len);
	SET_VARSIZE(result, VARHDRSZ + buf.len);
	memcpy(VARDATA(result), buf.data, buf.len);
	SPI_finish();
	PG_RETURN_TEXT_P(result);
}

/*
 * billing.metric_samples() -> TABLE (name, labels jsonb, value, type, help):
 * the same samples as rows (the view billing.metrics, postgres_exporter).
 */
Datum
billing_metric_samples(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Samples		all = {0};
	MemoryContext outer;

	refuse_scoped_caller();
	InitMaterializedSRF(fcinfo, 0);
	outer = billing_spi_connect();
	collect(&all);
	{
		MemoryContext old = MemoryContextSwitchTo(outer);

		for (int i = 0; i < all.n; i++)
		{
			Sample	   *s = &all.s[i];
			Datum		values[5];
			bool		nulls[5] = {0};
			StringInfoData labels;

			ej_begin(&labels);
			if (s->label)
				ej_str(&labels, s->label, s->label_value);
			ej_end(&labels);
			values[0] = CStringGetTextDatum(s->name);
			values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum(labels.data));
			values[2] = Float8GetDatum(s->value);
			values[3] = CStringGetTextDatum(s->type);
			values[4] = CStringGetTextDatum(s->help);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	return (Datum) 0;
}
