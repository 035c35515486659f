/*-------------------------------------------------------------------------
 *
 * sync.c
 *	  Change capture for the Redis mirror, and billing_sync_status().
 *
 * Every function that changes what the mirror shows (balance, holds,
 * status, limits, counters, keys) marks the tenant, and names the API keys
 * whose hashes it changed (billing_sync_mark_key): a tenant with 20,000 keys
 * must not have them all pushed for a charge through one of them.  The
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
#include "catalog/pg_type.h"
#include "events.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/ipc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "sync.h"
#include "utils/array.h"
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
 * list of marks, and beyond MARKS_LIST_MAX also a hash table for the
 * duplicate check (a batch may touch thousands of tenants).
 */
typedef struct SyncMark
{
	char	   *tenant;
	int64		since;			/* lowest account version a change started from */
	int64		scan_since;		/* find keys by version above it (SYNC_NO_SCAN: no) */
	List	   *keys;			/* ids of the keys named (char *) */
	int			keys_bytes;		/* their length, NULs included */
} SyncMark;

/* an entry of the mark set: the tenant id (hashed by content) and its mark */
typedef struct SyncMarkEntry
{
	char	   *tenant;
	SyncMark   *mark;
} SyncMarkEntry;

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

/* is `key` one of the NUL-terminated ids of buf[0 .. len)? */
static bool
keys_contain(const char *buf, int len, const char *key)
{
	for (int off = 0; off < len; off += strlen(buf + off) + 1)
		if (strcmp(buf + off, key) == 0)
			return true;
	return false;
}

/*
 * Mark a tenant dirty in shared memory (caller holds billing_sync->lock
 * exclusively), with the key hashes to push: scan_since and the named keys
 * (SyncDirty).  Keys that do not fit into the entry are found by version
 * instead: above `since`, the account version the change started from.  A
 * tenant already dirty keeps its place, the older of the two commit times,
 * and gets the union of what to push.  When the set is full the mark is
 * lost and a full resync is requested instead; returns false then.
 */
bool
billing_sync_enqueue(const char *tenant, TimestampTz commit, int64 scan_since,
					 int nkeys, char **keys, int64 since)
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
		d->scan_since = SYNC_NO_SCAN;
		d->keys_len = 0;
		billing_sync->ring[(billing_sync->ring_head + billing_sync->ring_count) %
						   billing_sync_max_dirty] = d;
		billing_sync->ring_count++;
	}
	else if (commit < d->first_commit)
		d->first_commit = commit;
	d->scan_since = Min(d->scan_since, scan_since);
	for (int i = 0; i < nkeys; i++)
	{
		int			len = strlen(keys[i]);

		if (keys_contain(d->keys, d->keys_len, keys[i]))
			continue;
		if (d->keys_len + len + 1 > SYNC_KEYS_LEN)
		{
			d->scan_since = Min(d->scan_since, since);
			continue;
		}
		memcpy(d->keys + d->keys_len, keys[i], len + 1);
		d->keys_len += len + 1;
	}
	return true;
}

/*
 * Take up to `max` dirty tenants, oldest first, out of the set (caller
 * holds billing_sync->lock exclusively); their ids and keys are copied
 * into cxt.
 */
int
billing_sync_dequeue(SyncWant *wants, int max, MemoryContext cxt)
{
	int			n = 0;

	while (n < max && billing_sync->ring_count > 0)
	{
		SyncDirty  *d = billing_sync->ring[billing_sync->ring_head];
		SyncWant   *w = &wants[n];
		int			k = 0;

		memset(w, 0, sizeof(SyncWant));
		w->tenant = MemoryContextStrdup(cxt, d->tenant);
		w->first_commit = d->first_commit;
		w->scan_since = d->scan_since;
		for (int off = 0; off < d->keys_len; off += strlen(d->keys + off) + 1)
			w->nkeys++;
		w->keys = MemoryContextAlloc(cxt, sizeof(char *) * Max(w->nkeys, 1));
		for (int off = 0; off < d->keys_len; off += strlen(d->keys + off) + 1)
			w->keys[k++] = MemoryContextStrdup(cxt, d->keys + off);
		hash_search(billing_sync_dirty, w->tenant, HASH_REMOVE, NULL);
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
			SyncMark   *m = lfirst(lc);
			SyncPrepared *p = &billing_sync->prepared[billing_sync->nprepared++];

			p->xid = xid;
			strlcpy(p->tenant, m->tenant, SYNC_TENANT_LEN);
			/* named keys: found by version instead, as when they overflow */
			p->scan_since = m->keys != NIL ? Min(m->scan_since, m->since) : m->scan_since;
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
				billing_sync_enqueue(p->tenant, GetCurrentTimestamp(),
									 p->scan_since, 0, NULL, p->scan_since);
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
				{
					SyncMark   *m = lfirst(lc);
					char	   *keys[SYNC_KEYS_LEN / 2];
					int			nkeys = 0;
					ListCell   *kc;

					foreach(kc, m->keys)
						keys[nkeys++] = lfirst(kc);
					billing_sync_enqueue(m->tenant, now, m->scan_since, nkeys, keys, m->since);
				}
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

/* this transaction's mark of a tenant, created if new; NULL if unmarkable */
static SyncMark *
get_mark(const char *tenant, int len)
{
	MemoryContext old;
	SyncMark   *m;
	char	   *key;
	ListCell   *lc;

	if (billing_sync == NULL)
		return NULL;
	if (len >= SYNC_TENANT_LEN)
	{
		xact_unmarkable = true;
		return NULL;
	}
	old = MemoryContextSwitchTo(TopTransactionContext);
	key = pnstrdup(tenant, len);	/* not SYNC_TENANT_LEN: a batch may mark 10^5 */
	if (xact_mark_set == NULL)
	{
		foreach(lc, xact_marks)
		{
			m = lfirst(lc);
			if (strcmp(m->tenant, key) == 0)
			{
				pfree(key);
				MemoryContextSwitchTo(old);
				return m;
			}
		}
		if (list_length(xact_marks) >= MARKS_LIST_MAX)
		{
			HASHCTL		info;

			/* entries point at the marks' strings, hashed by content */
			info.keysize = sizeof(char *);
			info.entrysize = sizeof(SyncMarkEntry);
			info.hash = mark_hash;
			info.match = mark_match;
			info.hcxt = TopTransactionContext;
			xact_mark_set = hash_create("billing marks", 256, &info,
										HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
			foreach(lc, xact_marks)
			{
				SyncMark   *each = lfirst(lc);
				SyncMarkEntry *e = hash_search(xact_mark_set, &each->tenant, HASH_ENTER, NULL);

				e->mark = each;
			}
		}
	}
	if (xact_mark_set != NULL)
	{
		bool		found;
		SyncMarkEntry *e = hash_search(xact_mark_set, &key, HASH_ENTER, &found);

		if (found)
		{
			pfree(key);
			MemoryContextSwitchTo(old);
			return e->mark;
		}
		m = palloc0(sizeof(SyncMark));
		e->mark = m;
	}
	else
		m = palloc0(sizeof(SyncMark));
	m->tenant = key;
	m->since = PG_INT64_MAX;
	m->scan_since = SYNC_NO_SCAN;
	xact_marks = lappend(xact_marks, m);
	MemoryContextSwitchTo(old);
	return m;
}

/*
 * Remember that this transaction changed the mirrored state of a tenant
 * whose account was at version `since` before the change (the API keys it
 * changed are marked with billing_sync_mark_key).
 */
void
billing_sync_mark_account(const char *tenant, int len, int64 since)
{
	SyncMark   *m = get_mark(tenant, len);

	if (m != NULL)
		m->since = Min(m->since, since);
}

/* ... and the hash of one of its API keys (changed from account version since on) */
void
billing_sync_mark_key(const char *tenant, int len, const char *key, int keylen,
					  int64 since)
{
	SyncMark   *m = get_mark(tenant, len);
	ListCell   *lc;
	MemoryContext old;

	if (m == NULL)
		return;
	m->since = Min(m->since, since);
	if (m->scan_since <= m->since)
		return;					/* found by version anyway */
	foreach(lc, m->keys)
	{
		const char *k = lfirst(lc);

		if (strlen(k) == keylen && memcmp(k, key, keylen) == 0)
			return;
	}
	if (m->keys_bytes + keylen + 1 > SYNC_KEYS_LEN)
	{
		/* too many to name: by version, from the first change on */
		m->scan_since = m->since;
		return;
	}
	old = MemoryContextSwitchTo(TopTransactionContext);
	m->keys = lappend(m->keys, pnstrdup(key, keylen));
	m->keys_bytes += keylen + 1;
	MemoryContextSwitchTo(old);
}

/*
 * Remember that this transaction changed the mirrored state of a tenant,
 * maybe of any of its keys (the SQL-level billing.sync_mark(tenant), which
 * cannot say which): every key hash is pushed.
 */
void
billing_sync_mark(const char *tenant, int len)
{
	SyncMark   *m = get_mark(tenant, len);

	if (m != NULL)
		m->scan_since = SYNC_SCAN_ALL;
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

/*
 * The worker's note of a failure, shown by billing_sync_status(); cut to
 * whole characters (a tenant id or a message may be multibyte).
 */
void
billing_sync_record_error(const char *fmt,...)
{
	va_list		ap;
	char		buf[SYNC_ERROR_LEN];
	int			len;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	len = strlen(buf);
	buf[pg_mbcliplen(buf, len, len)] = '\0';
	if (billing_sync == NULL)
		return;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	strlcpy(billing_sync->last_error, buf, sizeof(billing_sync->last_error));
	billing_sync->last_error_at = GetCurrentTimestamp();
	billing_sync->failed++;
	LWLockRelease(billing_sync->lock);
}

/*
 * billing.sync_mark(tenant_id): for the SQL-level functions of 1.3, which
 * cannot say which keys they changed (every key hash is pushed).
 */
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

/*
 * billing.sync_mark_keys(tenant_id, since, key_ids): the SQL-level
 * functions' mark.  since: the account version the transaction found
 * (before its change); key_ids: the keys whose hashes it changed ('{}':
 * none), NULL: every key it changed, found by version (api_keys.version >
 * since), e.g. all of them after a time zone change.
 */
PG_FUNCTION_INFO_V1(billing_sync_mark_keys_sql);
Datum
billing_sync_mark_keys_sql(PG_FUNCTION_ARGS)
{
	text	   *t;
	int64		since;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_VOID();
	t = PG_GETARG_TEXT_PP(0);
	since = PG_GETARG_INT64(1);
	billing_sync_mark_account(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), since);
	if (PG_ARGISNULL(2))
	{
		SyncMark   *m = get_mark(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));

		if (m != NULL)
			m->scan_since = Min(m->scan_since, since);
	}
	else
	{
		Datum	   *elems;
		bool	   *enulls;
		int			n;

		deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &enulls, &n);
		for (int i = 0; i < n; i++)
		{
			text	   *k;

			if (enulls[i])
				continue;
			k = DatumGetTextPP(elems[i]);
			billing_sync_mark_key(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t),
								  VARDATA_ANY(k), VARSIZE_ANY_EXHDR(k), since);
		}
	}
	PG_RETURN_VOID();
}

static int
cmp_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* billing.sync_info: the mirror's columns (1.3), then the events' (1.4) */
#define SYNC_MIRROR_COLS	17
#define SYNC_STATUS_COLS	25

/*
 * billing_sync_status() -> one row: is the mirror alive and how far behind.
 * lag = age of the oldest committed change not yet in Redis (0 when none).
 */
PG_FUNCTION_INFO_V1(billing_sync_status);
Datum
billing_sync_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[SYNC_STATUS_COLS];
	bool		nulls[SYNC_STATUS_COLS] = {0};
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz oldest = 0;
	int64		dirty = 0;
	int64		lags[SYNC_LAG_RING];
	int			nlags;
	SyncShared	s;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	if (tupdesc->natts > SYNC_STATUS_COLS)
		elog(ERROR, "billing: billing.sync_info has more columns than this library knows");
	/* 1.4: the events' columns after the mirror's (metrics.c) */
	if (tupdesc->natts > SYNC_MIRROR_COLS)
		metrics_sync_status(values + SYNC_MIRROR_COLS, nulls + SYNC_MIRROR_COLS,
							tupdesc->natts - SYNC_MIRROR_COLS, billing_caller_scope(NULL));

	if (billing_sync == NULL)
	{
		/* not preloaded: no worker, no mirror */
		values[0] = BoolGetDatum(false);
		for (int i = 1; i < SYNC_MIRROR_COLS; i++)
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
	values[5] = BoolGetDatum(s.overflow || s.resync_pending);
	values[6] = IntervalPGetDatum(DatumGetIntervalP(DirectFunctionCall2(timestamp_mi,
																		TimestampTzGetDatum(now),
																		TimestampTzGetDatum(oldest ? oldest : now))));
	values[7] = TimestampTzGetDatum(s.last_push_at);
	nulls[7] = s.last_push_at == 0;
	values[8] = Int64GetDatum(s.pushed);
	values[9] = Int64GetDatum(s.failed);
	values[10] = CStringGetTextDatum(s.last_error);
	/* it may name a tenant ("push failed for tenant ..."): not for a scoped role */
	nulls[10] = s.last_error[0] == '\0' || billing_caller_scope(NULL);
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
