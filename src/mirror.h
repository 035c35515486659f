/*-------------------------------------------------------------------------
 *
 * mirror.h
 *	  The mirror's protocol with Redis (lua/README.md): snapshots applied
 *	  with lua/apply_snapshot.lua, the marker key and the ledger identity
 *	  (epoch) it holds, the wipe of another ledger's hashes, the comparison
 *	  of the consistency check, Redis restarts (INFO run_id).
 *
 * Every function returns false when Redis failed (the connection is then
 * closed and the failure recorded, see redis.h).
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_MIRROR_H
#define BILLING_MIRROR_H

#include "sync.h"

/* connection: redis_open + SCRIPT LOAD of apply_snapshot.lua and purge.lua + run_id */
extern bool mirror_connect(void);
extern bool mirror_connected(void);

/* does Redis need every account again (restart, FLUSHALL, new ledger)? */
extern void mirror_request_resync(void);
extern bool mirror_resync_pending(void);
extern bool mirror_resync_may_start(TimestampTz now, int *wait_ms);
extern void mirror_resync_done(uint64 started);
extern uint64 mirror_resync_requests(void);

/* "<system id>:<database oid>:<extension oid>" of the ledger we read */
extern void mirror_note_epoch(const char *epoch);

/* Citus: this node's group and the hash ranges of its shards (group -1: none) */
extern void mirror_note_node(int32 group, int nranges, const int32 *min,
							 const int32 *max);
extern int32 mirror_node_group(void);

/*
 * A wipe of another ledger's keys deletes every <prefix>:{…} key, the
 * tenants' event streams too: is one running, and how many have started?
 */
extern bool mirror_wiping(void);
extern uint64 mirror_wipes(void);

extern bool mirror_check_run_id(void);
extern bool mirror_check_marker(void);
extern bool mirror_set_marker(void);

/* before a full resync: delete another ledger's hashes, a step at a time */
typedef enum MirrorClaim
{
	CLAIM_FAILED,				/* Redis failed */
	CLAIM_MORE,					/* wiping: call again */
	CLAIM_DONE					/* the mirror is ours */
} MirrorClaim;
extern MirrorClaim mirror_claim(void);

/*
 * Apply snapshots (pipelined EVALSHA).  errors[i] is set (palloc'd) for a
 * snapshot refused for a reason of its tenant's own keys (WRONGTYPE,
 * BADARGS): the others are applied.  A snapshot replaces a hash whose
 * version is older (APPLY_NEWER), not newer (APPLY_REFRESH: also one of the
 * same version, whose fields that depend on the time, such as expired
 * credit, are out of date), or whatever it holds (APPLY_FORCE: a repair).
 */
typedef enum MirrorApply
{
	APPLY_NEWER,
	APPLY_FORCE,
	APPLY_REFRESH
} MirrorApply;
extern bool mirror_push(SyncSnap *snaps, int n, MirrorApply mode, char **errors);

/*
 * The reservation sweep (lua/purge.lua): remove the tenants' gateway
 * reservations that expired by Redis' clock and those settled at a version
 * the tenant hash holds.  *removed counts them.
 */
extern bool mirror_purge(char **tenants, int n, int64 *removed);

/* what Redis holds for a snapshot (the consistency check) */
typedef enum MirrorMatch
{
	MATCH_SAME,					/* equal, or equal but for a period that ended */
	MATCH_BEHIND,				/* an older version, or one whose expiries passed:
								 * a push is due (APPLY_REFRESH) */
	MATCH_DRIFT					/* differs at the same or a newer version */
} MirrorMatch;
extern bool mirror_match(SyncSnap *snaps, int n, MirrorMatch *verdict);

#endif							/* BILLING_MIRROR_H */
