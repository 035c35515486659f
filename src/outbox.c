/*-------------------------------------------------------------------------
 *
 * outbox.c
 *	  The background worker's side of the events (see events.h): deliver
 *	  committed events to Redis Streams, prune delivered ones after
 *	  billing.events_retention, sweep the accounts whose grant.expiring is
 *	  due, and write mirror.repaired for the drift the consistency check
 *	  repairs.  Called from the worker's loop (worker.c), with no
 *	  transaction open.
 *
 * Delivery, at least once and in per-tenant order:
 *	- read a batch of undelivered events in event_id order in a short
 *	  transaction (a tenant's event ids grow with its sequence numbers:
 *	  both are taken under its account lock), and commit it;
 *	- one Redis transaction (below): for each event XADD to the tenant's
 *	  stream <prefix>:{tenant}:events with the explicit id <seq>-0 (so a
 *	  repeat is refused by Redis as "equal or smaller than the top item":
 *	  the tenant's stream holds each event once, in order) and to the
 *	  stream of every tenant, <prefix>:events (its own ids; a repeat there
 *	  is a duplicate that consumers drop by event_id);
 *	- mark the events Redis accepted delivered (a short transaction).  A
 *	  crash between the XADD and the mark sends them again; a mark that
 *	  fails (a lock on the outbox) is tried again alone, before anything
 *	  new is sent.
 * A tenant whose stream key has another type (WRONGTYPE) is set aside for
 * RETRY_MS, its later events with it (their order); the others go on.
 *
 * What Redis holds: the watermark key <prefix>:events:watermark (on Citus
 * :<node group>) holds "W S": every event marked delivered at or before W
 * is in the streams, and S is the stamp of the last write.  Before each
 * batch the worker reads it, watched (WATCH, GET); it must be what the
 * worker wrote last.  The batch picks its delivered_at T, sends one
 * transaction (MULTI, the XADDs, SET of the watermark to "T T", EXEC) and
 * marks with T: Redis applies, persists and replicates a transaction as a
 * whole, so a Redis that has the watermark has the batch; and EXEC applies
 * nothing if the watermark was touched since the read (a FLUSHALL), so a
 * tenant's stream never starts again from a batch that follows a loss, and
 * the watermark keeps showing the loss until the redelivery writes its
 * floor.  A watermark that is missing (a restart without persistence,
 * FLUSHALL), lower (a restart from an older RDB or AOF, a failover to a
 * replica that lagged) or not a watermark means Redis lost events.  Then,
 * and at the worker's start, a redelivery sends
 * again, in event_id order, every event delivered after W, with the
 * undelivered ones.  During it W stays (the batches write "W T"), so a
 * worker that dies or a Redis that is lost again mid-way starts over from
 * it; it moves when everything is sent.  A tenant set aside during a
 * redelivery is owed its events: it is skipped until the redelivery is
 * over and it is no longer aside, then a redelivery of its own sends them,
 * and only then does W move.  A wipe of another ledger's keys by the
 * mirror (mirror.c) deletes the tenants' streams: delivery waits for it,
 * then sends everything.  No PostgreSQL transaction is open during Redis
 * I/O.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "compat.h"
#include "events.h"
#include "executor/spi.h"
#include "guc.h"
#include "logwindow.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "mirror.h"
#include "nodes/makefuncs.h"
#include "parser/parse_func.h"
#include "pgstat.h"
#include "redis.h"
#include "resp.h"
#include "sync.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#define RETRY_MS			5000	/* a tenant set aside, an outbox not usable */
#define POLL_MS				1000	/* look for events even without a wake-up */
#define PRUNE_MS			10000	/* prune delivered events this often */
#define PRUNE_BATCH			10000
#define PRUNE_BATCHES		10		/* per round, at most */
#define BATCHES_PER_CYCLE	20		/* then the mirror's turn (busy) */
#define MAX_DRIFT_FIELDS	32		/* mirror.repaired lists at most these */
#define MAX_DRIFT_TEXT		64		/* bytes of a name or value from Redis */
#define MAX_DRIFT_HASH		256		/* more elements: not listed (mirror.c's limit) */
#define LOCK_TIMEOUT		"200ms"
#define WATERMARK_AHEAD_MS	60000	/* a watermark at most this far ahead of our clock is ours */

static MemoryContext outbox_cxt = NULL;

static bool is_wrongtype(const redisReply *r);

/* is the outbox there and may we use it? (checked now and then) */
static bool usable = false;
static TimestampTz usable_checked_at = 0;
static char unusable_logged[EVENTS_ERROR_LEN] = "";

static uint64 seen_committed = 0;
static bool polled_once = false;
static TimestampTz last_poll = 0;
static TimestampTz last_prune = 0;
static TimestampTz last_sweep = 0;
static TimestampTz failed_until = 0;	/* a failed delivery: wait */
static bool failure_logged = false;

/*
 * The watermark (see above).  started: read once since the worker started.
 * written: what Redis must hold (the last value written).  A missing one
 * (or not a watermark) reads as WATERMARK_NONE, below every time; a
 * redelivery that starts from nothing writes WATERMARK_FROM_ALL, so that
 * losing Redis again mid-way is seen.
 */
#define WATERMARK_NONE		PG_INT64_MIN
#define WATERMARK_FROM_ALL	(PG_INT64_MIN + 1)
typedef struct Watermark
{
	TimestampTz upto;			/* W: every event marked at or before it is there */
	TimestampTz stamp;			/* S: the last write's */
} Watermark;
static bool started = false;
static Watermark written = {WATERMARK_NONE, WATERMARK_NONE};
static TimestampTz floor_at = WATERMARK_NONE;	/* redelivery: W it started from */
static TimestampTz top = WATERMARK_NONE;	/* the latest time written or marked */
static uint64 seen_wipes = 0;
static bool unanswered = false;	/* a write's reply never came: it may have happened */
static Watermark unanswered_value;
static bool in_multi = false;	/* MULTI sent, EXEC not yet: close on an error */
static bool pending = false;	/* Redis lost events: a redelivery is due */
static TimestampTz pending_from = WATERMARK_NONE;

/* a redelivery: events after floor_at from this event_id on (of `only`) */
static bool redeliver = false;
static int64 redeliver_after = 0;
static List *only = NIL;		/* NIL: every tenant */

/* tenants set aside (their stream key has another type) */
static List *aside = NIL;
static TimestampTz aside_until = 0;

/* tenants skipped by a redelivery: their own comes later (see above) */
static List *owed = NIL;

/*
 * Tenants back from aside: their first event goes alone (a batch ends
 * before a second one), so that a key still of the wrong type costs
 * billing:events one duplicate per retry, not a batch of them.
 */
static List *probing = NIL;

/*
 * The last batch's events that Redis accepted but that are not marked
 * delivered yet: the mark failed (a lock on the outbox outlasted
 * lock_timeout).  Only the mark is tried again, before anything new is
 * sent, so a lock held for minutes costs billing:events no duplicates.  At
 * most one batch (nothing is sent while it waits); TopMemoryContext.  A
 * restart forgets it: the events are still undelivered, and go again.
 */
typedef struct Unmarked
{
	int64		event_id;
	TimestampTz created_at;
} Unmarked;
static Unmarked *unmarked = NULL;
static int	nunmarked = 0;
static int	unmarked_cap = 0;
static TimestampTz unmarked_at;	/* their batch's T */

/* mirror.repaired events to write (TopMemoryContext) */
typedef struct Repair
{
	char	   *tenant;
	char	   *payload;
	int			attempts;
} Repair;
static List *repairs = NIL;
static List *noted = NIL;		/* measured, the repair not pushed yet */

/* one event of a batch */
typedef struct OutEvent
{
	int64		event_id;
	char	   *tenant;
	int64		seq;
	char	   *type;
	char	   *payload;
	char	   *created;		/* ISO 8601 */
	TimestampTz created_at;
	bool		delivered;		/* already marked (a redelivery) */
	TimestampTz delivered_at;	/* then when */
	bool		accepted;		/* Redis took it (or had it) */
} OutEvent;

/* ---------------------------------------------------------------------
 * transactions
 * ---------------------------------------------------------------------
 */
static void
begin_xact(const char *what)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, what);
}

static void
end_xact(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(outbox_cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

static void
lock_timeout(void)
{
	(void) set_config_option("lock_timeout", LOCK_TIMEOUT, PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

static void
note_error(const char *fmt,...) pg_attribute_printf(1, 2);
static void
note_wait(const char *fmt,...) pg_attribute_printf(1, 2);
static void
record_error(bool failure, const char *fmt, va_list ap) pg_attribute_printf(2, 0);

/*
 * The events' last error, for billing_sync_status().events_last_error (which
 * their log lines name), cut to whole characters; a failure also counts in
 * billing_metrics() (billing_events_delivery_failures_total), a wait for a
 * lock does not.
 */
static void
record_error(bool failure, const char *fmt, va_list ap)
{
	char		buf[EVENTS_ERROR_LEN];
	int			len;

	vsnprintf(buf, sizeof(buf), fmt, ap);
	len = strlen(buf);
	buf[pg_mbcliplen(buf, len, len)] = '\0';
	if (billing_events == NULL)
		return;
	LWLockAcquire(billing_events->lock, LW_EXCLUSIVE);
	strlcpy(billing_events->last_error, buf, sizeof(billing_events->last_error));
	billing_events->last_error_at = GetCurrentTimestamp();
	if (failure)
		billing_events->failed++;
	LWLockRelease(billing_events->lock);
}

static void
note_error(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	record_error(true, fmt, ap);
	va_end(ap);
}

static void
note_wait(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	record_error(false, fmt, ap);
	va_end(ap);
}

/*
 * Is the outbox there (a database still at 1.3 has none) and does the
 * worker's role have what it needs (billing_grant_worker)?  NULL if so,
 * else why not.  In a transaction; the catalog, no SQL.
 */
static char *
outbox_problem(void)
{
	static const struct
	{
		const char *name;
		int			nargs;
		Oid			args[3];
	}			functions[] =
	{
		{"alerts_due", 1, {INT4OID}},
		{"event_write", 3, {TEXTOID, TEXTOID, JSONBOID}},
	};
	Oid			nsp = get_namespace_oid("billing", true);
	Oid			rel;

	if (!OidIsValid(nsp) || !OidIsValid(rel = get_relname_relid("events", nsp)))
		return "";				/* 1.3: nothing to do, nothing to say */
	if (superuser())
		return NULL;
	if (pg_class_aclcheck(rel, GetUserId(), ACL_SELECT | ACL_UPDATE | ACL_DELETE) != ACLCHECK_OK)
		return "SELECT, UPDATE and DELETE on billing.events";
	for (int i = 0; i < lengthof(functions); i++)
	{
		Oid			fn = LookupFuncName(list_make2(makeString("billing"),
												   makeString(unconstify(char *, functions[i].name))),
										functions[i].nargs, functions[i].args, true);

		if (!OidIsValid(fn) || billing_proc_aclcheck(fn, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
			return psprintf("EXECUTE on billing.%s()", functions[i].name);
	}
	return NULL;
}

static bool
check_usable(TimestampTz now)
{
	char	   *problem;

	if (usable || !TimestampDifferenceExceeds(usable_checked_at, now, RETRY_MS))
		return usable;
	usable_checked_at = now;
	begin_xact("billing events: checking the outbox");
	problem = outbox_problem();
	if (problem != NULL)
		problem = MemoryContextStrdup(outbox_cxt, problem);
	end_xact();
	usable = problem == NULL;
	if (problem != NULL && problem[0] != '\0' && strcmp(problem, unusable_logged) != 0)
	{
		ereport(LOG,
				(errmsg("billing events: the worker's role lacks %s; events are not delivered", problem),
				 errhint("SELECT billing_grant_worker('%s') gives it what it needs.",
						 GetUserNameFromId(GetUserId(), false))));
		note_error("the worker's role lacks %s", problem);
		strlcpy(unusable_logged, problem, sizeof(unusable_logged));
	}
	if (usable)
		unusable_logged[0] = '\0';
	return usable;
}

/* ---------------------------------------------------------------------
 * delivery
 * ---------------------------------------------------------------------
 */
static char *
stream_all_key(void)
{
	return psprintf("%s:events", billing_redis_prefix);
}

static char *
watermark_key(void)
{
	int32		group = mirror_node_group();

	if (group >= 0)
		return psprintf("%s:events:watermark:%d", billing_redis_prefix, group);
	return psprintf("%s:events:watermark", billing_redis_prefix);
}

/*
 * A watermark from a reply (GET): "W S", two numbers.  Anything
 * else, nil included, is WATERMARK_NONE: Redis is untrusted, and taking a
 * value for missing sends too much, never too little.  An error reply
 * (WRONGTYPE: the key is not a string) too; the next write, a SET,
 * replaces it.  False: another type of reply (the connection is closed).
 */
static bool
watermark_parse(redisReply *r, Watermark *out, const char *what)
{
	out->upto = out->stamp = WATERMARK_NONE;
	if (r->type == REDIS_REPLY_STRING && r->len >= 3 && r->len <= 41)
	{
		char		buf[42];
		char	   *end;
		long long	w,
					st;

		memcpy(buf, r->str, r->len);
		buf[r->len] = '\0';
		errno = 0;
		w = strtoll(buf, &end, 10);
		if (errno == 0 && end != buf && *end == ' ' && w > WATERMARK_NONE)
		{
			char	   *s2 = end + 1;

			st = strtoll(s2, &end, 10);
			if (errno == 0 && end != s2 && *end == '\0' && st > WATERMARK_NONE)
			{
				out->upto = (TimestampTz) w;
				out->stamp = (TimestampTz) st;
			}
		}
	}
	else if (r->type == REDIS_REPLY_ERROR)
	{
		char		why[128];

		bool		wrongtype = is_wrongtype(r);

		redis_reply_text(r, why, sizeof(why));
		redis_free(r);			/* before any ereport */
		if (!wrongtype)
		{
			redis_close("%s: %s", what, why);
			return false;
		}
		ereport(LOG,
				(errmsg("billing events: the watermark key is not a string (%s): it is replaced, and every event sent again",
						why)));
		return true;
	}
	else if (r->type != REDIS_REPLY_NIL && r->type != REDIS_REPLY_STRING)
		return redis_unexpected(r, what);
	redis_free(r);
	return true;
}

static bool
same_watermark(Watermark a, Watermark b)
{
	return a.upto == b.upto && a.stamp == b.stamp;
}

/*
 * Is what Redis holds (held) what the worker wrote last?  A write whose
 * reply never came (the connection failed) may have happened: its value
 * counts too.  Anything else (missing, lower, not a watermark, not ours)
 * means Redis lost events: a redelivery from the lower of the two is due.
 */
static void
check_held(Watermark held)
{
	if (unanswered && same_watermark(held, unanswered_value))
		written = held;
	unanswered = false;
	if (same_watermark(held, written))
		return;
	held.upto = Min(held.upto, written.upto);
	pending_from = pending ? Min(pending_from, held.upto) : held.upto;
	pending = true;
}

static void
append_command(StringInfo buf, const char *command, const char *key)
{
	resp_head(buf, '*', key ? 2 : 1);
	resp_str(buf, command);
	if (key)
		resp_str(buf, key);
}

/* a status reply of that text (OK, QUEUED) */
static bool
is_status(const redisReply *r, const char *text)
{
	return r->type == REDIS_REPLY_STATUS && r->str != NULL && strcmp(r->str, text) == 0;
}

/*
 * What Redis holds (before each batch), watched: a transaction that writes
 * the watermark (a batch, the end of a redelivery) then applies only if
 * nothing touched the key since (a FLUSHALL, another writer, the worker's
 * own SET).  UNWATCH first: a key touched since an earlier WATCH would
 * abort the next transaction for nothing.
 */
static bool
watermark_read(Watermark *out)
{
	StringInfoData buf;
	char	   *key = watermark_key();

	out->upto = out->stamp = WATERMARK_NONE;
	initStringInfo(&buf);
	redis_begin("GET of the events watermark");
	append_command(&buf, "UNWATCH", NULL);
	append_command(&buf, "WATCH", key);
	append_command(&buf, "GET", key);
	pfree(key);
	if (!redis_send(&buf, 3))
		return false;
	pfree(buf.data);
	for (int i = 0; i < 3; i++)
	{
		redisReply *r = redis_receive();

		if (r == NULL)
			return false;
		if (i == 2)
			return watermark_parse(r, out, "GET of the events watermark");
		if (!is_status(r, "OK"))
			return redis_unexpected(r, i == 0 ? "UNWATCH" : "WATCH of the events watermark");
		redis_free(r);
	}
	return false;				/* not reached */
}

/* SET of the watermark to w; it may happen even if no reply comes */
static void
append_watermark(StringInfo buf, Watermark w)
{
	char	   *key = watermark_key();
	char		num[64];

	snprintf(num, sizeof(num), INT64_FORMAT " " INT64_FORMAT, (int64) w.upto, (int64) w.stamp);
	resp_head(buf, '*', 3);
	resp_str(buf, "SET");
	resp_str(buf, key);
	resp_str(buf, num);
	pfree(key);
	unanswered = true;
	unanswered_value = w;
}

/*
 * The replies to MULTI and the `queued` commands after it: OK, then QUEUED
 * each.  False: anything else (a command Redis refused, OOM say, makes it
 * discard them all); the connection is closed.
 */
static bool
receive_queued(int queued, const char *what)
{
	for (int i = 0; i <= queued; i++)
	{
		redisReply *r = redis_receive();

		if (r == NULL)
			return false;
		if (!is_status(r, i == 0 ? "OK" : "QUEUED"))
			return redis_unexpected(r, what);
		redis_free(r);
	}
	return true;
}

/*
 * The reply to EXEC: the array of the n commands' replies (the caller
 * frees it), or NULL: with *aborted, the watched watermark was touched
 * since the worker read it, and nothing was applied; else the connection
 * is closed.
 */
static redisReply *
receive_exec(int n, bool *aborted)
{
	redisReply *r = redis_receive();

	*aborted = false;
	if (r == NULL)
		return NULL;
	if (r->type == REDIS_REPLY_NIL)
	{
		redis_free(r);
		*aborted = true;
		unanswered = false;
		return NULL;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements != (size_t) n)
	{
		redis_unexpected(r, "EXEC");
		return NULL;
	}
	return r;
}

/* the reply to SET in EXEC's (whole): OK, or false (closed; whole freed) */
static bool
watermark_set_reply(redisReply *whole, redisReply *r)
{
	if (!is_status(r, "OK"))
		return redis_unexpected_in(whole, r, "SET of the events watermark");
	unanswered = false;
	return true;
}

/*
 * Write the watermark w (the start or the end of a redelivery): MULTI,
 * SET, EXEC, so only if Redis still holds what watermark_read saw just
 * before (*aborted when not: nothing written).  Then a FLUSHALL in between
 * cannot leave a floor that claims what Redis no longer has.  SET replaces
 * a key of another type.  False: not written.
 */
static bool
watermark_write(Watermark w, bool *aborted)
{
	StringInfoData buf;
	redisReply *r;

	*aborted = false;
	initStringInfo(&buf);
	redis_begin("SET of the events watermark");
	append_command(&buf, "MULTI", NULL);
	append_watermark(&buf, w);
	append_command(&buf, "EXEC", NULL);
	if (!redis_send(&buf, 3))
		return false;
	pfree(buf.data);
	if (!receive_queued(1, "SET of the events watermark"))
		return false;
	r = receive_exec(1, aborted);
	if (r == NULL || !watermark_set_reply(r, r->element[0]))
		return false;
	redis_free(r);
	written = w;
	return true;
}

/* a time for the next delivered_at (or watermark): after every one seen */
static TimestampTz
next_mark(void)
{
	TimestampTz now = GetCurrentTimestamp();

	top = Max(now, top + 1);
	return top;
}

static bool
in_list(List *list, const char *tenant)
{
	ListCell   *lc;

	foreach(lc, list)
		if (strcmp(lfirst(lc), tenant) == 0)
			return true;
	return false;
}

static List *
add_tenant(List *list, const char *tenant)
{
	MemoryContext old;

	if (in_list(list, tenant))
		return list;
	old = MemoryContextSwitchTo(TopMemoryContext);
	list = lappend(list, pstrdup(tenant));
	MemoryContextSwitchTo(old);
	return list;
}

static bool
is_aside(const char *tenant)
{
	return in_list(aside, tenant);
}

/*
 * The log lines of tenants set aside: as the mirror's (worker.c), at most
 * 10 in a window of RETRY_MS, then one line that counts the rest when the
 * next window starts.  A Redis that refuses every tenant's stream must not
 * fill the server's log.
 */
static LogWindow aside_log = LOG_WINDOW_INIT("billing events: could not deliver the events of", "tenants",
											 "billing_sync_status().events_last_error shows the latest.",
											 10, RETRY_MS);

static void
set_aside(const char *tenant, const char *why)
{
	/* a redelivery passes it by: it is owed what the redelivery sends */
	if (redeliver && (only == NIL || in_list(only, tenant)))
		owed = add_tenant(owed, tenant);
	if (is_aside(tenant))
		return;
	if (log_window_take(&aside_log))
		ereport(LOG,
				(errmsg("billing events: could not deliver the events of tenant \"%s\": %s", tenant, why),
				 errdetail("The other tenants' events are delivered; this tenant's are tried again every %d s, in order.",
						   RETRY_MS / 1000),
				 errhint("Its stream key must be a Redis stream (or not exist).")));
	note_error("delivery failed for tenant %s: %s", tenant, why);
	aside = add_tenant(aside, tenant);
	if (aside_until == 0)
		aside_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RETRY_MS);
}

/*
 * The next batch: undelivered events, and (redelivering) those delivered
 * after floor_at (of the tenants in `only`) from the cursor on: two index
 * scans (events_undelivered_idx, events_id_idx from the cursor), merged in
 * event_id order, so a batch costs the same at the end of a large outbox
 * as at its start.  Event ids
 * are taken before commit, so an event may commit after a batch with
 * higher ids was read: the cursor alone would skip it, and the tenant's
 * next event (which commits after it: both hold the account lock) would
 * reach the stream first, after which Redis refuses the skipped one's
 * lower id.  In event id order the undelivered one comes first.  Tenants
 * aside or owed are skipped.
 */
static int
fetch(int limit, OutEvent **out)
{
	Oid			types[5] = {INT8OID, INT4OID, TEXTARRAYOID, TIMESTAMPTZOID, TEXTARRAYOID};
	Datum		values[5];
	char		nulls[5];
	OutEvent   *ev;
	int			n;
	Datum	   *skip;
	int			nskip = 0;
	ListCell   *lc;

	memset(nulls, ' ', sizeof(nulls));
	skip = palloc(sizeof(Datum) * Max(list_length(aside) + list_length(owed), 1));
	foreach(lc, aside)
		skip[nskip++] = CStringGetTextDatum(lfirst(lc));
	foreach(lc, owed)
		skip[nskip++] = CStringGetTextDatum(lfirst(lc));
	values[0] = Int64GetDatum(redeliver ? redeliver_after : 0);
	values[1] = Int32GetDatum(limit);
	values[2] = PointerGetDatum(construct_array(skip, nskip, TEXTOID, -1, false, TYPALIGN_INT));
	values[3] = TimestampTzGetDatum(floor_at);
	values[4] = (Datum) 0;
	nulls[4] = 'n';
	if (only != NIL)
	{
		Datum	   *tenants = palloc(sizeof(Datum) * list_length(only));
		int			m = 0;

		foreach(lc, only)
			tenants[m++] = CStringGetTextDatum(lfirst(lc));
		values[4] = PointerGetDatum(construct_array(tenants, m, TEXTOID, -1, false, TYPALIGN_INT));
		nulls[4] = ' ';
	}
	begin_xact("billing events: reading the outbox");
	lock_timeout();
	if (SPI_execute_with_args(redeliver ?
							  "SELECT * FROM ("
							  " (SELECT e.event_id, e.tenant_id, e.seq, e.type, e.payload::pg_catalog.text, "
							  "    e.created_at, e.delivered_at "
							  "  FROM billing.events e "
							  "  WHERE e.delivered_at IS NULL "
							  "    AND NOT e.tenant_id OPERATOR(pg_catalog.=) ANY ($3) "
							  "  ORDER BY e.event_id LIMIT $2) "
							  " UNION ALL "
							  " (SELECT e.event_id, e.tenant_id, e.seq, e.type, e.payload::pg_catalog.text, "
							  "    e.created_at, e.delivered_at "
							  "  FROM billing.events e "
							  "  WHERE e.event_id OPERATOR(pg_catalog.>) $1 "
							  "    AND e.delivered_at OPERATOR(pg_catalog.>) $4 "
							  "    AND ($5 IS NULL OR e.tenant_id OPERATOR(pg_catalog.=) ANY ($5)) "
							  "    AND NOT e.tenant_id OPERATOR(pg_catalog.=) ANY ($3) "
							  "  ORDER BY e.event_id LIMIT $2)) AS u "
							  "ORDER BY u.event_id LIMIT $2" :
							  "SELECT e.event_id, e.tenant_id, e.seq, e.type, e.payload::pg_catalog.text, "
							  "  e.created_at, NULL::pg_catalog.timestamptz "
							  "FROM billing.events e "
							  "WHERE e.delivered_at IS NULL AND e.event_id OPERATOR(pg_catalog.>) $1 "
							  "  AND NOT e.tenant_id OPERATOR(pg_catalog.=) ANY ($3) "
							  "ORDER BY e.event_id LIMIT $2",
							  5, types, values, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing events: reading the outbox failed");
	n = SPI_processed;
	ev = MemoryContextAllocZero(outbox_cxt, sizeof(OutEvent) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		MemoryContext old = MemoryContextSwitchTo(outbox_cxt);
		Datum		at;

		ev[i].event_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		ev[i].tenant = TextDatumGetCString(SPI_getbinval(tup, desc, 2, &isnull));
		ev[i].seq = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
		ev[i].type = TextDatumGetCString(SPI_getbinval(tup, desc, 4, &isnull));
		ev[i].payload = TextDatumGetCString(SPI_getbinval(tup, desc, 5, &isnull));
		ev[i].created_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));
		ev[i].created = events_iso_time(ev[i].created_at);
		at = SPI_getbinval(tup, desc, 7, &isnull);
		ev[i].delivered = !isnull;
		if (!isnull)
			ev[i].delivered_at = DatumGetTimestampTz(at);
		MemoryContextSwitchTo(old);
	}
	end_xact();
	*out = ev;
	return n;
}

/* XADD key MAXLEN ~ max id event_id .. tenant_id .. seq .. type .. created_at .. payload .. */
static void
append_xadd(StringInfo buf, const char *key, int maxlen, const char *id, OutEvent *e)
{
	char		num[32];

	resp_head(buf, '*', 18);
	resp_str(buf, "XADD");
	resp_str(buf, key);
	resp_str(buf, "MAXLEN");
	resp_str(buf, "~");
	snprintf(num, sizeof(num), "%d", maxlen);
	resp_str(buf, num);
	resp_str(buf, id);
	resp_str(buf, "event_id");
	snprintf(num, sizeof(num), INT64_FORMAT, e->event_id);
	resp_str(buf, num);
	resp_str(buf, "tenant_id");
	resp_str(buf, e->tenant);
	resp_str(buf, "seq");
	snprintf(num, sizeof(num), INT64_FORMAT, e->seq);
	resp_str(buf, num);
	resp_str(buf, "type");
	resp_str(buf, e->type);
	resp_str(buf, "created_at");
	resp_str(buf, e->created ? e->created : "");
	resp_str(buf, "payload");
	resp_str(buf, e->payload);
}

/* a repeat: Redis refuses an id not above the stream's top item */
static bool
is_repeat(const redisReply *r)
{
	return r->type == REDIS_REPLY_ERROR && r->str != NULL &&
		strstr(r->str, "equal or smaller") != NULL;
}

static bool
is_wrongtype(const redisReply *r)
{
	return r->type == REDIS_REPLY_ERROR && r->str != NULL && r->len >= 9 &&
		strncmp(r->str, "WRONGTYPE", 9) == 0;
}

/*
 * Send a batch; sets `accepted` on the events Redis took.  One
 * transaction: MULTI, the XADDs, SET of the watermark to w, EXEC.  It
 * applies only if the watermark is still what watermark_read saw (the
 * WATCH): a Redis that lost events since gets none of the batch, so a
 * tenant's stream cannot start again from the batch's events, and the
 * watermark keeps saying what Redis lost until the redelivery writes its
 * floor (*aborted: read it again).  False: aborted, Redis failed (the
 * connection is closed), or the all-tenants stream cannot be written (its
 * key has another type): nothing is marked.
 */
/* was tenant of event i refused by Redis earlier in this batch? */
static bool
refused_before(const OutEvent *ev, char **refused, int i)
{
	for (int j = 0; j < i; j++)
		if (refused[j] != NULL && strcmp(ev[j].tenant, ev[i].tenant) == 0)
			return true;
	return false;
}

static bool
send_batch(OutEvent *ev, int n, Watermark w, bool *aborted)
{
	StringInfoData buf;
	char	   *all_key = stream_all_key();
	char	   *blocked = NULL;	/* a tenant that failed in this batch */
	bool		all_failed = false;
	char		why[128] = "";
	char	  **refused;
	char	   *refused_why;
	redisReply *exec;
	bool		sent;

	*aborted = false;
	initStringInfo(&buf);
	redis_begin("XADD");
	append_command(&buf, "MULTI", NULL);
	in_multi = true;
	for (int i = 0; i < n; i++)
	{
		char	   *key = psprintf("%s:{%s}:events", billing_redis_prefix, ev[i].tenant);
		char		id[32];

		snprintf(id, sizeof(id), INT64_FORMAT "-0", ev[i].seq);
		append_xadd(&buf, key, billing_events_maxlen, id, &ev[i]);
		append_xadd(&buf, all_key, billing_events_all_maxlen, "*", &ev[i]);
		pfree(key);
		if (buf.len >= 1024 * 1024 && !redis_send(&buf, 0))
		{
			in_multi = false;	/* closed */
			return false;
		}
	}
	append_watermark(&buf, w);
	append_command(&buf, "EXEC", NULL);
	sent = redis_send(&buf, 2 * n + 3);
	in_multi = false;			/* EXEC sent, or closed */
	if (!sent)
		return false;
	pfree(buf.data);
	if (!receive_queued(2 * n + 1, "XADD"))
		return false;
	/* the tenants refused, and why: set aside once the reply is freed */
	refused = palloc0(sizeof(char *) * Max(n, 1));
	refused_why = palloc(sizeof(why) * Max(n, 1));
	exec = receive_exec(2 * n + 1, aborted);
	if (exec == NULL)
		return false;

	for (int i = 0; i < n; i++)
	{
		redisReply *mine = exec->element[2 * i];
		redisReply *all = exec->element[2 * i + 1];
		bool		ok;

		if (mine->type != REDIS_REPLY_STRING && !is_repeat(mine) && !is_wrongtype(mine))
			return redis_unexpected_in(exec, mine, "XADD");
		ok = !is_wrongtype(mine);
		if (!ok)
		{
			if (blocked == NULL || strcmp(blocked, ev[i].tenant) != 0)
			{
				refused[i] = refused_why + i * sizeof(why);
				redis_reply_text(mine, refused[i], sizeof(why));
			}
			blocked = ev[i].tenant;
		}
		if (all->type != REDIS_REPLY_STRING)
		{
			/* OOM, READONLY, ...: the server's, like any command's */
			if (!is_wrongtype(all))
				return redis_unexpected_in(exec, all, "XADD to the events stream");
			redis_reply_text(all, why, sizeof(why));
			all_failed = true;
			continue;
		}
		/* a tenant that failed: its later events wait too (their order) */
		ev[i].accepted = ok && !is_aside(ev[i].tenant) && !refused_before(ev, refused, i);
	}
	if (!watermark_set_reply(exec, exec->element[2 * n]))
		return false;
	redis_free(exec);
	for (int i = 0; i < n; i++)
		if (refused[i] != NULL)
			set_aside(ev[i].tenant, refused[i]);
	written = w;
	if (all_failed)
	{
		if (!failure_logged)
			ereport(LOG,
					(errmsg("billing events: could not add to the stream %s: %s", all_key, why),
					 errhint("The key must be a Redis stream (or not exist); the worker tries again every %d s.",
							 RETRY_MS / 1000)));
		failure_logged = true;
		note_error("XADD to %s: %s", all_key, why);
		failed_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RETRY_MS);
		return false;
	}
	return true;
}

/* remember what Redis accepted of a batch, to be marked delivered at mark_at */
static void
remember_unmarked(OutEvent *ev, int n, TimestampTz mark_at)
{
	Assert(nunmarked == 0);
	if (unmarked_cap < n)
	{
		if (unmarked != NULL)
			pfree(unmarked);
		unmarked = MemoryContextAlloc(TopMemoryContext, sizeof(Unmarked) * n);
		unmarked_cap = n;
	}
	for (int i = 0; i < n; i++)
		if (ev[i].accepted && !ev[i].delivered)
		{
			unmarked[nunmarked].event_id = ev[i].event_id;
			unmarked[nunmarked].created_at = ev[i].created_at;
			nunmarked++;
		}
	unmarked_at = mark_at;
}

/*
 * Mark the remembered events delivered at their batch's T (what the
 * watermark promised: Redis holds them); statistics.  An error (the lock
 * timeout) keeps them for the next cycle.
 */
static void
mark_unmarked(void)
{
	Oid			types[2] = {INT8ARRAYOID, TIMESTAMPTZOID};
	Datum		values[2];
	Datum	   *ids;
	int64		marked;
	TimestampTz now;

	if (nunmarked == 0)
		return;
	ids = palloc(sizeof(Datum) * nunmarked);
	for (int i = 0; i < nunmarked; i++)
		ids[i] = Int64GetDatum(unmarked[i].event_id);
	begin_xact("billing events: marking events delivered");
	lock_timeout();				/* a lock held on the outbox never stalls the mirror */
	values[0] = PointerGetDatum(construct_array(ids, nunmarked, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[1] = TimestampTzGetDatum(unmarked_at);
	if (SPI_execute_with_args("UPDATE billing.events e SET delivered_at = $2 "
							  "WHERE e.event_id OPERATOR(pg_catalog.=) ANY ($1) "
							  "  AND e.delivered_at IS NULL",
							  2, types, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "billing events: marking events delivered failed");
	marked = SPI_processed;
	end_xact();
	pfree(ids);

	now = GetCurrentTimestamp();
	if (billing_events != NULL)
	{
		LWLockAcquire(billing_events->lock, LW_EXCLUSIVE);
		billing_events->delivered += marked;
		billing_events->last_delivered_at = now;
		for (int i = 0; i < nunmarked; i++)
		{
			billing_events->lag_us[billing_events->lag_next] = Max(now - unmarked[i].created_at, 0);
			billing_events->lag_next = (billing_events->lag_next + 1) % EVENTS_LAG_RING;
			if (billing_events->lag_count < EVENTS_LAG_RING)
				billing_events->lag_count++;
		}
		LWLockRelease(billing_events->lock);
	}
	nunmarked = 0;
}

/*
 * Redis holds less than it should (pending_from: the W it held; also at
 * the worker's start): send again, in event_id order, every event
 * delivered after it.  The watermark says so first: "W S", W the floor
 * (WATERMARK_FROM_ALL from nothing, so that losing it again is seen), and
 * it stays while the redelivery runs; written watched, so that a FLUSHALL
 * since the read aborts it (*aborted: read again) instead of leaving a
 * floor that claims what Redis lost.  Tenants aside now are owed their
 * events.
 */
static bool
start_redelivery(bool *aborted)
{
	TimestampTz held = pending_from == WATERMARK_NONE ? WATERMARK_FROM_ALL : pending_from;
	Watermark	w;
	ListCell   *lc;

	if (started)
		ereport(LOG,
				(errmsg("billing events: Redis lost events it was sent: sending again every event delivered %s",
						held == WATERMARK_FROM_ALL ? "(all of them: its watermark is gone)" :
						psprintf("after %s (its watermark)", timestamptz_to_str(held))),
				 errdetail("Redis restarted empty or from an older copy, was flushed, failed over to a replica that lagged, or its keys were wiped.")));
	/*
	 * A plausible time of ours (our clock may have stepped back a little
	 * since we wrote it): later marks come after it.  A time further ahead
	 * is Redis' word only (a lie, or a copy from a server whose clock ran
	 * far ahead), and would date every later delivery in the future: not
	 * taken.
	 */
	if (held <= TimestampTzPlusMilliseconds(GetCurrentTimestamp(), WATERMARK_AHEAD_MS))
		top = Max(top, held);
	else
		ereport(LOG,
				(errmsg("billing events: Redis' watermark %s is more than %d s ahead of this server's clock: deliveries are dated by the clock, not after it",
						timestamptz_to_str(held), WATERMARK_AHEAD_MS / 1000),
				 errdetail("A watermark that far ahead comes from a server whose clock ran ahead (or stepped back since), or from a Redis that does not tell the truth.")));
	w.upto = held;
	w.stamp = next_mark();
	if (!watermark_write(w, aborted))
		return false;
	pending = false;
	started = true;
	floor_at = held;
	redeliver = true;
	redeliver_after = 0;
	list_free_deep(only);
	only = NIL;
	foreach(lc, aside)
		owed = add_tenant(owed, lfirst(lc));
	return true;
}

/*
 * The tenants owed a redelivery that are no longer aside get theirs, each
 * probed (the list of tenants to probe is cleared when a batch sees every
 * waiting event, and an owed tenant's are not among them: a redelivery
 * that outlasted its time aside would have sent all of its events at once)
 */
static void
start_owed(void)
{
	List	   *still = NIL;
	ListCell   *lc;

	foreach(lc, owed)
	{
		if (is_aside(lfirst(lc)))
			still = add_tenant(still, lfirst(lc));
		else
		{
			only = add_tenant(only, lfirst(lc));
			/* back from aside: its first event goes alone */
			probing = add_tenant(probing, lfirst(lc));
		}
	}
	list_free_deep(owed);
	owed = still;
	if (only != NIL)
	{
		redeliver = true;
		redeliver_after = 0;
	}
}

/*
 * A redelivery sent everything: unless tenants are owed, move W, if Redis
 * still holds what watermark_read saw just before (a failure leaves the
 * redelivery on: the next round ends it again).
 */
static bool
end_redelivery(void)
{
	if (owed == NIL)
	{
		Watermark	w;
		bool		aborted;

		w.upto = w.stamp = next_mark();
		if (!watermark_write(w, &aborted))
			return false;
	}
	redeliver = false;
	list_free_deep(only);
	only = NIL;
	return true;
}

/*
 * How many of the n events fetched to send: all, or those before the
 * second event of a tenant being probed.  The tenants probed in them are
 * probed no more (they failed again: aside; or they are back).
 */
static int
probe_cut(OutEvent *ev, int n)
{
	List	   *seen = NIL;
	int			k = n;

	if (probing == NIL)
		return n;
	for (int i = 0; i < n; i++)
	{
		if (!in_list(probing, ev[i].tenant))
			continue;
		if (in_list(seen, ev[i].tenant))
		{
			k = i;
			break;
		}
		seen = lappend(seen, ev[i].tenant);
	}
	if (seen != NIL)
	{
		List	   *rest = NIL;
		ListCell   *lc;

		foreach(lc, probing)
			if (!in_list(seen, lfirst(lc)))
				rest = add_tenant(rest, lfirst(lc));
		list_free_deep(probing);
		probing = rest;
	}
	list_free(seen);
	return k;
}

/*
 * Read what Redis holds, watched, and compare it with what was written: a
 * loss makes `pending`.  At the worker's start, whatever was delivered
 * after it is sent again.  False: Redis failed.
 */
static bool
read_held(void)
{
	Watermark	held;

	if (!watermark_read(&held))
		return false;
	if (!started)
	{
		written = held;
		unanswered = false;
		pending_from = pending ? Min(pending_from, held.upto) : held.upto;
		pending = true;
	}
	else
		check_held(held);
	return true;
}

/*
 * Deliver what there is, at most BATCHES_PER_CYCLE batches; true when more
 * is waiting (the worker comes back at once).
 */
static bool
deliver(void)
{
	int			batch = billing_sync_batch_size;
	bool		retried = false;
	int			starts = 0;

	for (int b = 0; b < BATCHES_PER_CYCLE; b++)
	{
		OutEvent   *ev;
		int			n;
		int			sent;
		Watermark	w;
		bool		aborted;
		uint64		committed = billing_events ?
			pg_atomic_read_u64(&billing_events->committed) : 0;

		/* a wipe of another ledger's keys deletes the tenants' streams */
		if (!mirror_connected() || mirror_wiping())
			return false;
		if (mirror_wipes() != seen_wipes)
		{
			seen_wipes = mirror_wipes();
			pending = true;
			pending_from = WATERMARK_NONE;
		}
		/* what Redis holds, watched (also when there is nothing to send) */
		if (!read_held())
			return false;
		if (pending)
		{
			/* Redis may not hold them: still undelivered, they go again */
			nunmarked = 0;
			/* lost again at once, again and again: a Redis that does not keep it */
			if (++starts > 3)
			{
				failed_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RETRY_MS);
				return false;
			}
			if (!start_redelivery(&aborted) && !aborted)
				return false;
			continue;			/* EXEC ended the WATCH: read it again */
		}
		/* a batch Redis holds: marked before anything new is sent */
		mark_unmarked();
		if (!redeliver && owed != NIL)
			start_owed();
		n = fetch(batch, &ev);
		seen_committed = committed;
		polled_once = true;
		if (n == 0)
		{
			if (redeliver)
				(void) end_redelivery();
			return false;
		}
		sent = probe_cut(ev, n);
		w.stamp = next_mark();
		w.upto = (redeliver || owed != NIL) ? floor_at : w.stamp;
		if (!send_batch(ev, sent, w, &aborted))
		{
			MemoryContextReset(outbox_cxt);
			if (aborted && !retried)
			{
				retried = true;
				continue;		/* the watermark changed: read it again */
			}
			return false;
		}
		for (int i = 0; i < sent; i++)
			if (ev[i].accepted && ev[i].delivered)
				top = Max(top, ev[i].delivered_at);
		/* Redis holds the batch: a redelivery goes on after it, marked or not */
		if (redeliver)
			redeliver_after = ev[sent - 1].event_id;
		remember_unmarked(ev, sent, w.stamp);
		mark_unmarked();
		if (failure_logged)
			ereport(LOG, (errmsg("billing events: delivering again")));
		failure_logged = false;
		MemoryContextReset(outbox_cxt);
		CHECK_FOR_INTERRUPTS();
		if (sent < n)
			continue;			/* a probe: go on */
		if (n < batch)
		{
			/* every event waiting was seen: a tenant probed is back or has none */
			list_free_deep(probing);
			probing = NIL;
			/* EXEC ended the WATCH: end the redelivery after a new read */
			if (redeliver && read_held() && !pending)
				(void) end_redelivery();
			return false;
		}
	}
	return true;
}

/* ---------------------------------------------------------------------
 * pruning and the sweep
 * ---------------------------------------------------------------------
 */

/*
 * Events delivered longer than billing.events_retention ago leave the
 * outbox, PRUNE_BATCH at a time; with no Redis to deliver to
 * (billing.redis_host empty), undelivered ones created that long ago too.
 * The retention counts from the delivery: an event delivered late stays as
 * long as any other, in case Redis loses it (a failover) and it must be
 * sent again.  An event is delivered after it is created, so the index on
 * created_at finds every one that is due.  True when more are due.
 */
static bool
prune(void)
{
	Oid			types[2] = {TIMESTAMPTZOID, BOOLOID};
	Datum		values[2];
	int64		pruned = 0;
	bool		more = false;

	if (billing_events_retention <= 0)
		return false;
	values[0] = TimestampTzGetDatum(TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
																 -(int64) billing_events_retention * 1000));
	values[1] = BoolGetDatum(billing_redis_host == NULL || billing_redis_host[0] == '\0');
	for (int i = 0; i < PRUNE_BATCHES; i++)
	{
		int64		n;

		CHECK_FOR_INTERRUPTS();
		begin_xact("billing events: pruning the outbox");
		lock_timeout();
		if (SPI_execute_with_args("DELETE FROM billing.events e WHERE e.ctid OPERATOR(pg_catalog.=) ANY (ARRAY("
								  "  SELECT o.ctid FROM billing.events o "
								  "  WHERE o.created_at OPERATOR(pg_catalog.<) $1 "
								  "    AND (o.delivered_at OPERATOR(pg_catalog.<) $1 "
								  "         OR ($2 AND o.delivered_at IS NULL)) "
								  "  ORDER BY o.created_at LIMIT " CppAsString2(PRUNE_BATCH) "))",
								  2, types, values, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "billing events: pruning the outbox failed");
		n = SPI_processed;
		end_xact();
		pruned += n;
		if (n < PRUNE_BATCH)
			break;
		more = i == PRUNE_BATCHES - 1;
	}
	if (billing_events != NULL)
	{
		LWLockAcquire(billing_events->lock, LW_EXCLUSIVE);
		billing_events->pruned += pruned;
		billing_events->last_prune_at = GetCurrentTimestamp();
		LWLockRelease(billing_events->lock);
	}
	return more;
}

/* grant.expiring of accounts nobody touches (billing.alerts_due) */
static void
sweep(void)
{
	begin_xact("billing events: the alerts' sweep");
	lock_timeout();
	if (SPI_execute("SELECT billing.alerts_due(1000)", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing events: the alerts' sweep failed");
	end_xact();
}

/* ---------------------------------------------------------------------
 * mirror.repaired
 * ---------------------------------------------------------------------
 */
static const redisReply *
hash_value(const redisReply *r, const char *name)
{
	for (size_t e = 0; e + 1 < r->elements; e += 2)
		if (strcmp(r->element[e]->str, name) == 0)
			return r->element[e + 1];
	return NULL;
}

static const char *
snap_value(const SyncSnap *s, const char *name)
{
	for (int f = 0; f + 1 < s->nfields; f += 2)
		if (strcmp(s->fields[f], name) == 0)
			return s->fields[f + 1];
	return NULL;
}

static bool
parse_int64(const char *s, int64 *out)
{
	char	   *end;

	if (s == NULL || *s == '\0' || strlen(s) > 20)
		return false;
	errno = 0;
	*out = strtoi64(s, &end, 10);
	return errno == 0 && *end == '\0';
}

/*
 * One differing field: {"redis": .., "database": .., "difference": ..},
 * under FIELD, or under REDIS_FIELD (a field only Redis has).  What comes
 * from Redis is untrusted: names and values are cut to their first 64
 * bytes, anything but printable ASCII shown as '?' (redis_reply_text), so
 * the payload stays small and valid UTF-8 whatever the reply held.
 */
static void
add_difference(StringInfo diffs, const char *field, const redisReply *redis_field,
			   const redisReply *redis, const char *db)
{
	StringInfoData d;
	char		name[MAX_DRIFT_TEXT + 1];
	char		have[MAX_DRIFT_TEXT + 1];
	int64		a;
	int64		b;

	if (redis)
		redis_reply_text(redis, have, sizeof(have));
	ej_begin(&d);
	ej_str(&d, "redis", redis ? have : NULL);
	ej_str(&d, "database", db ? pnstrdup(db, MAX_DRIFT_TEXT) : NULL);
	if (redis && parse_int64(have, &a) && parse_int64(db, &b) &&
		!((a > 0 && b < 0 && a > PG_INT64_MAX + b) || (a < 0 && b > 0 && a < PG_INT64_MIN + b)))
		ej_int(&d, "difference", a - b);
	ej_end(&d);
	if (redis_field)
	{
		redis_reply_text(redis_field, name, sizeof(name));
		field = name;
	}
	ej_raw(diffs, field, d.data);
	pfree(d.data);
}

/*
 * The drift the consistency check is about to repair (before the forced
 * push): what Redis holds for each hash against the database's snapshot,
 * field by field.  Noted in TopMemoryContext; written by
 * outbox_drift_repaired() once the push went through.  A Redis failure
 * here notes nothing (the push fails the same way).
 */
void
outbox_note_drift(SyncSnap *snaps, int n)
{
	StringInfoData buf;
	MemoryContext old;
	ListCell   *lc;

	/* what an earlier check noted and did not repair (Redis failed) */
	foreach(lc, noted)
	{
		Repair	   *rep = lfirst(lc);

		pfree(rep->tenant);
		pfree(rep->payload);
		pfree(rep);
	}
	list_free(noted);
	noted = NIL;
	if (!usable || n == 0 || !mirror_connected())
		return;
	initStringInfo(&buf);
	redis_begin("HGETALL");
	for (int i = 0; i < n; i++)
	{
		char	   *key = snaps[i].key_id ?
			psprintf("%s:{%s}:key:%s", billing_redis_prefix, snaps[i].tenant, snaps[i].key_id) :
			psprintf("%s:{%s}", billing_redis_prefix, snaps[i].tenant);

		resp_head(&buf, '*', 2);
		resp_str(&buf, "HGETALL");
		resp_str(&buf, key);
		pfree(key);
	}
	if (!redis_send(&buf, n))
		return;
	pfree(buf.data);
	for (int i = 0; i < n; i++)
	{
		SyncSnap   *s = &snaps[i];
		redisReply *r = redis_receive();
		StringInfoData p;
		StringInfoData diffs;
		int			ndiff = 0;
		int			listed = 0;
		Repair	   *rep;

		if (r == NULL)
			return;
		ej_begin(&p);
		ej_str(&p, "key", s->key_id ?
			   psprintf("%s:{%s}:key:%s", billing_redis_prefix, s->tenant, s->key_id) :
			   psprintf("%s:{%s}", billing_redis_prefix, s->tenant));
		ej_str(&p, "api_key", s->key_id);
		ej_begin(&diffs);
		if (r->type == REDIS_REPLY_ERROR)
		{
			char		why[128];

			redis_reply_text(r, why, sizeof(why));
			ej_str(&p, "problem", why);
			ndiff = s->nfields / 2;
		}
		else if (r->type != REDIS_REPLY_ARRAY || r->elements % 2 != 0)
		{
			(void) redis_unexpected(r, "HGETALL");
			return;
		}
		else if (r->elements > MAX_DRIFT_HASH)
		{
			/* as mirror_match: not a hash the worker wrote; not listed */
			ej_str(&p, "problem", "not a hash the worker wrote");
			ej_int(&p, "redis_fields", (int64) (r->elements / 2));
			ndiff = s->nfields / 2;
		}
		else
		{
			for (size_t e = 0; e < r->elements; e++)
				if (r->element[e]->type != REDIS_REPLY_STRING)
				{
					(void) redis_unexpected(r, "HGETALL (an element)");
					return;
				}
			if (r->elements == 0)
				ej_str(&p, "problem", "the hash was missing");
			/* fields of the database: missing or different in Redis */
			for (int f = 0; f + 1 < s->nfields; f += 2)
			{
				const char *want = s->fields[f + 1];
				const redisReply *have = hash_value(r, s->fields[f]);

				if (strcmp(s->fields[f], "synced_at_ms") == 0)
					continue;
				if (have != NULL && strcmp(have->str, want) == 0)
					continue;
				ndiff++;
				if (listed++ < MAX_DRIFT_FIELDS)
					add_difference(&diffs, s->fields[f], NULL, have, want);
			}
			/* fields only Redis has */
			for (size_t e = 0; e + 1 < r->elements; e += 2)
			{
				const char *name = r->element[e]->str;

				if (strcmp(name, "synced_at_ms") == 0 || strcmp(name, "version") == 0 ||
					snap_value(s, name) != NULL)
					continue;
				ndiff++;
				if (listed++ < MAX_DRIFT_FIELDS)
					add_difference(&diffs, NULL, r->element[e], r->element[e + 1], NULL);
			}
			{
				const redisReply *version = hash_value(r, "version");
				int64		v;

				if (version != NULL && parse_int64(version->str, &v))
					ej_int(&p, "redis_version", v);
			}
		}
		ej_end(&diffs);
		ej_int(&p, "database_version", s->version);
		ej_int(&p, "fields", ndiff);
		ej_raw(&p, "differences", diffs.data);
		ej_end(&p);
		redis_free(r);

		old = MemoryContextSwitchTo(TopMemoryContext);
		rep = palloc0(sizeof(Repair));
		rep->tenant = pstrdup(s->tenant);
		rep->payload = pstrdup(p.data);
		noted = lappend(noted, rep);
		MemoryContextSwitchTo(old);
	}
}

/* the forced push went through: the drift noted is repaired */
void
outbox_drift_repaired(void)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	repairs = list_concat(repairs, noted);
	MemoryContextSwitchTo(old);
	list_free(noted);
	noted = NIL;
}

/* write one mirror.repaired event; false if it must wait (or failed for good) */
static bool
write_repair(Repair *rep)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		begin_xact("billing events: writing mirror.repaired");
		lock_timeout();
		values[0] = CStringGetTextDatum(rep->tenant);
		values[1] = CStringGetTextDatum(rep->payload);
		if (SPI_execute_with_args("SELECT billing.event_write($1, 'mirror.repaired', $2::pg_catalog.jsonb)",
								  2, types, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "billing events: writing mirror.repaired failed");
		end_xact();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
		ok = false;
		if (++rep->attempts >= 10 || edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
		{
			ereport(LOG,
					(errmsg("billing events: could not write mirror.repaired of tenant \"%s\": %s",
							rep->tenant, edata->message)));
			rep->attempts = 10;
		}
		FreeErrorData(edata);
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_END_TRY();
	return ok;
}

/*
 * Write the mirror.repaired events (billing.event_write, which takes the
 * account's lock: at most LOCK_TIMEOUT, else the next round).
 */
static void
write_repairs(void)
{
	List	   *left = NIL;
	ListCell   *lc;

	foreach(lc, repairs)
	{
		Repair	   *rep = lfirst(lc);

		if (write_repair(rep) || rep->attempts >= 10)
		{
			pfree(rep->tenant);
			pfree(rep->payload);
			pfree(rep);
		}
		else
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			left = lappend(left, rep);
			MemoryContextSwitchTo(old);
		}
	}
	list_free(repairs);
	repairs = left;
}

/* ---------------------------------------------------------------------
 * the worker's entry point
 * ---------------------------------------------------------------------
 */

/*
 * In a PG_CATCH of the cycle: back to cxt, end the failed transaction, and
 * log and note the error (of step `what`, NULL: the cycle) unless it is a
 * lock wait that timed out, which the next turn retries quietly.
 */
static void
outbox_caught(MemoryContext cxt, const char *what)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	/*
	 * A lock on the outbox (lock_timeout) is retried quietly: no log line,
	 * no failure; one that holds up the delivery is shown, so that a
	 * backlog says why
	 */
	if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
	{
		ereport(LOG, (errmsg("billing events: %s%s%s", what ? what : "", what ? ": " : "",
							 edata->message)));
		note_error("%s%s%s", what ? what : "", what ? ": " : "", edata->message);
	}
	else if (what == NULL)
		note_wait("delivery waits for a lock on billing.events: %s", edata->message);
	FreeErrorData(edata);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Run one housekeeping step of the cycle (the sweep, the pruning) in an
 * error block of its own: its failure is logged and shown in
 * billing_sync_status() (and waits for the step's next turn), but never
 * holds up the delivery of events.
 */
static bool
outbox_step(const char *what, bool (*step) (void))
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool result = false;

	PG_TRY();
	{
		result = step();
	}
	PG_CATCH();
	{
		outbox_caught(cxt, what);
		result = false;
	}
	PG_END_TRY();
	return result;
}

static bool
sweep_step(void)
{
	sweep();
	return false;
}

/*
 * One round of the events' work (worker.c, after the mirror's pushes and
 * the maintenance): write mirror.repaired, run the sweep and the pruning
 * when due, deliver what was committed since the last round (or every
 * POLL_MS).  An error here is logged and retried after RETRY_MS: the
 * mirror goes on.  True when more is waiting.
 */
bool
outbox_cycle(bool redis_ready)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool more = false;
	TimestampTz now = GetCurrentTimestamp();

	if (outbox_cxt == NULL)
		outbox_cxt = AllocSetContextCreate(TopMemoryContext, "billing events",
										   ALLOCSET_DEFAULT_SIZES);
	log_window_flush(&aside_log, now);	/* the count of a window that has ended */
	if (now < failed_until)
		return false;
	MemoryContextSwitchTo(outbox_cxt);
	PG_TRY();
	{
		if (check_usable(now))
		{
			if (aside != NIL && now >= aside_until)
			{
				ListCell   *lc;

				foreach(lc, aside)
					probing = add_tenant(probing, lfirst(lc));
				list_free_deep(aside);
				aside = NIL;
				aside_until = 0;
			}
			if (repairs != NIL)
				write_repairs();
			if (TimestampDifferenceExceeds(last_sweep, now, billing_maintenance_interval))
			{
				last_sweep = now;
				(void) outbox_step("the alerts' sweep", sweep_step);
			}
			if (TimestampDifferenceExceeds(last_prune, now, PRUNE_MS))
			{
				last_prune = now;
				if (outbox_step("pruning the outbox", prune))
				{
					last_prune = 0;
					more = true;
				}
			}
			if (redis_ready && billing_events != NULL &&
				(!polled_once || redeliver || nunmarked > 0 ||
				 pg_atomic_read_u64(&billing_events->committed) != seen_committed ||
				 TimestampDifferenceExceeds(last_poll, now, POLL_MS)))
			{
				last_poll = now;
				if (deliver())
					more = true;
			}
		}
	}
	PG_CATCH();
	{
		outbox_caught(cxt, NULL);
		redis_free_all();
		/*
		 * A transaction left open, or replies not read, would take the
		 * mirror's commands in or answer them
		 */
		if (in_multi || redis_replies_owed())
			redis_close("billing events: an error in the middle of an exchange with Redis");
		in_multi = false;
		failed_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RETRY_MS);
		usable = false;
		more = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	MemoryContextReset(outbox_cxt);
	return more;
}
