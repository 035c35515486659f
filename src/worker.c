/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background worker that mirrors committed account state into
 *	  Redis, and runs the periodic maintenance (hold expiry, job rescue).
 *
 * Loop (modelled on worker_spi and pg_cron): sleep on the latch (set by
 * committing backends, see sync.c) or a timeout; take the dirty tenants
 * out of shared memory; read their committed snapshots from the database
 * in a short transaction of our own (billing.sync_snapshot()); commit it;
 * only then talk to Redis: SCRIPT LOAD once per connection, then pipelined
 * EVALSHA of lua/apply_snapshot.lua, which applies a snapshot only if its
 * account version is newer than the one stored.  No transaction is ever
 * open during Redis I/O, and every Redis call runs with the connect and
 * command timeouts.
 *
 * Failures: when Redis is unreachable the tenants go back into the dirty
 * set and the worker retries with a bounded exponential backoff, logging
 * once per outage.  A full resync of every account runs at start (shared
 * memory knows nothing of what Redis has), when the dirty set overflowed,
 * when Redis restarted (INFO run_id changed) and when the marker key
 * vanished (FLUSHALL); a periodic check compares Redis with the database
 * and repairs drift with a forced apply.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/time.h>

#include <hiredis/hiredis.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "billing.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "sync.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PGDLLEXPORT void billing_worker_main(Datum arg);

/* GUCs, defined in billing.c */
extern char *billing_database;
extern char *billing_redis_host;
extern int	billing_redis_port;
extern char *billing_redis_password;
extern int	billing_redis_db;
extern char *billing_redis_prefix;
extern int	billing_redis_connect_timeout;
extern int	billing_redis_command_timeout;
extern int	billing_sync_batch_size;
extern int	billing_maintenance_interval;
extern int	billing_check_interval;
extern int	billing_sync_delay;
extern char *billing_lua_dir;

#define MAX_BACKOFF_MS	5000

static redisContext *redis = NULL;
static char apply_sha[64];
static char run_id[48];
static bool outage_logged = false;
static int	backoff_ms = 0;
static TimestampTz next_connect_at = 0;	/* backoff: no attempt before */
static bool full_resync = true;
static TimestampTz last_maintenance = 0;
static TimestampTz last_check = 0;
static MemoryContext cycle_cxt = NULL;

/*
 * Tenants whose apply failed for a reason of their own (a key of theirs of
 * the wrong type, say): the rest of the batch goes on, and they are tried
 * again every RETRY_MS (strings in TopMemoryContext; beyond RETRY_MAX the
 * periodic check retries them).
 */
#define RETRY_MS		5000
#define RETRY_MAX		1000
static List *retry_tenants = NIL;
static TimestampTz retry_at = 0;

/*
 * Which ledger the mirror shows: "<system id>:<database oid>:<extension
 * oid>", kept in the marker key.  Account versions start again at 0 when
 * the extension is dropped and created again (or the database restored
 * elsewhere), and the version guard would then keep the old hashes: a full
 * resync that finds another ledger's marker deletes the old hashes first.
 */
static char epoch[64] = "";

static void begin_xact(const char *what);
static void end_xact(void);

/* one snapshot to push */

/* ---------------------------------------------------------------------
 * Redis
 * ---------------------------------------------------------------------
 */
static struct timeval
ms_to_tv(int ms)
{
	struct timeval tv;

	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	return tv;
}

static void
redis_drop(const char *why)
{
	if (redis != NULL)
		redisFree(redis);
	redis = NULL;
	apply_sha[0] = '\0';
	if (billing_sync)
	{
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		billing_sync->connected = false;
		LWLockRelease(billing_sync->lock);
	}
	if (why != NULL)
	{
		billing_sync_record_error("%s", why);
		if (!outage_logged)
			ereport(LOG,
					(errmsg("billing sync: Redis at %s:%d unavailable: %s",
							billing_redis_host, billing_redis_port, why),
					 errhint("Backends are not affected; the worker retries with backoff and catches up.")));
		outage_logged = true;
		backoff_ms = backoff_ms ? Min(backoff_ms * 2, MAX_BACKOFF_MS) : 100;
		/* committing backends set our latch: that must not defeat the backoff */
		next_connect_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), backoff_ms);
	}
}

/*
 * Run one command; returns the reply (caller frees) or NULL after dropping
 * the connection.  An error reply is returned as is.
 */
static redisReply *
redis_cmd(int argc, const char **argv)
{
	redisReply *reply;

	if (redis == NULL)
		return NULL;
	reply = redisCommandArgv(redis, argc, argv, NULL);
	if (reply == NULL)
	{
		char		err[160];

		strlcpy(err, redis->errstr, sizeof(err));
		redis_drop(err);
	}
	return reply;
}

/*
 * Pipelining: queue a command / read the next reply.  On a transport error
 * the connection is dropped (replies would be misaligned) and false / NULL
 * returned.
 */
static bool
pipe_append(int argc, const char **argv)
{
	char		err[160];

	if (redisAppendCommandArgv(redis, argc, argv, NULL) == REDIS_OK)
		return true;
	strlcpy(err, redis->errstr, sizeof(err));	/* redis_drop frees it */
	redis_drop(err);
	return false;
}

static redisReply *
pipe_read(void)
{
	redisReply *r;
	char		err[160];

	if (redisGetReply(redis, (void **) &r) == REDIS_OK && r != NULL)
		return r;
	strlcpy(err, redis->errstr, sizeof(err));
	redis_drop(err);
	return NULL;
}

/* read a file of the lua/ directory installed with the extension */
static char *
read_script(const char *name)
{
	char		path[MAXPGPATH];
	char		sharepath[MAXPGPATH];
	FILE	   *f;
	StringInfoData buf;
	char		chunk[4096];
	size_t		n;

	if (billing_lua_dir && billing_lua_dir[0])
		snprintf(path, sizeof(path), "%s/%s", billing_lua_dir, name);
	else
	{
		get_share_path(my_exec_path, sharepath);
		snprintf(path, sizeof(path), "%s/extension/billing/%s", sharepath, name);
	}
	f = AllocateFile(path, "r");
	if (f == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("billing sync: could not read Lua script \"%s\": %m", path),
				 errhint("Run make install, or set billing.lua_dir.")));
	initStringInfo(&buf);
	while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
		appendBinaryStringInfo(&buf, chunk, n);
	FreeFile(f);
	return buf.data;
}

/* INFO server's run_id, or "" */
static void
redis_run_id(char *out, size_t outlen)
{
	const char *argv[] = {"INFO", "server"};
	redisReply *r = redis_cmd(2, argv);

	out[0] = '\0';
	if (r == NULL)
		return;
	if (r->type == REDIS_REPLY_STRING)
	{
		char	   *p = strstr(r->str, "run_id:");

		if (p)
		{
			size_t		i = 0;

			p += 7;
			while (p[i] && p[i] != '\r' && p[i] != '\n' && i + 1 < outlen)
			{
				out[i] = p[i];
				i++;
			}
			out[i] = '\0';
		}
	}
	freeReplyObject(r);
}

/*
 * A different server process than before (INFO server run_id) may have
 * lost everything: full resync.  Checked at every connect, and every
 * second on a live connection, which a proxy may keep across a restart.
 * An empty run_id (INFO refused by an ACL) is taken as "unknown".  False
 * if Redis failed.
 */
static TimestampTz last_run_id_check = 0;

static bool
check_run_id(void)
{
	char		now_id[48];

	last_run_id_check = GetCurrentTimestamp();
	redis_run_id(now_id, sizeof(now_id));
	if (redis == NULL)
		return false;
	if (strcmp(now_id, run_id) != 0 && now_id[0] != '\0')
	{
		if (run_id[0] != '\0')
			ereport(LOG,
					(errmsg("billing sync: Redis restarted (run_id %s, was %s): full resync",
							now_id, run_id)));
		full_resync = true;
		strlcpy(run_id, now_id, sizeof(run_id));
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		strlcpy(billing_sync->redis_run_id, run_id, sizeof(billing_sync->redis_run_id));
		LWLockRelease(billing_sync->lock);
	}
	return true;
}

static bool
redis_connect(void)
{
	char		err[160];
	redisReply *r;

	char	   *script;

	if (redis != NULL)
		return true;
	if (GetCurrentTimestamp() < next_connect_at)
		return false;
	/* before connecting: an error here must not leave a half-set-up link */
	script = read_script("apply_snapshot.lua");
	redis = redisConnectWithTimeout(billing_redis_host, billing_redis_port,
									ms_to_tv(billing_redis_connect_timeout));
	if (redis == NULL || redis->err)
	{
		strlcpy(err, redis ? redis->errstr : "out of memory", sizeof(err));
		redis_drop(err);
		return false;
	}
	if (redisSetTimeout(redis, ms_to_tv(billing_redis_command_timeout)) != REDIS_OK ||
		redisEnableKeepAlive(redis) != REDIS_OK)
	{
		strlcpy(err, redis->errstr, sizeof(err));
		redis_drop(err);
		return false;
	}
	if (billing_redis_password && billing_redis_password[0])
	{
		const char *argv[] = {"AUTH", billing_redis_password};

		r = redis_cmd(2, argv);
		if (r == NULL)
			return false;
		if (r->type == REDIS_REPLY_ERROR)
		{
			snprintf(err, sizeof(err), "AUTH failed: %s", r->str);
			freeReplyObject(r);
			redis_drop(err);
			return false;
		}
		freeReplyObject(r);
	}
	if (billing_redis_db != 0)
	{
		char		db[16];
		const char *argv[] = {"SELECT", db};

		snprintf(db, sizeof(db), "%d", billing_redis_db);
		r = redis_cmd(2, argv);
		if (r == NULL)
			return false;
		if (r->type == REDIS_REPLY_ERROR)
		{
			snprintf(err, sizeof(err), "SELECT failed: %s", r->str);
			freeReplyObject(r);
			redis_drop(err);
			return false;
		}
		freeReplyObject(r);
	}

	/* load the apply script; pipelined EVALSHA cannot recover from NOSCRIPT */
	{
		const char *argv[] = {"SCRIPT", "LOAD", script};

		r = redis_cmd(3, argv);
		pfree(script);
		if (r == NULL)
			return false;
		if (r->type != REDIS_REPLY_STRING)
		{
			snprintf(err, sizeof(err), "SCRIPT LOAD failed: %s",
					 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
			freeReplyObject(r);
			redis_drop(err);
			return false;
		}
		strlcpy(apply_sha, r->str, sizeof(apply_sha));
		freeReplyObject(r);
	}

	if (!check_run_id())
		return false;

	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->connected = true;
	strlcpy(billing_sync->redis_run_id, run_id, sizeof(billing_sync->redis_run_id));
	LWLockRelease(billing_sync->lock);
	return true;
}

/*
 * A whole cycle went through with Redis: the outage (if any) is over.  Not
 * on connect: a server that accepts connections but fails every write (OOM,
 * READONLY) must keep the backoff growing and log once, not every 100 ms.
 */
static void
redis_healthy(void)
{
	if (outage_logged)
		ereport(LOG,
				(errmsg("billing sync: connected to Redis at %s:%d again; caught up",
						billing_redis_host, billing_redis_port)));
	outage_logged = false;
	backoff_ms = 0;
}

/* Remember a tenant whose apply failed on its own keys (see retry_tenants). */
static void
retry_later(const char *tenant, const char *why)
{
	ListCell   *lc;
	MemoryContext old;

	foreach(lc, retry_tenants)
		if (strcmp(lfirst(lc), tenant) == 0)
			return;
	billing_sync_record_error("apply failed for tenant %s: %s", tenant, why);
	ereport(LOG,
			(errmsg("billing sync: could not apply the snapshot of tenant \"%s\": %s",
					tenant, why),
			 errdetail("The other tenants are pushed; this one is tried again every %d s.",
					   RETRY_MS / 1000),
			 errhint("Remove or fix the Redis keys of that tenant (they must be hashes and a sorted set).")));
	if (list_length(retry_tenants) >= RETRY_MAX)
		return;					/* the periodic check will repair it */
	old = MemoryContextSwitchTo(TopMemoryContext);
	retry_tenants = lappend(retry_tenants, pstrdup(tenant));
	MemoryContextSwitchTo(old);
	if (retry_at == 0)
		retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RETRY_MS);
}

/* When due, put the tenants to retry back into the dirty set. */
static void
retry_due(TimestampTz now)
{
	ListCell   *lc;

	if (retry_tenants == NIL || now < retry_at)
		return;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	foreach(lc, retry_tenants)
		billing_sync_enqueue(lfirst(lc), now);
	LWLockRelease(billing_sync->lock);
	list_free_deep(retry_tenants);
	retry_tenants = NIL;
	retry_at = 0;
}

/*
 * An error reply that concerns the keys of one tenant only: the script's
 * own argument check, or a key of another type.  Anything else (NOSCRIPT,
 * READONLY, LOADING, OOM, BUSY, ...) concerns the server.
 */
static bool
tenant_error(const char *msg)
{
	return strncmp(msg, "WRONGTYPE", 9) == 0 || strncmp(msg, "BADARGS", 7) == 0;
}

static char *
marker_key(void)
{
	return psprintf("%s:__sync__", billing_redis_prefix);
}

/* FLUSHALL (or anyone) removed the marker: everything must be pushed again */
static void
check_marker(void)
{
	char	   *key = marker_key();
	const char *argv[] = {"EXISTS", key};
	redisReply *r = redis_cmd(2, argv);

	if (r == NULL)
		return;
	if (r->type == REDIS_REPLY_INTEGER && r->integer == 0 && !full_resync)
	{
		ereport(LOG, (errmsg("billing sync: marker key %s is gone (FLUSHALL?): full resync", key)));
		full_resync = true;
	}
	freeReplyObject(r);
}

static void
set_marker(void)
{
	char	   *key = marker_key();
	const char *argv[] = {"SET", key, epoch};
	redisReply *r;

	r = redis_cmd(3, argv);
	if (r)
		freeReplyObject(r);
}

/*
 * Note the ledger we read (in a transaction): a new one (the extension
 * created again) needs a full resync, which compares it with the marker.
 */
static void
note_epoch(void)
{
	char		now[64];

	snprintf(now, sizeof(now), UINT64_FORMAT ":%u:%u", GetSystemIdentifier(),
			 MyDatabaseId, get_extension_oid("billing", true));
	if (strcmp(now, epoch) != 0)
	{
		strlcpy(epoch, now, sizeof(epoch));
		full_resync = true;
	}
}

/* Delete every hash of the mirror (<prefix>:{...}); false if Redis failed. */
static bool
wipe_mirror(void)
{
	StringInfoData pattern;
	char		cursor[32] = "0";

	/* the prefix is literal: escape the glob characters of MATCH */
	initStringInfo(&pattern);
	for (const char *p = billing_redis_prefix; *p; p++)
	{
		if (strchr("*?[]\\", *p))
			appendStringInfoChar(&pattern, '\\');
		appendStringInfoChar(&pattern, *p);
	}
	appendStringInfoString(&pattern, ":{*");
	do
	{
		const char *argv[] = {"SCAN", cursor, "MATCH", pattern.data, "COUNT", "1000"};
		redisReply *r = redis_cmd(6, argv);
		redisReply *keys;

		if (r == NULL)
			return false;
		if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
			r->element[0]->type != REDIS_REPLY_STRING ||
			r->element[1]->type != REDIS_REPLY_ARRAY)
		{
			freeReplyObject(r);
			redis_drop("SCAN: unexpected reply");
			return false;
		}
		strlcpy(cursor, r->element[0]->str, sizeof(cursor));
		keys = r->element[1];
		if (keys->elements > 0 && keys->elements < (size_t) INT_MAX)
		{
			const char **del = palloc(sizeof(char *) * (keys->elements + 1));
			redisReply *u;

			del[0] = "UNLINK";
			for (size_t i = 0; i < keys->elements; i++)
				del[i + 1] = keys->element[i]->str;
			u = redis_cmd((int) keys->elements + 1, del);
			pfree(del);
			if (u == NULL)
			{
				freeReplyObject(r);
				return false;
			}
			freeReplyObject(u);
		}
		freeReplyObject(r);
		CHECK_FOR_INTERRUPTS();
	} while (strcmp(cursor, "0") != 0);
	pfree(pattern.data);
	return true;
}

/*
 * Before a full resync: does Redis hold the mirror of another ledger?  Then
 * delete it (see epoch).  A marker of the form of older versions (a number)
 * is taken as ours.  False if Redis failed.
 */
static bool
claim_mirror(void)
{
	char	   *key = marker_key();
	const char *argv[] = {"GET", key};
	redisReply *r;
	char		theirs[64] = "";

	begin_xact("billing sync: reading the ledger identity");
	note_epoch();
	end_xact();
	r = redis_cmd(2, argv);
	if (r == NULL)
		return false;
	if (r->type == REDIS_REPLY_STRING)
		strlcpy(theirs, r->str, sizeof(theirs));
	freeReplyObject(r);
	if (theirs[0] == '\0' || strcmp(theirs, epoch) == 0 ||
		strspn(theirs, "0123456789") == strlen(theirs))
		return true;
	ereport(LOG,
			(errmsg("billing sync: Redis holds the mirror of another ledger (marker %s, ours %s): deleting its hashes before the full resync",
					theirs, epoch),
			 errdetail("The extension was created again, or the database restored: account versions started over.")));
	return wipe_mirror();
}

/*
 * The pipeline of a push is written in Redis' protocol (RESP) into a buffer
 * handed to hiredis with redisAppendFormattedCommand about a megabyte at a
 * time: per argument a length prefix and the bytes, without hiredis'
 * printf-style formatting of every argument, which was a sixth of the
 * worker's time under load.
 */
static void
resp_head(StringInfo buf, char kind, size_t n)
{
	char		digits[MAXINT8LEN + 1];

	appendStringInfoChar(buf, kind);
	appendBinaryStringInfo(buf, digits, pg_ulltoa_n((uint64) n, digits));
	appendBinaryStringInfo(buf, "\r\n", 2);
}

static void
resp_arg(StringInfo buf, const char *s)
{
	size_t		len = strlen(s);

	resp_head(buf, '$', len);
	appendBinaryStringInfo(buf, s, len);
	appendBinaryStringInfo(buf, "\r\n", 2);
}

/* bytes of RESP per hand-over (-DPUSH_CHUNK=64 tests the hand-over) */
#ifndef PUSH_CHUNK
#define PUSH_CHUNK (1024 * 1024)
#endif

/* queue the commands written into buf (then empty it); false: dropped */
static bool
pipe_append_resp(StringInfo buf)
{
	char		err[160];

	if (buf->len == 0 ||
		redisAppendFormattedCommand(redis, buf->data, buf->len) == REDIS_OK)
	{
		resetStringInfo(buf);
		return true;
	}
	strlcpy(err, redis->errstr, sizeof(err));	/* redis_drop frees it */
	redis_drop(err);
	return false;
}

/* the Redis key of a snapshot: billing:{tenant} or billing:{tenant}:key:<id> */
static char *
snapshot_key(SyncSnap *s)
{
	if (s->key_id)
		return psprintf("%s:{%s}:key:%s", billing_redis_prefix, s->tenant, s->key_id);
	return psprintf("%s:{%s}", billing_redis_prefix, s->tenant);
}

/* the same key, or billing:{tenant}<suffix>, as a RESP argument */
static void
resp_key(StringInfo buf, SyncSnap *s, const char *suffix)
{
	size_t		plen = strlen(billing_redis_prefix);
	size_t		tlen = strlen(s->tenant);

	if (s->key_id)
		suffix = ":key:";
	resp_head(buf, '$', plen + 2 + tlen + 1 + strlen(suffix) +
			  (s->key_id ? strlen(s->key_id) : 0));
	appendBinaryStringInfo(buf, billing_redis_prefix, plen);
	appendBinaryStringInfo(buf, ":{", 2);
	appendBinaryStringInfo(buf, s->tenant, tlen);
	appendStringInfoChar(buf, '}');
	appendStringInfoString(buf, suffix);
	if (s->key_id)
		appendStringInfoString(buf, s->key_id);
	appendBinaryStringInfo(buf, "\r\n", 2);
}

/*
 * Push snapshots, pipelined.  Returns false (connection dropped) on a
 * transport error or an error reply about the server; the caller puts the
 * tenants back.  An error about one tenant's keys sets that tenant aside
 * (retry_later) and the others go on.
 */
static bool
push(SyncSnap *snaps, int n, bool force)
{
	static const char *const pending[] = {":pending", ":pending_amt", ":pending_ver", ":pending_key"};
	int			nfailed = 0;
	bool	   *failed = palloc0(sizeof(bool) * Max(n, 1));
	TimestampTz now;
	char		version[MAXINT8LEN + 1];
	StringInfoData buf;
	int			sent = n;

	initStringInfo(&buf);
	for (int i = 0; i < n; i++)
	{
		SyncSnap   *s = &snaps[i];
		int			nkeys = s->key_id ? 1 : 5;

		/* hand over about a megabyte at a time, whatever the batch size */
		if (buf.len >= PUSH_CHUNK && !pipe_append_resp(&buf))
			return false;

		resp_head(&buf, '*', 3 + nkeys + 2 + s->nfields);
		resp_arg(&buf, "EVALSHA");
		resp_arg(&buf, apply_sha);
		resp_arg(&buf, s->key_id ? "1" : "5");
		resp_key(&buf, s, "");
		for (int k = 0; k < nkeys - 1; k++)
			resp_key(&buf, s, pending[k]);
		(void) pg_lltoa(s->version, version);
		resp_arg(&buf, version);
		resp_arg(&buf, force ? "1" : "0");
		for (int f = 0; f < s->nfields; f++)
			resp_arg(&buf, s->fields[f]);
	}
	if (!pipe_append_resp(&buf))
		return false;
	pfree(buf.data);

	for (int i = 0; i < sent; i++)
	{
		redisReply *r = pipe_read();

		if (r == NULL)
			return false;
		if (r->type == REDIS_REPLY_ERROR && r->str && tenant_error(r->str))
		{
			char		err[160];

			strlcpy(err, r->str, sizeof(err));	/* then free, then report */
			freeReplyObject(r);
			retry_later(snaps[i].tenant, err);
			failed[i] = true;
			nfailed++;
			continue;
		}
		if (r->type == REDIS_REPLY_ERROR)
		{
			/* read the rest of the pipeline first, then start over */
			char		err[160];

			snprintf(err, sizeof(err), "apply failed: %s", r->str);
			freeReplyObject(r);
			for (int j = i + 1; j < sent; j++)
			{
				if (redisGetReply(redis, (void **) &r) != REDIS_OK || r == NULL)
					break;
				freeReplyObject(r);
			}
			redis_drop(err);
			return false;
		}
		freeReplyObject(r);
	}

	/* statistics: commit -> Redis lag of every tenant we knew the commit of */
	now = GetCurrentTimestamp();
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		if (snaps[i].key_id || snaps[i].first_commit == 0 || failed[i])
			continue;
		billing_sync->lag_us[billing_sync->lag_next] = now - snaps[i].first_commit;
		billing_sync->lag_next = (billing_sync->lag_next + 1) % SYNC_LAG_RING;
		if (billing_sync->lag_count < SYNC_LAG_RING)
			billing_sync->lag_count++;
	}
	billing_sync->pushed += n - nfailed;
	billing_sync->last_push_at = now;
	LWLockRelease(billing_sync->lock);
	return true;
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

static bool
extension_installed(void)
{
	bool		found;

	begin_xact("billing sync: checking for the extension");
	if (SPI_execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'billing'",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "billing sync: extension check failed");
	found = SPI_processed > 0;
	end_xact();
	return found;
}

/*
 * Read snapshots (tenant hashes and key hashes) of the given tenants, or of
 * the tenants after `after` in tenant order when tenants is NULL (resync
 * in batches).  Everything is copied into cycle_cxt before commit.
 */
static int
read_snapshots(char **tenants, TimestampTz *commits, int ntenants,
			   const char *after, int limit, SyncSnap **out, char **last)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {TEXTARRAYOID, TEXTOID, INT4OID};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	SyncSnap   *snaps;
	int			n;

	begin_xact("billing sync: reading snapshots");
	note_epoch();
	if (tenants)
	{
		/* the dirty tenants of a push: built in C (snapshot.c) */
		n = billing_snapshot_build(tenants, ntenants, cycle_cxt, &snaps);
		for (int i = 0; i < n; i++)
			snaps[i].first_commit = commits[snaps[i].input];
		end_xact();
		*out = snaps;
		return n;
	}

	/* a page of all tenants, in tenant order (a resync) */
	if (plan == NULL)
	{
		plan = SPI_prepare("SELECT tenant_id, key_id, version, fields "
						   "FROM billing.sync_snapshot($1, $2, $3)", 3, types);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "billing sync: preparing the snapshot query failed");
	}
	values[0] = (Datum) 0;
	nulls[0] = 'n';
	values[1] = CStringGetTextDatum(after ? after : "");
	values[2] = Int32GetDatum(limit);
	if (SPI_execute_plan(plan, values, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "billing sync: reading snapshots failed");

	n = SPI_processed;
	snaps = MemoryContextAllocZero(cycle_cxt, sizeof(SyncSnap) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum		d;
		Datum	   *elems;
		bool	   *enulls;
		int			nelems;
		MemoryContext old = MemoryContextSwitchTo(cycle_cxt);

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
		if (last && !snaps[i].key_id)
			*last = snaps[i].tenant;
		MemoryContextSwitchTo(old);
	}
	end_xact();
	*out = snaps;
	return n;
}

/* Put tenants back into the dirty set (a failed push). */
static void
requeue(char **tenants, TimestampTz *commits, int n)
{
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
		billing_sync_enqueue(tenants[i], commits[i]);
	billing_sync->inflight_oldest = 0;
	LWLockRelease(billing_sync->lock);
}

/* Take up to `max` dirty tenants out of shared memory. */
static int
drain(char ***tenants, TimestampTz **commits, int max)
{
	int			n;
	char	  **t = MemoryContextAlloc(cycle_cxt, sizeof(char *) * max);
	TimestampTz *c = MemoryContextAlloc(cycle_cxt, sizeof(TimestampTz) * max);
	TimestampTz oldest = 0;

	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	n = billing_sync_dequeue(t, c, max, cycle_cxt);
	for (int i = 0; i < n; i++)
		if (oldest == 0 || c[i] < oldest)
			oldest = c[i];
	billing_sync->inflight_oldest = oldest;
	LWLockRelease(billing_sync->lock);
	*tenants = t;
	*commits = c;
	return n;
}

/* Push every account, in batches; returns false if Redis failed meanwhile. */
static bool
resync_all(void)
{
	char		after[SYNC_TENANT_LEN] = "";

	/*
	 * Marks lost from now on set overflow again; until this resync is done,
	 * full_resync stays set, so an error half-way (a cancel, a database
	 * error) starts it over instead of forgetting it.
	 */
	full_resync = true;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->overflow = false;
	LWLockRelease(billing_sync->lock);

	if (!claim_mirror())
	{
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		billing_sync->overflow = true;	/* start over when Redis is back */
		LWLockRelease(billing_sync->lock);
		return false;
	}
	/* set the marker first: a FLUSHALL during the resync removes it again */
	set_marker();
	for (;;)
	{
		SyncSnap   *snaps;
		char	   *last = NULL;
		int			n;

		CHECK_FOR_INTERRUPTS();
		n = read_snapshots(NULL, NULL, 0, after, billing_sync_batch_size, &snaps, &last);
		if (n == 0)
			break;
		if (redis == NULL || !push(snaps, n, false))
		{
			LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
			billing_sync->overflow = true;	/* start over when Redis is back */
			LWLockRelease(billing_sync->lock);
			MemoryContextReset(cycle_cxt);
			return false;
		}
		if (last == NULL)
			break;
		strlcpy(after, last, sizeof(after));
		MemoryContextReset(cycle_cxt);
	}
	MemoryContextReset(cycle_cxt);
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->last_full_resync_at = GetCurrentTimestamp();
	billing_sync->full_resyncs++;
	LWLockRelease(billing_sync->lock);
	full_resync = false;
	ereport(DEBUG1, (errmsg("billing sync: full resync done")));
	return true;
}

/* Is this HGETALL reply exactly the snapshot (every field but the push time)? */
static bool
reply_matches(redisReply *r, SyncSnap *snap)
{
	if (r->type != REDIS_REPLY_ARRAY || (size_t) snap->nfields + 2 != r->elements)
		return false;
	for (size_t e = 0; e + 1 < r->elements; e += 2)
	{
		const char *field = r->element[e]->str;
		const char *value = r->element[e + 1]->str;
		bool		found = false;

		if (field == NULL || value == NULL)
			return false;
		if (strcmp(field, "synced_at_ms") == 0)
			continue;
		if (strcmp(field, "version") == 0)
		{
			if (strtoll(value, NULL, 10) != snap->version)
				return false;
			continue;
		}
		for (int f = 0; f + 1 < snap->nfields; f += 2)
			if (strcmp(snap->fields[f], field) == 0)
			{
				found = strcmp(snap->fields[f + 1], value) == 0;
				break;
			}
		if (!found)
			return false;
	}
	return true;
}

/*
 * Which of these snapshots does Redis hold exactly?  One pipelined HGETALL
 * each; same[i] is the answer.  False if Redis failed (connection dropped).
 */
static bool
redis_match_all(SyncSnap *snaps, int n, bool *same)
{
	for (int i = 0; i < n; i++)
	{
		const char *argv[] = {"HGETALL", snapshot_key(&snaps[i])};

		if (!pipe_append(2, argv))
			return false;
	}
	for (int i = 0; i < n; i++)
	{
		redisReply *r = pipe_read();

		if (r == NULL)
			return false;
		same[i] = reply_matches(r, &snaps[i]);
		freeReplyObject(r);
	}
	return true;
}

static void push_dirty(void);

/*
 * The periodic consistency check: compare what Redis holds with the
 * database for every account and key hash, and force-apply the database
 * state where they differ: repairs hashes edited by hand or left newer than
 * the database (e.g. after a restore).  A hash that differs only because a
 * commit landed between our read and the comparison is not drift: suspects
 * are read again from the database and compared once more before anything
 * is forced, so a newer pushed state is never overwritten with an older one.
 * Comparisons are pipelined a page at a time, and the dirty tenants are
 * pushed between pages: a check of a million accounts does not hold up
 * the mirror for its duration.
 */
static bool
check_all(void)
{
	char		after[SYNC_TENANT_LEN] = "";
	int64		repaired = 0;

	for (;;)
	{
		SyncSnap   *snaps;
		char	   *last = NULL;
		char	  **suspects;
		int			nsuspects = 0;
		int			n;
		bool	   *same;

		CHECK_FOR_INTERRUPTS();
		n = read_snapshots(NULL, NULL, 0, after, billing_sync_batch_size, &snaps, &last);
		if (n == 0)
			break;
		suspects = MemoryContextAlloc(cycle_cxt, sizeof(char *) * n);
		same = MemoryContextAlloc(cycle_cxt, sizeof(bool) * n);
		if (!redis_match_all(snaps, n, same))
			return false;
		for (int i = 0; i < n; i++)
			if (!same[i] && (nsuspects == 0 || strcmp(suspects[nsuspects - 1], snaps[i].tenant) != 0))
				suspects[nsuspects++] = snaps[i].tenant;
		if (nsuspects > 0)
		{
			SyncSnap   *fresh;
			SyncSnap   *bad;
			TimestampTz *none = MemoryContextAllocZero(cycle_cxt, sizeof(TimestampTz) * nsuspects);
			int			nfresh = read_snapshots(suspects, none, nsuspects, NULL, 0, &fresh, NULL);
			int			nbad = 0;

			bad = MemoryContextAlloc(cycle_cxt, sizeof(SyncSnap) * Max(nfresh, 1));
			same = MemoryContextAlloc(cycle_cxt, sizeof(bool) * Max(nfresh, 1));
			if (!redis_match_all(fresh, nfresh, same))
				return false;
			for (int i = 0; i < nfresh; i++)
				if (!same[i])
					bad[nbad++] = fresh[i];
			if (nbad > 0)
			{
				if (!push(bad, nbad, true))
					return false;
				repaired += nbad;
			}
		}
		if (last == NULL)
			break;
		strlcpy(after, last, sizeof(after));
		MemoryContextReset(cycle_cxt);
		push_dirty();			/* resets cycle_cxt too */
		if (redis == NULL)
			return false;
	}
	MemoryContextReset(cycle_cxt);
	if (repaired > 0)
		ereport(LOG, (errmsg("billing sync: consistency check repaired " INT64_FORMAT " Redis hashes", repaired)));
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->repaired += repaired;
	billing_sync->last_check_at = GetCurrentTimestamp();
	LWLockRelease(billing_sync->lock);
	return true;
}

/* Push the dirty tenants; on failure they go back into the set. */
static void
push_dirty(void)
{
	for (;;)
	{
		char	  **tenants;
		TimestampTz *commits;
		SyncSnap   *snaps;
		int			n;
		int			nsnaps;

		n = drain(&tenants, &commits, billing_sync_batch_size);
		if (n == 0)
			break;
		PG_TRY();
		{
			nsnaps = read_snapshots(tenants, commits, n, NULL, 0, &snaps, NULL);
		}
		PG_CATCH();
		{
			requeue(tenants, commits, n);
			PG_RE_THROW();
		}
		PG_END_TRY();
		if (redis == NULL || !push(snaps, nsnaps, false))
		{
			requeue(tenants, commits, n);
			MemoryContextReset(cycle_cxt);
			return;
		}
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		billing_sync->inflight_oldest = 0;
		LWLockRelease(billing_sync->lock);
		MemoryContextReset(cycle_cxt);
		CHECK_FOR_INTERRUPTS();
	}
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

/* the settings that decide where we push: a change means reconnect + resync */
static char *
redis_settings(void)
{
	return psprintf("%s|%d|%s|%d|%s", billing_redis_host, billing_redis_port,
					billing_redis_password, billing_redis_db, billing_redis_prefix);
}

/* on exit: billing_sync_status() must not show a dead worker as connected */
static void
worker_exit(int code, Datum arg)
{
	if (redis != NULL)
		redisFree(redis);
	redis = NULL;
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
 * main loop
 * ---------------------------------------------------------------------
 */
void
billing_worker_main(Datum arg)
{
	volatile bool installed = false;
	volatile TimestampTz last_install_check = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(billing_database, NULL, 0);
	pgstat_report_appname("billing sync");

	cycle_cxt = AllocSetContextCreate(TopMemoryContext, "billing sync cycle",
									  ALLOCSET_DEFAULT_SIZES);

	before_shmem_exit(worker_exit, (Datum) 0);
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->worker_pid = MyProcPid;
	billing_sync->worker_latch = MyLatch;
	billing_sync->database = MyDatabaseId;	/* from now on, mark only ours */
	billing_sync->overflow = true;	/* whatever happened before us: resync */
	LWLockRelease(billing_sync->lock);

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
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			char	   *before = redis_settings();
			char	   *now_set;

			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			now_set = redis_settings();
			if (strcmp(before, now_set) != 0)
			{
				redis_drop(NULL);	/* reconnect with the new settings */
				next_connect_at = 0;
				full_resync = true;
			}
			pfree(before);
			pfree(now_set);
		}

		now = GetCurrentTimestamp();
		PG_TRY();
		{
			if (!installed &&
				TimestampDifferenceExceeds(last_install_check, now, 1000))
			{
				static bool logged = false;

				last_install_check = now;
				installed = extension_installed();
				if (!installed && !logged)
					ereport(LOG,
							(errmsg("billing sync: extension \"billing\" is not installed in database \"%s\"; the worker stays idle",
									billing_database),
							 errhint("CREATE EXTENSION billing in that database, or set billing.database.")));
				logged = !installed;
			}

			if (installed)
			{
				if (billing_redis_host[0] != '\0' && redis_connect())
				{
					bool		overflow;

					retry_due(now);
					if (TimestampDifferenceExceeds(last_run_id_check, now, 1000))
						(void) check_run_id();
					if (redis)
						check_marker();
					LWLockAcquire(billing_sync->lock, LW_SHARED);
					overflow = billing_sync->overflow;
					LWLockRelease(billing_sync->lock);
					if (redis && (full_resync || overflow))
						resync_all();
					if (redis)
						push_dirty();
					if (redis && billing_check_interval > 0 &&
						TimestampDifferenceExceeds(last_check, now, billing_check_interval * 1000))
					{
						last_check = now;
						check_all();
					}
					if (redis)
						redis_healthy();
				}

				/* after the pushes: a slow maintenance never delays them */
				if (TimestampDifferenceExceeds(last_maintenance, now, billing_maintenance_interval))
				{
					last_maintenance = now;
					maintenance();
				}
				if (redis == NULL && billing_redis_host[0] != '\0')
				{
					long		secs;
					int			usecs;

					TimestampDifference(GetCurrentTimestamp(), next_connect_at, &secs, &usecs);
					timeout = Max(secs * 1000 + usecs / 1000, 10);
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
			billing_sync_record_error("database: %s", edata->message);
			ereport(LOG, (errmsg("billing sync: %s", edata->message)));
			FreeErrorData(edata);
			installed = false;
			last_install_check = 0;
			MemoryContextReset(cycle_cxt);
			timeout = 1000;
		}
		PG_END_TRY();

		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(cycle_cxt);
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
