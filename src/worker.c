/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background worker that mirrors committed account state into
 *	  Redis, and runs the periodic maintenance (hold expiry, job rescue):
 *	  its main loop and its database side.
 *
 * The Redis client is redis.c (non-blocking, bounded), the mirror's
 * protocol mirror.c; this file decides when to do what.
 *
 * Start: the worker waits until billing.database can be connected to (a
 * short-lived probe process looks, since a worker can connect to one
 * database only, once), connects as billing.worker_role (default: the
 * bootstrap superuser), and pins every setting a database owner could have
 * set with ALTER DATABASE/ROLE ... SET that would change what its SQL does
 * (pin_environment).
 *
 * Loop (modelled on worker_spi and pg_cron): sleep on the latch (set by
 * committing backends, see sync.c) or a timeout; take the dirty tenants
 * out of shared memory; read their committed snapshots in a short
 * transaction of our own; commit it; only then talk to Redis.  No
 * transaction is ever open during Redis I/O.  While it waits for Redis,
 * signals (SIGTERM, reloads) are handled between wait slices of
 * REDIS_WAIT_SLICE_MS, however slow Redis is.
 *
 * Failures: when Redis is unreachable or misbehaves the tenants go back
 * into the dirty set and the worker retries with a bounded exponential
 * backoff, logging once per outage.  A full resync of every account runs
 * at start (shared memory knows nothing of what Redis has), when the dirty
 * set overflowed, when Redis restarted and when the marker key vanished;
 * a periodic check compares Redis with the database and repairs drift.
 * Both go a page at a time and push the dirty tenants and run the
 * maintenance between pages, so neither holds up the mirror.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "citus.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "compat.h"
#include "events.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "guc.h"
#include "lib/stringinfo.h"
#include "logwindow.h"
#include "miscadmin.h"
#include "mirror.h"
#include "nodes/makefuncs.h"
#include "parser/parse_func.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "redis.h"
#include "spi.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "sync.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

PGDLLEXPORT void billing_worker_main(Datum arg);
PGDLLEXPORT void billing_probe_main(Datum arg);
extern void billing_pin_settings(void);

#define MAX_BACKOFF_MS	5000
#define HEALTHY_MS		10000	/* Redis served this long: the outage is over */
#define PROBE_INTERVAL_MS 5000

static bool outage_logged = false;
static int	backoff_ms = 0;
static TimestampTz next_connect_at = 0;	/* backoff: no attempt before */
static TimestampTz healthy_since = 0;	/* the first good cycle since a failure */
static TimestampTz last_maintenance = 0;
static TimestampTz last_check = 0;
static TimestampTz last_run_id_check = 0;
static TimestampTz last_purge = 0;
static MemoryContext cycle_cxt = NULL;
static MemoryContext page_cxt = NULL;	/* a page of a resync, check or sweep */
static bool busy = false;		/* more to do at once: do not sleep */

/* what we connected with: a change of either restarts the worker */
static char connected_database[NAMEDATALEN];
static char connected_role[NAMEDATALEN];
static char worker_user[NAMEDATALEN];	/* the role it runs as */

/*
 * Tenants whose push failed for a reason of their own (a key of theirs of
 * the wrong type, a snapshot that cannot be built): the rest of the batch
 * goes on, and they are tried again every RETRY_MS (strings in
 * TopMemoryContext).  Beyond RETRY_MAX they are not remembered one by one:
 * a full resync pushes every tenant Redis is behind on (the periodic check
 * may be off: nothing else would), RETRY_MS later, then, while that many
 * keep failing, at twice the interval each time up to OVERFLOW_MAX_MS (a
 * resync reads the whole ledger); the interval starts over after
 * OVERFLOW_RESET_MS without one.
 */
#define RETRY_MS		5000
#define RETRY_MAX		1000
#define OVERFLOW_MAX_MS		(5 * 60 * 1000)
#define OVERFLOW_RESET_MS	(10 * 60 * 1000)
static List *retry_tenants = NIL;
static TimestampTz retry_at = 0;
static bool retry_overflowed = false;
static TimestampTz overflow_at = 0;
static TimestampTz overflow_last = 0;	/* the last resync it asked for */
static int64 overflow_ms = RETRY_MS;

/*
 * Their log lines: at most 10 in a window of RETRY_MS (one starts at the
 * first failure after the last one ended), then, when the window has
 * ended, one line that counts the rest.  A Redis that fails every tenant's
 * push must not fill the server's log; billing_sync_status().last_error has
 * the latest.
 */
static LogWindow retry_log = LOG_WINDOW_INIT("billing sync: could not push", "tenant snapshots",
											 "billing_sync_status().last_error shows the latest.",
											 10, RETRY_MS);

/*
 * Tenants with more key hashes to push than a batch takes (SyncWant), in
 * TopMemoryContext: one of them goes into each batch, round-robin.
 */
static List *continuing = NIL;

/* expiries of grants and holds up to this time have been looked for */
#define REFRESH_MS		250
static TimestampTz expiry_scan_from = 0;

/* a full resync in progress (it may span cycles while an old mirror is wiped) */
static bool resync_started = false;
static uint64 resync_asked = 0;	/* mirror_resync_requests() when it started */
static bool resync_claimed = false;

/* pg_prepared_xacts read since the worker started (two-phase commit) */
static bool prepared_checked = false;

static void begin_xact(const char *what);
static void end_xact(void);
static void push_dirty(void);
static void maintenance_if_due(void);

/* ---------------------------------------------------------------------
 * settings, reloads, backoff
 * ---------------------------------------------------------------------
 */

/* the settings that decide where and how we push: a change means reconnect + resync */
static char *
redis_settings(void)
{
	return psprintf("%s|%d|%s|%s|%s|%d|%s|%d|%s|%s|%s|%s",
					billing_redis_host, billing_redis_port, billing_redis_user,
					billing_redis_password, billing_redis_password_file,
					billing_redis_db, billing_redis_prefix, (int) billing_redis_tls,
					billing_redis_tls_ca_file, billing_redis_tls_cert_file,
					billing_redis_tls_key_file, billing_redis_tls_server_name);
}

/*
 * Process a reload (also while waiting for Redis: a reload must not wait
 * for the current cycle).  False if the Redis settings changed: the
 * connection is closed, the caller's command aborted.
 */
static bool
reload_config(void)
{
	char	   *before = redis_settings();
	char	   *after;
	bool		same;

	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	if (connected_database[0] != '\0' &&
		(strcmp(billing_database, connected_database) != 0 ||
		 strcmp(billing_worker_role, connected_role) != 0))
	{
		ereport(LOG,
				(errmsg("billing sync: billing.database or billing.worker_role changed; the worker restarts to connect anew")));
		proc_exit(1);
	}
	after = redis_settings();
	same = strcmp(before, after) == 0;
	explicit_bzero(before, strlen(before));
	explicit_bzero(after, strlen(after));
	pfree(before);
	pfree(after);
	if (!same)
	{
		redis_close(NULL);		/* reconnect with the new settings */
		next_connect_at = 0;
		backoff_ms = 0;
		healthy_since = 0;
		mirror_request_resync();
	}
	return same;
}

/* redis.c calls this while it waits for Redis */
static bool
wait_hook(void)
{
	if (ConfigReloadPending)
		return reload_config();
	return true;
}

/* the connection was lost: log once per outage, back off */
static void
note_redis_failure(void)
{
	char		why[SYNC_ERROR_LEN];

	if (!redis_take_failure(why, sizeof(why)))
		return;
	if (!outage_logged)
		ereport(LOG,
				(errmsg("billing sync: Redis at %s:%d unavailable: %s",
						billing_redis_host, billing_redis_port, why),
				 errhint("Backends are not affected; the worker retries with backoff and catches up.")));
	outage_logged = true;
	healthy_since = 0;
	backoff_ms = backoff_ms ? Min(backoff_ms * 2, MAX_BACKOFF_MS) : 100;
	/* committing backends set our latch: that must not defeat the backoff */
	next_connect_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), backoff_ms);
}

/*
 * A whole cycle went through with Redis.  The outage (if any) is over once
 * Redis has served every cycle for HEALTHY_MS: not on connect, nor after
 * one good cycle, so a server that accepts connections but fails every
 * write (OOM, READONLY), or one that fails again right after each
 * reconnect, keeps the backoff growing and is logged once, not twice per
 * reconnect.
 */
static void
redis_healthy(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (healthy_since == 0)
		healthy_since = now;
	if (!TimestampDifferenceExceeds(healthy_since, now, HEALTHY_MS))
		return;
	if (outage_logged)
		ereport(LOG,
				(errmsg("billing sync: connected to Redis at %s:%d again; caught up",
						billing_redis_host, billing_redis_port)));
	outage_logged = false;
	backoff_ms = 0;
}

/* ---------------------------------------------------------------------
 * tenants set aside
 * ---------------------------------------------------------------------
 */

/* Remember a tenant whose push failed on its own (see retry_tenants). */
static void
retry_later(const char *tenant, const char *why)
{
	ListCell   *lc;
	MemoryContext old;

	foreach(lc, retry_tenants)
		if (strcmp(lfirst(lc), tenant) == 0)
			return;
	billing_sync_record_error("push failed for tenant %s: %s", tenant, why);
	if (log_window_take(&retry_log))
		ereport(LOG,
				(errmsg("billing sync: could not push the snapshot of tenant \"%s\": %s",
						tenant, why),
				 errdetail("The other tenants are pushed; this one is tried again every %d s.",
						   RETRY_MS / 1000),
				 errhint("A Redis key of that tenant of another type (they must be hashes and a sorted set), or an account whose snapshot cannot be built (see the message).")));
	if (list_length(retry_tenants) >= RETRY_MAX)
	{
		if (!retry_overflowed)
		{
			TimestampTz now = GetCurrentTimestamp();

			if (overflow_last == 0 ||
				TimestampDifferenceExceeds(overflow_last, now, OVERFLOW_RESET_MS))
				overflow_ms = RETRY_MS;
			retry_overflowed = true;
			overflow_at = TimestampTzPlusMilliseconds(now, overflow_ms);
		}
	}
	else
	{
		old = MemoryContextSwitchTo(TopMemoryContext);
		retry_tenants = lappend(retry_tenants, pstrdup(tenant));
		MemoryContextSwitchTo(old);
	}
	if (retry_at == 0)
		retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RETRY_MS);
}

/* When due, put the tenants to retry back into the dirty set. */
static void
retry_due(TimestampTz now)
{
	ListCell   *lc;

	if (retry_overflowed && now >= overflow_at)
	{
		mirror_request_resync();
		retry_overflowed = false;
		overflow_last = now;
		overflow_ms = Min(overflow_ms * 2, OVERFLOW_MAX_MS);
	}
	if (retry_tenants == NIL || now < retry_at)
		return;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	foreach(lc, retry_tenants)
		billing_sync_enqueue(lfirst(lc), now, SYNC_SCAN_ALL, 0, NULL, SYNC_SCAN_ALL);
	LWLockRelease(billing_sync->lock);
	list_free_deep(retry_tenants);
	retry_tenants = NIL;
	retry_at = 0;
}

/* ---------------------------------------------------------------------
 * the database side
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
	/* back to the cycle's memory (commit leaves us in TopMemoryContext) */
	MemoryContextSwitchTo(cycle_cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * (in a transaction) the ledger we read: a new one needs a full resync.  On
 * Citus also this node's group and the hash ranges of its shards: the
 * mirror's marker and wipe are per node (mirror.c).
 */
static void
note_epoch(void)
{
	/*
	 * The extension's OID takes a scan of pg_extension, which has no
	 * syscache; it runs every batch, so it is kept while the schema and the
	 * table (syscache lookups) stay the same ones: a new ledger comes with
	 * a new schema "billing" (dropping the extension drops it) and a new
	 * billing.accounts.
	 */
	static Oid	known_nsp = InvalidOid;
	static Oid	known_accounts = InvalidOid;
	static Oid	known_ext = InvalidOid;
	char		now[64];
	Oid			nsp = get_namespace_oid("billing", true);
	Oid			accounts = OidIsValid(nsp) ? get_relname_relid("accounts", nsp) : InvalidOid;
	Oid			ext;
	int32	   *min = NULL;
	int32	   *max = NULL;
	int			n;

	if (OidIsValid(accounts) && nsp == known_nsp && accounts == known_accounts)
		ext = known_ext;
	else
	{
		ext = get_extension_oid("billing", true);
		if (!OidIsValid(ext))
			nsp = accounts = InvalidOid;
		known_nsp = nsp;
		known_accounts = accounts;
		known_ext = ext;
	}
	n = OidIsValid(accounts) ? billing_local_ranges(accounts, &min, &max) : -1;

	mirror_note_node(n >= 0 ? billing_local_group() : -1, Max(n, 0), min, max);
	snprintf(now, sizeof(now), UINT64_FORMAT ":%u:%u", GetSystemIdentifier(),
			 MyDatabaseId, ext);
	mirror_note_epoch(now);
}

/* the catalog, not SQL: nothing a database owner defines can run here */
static bool
extension_installed(void)
{
	bool		found;

	begin_xact("billing sync: checking for the extension");
	found = OidIsValid(get_extension_oid("billing", true));
	end_xact();
	return found;
}

/*
 * The rights a worker role needs (billing_grant_worker() grants them):
 * NULL when it has them, else what is missing.  The bootstrap superuser
 * has them all.
 */
static char *
missing_rights(void)
{
	static const char *const tables[] = {"accounts", "api_keys", "holds"};
	static const struct
	{
		const char *name;
		int			nargs;
		Oid			args[3];
	}			functions[] =
	{
		{"sync_snapshot", 3, {TEXTARRAYOID, TEXTOID, INT4OID}},
		{"sync_snapshot_of", 1, {TEXTARRAYOID}},
		{"maintenance", 0, {InvalidOid}},
		{"local_shards", 1, {REGCLASSOID}},
	};
	Oid			role = GetUserId();
	Oid			nsp;
	char	   *missing = NULL;

	begin_xact("billing sync: checking its rights");
	if (superuser())
	{
		end_xact();
		return NULL;
	}
	nsp = get_namespace_oid("billing", true);
	if (!OidIsValid(nsp) || billing_namespace_aclcheck(nsp, role, ACL_USAGE) != ACLCHECK_OK)
		missing = "USAGE on schema billing";
	for (int i = 0; missing == NULL && i < lengthof(tables); i++)
	{
		Oid			rel = get_relname_relid(tables[i], nsp);

		if (!OidIsValid(rel) || pg_class_aclcheck(rel, role, ACL_SELECT) != ACLCHECK_OK)
			missing = psprintf("SELECT on billing.%s", tables[i]);
	}
	for (int i = 0; missing == NULL && i < lengthof(functions); i++)
	{
		Oid			fn = LookupFuncName(list_make2(makeString("billing"),
												   makeString(unconstify(char *, functions[i].name))),
										functions[i].nargs, functions[i].args, true);

		if (!OidIsValid(fn) || billing_proc_aclcheck(fn, role, ACL_EXECUTE) != ACLCHECK_OK)
			missing = psprintf("EXECUTE on billing.%s()", functions[i].name);
	}
	if (missing != NULL)
		missing = MemoryContextStrdup(cycle_cxt, missing);
	end_xact();
	return missing;
}

/*
 * Pin every setting that a database owner (ALTER DATABASE ... SET), or
 * whoever may set the worker role's settings, could have set and that
 * changes what the worker's SQL does or whom it runs as.  Override level:
 * neither the configuration file nor a later reload changes them; the SET
 * clause of a function still applies inside it.  Planner settings
 * (enable_*, costs, work_mem, parallelism) change plans, never results,
 * and synchronous_commit only the durability of the maintenance's commits
 * (which the next round redoes): those are left to the DBA.
 */
static const char *const pins[][2] = {
	{"role", "none"},
	{"search_path", "pg_catalog, pg_temp"},
	{"default_transaction_read_only", "off"},
	{"default_transaction_isolation", "read committed"},
	{"default_transaction_deferrable", "off"},
	{"statement_timeout", "0"},
	{"lock_timeout", "0"},
	{"idle_in_transaction_session_timeout", "0"},
	{"idle_session_timeout", "0"},
	{"row_security", "off"},	/* an error, never a silently filtered mirror */
	{"session_replication_role", "origin"}, /* triggers fire */
	{"exit_on_error", "off"},
	BILLING_PINNED_BY_VERSION	/* compat.h */
	{"check_function_bodies", "on"},
	{"DateStyle", "ISO, MDY"},
	{"IntervalStyle", "postgres"},
	{"TimeZone", "UTC"},
	{"extra_float_digits", "1"},
	{"bytea_output", "hex"},
	{"standard_conforming_strings", "on"},
	{"array_nulls", "on"},
	{"transform_null_equals", "off"},
	{"quote_all_identifiers", "off"},
	{"lc_monetary", "C"},
	{"lc_numeric", "C"},
	{"lc_time", "C"},
	{"plpgsql.extra_errors", "none"},
	{"plpgsql.extra_warnings", "none"},
	{"plpgsql.variable_conflict", "error"},
	{"plpgsql.check_asserts", "on"},
};

/* (in a transaction) the pins above; the charge engine's workers use them too */
void
billing_pin_settings(void)
{
	/* plpgsql's settings exist once it is loaded */
	load_file("plpgsql", false);
	for (int i = 0; i < lengthof(pins); i++)
		SetConfigOption(pins[i][0], pins[i][1], PGC_SUSET, PGC_S_OVERRIDE);
}

static void
pin_environment(void)
{
	char	   *authenticated;

	StartTransactionCommand();
	authenticated = GetUserNameFromId(GetAuthenticatedUserId(), false);
	strlcpy(worker_user, authenticated, sizeof(worker_user));
	SetConfigOption("session_authorization", authenticated, PGC_SUSET, PGC_S_OVERRIDE);
	billing_pin_settings();
	CommitTransactionCommand();

	if (GetUserId() != GetAuthenticatedUserId() ||
		GetSessionUserId() != GetAuthenticatedUserId())
		ereport(FATAL,
				(errmsg("billing sync: the worker does not run as the role it connected as")));
}

/*
 * Read snapshots of the tenants after `after` in tenant order (a page of a
 * resync or of the check), every key hash of each.  Everything is copied
 * into cxt before commit.  *last: the last tenant of the page, NULL at the
 * end.
 */
static int
read_page_sql(const char *after, int limit, MemoryContext cxt, SyncSnap **out,
			  char **last)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {TEXTARRAYOID, TEXTOID, INT4OID};
	Datum		values[3];
	char		nulls[3] = {'n', ' ', ' '};
	SyncSnap   *snaps;
	int			n;

	begin_xact("billing sync: reading snapshots");
	note_epoch();
	if (plan == NULL)
	{
		plan = SPI_prepare("SELECT tenant_id, key_id, version, fields "
						   "FROM billing.sync_snapshot($1, $2, $3)", 3, types);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "billing sync: preparing the snapshot query failed");
	}
	values[0] = (Datum) 0;
	values[1] = CStringGetTextDatum(after);
	values[2] = Int32GetDatum(limit);
	if (SPI_execute_plan(plan, values, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing sync: reading snapshots failed");

	n = SPI_processed;
	*last = NULL;
	snaps = MemoryContextAllocZero(cxt, sizeof(SyncSnap) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum		d;
		Datum	   *elems;
		bool	   *enulls;
		int			nelems;
		MemoryContext old = MemoryContextSwitchTo(cxt);

		snaps[i].tenant = TextDatumGetCString(SPI_getbinval(tup, desc, 1, &isnull));
		d = SPI_getbinval(tup, desc, 2, &isnull);
		snaps[i].key_id = isnull ? NULL : TextDatumGetCString(d);
		snaps[i].version = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
		d = SPI_getbinval(tup, desc, 4, &isnull);
		deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &enulls, &nelems);
		snaps[i].nfields = nelems;
		snaps[i].fields = palloc(sizeof(char *) * Max(nelems, 1));
		for (int f = 0; f < nelems; f++)
			snaps[i].fields[f] = enulls[f] ? pstrdup("") : TextDatumGetCString(elems[f]);
		if (!snaps[i].key_id)
			*last = snaps[i].tenant;
		MemoryContextSwitchTo(old);
	}
	end_xact();
	*out = snaps;
	return n;
}

/*
 * The snapshots the wants ask for, in one transaction (snapshot.c), at
 * most a batch's worth of key hashes per tenant (max_keys; 0: every one).
 */
static int
read_tenants(SyncWant *wants, int n, int max_keys, MemoryContext cxt, SyncSnap **out)
{
	int			nsnaps;

	begin_xact("billing sync: reading snapshots");
	note_epoch();
	nsnaps = billing_snapshot_build(wants, n, max_keys, cxt, out);
	end_xact();
	return nsnaps;
}

/* read_tenants, an error returned (copied) instead of raised */
static bool
try_read_tenants(SyncWant *wants, int n, int max_keys, MemoryContext cxt,
				 SyncSnap **out, int *nsnaps, ErrorData **error)
{
	MemoryContext old = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		*nsnaps = read_tenants(wants, n, max_keys, cxt, out);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(old);
		*error = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(old);
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/*
 * The snapshots of a batch of wants.  When the batch fails, every tenant
 * is read on its own: one whose snapshot cannot be built is set aside
 * (retry_later) and the others go on.  If every one fails, the error
 * concerns them all (the extension dropped, ...): it is raised.
 */
static int
read_dirty(SyncWant *wants, int n, int max_keys, MemoryContext cxt, SyncSnap **out)
{
	SyncSnap   *all;
	int			nall = 0;
	int			cap = 16;
	ErrorData  *first = NULL;
	int			nfailed = 0;

	if (try_read_tenants(wants, n, max_keys, cxt, out, &nall, &first))
		return nall;
	if (n == 1)
	{
		retry_later(wants[0].tenant, first->message);
		FreeErrorData(first);
		return 0;
	}

	/* one by one */
	all = MemoryContextAlloc(cxt, sizeof(SyncSnap) * cap);
	nall = 0;
	for (int i = 0; i < n; i++)
	{
		SyncSnap   *one = NULL;
		int			none = 0;
		ErrorData  *edata = NULL;

		CHECK_FOR_INTERRUPTS();
		if (!try_read_tenants(&wants[i], 1, max_keys, cxt, &one, &none, &edata))
		{
			nfailed++;
			wants[i].more = false;
			if (nfailed < n)
				retry_later(wants[i].tenant, edata->message);
			FreeErrorData(edata);
			continue;
		}
		for (int j = 0; j < none; j++)
		{
			if (nall == cap)
			{
				cap *= 2;
				all = repalloc(all, sizeof(SyncSnap) * cap);
			}
			all[nall++] = one[j];
		}
	}
	if (nfailed == n)
		ReThrowError(first);
	FreeErrorData(first);
	*out = all;
	return nall;
}

/* the tenant ids of a page (when reading its snapshots at once failed; the sweep) */
static int
page_tenants(const char *after, int limit, MemoryContext cxt, char ***out)
{
	Oid			types[2] = {TEXTOID, INT4OID};
	Datum		values[2];
	char	  **tenants;
	int			n;

	begin_xact("billing sync: reading tenant ids");
	values[0] = CStringGetTextDatum(after);
	values[1] = Int32GetDatum(limit);
	if (SPI_execute_with_args("SELECT a.tenant_id FROM billing.accounts a "
							  "WHERE a.tenant_id OPERATOR(pg_catalog.>) $1 "
							  "ORDER BY a.tenant_id LIMIT $2",
							  2, types, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing sync: reading tenant ids failed");
	n = SPI_processed;
	tenants = MemoryContextAlloc(cxt, sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		bool		isnull;

		tenants[i] = MemoryContextStrdup(cxt,
										 TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[i],
																		   SPI_tuptable->tupdesc, 1, &isnull)));
	}
	end_xact();
	*out = tenants;
	return n;
}

/* read_page_sql, an error returned (copied) instead of raised */
static bool
try_read_page(const char *after, int limit, MemoryContext cxt, SyncSnap **out,
			  char **last, int *n, ErrorData **error)
{
	MemoryContext old = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		*n = read_page_sql(after, limit, cxt, out, last);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(old);
		*error = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(old);
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/*
 * A page of a resync or of the check: the snapshots of the tenants after
 * `after` (in page_cxt, which the pushes between its slices leave alone).
 * *last is the page's last tenant, NULL at the end.  When the page cannot
 * be read at once, its tenants are read one by one and a tenant whose
 * snapshot fails is set aside (read_dirty): one account must not stop
 * every resync.
 */
static int
read_page(const char *after, int limit, SyncSnap **out, char **last)
{
	int			n = 0;
	ErrorData  *error = NULL;
	char	  **tenants;
	SyncWant   *wants;

	MemoryContextReset(page_cxt);
	if (try_read_page(after, limit, page_cxt, out, last, &n, &error))
		return n;
	n = page_tenants(after, limit, page_cxt, &tenants);
	if (n == 0)
		ReThrowError(error);
	FreeErrorData(error);
	wants = MemoryContextAllocZero(page_cxt, sizeof(SyncWant) * n);
	for (int i = 0; i < n; i++)
	{
		wants[i].tenant = tenants[i];
		wants[i].scan_since = SYNC_SCAN_ALL;
	}
	*last = tenants[n - 1];
	return read_dirty(wants, n, 0, page_cxt, out);
}

/* ---------------------------------------------------------------------
 * the dirty tenants
 * ---------------------------------------------------------------------
 */

/* a copy of a want in cxt */
static SyncWant *
copy_want(const SyncWant *w, MemoryContext cxt)
{
	SyncWant   *c = MemoryContextAlloc(cxt, sizeof(SyncWant));

	*c = *w;
	c->tenant = MemoryContextStrdup(cxt, w->tenant);
	c->keys = MemoryContextAlloc(cxt, sizeof(char *) * Max(w->nkeys, 1));
	for (int k = 0; k < w->nkeys; k++)
		c->keys[k] = MemoryContextStrdup(cxt, w->keys[k]);
	c->after_key = w->after_key ? MemoryContextStrdup(cxt, w->after_key) : NULL;
	return c;
}

static void
free_want(SyncWant *w)
{
	for (int k = 0; k < w->nkeys; k++)
		pfree(w->keys[k]);
	pfree(w->keys);
	if (w->after_key)
		pfree(w->after_key);
	pfree(w->tenant);
	pfree(w);
}

/* the oldest commit of the tenants in progress (continuing), 0 if none */
static TimestampTz
continuing_oldest(void)
{
	TimestampTz oldest = 0;
	ListCell   *lc;

	foreach(lc, continuing)
	{
		SyncWant   *w = lfirst(lc);

		if (w->first_commit != 0 && (oldest == 0 || w->first_commit < oldest))
			oldest = w->first_commit;
	}
	return oldest;
}

/* Put wants back into the dirty set (a failed push). */
static void
requeue(SyncWant *wants, int n)
{
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
		billing_sync_enqueue(wants[i].tenant, wants[i].first_commit, wants[i].scan_since,
							 wants[i].nkeys, wants[i].keys, SYNC_SCAN_ALL);
	billing_sync->inflight_oldest = continuing_oldest();
	LWLockRelease(billing_sync->lock);
}

/*
 * The next batch: up to `max` dirty tenants out of shared memory, and a
 * tenant in progress (continuing, round-robin: the batch after it takes
 * the next one).  A dirty tenant that is in progress goes on where it
 * stopped: every key its new commits changed has a version above the
 * last one pushed (they committed after that read), so the scan finds
 * them after the stop.
 */
static int
drain(SyncWant **wants, int max)
{
	int			n;
	SyncWant   *w = MemoryContextAllocZero(cycle_cxt, sizeof(SyncWant) * (max + 1));
	TimestampTz oldest = 0;
	bool		taken = false;

	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	n = billing_sync_dequeue(w, max, cycle_cxt);
	LWLockRelease(billing_sync->lock);

	for (int i = 0; i < n; i++)
	{
		ListCell   *lc;

		foreach(lc, continuing)
		{
			SyncWant   *c = lfirst(lc);

			if (strcmp(c->tenant, w[i].tenant) != 0)
				continue;
			w[i].scan_since = Min(w[i].scan_since, c->scan_since);
			w[i].resume = c->resume;
			w[i].after_version = c->after_version;
			w[i].after_key = c->after_key ? MemoryContextStrdup(cycle_cxt, c->after_key) : NULL;
			if (c->first_commit != 0 && c->first_commit < w[i].first_commit)
				w[i].first_commit = c->first_commit;
			continuing = foreach_delete_current(continuing, lc);
			free_want(c);
			taken = true;
			break;
		}
	}
	if (!taken && continuing != NIL)
	{
		SyncWant   *c = linitial(continuing);
		SyncWant   *copy = copy_want(c, cycle_cxt);

		continuing = list_delete_first(continuing);
		free_want(c);
		w[n++] = *copy;
	}

	for (int i = 0; i < n; i++)
		if (w[i].first_commit != 0 && (oldest == 0 || w[i].first_commit < oldest))
			oldest = w[i].first_commit;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->inflight_oldest = oldest;
	LWLockRelease(billing_sync->lock);
	*wants = w;
	return n;
}

/* a want with keys left goes on in a later batch, after the others in progress */
static void
continue_later(SyncWant *w)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	SyncWant	rest = *w;

	rest.more = false;
	rest.nkeys = 0;				/* the named keys went with this batch */
	continuing = lappend(continuing, copy_want(&rest, TopMemoryContext));
	MemoryContextSwitchTo(old);
}

/* push; a tenant refused for its own keys is set aside */
static bool
push(SyncSnap *snaps, int n, MirrorApply mode)
{
	char	  **errors = MemoryContextAllocZero(cycle_cxt, sizeof(char *) * Max(n, 1));

	if (!mirror_push(snaps, n, mode, errors))
		return false;
	for (int i = 0; i < n; i++)
		if (errors[i] != NULL)
			retry_later(snaps[i].tenant, errors[i]);
	return true;
}

/*
 * Push the dirty tenants; on failure they go back into the set.  At most
 * billing.sync_batch_size key hashes of one tenant go into a batch: a
 * tenant with more (20,000 keys after a time zone change) goes on in the
 * batches after, one of its turns per batch, so that it never holds up the
 * other tenants by more than a batch.  Pushes replace a hash of the same
 * version too (APPLY_REFRESH: a tenant marked for an expiry that passed,
 * see refresh_expired, has its expired credit and holds left out).  After
 * a second of tenants in progress, the main loop gets a turn (busy).
 */
static void
push_dirty(void)
{
	TimestampTz started = GetCurrentTimestamp();

	for (;;)
	{
		SyncWant   *wants;
		SyncSnap   *snaps = NULL;
		int			n;
		int			nsnaps;
		volatile bool pushed;

		if (ConfigReloadPending)
			(void) reload_config();
		if (!mirror_connected())
			return;
		n = drain(&wants, billing_sync_batch_size);
		if (n == 0)
			break;
		PG_TRY();
		{
			nsnaps = read_dirty(wants, n, billing_sync_batch_size, cycle_cxt, &snaps);
		}
		PG_CATCH();
		{
			requeue(wants, n);
			PG_RE_THROW();
		}
		PG_END_TRY();
		/* an error in the push (a cancel while waiting on Redis): requeued too */
		PG_TRY();
		{
			pushed = push(snaps, nsnaps, APPLY_REFRESH);
		}
		PG_CATCH();
		{
			requeue(wants, n);
			PG_RE_THROW();
		}
		PG_END_TRY();
		if (!pushed)
		{
			requeue(wants, n);
			MemoryContextReset(cycle_cxt);
			return;
		}
		for (int i = 0; i < n; i++)
			if (wants[i].more)
				continue_later(&wants[i]);
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		billing_sync->inflight_oldest = continuing_oldest();
		LWLockRelease(billing_sync->lock);
		MemoryContextReset(cycle_cxt);
		CHECK_FOR_INTERRUPTS();
		if (continuing != NIL &&
			TimestampDifferenceExceeds(started, GetCurrentTimestamp(), 1000))
		{
			busy = true;
			return;
		}
	}
}

/* between the pages (or slices) of a resync, a check or a sweep: the mirror goes on */
static void
between_pages(void)
{
	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
		(void) reload_config();
	MemoryContextReset(cycle_cxt);
	push_dirty();				/* resets cycle_cxt too */
	maintenance_if_due();
	(void) outbox_cycle(mirror_connected());	/* the events go on too */
}

/*
 * Push a page's snapshots, billing.sync_batch_size at a time with the
 * dirty tenants between (a tenant's keys still go before its hash): one
 * tenant with many keys must not hold up the mirror for a whole page.
 */
static bool
push_sliced(SyncSnap *snaps, int n, MirrorApply mode)
{
	for (int at = 0; at < n; at += billing_sync_batch_size)
	{
		if (at > 0)
		{
			between_pages();
			if (!mirror_connected())
				return false;
		}
		if (!push(snaps + at, Min(billing_sync_batch_size, n - at), mode))
			return false;
	}
	return true;
}

static void
resync_failed(void)
{
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->overflow = true;	/* start over when Redis is back */
	LWLockRelease(billing_sync->lock);
	resync_started = false;
	MemoryContextReset(cycle_cxt);
	MemoryContextReset(page_cxt);
}

/*
 * Transactions prepared before this worker started (two-phase commit, e.g.
 * Citus committing a transaction that wrote on several nodes) may have
 * changed accounts; their marks were in the old shared memory, or are not
 * known to a new worker: resync once more when each is resolved (sync.c).
 */
static void
track_prepared(void)
{
	if (prepared_checked)
		return;
	begin_xact("billing sync: looking for prepared transactions");
	if (SPI_execute("SELECT transaction FROM pg_catalog.pg_prepared_xacts "
					"WHERE database OPERATOR(pg_catalog.=) pg_catalog.current_database()",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing sync: reading pg_prepared_xacts failed");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			billing_sync_track_prepared(DatumGetTransactionId(d));
	}
	end_xact();
	prepared_checked = true;
}

/*
 * Push every account, a page at a time, the dirty tenants between pages.
 * A wipe of another ledger's mirror may take several cycles (busy).
 */
static void
resync_all(void)
{
	char		after[SYNC_TENANT_LEN] = "";

	if (!resync_started)
	{
		/*
		 * Marks lost from now on set overflow again; until this resync is
		 * done, the mirror's resync stays pending, so an error half-way (a
		 * cancel, a database error) starts it over instead of forgetting it.
		 * The tenants in progress are pushed whole by it.
		 */
		mirror_request_resync();
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		billing_sync->overflow = false;
		LWLockRelease(billing_sync->lock);
		begin_xact("billing sync: reading the ledger identity");
		note_epoch();
		end_xact();
		track_prepared();
		resync_started = true;
		resync_asked = mirror_resync_requests();	/* what this resync answers */
		resync_claimed = false;
		while (continuing != NIL)
		{
			free_want(linitial(continuing));
			continuing = list_delete_first(continuing);
		}
	}
	if (!resync_claimed)
	{
		switch (mirror_claim())
		{
			case CLAIM_FAILED:
				resync_failed();
				return;
			case CLAIM_MORE:
				busy = true;	/* the main loop comes back at once */
				return;
			case CLAIM_DONE:
				break;
		}
		resync_claimed = true;
		/* set the marker first: a FLUSHALL during the resync removes it again */
		if (!mirror_set_marker())
		{
			resync_failed();
			return;
		}
	}
	for (;;)
	{
		SyncSnap   *snaps;
		char	   *last = NULL;
		int			n;

		n = read_page(after, billing_sync_batch_size, &snaps, &last);
		if (n == 0 && last == NULL)
			break;
		if (last != NULL)
			strlcpy(after, last, sizeof(after));
		if (!push_sliced(snaps, n, APPLY_NEWER))
		{
			resync_failed();
			return;
		}
		if (last == NULL)
			break;
		between_pages();
		if (!mirror_connected())
		{
			resync_failed();
			return;
		}
	}
	MemoryContextReset(cycle_cxt);
	MemoryContextReset(page_cxt);
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->last_full_resync_at = GetCurrentTimestamp();
	billing_sync->full_resyncs++;
	LWLockRelease(billing_sync->lock);
	resync_started = false;
	mirror_resync_done(resync_asked);
	ereport(DEBUG1, (errmsg("billing sync: full resync done")));
}

/*
 * Check one slice of a page (check_all): compare, read the suspects again,
 * repair what drifted, push what is behind.  False if Redis failed.
 */
static bool
check_slice(SyncSnap *snaps, int n, int64 *repaired)
{
	char	  **suspects = MemoryContextAlloc(cycle_cxt, sizeof(char *) * Max(n, 1));
	MirrorMatch *verdict = MemoryContextAlloc(cycle_cxt, sizeof(MirrorMatch) * Max(n, 1));
	int			nsuspects = 0;
	SyncWant   *wants;
	SyncSnap   *fresh;
	SyncSnap   *drifted;
	SyncSnap   *behind;
	int			ndrifted = 0;
	int			nbehind = 0;
	int			nfresh;

	if (!mirror_match(snaps, n, verdict))
		return false;
	for (int i = 0; i < n; i++)
		if (verdict[i] != MATCH_SAME &&
			(nsuspects == 0 || strcmp(suspects[nsuspects - 1], snaps[i].tenant) != 0))
			suspects[nsuspects++] = snaps[i].tenant;
	if (nsuspects == 0)
		return true;

	wants = MemoryContextAllocZero(cycle_cxt, sizeof(SyncWant) * nsuspects);
	for (int i = 0; i < nsuspects; i++)
	{
		wants[i].tenant = suspects[i];
		wants[i].scan_since = SYNC_SCAN_ALL;
	}
	nfresh = read_dirty(wants, nsuspects, 0, cycle_cxt, &fresh);
	drifted = MemoryContextAlloc(cycle_cxt, sizeof(SyncSnap) * Max(nfresh, 1));
	behind = MemoryContextAlloc(cycle_cxt, sizeof(SyncSnap) * Max(nfresh, 1));
	verdict = MemoryContextAlloc(cycle_cxt, sizeof(MirrorMatch) * Max(nfresh, 1));
	if (!mirror_match(fresh, nfresh, verdict))
		return false;
	for (int i = 0; i < nfresh; i++)
	{
		if (verdict[i] == MATCH_DRIFT)
			drifted[ndrifted++] = fresh[i];
		else if (verdict[i] == MATCH_BEHIND)
			behind[nbehind++] = fresh[i];
	}
	if (ndrifted > 0)
	{
		/* mirror.repaired (outbox.c): what Redis held, then the repair */
		outbox_note_drift(drifted, ndrifted);
		if (!push(drifted, ndrifted, APPLY_FORCE))
			return false;
		outbox_drift_repaired();
		*repaired += ndrifted;
	}
	if (nbehind > 0 && !push(behind, nbehind, APPLY_REFRESH))
		return false;
	return true;
}

/*
 * The periodic consistency check: compare what Redis holds with the
 * database for every account and key hash, and force-apply the database
 * state where they differ: repairs hashes edited by hand or left newer than
 * the database (e.g. after a restore).  A hash that differs only because a
 * commit landed between our read and the comparison is not drift: suspects
 * are read again from the database and compared once more; an older
 * version in Redis is pushed as usual, never counted as a repair; nor is a
 * hash that differs only in the counters of a day or month that ended
 * since it was pushed (the gateways count them as 0), or in what expired
 * since (holds, grant credit: pushed again, APPLY_REFRESH).  A page goes a
 * slice of billing.sync_batch_size hashes at a time, the dirty tenants
 * pushed between.
 */
static void
check_all(void)
{
	char		after[SYNC_TENANT_LEN] = "";
	int64		repaired = 0;

	for (;;)
	{
		SyncSnap   *snaps;
		char	   *last = NULL;
		int			n;
		bool		ok = true;

		n = read_page(after, billing_sync_batch_size, &snaps, &last);
		if (n == 0 && last == NULL)
			break;
		if (last != NULL)
			strlcpy(after, last, sizeof(after));
		for (int at = 0; at < n && ok; at += billing_sync_batch_size)
		{
			if (at > 0)
			{
				between_pages();
				if (!mirror_connected())
					return;
			}
			ok = check_slice(snaps + at, Min(billing_sync_batch_size, n - at), &repaired);
		}
		if (!ok)
			return;
		if (last == NULL)
			break;
		between_pages();
		if (!mirror_connected())
			return;
	}
	MemoryContextReset(cycle_cxt);
	MemoryContextReset(page_cxt);
	if (repaired > 0)
		ereport(LOG, (errmsg("billing sync: consistency check repaired " INT64_FORMAT " Redis hashes", repaired)));
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->repaired += repaired;
	billing_sync->last_check_at = GetCurrentTimestamp();
	LWLockRelease(billing_sync->lock);
}

/*
 * Tenants whose grant credit or holds expired since we last looked are
 * dirty: their hashes show what they hold now (expired credit and holds
 * left out, APPLY_REFRESH at the same version) even if nothing else
 * happens on them; the maintenance's expiry entries, when it gets to
 * them, are pushed as any change.  Gateways leave expired credit out by
 * Redis' clock before that (grants_expiries); this bounds how long a hash
 * itself shows it.  The indexes on both columns make this a short range
 * scan.
 */
static void
refresh_expired(void)
{
	static SPIPlanPtr plan = NULL;
	static SPIPlanPtr plan13 = NULL;
	Oid			types[2] = {TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[2];
	TimestampTz now = GetCurrentTimestamp();
	SPIPlanPtr	p;
	uint64		n;

	if (expiry_scan_from == 0)
	{
		expiry_scan_from = now; /* what expired before: the start's resync */
		return;
	}
	if (!TimestampDifferenceExceeds(expiry_scan_from, now, REFRESH_MS))
		return;
	begin_xact("billing sync: looking for expiries");
	if (OidIsValid(get_relname_relid("accounts", get_namespace_oid("billing", false))) &&
		get_attnum(get_relname_relid("accounts", get_namespace_oid("billing", false)),
				   "grants_next_expiry") != InvalidAttrNumber)
		p = billing_keep_plan(&plan,
							  "SELECT a.tenant_id FROM billing.accounts a "
							  "WHERE (a.grants_next_expiry OPERATOR(pg_catalog.>) $1 "
							  "       AND a.grants_next_expiry OPERATOR(pg_catalog.<=) $2) "
							  "   OR (a.holds_next_expiry OPERATOR(pg_catalog.>) $1 "
							  "       AND a.holds_next_expiry OPERATOR(pg_catalog.<=) $2)",
							  2, types);
	else
		p = billing_keep_plan(&plan13,	/* 1.3: no grants */
							  "SELECT a.tenant_id FROM billing.accounts a "
							  "WHERE a.holds_next_expiry OPERATOR(pg_catalog.>) $1 "
							  "  AND a.holds_next_expiry OPERATOR(pg_catalog.<=) $2",
							  2, types);
	values[0] = TimestampTzGetDatum(expiry_scan_from);
	values[1] = TimestampTzGetDatum(now);
	billing_spi_read(p, values, NULL, "looking for expiries");
	n = SPI_processed;
	if (n > 0)
	{
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		for (uint64 i = 0; i < n; i++)
		{
			char	   *t = billing_col_cstring((int) i, 1, CurrentMemoryContext);

			if (strlen(t) < SYNC_TENANT_LEN)
				billing_sync_enqueue(t, now, SYNC_NO_SCAN, 0, NULL, SYNC_SCAN_ALL);
		}
		LWLockRelease(billing_sync->lock);
	}
	end_xact();
	expiry_scan_from = now;
}

/*
 * The reservation sweep (lua/purge.lua): every account's expired gateway
 * reservations, and those settled at a version its hash holds, leave
 * Redis, also for tenants nobody charges any more (the gateway scripts
 * remove them only from the tenants they charge).  A page of accounts at a
 * time, the dirty tenants pushed between.
 */
static void
purge_all(void)
{
	char		after[SYNC_TENANT_LEN] = "";
	int64		removed = 0;

	for (;;)
	{
		char	  **tenants;
		int64		n_removed;
		int			n;

		MemoryContextReset(page_cxt);
		n = page_tenants(after, billing_sync_batch_size, page_cxt, &tenants);
		if (n == 0)
			break;
		if (!mirror_purge(tenants, n, &n_removed))
			return;
		removed += n_removed;
		if (n < billing_sync_batch_size)
			break;
		strlcpy(after, tenants[n - 1], sizeof(after));
		between_pages();
		if (!mirror_connected())
			return;
	}
	MemoryContextReset(page_cxt);
	ereport(DEBUG1,
			(errmsg("billing sync: reservation sweep removed " INT64_FORMAT " expired or settled reservations",
					removed)));
}

/*
 * Expire due holds and rescue stuck jobs: correctness never waits for this.
 * It must not wait either: an account row locked by a long transaction
 * would stall the worker, and with it every push.  Accounts that are
 * locked are skipped (billing.expire_due_holds) and any other lock wait
 * gives up after MAINTENANCE_LOCK_TIMEOUT; the next round tries again.
 */
#define MAINTENANCE_LOCK_TIMEOUT "200ms"

static void
maintenance(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		begin_xact("billing sync: maintenance");
		(void) set_config_option("lock_timeout", MAINTENANCE_LOCK_TIMEOUT,
								 PGC_SUSET, PGC_S_SESSION, GUC_ACTION_LOCAL,
								 true, 0, false);
		if (SPI_execute("SELECT billing.maintenance()", false, 0) != SPI_OK_SELECT)
			elog(ERROR, "billing sync: maintenance failed");
		end_xact();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
			PG_RE_THROW();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
		ereport(DEBUG1,
				(errmsg("billing sync: maintenance skipped a locked row: %s",
						edata->message)));
		FreeErrorData(edata);
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_END_TRY();
}

static void
maintenance_if_due(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (TimestampDifferenceExceeds(last_maintenance, now, billing_maintenance_interval))
	{
		last_maintenance = now;
		maintenance();
	}
}

/* on exit: billing_sync_status() must not show a dead worker as connected */
static void
worker_exit(int code, Datum arg)
{
	redis_free_all();
	redis_close(NULL);
	if (billing_sync == NULL)
		return;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	if (billing_sync->worker_pid == MyProcPid)
	{
		billing_sync->worker_pid = 0;
		billing_sync->worker_latch = NULL;
		billing_sync->connected = false;
	}
	LWLockRelease(billing_sync->lock);
}

/* ---------------------------------------------------------------------
 * waiting for billing.database
 * ---------------------------------------------------------------------
 */

/*
 * The probe: a short-lived worker connected to no database (shared
 * catalogs only) that says whether the main worker can connect to
 * billing.database as billing.worker_role, and if not why.  bgw_extra
 * holds the two names.
 */
void
billing_probe_main(Datum arg)
{
	const char *dbname = MyBgworkerEntry->bgw_extra;
	const char *rolename = MyBgworkerEntry->bgw_extra + NAMEDATALEN;
	char		problem[SYNC_ERROR_LEN] = "";
	bool		found = false;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("billing sync probe");

	/*
	 * Without a database only the nailed shared catalogs can be read, by
	 * sequential scans (as the autovacuum launcher reads pg_database).
	 */
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database d = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(d->datname), dbname) != 0)
			continue;
		found = true;
		if (!d->datallowconn)
			snprintf(problem, sizeof(problem),
					 "database \"%s\" (billing.database) does not allow connections", dbname);
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	if (!found)
		snprintf(problem, sizeof(problem),
				 "database \"%s\" (billing.database) does not exist", dbname);

	if (problem[0] == '\0' && rolename[0] != '\0')
	{
		found = false;
		rel = table_open(AuthIdRelationId, AccessShareLock);
		scan = table_beginscan_catalog(rel, 0, NULL);
		while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
		{
			Form_pg_authid a = (Form_pg_authid) GETSTRUCT(tup);

			if (strcmp(NameStr(a->rolname), rolename) != 0)
				continue;
			found = true;
#ifndef BGWORKER_BYPASS_ROLELOGINCHECK
			if (!a->rolcanlogin)
				snprintf(problem, sizeof(problem),
						 "role \"%s\" (billing.worker_role) is not allowed to log in (LOGIN)", rolename);
#endif
		}
		table_endscan(scan);
		table_close(rel, AccessShareLock);
		if (!found)
			snprintf(problem, sizeof(problem),
					 "role \"%s\" (billing.worker_role) does not exist", rolename);
	}
	CommitTransactionCommand();

	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	strlcpy(billing_sync->probe_problem, problem, sizeof(billing_sync->probe_problem));
	LWLockRelease(billing_sync->lock);
	proc_exit(0);
}

/*
 * Ask a probe; false with *problem set if the worker cannot connect now.
 * True also when no probe could be started (no free worker slot): then
 * connecting is the test.
 */
static bool
probe_database(char *problem, size_t len)
{
	BackgroundWorker w;
	BackgroundWorkerHandle *handle;

	memset(&w, 0, sizeof(w));
	w.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	w.bgw_start_time = BgWorkerStart_RecoveryFinished;
	w.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(w.bgw_library_name, "billing", BGW_MAXLEN);
	strlcpy(w.bgw_function_name, "billing_probe_main", BGW_MAXLEN);
	strlcpy(w.bgw_name, "billing sync probe", BGW_MAXLEN);
	strlcpy(w.bgw_type, "billing sync probe", BGW_MAXLEN);
	strlcpy(w.bgw_extra, billing_database, NAMEDATALEN);
	strlcpy(w.bgw_extra + NAMEDATALEN, billing_worker_role, NAMEDATALEN);
	w.bgw_notify_pid = MyProcPid;

	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	strlcpy(billing_sync->probe_problem, "the probe did not answer",
			sizeof(billing_sync->probe_problem));
	LWLockRelease(billing_sync->lock);
	if (!RegisterDynamicBackgroundWorker(&w, &handle))
		return true;
	if (WaitForBackgroundWorkerShutdown(handle) != BGWH_STOPPED)
		return true;
	pfree(handle);
	LWLockAcquire(billing_sync->lock, LW_SHARED);
	strlcpy(problem, billing_sync->probe_problem, len);
	LWLockRelease(billing_sync->lock);
	return problem[0] == '\0';
}

/*
 * Wait until billing.database can be connected to: say why not once,
 * clearly, and look again every PROBE_INTERVAL_MS and at every reload.
 */
static void
wait_for_database(void)
{
	char		logged[SYNC_ERROR_LEN] = "";

	for (;;)
	{
		char		problem[SYNC_ERROR_LEN];

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (strlen(billing_database) >= NAMEDATALEN)
			snprintf(problem, sizeof(problem),
					 "billing.database is longer than %d bytes", NAMEDATALEN - 1);
		else if (strlen(billing_worker_role) >= NAMEDATALEN)
			snprintf(problem, sizeof(problem),
					 "billing.worker_role is longer than %d bytes", NAMEDATALEN - 1);
		else if (probe_database(problem, sizeof(problem)))
		{
			if (logged[0] != '\0')
				ereport(LOG, (errmsg("billing sync: connecting to database \"%s\" now", billing_database)));
			return;
		}
		if (strcmp(problem, logged) != 0)
		{
			ereport(LOG,
					(errmsg("billing sync: %s; the worker waits", problem),
					 errdetail("It looks again every %d s and at every reload.", PROBE_INTERVAL_MS / 1000),
					 errhint("Create the database (and CREATE EXTENSION billing in it), or set billing.database (and billing.worker_role) and reload.")));
			billing_sync_record_error("%s", problem);
			strlcpy(logged, problem, sizeof(logged));
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 PROBE_INTERVAL_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* ---------------------------------------------------------------------
 * main loop
 * ---------------------------------------------------------------------
 */
void
billing_worker_main(Datum arg)
{
	volatile bool installed = false;
	volatile TimestampTz last_install_check = 0;
	uint32		flags = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	before_shmem_exit(worker_exit, (Datum) 0);
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->worker_pid = MyProcPid;
	billing_sync->connected = false;
	billing_sync->resync_pending = true;	/* a worker starts with one */
	LWLockRelease(billing_sync->lock);

	wait_for_database();
	strlcpy(connected_database, billing_database, sizeof(connected_database));
	strlcpy(connected_role, billing_worker_role, sizeof(connected_role));
#ifdef BGWORKER_BYPASS_ROLELOGINCHECK
	flags |= BGWORKER_BYPASS_ROLELOGINCHECK;
#endif
	BackgroundWorkerInitializeConnection(connected_database,
										 connected_role[0] ? connected_role : NULL,
										 flags);
	pin_environment();
	pgstat_report_appname("billing sync");

	cycle_cxt = AllocSetContextCreate(TopMemoryContext, "billing sync cycle",
									  ALLOCSET_DEFAULT_SIZES);
	page_cxt = AllocSetContextCreate(TopMemoryContext, "billing sync page",
									 ALLOCSET_DEFAULT_SIZES);
	redis_set_wait_hook(wait_hook);

	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->worker_latch = MyLatch;
	billing_sync->database = MyDatabaseId;	/* from now on, mark only ours */
	billing_sync->overflow = true;	/* whatever happened before us: resync */
	billing_sync->last_error[0] = '\0';
	LWLockRelease(billing_sync->lock);
	/* the events' too: it may name a tenant of the database before */
	if (billing_events != NULL)
	{
		LWLockAcquire(billing_events->lock, LW_EXCLUSIVE);
		billing_events->last_error[0] = '\0';
		billing_events->last_error_at = 0;
		LWLockRelease(billing_events->lock);
	}

	if (billing_redis_host == NULL || billing_redis_host[0] == '\0')
		ereport(LOG,
				(errmsg("billing sync: billing.redis_host is not set; the worker stays idle"),
				 errhint("Set billing.redis_host (and reload) to mirror balances into Redis.")));

	for (;;)
	{
		volatile int timeout = billing_maintenance_interval;
		TimestampTz now;

		/* everything a cycle allocates goes into cycle_cxt, reset below */
		MemoryContextSwitchTo(cycle_cxt);
		if (ConfigReloadPending)
			(void) reload_config();
		busy = false;

		now = GetCurrentTimestamp();
		log_window_flush(&retry_log, now);	/* the count of the unlogged, connected or not */
		PG_TRY();
		{
			/* a cancel between cycles is recovered from like one inside them */
			CHECK_FOR_INTERRUPTS();
			if (!installed &&
				TimestampDifferenceExceeds(last_install_check, now, 1000))
			{
				static char logged[SYNC_ERROR_LEN] = "";
				char	   *problem = NULL;

				last_install_check = now;
				if (!extension_installed())
					problem = psprintf("extension \"billing\" is not installed in database \"%s\"",
									   billing_database);
				else
					problem = missing_rights();
				if (problem != NULL)
				{
					if (strcmp(problem, logged) != 0)
					{
						ereport(LOG,
								(errmsg("billing sync: %s; the worker stays idle", problem),
								 errhint("CREATE EXTENSION billing in that database, set billing.database, or grant the worker's role what it needs: SELECT billing_grant_worker('%s').",
										 worker_user)));
						billing_sync_record_error("%s", problem);
						strlcpy(logged, problem, sizeof(logged));
					}
				}
				else
					logged[0] = '\0';
				installed = problem == NULL;
			}

			if (installed)
			{
				/* marks of prepared transactions resolved since (sync.c) */
				if (billing_sync_resolve_prepared() > 0)
					timeout = Min(timeout, 100);
				if (billing_redis_host[0] != '\0')
				{
					if (!mirror_connected() && now >= next_connect_at)
						(void) mirror_connect();
					if (mirror_connected())
					{
						bool		overflow;
						int			resync_wait_ms = 0;

						retry_due(now);
						if (TimestampDifferenceExceeds(last_run_id_check, now, 1000))
						{
							last_run_id_check = now;
							(void) mirror_check_run_id();
						}
						if (mirror_connected())
							(void) mirror_check_marker();
						LWLockAcquire(billing_sync->lock, LW_SHARED);
						overflow = billing_sync->overflow;
						LWLockRelease(billing_sync->lock);
						if (mirror_connected() && !resync_started && !overflow &&
							mirror_resync_pending() &&
							!mirror_resync_may_start(GetCurrentTimestamp(), &resync_wait_ms))
							timeout = Min(timeout, resync_wait_ms);	/* wake up for it */
						else if (mirror_connected() && (mirror_resync_pending() || overflow || resync_started))
							resync_all();
						if (mirror_connected())
							refresh_expired();
						if (mirror_connected())
							push_dirty();
						if (mirror_connected() && !busy && billing_check_interval > 0 &&
							TimestampDifferenceExceeds(last_check, now, billing_check_interval * 1000))
						{
							last_check = now;
							check_all();
						}
						if (mirror_connected() && !busy && billing_purge_interval > 0 &&
							TimestampDifferenceExceeds(last_purge, now, billing_purge_interval * 1000))
						{
							last_purge = now;
							purge_all();
						}
						if (mirror_connected())
							redis_healthy();
					}
					note_redis_failure();
				}

				/* after the pushes: a slow maintenance never delays them */
				maintenance_if_due();
				/* the events (outbox.c): delivery, pruning, the alerts' sweep */
				if (outbox_cycle(mirror_connected()))
					busy = true;
				/* the events may have lost the connection: back off now */
				note_redis_failure();
				if (!mirror_connected() && billing_redis_host[0] != '\0')
				{
					long		secs;
					int			usecs;

					TimestampDifference(GetCurrentTimestamp(), next_connect_at, &secs, &usecs);
					timeout = Min(Max(secs * 1000 + usecs / 1000, 10), billing_maintenance_interval);
				}
			}
			else
				timeout = 1000; /* look for CREATE EXTENSION again soon */
		}
		PG_CATCH();
		{
			/* a database error (e.g. the extension was dropped): note, back off */
			ErrorData  *edata;

			MemoryContextSwitchTo(TopMemoryContext);
			edata = CopyErrorData();
			FlushErrorState();
			AbortCurrentTransaction();
			redis_free_all();
			/*
			 * replies not read (a cancel while waiting): out of step, close;
			 * so too a connection the error caught half set up (in the
			 * middle of the connect, the AUTH, SELECT or the scripts' load):
			 * the next redis_open() would take it as ready
			 */
			if (redis_replies_owed())
				redis_close("an error while replies were owed: %s", edata->message);
			else if (redis_is_open() && !mirror_connected())
				redis_close("an error while connecting: %s", edata->message);
			billing_sync_record_error("database: %s", edata->message);
			ereport(LOG, (errmsg("billing sync: %s", edata->message)));
			FreeErrorData(edata);
			installed = false;
			last_install_check = 0;
			resync_started = false;
			MemoryContextReset(cycle_cxt);
			MemoryContextReset(page_cxt);
			timeout = 1000;
		}
		PG_END_TRY();

		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(cycle_cxt);
		if (busy)
			continue;
		if (WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					  timeout, PG_WAIT_EXTENSION) & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);

			/*
			 * Coalesce: a busy system commits thousands of times a second and
			 * every commit sets our latch.  Sleep a few milliseconds (not
			 * waiting on the latch, so the committing backends do not signal
			 * us) and push whatever gathered meanwhile in one batch.
			 */
			if (billing_sync_delay > 0)
				(void) WaitLatch(NULL, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 billing_sync_delay, PG_WAIT_EXTENSION);
		}
		else
			ResetLatch(MyLatch);
	}
}
