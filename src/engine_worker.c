/*-------------------------------------------------------------------------
 *
 * engine_worker.c
 *	  A charge engine worker: takes the charges queued for it (engine.h),
 *	  applies them as one batch and commits once.
 *
 * A batch: everything queued for this worker when it looks (no waiting for
 * more: a lone caller's charge is applied at once, and while a batch
 * commits the next one gathers), plus the charges of tenants it had to put
 * off.  Sorted by tenant (a global lock order, as billing_deduct_many's),
 * then by arrival; each tenant's charges are one group for
 * ledger_post_many: one account lock, the charges applied in order (every
 * limit checked against the account as the charges before left it), one
 * entry each, one account write.  Then one commit for the whole batch, and
 * each caller is woken with its own result.
 *
 * One bad charge never fails the others: rejections, trace id conflicts,
 * unknown accounts, an event time outside the window and the reserved usage
 * key in metadata are outcomes, not errors (POST_RETURN).  Any other error
 * (an unknown API key, a DBA's trigger that raises, ...) aborts the
 * transaction; the charge that raised it (ledger_item) gets the error and
 * the batch is applied again without it.  An error that cannot be pinned
 * on a charge (at commit) makes the batch run one tenant per transaction.
 * A serialization failure, deadlock or cancel is retried as it is.
 *
 * An account locked by another transaction (a billing_deduct in progress)
 * is not waited for: its charges wait for the next batch, so one tenant
 * never holds up the others; after billing.engine_lock_wait ms the engine
 * does wait for it.
 *
 * The worker connects as the bootstrap superuser, pins the settings the
 * Redis worker pins (search_path, time zone, ...), and applies each batch
 * as the extension's owner, as the SECURITY DEFINER billing_deduct does;
 * entries record the role of the caller (billing.actor()).  It stops after
 * billing.engine_idle_timeout without work; a caller starts it again.  On
 * SIGTERM (or any exit) the callers of the batch in progress get ZB111
 * (outcome unknown: retry with the same trace id); those still queued are
 * served by a new worker.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "engine.h"
#include "ledger.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

extern void billing_pin_settings(void);

/* one charge of a batch */
typedef struct EngineItem
{
	int			slot;
	uint64		seq;
	text	   *tenant;
	LedgerRequest req;
	LedgerOutcome out;
	ErrorData  *error;			/* failed alone: its error */
	bool		deferred;		/* its account was busy: next batch */
	TimestampTz first_deferred; /* 0: never deferred */
} EngineItem;

static int	my_engine = -1;
static uint32 my_generation;

/* the slots this worker has TAKEN (for its exit callback) */
static int *inflight;
static int	ninflight = 0;

/* charges put off to the next batch (in carry_cxt) */
static EngineItem *carried = NULL;
static int	ncarried = 0;
static MemoryContext carry_cxt = NULL;

/* error attribution while a batch runs */
static int	cur_group = -1;

/* items carried over into the batch being taken (take_batch) */
static int	ncarried_taken = 0;

#define MAX_ATTEMPTS_TRANSIENT	3

/* ---------------------------------------------------------------------
 * registry and exit
 * ---------------------------------------------------------------------
 */

/*
 * On any exit: the callers whose charges we had taken learn that the
 * outcome is unknown; the entry goes back to NONE and the callers still
 * queued are woken to start a new worker.
 */
static void
engine_exit(int code, Datum arg)
{
	EngineInfo *info;

	if (my_engine < 0 || billing_engine == NULL)
		return;
	info = &billing_engine->engines[my_engine];
	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	for (int k = 0; k < ninflight; k++)
	{
		EngineSlot *slot = engine_slot(inflight[k]);

		if (slot->state != SLOT_TAKEN)
			continue;
		if (slot->abandoned)
		{
			slot->state = SLOT_FREE;
			slot->abandoned = false;
			slot->latch = NULL;
			slot->next = billing_engine->free_head;
			billing_engine->free_head = inflight[k];
			billing_engine->nfree++;
			continue;
		}
		slot->result = RESULT_UNKNOWN;
		pg_write_barrier();
		slot->state = SLOT_DONE;
		if (slot->latch)
			SetLatch(slot->latch);
	}
	ninflight = 0;
	if (info->generation == my_generation)
	{
		info->state = ENGINE_NONE;
		info->pid = 0;
		info->latch = NULL;
		engine_wake_queued(my_engine);
	}
	LWLockRelease(billing_engine->lock);
	ConditionVariableBroadcast(&billing_engine->slot_freed);
	my_engine = -1;
}

/* ---------------------------------------------------------------------
 * taking a batch
 * ---------------------------------------------------------------------
 */
static text *
copy_text(const char *p, int len)
{
	text	   *t = palloc(VARHDRSZ + len);

	SET_VARSIZE(t, VARHDRSZ + len);
	memcpy(VARDATA(t), p, len);
	return t;
}

/* a queued request as an item (in the current memory context) */
static void
item_from_slot(EngineItem *it, int i)
{
	EngineSlot *slot = engine_slot(i);
	EntryWrite *e = &it->req.entry;
	int			off = 0;

	memset(it, 0, sizeof(*it));
	it->slot = i;
	it->seq = slot->seq;
	it->tenant = copy_text(slot->data + off, slot->tenant_len);
	off += slot->tenant_len;
	it->req.is_debit = true;
	e->amount = slot->amount;
	e->kind = pstrdup(slot->kind);
	e->trace_id = copy_text(slot->data + off, slot->trace_len);
	off += slot->trace_len;
	if (slot->description_len >= 0)
	{
		e->description = copy_text(slot->data + off, slot->description_len);
		off += slot->description_len;
	}
	e->metadata = palloc(slot->metadata_len);
	memcpy(e->metadata, slot->data + off, slot->metadata_len);
	off += slot->metadata_len;
	if (slot->api_key_len >= 0)
	{
		e->api_key = copy_text(slot->data + off, slot->api_key_len);
		off += slot->api_key_len;
	}
	e->has_event_at = slot->has_event_at;
	e->event_at = slot->event_at;
	e->has_event_at_window = true;
	e->event_at_window = slot->event_at_window;
	e->actor = cstring_to_text(slot->actor);
	if (slot->usage_mark)
		it->req.usage_mark = "metadata";
}

/* a deep copy of an item put off (its request only) */
static void
item_copy(EngineItem *dst, EngineItem *src)
{
	EntryWrite *d = &dst->req.entry;
	EntryWrite *s = &src->req.entry;

	memset(dst, 0, sizeof(*dst));
	dst->slot = src->slot;
	dst->seq = src->seq;
	dst->first_deferred = src->first_deferred;
	dst->tenant = DatumGetTextPCopy(PointerGetDatum(src->tenant));
	dst->req.is_debit = true;
	d->amount = s->amount;
	d->kind = pstrdup(s->kind);
	d->trace_id = DatumGetTextPCopy(PointerGetDatum(s->trace_id));
	d->description = s->description ? DatumGetTextPCopy(PointerGetDatum(s->description)) : NULL;
	d->metadata = DatumGetJsonbPCopy(PointerGetDatum(s->metadata));
	d->api_key = s->api_key ? DatumGetTextPCopy(PointerGetDatum(s->api_key)) : NULL;
	d->has_event_at = s->has_event_at;
	d->event_at = s->event_at;
	d->has_event_at_window = s->has_event_at_window;
	d->event_at_window = s->event_at_window;
	d->actor = DatumGetTextPCopy(PointerGetDatum(s->actor));
	dst->req.usage_mark = src->req.usage_mark;	/* a constant */
}

/*
 * Take everything queued for us (TAKEN from now on) and add the items put
 * off before: the batch, in the current memory context.
 */
static int
take_batch(EngineItem **out)
{
	EngineInfo *info = &billing_engine->engines[my_engine];
	int		   *taken = palloc(sizeof(int) * billing_engine_queue_size);
	int			ntaken = 0;
	EngineItem *items;
	int			n = 0;

	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	for (int i = info->head; i >= 0; i = engine_slot(i)->next)
	{
		engine_slot(i)->state = SLOT_TAKEN;
		taken[ntaken++] = i;
		/* answered by engine_exit from now on, even if a palloc below fails */
		inflight[ninflight++] = i;
	}
	info->head = info->tail = -1;
	info->queued = 0;
	LWLockRelease(billing_engine->lock);

	/* the slots are ours now: read them without the lock */
	items = palloc(sizeof(EngineItem) * Max(ntaken + ncarried, 1));
	for (int k = 0; k < ncarried; k++)
		item_copy(&items[n++], &carried[k]);
	for (int k = 0; k < ntaken; k++)
		item_from_slot(&items[n++], taken[k]);
	ncarried_taken = ncarried;
	ncarried = 0;
	carried = NULL;
	MemoryContextReset(carry_cxt);
	*out = items;
	return n;
}

/* ---------------------------------------------------------------------
 * applying a batch
 * ---------------------------------------------------------------------
 */
static int
cmp_items(const void *a, const void *b)
{
	const EngineItem *x = (const EngineItem *) a;
	const EngineItem *y = (const EngineItem *) b;
	int			c = ledger_tenant_cmp(x->tenant, y->tenant);

	if (c != 0)
		return c;
	return x->seq < y->seq ? -1 : x->seq > y->seq ? 1 : 0;
}

typedef struct TenantGroup
{
	int			start;			/* items[start .. start + n - 1] */
	int			n;				/* of which the failed ones are left out */
	bool		deferred;
} TenantGroup;

/*
 * The extension's owner: the batch runs as it, as SECURITY DEFINER would.
 * Read from pg_extension at most once a second (a catalog scan per batch
 * cost more than a small batch's charges).
 */
static Oid
extension_owner(void)
{
	static Oid	cached = InvalidOid;
	static TimestampTz cached_at = 0;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			owner = InvalidOid;
	TimestampTz now = GetCurrentTimestamp();

	if (OidIsValid(cached) && !TimestampDifferenceExceeds(cached_at, now, 1000))
		return cached;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("billing"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	if (!OidIsValid(owner))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ENGINE_UNAVAILABLE),
				 errmsg("extension \"billing\" is not installed in this database"),
				 errhint("CREATE EXTENSION billing first.")));
	cached = owner;
	cached_at = now;
	return owner;
}

/*
 * Apply the groups [from, to) in the current transaction.  A group whose
 * account is busy is deferred (unless its oldest charge has waited
 * billing.engine_lock_wait already: then we wait for the lock).
 */
static void
apply_groups(EngineItem *items, TenantGroup *groups, int from, int to,
			 TimestampTz now)
{
	LedgerRequest **reqs = palloc(sizeof(LedgerRequest *) * 1);
	LedgerOutcome **outs = palloc(sizeof(LedgerOutcome *) * 1);
	int			max = 1;

	for (int g = from; g < to; g++)
	{
		TenantGroup	   *grp = &groups[g];
		int			n = 0;
		bool		nowait = true;

		grp->deferred = false;
		if (grp->n > max)
		{
			max = grp->n;
			reqs = repalloc(reqs, sizeof(LedgerRequest *) * max);
			outs = repalloc(outs, sizeof(LedgerOutcome *) * max);
		}
		for (int k = grp->start; k < grp->start + grp->n; k++)
		{
			EngineItem *it = &items[k];

			if (it->error)
				continue;
			if (it->first_deferred != 0 &&
				TimestampDifferenceExceeds(it->first_deferred, now, billing_engine_lock_wait))
				nowait = false;
			reqs[n] = &it->req;
			outs[n] = &it->out;
			n++;
		}
		if (n == 0)
			continue;
		cur_group = g;
		PushActiveSnapshot(GetTransactionSnapshot());
		if (!ledger_post_many(items[grp->start].tenant, reqs, outs, n, POST_RETURN, nowait))
			grp->deferred = true;
		PopActiveSnapshot();
		cur_group = -1;
	}
}

/* an error, attributed to one item or to every item of a group */
static void
attribute_error(EngineItem *items, TenantGroup *grp, int item, ErrorData *edata)
{
	int			seen = 0;

	for (int k = grp->start; k < grp->start + grp->n; k++)
	{
		if (items[k].error)
			continue;
		if (item < 0 || seen == item)
			items[k].error = edata;
		seen++;
	}
}

/* has every charge of the group failed? */
static bool
group_failed(EngineItem *items, TenantGroup *grp)
{
	for (int k = grp->start; k < grp->start + grp->n; k++)
		if (items[k].error == NULL)
			return false;
	return true;
}

static bool
transient_error(ErrorData *edata)
{
	return ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_TRANSACTION_ROLLBACK ||
		edata->sqlerrcode == ERRCODE_QUERY_CANCELED ||
		edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
}

/*
 * Apply groups [from, to) in one transaction and commit it.  False after an
 * error: *edata is it, *group and *item (index among the group's unfailed
 * items, -1: the group as a whole) where it happened, -1 if outside.
 */
static bool
run_transaction(EngineItem *items, TenantGroup *groups, int from, int to,
				ErrorData **edata, int *group, int *item)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	*edata = NULL;
	*group = -1;
	*item = -1;
	cur_group = -1;
	ledger_item = -1;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	/* outcomes and their strings outlive the transaction: the batch's memory */
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		Oid			owner = extension_owner();
		Oid			save_user;
		int			save_sec;

		GetUserIdAndSecContext(&save_user, &save_sec);
		SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE);
		apply_groups(items, groups, from, to, GetCurrentTimestamp());
		SetUserIdAndSecContext(save_user, save_sec);
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		*edata = CopyErrorData();
		FlushErrorState();
		*group = cur_group;
		*item = cur_group >= 0 ? ledger_item : -1;
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	cur_group = -1;
	ledger_item = -1;
	return ok;
}

static void
apply_batch(EngineItem *items, int n, TenantGroup **groups_out, int *ngroups_out,
			int *retries)
{
	TenantGroup	   *groups = palloc(sizeof(TenantGroup) * Max(n, 1));
	int			ngroups = 0;
	int			transient = 0;
	bool		isolate = false;

	qsort(items, n, sizeof(EngineItem), cmp_items);
	for (int k = 0; k < n; k++)
	{
		if (ngroups > 0 &&
			VARSIZE_ANY_EXHDR(items[k].tenant) == VARSIZE_ANY_EXHDR(items[groups[ngroups - 1].start].tenant) &&
			memcmp(VARDATA_ANY(items[k].tenant), VARDATA_ANY(items[groups[ngroups - 1].start].tenant),
				   VARSIZE_ANY_EXHDR(items[k].tenant)) == 0)
			groups[ngroups - 1].n++;
		else
		{
			groups[ngroups].start = k;
			groups[ngroups].n = 1;
			groups[ngroups].deferred = false;
			ngroups++;
		}
	}
	*groups_out = groups;
	*ngroups_out = ngroups;
	*retries = 0;

	for (;;)
	{
		ErrorData  *edata;
		int			group;
		int			item;

		if (!isolate)
		{
			if (run_transaction(items, groups, 0, ngroups, &edata, &group, &item))
				return;
		}
		else
		{
			/* one transaction per tenant: an error is that tenant's */
			for (int g = 0; g < ngroups; g++)
			{
				int			attempts = 0;

				while (!group_failed(items, &groups[g]) &&
					   !run_transaction(items, groups, g, g + 1, &edata, &group, &item))
				{
					(*retries)++;
					if (transient_error(edata) && ++attempts < MAX_ATTEMPTS_TRANSIENT)
						continue;
					attribute_error(items, &groups[g], group == g ? item : -1, edata);
				}
			}
			return;
		}

		(*retries)++;
		if (transient_error(edata) && ++transient < MAX_ATTEMPTS_TRANSIENT)
			continue;
		if (group >= 0)
			attribute_error(items, &groups[group], item, edata);
		else
			isolate = true;
		ereport(DEBUG1,
				(errmsg_internal("billing charge engine: a batch of %d charges is applied again after: %s",
								 n, edata->message)));
	}
}

/* ---------------------------------------------------------------------
 * results
 * ---------------------------------------------------------------------
 */

/* copy s (at most max bytes, cut at a character boundary) into the slot */
static int
put_text(EngineSlot *slot, int off, const char *s, int max)
{
	int			len = strlen(s);

	if (len > max)
		len = pg_mbcliplen(s, len, max);
	memcpy(slot->data + off, s, len);
	return len;
}

static void
write_result(EngineItem *it)
{
	EngineSlot *slot = engine_slot(it->slot);
	int			sqlerrcode;
	const char *message;
	const char *detail;
	const char *hint;

	if (it->error == NULL && it->out.committed)
	{
		slot->result = RESULT_CHARGED;
		slot->replayed = it->out.replayed;
		slot->entry_id = it->out.id;
		slot->out_amount = it->out.amount;
		slot->balance_after = it->out.balance_after;
		slot->version = it->out.version;
		slot->created_at = it->out.created_at;
		strlcpy(slot->out_kind, it->out.kind ? it->out.kind : "", sizeof(slot->out_kind));
		return;
	}
	if (it->error)
	{
		sqlerrcode = it->error->sqlerrcode;
		message = it->error->message ? it->error->message : "unknown error";
		detail = it->error->detail;
		hint = it->error->hint;
	}
	else
	{
		sqlerrcode = it->out.rejection.sqlerrcode;
		message = it->out.rejection.message;
		detail = it->out.rejection.detail;
		hint = it->out.rejection.hint;
	}
	slot->result = RESULT_ERROR;
	slot->refused = it->error == NULL && it->out.refused;
	slot->sqlerrcode = sqlerrcode;
	slot->message_len = put_text(slot, 0, message, ENGINE_MESSAGE_BYTES);
	slot->detail_len = detail ? put_text(slot, slot->message_len, detail, ENGINE_DETAIL_BYTES) : -1;
	slot->hint_len = hint ? put_text(slot, slot->message_len + Max(slot->detail_len, 0), hint,
									 ENGINE_HINT_BYTES) : -1;
}

/*
 * Hand every result of the batch over, and keep the items put off for the
 * next one (copied into carry_cxt).
 */
static void
deliver(EngineItem *items, int n, TenantGroup *groups, int ngroups, int retries)
{
	EngineInfo *info = &billing_engine->engines[my_engine];
	Latch	  **latches = palloc(sizeof(Latch *) * Max(n, 1));
	int			nlatches = 0;
	int			delivered = 0;
	int			deferrals = 0;
	bool		freed = false;
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext old;

	/* the results first, then publish them under the lock */
	for (int g = 0; g < ngroups; g++)
		for (int k = groups[g].start; k < groups[g].start + groups[g].n; k++)
		{
			if (groups[g].deferred && items[k].error == NULL)
			{
				items[k].deferred = true;
				continue;
			}
			write_result(&items[k]);
		}
	pg_write_barrier();

	old = MemoryContextSwitchTo(carry_cxt);
	carried = palloc(sizeof(EngineItem) * Max(n, 1));
	MemoryContextSwitchTo(old);

	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	for (int k = 0; k < n; k++)
	{
		EngineSlot *slot = engine_slot(items[k].slot);

		if (items[k].deferred)
			continue;
		delivered++;
		if (slot->abandoned)
		{
			slot->state = SLOT_FREE;
			slot->abandoned = false;
			slot->latch = NULL;
			slot->next = billing_engine->free_head;
			billing_engine->free_head = items[k].slot;
			billing_engine->nfree++;
			freed = true;
			continue;
		}
		slot->state = SLOT_DONE;
		if (slot->latch)
			latches[nlatches++] = slot->latch;
	}
	for (int g = 0; g < ngroups; g++)
		if (groups[g].deferred)
			deferrals++;
	info->batches++;
	info->charges += delivered;
	info->largest_batch = Max(info->largest_batch, n);
	info->retries += retries;
	info->deferrals += deferrals;
	info->last_batch_at = now;
	LWLockRelease(billing_engine->lock);

	for (int k = 0; k < nlatches; k++)
		SetLatch(latches[k]);
	if (freed)
		ConditionVariableBroadcast(&billing_engine->slot_freed);

	/* what is still in flight: the items put off (recorded before a palloc) */
	ninflight = 0;
	for (int k = 0; k < n; k++)
		if (items[k].deferred)
			inflight[ninflight++] = items[k].slot;
	old = MemoryContextSwitchTo(carry_cxt);
	for (int k = 0; k < n; k++)
		if (items[k].deferred)
		{
			if (items[k].first_deferred == 0)
				items[k].first_deferred = now;
			item_copy(&carried[ncarried++], &items[k]);
		}
	MemoryContextSwitchTo(old);
}

/* ---------------------------------------------------------------------
 * gathering
 * ---------------------------------------------------------------------
 */

/*
 * The sizes of the last batches: how many callers charge at once.  A lone
 * caller's charge is never held back (its batches are of one), so the
 * engine adds no wait at one client.
 */
#define RECENT_BATCHES 16
static int	recent[RECENT_BATCHES];
static int	recent_next = 0;

static void
note_batch(int n)
{
	recent[recent_next] = n;
	recent_next = (recent_next + 1) % RECENT_BATCHES;
}

/*
 * Wait (at most billing.engine_gather ms) until as many charges are
 * queued as the largest of the last batches had: the callers of the last
 * batch come back with their next charges while we would otherwise commit
 * a batch of one or two.  Fewer, larger batches: fewer commits and wake-ups
 * per charge, for at most that much more latency.
 */
static void
gather(EngineInfo *info)
{
	int			want = 0;
	TimestampTz deadline;

	for (int i = 0; i < RECENT_BATCHES; i++)
		want = Max(want, recent[i]);
	if (want <= 1)
		return;
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), billing_engine_gather);
	for (;;)
	{
		int			queued;

		LWLockAcquire(billing_engine->lock, LW_SHARED);
		queued = info->queued;
		LWLockRelease(billing_engine->lock);
		if (queued + ncarried >= want || GetCurrentTimestamp() >= deadline)
			return;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		/* nothing is taken yet: a cancel means nothing here (see the main loop) */
		QueryCancelPending = false;
		CHECK_FOR_INTERRUPTS();
	}
}

/* ---------------------------------------------------------------------
 * main loop
 * ---------------------------------------------------------------------
 */
void
billing_engine_main(Datum arg)
{
	EngineInfo *info;
	Oid			database;
	MemoryContext batch_cxt;
	TimestampTz idle_since;
	bool		ok;

	my_engine = DatumGetInt32(arg);
	memcpy(&my_generation, MyBgworkerEntry->bgw_extra, sizeof(my_generation));
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (billing_engine == NULL || my_engine < 0 || my_engine >= ENGINE_MAX)
		proc_exit(0);
	info = &billing_engine->engines[my_engine];

	/*
	 * The exit callback first: once we are RUNNING, callers rely on it to
	 * answer them and to free the registry's entry (a RUNNING entry is
	 * never started again).
	 */
	inflight = MemoryContextAlloc(TopMemoryContext, sizeof(int) * billing_engine_queue_size);
	before_shmem_exit(engine_exit, (Datum) 0);

	/* are we still wanted?  (a start that took too long was started again) */
	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	ok = info->generation == my_generation && info->state == ENGINE_STARTING;
	if (ok)
	{
		info->state = ENGINE_RUNNING;
		info->pid = MyProcPid;
		info->latch = MyLatch;
	}
	database = info->database;
	LWLockRelease(billing_engine->lock);
	if (!ok)
	{
		my_engine = -1;
		proc_exit(0);
	}
	BackgroundWorkerInitializeConnectionByOid(database, InvalidOid, 0);
	pgstat_report_appname("billing charge engine");
	StartTransactionCommand();
	SetConfigOption("session_authorization",
					GetUserNameFromId(GetAuthenticatedUserId(), false),
					PGC_SUSET, PGC_S_OVERRIDE);
	billing_pin_settings();
	CommitTransactionCommand();

	batch_cxt = AllocSetContextCreate(TopMemoryContext, "billing engine batch",
									  ALLOCSET_DEFAULT_SIZES);
	carry_cxt = AllocSetContextCreate(TopMemoryContext, "billing engine carried",
									  ALLOCSET_DEFAULT_SIZES);
	idle_since = GetCurrentTimestamp();

	for (;;)
	{
		EngineItem *items;
		TenantGroup	   *groups;
		int			n;
		int			ngroups;
		int			retries;
		bool		queued;

		ResetLatch(MyLatch);
		/* a cancel means "apply the batch again" (run_transaction); idle, nothing */
		QueryCancelPending = false;
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		LWLockAcquire(billing_engine->lock, LW_SHARED);
		queued = info->queued > 0;
		LWLockRelease(billing_engine->lock);

		if (!queued && ncarried == 0)
		{
			TimestampTz now = GetCurrentTimestamp();

			if (TimestampDifferenceExceeds(idle_since, now, billing_engine_idle_timeout * 1000))
			{
				/* idle: stop, unless a charge came in meanwhile */
				LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
				if (info->queued == 0)
				{
					info->state = ENGINE_NONE;
					info->pid = 0;
					info->latch = NULL;
					my_engine = -1;
				}
				LWLockRelease(billing_engine->lock);
				if (my_engine < 0)
					proc_exit(0);
				continue;
			}
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 1000, PG_WAIT_EXTENSION);
			continue;
		}
		if (!queued)
		{
			/*
			 * Only charges of busy accounts: try again every 1/20 of
			 * billing.engine_lock_wait, 1 to 100 ms apart (every 1 ms at
			 * the default 20 ms), not every millisecond of a long one.  A
			 * new charge wakes us at once, and takes these along.
			 */
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 Min(Max(billing_engine_lock_wait / 20, 1), 100),
							 PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}

		/* with several callers at once, let their charges gather */
		if (queued && billing_engine_gather > 0)
			gather(info);

		engine_gate_pass();

		MemoryContextSwitchTo(batch_cxt);
		n = take_batch(&items);
		note_batch(n - ncarried_taken);
		if (n > 0)
		{
			apply_batch(items, n, &groups, &ngroups, &retries);
			deliver(items, n, groups, ngroups, retries);
			pgstat_report_stat(false);
		}
		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(batch_cxt);
		idle_since = GetCurrentTimestamp();
	}
}
