/*-------------------------------------------------------------------------
 *
 * credits.c
 *	  billing_grant() and billing_refund(): credits with an expiry and a
 *	  priority, and refunds tied to the charge they give back (see grants.h
 *	  for the buckets they fill).
 *
 * Both are idempotent by their own trace id, like every write: the same
 * request again returns the original result (replayed = true); the same
 * trace id with different fields is ZB005.  Both run under the account row
 * lock, so two refunds of one charge, or a refund and a charge, serialize:
 * a charge can never be refunded beyond what it charged.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "account.h"
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "grants.h"
#include "ledger.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(billing_grant);
PG_FUNCTION_INFO_V1(billing_refund);
PG_FUNCTION_INFO_V1(billing_grants_expired);
PG_FUNCTION_INFO_V1(billing_shares_expired);

/* highest priority a grant may have */
#define GRANT_MAX_PRIORITY	1000
/* how far ahead a grant may expire */
#define GRANT_MAX_YEARS		10

static text *
arg_id(FunctionCallInfo fcinfo, int argno, const char *argname, int sqlerrcode)
{
	billing_check_not_null(fcinfo, argno, argname);
	return billing_check_id(PG_GETARG_TEXT_PP(argno), argname, sqlerrcode);
}

static Jsonb *
empty_object(void)
{
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
}

/* ZB005: the trace id was used for another request */
static void
trace_conflict(text *trace_id, const char *fields, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_TRACE_CONFLICT),
			 errmsg("trace id \"%s\" was already used with a different %s",
					text_to_cstring(trace_id), fields),
			 errdetail("%s", detail),
			 errhint("Resend the original request unchanged to get its result, "
					 "or use a new trace id for a new request.")));
}

/* ---------------------------------------------------------------------
 * billing_grant
 * ---------------------------------------------------------------------
 */
typedef struct GrantReq
{
	text	   *trace_id;
	int64		amount;
	bool		expires;
	TimestampTz expires_at;
	int64		priority;
	char	   *category;
	text	   *description;
	Jsonb	   *metadata;
} GrantReq;

/* billing.grant_result of a grant (the entry columns from the ledger) */
static Datum
grant_result(FunctionCallInfo fcinfo, Account *acc, int64 grant_id, bool replayed)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, INT8OID};
	Datum		args[2];
	TupleDesc	tupdesc;
	Datum		values[13];
	bool		nulls[13] = {0};
	bool		isnull;
	MemoryContext old;

	billing_keep_plan(&plan,
					  "SELECT g.grant_id, g.trace_id, g.category, g.priority, g.granted_micros, "
					  "       g.amount_micros, g.expires_at, e.entry_id, e.balance_after_micros, "
					  "       e.version, e.created_at "
					  "FROM billing.grants g JOIN billing.entries e "
					  "  ON e.tenant_id = g.tenant_id AND e.entry_id = g.entry_id "
					  "WHERE g.tenant_id = $1 AND g.grant_id = $2",
					  2, types);
	args[0] = PointerGetDatum(acc->tenant_id);
	args[1] = Int64GetDatum(grant_id);
	billing_spi_exec(plan, args, NULL, SPI_OK_SELECT, "reading the grant");
	if (SPI_processed != 1)
		elog(ERROR, "billing: grant " INT64_FORMAT " vanished", grant_id);

	old = MemoryContextSwitchTo(acc->cxt);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	values[0] = Int64GetDatum(grant_id);
	values[1] = PointerGetDatum(acc->tenant_id);
	values[2] = datumCopy(billing_col(0, 2, &isnull), false, -1);
	values[3] = datumCopy(billing_col(0, 3, &isnull), false, -1);
	values[4] = Int32GetDatum((int32) billing_col_int64(0, 4, 0));
	values[5] = NumericGetDatum(billing_micros_to_numeric(billing_col_int64(0, 5, 0)));
	values[6] = NumericGetDatum(billing_micros_to_numeric(billing_col_int64(0, 6, 0)));
	values[7] = billing_col(0, 7, &nulls[7]);
	values[8] = Int64GetDatum(billing_col_int64(0, 8, 0));
	values[9] = NumericGetDatum(billing_micros_to_numeric(billing_col_int64(0, 9, 0)));
	values[10] = Int64GetDatum(billing_col_int64(0, 10, 0));
	values[11] = billing_col(0, 11, &isnull);
	values[12] = BoolGetDatum(replayed);
	{
		Datum		result = HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));

		MemoryContextSwitchTo(old);
		return result;
	}
}

/*
 * An entry with this trace id exists: the same grant again (its id), or
 * ZB005 naming what differs.
 */
static int64
grant_replay(Account *acc, GrantReq *g)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		args[2];
	bool		isnull;
	Datum		d;
	StringInfoData fields;
	StringInfoData detail;

	billing_keep_plan(&plan,
					  "SELECT e.kind, g.grant_id, g.granted_micros, g.expires_at, g.priority, "
					  "       g.category, e.description, e.metadata "
					  "FROM billing.entries e LEFT JOIN billing.grants g "
					  "  ON g.tenant_id = e.tenant_id AND g.entry_id = e.entry_id "
					  "WHERE e.tenant_id = $1 AND e.trace_id = $2",
					  2, types);
	args[0] = PointerGetDatum(acc->tenant_id);
	args[1] = PointerGetDatum(g->trace_id);
	billing_spi_exec(plan, args, NULL, SPI_OK_SELECT, "grant replay probe");
	if (SPI_processed == 0)
		return 0;

	initStringInfo(&fields);
	initStringInfo(&detail);
#define DIFFERS(name, orig, mine) \
	do { \
		appendStringInfo(&fields, "%s%s", fields.len > 0 ? ", " : "", name); \
		appendStringInfo(&detail, "%s%s: original %s, this request %s", \
						 detail.len > 0 ? "; " : "", name, orig, mine); \
	} while (0)

	d = billing_col(0, 2, &isnull);
	if (isnull)
	{
		char	   *was_kind = billing_col_cstring(0, 1, CurrentMemoryContext);

		/* billing_credit(kind => 'grant') made a wallet credit, no bucket */
		if (strcmp(was_kind, "grant") == 0)
			DIFFERS("kind", "a wallet credit of kind grant (billing_credit, no bucket)",
					"a grant (billing_grant)");
		else
			DIFFERS("kind", was_kind, "grant");
		trace_conflict(g->trace_id, fields.data, psprintf("%s.", detail.data));
	}
	if (billing_col_int64(0, 3, 0) != g->amount)
		DIFFERS("amount", billing_format_micros(billing_col_int64(0, 3, 0)),
				billing_format_micros(g->amount));
	d = billing_col(0, 4, &isnull);
	if (isnull != !g->expires || (!isnull && DatumGetTimestampTz(d) != g->expires_at))
		DIFFERS("expires_at", isnull ? "never" : billing_format_ts(DatumGetTimestampTz(d)),
				g->expires ? billing_format_ts(g->expires_at) : "never");
	if (billing_col_int64(0, 5, 0) != g->priority)
		DIFFERS("priority", psprintf(INT64_FORMAT, billing_col_int64(0, 5, 0)),
				psprintf(INT64_FORMAT, g->priority));
	if (strcmp(billing_col_cstring(0, 6, CurrentMemoryContext), g->category) != 0)
		DIFFERS("category", billing_col_cstring(0, 6, CurrentMemoryContext), g->category);
	{
		char	   *was = billing_col_cstring(0, 7, CurrentMemoryContext);
		char	   *mine = g->description ? text_to_cstring(g->description) : NULL;

		if ((was == NULL) != (mine == NULL) || (was && strcmp(was, mine) != 0))
			DIFFERS("description", billing_describe_text(was ? cstring_to_text(was) : NULL),
					billing_describe_text(g->description));
	}
	{
		Jsonb	   *was = DatumGetJsonbP(billing_col(0, 8, &isnull));

		if (compareJsonbContainers(&was->root, &g->metadata->root) != 0)
			DIFFERS("metadata", billing_describe_jsonb(was), billing_describe_jsonb(g->metadata));
	}
#undef DIFFERS
	if (fields.len > 0)
		trace_conflict(g->trace_id, fields.data, psprintf("%s.", detail.data));
	return billing_col_int64(0, 2, 0);
}

/*
 * ZB018 unless expires_at lies after `now` and at most GRANT_MAX_YEARS ahead
 * of it (now = 0: only an infinite value is refused, before the lock)
 */
static void
check_expires_at(GrantReq *g, TimestampTz now)
{
	if (TIMESTAMP_NOT_FINITE(g->expires_at) ||
		(now != 0 && (g->expires_at <= now ||
					  g->expires_at > now + (int64) GRANT_MAX_YEARS * 366 * USECS_PER_DAY)))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("expires_at must lie in the future, at most %d years ahead",
						GRANT_MAX_YEARS),
				 TIMESTAMP_NOT_FINITE(g->expires_at) ?
				 errdetail("It is not finite.") :
				 errdetail("It is %s; now is %s.",
						   billing_format_ts(g->expires_at), billing_format_ts(now)),
				 errhint("Pass NULL for a grant that never expires.")));
}

/*
 * billing_grant(tenant_id, amount, trace_id, expires_at, priority, category,
 *				 description, metadata) -> billing.grant_result
 *
 * Credit `amount` into a new bucket: spent before the wallet, in burn order
 * among the grants; what is left of it at expires_at leaves the balance.
 * Debt under the credit limit is paid back first: the bucket gets the rest.
 */
Datum
billing_grant(PG_FUNCTION_ARGS)
{
	text	   *tenant_id = arg_id(fcinfo, 0, "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	GrantReq	g = {0};
	Account		acc;
	int64		grant_id;
	int64		repaid;
	int64		bucket;
	EntryWrite	e = {0};
	Draws		filled = {0};
	int64		entry_id;
	Datum		result;

	billing_check_not_null(fcinfo, 1, "amount");
	g.amount = billing_amount_to_micros(PG_GETARG_NUMERIC(1), "amount", false);
	g.trace_id = arg_id(fcinfo, 2, "trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	g.expires = !PG_ARGISNULL(3);
	if (g.expires)
	{
		g.expires_at = PG_GETARG_TIMESTAMPTZ(3);
		if (TIMESTAMP_NOT_FINITE(g.expires_at))
			check_expires_at(&g, 0);
	}
	billing_check_not_null(fcinfo, 4, "priority");
	g.priority = PG_GETARG_INT32(4);
	if (g.priority < 0 || g.priority > GRANT_MAX_PRIORITY)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("priority must be between 0 and %d", GRANT_MAX_PRIORITY),
				 errdetail("The value given was " INT64_FORMAT ".", g.priority),
				 errhint("Higher priorities are spent first; the wallet (top-ups) comes last.")));
	billing_check_not_null(fcinfo, 5, "category");
	g.category = text_to_cstring(PG_GETARG_TEXT_PP(5));
	if (strcmp(g.category, "promotional") != 0 && strcmp(g.category, "paid") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("invalid grant category %s", billing_show_text(g.category, 64)),
				 errdetail("Allowed categories: promotional, paid."),
				 errhint("Promotional credit is given away; paid credit was paid for.")));
	g.description = billing_check_description(fcinfo, 6);
	g.metadata = billing_check_metadata(fcinfo, 7);

	account_lock(&acc, tenant_id, billing_spi_connect());
	if (!acc.grants_supported)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("grants need extension billing 1.4 or later"),
				 errhint("Run ALTER EXTENSION billing UPDATE.")));

	/*
	 * billing's own trace ids ("billing:", a grant's expiry): ZB014 before
	 * the replay probe, which would take an expiry's entry for a request
	 * (no grant before 1.4, which refuses them, can have one)
	 */
	billing_check_own_trace(&acc, g.trace_id);
	/* a replay wins over today's rules (an expires_at that has passed since) */
	grant_id = grant_replay(&acc, &g);
	if (grant_id != 0)
	{
		result = grant_result(fcinfo, &acc, grant_id, true);
		SPI_finish();
		return result;
	}
	/* judged when the lock is ours: the grant's entry is written now */
	if (g.expires)
		check_expires_at(&g, acc.now);
	billing_check_not_rejected(&acc, g.trace_id, "grant");
	account_expire_due(&acc);
	if (strcmp(acc.status, "closed") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ACCOUNT_CLOSED),
				 errmsg("account \"%s\" is closed", acc.tenant),
				 errdetail("A closed account accepts no entries (this grant of %s was refused).",
						   billing_format_micros(g.amount)),
				 errhint("Closed is final: open a new account for this customer.")));

	/* debt under the credit limit (a wallet below zero) is paid back first */
	repaid = Min(g.amount, Max(0, -grants_wallet(&acc)));
	bucket = g.amount - repaid;

	/* only a grant that opens a bucket counts against the open ones */
	if (bucket > 0)
	{
		int			open = 0;

		for (int i = 0; i < acc.nbuckets; i++)
			if (acc.buckets[i].remaining > 0 || acc.buckets[i].reserved > 0)
				open++;
		if (open >= GRANTS_MAX_OPEN)
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_TOO_MANY_GRANTS),
					 errmsg("account \"%s\" has too many open grants", acc.tenant),
					 errdetail("It has %d open grants (something left or reserved by a hold); the limit is %d.",
							   open, GRANTS_MAX_OPEN),
					 errhint("Let some grants run out or expire, or top up the wallet with billing_credit().")));
	}
	grant_id = direct_nextval("grant_id_seq");
	if (bucket > 0)
		grants_add_bucket(&acc, grant_id, bucket, g.priority,
						  g.expires ? g.expires_at : DT_NOEND);
	draws_add(&filled, grant_id, bucket);

	acc.balance = billing_add_micros(acc.balance, g.amount, "account balance");
	acc.version++;
	e.kind = "grant";
	e.amount = g.amount;
	e.trace_id = g.trace_id;
	e.description = g.description;
	e.metadata = g.metadata;
	e.grant_id = grant_id;
	e.draws = &filled;			/* its bucket, and what went into it */
	entry_id = billing_post_entry(&acc, &e);
	if (entry_id == 0)
	{
		/* billing's own expiry, written by this very call first: ZB014 */
		billing_check_own_trace(&acc, e.trace_id);
		elog(ERROR, "billing: trace id of a grant taken concurrently");	/* probed under the lock */
	}

	{
		static SPIPlanPtr plan = NULL;
		static SPIPlanPtr plan_created = NULL;
		Oid			types[12] = {TEXTOID, INT8OID, INT8OID, TEXTOID, TEXTOID, INT4OID,
		INT8OID, INT8OID, TIMESTAMPTZOID, TEXTOID, JSONBOID, TIMESTAMPTZOID};
		Datum		values[12];
		char		nulls[12] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
		bool		isnull;

		/*
		 * The grant's time is its entry's.  Read first, not as a subquery
		 * of the INSERT: on Citus a delegated call may only run queries
		 * that Citus routes to the tenant's shard by a constant.
		 */
		billing_keep_plan(&plan_created,
						  "SELECT e.created_at FROM billing.entries e "
						  "WHERE e.tenant_id = $1 AND e.entry_id = $2",
						  2, (Oid[]) {TEXTOID, INT8OID});
		values[0] = PointerGetDatum(tenant_id);
		values[1] = Int64GetDatum(entry_id);
		billing_spi_exec(plan_created, values, NULL, SPI_OK_SELECT, "reading the grant's entry");
		if (SPI_processed != 1)
			elog(ERROR, "billing: the entry of grant " INT64_FORMAT " vanished", grant_id);
		values[11] = billing_col(0, 1, &isnull);
		billing_keep_plan(&plan,
						  "INSERT INTO billing.grants (tenant_id, grant_id, entry_id, trace_id, "
						  "  category, priority, granted_micros, amount_micros, expires_at, "
						  "  description, metadata, created_at) "
						  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
						  12, types);
		values[0] = PointerGetDatum(tenant_id);
		values[1] = Int64GetDatum(grant_id);
		values[2] = Int64GetDatum(entry_id);
		values[3] = PointerGetDatum(g.trace_id);
		values[4] = CStringGetTextDatum(g.category);
		values[5] = Int32GetDatum((int32) g.priority);
		values[6] = Int64GetDatum(g.amount);
		values[7] = Int64GetDatum(bucket);
		values[8] = TimestampTzGetDatum(g.expires_at);
		nulls[8] = g.expires ? ' ' : 'n';
		values[9] = PointerGetDatum(g.description);
		nulls[9] = g.description ? ' ' : 'n';
		values[10] = JsonbPGetDatum(g.metadata);
		billing_spi_exec(plan, values, nulls, SPI_OK_INSERT, "recording the grant");
	}
	result = grant_result(fcinfo, &acc, grant_id, false);
	SPI_finish();
	return result;
}

/* ---------------------------------------------------------------------
 * billing_refund
 * ---------------------------------------------------------------------
 */
typedef struct Charge
{
	int64		entry_id;
	char	   *kind;
	int64		charged;		/* positive */
	Draws		draws;			/* explicit buckets it drew from */
	TimestampTz created_at;
	text	   *api_key;
	int64		refunded;		/* by earlier refunds */
	Draws		restored;		/* per bucket, by earlier refunds */
} Charge;

/* the charge with this trace id and what was refunded of it, or ZB090/ZB092 */
static void
load_charge(Account *acc, text *charge_trace, Charge *c)
{
	static SPIPlanPtr plan = NULL;
	static SPIPlanPtr plan_refunds = NULL;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Oid			rtypes[2] = {TEXTOID, INT8OID};
	Datum		args[2];
	bool		isnull;
	Datum		d;
	int64		amount;

	memset(c, 0, sizeof(*c));
	billing_keep_plan(&plan,
					  "SELECT entry_id, kind, amount_micros, draws, created_at, api_key "
					  "FROM billing.entries WHERE tenant_id = $1 AND trace_id = $2",
					  2, types);
	args[0] = PointerGetDatum(acc->tenant_id);
	args[1] = PointerGetDatum(charge_trace);
	billing_spi_exec(plan, args, NULL, SPI_OK_SELECT, "reading the charge");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_CHARGE_NOT_FOUND),
				 errmsg("charge \"%s\" does not exist for account \"%s\"",
						text_to_cstring(charge_trace), acc->tenant),
				 errhint("Pass the trace id of the charge (billing_deduct, billing_capture) to refund.")));
	c->entry_id = billing_col_int64(0, 1, 0);
	c->kind = billing_col_cstring(0, 2, acc->cxt);
	amount = billing_col_int64(0, 3, 0);
	if (amount >= 0 || strcmp(c->kind, "expire") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_NOT_REFUNDABLE),
				 errmsg("entry \"%s\" of account \"%s\" is not a charge",
						text_to_cstring(charge_trace), acc->tenant),
				 errdetail("It is a %s of %s; only charges (deduct, capture, a debit adjustment) are refunded.",
						   c->kind, billing_format_micros(amount)),
				 errhint("Credit money with billing_credit() instead.")));
	c->charged = -amount;
	d = billing_col(0, 4, &isnull);
	if (!isnull)
		draws_from_datum(d, &c->draws);
	c->created_at = DatumGetTimestampTz(billing_col(0, 5, &isnull));
	d = billing_col(0, 6, &isnull);
	c->api_key = isnull ? NULL : DatumGetTextPCopy(d);

	billing_keep_plan(&plan_refunds,
					  "SELECT e.amount_micros, e.draws FROM billing.refunds r "
					  "JOIN billing.entries e ON e.tenant_id = r.tenant_id "
					  "  AND e.entry_id = r.refund_entry_id "
					  "WHERE r.tenant_id = $1 AND r.charge_entry_id = $2",
					  2, rtypes);
	args[1] = Int64GetDatum(c->entry_id);
	billing_spi_exec(plan_refunds, args, NULL, SPI_OK_SELECT, "reading earlier refunds");
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		c->refunded += billing_col_int64((int) r, 1, 0);
		d = billing_col((int) r, 2, &isnull);
		if (!isnull)
		{
			Draws		one;

			draws_from_datum(d, &one);
			for (int i = 0; i < one.n; i++)
				draws_add(&c->restored, one.grant_id[i], one.amount[i]);
		}
	}
}

/* billing.refund_result */
static Datum
refund_result(FunctionCallInfo fcinfo, Account *acc, text *charge_trace,
			  int64 refund_entry_id, bool replayed)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, INT8OID};
	Datum		args[2];
	TupleDesc	tupdesc;
	Datum		values[12];
	bool		nulls[12] = {0};
	bool		isnull;
	Charge		c;
	MemoryContext old;

	load_charge(acc, charge_trace, &c);
	billing_keep_plan(&plan,
					  "SELECT trace_id, amount_micros, balance_after_micros, version, created_at "
					  "FROM billing.entries WHERE tenant_id = $1 AND entry_id = $2",
					  2, types);
	args[0] = PointerGetDatum(acc->tenant_id);
	args[1] = Int64GetDatum(refund_entry_id);
	billing_spi_exec(plan, args, NULL, SPI_OK_SELECT, "reading the refund");
	if (SPI_processed != 1)
		elog(ERROR, "billing: refund entry " INT64_FORMAT " vanished", refund_entry_id);

	old = MemoryContextSwitchTo(acc->cxt);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	values[0] = Int64GetDatum(refund_entry_id);
	values[1] = PointerGetDatum(acc->tenant_id);
	values[2] = datumCopy(billing_col(0, 1, &isnull), false, -1);
	values[3] = PointerGetDatum(charge_trace);
	values[4] = Int64GetDatum(c.entry_id);
	values[5] = NumericGetDatum(billing_micros_to_numeric(billing_col_int64(0, 2, 0)));
	values[6] = NumericGetDatum(billing_micros_to_numeric(c.refunded));
	values[7] = NumericGetDatum(billing_micros_to_numeric(c.charged - c.refunded));
	values[8] = NumericGetDatum(billing_micros_to_numeric(billing_col_int64(0, 3, 0)));
	values[9] = Int64GetDatum(billing_col_int64(0, 4, 0));
	values[10] = billing_col(0, 5, &isnull);
	values[11] = BoolGetDatum(replayed);
	{
		Datum		result = HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));

		MemoryContextSwitchTo(old);
		return result;
	}
}

/*
 * A usage counter of a period the charge was made in: the refund gives its
 * amount back (never below zero), so quotas and caps count net spend.
 */
static int64
counter_less(int64 counter, int64 amount)
{
	return counter > amount ? counter - amount : 0;
}

/*
 * billing_refund(tenant_id, charge_trace_id, amount, trace_id, reason)
 *	-> billing.refund_result
 *
 * Give back (part of) a charge: never more than it charged minus earlier
 * refunds (ZB091).  The money goes back to the buckets it came from, the
 * wallet's share first, then the grants' in the reverse of the order they
 * were spent; a share of a grant that has expired since expires again on
 * the spot.  The spend counters of the periods the charge was made in
 * (account and API key) give it back too.
 */
Datum
billing_refund(PG_FUNCTION_ARGS)
{
	text	   *tenant_id = arg_id(fcinfo, 0, "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	text	   *charge_trace = arg_id(fcinfo, 1, "charge_trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	int64		amount;
	text	   *trace_id;
	text	   *reason = NULL;
	Account		acc;
	Charge		c;
	Draws		restore = {0};
	Draws		expired = {0};
	EntryWrite	e = {0};
	int64		entry_id;
	int64		left;
	int64		wallet_left;
	Datum		result;

	billing_check_not_null(fcinfo, 2, "amount");
	amount = billing_amount_to_micros(PG_GETARG_NUMERIC(2), "amount", false);
	trace_id = arg_id(fcinfo, 3, "trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	if (!PG_ARGISNULL(4))
		reason = billing_check_text_value(PG_GETARG_TEXT_PP(4), "reason",
										  BILLING_MAX_DESCRIPTION_CHARS);

	account_lock(&acc, tenant_id, billing_spi_connect());
	if (!acc.grants_supported)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("linked refunds need extension billing 1.4 or later"),
				 errhint("Run ALTER EXTENSION billing UPDATE.")));

	/* billing's own trace ids: ZB014, as for a grant (no linked refund before 1.4) */
	billing_check_own_trace(&acc, trace_id);
	/* a replay: the same refund of the same charge */
	{
		static SPIPlanPtr plan = NULL;
		Oid			types[2] = {TEXTOID, TEXTOID};
		Datum		args[2];
		bool		isnull;

		billing_keep_plan(&plan,
						  "SELECT e.entry_id, e.kind, e.amount_micros, e.description, c.trace_id "
						  "FROM billing.entries e LEFT JOIN billing.entries c "
						  "  ON c.tenant_id = e.tenant_id AND c.entry_id = e.refund_of "
						  "WHERE e.tenant_id = $1 AND e.trace_id = $2",
						  2, types);
		args[0] = PointerGetDatum(tenant_id);
		args[1] = PointerGetDatum(trace_id);
		billing_spi_exec(plan, args, NULL, SPI_OK_SELECT, "refund replay probe");
		if (SPI_processed > 0)
		{
			int64		was_id = billing_col_int64(0, 1, 0);
			char	   *was_kind = billing_col_cstring(0, 2, CurrentMemoryContext);
			int64		was_amount = billing_col_int64(0, 3, 0);
			char	   *was_reason = billing_col_cstring(0, 4, CurrentMemoryContext);
			char	   *was_charge = billing_col_cstring(0, 5, CurrentMemoryContext);
			char	   *mine = reason ? text_to_cstring(reason) : NULL;
			bool		other_charge;
			bool		other_amount;
			bool		other_reason;

			if (strcmp(was_kind, "refund") != 0 || was_charge == NULL)
				trace_conflict(trace_id, "kind",
							   psprintf("kind: original %s of %s, this request a refund of charge %s.",
										was_kind, billing_format_micros(was_amount),
										billing_show_text(text_to_cstring(charge_trace), 64)));
			other_charge = strcmp(was_charge, text_to_cstring(charge_trace)) != 0;
			other_amount = was_amount != amount;
			other_reason = (was_reason == NULL) != (mine == NULL) ||
				(mine && strcmp(was_reason, mine) != 0);
			if (other_charge || other_amount || other_reason)
			{
				StringInfoData fields;

				/* the message names what differs, as every other ZB005 */
				initStringInfo(&fields);
				if (other_charge)
					appendStringInfoString(&fields, "charge");
				if (other_amount)
					appendStringInfo(&fields, "%samount", fields.len > 0 ? ", " : "");
				if (other_reason)
					appendStringInfo(&fields, "%sreason", fields.len > 0 ? ", " : "");
				trace_conflict(trace_id, fields.data,
							   psprintf("Original: a refund of %s of charge %s, reason %s; "
										"this request: %s of charge %s, reason %s.",
										billing_format_micros(was_amount),
										billing_show_text(was_charge, 64),
										billing_describe_text(was_reason ? cstring_to_text(was_reason) : NULL),
										billing_format_micros(amount),
										billing_show_text(text_to_cstring(charge_trace), 64),
										billing_describe_text(reason)));
			}
			result = refund_result(fcinfo, &acc, charge_trace, was_id, true);
			SPI_finish();
			return result;
		}
		(void) isnull;
	}
	billing_check_not_rejected(&acc, trace_id, "refund");
	account_expire_due(&acc);
	if (strcmp(acc.status, "closed") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ACCOUNT_CLOSED),
				 errmsg("account \"%s\" is closed", acc.tenant),
				 errdetail("A closed account accepts no entries (this refund of %s was refused).",
						   billing_format_micros(amount)),
				 errhint("Closed is final: open a new account for this customer.")));

	load_charge(&acc, charge_trace, &c);
	if (amount > c.charged - c.refunded)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_REFUND_EXCEEDS),
				 errmsg("refund exceeds what is left of charge \"%s\"",
						text_to_cstring(charge_trace)),
				 errdetail("The charge was %s, refunded so far %s: at most %s can be refunded, this refund asks for %s.",
						   billing_format_micros(c.charged), billing_format_micros(c.refunded),
						   billing_format_micros(c.charged - c.refunded),
						   billing_format_micros(amount)),
				 errhint("Refund at most what is left; a charge is never refunded twice.")));

	/*
	 * Where the money goes back: the wallet's share first (what the charge
	 * took beyond its grants, less what earlier refunds gave the wallet),
	 * then the grants', the one spent last first.
	 */
	{
		int64		drawn = 0;
		int64		restored = 0;

		for (int i = 0; i < c.draws.n; i++)
			drawn += c.draws.amount[i];
		for (int i = 0; i < c.restored.n; i++)
			restored += c.restored.amount[i];
		wallet_left = (c.charged - drawn) - (c.refunded - restored);
		left = amount - Min(amount, Max(wallet_left, 0));
		for (int i = c.draws.n - 1; i >= 0 && left > 0; i--)
		{
			int64		back = c.draws.amount[i];
			int64		take;

			for (int k = 0; k < c.restored.n; k++)
				if (c.restored.grant_id[k] == c.draws.grant_id[i])
					back -= c.restored.amount[k];
			take = Min(left, back);
			if (take > 0)
			{
				draws_add(&restore, c.draws.grant_id[i], take);
				left -= take;
			}
		}
		if (left != 0)
			elog(ERROR, "billing: refund of charge " INT64_FORMAT " cannot be placed (" INT64_FORMAT " left)",
				 c.entry_id, left);
	}
	grants_give_back(&acc, &restore, false, acc.now, &expired);

	/* the spend counters of the periods the charge was made in */
	{
		DateADT		day = billing_local_date(acc.timezone, c.created_at);

		if (day == acc.today)
			acc.day_spend = counter_less(acc.day_spend, amount);
		if (billing_month_start(day) == acc.this_month)
			acc.month_spend = counter_less(acc.month_spend, amount);
		if (c.api_key)
		{
			ApiKey		key;

			account_key_lock(&acc, &key, c.api_key);
			if (key.period != NULL &&
				(strcmp(key.period, "lifetime") == 0 ||
				 (strcmp(key.period, "day") == 0 && day == acc.today) ||
				 (strcmp(key.period, "month") == 0 && billing_month_start(day) == acc.this_month)))
			{
				key.period_spend = counter_less(key.period_spend, amount);
				account_key_save(&acc, &key);
			}
			acc.key = NULL;		/* key goes out of scope here */
		}
	}

	acc.balance = billing_add_micros(acc.balance, amount, "account balance");
	acc.version++;
	e.kind = "refund";
	e.amount = amount;
	e.trace_id = trace_id;
	e.description = reason;
	e.metadata = empty_object();
	e.draws = &restore;
	e.refund_of = c.entry_id;
	e.api_key = c.api_key;
	entry_id = billing_post_entry(&acc, &e);
	if (entry_id == 0)
	{
		/* billing's own expiry, written by this very call first: ZB014 */
		billing_check_own_trace(&acc, e.trace_id);
		elog(ERROR, "billing: trace id of a refund taken concurrently");	/* probed under the lock */
	}
	{
		static SPIPlanPtr plan = NULL;
		Oid			types[5] = {TEXTOID, INT8OID, INT8OID, INT8OID, TIMESTAMPTZOID};
		Datum		values[5];

		/* the refund's time is its entry's (not the transaction's start) */
		billing_keep_plan(&plan,
						  "INSERT INTO billing.refunds (tenant_id, charge_entry_id, refund_entry_id, "
						  "  amount_micros, created_at) VALUES ($1, $2, $3, $4, $5)",
						  5, types);
		values[0] = PointerGetDatum(tenant_id);
		values[1] = Int64GetDatum(c.entry_id);
		values[2] = Int64GetDatum(entry_id);
		values[3] = Int64GetDatum(amount);
		values[4] = TimestampTzGetDatum(acc.now);
		billing_spi_exec(plan, values, NULL, SPI_OK_INSERT, "recording the refund");
	}
	/* a share of a grant that expired since: it expires again, now */
	grants_write_expiries(&acc, &expired, acc.now, "grant expired (a refunded share)");

	result = refund_result(fcinfo, &acc, charge_trace, entry_id, false);
	SPI_finish();
	return result;
}

/*
 * billing.grants_expired(grants_state bigint[], at timestamptz) -> bigint:
 * what an account's open grants still hold that had expired by `at` (their
 * 'expire' entries not written yet).
 */
Datum
billing_grants_expired(PG_FUNCTION_ARGS)
{
	Account		acc;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_INT64(0);
	memset(&acc, 0, sizeof(acc));
	acc.cxt = CurrentMemoryContext;
	acc.tenant = "?";
	grants_load(&acc, PG_GETARG_DATUM(0), false);
	PG_RETURN_INT64(grants_expired_micros(&acc, PG_GETARG_TIMESTAMPTZ(1)));
}

/*
 * billing.shares_expired(grants_state bigint[], grant_draws bigint[],
 *						  hold_expires_at timestamptz, at timestamptz) -> bigint:
 * of what a hold reserved of an account's grants, what has expired by `at`:
 * the hold has expired (its shares came back) and so has the grant.
 */
Datum
billing_shares_expired(PG_FUNCTION_ARGS)
{
	Bucket	   *buckets;
	int			nbuckets;
	Draws		shares;
	Account		acc;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		PG_RETURN_INT64(0);
	memset(&acc, 0, sizeof(acc));
	acc.cxt = CurrentMemoryContext;
	acc.tenant = "?";
	grants_load(&acc, PG_GETARG_DATUM(0), false);
	buckets = acc.buckets;
	nbuckets = acc.nbuckets;
	draws_from_datum(PG_GETARG_DATUM(1), &shares);
	PG_RETURN_INT64(grants_shares_expired(buckets, nbuckets, &shares,
										  PG_GETARG_TIMESTAMPTZ(2), PG_GETARG_TIMESTAMPTZ(3)));
}
