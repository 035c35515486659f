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

/* one dirty tenant: committed changes not yet pushed to Redis */
typedef struct SyncDirty
{
	char		tenant[SYNC_TENANT_LEN];	/* hash key */
	TimestampTz first_commit;	/* oldest commit not yet pushed */
} SyncDirty;

/*
 * A mark of a PREPAREd transaction (two-phase commit, e.g. Citus committing
 * a transaction that wrote on several nodes): pushed when the transaction
 * is committed (COMMIT PREPARED), dropped when it is rolled back.  An empty
 * tenant means "full resync once it is resolved".
 */
#define SYNC_PREPARED_MAX	1024

typedef struct SyncPrepared
{
	TransactionId xid;
	char		tenant[SYNC_TENANT_LEN];
} SyncPrepared;

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
extern bool billing_sync_enqueue(const char *tenant, TimestampTz commit);
extern int	billing_sync_dequeue(char **tenants, TimestampTz *commits, int max,
								 MemoryContext cxt);
extern int	billing_snapshot_build(char **tenants, int ntenants,
								   MemoryContext out_cxt, SyncSnap **out);
extern int	billing_sync_resolve_prepared(void);
extern void billing_sync_track_prepared(TransactionId xid);
extern void billing_sync_record_error(const char *fmt,...) pg_attribute_printf(1, 2);

#endif							/* BILLING_SYNC_H */
