/*-------------------------------------------------------------------------
 *
 * verify.c
 *	  billing.verify_entries(tenant_id): the per-tenant facts of the ledger
 *	  that billing_verify() compares with the accounts, in one pass.
 *
 * The entries are walked in primary-key order (tenant_id, entry_id), so no
 * sort is needed and each tenant is one run of rows.  For each tenant:
 * the exact sum of the amounts, the number of entries, the balance_after
 * chain (balance_after = previous balance_after + amount), the highest
 * version, and the entries with an unknown kind, a zero amount or the wrong
 * sign.  The chain is defined in version order; billing's writers take the
 * entry id and the version under the account lock, so entry id order is
 * version order and one pass suffices.  A tenant where that does not hold
 * (entry_id_seq with CACHE > 1, imported entries) gets its chain checked
 * again by SQL in version order.  The SQL version of this (window
 * functions and filtered aggregates) ran at ~1 M entries/s; this is the
 * part of billing_verify() that reads every entry.
 *
 * Since 1.4 it also replays the grant buckets from the ledger alone: a
 * grant entry's draws say what went into its bucket (the rest paid debt
 * back), a debit's draws take from buckets, a refund's draws give back, an
 * expire entry takes out.  Every bucket must stay at zero or above (checked
 * entry by entry when entry id order is version order, else on the final
 * amounts), and what is left in it must be what the account says it holds,
 * remaining and reserved by holds (accounts.grants_state): billing_verify()
 * compares the two.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "billing.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "direct.h"
#include "account.h"
#include "grants.h"
#include "utils/array.h"
#include "funcapi.h"
#include "utils/hsearch.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(billing_verify_entries);

typedef struct TenantFacts
{
	ReturnSetInfo *rsinfo;
	MemoryContext row_cxt;		/* reset per entry */
	MemoryContext tenant_cxt;	/* reset per tenant */
	bool		open;			/* a tenant is being summed */
	text	   *tenant;			/* in the function's context */
	Numeric		overflowed;		/* sum carried over when int64 overflowed */
	int64		sum;
	int64		n;
	int64		breaks;
	int64		first_break;
	bool		disorder;		/* a version not above the previous entry's */
	int64		max_version;
	int64		invalid;
	int64		prev_balance;
	int64		prev_version;
	/* grant buckets replayed from the ledger (GrantLeft by grant id) */
	HTAB	   *grants;
	int64		grants_negative;	/* entries that took a bucket below zero */
} TenantFacts;

typedef struct GrantLeft
{
	int64		grant_id;		/* hash key */
	int64		left;
} GrantLeft;

static bool
kind_is(text *kind, const char *name)
{
	size_t		len = strlen(name);

	return VARSIZE_ANY_EXHDR(kind) == len && memcmp(VARDATA_ANY(kind), name, len) == 0;
}

/* sign rules of billing.entries.kind (the functions never write others) */
static bool
entry_invalid(text *kind, int64 amount)
{
	if (amount == 0)
		return true;
	if (kind_is(kind, "topup") || kind_is(kind, "grant") || kind_is(kind, "refund"))
		return amount < 0;
	if (kind_is(kind, "deduct") || kind_is(kind, "capture") || kind_is(kind, "expire"))
		return amount > 0;
	return !kind_is(kind, "adjustment");
}

/*
 * The balance_after chain in version order, by SQL, for a tenant whose
 * entry ids do not rise with their versions (e.g. entry_id_seq with a
 * CACHE above 1): breaks and the lowest entry id among them.
 */
static void
chain_in_version_order(TenantFacts *f)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	billing_spi_connect();
	billing_keep_plan(&plan,
					  "SELECT pg_catalog.count(*), pg_catalog.min(entry_id) FROM ("
					  "  SELECT entry_id, balance_after_micros::pg_catalog.numeric OPERATOR(pg_catalog.<>) "
					  "         (amount_micros::pg_catalog.numeric OPERATOR(pg_catalog.+) "
					  "          pg_catalog.lag(balance_after_micros, 1, 0::pg_catalog.int8) "
					  "            OVER (ORDER BY version)::pg_catalog.numeric) AS brk "
					  "    FROM billing.entries WHERE tenant_id OPERATOR(pg_catalog.=) $1) c "
					  "WHERE brk",
					  1, types);
	values[0] = PointerGetDatum(f->tenant);
	billing_spi_read(plan, values, NULL, "checking the chain in version order");
	f->breaks = billing_col_int64(0, 1, 0);
	f->first_break = billing_col_int64(0, 2, 0);
	SPI_finish();
}

/* add `amount` to bucket g of the tenant (in tenant_cxt) */
static void
bucket_add(TenantFacts *f, int64 g, int64 amount)
{
	GrantLeft  *e;
	bool		found;

	if (f->grants == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(GrantLeft);
		ctl.hcxt = f->tenant_cxt;
		f->grants = hash_create("billing verify grants", 64, &ctl,
								HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	e = hash_search(f->grants, &g, HASH_ENTER, &found);
	if (!found)
		e->left = 0;
	if (pg_add_s64_overflow(e->left, amount, &e->left) || e->left < 0)
		f->grants_negative++;
}

/* the grant buckets of one entry (see the file header) */
static void
replay_grants(TenantFacts *f, TupleTableSlot *slot, text *kind, int64 amount)
{
	AttrNumber *att = billing_entries_table.attnum;
	bool		isnull;
	Datum		d;

	if (att[EC_GRANT_ID] == InvalidAttrNumber)
		return;					/* a 1.3 schema: no grants */
	if (kind_is(kind, "expire"))
	{
		d = slot_getattr(slot, att[EC_GRANT_ID], &isnull);
		if (isnull)
			f->invalid++;		/* an expiry names its grant */
		else
			bucket_add(f, DatumGetInt64(d), amount);	/* negative */
		return;
	}
	d = slot_getattr(slot, att[EC_DRAWS], &isnull);
	if (!isnull)
	{
		Draws		draws;
		int64		total = 0;

		draws_from_datum(d, &draws);
		for (int i = 0; i < draws.n; i++)
		{
			/* a draw is a positive amount of a bucket, at most the entry's */
			if (draws.amount[i] < 0 ||
				pg_add_s64_overflow(total, draws.amount[i], &total) ||
				total > (amount < 0 ? -amount : amount))
			{
				f->invalid++;
				return;
			}
			bucket_add(f, draws.grant_id[i], amount < 0 ? -draws.amount[i] : draws.amount[i]);
		}
	}
}

static int
cmp_grant_left(const void *a, const void *b)
{
	int64		x = ((const GrantLeft *) a)->grant_id;
	int64		y = ((const GrantLeft *) b)->grant_id;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * The replayed buckets as grant id, left pairs (sorted, empty ones out).
 * When the entries did not come in version order, a bucket counts as gone
 * below zero only by its final amount.
 */
static Datum
grants_datum(TenantFacts *f)
{
	GrantLeft  *all;
	Datum	   *elems;
	long		n = 0;
	int			k = 0;
	HASH_SEQ_STATUS seq;
	GrantLeft  *e;

	if (f->grants == NULL)
		return PointerGetDatum(construct_empty_array(INT8OID));
	all = palloc(sizeof(GrantLeft) * Max(hash_get_num_entries(f->grants), 1));
	hash_seq_init(&seq, f->grants);
	while ((e = hash_seq_search(&seq)) != NULL)
		all[n++] = *e;
	qsort(all, n, sizeof(GrantLeft), cmp_grant_left);
	if (f->disorder)
	{
		f->grants_negative = 0;
		for (long i = 0; i < n; i++)
			if (all[i].left < 0)
				f->grants_negative++;
	}
	elems = palloc(sizeof(Datum) * 2 * Max(n, 1));
	for (long i = 0; i < n; i++)
		if (all[i].left != 0)
		{
			elems[k++] = Int64GetDatum(all[i].grant_id);
			elems[k++] = Int64GetDatum(all[i].left);
		}
	return PointerGetDatum(construct_array(elems, k, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

static void
emit(TenantFacts *f)
{
	Datum		values[9];
	bool		nulls[9] = {0};
	MemoryContext old = MemoryContextSwitchTo(f->tenant_cxt);
	Numeric		total = int64_to_numeric(f->sum);

	if (f->overflowed)
		total = DatumGetNumeric(DirectFunctionCall2(numeric_add,
													NumericGetDatum(f->overflowed),
													NumericGetDatum(total)));
	if (f->disorder)
		chain_in_version_order(f);
	values[0] = PointerGetDatum(f->tenant);
	values[1] = NumericGetDatum(total);
	values[2] = Int64GetDatum(f->n);
	values[3] = Int64GetDatum(f->breaks);
	values[4] = Int64GetDatum(f->first_break);
	nulls[4] = f->breaks == 0;
	values[5] = Int64GetDatum(f->max_version);
	values[6] = Int64GetDatum(f->invalid);
	/* a 1.3 schema's function has the first seven columns only */
	if (f->rsinfo->setDesc->natts >= 9)
	{
		values[7] = grants_datum(f);
		values[8] = Int64GetDatum(f->grants_negative);
	}
	tuplestore_putvalues(f->rsinfo->setResult, f->rsinfo->setDesc, values, nulls);
	MemoryContextSwitchTo(old);
	/* the row is copied into the tuplestore: the tenant's memory can go */
	MemoryContextReset(f->tenant_cxt);
	f->open = false;
}

static void
visit_entry(TupleTableSlot *slot, void *arg)
{
	TenantFacts *f = (TenantFacts *) arg;
	AttrNumber *att = billing_entries_table.attnum;
	MemoryContext old = MemoryContextSwitchTo(f->row_cxt);
	bool		isnull;
	text	   *tenant = DatumGetTextPP(slot_getattr(slot, att[EC_TENANT_ID], &isnull));
	int64		entry_id = DatumGetInt64(slot_getattr(slot, att[EC_ENTRY_ID], &isnull));
	text	   *kind = DatumGetTextPP(slot_getattr(slot, att[EC_KIND], &isnull));
	int64		amount = DatumGetInt64(slot_getattr(slot, att[EC_AMOUNT], &isnull));
	int64		balance = DatumGetInt64(slot_getattr(slot, att[EC_BALANCE_AFTER], &isnull));
	int64		version = DatumGetInt64(slot_getattr(slot, att[EC_VERSION], &isnull));
	int64		expected;
	int64		sum;
	bool		brk;

	/* a new tenant (rows of one tenant are adjacent in key order) */
	if (f->open && (VARSIZE_ANY_EXHDR(tenant) != VARSIZE_ANY_EXHDR(f->tenant) ||
					memcmp(VARDATA_ANY(tenant), VARDATA_ANY(f->tenant),
						   VARSIZE_ANY_EXHDR(tenant)) != 0))
	{
		MemoryContextSwitchTo(old);
		emit(f);
		MemoryContextSwitchTo(f->row_cxt);
	}
	if (!f->open)
	{
		MemoryContextSwitchTo(f->tenant_cxt);
		f->tenant = (text *) PG_DETOAST_DATUM_COPY(PointerGetDatum(tenant));
		MemoryContextSwitchTo(f->row_cxt);
		f->open = true;
		f->overflowed = NULL;
		f->disorder = false;
		f->sum = f->n = f->breaks = f->invalid = 0;
		f->first_break = f->max_version = 0;
		f->prev_balance = f->prev_version = 0;
		f->grants = NULL;		/* its memory went with tenant_cxt */
		f->grants_negative = 0;
	}

	if (pg_add_s64_overflow(f->sum, amount, &sum))
	{
		/* carry the sum so far into a numeric (only a corrupt ledger) */
		MemoryContext fn_cxt = MemoryContextSwitchTo(f->tenant_cxt);
		Numeric		carry = int64_to_numeric(f->sum);

		if (f->overflowed)
			carry = DatumGetNumeric(DirectFunctionCall2(numeric_add,
														NumericGetDatum(f->overflowed),
														NumericGetDatum(carry)));
		f->overflowed = carry;
		MemoryContextSwitchTo(fn_cxt);
		sum = amount;
	}
	f->sum = sum;
	f->n++;
	brk = pg_add_s64_overflow(f->prev_balance, amount, &expected) ||
		expected != balance;
	if (brk && f->breaks++ == 0)
		f->first_break = entry_id;
	if (version <= f->prev_version)
		f->disorder = true;		/* the chain is checked again in version order */
	if (version > f->max_version)
		f->max_version = version;
	if (entry_invalid(kind, amount))
		f->invalid++;
	replay_grants(f, slot, kind, amount);
	f->prev_balance = balance;
	f->prev_version = version;

	MemoryContextSwitchTo(old);
	MemoryContextReset(f->row_cxt);
}

/*
 * billing.verify_entries(tenant_id text) -> SETOF (tenant_id, total,
 * entries, breaks, first_break, max_version, invalid, grants,
 * grants_negative);
 * NULL tenant: every tenant.
 */
Datum
billing_verify_entries(PG_FUNCTION_ARGS)
{
	TenantFacts f;
	Datum		key;

	memset(&f, 0, sizeof(f));
	InitMaterializedSRF(fcinfo, 0);
	f.rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	f.row_cxt = AllocSetContextCreate(CurrentMemoryContext, "billing verify row",
									  ALLOCSET_SMALL_SIZES);
	f.tenant_cxt = AllocSetContextCreate(CurrentMemoryContext, "billing verify tenant",
										 ALLOCSET_SMALL_SIZES);
	if (!PG_ARGISNULL(0))
		key = PG_GETARG_DATUM(0);
	direct_scan(&billing_entries_table, "entries_pkey",
				PG_ARGISNULL(0) ? NULL : &key, visit_entry, &f);
	if (f.open)
		emit(&f);
	MemoryContextDelete(f.row_cxt);
	MemoryContextDelete(f.tenant_cxt);
	return (Datum) 0;
}
