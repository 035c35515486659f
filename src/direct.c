/*-------------------------------------------------------------------------
 *
 * direct.c
 *	  Direct heap and index access for the hot path of a charge (see
 *	  direct.h): lock the account row, probe a trace id, insert the entry
 *	  and update the account without planning or starting a query.
 *
 * The rules are those of the SQL statements this replaces:
 *	- locking follows ExecLockRows(): a fresh snapshot in READ COMMITTED and
 *	  the newest version of a concurrently updated row, a serialization
 *	  failure under a transaction snapshot;
 *	- the trace id probe uses a dirty snapshot and waits for an insert in
 *	  progress, as a unique index check (and ON CONFLICT) does;
 *	- writes go through ExecSimpleRelationInsert/Update: NOT NULL
 *	  constraints, every index (HOT when possible), row triggers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "catalog/index.h"
#include "access/relscan.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "billing.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "citus.h"
#include "commands/sequence.h"
#include "compat.h"
#include "direct.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "commands/trigger.h"
#include "rewrite/prs2lock.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "common/hashfn.h"
#include "access/heapam.h"
#include "access/htup_details.h"

#define MAX_TABLES 8

/* the tables whose column numbers this backend has resolved */
static DirectTable *known[MAX_TABLES];
static int	nknown = 0;
static bool callback_registered = false;

/*
 * The OIDs of schema billing and of the relations opened here by name,
 * looked up once and kept until an invalidation of pg_namespace or pg_class
 * (a schema or relation created, renamed or dropped: DROP/CREATE EXTENSION,
 * ALTER EXTENSION UPDATE) or a relcache invalidation of one of them says
 * they may have changed.  A charge opens four or five relations: looking
 * each up by name cost a catalog cache probe every time.
 */
#define MAX_RELIDS 16
static Oid	cached_nsp = InvalidOid;
static struct
{
	const char *name;			/* a string constant of the caller */
	Oid			relid;
}			cached_relids[MAX_RELIDS];
static int	ncached_relids = 0;
static bool oid_callbacks_registered = false;

static void
oid_cache_reset(Datum arg, int cacheid, uint32 hashvalue)
{
	cached_nsp = InvalidOid;
	ncached_relids = 0;
}

/*
 * The CHECK constraints of the relations written here, planned once.  The
 * executor prepares a result relation's CHECK constraints when it first
 * checks a row: it reads each expression from its catalog string
 * (stringToNode) and plans it (expression_planner).  A direct write makes a
 * new ResultRelInfo for every call, so that was done again for every hold
 * and journal row (about 7 % of a hold -> capture pair's CPU: the reason
 * billing.accounts and billing.entries have no CHECK constraints).  The
 * planned expressions are kept per relation until a relcache invalidation
 * of it; each write initializes copies of them in its own EState, as
 * ExecRelCheck() would (see prepare_checks).
 */
typedef struct CheckCache
{
	Oid			relid;
	int			ncheck;
	MemoryContext cxt;			/* a child of CacheMemoryContext */
	Expr	  **exprs;			/* planned; NULL where the executor skips one */
} CheckCache;

#define MAX_CHECK_CACHE 16
static CheckCache check_cache[MAX_CHECK_CACHE];
static int	ncheck_cache = 0;

static void
check_cache_forget(int i)
{
	/* nothing points into it: every write works on copies */
	MemoryContextDelete(check_cache[i].cxt);
	check_cache[i] = check_cache[--ncheck_cache];
}

/*
 * A function changed: planning inlines SQL functions and folds immutable
 * ones, so a planned constraint may hold its old body.  Plan them all again.
 */
static void
check_cache_proc_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	while (ncheck_cache > 0)
		check_cache_forget(ncheck_cache - 1);
}

/* a relcache invalidation: resolve the column numbers again next time */
static void
direct_relcache_callback(Datum arg, Oid relid)
{
	for (int i = ncheck_cache - 1; i >= 0; i--)
		if (relid == InvalidOid || check_cache[i].relid == relid)
			check_cache_forget(i);
	for (int i = 0; i < nknown; i++)
		if (relid == InvalidOid || known[i]->relid == relid)
			known[i]->relid = InvalidOid;
	for (int i = 0; i < ncached_relids; i++)
		if (relid == InvalidOid || cached_relids[i].relid == relid)
		{
			ncached_relids = 0;
			break;
		}
}

static void
register_callbacks(void)
{
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(direct_relcache_callback, (Datum) 0);
		callback_registered = true;
	}
	if (!oid_callbacks_registered)
	{
		CacheRegisterSyscacheCallback(NAMESPACEOID, oid_cache_reset, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACENAME, oid_cache_reset, (Datum) 0);
		CacheRegisterSyscacheCallback(RELNAMENSP, oid_cache_reset, (Datum) 0);
		CacheRegisterSyscacheCallback(PROCOID, check_cache_proc_callback, (Datum) 0);
		oid_callbacks_registered = true;
	}
}

static Oid
billing_namespace(void)
{
	if (!OidIsValid(cached_nsp))
	{
		register_callbacks();
		cached_nsp = get_namespace_oid("billing", false);
		ncached_relids = 0;
	}
	return cached_nsp;
}

static Oid
billing_relid(const char *name, Oid nsp)
{
	Oid			relid;

	/* callers pass string constants: compare pointers first */
	for (int i = 0; i < ncached_relids; i++)
		if (cached_relids[i].name == name || strcmp(cached_relids[i].name, name) == 0)
			return cached_relids[i].relid;
	relid = get_relname_relid(name, nsp);
	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"billing.%s\" does not exist", name),
				 errhint("Reinstall the extension with ALTER EXTENSION billing UPDATE or CREATE EXTENSION billing.")));
	if (nsp == cached_nsp && ncached_relids < MAX_RELIDS)
	{
		cached_relids[ncached_relids].name = name;
		cached_relids[ncached_relids].relid = relid;
		ncached_relids++;
	}
	return relid;
}

/*
 * The newest version of each row this transaction locked and updated
 * (direct_write), by table and key.  Locking such a row again needs no
 * index scan: an index scan visits every version this transaction wrote
 * (none of them can be pruned before it ends), so a transaction that
 * charged one account n times paid O(n) per lock and O(n^2) in all (10,000
 * credits in one statement: 1.6 s, 50,000: 34 s).  The version found here
 * is ours and the newest one, and an update keeps the row locked until the
 * transaction ends: nobody else can have changed it.  Checked before use
 * (created by a transaction or subtransaction of ours that did not abort,
 * not updated since), else the index is used as before.  Forgotten at the
 * end of the transaction (TopTransactionContext).
 */
typedef struct RowKey
{
	Oid			relid;
	int			len;
	const char *key;
} RowKey;

typedef struct RowVersion
{
	RowKey		k;				/* hash key: k.key is copied into the table's context */
	Oid			file;			/* the relation's file then: a rewrite in this
								 * transaction (CLUSTER, ALTER TABLE) moves
								 * its rows, and tid means nothing in the
								 * new file (may lie past its end) */
	ItemPointerData tid;
} RowVersion;

static HTAB *row_versions = NULL;
static bool xact_callback_registered = false;

static uint32
row_key_hash(const void *key, Size keysize)
{
	const RowKey *k = key;

	return hash_bytes((const unsigned char *) k->key, k->len) ^ k->relid;
}

static int
row_key_match(const void *key1, const void *key2, Size keysize)
{
	const RowKey *a = key1;
	const RowKey *b = key2;

	return !(a->relid == b->relid && a->len == b->len &&
			 memcmp(a->key, b->key, a->len) == 0);
}

static void
row_versions_xact_callback(XactEvent event, void *arg)
{
	/* the memory goes with TopTransactionContext */
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		row_versions = NULL;
}

static RowVersion *
row_version_find(Oid relid, Datum key, bool create)
{
	text	   *t = (text *) pg_detoast_datum_packed((struct varlena *) DatumGetPointer(key));
	RowKey		k;
	RowVersion *rv;
	bool		found;

	if (row_versions == NULL)
	{
		HASHCTL		info;

		if (!create)
			return NULL;
		if (!xact_callback_registered)
		{
			RegisterXactCallback(row_versions_xact_callback, NULL);
			xact_callback_registered = true;
		}
		info.keysize = sizeof(RowKey);
		info.entrysize = sizeof(RowVersion);
		info.hash = row_key_hash;
		info.match = row_key_match;
		info.hcxt = TopTransactionContext;
		row_versions = hash_create("billing row versions", 64, &info,
								   HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	}
	k.relid = relid;
	k.len = VARSIZE_ANY_EXHDR(t);
	k.key = VARDATA_ANY(t);
	rv = hash_search(row_versions, &k, create ? HASH_ENTER : HASH_FIND, &found);
	if (rv != NULL && create && !found)
	{
		char	   *copy = MemoryContextAlloc(TopTransactionContext, Max(k.len, 1));

		memcpy(copy, k.key, k.len);
		rv->k.key = copy;
	}
	return rv;
}

/*
 * The version at *tid, if it is the newest version of the row whose key is
 * `key`, written by this transaction (not by an aborted subtransaction):
 * then it is in `slot` and true is returned.
 */
static bool
fetch_own_version(DirectTable *t, Relation rel, ItemPointer tid, Datum key,
				  TupleTableSlot *slot)
{
	HeapTuple	tup;
	bool		isnull;
	Datum		k;

	if (!table_tuple_fetch_row_version(rel, tid, SnapshotAny, slot))
		return false;
	tup = ExecFetchSlotHeapTuple(slot, false, NULL);
	if (tup == NULL || tup->t_data == NULL)
		return false;
	if (!TransactionIdIsCurrentTransactionId(HeapTupleHeaderGetRawXmin(tup->t_data)))
		return false;
	/* not updated or deleted since (a lock of ours on it does not matter) */
	if (!(tup->t_data->t_infomask & HEAP_XMAX_INVALID) &&
		!HEAP_XMAX_IS_LOCKED_ONLY(tup->t_data->t_infomask))
		return false;
	k = slot_getattr(slot, t->attnum[0], &isnull);
	return !isnull && DatumGetBool(DirectFunctionCall2Coll(texteq, C_COLLATION_OID,
														   k, key));
}

/*
 * A charge writes rows through the executor's simple-relation routines:
 * row triggers fire, but statement triggers, transition tables and rules
 * would silently not.  Refuse them rather than skip them.
 */
static void
check_write_hooks(DirectTable *t, Relation rel, CmdType cmd)
{
	TriggerDesc *td = rel->trigdesc;
	const char *what = NULL;

	if (cmd == CMD_INSERT && td &&
		(td->trig_insert_before_statement || td->trig_insert_after_statement ||
		 td->trig_insert_new_table))
		what = "a statement-level trigger or transition table on INSERT";
	else if (cmd == CMD_UPDATE && td &&
			 (td->trig_update_before_statement || td->trig_update_after_statement ||
			  td->trig_update_old_table || td->trig_update_new_table))
		what = "a statement-level trigger or transition table on UPDATE";
	else if (rel->rd_rules != NULL)
		what = "a rule";
	if (what)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("table billing.%s has %s, which billing's charges cannot honour",
						t->name, what),
				 errdetail("Charges write rows directly: row triggers fire, statement triggers, transition tables and rules would not."),
				 errhint("Use a FOR EACH ROW trigger instead, or drop it.")));
}

/* map the table's column names to attribute numbers, checking types */
static void
resolve_columns(DirectTable *t, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			found = 0;

	Assert(t->ncols <= DIRECT_MAX_COLS);
	for (int c = 0; c < t->ncols; c++)
		t->attnum[c] = InvalidAttrNumber;
	for (int a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		int			c;

		if (att->attisdropped)
			continue;
		for (c = 0; c < t->ncols; c++)
			if (strcmp(NameStr(att->attname), t->cols[c]) == 0)
				break;
		if (c == t->ncols)
		{
			/* an insert would leave it NULL instead of its default */
			if (t->complete)
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("table billing.%s has a column this billing library does not know: \"%s\"",
								t->name, NameStr(att->attname)),
						 errdetail("A new row would leave that column NULL instead of its default."),
						 errhint("Do not alter the extension's tables; if an upgrade added the column, install the matching billing library and restart.")));
			continue;
		}
		if (att->atttypid != t->types[c])
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("column \"%s\" of table billing.%s has an unexpected type",
							t->cols[c], t->name),
					 errdetail("The type is %s; this billing library expects %s.",
							   format_type_be(att->atttypid),
							   format_type_be(t->types[c])),
					 errhint("Do not alter the extension's tables; install the billing library that matches the extension version.")));
		t->attnum[c] = att->attnum;
		found++;
	}
	if (found != t->ncols)
		for (int c = 0; c < t->ncols - t->noptional; c++)
			if (t->attnum[c] == InvalidAttrNumber)
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("table billing.%s has no column \"%s\"",
								t->name, t->cols[c]),
						 errhint("Do not alter the extension's tables; install the billing library that matches the extension version.")));

	register_callbacks();
	if (t->relid == InvalidOid)
	{
		int			i;

		for (i = 0; i < nknown; i++)
			if (known[i] == t)
				break;
		if (i == nknown)
		{
			if (nknown == MAX_TABLES)
				elog(ERROR, "billing: too many direct tables");
			known[nknown++] = t;
		}
	}
	t->relid = RelationGetRelid(rel);
}

/*
 * Do the column numbers resolved for another relation fit rel?  The shards
 * of a distributed table all have the layout of the CREATE TABLE Citus
 * deparsed (no dropped columns), which may differ from the logical table's:
 * a charge alternating between shards checks the names at the known
 * positions instead of searching every column again.
 */
static bool
same_layout(DirectTable *t, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);

	if (t->complete)
	{
		int			live = 0;

		for (int a = 0; a < desc->natts; a++)
			if (!TupleDescAttr(desc, a)->attisdropped)
				live++;
		if (live != t->ncols)
			return false;
	}
	for (int c = 0; c < t->ncols; c++)
	{
		Form_pg_attribute att;

		if (t->attnum[c] <= 0 || t->attnum[c] > desc->natts)
			return false;
		att = TupleDescAttr(desc, t->attnum[c] - 1);
		if (att->attisdropped || att->atttypid != t->types[c] ||
			strcmp(NameStr(att->attname), t->cols[c]) != 0)
			return false;
	}
	return true;
}

/* t's column numbers for rel (opening it processed pending invalidations) */
static void
ensure_columns(DirectTable *t, Relation rel)
{
	if (t->relid == RelationGetRelid(rel))
		return;
	if (rel->rd_rel->relkind != RELKIND_RELATION)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("billing.%s is not a plain table", t->name),
				 errdetail("Its relation kind is '%c'; billing's direct path reads and writes the heap of a plain table.",
						   rel->rd_rel->relkind),
				 errhint("Put the table back as the extension made it (a view or a partitioned table in its place is not supported).")));
	if (t->relid == InvalidOid || !same_layout(t, rel))
	{
		t->relid = InvalidOid;
		resolve_columns(t, rel);
	}
	else
		t->relid = RelationGetRelid(rel);
}

/*
 * Open the relation of a table of schema billing that holds `key` (a
 * tenant id) on this node: the table itself, or on Citus the tenant's shard
 * (ZB100 when it is on another node; see citus.h).  Its columns resolved;
 * *shardid 0 for the table itself.
 */
static Relation
direct_open(DirectTable *t, Oid nsp, Datum key, bool for_write, LOCKMODE mode,
			int64 *shardid)
{
	Oid			logical = billing_relid(t->name, nsp);
	Relation	rel;
	bool		again = false;

	/*
	 * The relation is chosen before its lock is taken, and the lock may
	 * wait: for billing.citus_distribute() (the table becomes a shell), or
	 * for the end of a shard move (the shard is dropped).  Opening processes
	 * the invalidations that came meanwhile: choose again if any did.
	 */
	for (;;)
	{
		uint64		generation = billing_shard_map_generation;
		Oid			relid;

		PG_TRY();
		{
			relid = billing_shard_relid(logical, key, for_write, shardid);
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			if (!again || geterrcode() != ERRCODE_BILLING_WRONG_NODE)
				PG_RE_THROW();
			/* it was here when the call started: a retry is routed anew */
			edata = CopyErrorData();
			FlushErrorState();
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("billing's tables were distributed or moved during this call"),
					 errdetail("%s", edata->message),
					 errhint("Retry the call: it is routed to the tenant's node.")));
		}
		PG_END_TRY();
		rel = try_table_open(relid, mode);
		if (rel != NULL && generation == billing_shard_map_generation)
			break;
		if (rel != NULL)
			table_close(rel, mode);
		if (again && rel == NULL)
			elog(ERROR, "billing: relation %u of billing.%s disappeared", relid, t->name);
		again = true;
	}
	ensure_columns(t, rel);
	return rel;
}

/*
 * Open the index the direct path reads rel by (found by its name): it must
 * be a valid plain index of rel itself whose first column is the key.
 * Names are the DBA's to change: a table renamed and one made in its place
 * "LIKE ... INCLUDING ALL" leaves the old index with the old name, whose
 * row positions are the old table's; read against the new one they would
 * lock or update another tenant's row.
 */
static Relation
direct_index_open(DirectTable *t, Relation rel, Oid indexid)
{
	Relation	index = index_open(indexid, AccessShareLock);

	if (index->rd_rel->relkind != RELKIND_INDEX ||
		index->rd_index->indrelid != RelationGetRelid(rel) ||
		!index->rd_index->indisvalid || !index->rd_index->indisready ||
		index->rd_index->indnkeyatts < 1 ||
		index->rd_index->indkey.values[0] != t->attnum[0])
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("index \"%s\" is not a valid index of billing.%s on its column \"%s\"",
						RelationGetRelationName(index), t->name, t->cols[0]),
				 index->rd_index->indrelid != RelationGetRelid(rel) ?
				 errdetail("The index of that name is on \"%s\", not on billing.%s.",
						   get_rel_name(index->rd_index->indrelid) ?
						   get_rel_name(index->rd_index->indrelid) : "a relation dropped since",
						   t->name) :
				 errdetail("It is not valid, or its first column is not \"%s\".", t->cols[0]),
				 errhint("Put the table and its indexes back as the extension made them: billing's direct path finds them by name.")));
	return index;
}

/* the same for a relation chosen by the caller (a shard of a scan) */
static Relation
direct_open_relid(DirectTable *t, Oid relid, LOCKMODE mode)
{
	Relation	rel = table_open(relid, mode);

	ensure_columns(t, rel);
	return rel;
}

/* equality scan keys on the first nkeys columns (text or bigint) of a btree index */
static void
key_init(ScanKey keys, Relation index, int nkeys, const Datum *k)
{
	for (int i = 0; i < nkeys; i++)
	{
		Oid			typid = TupleDescAttr(RelationGetDescr(index), i)->atttypid;
		RegProcedure eq;

		if (typid == TEXTOID)
			eq = F_TEXTEQ;
		else if (typid == INT8OID)
			eq = F_INT8EQ;
		else
			elog(ERROR, "billing: index \"%s\" is not on text or bigint columns",
				 RelationGetRelationName(index));
		ScanKeyEntryInitialize(&keys[i], 0, (AttrNumber) (i + 1), BTEqualStrategyNumber,
							   InvalidOid, index->rd_indcollation[i], eq, k[i]);
	}
}

/* the table's columns of the row in slot, copied into the current context */
static void
copy_columns(DirectTable *t, TupleTableSlot *slot, Datum *values, bool *nulls)
{
	for (int c = 0; c < t->ncols; c++)
	{
		Datum		d;
		Form_pg_attribute att;

		if (t->attnum[c] == InvalidAttrNumber)
		{
			/* an optional column the table does not have */
			values[c] = (Datum) 0;
			nulls[c] = true;
			continue;
		}
		d = slot_getattr(slot, t->attnum[c], &nulls[c]);
		att = TupleDescAttr(slot->tts_tupleDescriptor, t->attnum[c] - 1);
		values[c] = nulls[c] ? (Datum) 0 :
			datumCopy(d, att->attbyval, att->attlen);
	}
}

/* the first row whose first key column equals key, in snap; into slot */
static bool
lookup(Relation rel, Relation index, Snapshot snap, Datum key,
	   TupleTableSlot *slot)
{
	ScanKeyData skey;
	IndexScanDesc scan;
	bool		found;

	key_init(&skey, index, 1, &key);
	scan = billing_index_beginscan(rel, index, snap, 1, 0);
	index_rescan(scan, &skey, 1, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	index_endscan(scan);
	return found;
}

/*
 * A reader keeps each relation it reads (the table, or each shard it met)
 * open with its key index and one index scan, for the whole batch.
 */
typedef struct ReaderRel
{
	Oid			relid;
	Relation	rel;
	Relation	index;
	TupleTableSlot *slot;
	IndexScanDesc scan;
} ReaderRel;

struct DirectReader
{
	DirectTable *t;
	Oid			nsp;
	Oid			logical;
	bool		remote_ok;		/* another node's key: DIRECT_NOT_HERE, not ZB100 */
	int			nrels;
	int			maxrels;
	ReaderRel **rels;			/* one per shard met (Citus: as many as the node holds) */
};

DirectReader *
direct_reader_open(DirectTable *t, bool remote_ok)
{
	DirectReader *r = palloc0(sizeof(DirectReader));

	r->t = t;
	r->nsp = billing_namespace();
	r->logical = billing_relid(t->name, r->nsp);
	r->remote_ok = remote_ok;
	r->maxrels = 8;
	r->rels = palloc(sizeof(ReaderRel *) * r->maxrels);
	return r;
}

static ReaderRel *
reader_rel(DirectReader *r, Oid relid, int64 shardid)
{
	ReaderRel  *rr;

	for (int i = 0; i < r->nrels; i++)
		if (r->rels[i]->relid == relid)
			return r->rels[i];
	if (r->nrels == r->maxrels)
	{
		r->maxrels *= 2;
		r->rels = repalloc(r->rels, sizeof(ReaderRel *) * r->maxrels);
	}
	rr = palloc(sizeof(ReaderRel));
	r->rels[r->nrels++] = rr;
	rr->relid = relid;
	rr->rel = direct_open_relid(r->t, relid, AccessShareLock);
	rr->index = direct_index_open(r->t, rr->rel, billing_shard_index(r->t->key_index, r->nsp, shardid));
	rr->slot = table_slot_create(rr->rel, NULL);
	rr->scan = billing_index_beginscan(rr->rel, rr->index, GetActiveSnapshot(), 1, 0);
	return rr;
}

int
direct_reader_fetch(DirectReader *r, Datum key, Datum *values, bool *nulls)
{
	ScanKeyData skey;
	int64		shardid;
	Oid			relid = r->remote_ok ?
		billing_shard_relid_if_local(r->logical, key, &shardid) :
		billing_shard_relid(r->logical, key, false, &shardid);
	ReaderRel  *rr;

	if (!OidIsValid(relid))
		return DIRECT_NOT_HERE;
	rr = reader_rel(r, relid, shardid);
	/* another relation than the last one read: its column numbers */
	ensure_columns(r->t, rr->rel);
	key_init(&skey, rr->index, 1, &key);
	index_rescan(rr->scan, &skey, 1, NULL, 0);
	if (!index_getnext_slot(rr->scan, ForwardScanDirection, rr->slot))
		return DIRECT_NOT_FOUND;
	copy_columns(r->t, rr->slot, values, nulls);
	return DIRECT_FOUND;
}

void
direct_reader_close(DirectReader *r)
{
	for (int i = 0; i < r->nrels; i++)
	{
		ReaderRel  *rr = r->rels[i];

		index_endscan(rr->scan);
		ExecDropSingleTupleTableSlot(rr->slot);
		index_close(rr->index, NoLock);
		table_close(rr->rel, NoLock);
		pfree(rr);
	}
	pfree(r->rels);
	pfree(r);
}

bool
direct_lock_row(DirectTable *t, Datum key, Datum *values, bool *nulls,
				ItemPointer tid)
{
	return direct_lock_row_nowait(t, key, values, nulls, tid, false, NULL);
}

bool
direct_lock_row_nowait(DirectTable *t, Datum key, Datum *values, bool *nulls,
					   ItemPointer tid, bool nowait, bool *busy)
{
	Oid			nsp = billing_namespace();
	int64		shardid;
	Relation	rel = direct_open(t, nsp, key, true, RowExclusiveLock, &shardid);
	Relation	index = direct_index_open(t, rel, billing_shard_index(t->key_index, nsp, shardid));
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	Snapshot	snap;
	bool		found;
	TM_Result	res;
	TM_FailureData tmfd;

	if (busy)
		*busy = false;

	/*
	 * Citus: the two tables of a charge are distributed together, or a
	 * charge would write one shard and one local table
	 */
	if (billing_is_distributed(billing_relid(billing_accounts_table.name, nsp)) !=
		billing_is_distributed(billing_relid(billing_entries_table.name, nsp)))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_BAD_DISTRIBUTION),
				 errmsg("billing's tables are partly distributed by Citus"),
				 errdetail("billing.accounts and billing.entries must both be distributed (colocated), or neither."),
				 errhint("Distribute them with billing.citus_distribute().")));

	/* as SELECT ... FOR UPDATE: not in a read-only transaction or a standby */
	PreventCommandIfReadOnly("a billing charge");
	PreventCommandIfParallelMode("a billing charge");

	/*
	 * What SPI does before a read-write statement: make our own earlier
	 * writes visible and take a fresh snapshot (READ COMMITTED), or the
	 * transaction's with the current command id.
	 */
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	UpdateActiveSnapshotCommandId();
	snap = GetActiveSnapshot();

	/* a row this transaction updated already: its newest version, locked */
	{
		RowVersion *rv = row_version_find(RelationGetRelid(rel), key, false);

		if (rv != NULL && rv->file == billing_rel_file_number(rel) &&
			fetch_own_version(t, rel, &rv->tid, key, slot))
		{
			index_close(index, NoLock);
			copy_columns(t, slot, values, nulls);
			ItemPointerCopy(&rv->tid, tid);
			PopActiveSnapshot();
			ExecDropSingleTupleTableSlot(slot);
			table_close(rel, NoLock);
			return true;
		}
	}

	found = lookup(rel, index, snap, key, slot);
	index_close(index, NoLock);

	if (found)
	{
		res = table_tuple_lock(rel, &slot->tts_tid, snap, slot,
							   GetCurrentCommandId(true), LockTupleExclusive,
							   nowait ? LockWaitSkip : LockWaitBlock,
							   IsolationUsesXactSnapshot() ? 0 :
							   TUPLE_LOCK_FLAG_FIND_LAST_VERSION,
							   &tmfd);
		switch (res)
		{
			case TM_Ok:
				break;
			case TM_WouldBlock:
				/* nowait: another transaction holds the row */
				*busy = true;
				found = false;
				break;
			case TM_Updated:
			case TM_Deleted:
				if (IsolationUsesXactSnapshot())
					ereport(ERROR,
							(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
							 errmsg("could not serialize access due to concurrent update")));
				/* READ COMMITTED follows updates: only a delete gets here */
				found = false;
				break;
			case TM_SelfModified:
				/* we made our own writes visible above: cannot happen */
				elog(ERROR, "billing: row of billing.%s was modified later in this transaction",
					 t->name);
				break;
			default:
				elog(ERROR, "billing: unexpected result %d locking a row of billing.%s",
					 (int) res, t->name);
		}
	}

	/* a followed update might have changed the key: check it again */
	if (found && res == TM_Ok && tmfd.traversed)
	{
		bool		isnull;
		Datum		k = slot_getattr(slot, t->attnum[0], &isnull);

		found = !isnull && DatumGetBool(DirectFunctionCall2Coll(texteq,
																C_COLLATION_OID,
																k, key));
	}

	if (found)
	{
		copy_columns(t, slot, values, nulls);
		ItemPointerCopy(&slot->tts_tid, tid);
	}
	PopActiveSnapshot();
	ExecDropSingleTupleTableSlot(slot);
	table_close(rel, NoLock);	/* the lock stays until the end of the transaction */
	return found;
}

bool
direct_key_exists(DirectTable *t, Datum k1, Datum k2)
{
	Oid			nsp = billing_namespace();
	int64		shardid;
	Relation	rel = direct_open(t, nsp, k1, true, RowExclusiveLock, &shardid);
	Relation	index = direct_index_open(t, rel, billing_shard_index(t->key_index, nsp, shardid));
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	Datum		k[2] = {k1, k2};
	ScanKeyData skey[2];
	SnapshotData dirty;
	bool		found;

	key_init(skey, index, 2, k);
	InitDirtySnapshot(dirty);
	for (;;)
	{
		IndexScanDesc scan = billing_index_beginscan(rel, index, &dirty, 2, 0);
		TransactionId xwait = InvalidTransactionId;

		index_rescan(scan, skey, 2, NULL, 0);
		found = index_getnext_slot(scan, ForwardScanDirection, slot);
		if (found)
			xwait = TransactionIdIsValid(dirty.xmin) ? dirty.xmin : dirty.xmax;
		index_endscan(scan);
		if (!TransactionIdIsValid(xwait))
			break;
		/* another transaction is inserting it: its outcome decides */
		XactLockTableWait(xwait, rel, &slot->tts_tid, XLTW_InsertIndex);
	}
	ExecDropSingleTupleTableSlot(slot);
	index_close(index, NoLock);
	table_close(rel, NoLock);
	return found;
}

bool
direct_fetch(DirectTable *t, const char *index_name, Datum k1, Datum k2,
			 Datum *values, bool *nulls, ItemPointer tid)
{
	Oid			nsp = billing_namespace();
	int64		shardid;
	Relation	rel = direct_open(t, nsp, k1, false, AccessShareLock, &shardid);
	Relation	index = direct_index_open(t, rel, billing_shard_index(index_name, nsp, shardid));
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	Datum		k[2] = {k1, k2};
	ScanKeyData skey[2];
	IndexScanDesc scan;
	bool		found;

	/* what SPI does before a statement (see direct_lock_row) */
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	UpdateActiveSnapshotCommandId();

	key_init(skey, index, 2, k);
	scan = billing_index_beginscan(rel, index, GetActiveSnapshot(), 2, 0);
	index_rescan(scan, skey, 2, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	if (found)
	{
		copy_columns(t, slot, values, nulls);
		if (tid)
			ItemPointerCopy(&slot->tts_tid, tid);
	}
	index_endscan(scan);
	PopActiveSnapshot();
	ExecDropSingleTupleTableSlot(slot);
	index_close(index, NoLock);
	table_close(rel, NoLock);
	return found;
}

/* a BEFORE ROW trigger returned NULL: the call would be half-written */
static void
skipped_by_trigger(Relation rel)
{
	ereport(ERROR,
			(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
			 errmsg("a trigger on billing.%s skipped a row of this call",
					RelationGetRelationName(rel)),
			 errdetail("A BEFORE ROW trigger returned NULL; what one call writes (a ledger entry and the account balance, a hold and its journal) is written together or not at all."),
			 errhint("Raise an error in the trigger to refuse the call instead of returning NULL.")));
}

/*
 * Give rri its CHECK constraints ready to run, from the planned ones kept
 * for its relation (planned now if there are none), so that
 * ExecConstraints() does not read and plan them again.  What ExecRelCheck()
 * would build itself, built the same way (compat.h), in the EState's query
 * memory.
 */
static void
prepare_checks(ResultRelInfo *rri, EState *estate)
{
	Relation	rel = rri->ri_RelationDesc;
	TupleConstr *constr = rel->rd_att->constr;
	CheckCache *cc = NULL;
	ExprState **states;
	Expr	  **copies;
	int			ncheck;
	MemoryContext old;

	/* none, or a catalog out of step: ExecRelCheck() raises its own error */
	if (constr == NULL || constr->num_check == 0 ||
		constr->num_check != rel->rd_rel->relchecks)
		return;
	for (int i = 0; i < ncheck_cache; i++)
		if (check_cache[i].relid == RelationGetRelid(rel))
		{
			cc = &check_cache[i];
			break;
		}
	if (cc != NULL && cc->ncheck != constr->num_check)
	{
		/* changed without an invalidation we saw: cannot be, but plan again */
		check_cache_forget(cc - check_cache);
		cc = NULL;
	}
	if (cc == NULL)
	{
		MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext,
												  "billing CHECK constraints",
												  ALLOCSET_SMALL_SIZES);
		Expr	  **exprs;

		ncheck = constr->num_check;

		/*
		 * Built aside, kept only when complete: planning may process
		 * invalidations (and an error leaves nothing half-made behind)
		 */
		old = MemoryContextSwitchTo(cxt);
		exprs = palloc0(sizeof(Expr *) * ncheck);
		for (int i = 0; i < ncheck; i++)
			exprs[i] = billing_check_expr(rel, i);
		for (int i = 0; i < ncheck; i++)
			if (exprs[i] != NULL)
				exprs[i] = expression_planner(exprs[i]);
		MemoryContextSwitchTo(old);
		if (ncheck_cache == MAX_CHECK_CACHE)
			check_cache_forget(0);
		MemoryContextSetParent(cxt, CacheMemoryContext);
		cc = &check_cache[ncheck_cache++];
		cc->relid = RelationGetRelid(rel);
		cc->ncheck = ncheck;
		cc->cxt = cxt;
		cc->exprs = exprs;
	}

	/*
	 * Copies first: initializing one may look up a function, process
	 * invalidations and drop the cache entry
	 */
	old = MemoryContextSwitchTo(estate->es_query_cxt);
	ncheck = cc->ncheck;
	copies = palloc0(sizeof(Expr *) * ncheck);
	for (int i = 0; i < ncheck; i++)
		if (cc->exprs[i] != NULL)
			copies[i] = copyObject(cc->exprs[i]);
	states = palloc0(sizeof(ExprState *) * ncheck);
	for (int i = 0; i < ncheck; i++)
		if (copies[i] != NULL)
			states[i] = ExecInitExpr(copies[i], NULL);
	MemoryContextSwitchTo(old);
	*billing_rri_check_exprs(rri) = states;
}

/*
 * An update that changes none of a unique index's columns cannot make a
 * duplicate in it: the new version has the key of the version it replaces,
 * which was unique and which we hold locked, and whoever inserts that key
 * meanwhile checks against one of the two versions (what a HOT update,
 * which adds no index entry at all, relies on too).  The executor checks
 * anyway when the update is not HOT, and the check visits every version of
 * the row in the index, i.e. every version this transaction wrote (none
 * can be pruned before it ends): a transaction that charged one account n
 * times paid O(n) each time the row moved to another page, O(n^2) in all
 * (100,000 credits in one statement: 5.5 s).  So such indexes are withheld
 * from the executor's index maintenance for this one update and given their
 * entry here, unchecked, when the update was not HOT.  Only valid plain
 * unique indexes checked at once (no expression, predicate or exclusion
 * operator; not deferrable: a deferred check is queued by the executor; not
 * one being built or rebuilt concurrently), and only when nothing but the
 * columns we set can change: no BEFORE UPDATE row trigger, no stored
 * generated column.
 */
#define MAX_WITHHELD 4

typedef struct Withheld
{
	int			n;
	Relation	index[MAX_WITHHELD];
	IndexInfo  *info[MAX_WITHHELD];
	/* the result relation's own arrays, given back after the update */
	int			num;
	RelationPtr descs;
	IndexInfo **infos;
} Withheld;

static void
withhold_unchanged_unique(ResultRelInfo *rri, EState *estate, DirectTable *t,
						  const bool *uset, Withheld *w)
{
	Relation	rel = rri->ri_RelationDesc;
	Bitmapset  *changed = NULL;
	int			kept = 0;

	w->n = 0;
	w->num = rri->ri_NumIndices;
	w->descs = rri->ri_IndexRelationDescs;
	w->infos = rri->ri_IndexRelationInfo;
	if (rri->ri_NumIndices == 0 ||
		(rel->trigdesc && rel->trigdesc->trig_update_before_row) ||
		(rel->rd_att->constr && rel->rd_att->constr->has_generated_stored))
		return;
	for (int c = 0; c < t->ncols; c++)
		if (uset[c] && t->attnum[c] != InvalidAttrNumber)
			changed = bms_add_member(changed, t->attnum[c]);
	rri->ri_IndexRelationDescs = MemoryContextAlloc(estate->es_query_cxt,
													sizeof(Relation) * w->num);
	rri->ri_IndexRelationInfo = MemoryContextAlloc(estate->es_query_cxt,
												   sizeof(IndexInfo *) * w->num);
	for (int i = 0; i < w->num; i++)
	{
		Relation	index = w->descs[i];
		IndexInfo  *ii = w->infos[i];
		bool		unchanged = index != NULL && ii != NULL &&
			index->rd_index->indisunique && index->rd_index->indimmediate &&
			index->rd_index->indisvalid && ii->ii_ReadyForInserts &&
			ii->ii_Expressions == NIL && ii->ii_Predicate == NIL &&
			ii->ii_ExclusionOps == NULL && w->n < MAX_WITHHELD;

		for (int k = 0; unchanged && k < ii->ii_NumIndexAttrs; k++)
			if (ii->ii_IndexAttrNumbers[k] <= 0 ||
				bms_is_member(ii->ii_IndexAttrNumbers[k], changed))
				unchanged = false;
		if (unchanged)
		{
			w->index[w->n] = index;
			w->info[w->n] = ii;
			w->n++;
		}
		else
		{
			rri->ri_IndexRelationDescs[kept] = index;
			rri->ri_IndexRelationInfo[kept] = ii;
			kept++;
		}
	}
	rri->ri_NumIndices = kept;
	bms_free(changed);
}

/* after the update: the withheld indexes' entries, then the arrays back */
static void
insert_withheld(ResultRelInfo *rri, EState *estate, TupleTableSlot *newslot,
				Withheld *w)
{
	Relation	rel = rri->ri_RelationDesc;

	if (w->n > 0 && ItemPointerIsValid(&newslot->tts_tid))
	{
		TupleTableSlot *chk = table_slot_create(rel, &estate->es_tupleTable);
		HeapTuple	tup;

		/* a HOT update added no index entry: neither do we */
		if (!table_tuple_fetch_row_version(rel, &newslot->tts_tid, SnapshotAny, chk))
			elog(ERROR, "billing: new row version of billing.%s is gone",
				 RelationGetRelationName(rel));
		tup = ExecFetchSlotHeapTuple(chk, false, NULL);
		if (!HeapTupleHeaderIsHeapOnly(tup->t_data))
		{
			ExprContext *econtext = GetPerTupleExprContext(estate);
			Datum		values[INDEX_MAX_KEYS];
			bool		isnull[INDEX_MAX_KEYS];

			econtext->ecxt_scantuple = newslot;
			for (int i = 0; i < w->n; i++)
			{
				FormIndexDatum(w->info[i], newslot, estate, values, isnull);
				index_insert(w->index[i], values, isnull, &newslot->tts_tid, rel,
							 UNIQUE_CHECK_NO, true, w->info[i]);
			}
		}
		ExecClearTuple(chk);
	}
	rri->ri_NumIndices = w->num;
	rri->ri_IndexRelationDescs = w->descs;
	rri->ri_IndexRelationInfo = w->infos;
}

static ResultRelInfo *
result_rel(EState *estate, Relation rel, Index rti)
{
	ResultRelInfo *rri = makeNode(ResultRelInfo);

	InitResultRelInfo(rri, rel, rti, NULL, 0);
	ExecOpenIndices(rri, false);
	prepare_checks(rri, estate);
	/* where ExecGetTriggerResultRel() looks for it (after-row triggers) */
	estate->es_opened_result_relations =
		lappend(estate->es_opened_result_relations, rri);
	return rri;
}

/* fill a slot of `rel` with the given columns (others NULL) */
static TupleTableSlot *
fill_slot(EState *estate, Relation rel, DirectTable *t, Datum *values,
		  bool *nulls)
{
	TupleTableSlot *slot = table_slot_create(rel, &estate->es_tupleTable);

	ExecClearTuple(slot);
	memset(slot->tts_isnull, true, sizeof(bool) * slot->tts_tupleDescriptor->natts);
	for (int c = 0; c < t->ncols; c++)
	{
		if (t->attnum[c] == InvalidAttrNumber)
			continue;			/* an optional column the table does not have */
		slot->tts_values[t->attnum[c] - 1] = values[c];
		slot->tts_isnull[t->attnum[c] - 1] = nulls[c];
	}
	return ExecStoreVirtualTuple(slot);
}

/*
 * Lock a row that direct_fetch read but nothing locked (a hold: billing's
 * own writers serialize on the account row, but an UPDATE by hand does
 * not), so that the update cannot fail halfway with "tuple concurrently
 * updated".  A row changed since it was read is a serialization failure in
 * every isolation level: what the call decided, it decided on the old row.
 * Leaves the locked version in slot.
 */
static void
lock_to_update(Relation rel, DirectTable *t, ItemPointer tid, TupleTableSlot *slot)
{
	TM_FailureData tmfd;
	TM_Result	res;

	res = table_tuple_lock(rel, tid, GetActiveSnapshot(), slot,
						   GetCurrentCommandId(true), LockTupleNoKeyExclusive,
						   LockWaitBlock, 0, &tmfd);
	switch (res)
	{
		case TM_Ok:
			return;
		case TM_Updated:
		case TM_Deleted:
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not serialize access due to concurrent update of billing.%s",
							t->name),
					 errdetail("Another transaction changed the row this call read, outside billing's functions."),
					 errhint("Retry the call with the same trace id.")));
			break;
		default:
			elog(ERROR, "billing: unexpected result %d locking a row of billing.%s",
				 (int) res, t->name);
	}
}

void
direct_write(Datum key, DirectTable *ins, Datum *ivalues, bool *inulls,
			 DirectTable *upd, ItemPointer tid, Datum *uvalues,
			 bool *unulls, const bool *uset)
{
	Oid			nsp = billing_namespace();
	int64		shardid;
	Relation	irel = ins ? direct_open(ins, nsp, key, true, RowExclusiveLock, &shardid) : NULL;
	Relation	urel = upd ? direct_open(upd, nsp, key, true, RowExclusiveLock, &shardid) : NULL;
	EState	   *estate = CreateExecutorState();
	List	   *rtable = NIL;
	List	   *perminfos = NIL;
	ResultRelInfo *irri = NULL;
	ResultRelInfo *urri = NULL;
	Withheld	withheld;

	/* a range table, as row triggers and index maintenance expect one */
	for (int i = 0; i < 2; i++)
	{
		Relation	rel = i == 0 ? irel : urel;
		RangeTblEntry *rte;
		Bitmapset **updated;

		if (rel == NULL)
			continue;
		rte = makeNode(RangeTblEntry);
		rte->rtekind = RTE_RELATION;
		rte->relid = RelationGetRelid(rel);
		rte->relkind = rel->rd_rel->relkind;
		rte->rellockmode = RowExclusiveLock;
		updated = billing_add_rte(&rtable, &perminfos, rte);

		/*
		 * The columns the update sets, as in a SQL UPDATE's range table
		 * entry (and logical replication's apply_handle_update): triggers
		 * declared BEFORE/AFTER UPDATE OF <column> look here.
		 */
		if (rel == urel)
			for (int c = 0; c < upd->ncols; c++)
				if (uset[c] && upd->attnum[c] != InvalidAttrNumber)
					*updated =
						bms_add_member(*updated,
									   upd->attnum[c] - FirstLowInvalidHeapAttributeNumber);
	}
	billing_init_range_table(estate, rtable, perminfos);
	estate->es_output_cid = GetCurrentCommandId(true);
	estate->es_snapshot = GetActiveSnapshot();
	if (irel)
		irri = result_rel(estate, irel, 1);
	if (urel)
		urri = result_rel(estate, urel, irel ? 2 : 1);
	memset(&withheld, 0, sizeof(withheld));

	PreventCommandIfReadOnly("a billing charge");
	PreventCommandIfParallelMode("a billing charge");
	if (irel)
		check_write_hooks(ins, irel, CMD_INSERT);
	if (urel)
		check_write_hooks(upd, urel, CMD_UPDATE);
	AfterTriggerBeginQuery();
	if (irel)
	{
		TupleTableSlot *slot = fill_slot(estate, irel, ins, ivalues, inulls);

		ItemPointerSetInvalid(&slot->tts_tid);
		ExecSimpleRelationInsert(irri, estate, slot);
		if (!ItemPointerIsValid(&slot->tts_tid))
			skipped_by_trigger(irel);
	}
	if (urel)
	{
		TupleTableSlot *oldslot = table_slot_create(urel, &estate->es_tupleTable);
		TupleTableSlot *newslot = table_slot_create(urel, &estate->es_tupleTable);
		EPQState	epq;
		int			natts = RelationGetDescr(urel)->natts;

		/* a row locked by direct_lock_row, or now: nobody else can change it */
		if (upd->many_per_key)
			lock_to_update(urel, upd, tid, oldslot);
		else if (!table_tuple_fetch_row_version(urel, tid, SnapshotAny, oldslot))
			elog(ERROR, "billing: locked row of billing.%s is gone", upd->name);
		slot_getallattrs(oldslot);
		ExecClearTuple(newslot);
		memcpy(newslot->tts_values, oldslot->tts_values, sizeof(Datum) * natts);
		memcpy(newslot->tts_isnull, oldslot->tts_isnull, sizeof(bool) * natts);
		for (int c = 0; c < upd->ncols; c++)
		{
			if (!uset[c] || upd->attnum[c] == InvalidAttrNumber)
				continue;
			newslot->tts_values[upd->attnum[c] - 1] = uvalues[c];
			newslot->tts_isnull[upd->attnum[c] - 1] = unulls[c];
		}
		ExecStoreVirtualTuple(newslot);
		ItemPointerSetInvalid(&newslot->tts_tid);
		billing_epq_init(&epq, estate);
		withhold_unchanged_unique(urri, estate, upd, uset, &withheld);
		ExecSimpleRelationUpdate(urri, estate, &epq, oldslot, newslot);
		insert_withheld(urri, estate, newslot, &withheld);
		EvalPlanQualEnd(&epq);
		if (!ItemPointerIsValid(&newslot->tts_tid))
			skipped_by_trigger(urel);
		ItemPointerCopy(&newslot->tts_tid, tid);

		/* the row's newest version, for the next lock of it (direct_lock_row) */
		if (!upd->many_per_key && !newslot->tts_isnull[upd->attnum[0] - 1])
		{
			RowVersion *rv = row_version_find(RelationGetRelid(urel),
											  newslot->tts_values[upd->attnum[0] - 1],
											  true);

			rv->file = billing_rel_file_number(urel);
			ItemPointerCopy(tid, &rv->tid);
		}
	}
	AfterTriggerEndQuery(estate);

	/* our indexes, and relations opened for triggers */
	ExecCloseResultRelations(estate);
	ExecResetTupleTable(estate->es_tupleTable, false);
	FreeExecutorState(estate);
	if (irel)
		table_close(irel, NoLock);
	if (urel)
		table_close(urel, NoLock);
	/* as SPI after a read-write statement: later reads see these rows */
	CommandCounterIncrement();
}

static void
scan_relation(DirectTable *t, Oid relid, Oid indexid, Datum *key,
			  DirectRowFn fn, void *arg)
{
	Relation	rel = direct_open_relid(t, relid, AccessShareLock);
	Relation	index = direct_index_open(t, rel, indexid);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	ScanKeyData skey;
	IndexScanDesc scan;

	scan = billing_index_beginscan(rel, index, GetActiveSnapshot(), key ? 1 : 0, 0);
	if (key)
		key_init(&skey, index, 1, key);
	index_rescan(scan, key ? &skey : NULL, key ? 1 : 0, NULL, 0);
	while (index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		CHECK_FOR_INTERRUPTS();
		fn(slot, arg);
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(index, NoLock);
	table_close(rel, NoLock);
}

void
direct_scan(DirectTable *t, const char *index_name, Datum *key,
			DirectRowFn fn, void *arg)
{
	Oid			nsp = billing_namespace();
	Oid			logical = billing_relid(t->name, nsp);
	int64		shardid;
	bool		distributed;
	List	   *shards;
	ListCell   *lc;

	if (key)
	{
		/* one tenant: its relation (ZB100 when it is on another node) */
		Oid			relid = billing_shard_relid(logical, *key, false, &shardid);

		scan_relation(t, relid, billing_shard_index(index_name, nsp, shardid),
					  key, fn, arg);
		return;
	}
	/* every tenant on this node: the table, or each local shard in turn */
	shards = billing_local_shards(logical, &distributed);
	foreach(lc, shards)
	{
		Oid			relid = lfirst_oid(lc);
		const char *relname = get_rel_name(relid);

		/* a shard is <table>_<shardid>, its index <index>_<shardid> */
		shardid = distributed ? pg_strtoint64(relname + strlen(t->name) + 1) : 0;
		scan_relation(t, relid, billing_shard_index(index_name, nsp, shardid),
					  NULL, fn, arg);
	}
}

int64
direct_nextval(const char *seqname)
{
	Oid			nsp = billing_namespace();
	int64		v = nextval_internal(billing_relid(seqname, nsp), false);

	/*
	 * Citus: every node numbers from its own range (group << 48), or two
	 * nodes hand out the same ids (billing.citus_node_setup()).
	 */
	if (billing_is_distributed(billing_relid(billing_entries_table.name, nsp)))
	{
		int32		group = billing_local_group();

		if (group >= 0 && (v >> 48) != group)
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_BAD_DISTRIBUTION),
					 errmsg("sequence billing.%s is not set up for this node", seqname),
					 errdetail("It handed out " INT64_FORMAT ", outside the range of node group %d.",
							   v, group),
					 errhint("Run SELECT billing.citus_node_setup() on this node (billing.citus_distribute() does it on every node).")));
	}
	return v;
}
