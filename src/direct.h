/*-------------------------------------------------------------------------
 *
 * direct.h
 *	  Direct heap and index access to the two tables every charge writes
 *	  (billing.accounts and billing.entries), and to a hold's two
 *	  (billing.holds and billing.hold_events, holds.c), without the SQL
 *	  executor.
 *
 * A charge is: lock the account row, check that the trace id is new, insert
 * one entry, update the account.  Through SPI that is two or three planned
 * statements whose executor start-up and shut-down cost more than the work
 * itself; here it is one index lookup + tuple lock, one index probe and one
 * insert + one update through the executor's "simple relation" routines
 * (the ones logical replication uses), which still maintain every index,
 * check NOT NULL constraints and fire any row triggers.  What they do not
 * do: statement-level triggers, transition tables and rules (a charge
 * refuses to run while one exists on these tables), permission checks and
 * ExecutorCheckPerms_hook (the functions are SECURITY DEFINER and owned by
 * the table owner; an audit extension such as pgaudit sees the calling
 * statement, not an INSERT on billing.entries).
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_DIRECT_H
#define BILLING_DIRECT_H

#include "access/attnum.h"
#include "executor/tuptable.h"
#include "storage/itemptr.h"

#define DIRECT_MAX_COLS 48

/*
 * A table of schema billing and the columns C code reads or writes, in the
 * order of the caller's enum.  Column numbers are resolved by name once per
 * backend and again after any relcache invalidation of the table (ALTER
 * TABLE, an extension upgrade, DROP/CREATE EXTENSION).
 */
typedef struct DirectTable
{
	const char *name;			/* table name in schema billing */
	const char *key_index;		/* unique index whose leading columns are the key */
	int			ncols;
	const char *const *cols;	/* column names, in enum order */
	const Oid  *types;			/* their types, checked at resolution */
	bool		complete;		/* the list covers every column (inserts) */
	int			noptional;		/* the last noptional columns may be missing
								 * (an older schema): attnum InvalidAttrNumber,
								 * read as NULL, not written */
	bool		many_per_key;	/* the first column names many rows (a hold's
								 * tenant): direct_write keeps no row version
								 * for direct_lock_row, and locks a row itself
								 * before updating it (read by direct_fetch,
								 * not locked) */
	/* per backend */
	Oid			relid;			/* InvalidOid: resolve again */
	AttrNumber	attnum[DIRECT_MAX_COLS];
} DirectTable;

/*
 * Lock the row whose key (the first column of t->key_index) equals `key`
 * FOR UPDATE, as SELECT ... FOR UPDATE does in the current isolation level
 * (READ COMMITTED: wait, then lock the newest version; REPEATABLE READ and
 * SERIALIZABLE: a row changed since the snapshot is a serialization
 * failure).  Fills values/nulls (in enum order, copied into the current
 * memory context) and the row's TID; returns false when there is no row.
 */
extern bool direct_lock_row(DirectTable *t, Datum key, Datum *values,
							bool *nulls, ItemPointer tid);

/*
 * The same; with nowait, a row locked by another transaction is not waited
 * for: false is returned with *busy set (as SELECT ... FOR UPDATE SKIP
 * LOCKED).  The charge engine uses it not to hold up a batch for one
 * tenant.
 */
extern bool direct_lock_row_nowait(DirectTable *t, Datum key, Datum *values,
								   bool *nulls, ItemPointer tid, bool nowait,
								   bool *busy);

/*
 * Read rows by key as the active snapshot sees them (no lock), as
 * direct_lock_row otherwise.  A reader keeps the table, its key index and
 * one index scan open, so that reading many rows (the background worker's
 * snapshots) pays for opening them once; close it in the same transaction.
 */
typedef struct DirectReader DirectReader;

#define DIRECT_NOT_FOUND	0
#define DIRECT_FOUND		1
#define DIRECT_NOT_HERE		2	/* Citus: the key's shard is on another node */

extern DirectReader *direct_reader_open(DirectTable *t, bool remote_ok);
extern int	direct_reader_fetch(DirectReader *r, Datum key, Datum *values,
								bool *nulls);
extern void direct_reader_close(DirectReader *r);

/*
 * Is there a row with (k1, k2) in t->key_index, committed or being
 * inserted?  An insert in progress is waited for, as a unique index does.
 */
extern bool direct_key_exists(DirectTable *t, Datum k1, Datum k2);

/*
 * Read the row of t whose first two columns of `index` (a unique btree index
 * of t on text or bigint columns) equal (k1, k2), as a statement started
 * now sees it: this transaction's earlier writes, and in READ COMMITTED a
 * fresh snapshot (what SPI gives each statement).  Fills values/nulls (in
 * enum order, copied into the current memory context) and, if tid is not
 * NULL, the row's TID; returns false when there is no such row.
 */
extern bool direct_fetch(DirectTable *t, const char *index, Datum k1, Datum k2,
						 Datum *values, bool *nulls, ItemPointer tid);

/*
 * One write of a charge of tenant `key`, in one executor state: insert a row into `ins`
 * (if not NULL; every column given) and update the row at *tid of `upd`
 * (if not NULL), replacing the columns whose `set` flag is true and keeping
 * the others.  *tid becomes the TID of the new row version.
 */
extern void direct_write(Datum key, DirectTable *ins, Datum *ivalues, bool *inulls,
						 DirectTable *upd, ItemPointer tid, Datum *uvalues,
						 bool *unulls, const bool *uset);

/*
 * Visit the rows of t in the order of t->key_index: all of them, or (key
 * not NULL) those whose first key column equals *key, as the active
 * snapshot sees them.  fn is called with each row in a slot.
 */
typedef void (*DirectRowFn) (TupleTableSlot *slot, void *arg);
extern void direct_scan(DirectTable *t, const char *index, Datum *key,
						DirectRowFn fn, void *arg);

/*
 * The columns of billing.entries, every one of them (ledger.c inserts them);
 * those added after 1.3 at the end, optional, so that the library also
 * works with a database not yet updated (ALTER EXTENSION billing UPDATE).
 */
typedef enum EntryCol
{
	EC_TENANT_ID, EC_ENTRY_ID, EC_TRACE_ID, EC_KIND, EC_AMOUNT,
	EC_BALANCE_AFTER, EC_VERSION, EC_DESCRIPTION, EC_METADATA, EC_EVENT_AT,
	EC_CREATED_AT, EC_API_KEY, EC_HOLD_ID,
	/* 1.4, optional: */
	EC_ACTOR, EC_GRANT_ID, EC_DRAWS, EC_REFUND_OF,
	EC_NCOLS
} EntryCol;

extern DirectTable billing_entries_table;

/*
 * The columns of billing.accounts C code reads or writes (account.c; the
 * worker's snapshots read them too): the key first, then in the order of
 * AccountCol; those added after 1.3 at the end, optional.
 */
typedef enum AccountCol
{
	AC_TENANT_ID, AC_STATUS, AC_TIMEZONE, AC_CURRENCY, AC_CREDIT_LIMIT,
	AC_BALANCE, AC_VERSION, AC_HOLDS, AC_HOLDS_NEXT_EXPIRY, AC_MAX_CHARGE,
	AC_DAILY_REQUESTS, AC_MONTHLY_REQUESTS, AC_DAILY_SPEND, AC_MONTHLY_SPEND,
	AC_MINUTE_LIMIT, AC_USAGE_DAY, AC_DAY_REQUESTS, AC_DAY_SPEND,
	AC_USAGE_MONTH, AC_MONTH_REQUESTS, AC_MONTH_SPEND, AC_USAGE_MINUTE,
	AC_MINUTE_REQUESTS, AC_REJECTIONS, AC_LAST_ENTRY_AT,
	/* 1.4, optional: */
	AC_GRANTS_STATE, AC_GRANTS_NEXT_EXPIRY,
	/* 1.4, optional: events and alerts (events.c) */
	AC_EVENTS_SEQ, AC_ALERT_LOW, AC_ALERT_PERCENTS, AC_ALERT_GRANT_LEAD,
	AC_ALERT_STATE, AC_ALERT_GRANTS_UNTIL, AC_ALERT_GRANTS_GID, AC_ALERT_NEXT_AT,
	AC_NCOLS
} AccountCol;

extern DirectTable billing_accounts_table;


/* nextval() of a sequence of schema billing, without the ACL check */
extern int64 direct_nextval(const char *seqname);

#endif							/* BILLING_DIRECT_H */
