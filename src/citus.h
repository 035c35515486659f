/*-------------------------------------------------------------------------
 *
 * citus.h
 *	  billing's tables on a Citus cluster: which relation really holds a
 *	  tenant's rows on this node.
 *
 * On Citus, billing.accounts and the tables colocated with it are "shell"
 * tables: the rows live in shards (billing.accounts_102008 ...) spread over
 * the nodes, and only queries planned by Citus are routed to them.  The
 * direct path (direct.c) opens relations itself, so it must open the shard
 * that holds the tenant, and only if that shard is on this node: a shell
 * table is never read or written (it is empty, or holds rows left behind
 * by a migration that no one else would see).
 *
 * The map (table, tenant) -> shard is read from Citus's catalog tables
 * (pg_dist_partition, pg_dist_shard, pg_dist_placement,
 * pg_dist_local_group) with catalog scans, once per backend and again after
 * Citus invalidates the table's relcache entry (it does for every change of
 * those catalogs); the tenant is hashed as Citus hashes it (the type's
 * standard hash function, the column's collation).  No link to citus.so:
 * without Citus, or for a table Citus does not distribute, every function
 * here answers "the table itself".
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_CITUS_H
#define BILLING_CITUS_H

#include "nodes/pg_list.h"
#include "nodes/params.h"
#include "optimizer/planner.h"

/*
 * The relation of logical table `relid` that holds the row(s) of `tenant`
 * (a text datum) on this node: relid itself when Citus does not distribute
 * it, else the tenant's shard.  Raises ZB100 (ERRCODE_BILLING_WRONG_NODE)
 * when that shard is not on this node.  With `for_write`, the shard's Citus
 * metadata lock is taken in ShareLock first, as Citus's executor does
 * before a modification: a shard move or split (which takes it in
 * ExclusiveLock on every node) waits for this transaction, and a charge
 * that waited for a move sees where the shard went.  *shardid is 0 when
 * the table is not distributed.
 */
extern Oid	billing_shard_relid(Oid relid, Datum tenant, bool for_write,
								int64 *shardid);

/* the same for a read that can go elsewhere: InvalidOid when not on this node */
extern Oid	billing_shard_relid_if_local(Oid relid, Datum tenant, int64 *shardid);

/* the relation of index `index_name` (schema nsp) on shard `shardid` (0: the index itself) */
extern Oid	billing_shard_index(const char *index_name, Oid nsp, int64 shardid);

/*
 * The relations of logical table `relid` on this node, in shard order:
 * list_make1_oid(relid) when it is not a Citus table, NIL on a node that
 * holds none of its shards; for a reference table its copy on this node
 * (or NIL).  *distributed tells the two cases apart (true: shards).
 */
extern List *billing_local_shards(Oid relid, bool *distributed);

/* the hash ranges of relid's shards on this node (-1: not distributed) */
extern int	billing_local_ranges(Oid relid, int32 **min, int32 **max);

/* does Citus distribute relid (as a hash-distributed table)? */
extern bool billing_is_distributed(Oid relid);

/* is relid any Citus table (distributed, reference, Citus local)? */
extern bool billing_is_citus_table(Oid relid);

/* the hash Citus computes for a tenant id (text with the default collation) */
extern int32 billing_tenant_hash(const char *tenant, int len);

/* this node's Citus group id (-1: no Citus metadata) */
extern int32 billing_local_group(void);

/*
 * Bumped by every relcache invalidation this backend processes: a relation
 * resolved before a lock wait is resolved again when it changed meanwhile
 * (a charge that waited for billing.citus_distribute() must not write the
 * table that became a shell while it waited).
 */
extern uint64 billing_shard_map_generation;

/* the planner hook that keeps a NULL tenant away from Citus's delegation */
extern void billing_citus_init(void);

#endif							/* BILLING_CITUS_H */
