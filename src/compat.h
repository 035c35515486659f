/*-------------------------------------------------------------------------
 *
 * compat.h
 *	  Every PostgreSQL version difference of the billing extension, in one
 *	  place: the .c files call these wrappers and carry no version #if.
 *
 * Built and tested on PostgreSQL 15, 17 and 18.  The guards are by the
 * version that changed the API (16, 17 or 18), so 16 is covered too.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_COMPAT_H
#define BILLING_COMPAT_H

#include "access/genam.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "executor/executor.h"
#include "nodes/parsenodes.h"
#include "utils/acl.h"
#include "nodes/readfuncs.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#if PG_VERSION_NUM >= 160000
#include "parser/parse_relation.h"
#endif
#if PG_VERSION_NUM >= 180000
#include "rewrite/rewriteHandler.h"
#include "storage/waiteventset.h"
#endif

#if PG_VERSION_NUM < 150000
#error "billing needs PostgreSQL 15 or later"
#endif

/*
 * 17: CreateWaitEventSet() takes a resource owner (NULL: none) instead of a
 * memory context.  Either way the set lives in TopMemoryContext until
 * FreeWaitEventSet(), whatever transaction comes and goes.
 */
static inline WaitEventSet *
billing_create_wait_event_set(int nevents)
{
#if PG_VERSION_NUM >= 170000
	return CreateWaitEventSet(NULL, nevents);
#else
	return CreateWaitEventSet(TopMemoryContext, nevents);
#endif
}

/*
 * 18: index_beginscan() takes an IndexScanInstrumentation (EXPLAIN's
 * counters) before nkeys; we have none to fill.
 */
static inline IndexScanDesc
billing_index_beginscan(Relation heap, Relation index, Snapshot snapshot,
						int nkeys, int norderbys)
{
#if PG_VERSION_NUM >= 180000
	return index_beginscan(heap, index, snapshot, NULL, nkeys, norderbys);
#else
	return index_beginscan(heap, index, snapshot, nkeys, norderbys);
#endif
}

/*
 * 16: the permission fields of a range table entry (updatedCols among them,
 * which BEFORE/AFTER UPDATE OF <column> triggers read) moved to an
 * RTEPermissionInfo in a list of its own.  Appends `rte` to *rtable (and
 * its permission info to *perminfos) and returns where the entry's
 * updatedCols live.
 */
static inline Bitmapset **
billing_add_rte(List **rtable, List **perminfos, RangeTblEntry *rte)
{
	*rtable = lappend(*rtable, rte);
#if PG_VERSION_NUM >= 160000
	return &addRTEPermissionInfo(perminfos, rte)->updatedCols;
#else
	return &rte->updatedCols;
#endif
}

/*
 * 16: ExecInitRangeTable() takes the permission infos; 18 also the range
 * table indexes that partition pruning left (all of ours: no pruning).
 */
static inline void
billing_init_range_table(EState *estate, List *rtable, List *perminfos)
{
#if PG_VERSION_NUM >= 180000
	ExecInitRangeTable(estate, rtable, perminfos,
					   bms_add_range(NULL, 1, list_length(rtable)));
#elif PG_VERSION_NUM >= 160000
	ExecInitRangeTable(estate, rtable, perminfos);
#else
	ExecInitRangeTable(estate, rtable);
#endif
}

/*
 * 16: EvalPlanQualInit() takes the result relations' range table indexes
 * (NIL, as logical replication's apply passes: no plan to re-check).
 */
static inline void
billing_epq_init(EPQState *epq, EState *estate)
{
#if PG_VERSION_NUM >= 160000
	EvalPlanQualInit(epq, estate, NULL, NIL, -1, NIL);
#else
	EvalPlanQualInit(epq, estate, NULL, NIL, -1);
#endif
}

/* 16: a relation's RelFileNode (rd_node) became its RelFileLocator */
static inline Oid
billing_rel_file_number(Relation rel)
{
#if PG_VERSION_NUM >= 160000
	return rel->rd_locator.relNumber;
#else
	return rel->rd_node.relNode;
#endif
}

/*
 * 16: pg_proc_aclcheck() and pg_namespace_aclcheck() became
 * object_aclcheck() with the catalog's OID.
 */
static inline AclResult
billing_proc_aclcheck(Oid proc, Oid role, AclMode mode)
{
#if PG_VERSION_NUM >= 160000
	return object_aclcheck(ProcedureRelationId, proc, role, mode);
#else
	return pg_proc_aclcheck(proc, role, mode);
#endif
}

static inline AclResult
billing_namespace_aclcheck(Oid nsp, Oid role, AclMode mode)
{
#if PG_VERSION_NUM >= 160000
	return object_aclcheck(NamespaceRelationId, nsp, role, mode);
#else
	return pg_namespace_aclcheck(nsp, role, mode);
#endif
}

/*
 * The settings the background worker pins (worker.c) that differ by
 * version, as entries of its {name, value} table: 16 renamed
 * force_parallel_mode to debug_parallel_query; 17 added
 * transaction_timeout.
 */
#if PG_VERSION_NUM >= 170000
#define BILLING_PINNED_BY_VERSION \
	{"debug_parallel_query", "off"}, \
	{"transaction_timeout", "0"},
#elif PG_VERSION_NUM >= 160000
#define BILLING_PINNED_BY_VERSION \
	{"debug_parallel_query", "off"},
#else
#define BILLING_PINNED_BY_VERSION \
	{"force_parallel_mode", "off"},
#endif

/*
 * A result relation's CHECK constraints as ExecRelCheck() prepares them
 * (direct.c keeps them planned).  18 renamed ri_ConstraintExprs to
 * ri_CheckConstraintExprs, skips a NOT ENFORCED constraint and expands
 * virtual generated columns in the expression before planning it.
 */
static inline ExprState ***
billing_rri_check_exprs(ResultRelInfo *rri)
{
#if PG_VERSION_NUM >= 180000
	return &rri->ri_CheckConstraintExprs;
#else
	return &rri->ri_ConstraintExprs;
#endif
}

/* constraint i of rel, not yet planned; NULL when the executor skips it */
static inline Expr *
billing_check_expr(Relation rel, int i)
{
	ConstrCheck *check = &rel->rd_att->constr->check[i];

#if PG_VERSION_NUM >= 180000
	if (!check->ccenforced)
		return NULL;
	return (Expr *) expand_generated_columns_in_expr(stringToNode(check->ccbin), rel, 1);
#else
	return (Expr *) stringToNode(check->ccbin);
#endif
}

/* this backend's local transaction id (17 moved it into MyProc->vxid) */
static inline LocalTransactionId
billing_my_lxid(void)
{
#if PG_VERSION_NUM >= 170000
	return MyProc->vxid.lxid;
#else
	return MyProc->lxid;
#endif
}

#endif							/* BILLING_COMPAT_H */
