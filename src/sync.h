/*-------------------------------------------------------------------------
 *
 * sync.h
 *	  Change capture for the Redis mirror: backends record which tenants
 *	  a transaction changed; at commit they are moved into a set in shared
 *	  memory and the background worker's latch is set.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_SYNC_H
#define BILLING_SYNC_H

#include "access/transam.h"
#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/hsearch.h"

/*
 * Tenant ids are at most 255 characters: up to 1,020 bytes in UTF-8 (the
 * longest server encoding uses 4 bytes per character).  Longer ids cannot
 * occur; if one did, its commit would request a full resync instead.
 */
#define SYNC_TENANT_LEN		1024
#define SYNC_LAG_RING		1024
#define SYNC_ERROR_LEN		256

/*
 * Which API key hashes of a dirty tenant must be pushed.  A transaction
 * names the keys it changed (up to SYNC_KEYS_LEN bytes of ids per tenant);
 * beyond that, or when it cannot say which (the SQL-level
 * billing.sync_mark(tenant)), it asks for every key whose version
 * (api_keys.version, the account version of the key's last change) is
 * above scan_since: the account version the first such transaction found.
 * SYNC_NO_SCAN: the named keys only (maybe none: the tenant hash alone).
 */
#define SYNC_KEYS_LEN		256
#define SYNC_NO_SCAN		PG_INT64_MAX
#define SYNC_SCAN_ALL		INT64CONST(-1)

/* one dirty tenant: committed changes not yet pushed to Redis */
typedef struct SyncDirty
{
	char		tenant[SYNC_TENANT_LEN];	/* hash key */
	TimestampTz first_commit;	/* oldest commit not yet pushed */
	int64		scan_since;		/* keys with a version above it, or SYNC_NO_SCAN */
	int			keys_len;		/* bytes of keys used */
	char		keys[SYNC_KEYS_LEN];	/* ids of changed keys, each NUL-terminated */
} SyncDirty;

/*
 * A mark of a PREPAREd transaction (two-phase commit, e.g. Citus committing
 * a transaction that wrote on several nodes): pushed when the transaction
 * is committed (COMMIT PREPARED), dropped when it is rolled back.  An empty
 * tenant means "full resync once it is resolved".  The key hashes to push
 * are found by version (scan_since; the ids of named keys are not kept).
 */
#define SYNC_PREPARED_MAX	1024

typedef struct SyncPrepared
{
	TransactionId xid;
	char		tenant[SYNC_TENANT_LEN];
	int64		scan_since;		/* keys with a version above it, or SYNC_NO_SCAN */
} SyncPrepared;

/*
 * What the worker pushes of a tenant: its hash, and the key hashes named
 * or found by version (above).  A tenant with more keys to push than one
 * batch may take carries on where it stopped (resume: keys after
 * (after_version, after_key) in that order), round-robin with the others.
 */
typedef struct SyncWant
{
	char	   *tenant;
	TimestampTz first_commit;	/* 0 when unknown (resync) */
	int64		scan_since;
	int			nkeys;
	char	  **keys;
	bool		resume;			/* a scan that stopped at (after_version, after_key) */
	int64		after_version;
	char	   *after_key;
	bool		more;			/* (out) keys left for another batch */
} SyncWant;

/* what one Redis hash of the mirror holds (snapshot.c builds them) */
typedef struct SyncSnap
{
	char	   *tenant;
	char	   *key_id;			/* NULL: the tenant hash */
	int64		version;
	int			nfields;		/* field/value strings */
	char	  **fields;
	int			input;			/* index of the tenant in the builder's input */
	TimestampTz first_commit;	/* 0 when unknown (resync) */
} SyncSnap;

typedef struct SyncShared
{
	LWLock	   *lock;			/* protects everything below */
	pid_t		worker_pid;
	Latch	   *worker_latch;
	bool		overflow;		/* a mark was lost: a full resync is needed */
	bool		resync_pending; /* the worker wants a full resync, or is in one */
	Oid			database;		/* the worker's database (InvalidOid: not yet
								 * known); commits elsewhere are not marked */
	/* worker statistics, for billing_sync_status() */
	bool		connected;
	char		redis_run_id[48];
	TimestampTz inflight_oldest;	/* oldest commit in the batch being pushed */
	TimestampTz last_push_at;
	TimestampTz last_full_resync_at;
	TimestampTz last_error_at;
	TimestampTz last_check_at;
	int64		pushed;
	int64		failed;
	int64		full_resyncs;
	int64		repaired;
	char		last_error[SYNC_ERROR_LEN];
	/* the worker's probe of billing.database (a short-lived process) */
	char		probe_problem[SYNC_ERROR_LEN];	/* "" when it can connect */
	/*
	 * The dirty tenants in the order they became dirty: a ring of pointers
	 * to the hash entries (ring_size = billing.sync_max_dirty), so that the
	 * worker takes them without walking every bucket of the hash table
	 * under the lock that committing backends wait for.
	 */
	SyncDirty **ring;
	int			ring_head;
	int			ring_count;
	int			lag_next;		/* ring of recent commit->Redis lags, microseconds */
	int			lag_count;		/* entries filled, at most SYNC_LAG_RING */
	int64		lag_us[SYNC_LAG_RING];
	int			nprepared;		/* entries of prepared[] in use */
	SyncPrepared *prepared;		/* SYNC_PREPARED_MAX */
} SyncShared;

extern SyncShared *billing_sync;
extern HTAB *billing_sync_dirty;
extern int	billing_sync_max_dirty;

extern void billing_sync_init(void);
extern void billing_sync_mark(const char *tenant, int len);
extern void billing_sync_mark_account(const char *tenant, int len, int64 since);
extern void billing_sync_mark_key(const char *tenant, int len, const char *key,
								  int keylen, int64 since);
extern bool billing_sync_enqueue(const char *tenant, TimestampTz commit,
								 int64 scan_since, int nkeys, char **keys,
								 int64 since);
extern int	billing_sync_dequeue(SyncWant *wants, int max, MemoryContext cxt);
extern int	billing_snapshot_build(SyncWant *wants, int nwants, int max_keys,
								   MemoryContext out_cxt, SyncSnap **out);
extern int	billing_sync_resolve_prepared(void);
extern void billing_sync_track_prepared(TransactionId xid);
extern void billing_sync_record_error(const char *fmt,...) pg_attribute_printf(1, 2);

#endif							/* BILLING_SYNC_H */
