/*-------------------------------------------------------------------------
 *
 * mirror.c
 *	  The mirror's protocol with Redis: what the gateways rely on
 *	  (lua/README.md) and how the worker keeps it true.
 *
 * - A snapshot is applied with lua/apply_snapshot.lua (SCRIPT LOAD once
 *   per connection, then pipelined EVALSHA: NOSCRIPT cannot be handled
 *   mid-pipeline), which replaces the hash only if its account version is
 *   newer than the stored one (or when forced, by a repair).  The pipeline
 *   is written in RESP into one buffer and handed to the connection about
 *   a megabyte at a time (PUSH_CHUNK).
 * - The marker key <prefix>:__sync__ holds which ledger the mirror shows:
 *   "<system id>:<database oid>:<extension oid>" (the epoch).  Account
 *   versions start again at 0 when the extension is dropped and created
 *   again (or the database restored elsewhere), and the version guard
 *   would then keep the old hashes: a full resync that finds another
 *   ledger's marker deletes the old hashes first (SCAN + UNLINK, a bounded
 *   number of SCAN calls per step and in all).  A marker that vanished
 *   (FLUSHALL) means everything must be pushed again.  On Citus each node
 *   has a marker of its own and wipes only its own tenants' hashes.
 * - A different Redis server process than before (INFO server run_id) may
 *   have lost everything: full resync.
 * - The consistency check compares a hash with its snapshot, field by
 *   field, allowing for a day or month that ended since the push.
 *
 * Every reply is checked for its type before use; anything unexpected
 * closes the connection (redis_unexpected).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"
#include "common/int.h"

#include "citus.h"
#include "guc.h"
#include "miscadmin.h"
#include "mirror.h"
#include "redis.h"
#include "resp.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

static char apply_sha[41] = "";
static char purge_sha[41] = "";
static bool ready = false;		/* connected, script loaded */
static char run_id[48] = "";
static char epoch[64] = "";
static bool full_resync = true;

/*
 * On Citus every node mirrors the tenants of its own shards into the same
 * Redis: each has its own marker key, <prefix>:__sync__:<group>, holding
 * its own ledger identity, and a wipe deletes only the hashes of tenants
 * whose hash falls in one of this node's shard ranges (the other nodes'
 * hashes are theirs).  node_group -1: not distributed, one marker, a wipe
 * deletes every hash of the prefix.
 */
static int32 node_group = -1;
static int	node_nranges = 0;
static int32 *node_min = NULL;
static int32 *node_max = NULL;

/* the wipe of another ledger's hashes, across steps */
static bool wiping = false;
static uint64 wipes = 0;			/* wipes started (outbox.c sends the events again) */
static char wipe_cursor[32];
static int64 wipe_calls;
static int64 wipe_limit;

#define WIPE_STEP		50		/* SCAN calls per step */
#define WIPE_COUNT		"1000"	/* SCAN's COUNT */

/* bytes of RESP per hand-over (-DPUSH_CHUNK=64 tests the hand-over) */
#ifndef PUSH_CHUNK
#define PUSH_CHUNK (1024 * 1024)
#endif

#define MAX_HASH_FIELDS	128		/* a hash the worker writes has fewer than 40 */

/*
 * The resync wanted, in the worker and for billing_sync_status() (its
 * full_resync_pending: until the resync is done, not only until it starts).
 */
static uint64 resync_requests = 0;	/* how often one was asked for */
/* a full resync that Redis asked for waits until then (redis_asks_resync) */
static TimestampTz resync_not_before = 0;
static TimestampTz redis_resync_asked = 0;	/* the last request */
static int	redis_resync_wait_ms = 0;
static int	redis_resync_streak = 0;	/* requests in a row, each within the calm */

static void
set_full_resync(bool on)
{
	if (on)
		resync_requests++;
	full_resync = on;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->resync_pending = on;
	LWLockRelease(billing_sync->lock);
}

void
mirror_request_resync(void)
{
	resync_not_before = 0;		/* not one that Redis asked for: at once */
	set_full_resync(true);
}

bool
mirror_resync_pending(void)
{
	return full_resync;
}

/*
 * A resync that began when mirror_resync_requests() said `started` is done;
 * a request made since (the ledger's identity changed under it, Redis
 * restarted) stays, and the next resync answers it.
 */
void
mirror_resync_done(uint64 started)
{
	if (resync_requests == started)
		set_full_resync(false);
}

/*
 * Full resyncs that Redis asks for: its marker gone, a new run_id.  An
 * honest Redis asks rarely (a restart, a FLUSHALL).  One that keeps asking
 * (a marker evicted under maxmemory, a hostile server) would have the worker
 * read and push every account, and log it, in every cycle.  The first
 * request starts at once; each one that follows within REDIS_RESYNC_CALM_MS
 * of the one before waits twice as long as the last did (1 s, 2 s, ...,
 * REDIS_RESYNC_MAX_WAIT_MS).  Other reasons for a resync (lost marks, the
 * ledger's identity) never wait.
 */
#define REDIS_RESYNC_CALM_MS		60000
#define REDIS_RESYNC_MAX_WAIT_MS	30000

/*
 * Redis asks for a full resync: when may it start (ms from now)?  Unless
 * one it asked for is waiting already: a request during a resync under way
 * counts as the next one (that resync is then not enough, and the next
 * waits).
 */
static int
redis_asks_resync(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (!full_resync || now >= resync_not_before)
	{
		if (redis_resync_asked != 0 &&
			!TimestampDifferenceExceeds(redis_resync_asked, now, REDIS_RESYNC_CALM_MS))
		{
			redis_resync_wait_ms = Min(Max(redis_resync_wait_ms * 2, 1000), REDIS_RESYNC_MAX_WAIT_MS);
			redis_resync_streak++;
		}
		else
		{
			redis_resync_wait_ms = 0;
			redis_resync_streak = 1;
		}
		redis_resync_asked = now;
		resync_not_before = redis_resync_wait_ms == 0 ? 0 :
			TimestampTzPlusMilliseconds(now, redis_resync_wait_ms);
	}
	set_full_resync(true);
	return resync_not_before > now ? (int) ((resync_not_before - now) / 1000) : 0;
}

/*
 * May a pending full resync start now (one that Redis asked for may wait)?
 * If not, *wait_ms says how long it still waits.
 */
bool
mirror_resync_may_start(TimestampTz now, int *wait_ms)
{
	if (now >= resync_not_before)
		return true;
	*wait_ms = (int) Min((resync_not_before - now) / 1000 + 1, REDIS_RESYNC_MAX_WAIT_MS);
	return false;
}

uint64
mirror_resync_requests(void)
{
	return resync_requests;
}

void
mirror_note_epoch(const char *now)
{
	if (strcmp(now, epoch) != 0)
	{
		strlcpy(epoch, now, sizeof(epoch));
		resync_not_before = 0;	/* another ledger: at once */
		set_full_resync(true);
	}
}

void
mirror_note_node(int32 group, int nranges, const int32 *min, const int32 *max)
{
	if (node_min)
		pfree(node_min);
	if (node_max)
		pfree(node_max);
	node_min = node_max = NULL;
	node_nranges = 0;
	node_group = group;
	if (group >= 0 && nranges > 0)
	{
		node_min = MemoryContextAlloc(TopMemoryContext, sizeof(int32) * nranges);
		node_max = MemoryContextAlloc(TopMemoryContext, sizeof(int32) * nranges);
		memcpy(node_min, min, sizeof(int32) * nranges);
		memcpy(node_max, max, sizeof(int32) * nranges);
		node_nranges = nranges;
	}
}

int32
mirror_node_group(void)
{
	return node_group;
}

bool
mirror_wiping(void)
{
	return wiping;
}

uint64
mirror_wipes(void)
{
	return wipes;
}

/*
 * Is key <prefix>:{tenant}..., and on Citus of a tenant of this node (see
 * node_group)?  SCAN's MATCH asked for that pattern, but what SCAN returns
 * is Redis' word: a key of another application is never deleted.
 */
static bool
key_is_ours(const char *key, size_t len)
{
	size_t		plen = strlen(billing_redis_prefix);
	const char *open;
	const char *close;
	int32		hash;

	if (len < plen + 2 || memcmp(key, billing_redis_prefix, plen) != 0 ||
		key[plen] != ':' || key[plen + 1] != '{')
		return false;
	open = key + plen + 2;
	close = memchr(open, '}', len - plen - 2);
	if (close == NULL)
		return false;
	if (node_group < 0)
		return true;
	hash = billing_tenant_hash(open, (int) (close - open));
	for (int i = 0; i < node_nranges; i++)
		if (hash >= node_min[i] && hash <= node_max[i])
			return true;
	return false;
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

static bool
is_hex(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (!isxdigit((unsigned char) s[i]))
			return false;
	return true;
}

/* SCRIPT LOAD: the sha1 into sha[41]; false if Redis failed */
static bool
load_script(const char *script, char *sha)
{
	const char *argv[] = {"SCRIPT", "LOAD", script};
	redisReply *r = redis_command("SCRIPT LOAD", 3, argv, NULL);

	if (r == NULL)
		return false;
	if (r->type != REDIS_REPLY_STRING || r->len != 40 || !is_hex(r->str, 40))
		return redis_unexpected(r, "SCRIPT LOAD");
	memcpy(sha, r->str, 40);
	sha[40] = '\0';
	redis_free(r);
	return true;
}

/*
 * Connect and get ready to push: the scripts are read before connecting
 * (an error there must not leave a half set-up link), loaded, and the
 * run_id noted.
 */
bool
mirror_connect(void)
{
	char	   *apply;
	char	   *purge;
	bool		loaded;

	if (ready && redis_is_open())
		return true;
	ready = false;
	wiping = false;
	apply = read_script("apply_snapshot.lua");
	purge = read_script("purge.lua");
	if (!redis_open())
	{
		pfree(apply);
		pfree(purge);
		return false;
	}
	loaded = load_script(apply, apply_sha) && load_script(purge, purge_sha);
	pfree(apply);
	pfree(purge);
	if (!loaded)
		return false;
	if (!mirror_check_run_id())
		return false;
	ready = true;
	if (billing_sync)
	{
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		billing_sync->connected = true;
		LWLockRelease(billing_sync->lock);
	}
	return true;
}

bool
mirror_connected(void)
{
	return ready && redis_is_open();
}

/*
 * Checked at every connect, and every second on a live connection, which
 * a proxy may keep across a restart.  An INFO refused (an ACL) makes the
 * run_id unknown, not a restart.
 */
bool
mirror_check_run_id(void)
{
	const char *argv[] = {"INFO", "server"};
	redisReply *r = redis_command("INFO server", 2, argv, NULL);
	char		now_id[48] = "";

	if (r == NULL)
		return false;
	if (r->type == REDIS_REPLY_ERROR)
	{
		redis_free(r);
		return true;
	}
	if (r->type != REDIS_REPLY_STRING)
		return redis_unexpected(r, "INFO server");
	{
		const char *p = r->str;
		const char *end = r->str + r->len;

		/* "run_id:<40 hex>" at the start of a line */
		while (p < end)
		{
			const char *eol = memchr(p, '\n', end - p);
			size_t		linelen = (eol ? eol : end) - p;

			if (linelen >= 7 && memcmp(p, "run_id:", 7) == 0)
			{
				size_t		n = linelen - 7;

				if (n > 0 && p[7 + n - 1] == '\r')
					n--;
				if (n > 0 && n < sizeof(now_id) && is_hex(p + 7, n))
				{
					memcpy(now_id, p + 7, n);
					now_id[n] = '\0';
				}
				break;
			}
			p += linelen + 1;
		}
	}
	redis_free(r);
	if (now_id[0] != '\0' && strcmp(now_id, run_id) != 0)
	{
		bool		known = run_id[0] != '\0';
		int			wait_ms = redis_asks_resync();

		if (known)
			ereport(LOG,
					(errmsg("billing sync: Redis restarted (run_id %s, was %s): full resync",
							now_id, run_id),
					 wait_ms > 0 ? errdetail("Redis asked for a full resync %d times in a row, each within %d s of the one before: this one starts in %d s.",
											 redis_resync_streak, REDIS_RESYNC_CALM_MS / 1000, wait_ms / 1000) : 0));
		strlcpy(run_id, now_id, sizeof(run_id));
		LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
		strlcpy(billing_sync->redis_run_id, run_id, sizeof(billing_sync->redis_run_id));
		LWLockRelease(billing_sync->lock);
	}
	return true;
}

static char *
marker_key(void)
{
	if (node_group >= 0)
		return psprintf("%s:__sync__:%d", billing_redis_prefix, node_group);
	return psprintf("%s:__sync__", billing_redis_prefix);
}

/* FLUSHALL (or anyone) removed the marker: everything must be pushed again */
bool
mirror_check_marker(void)
{
	char	   *key = marker_key();
	const char *argv[] = {"EXISTS", key};
	redisReply *r = redis_command("EXISTS", 2, argv, NULL);
	bool		gone;

	if (r == NULL)
		return false;
	if (r->type != REDIS_REPLY_INTEGER)
		return redis_unexpected(r, "EXISTS");
	gone = r->integer == 0;
	redis_free(r);				/* before any ereport */
	if (gone && !full_resync)
	{
		int			wait_ms = redis_asks_resync();

		ereport(LOG,
				(errmsg("billing sync: marker key %s is gone (FLUSHALL?): full resync", key),
				 wait_ms > 0 ? errdetail("Redis asked for a full resync %d times in a row, each within %d s of the one before: this one starts in %d s.",
										 redis_resync_streak, REDIS_RESYNC_CALM_MS / 1000, wait_ms / 1000) : 0,
				 wait_ms > 0 ? errhint("A Redis that loses the marker key again and again evicts keys (maxmemory-policy), or is not the server it claims to be.") : 0));
	}
	pfree(key);
	return true;
}

bool
mirror_set_marker(void)
{
	char	   *key = marker_key();
	const char *argv[] = {"SET", key, epoch};
	redisReply *r = redis_command("SET", 3, argv, NULL);

	pfree(key);
	if (r == NULL)
		return false;
	if (r->type != REDIS_REPLY_STATUS)
		return redis_unexpected(r, "SET of the marker");
	redis_free(r);
	return true;
}

/*
 * One SCAN call of the wipe and the UNLINK of the keys it returned.  Sets
 * *done when the cursor came back to 0.
 */
static bool
wipe_one(const char *pattern, bool *done)
{
	const char *argv[] = {"SCAN", wipe_cursor, "MATCH", pattern, "COUNT", WIPE_COUNT};
	redisReply *r = redis_command("SCAN", 6, argv, NULL);
	redisReply *keys;
	StringInfoData buf;
	size_t		nours = 0;

	if (r == NULL)
		return false;
	if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
		r->element[0]->type != REDIS_REPLY_STRING ||
		r->element[0]->len == 0 || r->element[0]->len >= sizeof(wipe_cursor) ||
		strspn(r->element[0]->str, "0123456789") != r->element[0]->len ||
		r->element[1]->type != REDIS_REPLY_ARRAY)
		return redis_unexpected(r, "SCAN");
	keys = r->element[1];
	for (size_t i = 0; i < keys->elements; i++)
		if (keys->element[i]->type != REDIS_REPLY_STRING)
			return redis_unexpected(r, "SCAN (a key of its list is not a string)");
	strlcpy(wipe_cursor, r->element[0]->str, sizeof(wipe_cursor));
	*done = strcmp(wipe_cursor, "0") == 0;
	/* Citus: only the hashes of this node's tenants (see node_group) */
	for (size_t i = 0; i < keys->elements; i++)
		if (key_is_ours(keys->element[i]->str, keys->element[i]->len))
			nours++;
	if (nours == 0)
	{
		redis_free(r);
		return true;
	}

	/* UNLINK key...: the key names byte for byte, lengths explicit */
	initStringInfo(&buf);
	resp_head(&buf, '*', nours + 1);
	resp_str(&buf, "UNLINK");
	for (size_t i = 0; i < keys->elements; i++)
		if (key_is_ours(keys->element[i]->str, keys->element[i]->len))
			resp_bulk(&buf, keys->element[i]->str, keys->element[i]->len);
	redis_free(r);
	redis_begin("UNLINK");
	if (!redis_send(&buf, 1))
	{
		pfree(buf.data);
		return false;
	}
	pfree(buf.data);
	r = redis_receive();
	if (r == NULL)
		return false;
	if (r->type != REDIS_REPLY_INTEGER)
		return redis_unexpected(r, "UNLINK");
	redis_free(r);
	return true;
}

/*
 * How many SCAN calls a wipe may take: a SCAN of a keyspace of n keys
 * visits about n / COUNT buckets per call, and the table has at most twice
 * as many buckets as keys; a server whose cursor never comes back to 0
 * (or lies about its size) is given up on after that.
 */
static bool
wipe_start(void)
{
	const char *argv[] = {"DBSIZE"};
	redisReply *r = redis_command("DBSIZE", 1, argv, NULL);

	if (r == NULL)
		return false;
	if (r->type == REDIS_REPLY_INTEGER && r->integer >= 0)
		/* at most 2^32 keys in a Redis: a larger DBSIZE is not believed */
		wipe_limit = 100 + 4 * (Min(r->integer, INT64CONST(4294967296)) / 1000 + 1);
	else if (r->type == REDIS_REPLY_ERROR)
		wipe_limit = 100000;	/* DBSIZE refused (an ACL) */
	else
		return redis_unexpected(r, "DBSIZE");
	redis_free(r);
	wipe_calls = 0;
	strlcpy(wipe_cursor, "0", sizeof(wipe_cursor));
	wiping = true;
	wipes++;
	return true;
}

/*
 * Before a full resync: does Redis hold the mirror of another ledger?  Then
 * delete its hashes, WIPE_STEP SCAN calls per step (the worker runs its
 * maintenance between steps).  A marker of the form of older versions (a
 * number) is taken as ours.
 */
MirrorClaim
mirror_claim(void)
{
	StringInfoData pattern;
	MirrorClaim result = CLAIM_MORE;

	if (!wiping)
	{
		char	   *key = marker_key();
		const char *argv[] = {"GET", key};
		redisReply *r = redis_command("GET of the marker", 2, argv, NULL);
		char		theirs[64] = "";

		pfree(key);
		if (r == NULL)
			return CLAIM_FAILED;
		if (r->type == REDIS_REPLY_STRING)
			redis_reply_text(r, theirs, sizeof(theirs));
		else if (r->type != REDIS_REPLY_NIL)
		{
			(void) redis_unexpected(r, "GET of the marker");
			return CLAIM_FAILED;
		}
		redis_free(r);
		if (theirs[0] == '\0' || strcmp(theirs, epoch) == 0 ||
			strspn(theirs, "0123456789") == strlen(theirs))
			return CLAIM_DONE;
		ereport(LOG,
				(errmsg("billing sync: Redis holds the mirror of another ledger (marker %s, ours %s): deleting its hashes before the full resync",
						theirs, epoch),
				 errdetail("The extension was created again, or the database restored: account versions started over.")));
		if (!wipe_start())
			return CLAIM_FAILED;
	}

	/* the prefix is literal: escape the glob characters of MATCH */
	initStringInfo(&pattern);
	for (const char *p = billing_redis_prefix; *p; p++)
	{
		if (strchr("*?[]\\", *p))
			appendStringInfoChar(&pattern, '\\');
		appendStringInfoChar(&pattern, *p);
	}
	appendStringInfoString(&pattern, ":{*");
	for (int i = 0; i < WIPE_STEP; i++)
	{
		bool		done = false;

		CHECK_FOR_INTERRUPTS();
		if (!wipe_one(pattern.data, &done))
		{
			wiping = false;
			result = CLAIM_FAILED;
			break;
		}
		wipe_calls++;
		if (done)
		{
			wiping = false;
			result = CLAIM_DONE;
			break;
		}
		if (wipe_calls >= wipe_limit)
		{
			wiping = false;
			redis_close("SCAN did not finish after " INT64_FORMAT " calls (DBSIZE allows " INT64_FORMAT "): the old mirror was not deleted",
						wipe_calls, wipe_limit);
			result = CLAIM_FAILED;
			break;
		}
	}
	pfree(pattern.data);
	return result;
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
 * An error reply that concerns the keys of one tenant only: the script's
 * own argument check, or a key of another type.  Anything else (NOSCRIPT,
 * READONLY, LOADING, OOM, BUSY, ...) concerns the server.
 */
static bool
tenant_error(const redisReply *r)
{
	return r->type == REDIS_REPLY_ERROR && r->str != NULL &&
		((r->len >= 9 && strncmp(r->str, "WRONGTYPE", 9) == 0) ||
		 (r->len >= 7 && strncmp(r->str, "BADARGS", 7) == 0));
}

bool
mirror_push(SyncSnap *snaps, int n, MirrorApply mode, char **errors)
{
	static const char *const pending[] = {":pending", ":pending_amt", ":pending_ver", ":pending_key"};
	int			nfailed = 0;
	TimestampTz now;
	char		version[MAXINT8LEN + 1];
	StringInfoData buf;

	if (n == 0)
		return true;
	if (!mirror_connected())
		return false;
	initStringInfo(&buf);
	redis_begin("EVALSHA");
	for (int i = 0; i < n; i++)
	{
		SyncSnap   *s = &snaps[i];
		int			nkeys = s->key_id ? 1 : 5;

		errors[i] = NULL;

		/* hand over about a megabyte at a time, whatever the batch size */
		if (buf.len >= PUSH_CHUNK)
		{
			if (!redis_send(&buf, 0))
			{
				pfree(buf.data);
				return false;
			}
		}
		resp_head(&buf, '*', 3 + nkeys + 2 + s->nfields);
		resp_str(&buf, "EVALSHA");
		resp_bulk(&buf, apply_sha, 40);
		resp_str(&buf, s->key_id ? "1" : "5");
		resp_key(&buf, s, "");
		for (int k = 0; k < nkeys - 1; k++)
			resp_key(&buf, s, pending[k]);
		(void) pg_lltoa(s->version, version);
		resp_str(&buf, version);
		resp_str(&buf, mode == APPLY_FORCE ? "1" : mode == APPLY_REFRESH ? "2" : "0");
		for (int f = 0; f < s->nfields; f++)
			resp_str(&buf, s->fields[f]);
	}
	/* the deadline counts every command of the pipeline */
	if (!redis_send(&buf, n))
	{
		pfree(buf.data);
		return false;
	}
	pfree(buf.data);

	for (int i = 0; i < n; i++)
	{
		redisReply *r = redis_receive();

		if (r == NULL)
			return false;
		if (tenant_error(r))
		{
			char		err[128];

			redis_reply_text(r, err, sizeof(err));
			redis_free(r);
			errors[i] = pstrdup(err);
			nfailed++;
			continue;
		}
		if (r->type != REDIS_REPLY_INTEGER)
			return redis_unexpected(r, "EVALSHA of apply_snapshot.lua");
		redis_free(r);
	}

	/* statistics: commit -> Redis lag of every tenant we knew the commit of */
	now = GetCurrentTimestamp();
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		if (snaps[i].key_id || snaps[i].first_commit == 0 || errors[i])
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

/*
 * The reservation sweep: one pipelined EVALSHA of lua/purge.lua per tenant
 * (its four pending structures and its hash).  A tenant whose keys have
 * another type (an error of its own) is skipped: its pushes fail too, and
 * say so.
 */
bool
mirror_purge(char **tenants, int n, int64 *removed)
{
	static const char *const pending[] = {":pending", ":pending_amt", ":pending_ver", ":pending_key"};
	StringInfoData buf;
	SyncSnap	s = {0};

	*removed = 0;
	if (n == 0)
		return true;
	if (!mirror_connected())
		return false;
	initStringInfo(&buf);
	redis_begin("EVALSHA");
	for (int i = 0; i < n; i++)
	{
		if (buf.len >= PUSH_CHUNK && !redis_send(&buf, 0))
		{
			pfree(buf.data);
			return false;
		}
		s.tenant = tenants[i];
		resp_head(&buf, '*', 3 + 5);
		resp_str(&buf, "EVALSHA");
		resp_bulk(&buf, purge_sha, 40);
		resp_str(&buf, "5");
		for (int k = 0; k < 4; k++)
			resp_key(&buf, &s, pending[k]);
		resp_key(&buf, &s, "");
	}
	if (!redis_send(&buf, n))
	{
		pfree(buf.data);
		return false;
	}
	pfree(buf.data);
	for (int i = 0; i < n; i++)
	{
		redisReply *r = redis_receive();

		if (r == NULL)
			return false;
		if (tenant_error(r))
		{
			redis_free(r);
			continue;
		}
		if (r->type != REDIS_REPLY_INTEGER || r->integer < 0)
			return redis_unexpected(r, "EVALSHA of purge.lua");
		/* a count from Redis (untrusted): saturates, never overflows */
		if (pg_add_s64_overflow(*removed, r->integer, removed))
			*removed = PG_INT64_MAX;
		redis_free(r);
	}
	return true;
}

/* the value of a field of an HGETALL reply (checked: strings), or NULL */
static const redisReply *
hash_field(const redisReply *r, const char *name)
{
	for (size_t e = 0; e + 1 < r->elements; e += 2)
		if (strcmp(r->element[e]->str, name) == 0)
			return r->element[e + 1];
	return NULL;
}

static const char *
snap_field(const SyncSnap *s, const char *name)
{
	for (int f = 0; f + 1 < s->nfields; f += 2)
		if (strcmp(s->fields[f], name) == 0)
			return s->fields[f + 1];
	return NULL;
}

/* a strict decimal int64 of a reply string */
static bool
reply_int64(const redisReply *v, int64 *out)
{
	char	   *end;

	if (v == NULL || v->len == 0 || v->len > 20)
		return false;
	errno = 0;
	*out = strtoi64(v->str, &end, 10);
	return errno == 0 && end == v->str + v->len;
}

/*
 * Fields that reset when a period ends, each group with the field that
 * says when (lua/README.md: a gateway counts them as 0 from then on).  A
 * hash pushed before the period ended and the snapshot read after it
 * differ there, at the same version, without anything having drifted.
 */
static const char *const period_groups[][4] = {
	{"day_resets_at_ms", "day_requests", "day_spend", NULL},
	{"month_resets_at_ms", "month_requests", "month_spend", NULL},
	{"resets_at_ms", "spent", NULL, NULL},	/* an API key's budget period */
};

/* may `field` differ because its period ended (Redis' reset time passed)? */
static bool
period_ended(const redisReply *r, const SyncSnap *s, const char *field, int64 now_ms)
{
	for (int g = 0; g < lengthof(period_groups); g++)
	{
		bool		member = false;
		int64		resets;

		for (int m = 0; m < 4 && period_groups[g][m]; m++)
			if (strcmp(period_groups[g][m], field) == 0)
				member = true;
		if (!member)
			continue;
		if (!reply_int64(hash_field(r, period_groups[g][0]), &resets) || resets > now_ms)
			return false;
		/* the snapshot's counters of the new period must be 0 */
		for (int m = 1; m < 4 && period_groups[g][m]; m++)
		{
			const char *v = snap_field(s, period_groups[g][m]);

			if (v != NULL && strcmp(v, "0") != 0)
				return false;
		}
		return true;
	}
	return false;
}

/*
 * Fields that change with the time alone, at one version: holds expire
 * (holds, and available with them), grant credit expires (balance,
 * available), and the times of the next ones.  A hash whose own
 * holds_expire_at_ms or grants_expire_at_ms has passed may differ from a
 * snapshot of the same version there: it is due for a refresh (the gateway
 * scripts leave expired credit out by themselves), not drift.
 */
static const char *const timed_fields[] = {
	"balance", "available", "holds", "holds_expire_at_ms",
	"grants_expire_at_ms", "grants_expire_amount", "grants_expiries",
};

static bool
is_timed(const char *field)
{
	for (int i = 0; i < lengthof(timed_fields); i++)
		if (strcmp(timed_fields[i], field) == 0)
			return true;
	return false;
}

/* has one of the hash's own expiry times passed? */
static bool
timed_out(const redisReply *r, int64 now_ms)
{
	static const char *const times[] = {"holds_expire_at_ms", "grants_expire_at_ms"};
	int64		at;

	for (int i = 0; i < lengthof(times); i++)
		if (reply_int64(hash_field(r, times[i]), &at) && at <= now_ms)
			return true;
	return false;
}

static MirrorMatch
compare(const redisReply *r, const SyncSnap *s, int64 now_ms)
{
	const redisReply *v = hash_field(r, "version");
	int64		stored;
	bool		timed = false;
	bool		refresh = false;

	if (r->elements == 0)
		return MATCH_DRIFT;		/* no hash: deleted (a new account is dirty, pushed first) */
	if (!reply_int64(v, &stored))
		return MATCH_DRIFT;
	if (stored < s->version)
		return MATCH_BEHIND;
	if (stored > s->version)
		return MATCH_DRIFT;
	timed = timed_out(r, now_ms);
	/* every field of Redis is in the snapshot, equal or explained */
	for (size_t e = 0; e + 1 < r->elements; e += 2)
	{
		const char *field = r->element[e]->str;
		const char *want;

		if (strcmp(field, "synced_at_ms") == 0 || strcmp(field, "version") == 0)
			continue;
		want = snap_field(s, field);
		if (want != NULL && strlen(want) == r->element[e + 1]->len &&
			memcmp(want, r->element[e + 1]->str, r->element[e + 1]->len) == 0)
			continue;
		if (want != NULL && period_ended(r, s, field, now_ms))
			continue;
		if (timed && is_timed(field))
		{
			refresh = true;
			continue;
		}
		return MATCH_DRIFT;
	}
	/* and every field of the snapshot is in Redis */
	for (int f = 0; f + 1 < s->nfields; f += 2)
	{
		const char *field = s->fields[f];

		if (strcmp(field, "synced_at_ms") == 0 || strcmp(field, "version") == 0 ||
			hash_field(r, field) != NULL)
			continue;
		if (timed && is_timed(field))
		{
			refresh = true;
			continue;
		}
		return MATCH_DRIFT;
	}
	return refresh ? MATCH_BEHIND : MATCH_SAME;
}

/*
 * What Redis holds for each snapshot: one pipelined HGETALL each.  A key
 * of another type (an error reply) is drift; a reply that is not a list of
 * strings is a protocol surprise.
 */
bool
mirror_match(SyncSnap *snaps, int n, MirrorMatch *verdict)
{
	StringInfoData buf;
	int64		now_ms;

	if (n == 0)
		return true;
	if (!mirror_connected())
		return false;
	initStringInfo(&buf);
	redis_begin("HGETALL");
	for (int i = 0; i < n; i++)
	{
		char	   *key = snapshot_key(&snaps[i]);

		resp_head(&buf, '*', 2);
		resp_str(&buf, "HGETALL");
		resp_str(&buf, key);
		pfree(key);
		if (buf.len >= PUSH_CHUNK && !redis_send(&buf, 0))
		{
			pfree(buf.data);
			return false;
		}
	}
	if (!redis_send(&buf, n))
	{
		pfree(buf.data);
		return false;
	}
	pfree(buf.data);

	now_ms = (GetCurrentTimestamp() / 1000) +
		(int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;
	for (int i = 0; i < n; i++)
	{
		redisReply *r = redis_receive();

		if (r == NULL)
			return false;
		if (r->type == REDIS_REPLY_ERROR)
		{
			verdict[i] = MATCH_DRIFT;
			redis_free(r);
			continue;
		}
		if (r->type != REDIS_REPLY_ARRAY || r->elements % 2 != 0)
			return redis_unexpected(r, "HGETALL");
		if (r->elements > 2 * MAX_HASH_FIELDS)
		{
			/* not a hash the worker wrote: replaced (compare is quadratic) */
			verdict[i] = MATCH_DRIFT;
			redis_free(r);
			continue;
		}
		for (size_t e = 0; e < r->elements; e++)
			if (r->element[e]->type != REDIS_REPLY_STRING)
				return redis_unexpected(r, "HGETALL (an element)");
		verdict[i] = compare(r, &snaps[i], now_ms);
		redis_free(r);
	}
	return true;
}
