/*-------------------------------------------------------------------------
 *
 * sync.c
 *	  Change capture for the Redis mirror, and billing_sync_status().
 *
 * Every function that changes what the mirror shows (balance, holds,
 * status, limits, counters, keys) calls billing_sync_mark(tenant).  The
 * mark is kept in backend memory until the transaction ends: on COMMIT the
 * tenants are added to a hash table in shared memory (with the time of the
 * first unpushed commit) and the worker's latch is set, so the worker wakes
 * within milliseconds; on ABORT they are forgotten, so a rolled-back change
 * never reaches Redis.  The worker reads the committed state itself, in a
 * transaction of its own, so it can only ever publish committed data.
 *
 * Nothing is lost: if the shared table is full, or the worker or the server
 * restarts (shared memory is gone), the worker does a full resync of every
 * account; the version guard in Redis makes pushes idempotent and order
 * independent.  Without shared_preload_libraries there is no shared memory
 * and marking is a no-op (no worker either).  Commits in another database
 * than the worker's are not marked: the mirror shows one database.
 *
 * A transaction that changed billing state may be PREPAREd (Citus does so
 * for every node a distributed transaction wrote on): its marks wait in
 * shared memory under its transaction id until the worker sees it resolved
 * (prepare_marks, billing_sync_resolve_prepared).  Its COMMIT PREPARED may
 * run in any backend, and calls no callback: every commit while marks
 * wait sets the worker's latch, and the worker looks at them every cycle.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "billing.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/ipc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "sync.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

SyncShared *billing_sync = NULL;
HTAB	   *billing_sync_dirty = NULL;
int			billing_sync_max_dirty = 20000;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * Tenants changed by the current transaction (in TopTransactionContext): a
 * list, and beyond MARKS_LIST_MAX also a hash table for the duplicate check
 * (a batch may touch thousands of tenants).
 */
#define MARKS_LIST_MAX 16
static List *xact_marks = NIL;
static HTAB *xact_mark_set = NULL;
static bool xact_unmarkable = false;	/* a tenant id too long for the table */

static void
sync_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(SyncShared)));
	RequestAddinShmemSpace(hash_estimate_size(billing_sync_max_dirty, sizeof(SyncDirty)));
	RequestAddinShmemSpace(MAXALIGN(sizeof(SyncDirty *) * billing_sync_max_dirty));
	RequestAddinShmemSpace(MAXALIGN(sizeof(SyncPrepared) * SYNC_PREPARED_MAX));
	RequestNamedLWLockTranche("billing", 1);
}

static void
sync_shmem_startup(void)
{
	bool		found;
	HASHCTL		info;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	billing_sync = ShmemInitStruct("billing sync", sizeof(SyncShared), &found);
	if (!found)
	{
		memset(billing_sync, 0, sizeof(SyncShared));
		billing_sync->lock = &(GetNamedLWLockTranche("billing"))->lock;
		/* a fresh start knows nothing of what Redis has: resync everything */
		billing_sync->overflow = true;
		billing_sync->ring = ShmemAlloc(sizeof(SyncDirty *) * billing_sync_max_dirty);
		billing_sync->prepared = ShmemAlloc(sizeof(SyncPrepared) * SYNC_PREPARED_MAX);
	}
	info.keysize = sizeof(((SyncDirty *) NULL)->tenant);
	info.entrysize = sizeof(SyncDirty);
	billing_sync_dirty = ShmemInitHash("billing sync dirty tenants",
									   billing_sync_max_dirty, billing_sync_max_dirty,
									   &info, HASH_ELEM | HASH_STRINGS);
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Mark a tenant dirty in shared memory (caller holds billing_sync->lock
 * exclusively).  A tenant already dirty keeps its place and the older of
 * the two commit times.  When the set is full the mark is lost and a full
 * resync is requested instead; returns false then.
 */
bool
billing_sync_enqueue(const char *tenant, TimestampTz commit)
{
	bool		found;
	SyncDirty  *d;

	d = hash_search(billing_sync_dirty, tenant,
					billing_sync->ring_count < billing_sync_max_dirty ? HASH_ENTER_NULL : HASH_FIND,
					&found);
	if (d == NULL)
	{
		billing_sync->overflow = true;	/* full: resync */
		return false;
	}
	if (!found)
	{
		d->first_commit = commit;
		billing_sync->ring[(billing_sync->ring_head + billing_sync->ring_count) %
						   billing_sync_max_dirty] = d;
		billing_sync->ring_count++;
	}
	else if (commit < d->first_commit)
		d->first_commit = commit;
	return true;
}

/*
 * Take up to `max` dirty tenants, oldest first, out of the set (caller
 * holds billing_sync->lock exclusively); their ids are copied into cxt.
 */
int
billing_sync_dequeue(char **tenants, TimestampTz *commits, int max,
					 MemoryContext cxt)
{
	int			n = 0;

	while (n < max && billing_sync->ring_count > 0)
	{
		SyncDirty  *d = billing_sync->ring[billing_sync->ring_head];

		tenants[n] = MemoryContextStrdup(cxt, d->tenant);
		commits[n] = d->first_commit;
		hash_search(billing_sync_dirty, tenants[n], HASH_REMOVE, NULL);
		billing_sync->ring_head = (billing_sync->ring_head + 1) % billing_sync_max_dirty;
		billing_sync->ring_count--;
		n++;
	}
	return n;
}

/*
 * PREPARE TRANSACTION (Citus prepares the transaction of every node a
 * distributed transaction wrote on): the marks wait in shared memory,
 * under the transaction id, until the worker sees the transaction
 * resolved; pushed if it committed, dropped if it rolled back.  What does
 * not fit refuses the PREPARE (the transaction rolls back).
 */
static void
prepare_marks(void)
{
	TransactionId xid = GetTopTransactionIdIfAny();
	int			need = list_length(xact_marks) + (xact_unmarkable ? 1 : 0);
	ListCell   *lc;
	bool		fits;

	if (!TransactionIdIsValid(xid))
		return;					/* wrote nothing: nothing to push */
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	if (OidIsValid(billing_sync->database) && billing_sync->database != MyDatabaseId)
	{
		/* not the mirrored database (see the commit case below) */
		LWLockRelease(billing_sync->lock);
		return;
	}
	fits = billing_sync->nprepared + need <= SYNC_PREPARED_MAX;
	if (fits)
	{
		foreach(lc, xact_marks)
		{
			SyncPrepared *p = &billing_sync->prepared[billing_sync->nprepared++];

			p->xid = xid;
			strlcpy(p->tenant, lfirst(lc), SYNC_TENANT_LEN);
		}
		if (xact_unmarkable)
		{
			SyncPrepared *p = &billing_sync->prepared[billing_sync->nprepared++];

			p->xid = xid;
			p->tenant[0] = '\0';
		}
	}
	LWLockRelease(billing_sync->lock);
	if (!fits)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("too many billing accounts changed by prepared transactions"),
				 errdetail("Prepared transactions not yet committed or rolled back changed more than %d accounts.",
						   SYNC_PREPARED_MAX),
				 errhint("Commit or roll back prepared transactions (pg_prepared_xacts), or change fewer accounts per transaction.")));
}

/*
 * The worker: push the marks of prepared transactions that committed since,
 * forget those that rolled back.  Returns how many are still waiting.
 */
int
billing_sync_resolve_prepared(void)
{
	int			waiting;

	if (billing_sync->nprepared == 0)
		return 0;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	for (int i = 0; i < billing_sync->nprepared;)
	{
		SyncPrepared *p = &billing_sync->prepared[i];

		/* a prepared transaction is in progress until COMMIT/ROLLBACK PREPARED */
		if (TransactionIdIsInProgress(p->xid))
		{
			i++;
			continue;
		}
		if (TransactionIdDidCommit(p->xid))
		{
			if (p->tenant[0] == '\0')
				billing_sync->overflow = true;	/* full resync */
			else
				billing_sync_enqueue(p->tenant, GetCurrentTimestamp());
		}
		*p = billing_sync->prepared[--billing_sync->nprepared];
	}
	waiting = billing_sync->nprepared;
	LWLockRelease(billing_sync->lock);
	return waiting;
}

/*
 * A prepared transaction the worker knows nothing of (it was prepared
 * before a server restart): resync everything once it is resolved.
 */
void
billing_sync_track_prepared(TransactionId xid)
{
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	for (int i = 0; i < billing_sync->nprepared; i++)
		if (billing_sync->prepared[i].xid == xid)
		{
			LWLockRelease(billing_sync->lock);
			return;
		}
	if (billing_sync->nprepared < SYNC_PREPARED_MAX)
	{
		SyncPrepared *p = &billing_sync->prepared[billing_sync->nprepared++];

		p->xid = xid;
		p->tenant[0] = '\0';
	}
	else
		billing_sync->overflow = true;
	LWLockRelease(billing_sync->lock);
}

/* At commit, publish this transaction's marks; at abort, forget them. */
static void
sync_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;
	TimestampTz now;
	Latch	   *latch;

	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (billing_sync == NULL)
				break;
			if (xact_marks == NIL && !xact_unmarkable)
			{
				/*
				 * Perhaps a COMMIT PREPARED (it calls no callback of its
				 * own): let the worker look at the waiting marks.
				 */
				if (billing_sync->nprepared > 0 && billing_sync->worker_latch)
					SetLatch(billing_sync->worker_latch);
				break;
			}
			now = GetCurrentTimestamp();
			latch = NULL;
			LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
			if (!OidIsValid(billing_sync->database) ||
				billing_sync->database == MyDatabaseId)
			{
				if (xact_unmarkable)
					billing_sync->overflow = true;
				foreach(lc, xact_marks)
					billing_sync_enqueue(lfirst(lc), now);
				latch = billing_sync->worker_latch;
			}
			LWLockRelease(billing_sync->lock);
			if (latch)
				SetLatch(latch);
			break;
		case XACT_EVENT_PRE_PREPARE:
			if ((xact_marks != NIL || xact_unmarkable) && billing_sync != NULL)
				prepare_marks();
			break;
		default:
			break;
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
	{
		/* the memory goes with TopTransactionContext */
		xact_marks = NIL;
		xact_mark_set = NULL;
		xact_unmarkable = false;
	}
}

/* the set of a transaction's marks: keys are char *, compared by content */
static uint32
mark_hash(const void *key, Size keysize)
{
	const char *s = *(char *const *) key;

	return string_hash(s, strlen(s) + 1);
}

static int
mark_match(const void *key1, const void *key2, Size keysize)
{
	return strcmp(*(char *const *) key1, *(char *const *) key2);
}

/* Remember that this transaction changed the mirrored state of a tenant. */
void
billing_sync_mark(const char *tenant, int len)
{
	MemoryContext old;
	char	   *key;
	ListCell   *lc;

	if (billing_sync == NULL)
		return;
	if (len >= SYNC_TENANT_LEN)
	{
		xact_unmarkable = true;
		return;
	}
	old = MemoryContextSwitchTo(TopTransactionContext);
	key = pnstrdup(tenant, len);	/* not SYNC_TENANT_LEN: a batch may mark 10^5 */
	if (xact_mark_set == NULL)
	{
		foreach(lc, xact_marks)
			if (strcmp(lfirst(lc), key) == 0)
			{
				pfree(key);
				MemoryContextSwitchTo(old);
				return;
			}
		if (list_length(xact_marks) >= MARKS_LIST_MAX)
		{
			HASHCTL		info;

			/* entries are the list's strings (pointers), hashed by content */
			info.keysize = sizeof(char *);
			info.entrysize = sizeof(char *);
			info.hash = mark_hash;
			info.match = mark_match;
			info.hcxt = TopTransactionContext;
			xact_mark_set = hash_create("billing marks", 256, &info,
										HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
			foreach(lc, xact_marks)
			{
				char	   *mark = lfirst(lc);

				(void) hash_search(xact_mark_set, &mark, HASH_ENTER, NULL);
			}
		}
	}
	if (xact_mark_set != NULL)
	{
		bool		found;

		(void) hash_search(xact_mark_set, &key, HASH_ENTER, &found);
		if (found)
		{
			pfree(key);
			MemoryContextSwitchTo(old);
			return;
		}
	}
	xact_marks = lappend(xact_marks, key);
	MemoryContextSwitchTo(old);
}

void
billing_sync_init(void)
{
	RegisterXactCallback(sync_xact_callback, NULL);
	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = sync_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = sync_shmem_startup;
}

/* The worker's note of a failure, shown by billing_sync_status(). */
void
billing_sync_record_error(const char *fmt,...)
{
	va_list		ap;
	char		buf[SYNC_ERROR_LEN];

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (billing_sync == NULL)
		return;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	strlcpy(billing_sync->last_error, buf, sizeof(billing_sync->last_error));
	billing_sync->last_error_at = GetCurrentTimestamp();
	billing_sync->failed++;
	LWLockRelease(billing_sync->lock);
}

/* billing.sync_mark(tenant_id): for the SQL-level functions */
PG_FUNCTION_INFO_V1(billing_sync_mark_sql);
Datum
billing_sync_mark_sql(PG_FUNCTION_ARGS)
{
	text	   *t;

	if (PG_ARGISNULL(0))
		PG_RETURN_VOID();
	t = PG_GETARG_TEXT_PP(0);
	billing_sync_mark(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	PG_RETURN_VOID();
}

static int
cmp_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * billing_sync_status() -> one row: is the mirror alive and how far behind.
 * lag = age of the oldest committed change not yet in Redis (0 when none).
 */
PG_FUNCTION_INFO_V1(billing_sync_status);
Datum
billing_sync_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[17];
	bool		nulls[17] = {0};
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz oldest = 0;
	int64		dirty = 0;
	int64		lags[SYNC_LAG_RING];
	int			nlags;
	SyncShared	s;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);

	if (billing_sync == NULL)
	{
		/* not preloaded: no worker, no mirror */
		values[0] = BoolGetDatum(false);
		for (int i = 1; i < 17; i++)
			nulls[i] = true;
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
	}

	LWLockAcquire(billing_sync->lock, LW_SHARED);
	memcpy(&s, billing_sync, sizeof(s));
	{
		for (int i = 0; i < billing_sync->ring_count; i++)
		{
			SyncDirty  *d = billing_sync->ring[(billing_sync->ring_head + i) % billing_sync_max_dirty];

			dirty++;
			if (oldest == 0 || d->first_commit < oldest)
				oldest = d->first_commit;
		}
	}
	LWLockRelease(billing_sync->lock);

	if (s.inflight_oldest != 0 && (oldest == 0 || s.inflight_oldest < oldest))
		oldest = s.inflight_oldest;
	nlags = Max(Min(s.lag_count, SYNC_LAG_RING), 0);
	memcpy(lags, s.lag_us, sizeof(int64) * nlags);
	qsort(lags, nlags, sizeof(int64), cmp_int64);

	values[0] = BoolGetDatum(true);
	values[1] = Int32GetDatum(s.worker_pid);
	nulls[1] = s.worker_pid == 0;
	values[2] = BoolGetDatum(s.connected);
	values[3] = CStringGetTextDatum(s.redis_run_id);
	nulls[3] = s.redis_run_id[0] == '\0';
	values[4] = Int64GetDatum(dirty);
	values[5] = BoolGetDatum(s.overflow);
	values[6] = IntervalPGetDatum(DatumGetIntervalP(DirectFunctionCall2(timestamp_mi,
																		TimestampTzGetDatum(now),
																		TimestampTzGetDatum(oldest ? oldest : now))));
	values[7] = TimestampTzGetDatum(s.last_push_at);
	nulls[7] = s.last_push_at == 0;
	values[8] = Int64GetDatum(s.pushed);
	values[9] = Int64GetDatum(s.failed);
	values[10] = CStringGetTextDatum(s.last_error);
	nulls[10] = s.last_error[0] == '\0';
	values[11] = TimestampTzGetDatum(s.last_error_at);
	nulls[11] = s.last_error_at == 0;
	values[12] = TimestampTzGetDatum(s.last_full_resync_at);
	nulls[12] = s.last_full_resync_at == 0;
	values[13] = Int64GetDatum(s.full_resyncs);
	values[14] = Int64GetDatum(s.repaired);
	values[15] = Float8GetDatum(nlags ? lags[nlags / 2] / 1000.0 : 0);
	nulls[15] = nlags == 0;
	values[16] = Float8GetDatum(nlags ? lags[Min(nlags - 1, (int) (nlags * 0.99))] / 1000.0 : 0);
	nulls[16] = nlags == 0;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
