/*-------------------------------------------------------------------------
 *
 * citus.c
 *	  billing on a Citus cluster (see citus.h): the map from (table, tenant)
 *	  to the shard relation on this node, and a planner hook that keeps a
 *	  NULL tenant away from Citus's function call delegation.
 *
 * The map.  For each logical table the direct path uses, a ShardMap holds
 * the table's hash ranges in order, each with its shard id, whether a
 * placement of it is on this node's group, and (resolved lazily) the shard
 * relation's oid.  It is built from Citus's catalogs with systable scans
 * under the catalog snapshot (the newest committed metadata, whatever the
 * transaction's isolation level: a REPEATABLE READ charge must not trust a
 * shard that was moved away after its snapshot), and dropped whenever the
 * logical table's relcache entry is invalidated: Citus invalidates it for
 * every change of pg_dist_partition, pg_dist_shard and pg_dist_placement
 * rows of the table, and pg_dist_local_group's own entry when the group id
 * changes.  A lookup after the cache is built costs a hash of the tenant, a
 * binary search and (for writes) one lock-table lookup.
 *
 * Writes take the shard's metadata lock in ShareLock, exactly as Citus's
 * executor does before it modifies a shard (AcquireMetadataLocks): shard
 * moves and splits take it in ExclusiveLock on every node before they
 * switch the placement, so they wait for the charge, and a charge that
 * waited for them looks the placement up again.  The lock tag is Citus's
 * (resource_lock.h): for a table distributed by hash with a colocation
 * group, one lock per (colocation group, shard index), shared by the
 * colocated shards (SET_LOCKTAG_COLOCATED_SHARDS_METADATA_RESOURCE); the
 * per-shard tag would not be waited for by a move, and charges written to
 * the old placement after its copy would be lost.
 *
 * A reference table (billing.tenant_scopes, billing.prices) has one shard
 * with a copy on every node: billing_local_shards() gives this node's copy,
 * which billing.visible_tenants() reads directly.
 *
 * The planner hook.  billing_deduct(NULL, ...) called through the
 * coordinator crashed it: Citus 13.2's delegation hashes the distribution
 * argument without checking it for NULL.  billing is preloaded after citus,
 * so its planner hook runs first: for a statement Citus would try to
 * delegate (SELECT f(...) or SELECT ... FROM f(...)) that calls a billing
 * function whose tenant_id argument is NULL once constants and bound
 * parameters are folded, it plans with standard_planner and skips Citus's
 * planner; the function then runs where it was called, and raises its own
 * "tenant_id must not be null" (ZB015), or (billing_job_claim,
 * billing_verify, billing_cost) does its work without a tenant.  A second
 * crash of the same kind (SELECT f(t) FROM (VALUES ...) v(t): the planner
 * pulls the VALUES up, Citus sees a constant and crashes deparsing) is
 * planned locally too (pulled_up_call).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "executor/tuptable.h"
#include "funcapi.h"
#include "utils/tuplestore.h"
#include "utils/snapmgr.h"
#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "citus.h"
#include "commands/extension.h"
#include "common/hashfn.h"
#include "catalog/dependency.h"
#include "catalog/pg_collation.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "nodes/pathnodes.h"
#include "optimizer/optimizer.h"
#include "parser/parsetree.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "billing.h"

/* Citus's advisory lock classes of shard metadata (resource_lock.h) */
#define CITUS_LOCKTAG_SHARD_METADATA 4
#define CITUS_LOCKTAG_COLOCATED_SHARDS_METADATA 8
/* pg_dist_placement.shardstate of an active placement */
#define CITUS_SHARD_STATE_ACTIVE 1
/* application_name of Citus's own connections (connection_management.h) */
#define CITUS_INTERNAL_PREFIX "citus_internal gpid="

typedef struct ShardMap
{
	Oid			relid;			/* the logical table */
	bool		valid;
	char		method;			/* pg_dist_partition.partmethod, '\0': none */
	bool		distributed;	/* by hash */
	bool		reference;		/* a reference table: one shard, a copy on every node */
	uint32		colocationid;	/* pg_dist_partition.colocationid, 0: none */
	int			nshards;
	int32	   *min;			/* hash ranges, ascending */
	int32	   *max;
	int64	   *shardid;
	bool	   *local;			/* a placement in this node's group */
	Oid		   *shard_relid;	/* InvalidOid: not looked up yet */
	int32	   *group;			/* a group holding it (for messages) */
	MemoryContext cxt;
} ShardMap;

#define MAX_MAPS 32
static ShardMap maps[MAX_MAPS];
static int	nmaps = 0;
static bool callbacks_registered = false;
static int32 local_group = -2;	/* -2: unknown, -1: no Citus metadata */

/* bumped whenever a map may have changed (see direct_open) */
uint64		billing_shard_map_generation = 0;
static Oid	local_group_relid = InvalidOid;

/* ------------------------------------------------------------------------
 * invalidation
 * ------------------------------------------------------------------------
 */
static void
relcache_callback(Datum arg, Oid relid)
{
	billing_shard_map_generation++;
	if (relid == InvalidOid || relid == local_group_relid)
	{
		for (int i = 0; i < nmaps; i++)
			maps[i].valid = false;
		local_group = -2;
		return;
	}
	for (int i = 0; i < nmaps; i++)
	{
		if (!maps[i].valid)
			continue;
		if (maps[i].relid == relid)
			maps[i].valid = false;
		else
			for (int s = 0; s < maps[i].nshards; s++)
				if (maps[i].shard_relid[s] == relid)
				{
					maps[i].valid = false;
					break;
				}
	}
}

static void proc_callback(Datum arg, int cacheid, uint32 hashvalue);

static void
register_callbacks(void)
{
	if (callbacks_registered)
		return;
	CacheRegisterRelcacheCallback(relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(PROCOID, proc_callback, (Datum) 0);
	callbacks_registered = true;
}

/* ------------------------------------------------------------------------
 * Citus's catalogs
 * ------------------------------------------------------------------------
 */
static Oid
citus_catalog(const char *name)
{
	return get_relname_relid(name, PG_CATALOG_NAMESPACE);
}

static AttrNumber
catalog_attnum(Relation rel, const char *col)
{
	AttrNumber	a = get_attnum(RelationGetRelid(rel), col);

	if (a == InvalidAttrNumber)
		elog(ERROR, "billing: Citus catalog %s has no column %s",
			 RelationGetRelationName(rel), col);
	return a;
}

int32
billing_local_group(void)
{
	Oid			relid;
	Relation	rel;
	SysScanDesc scan;
	HeapTuple	tup;

	register_callbacks();
	if (local_group >= 0)
		return local_group;
	/* not cached while Citus is absent: CREATE EXTENSION citus may come */
	relid = citus_catalog("pg_dist_local_group");
	if (!OidIsValid(relid))
		return local_group = -1;
	local_group_relid = relid;
	rel = table_open(relid, AccessShareLock);
	scan = systable_beginscan(rel, InvalidOid, false, NULL, 0, NULL);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, catalog_attnum(rel, "groupid"),
									 RelationGetDescr(rel), &isnull);

		local_group = isnull ? -1 : DatumGetInt32(d);
	}
	else
		local_group = -1;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return local_group;
}

/* the partition method of relid in pg_dist_partition, '\0' when absent */
static char
partition_method(Oid relid, uint32 *colocationid)
{
	Oid			catalog = citus_catalog("pg_dist_partition");
	Oid			index = citus_catalog("pg_dist_partition_logical_relid_index");
	Relation	rel;
	SysScanDesc scan;
	ScanKeyData key;
	HeapTuple	tup;
	char		method = '\0';

	if (!OidIsValid(catalog) || !OidIsValid(index))
		return '\0';
	rel = table_open(catalog, AccessShareLock);
	ScanKeyInit(&key, catalog_attnum(rel, "logicalrelid"), BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(relid));
	scan = systable_beginscan(rel, index, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, catalog_attnum(rel, "partmethod"),
									 RelationGetDescr(rel), &isnull);

		method = isnull ? '?' : DatumGetChar(d);
		d = heap_getattr(tup, catalog_attnum(rel, "colocationid"),
						 RelationGetDescr(rel), &isnull);
		*colocationid = isnull ? 0 : DatumGetUInt32(d);
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return method;
}

typedef struct ShardRow
{
	int64		shardid;
	int32		min;
	int32		max;
} ShardRow;

static int
cmp_shard_rows(const void *a, const void *b)
{
	int32		x = ((const ShardRow *) a)->min;
	int32		y = ((const ShardRow *) b)->min;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * The placements of a shard: is one in `group`?  Fills *some_group and the
 * number of active placements (*nplacements).
 */
static bool
shard_is_in_group(Relation placements, Oid index, int64 shardid, int32 group,
				  int32 *some_group, int *nplacements)
{
	SysScanDesc scan;
	ScanKeyData key;
	HeapTuple	tup;
	bool		found = false;
	AttrNumber	a_group = catalog_attnum(placements, "groupid");
	AttrNumber	a_state = catalog_attnum(placements, "shardstate");

	*some_group = -1;
	*nplacements = 0;
	ScanKeyInit(&key, catalog_attnum(placements, "shardid"), BTEqualStrategyNumber,
				F_INT8EQ, Int64GetDatum(shardid));
	scan = systable_beginscan(placements, index, true, NULL, 1, &key);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
	{
		bool		isnull;
		int32		g = DatumGetInt32(heap_getattr(tup, a_group,
												   RelationGetDescr(placements), &isnull));
		int32		state = DatumGetInt32(heap_getattr(tup, a_state,
													   RelationGetDescr(placements), &isnull));

		if (state != CITUS_SHARD_STATE_ACTIVE)
			continue;
		(*nplacements)++;
		if (!found)
			*some_group = g;
		if (g == group)
			found = true;
	}
	systable_endscan(scan);
	return found;
}

static void
build_map(ShardMap *m)
{
	char		method;
	Oid			shard_cat;
	Oid			shard_idx;
	Oid			place_cat;
	Oid			place_idx;
	Relation	rel;
	Relation	placements;
	SysScanDesc scan;
	ScanKeyData key;
	HeapTuple	tup;
	ShardRow   *rows;
	int			n = 0;
	int			cap = 64;
	int32		group;
	MemoryContext old;

	if (m->cxt == NULL)
		m->cxt = AllocSetContextCreate(CacheMemoryContext, "billing shard map",
									   ALLOCSET_SMALL_SIZES);
	MemoryContextReset(m->cxt);
	m->nshards = 0;
	m->distributed = false;
	m->reference = false;

	m->colocationid = 0;
	method = partition_method(m->relid, &m->colocationid);
	m->method = method;
	if (method != 'h' && method != 'n')
	{
		/* not a Citus table, or not one billing can use (check_method) */
		m->valid = true;
		return;
	}

	group = billing_local_group();
	shard_cat = citus_catalog("pg_dist_shard");
	shard_idx = citus_catalog("pg_dist_shard_logical_relid_index");
	place_cat = citus_catalog("pg_dist_placement");
	place_idx = citus_catalog("pg_dist_placement_shardid_index");
	if (!OidIsValid(shard_cat) || !OidIsValid(shard_idx) ||
		!OidIsValid(place_cat) || !OidIsValid(place_idx))
		elog(ERROR, "billing: Citus catalogs not found");

	rows = palloc(sizeof(ShardRow) * cap);
	rel = table_open(shard_cat, AccessShareLock);
	ScanKeyInit(&key, catalog_attnum(rel, "logicalrelid"), BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(m->relid));
	scan = systable_beginscan(rel, shard_idx, true, NULL, 1, &key);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
	{
		bool		isnull;
		bool		minnull;
		bool		maxnull;
		Datum		minv;
		Datum		maxv;

		if (n == cap)
		{
			cap *= 2;
			rows = repalloc(rows, sizeof(ShardRow) * cap);
		}
		rows[n].shardid = DatumGetInt64(heap_getattr(tup, catalog_attnum(rel, "shardid"),
													 RelationGetDescr(rel), &isnull));
		minv = heap_getattr(tup, catalog_attnum(rel, "shardminvalue"),
							RelationGetDescr(rel), &minnull);
		maxv = heap_getattr(tup, catalog_attnum(rel, "shardmaxvalue"),
							RelationGetDescr(rel), &maxnull);
		if (method == 'n')
			rows[n].min = rows[n].max = 0;	/* a reference table's one shard */
		else if (minnull || maxnull)
			elog(ERROR, "billing: shard " INT64_FORMAT " of %s has no hash range",
				 rows[n].shardid, get_rel_name(m->relid));
		else
		{
			rows[n].min = pg_strtoint32(TextDatumGetCString(minv));
			rows[n].max = pg_strtoint32(TextDatumGetCString(maxv));
		}
		n++;
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	qsort(rows, n, sizeof(ShardRow), cmp_shard_rows);

	old = MemoryContextSwitchTo(m->cxt);
	m->min = palloc(sizeof(int32) * Max(n, 1));
	m->max = palloc(sizeof(int32) * Max(n, 1));
	m->shardid = palloc(sizeof(int64) * Max(n, 1));
	m->local = palloc(sizeof(bool) * Max(n, 1));
	m->shard_relid = palloc0(sizeof(Oid) * Max(n, 1));
	m->group = palloc(sizeof(int32) * Max(n, 1));
	MemoryContextSwitchTo(old);

	placements = table_open(place_cat, AccessShareLock);
	for (int i = 0; i < n; i++)
	{
		int			nplacements;

		m->min[i] = rows[i].min;
		m->max[i] = rows[i].max;
		m->shardid[i] = rows[i].shardid;
		m->local[i] = shard_is_in_group(placements, place_idx, rows[i].shardid,
										group, &m->group[i], &nplacements);

		/*
		 * A replicated shard (citus.shard_replication_factor > 1) would be
		 * written on this placement only; Citus does not delegate calls
		 * for such tables either.  Refused.  (A reference table has a
		 * placement on every node by design: billing only reads it.)
		 */
		if (nplacements > 1 && method == 'h')
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_BAD_DISTRIBUTION),
					 errmsg("shard " INT64_FORMAT " of %s has %d placements",
							rows[i].shardid, get_rel_name(m->relid), nplacements),
					 errdetail("billing writes a tenant's rows on its node directly and supports one placement per shard."),
					 errhint("Distribute billing's tables with citus.shard_replication_factor = 1; use streaming replicas of each node for availability.")));
	}
	table_close(placements, AccessShareLock);
	pfree(rows);
	m->nshards = n;
	m->distributed = method == 'h';
	m->reference = method == 'n';
	m->valid = true;
}

static ShardMap *
get_map(Oid relid)
{
	ShardMap   *m = NULL;

	register_callbacks();
	for (int i = 0; i < nmaps; i++)
		if (maps[i].relid == relid)
			m = &maps[i];
	if (m == NULL)
	{
		if (nmaps == MAX_MAPS)
			elog(ERROR, "billing: too many tables in the shard map cache");
		m = &maps[nmaps++];
		memset(m, 0, sizeof(*m));
		m->relid = relid;
	}
	if (!m->valid)
		build_map(m);
	return m;
}

bool
billing_is_distributed(Oid relid)
{
	return get_map(relid)->distributed;
}

bool
billing_is_citus_table(Oid relid)
{
	return get_map(relid)->method != '\0';
}

/* a tenant's table: not a Citus table, or one distributed by hash */
static void
check_method(ShardMap *m)
{
	if (m->method != '\0' && m->method != 'h')
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_BAD_DISTRIBUTION),
				 errmsg("table %s is a Citus table that is not distributed by hash",
						get_rel_name(m->relid)),
				 errdetail("billing supports its tables distributed by tenant_id (create_distributed_table), prices as a reference table, and nothing else."),
				 errhint("See docs/scaling.md for the supported layout.")));
}

/* ------------------------------------------------------------------------
 * tenant -> shard
 * ------------------------------------------------------------------------
 */

/*
 * hashtext() of a text with the default collation, which is what Citus's
 * FindShardInterval computes for a text distribution column (the type's
 * standard hash function, the column's collation): for a deterministic
 * collation, hash_any of the bytes.
 */
int32
billing_tenant_hash(const char *tenant, int len)
{
	return DatumGetInt32(hash_any((const unsigned char *) tenant, len));
}

static int
shard_index(ShardMap *m, int32 hash)
{
	int			lo = 0;
	int			hi = m->nshards - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;

		if (hash < m->min[mid])
			hi = mid - 1;
		else if (hash > m->max[mid])
			lo = mid + 1;
		else
			return mid;
	}
	return -1;
}

/* name of a shard relation or index: <name>_<shardid>, as Citus names it */
static char *
shard_name(const char *name, int64 shardid)
{
	char	   *s = psprintf("%s_" INT64_FORMAT, name, shardid);

	/* Citus shortens longer names with a hash; billing's names are short */
	if (strlen(s) >= NAMEDATALEN)
		elog(ERROR, "billing: shard name of \"%s\" is too long", name);
	return s;
}

/*
 * The lock Citus's LockShardDistributionMetadata() takes for shard i of m
 * (SetLocktagForShardDistributionMetadata): for a hash-distributed table
 * with a colocation group, one lock per (colocation group, shard index),
 * shared by the colocated shards; else one per shard id.
 */
static void
lock_shard_metadata(ShardMap *m, int i)
{
	LOCKTAG		tag;

	if (m->colocationid != 0)
		SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) i, m->colocationid,
							 CITUS_LOCKTAG_COLOCATED_SHARDS_METADATA);
	else
		SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (m->shardid[i] >> 32),
							 (uint32) m->shardid[i], CITUS_LOCKTAG_SHARD_METADATA);
	(void) LockAcquire(&tag, ShareLock, false, false);
}

static Oid resolve_shard(Oid relid, Datum tenant, bool for_write,
						 int64 *shardid, bool remote_ok);

Oid
billing_shard_relid(Oid relid, Datum tenant, bool for_write, int64 *shardid)
{
	return resolve_shard(relid, tenant, for_write, shardid, false);
}

Oid
billing_shard_relid_if_local(Oid relid, Datum tenant, int64 *shardid)
{
	return resolve_shard(relid, tenant, false, shardid, true);
}

static Oid
resolve_shard(Oid relid, Datum tenant, bool for_write, int64 *shardid,
			  bool remote_ok)
{
	ShardMap   *m = get_map(relid);
	text	   *t;
	int32		hash;
	int			i;

	*shardid = 0;
	check_method(m);
	if (!m->distributed)
		return relid;
	t = DatumGetTextPP(tenant);
	hash = billing_tenant_hash(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	i = shard_index(m, hash);
	if (i < 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_BAD_DISTRIBUTION),
				 errmsg("no shard of %s covers tenant \"%s\"",
						get_rel_name(relid), text_to_cstring(t)),
				 errdetail("Hash value %d is outside every shard range in pg_dist_shard.", hash),
				 errhint("The shards of a table distributed by hash cover every hash value; check pg_dist_shard with Citus's tools.")));
	if (for_write)
	{
		int64		locked = m->shardid[i];
		bool		was_local = m->local[i];

		lock_shard_metadata(m, i);
		/* a move may have committed while we waited: read the metadata again */
		AcceptInvalidationMessages();
		if (!m->valid)
		{
			m = get_map(relid);
			if (!m->distributed)
				return relid;
			i = shard_index(m, hash);
			if (i < 0 || m->shardid[i] != locked)
				ereport(ERROR,
						(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						 errmsg("the shard of tenant \"%s\" was split or replaced during this call",
								text_to_cstring(t)),
						 errhint("Retry the call: it is routed to the tenant's new shard.")));
			if (was_local && !m->local[i])
				ereport(ERROR,
						(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						 errmsg("the shard of tenant \"%s\" moved to another node during this call",
								text_to_cstring(t)),
						 errhint("Retry the call: it is routed to the tenant's new node.")));
		}
	}
	if (!m->local[i] && remote_ok)
		return InvalidOid;
	if (!m->local[i] && application_name != NULL &&
		strncmp(application_name, CITUS_INTERNAL_PREFIX, strlen(CITUS_INTERNAL_PREFIX)) == 0 &&
		OidIsValid(get_relname_relid(shard_name(get_rel_name(relid), m->shardid[i]),
									 get_rel_namespace(relid))))
	{
		/*
		 * A call Citus sent here (its own connections say so, as Citus'
		 * IsCitusInternalBackend reads them) for a tenant whose shard this
		 * node still has, though its placement is elsewhere now: the shard
		 * moved away after the coordinator routed the call (Citus drops the
		 * old shard later).  Retryable, like a move the call waited for.  A
		 * call Citus sent here for a tenant that never was here (a query it
		 * routed by another tenant) keeps its ZB100 below.
		 */
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("the shard of tenant \"%s\" moved to another node before this call reached it",
						text_to_cstring(t)),
				 errhint("Retry the call: it is routed to the tenant's new node.")));
	}
	if (!m->local[i])
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_WRONG_NODE),
				 errmsg("tenant \"%s\" is not stored on this node", text_to_cstring(t)),
				 errdetail("Its shard " INT64_FORMAT " of %s is in node group %d; this node is group %d.",
						   m->shardid[i], get_rel_name(relid), m->group[i], billing_local_group()),
				 errhint("Call billing's functions through the coordinator (or any node) in a statement of its own, "
						 "SELECT f(...) or SELECT * FROM f(...) with a constant or bind parameter as tenant_id: "
						 "Citus runs it on the tenant's node.  See docs/scaling.md.")));
	if (!OidIsValid(m->shard_relid[i]))
	{
		Oid			nsp = get_rel_namespace(relid);
		Oid			s = get_relname_relid(shard_name(get_rel_name(relid), m->shardid[i]), nsp);

		if (!OidIsValid(s))
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_BAD_DISTRIBUTION),
					 errmsg("shard " INT64_FORMAT " of %s is placed on this node but its table does not exist",
							m->shardid[i], get_rel_name(relid)),
					 errdetail("pg_dist_placement names this node's group %d.", billing_local_group()),
					 errhint("Repair the placement with Citus (citus_copy_shard_placement), or retry after a shard move finished.")));
		m->shard_relid[i] = s;
	}
	*shardid = m->shardid[i];
	return m->shard_relid[i];
}

Oid
billing_shard_index(const char *index_name, Oid nsp, int64 shardid)
{
	const char *name = shardid ? shard_name(index_name, shardid) : index_name;
	Oid			relid = get_relname_relid(name, nsp);

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("index \"%s\" does not exist", name),
				 errhint("Reinstall the extension with ALTER EXTENSION billing UPDATE or CREATE EXTENSION billing.")));
	return relid;
}

List *
billing_local_shards(Oid relid, bool *distributed)
{
	ShardMap   *m = get_map(relid);
	List	   *result = NIL;
	int			n;

	if (!m->reference)
		check_method(m);
	*distributed = m->distributed || m->reference;
	if (!*distributed)
		return list_make1_oid(relid);
	n = m->nshards;
	for (int i = 0; i < n; i++)
	{
		if (!m->local[i])
			continue;
		if (!OidIsValid(m->shard_relid[i]))
		{
			Oid			s = get_relname_relid(shard_name(get_rel_name(relid), m->shardid[i]),
											  get_rel_namespace(relid));

			if (!OidIsValid(s))
				continue;
			m->shard_relid[i] = s;
		}
		result = lappend_oid(result, m->shard_relid[i]);
	}
	return result;
}

/*
 * The hash ranges of relid's shards on this node, copied into the current
 * memory context (the Redis mirror filters keys with them outside any
 * transaction).  Returns their number; -1 when relid is not distributed.
 */
int
billing_local_ranges(Oid relid, int32 **min, int32 **max)
{
	ShardMap   *m = get_map(relid);
	int			n = 0;

	if (!m->distributed)
		return -1;
	*min = palloc(sizeof(int32) * Max(m->nshards, 1));
	*max = palloc(sizeof(int32) * Max(m->nshards, 1));
	for (int i = 0; i < m->nshards; i++)
		if (m->local[i])
		{
			(*min)[n] = m->min[i];
			(*max)[n] = m->max[i];
			n++;
		}
	return n;
}

/*
 * billing.local_shards(tbl regclass) -> SETOF regclass: the relations of a
 * billing table on this node (the table itself when Citus does not
 * distribute it; nothing on a node without shards of it), for the per-node
 * SQL (maintenance, untargeted claims, verify, resync pages).
 */
PG_FUNCTION_INFO_V1(billing_local_shards_sql);
Datum
billing_local_shards_sql(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		distributed;
	ListCell   *lc;
	TupleDesc	desc;
	Tuplestorestate *store;
	MemoryContext old;

	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo) ||
		!(rsinfo->allowedModes & SFRM_Materialize))
		elog(ERROR, "billing.local_shards() called in a context that cannot accept a set");
	old = MemoryContextSwitchTo(rsinfo->econtext->ecxt_per_query_memory);
	desc = CreateTemplateTupleDesc(1);
	TupleDescInitEntry(desc, (AttrNumber) 1, "shard", REGCLASSOID, -1, 0);
	store = tuplestore_begin_heap(true, false, work_mem);
	MemoryContextSwitchTo(old);
	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = store;
	rsinfo->setDesc = desc;
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	foreach(lc, billing_local_shards(PG_GETARG_OID(0), &distributed))
	{
		Datum		v = ObjectIdGetDatum(lfirst_oid(lc));
		bool		n = false;

		tuplestore_putvalues(store, desc, &v, &n);
	}
	return (Datum) 0;
}

/* billing.is_citus_table(tbl regclass) -> boolean */
PG_FUNCTION_INFO_V1(billing_is_citus_table_sql);
Datum
billing_is_citus_table_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_BOOL(billing_is_citus_table(PG_GETARG_OID(0)));
}

/* billing.is_distributed(tbl regclass) -> boolean */
PG_FUNCTION_INFO_V1(billing_is_distributed_sql);
Datum
billing_is_distributed_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_BOOL(billing_is_distributed(PG_GETARG_OID(0)));
}

/*
 * billing.shell_rows(tbl regclass) -> bigint: rows in the local heap of a
 * table, read directly (not through Citus, which would route the query to
 * the shards).  For a distributed table these are rows no billing code path
 * reads or writes any more: left behind by create_distributed_table (it
 * copies local rows into the shards and leaves them) or by a node that held
 * billing data before it joined.  billing_verify() reports them; the
 * migration procedure removes them.
 */
PG_FUNCTION_INFO_V1(billing_shell_rows);
Datum
billing_shell_rows(PG_FUNCTION_ARGS)
{
	Relation	rel = table_open(PG_GETARG_OID(0), AccessShareLock);
	TableScanDesc scan = table_beginscan(rel, GetActiveSnapshot(), 0, NULL);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	int64		n = 0;

	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		CHECK_FOR_INTERRUPTS();
		n++;
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	PG_RETURN_INT64(n);
}

/* ------------------------------------------------------------------------
 * the planner hook
 * ------------------------------------------------------------------------
 */
static planner_hook_type prev_planner_hook = NULL;

/* billing functions with a tenant_id argument: funcid -> its index */
typedef struct TenantArg
{
	Oid			funcid;			/* hash key */
	int			argno;			/* -1: not a billing function with tenant_id */
} TenantArg;

static HTAB *tenant_args = NULL;

static void
proc_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	if (tenant_args)
	{
		hash_destroy(tenant_args);
		tenant_args = NULL;
	}
}

static int
tenant_argno(Oid funcid)
{
	TenantArg  *e;
	bool		found;

	register_callbacks();
	if (tenant_args == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(TenantArg);
		ctl.hcxt = CacheMemoryContext;
		tenant_args = hash_create("billing tenant arguments", 64, &ctl,
								  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	e = hash_search(tenant_args, &funcid, HASH_ENTER, &found);
	if (!found)
	{
		Oid			ext = get_extension_oid("billing", true);

		e->argno = -1;
		if (OidIsValid(ext) &&
			getExtensionOfObject(ProcedureRelationId, funcid) == ext)
		{
			HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(funcid));

			if (HeapTupleIsValid(tup))
			{
				Oid		   *types;
				char	  **names;
				char	   *modes;
				int			nargs = get_func_arg_info(tup, &types, &names, &modes);

				for (int i = 0; names && i < nargs; i++)
					if (names[i] && strcmp(names[i], "tenant_id") == 0)
						e->argno = i;
				ReleaseSysCache(tup);
			}
		}
	}
	return e->argno;
}

/* the one function call Citus would consider delegating, else NULL */
static FuncExpr *
delegation_candidate(Query *q)
{
	FromExpr   *jt = q->jointree;

	if (q->commandType != CMD_SELECT || jt == NULL || jt->quals != NULL ||
		q->cteList != NIL || q->setOperations != NULL)
		return NULL;
	if (list_length(jt->fromlist) > 1)
		return NULL;
	if (list_length(jt->fromlist) == 1)
	{
		RangeTblRef *ref = linitial(jt->fromlist);
		RangeTblEntry *rte;
		RangeTblFunction *rtf;

		if (!IsA(ref, RangeTblRef))
			return NULL;
		rte = rt_fetch(ref->rtindex, q->rtable);
		if (rte->rtekind != RTE_FUNCTION || list_length(rte->functions) != 1)
			return NULL;
		rtf = linitial(rte->functions);
		return IsA(rtf->funcexpr, FuncExpr) ? (FuncExpr *) rtf->funcexpr : NULL;
	}
	if (list_length(q->targetList) == 1 &&
		IsA(((TargetEntry *) linitial(q->targetList))->expr, FuncExpr))
		return (FuncExpr *) ((TargetEntry *) linitial(q->targetList))->expr;
	return NULL;
}

/* is the tenant argument of this billing call NULL once folded? */
static bool
null_tenant(FuncExpr *fe, int argno, ParamListInfo boundParams)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fe->funcid));
	List	   *args;
	Node	   *arg;
	PlannerGlobal glob;
	PlannerInfo root;

	if (!HeapTupleIsValid(tup))
		return false;
	/* named arguments and defaults, as the planner will expand them */
	args = expand_function_arguments(copyObject(fe->args), false,
									 fe->funcresulttype, tup);
	ReleaseSysCache(tup);
	if (argno >= list_length(args))
		return false;
	arg = (Node *) list_nth(args, argno);
	memset(&glob, 0, sizeof(glob));
	memset(&root, 0, sizeof(root));
	glob.type = T_PlannerGlobal;
	glob.boundParams = boundParams;
	root.type = T_PlannerInfo;
	root.glob = &glob;
	arg = eval_const_expressions(&root, arg);
	return IsA(arg, Const) && ((Const *) arg)->constisnull;
}

static bool
has_relation_walker(Node *node, void *context)
{
	if (node == NULL)
		return false;
	if (IsA(node, RangeTblEntry))
		return ((RangeTblEntry *) node)->rtekind == RTE_RELATION;
	if (IsA(node, Query))
		return query_tree_walker((Query *) node, has_relation_walker, context,
								 QTW_EXAMINE_RTES_BEFORE);
	return expression_tree_walker(node, has_relation_walker, context);
}

/*
 * SELECT billing_x(t, ...) FROM (VALUES ('t1')) v(t), or any FROM made of
 * subqueries without tables: the planner pulls the subquery up, Citus then
 * sees a constant tenant, tries to delegate and crashes deparsing the
 * planned query (AcquireRewriteLocks; Citus 13.2).  Not a form Citus
 * delegates otherwise: plan it as a local call.
 */
static bool
pulled_up_call(Query *q)
{
	TargetEntry *te;

	if (q->commandType != CMD_SELECT || list_length(q->targetList) != 1 ||
		q->jointree == NULL || q->jointree->fromlist == NIL)
		return false;
	te = linitial(q->targetList);
	if (!IsA(te->expr, FuncExpr) ||
		tenant_argno(((FuncExpr *) te->expr)->funcid) < 0)
		return false;
	return !query_tree_walker(q, has_relation_walker, NULL, QTW_EXAMINE_RTES_BEFORE);
}

static PlannedStmt *
billing_planner(Query *parse, const char *query_string, int cursorOptions,
				ParamListInfo boundParams)
{
	FuncExpr   *fe;
	int			argno;

	/* only where Citus is there (its planner is the previous hook) */
	if (prev_planner_hook != NULL && IsTransactionState() &&
		billing_local_group() >= 0 &&
		(((fe = delegation_candidate(parse)) != NULL &&
		  (argno = tenant_argno(fe->funcid)) >= 0 &&
		  null_tenant(fe, argno, boundParams)) ||
		 (fe == NULL && pulled_up_call(parse))))
		return standard_planner(parse, query_string, cursorOptions, boundParams);
	if (prev_planner_hook)
		return prev_planner_hook(parse, query_string, cursorOptions, boundParams);
	return standard_planner(parse, query_string, cursorOptions, boundParams);
}

void
billing_citus_init(void)
{
	prev_planner_hook = planner_hook;
	planner_hook = billing_planner;
}
