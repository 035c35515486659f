/*-------------------------------------------------------------------------
 *
 * holds.c
 *	  Two-phase charges: billing_hold, billing_capture, billing_release,
 *	  billing_hold_extend.
 *
 * A hold reserves funds: it lowers available (balance + credit_limit -
 * open holds) but not the balance.  Captures charge against it (several
 * partial captures are allowed), each one a ledger entry of kind 'capture'
 * that references the hold; a release frees what is left.  Every operation
 * is journalled in billing.hold_events (append-only) and is idempotent by
 * its own trace id.
 *
 * Capturing more than remains on the hold: the excess is charged only if
 * available funds (and the spending caps) cover it, otherwise the capture
 * fails with ZB033 and nothing changes.  Such a capture settles the hold.
 *
 * Expiry: a hold stops counting at its expires_at whether or not anything
 * runs (see account_expire_holds); an expired hold cannot be captured.
 *
 * All of it runs under the account row lock, like every other write for
 * the tenant, so capture, release and expiry of one hold never race.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "account.h"
#include "direct.h"
#include "ledger.h"
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(billing_hold);
PG_FUNCTION_INFO_V1(billing_capture);
PG_FUNCTION_INFO_V1(billing_release);
PG_FUNCTION_INFO_V1(billing_hold_extend);
PG_FUNCTION_INFO_V1(billing_hold_keep);

/* longest a hold may live (and be extended by), in days */
#define MAX_HOLD_DAYS	31

typedef struct Hold
{
	int64		hold_id;
	text	   *trace_id;
	int64		amount;
	int64		captured;
	int64		released;
	char	   *status;			/* open, captured, released, expired */
	TimestampTz expires_at;
	text	   *api_key;		/* may be NULL */
	Draws		shares;			/* reserved of grant buckets, not yet captured */
	ItemPointerData tid;		/* the row version read (save_hold updates it) */
} Hold;

/*
 * The hold and its journal are read and written by direct heap and index
 * access (direct.h), as a charge's account and entry are: under the account
 * lock, which every writer of a tenant's holds takes first, a probe is
 * exact and a row read stays as it was read.  Only the replay paths (a
 * request sent again) still ask SQL for what they compare.
 */
typedef enum HoldCol
{
	HC_TENANT_ID, HC_HOLD_ID, HC_TRACE_ID, HC_AMOUNT, HC_CAPTURED, HC_RELEASED,
	HC_STATUS, HC_EXPIRES_AT, HC_API_KEY, HC_DESCRIPTION, HC_METADATA,
	HC_CREATED_AT, HC_UPDATED_AT,
	/* 1.4, optional: */
	HC_GRANT_DRAWS,
	HC_NCOLS
} HoldCol;

static const char *const hold_cols[HC_NCOLS] = {
	"tenant_id", "hold_id", "trace_id", "amount_micros", "captured_micros",
	"released_micros", "status", "expires_at", "api_key", "description",
	"metadata", "created_at", "updated_at", "grant_draws"
};

static const Oid hold_types[HC_NCOLS] = {
	TEXTOID, INT8OID, TEXTOID, INT8OID, INT8OID,
	INT8OID, TEXTOID, TIMESTAMPTZOID, TEXTOID, TEXTOID,
	JSONBOID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT8ARRAYOID
};

static DirectTable holds_table = {
	"holds", "holds_trace_key", HC_NCOLS, hold_cols, hold_types, true, 1, true
};

typedef enum JournalCol
{
	JC_TENANT_ID, JC_EVENT_ID, JC_HOLD_ID, JC_TRACE_ID, JC_ACTION, JC_AMOUNT,
	JC_ENTRY_ID, JC_EXPIRES_AT, JC_FINAL, JC_CREATED_AT,
	JC_NCOLS
} JournalCol;

static const char *const journal_cols[JC_NCOLS] = {
	"tenant_id", "event_id", "hold_id", "trace_id", "action", "amount_micros",
	"entry_id", "expires_at", "final", "created_at"
};

static const Oid journal_types[JC_NCOLS] = {
	TEXTOID, INT8OID, INT8OID, TEXTOID, TEXTOID, INT8OID,
	INT8OID, TIMESTAMPTZOID, BOOLOID, TIMESTAMPTZOID
};

static DirectTable journal_table = {
	"hold_events", "hold_events_trace_key", JC_NCOLS, journal_cols, journal_types,
	true, 0, true
};

static SPIPlanPtr plan_probe_entry = NULL;

static int64
hold_remaining(Hold *h)
{
	return strcmp(h->status, "open") == 0 ? h->amount - h->captured - h->released : 0;
}

/* expires_in -> microseconds, within (0, 31 days] */
static int64
check_expires_in(FunctionCallInfo fcinfo, int argno)
{
	Interval   *iv;
	int64		usecs;

	billing_check_not_null(fcinfo, argno, "expires_in");
	iv = PG_GETARG_INTERVAL_P(argno);
	/* days and time may have opposite signs ('1 day -1 second'): add them */
	if (iv->month != 0 ||
		iv->day < -MAX_HOLD_DAYS || iv->day > MAX_HOLD_DAYS ||
		iv->time < -MAX_HOLD_DAYS * USECS_PER_DAY || iv->time > 2 * MAX_HOLD_DAYS * USECS_PER_DAY ||
		(usecs = iv->day * USECS_PER_DAY + iv->time) <= 0 ||
		usecs > MAX_HOLD_DAYS * USECS_PER_DAY)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("expires_in must be positive and at most %d days",
						MAX_HOLD_DAYS),
				 errdetail("The value given was %s.",
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(iv)))),
				 errhint("Pass e.g. interval '15 minutes'; extend a long-running hold with billing_hold_extend().")));
	return usecs;
}

static text *
get_id(FunctionCallInfo fcinfo, int argno, const char *argname, int sqlerrcode)
{
	billing_check_not_null(fcinfo, argno, argname);
	return billing_check_id(PG_GETARG_TEXT_PP(argno), argname, sqlerrcode);
}

/*
 * Probe the hold journal for a trace id.  Returns false when unused; when
 * used by another kind of hold operation (or another hold), raises ZB005.
 * On a match, *hold_id and *entry_id (captures) are set.
 */
static bool
probe_event(Account *acc, text *trace_id, const char *action,
			text *hold_trace, int64 amount, int64 *hold_id, int64 *entry_id)
{
	Datum		jv[JC_NCOLS];
	bool		jn[JC_NCOLS];
	Datum		hv[HC_NCOLS];
	bool		hn[HC_NCOLS];
	char	   *was_action;
	char	   *was_hold;
	int64		was_amount;

	if (!direct_fetch(&journal_table, journal_table.key_index,
					  PointerGetDatum(acc->tenant_id), PointerGetDatum(trace_id),
					  jv, jn, NULL))
		return false;
	was_action = TextDatumGetCString(jv[JC_ACTION]);
	was_amount = DatumGetInt64(jv[JC_AMOUNT]);
	*hold_id = DatumGetInt64(jv[JC_HOLD_ID]);
	*entry_id = jn[JC_ENTRY_ID] ? 0 : DatumGetInt64(jv[JC_ENTRY_ID]);
	/* the hold's own trace id */
	if (!direct_fetch(&holds_table, "holds_pkey", PointerGetDatum(acc->tenant_id),
					  Int64GetDatum(*hold_id), hv, hn, NULL))
		elog(ERROR, "billing: hold " INT64_FORMAT " of the journal vanished", *hold_id);
	was_hold = TextDatumGetCString(hv[HC_TRACE_ID]);

	if (strcmp(was_action, action) != 0 ||
		(hold_trace != NULL && strcmp(was_hold, text_to_cstring(hold_trace)) != 0) ||
		(amount >= 0 && was_amount != amount))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_TRACE_CONFLICT),
				 errmsg("trace id \"%s\" was already used for a different hold operation",
						text_to_cstring(trace_id)),
				 errdetail("Original: %s of %s on hold \"%s\"; this request: %s%s%s on hold \"%s\".",
						   was_action, billing_format_micros(was_amount), was_hold,
						   action, amount >= 0 ? " of " : "",
						   amount >= 0 ? billing_format_micros(amount) : "",
						   hold_trace ? text_to_cstring(hold_trace) : was_hold),
				 errhint("Resend the original request unchanged to get its result, "
						 "or use a new trace id for a new request.")));
	return true;
}

/* a capture's trace id is taken by another ledger entry (e.g. a deduct) */
static void
entry_conflict(Account *acc, text *trace_id)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];

	/* billing's own expiry, written by this very call first: ZB014 */
	billing_check_own_trace(acc, trace_id);
	billing_keep_plan(&plan_probe_entry,
					  "SELECT kind FROM billing.entries WHERE tenant_id = $1 AND trace_id = $2",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(trace_id);
	billing_spi_exec(plan_probe_entry, values, NULL, SPI_OK_SELECT, "entry probe");
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_TRACE_CONFLICT),
			 errmsg("trace id \"%s\" was already used with a different kind",
					text_to_cstring(trace_id)),
			 errdetail("kind: original %s, this request capture.",
					   SPI_processed > 0 ? billing_col_cstring(0, 1, CurrentMemoryContext) : "unknown"),
			 errhint("Use a new trace id for the capture.")));
}

/*
 * Read a hold by (tenant_id, trace id) or (tenant_id, hold_id) into *h,
 * its strings in the account's context.  False when there is none.
 */
static bool
read_hold(Account *acc, const char *index, Datum k2, Hold *h)
{
	Datum		v[HC_NCOLS];
	bool		n[HC_NCOLS];
	MemoryContext old;

	/* read in the call's (SPI) memory; keep only what the hold needs */
	if (!direct_fetch(&holds_table, index, PointerGetDatum(acc->tenant_id),
					  k2, v, n, &h->tid))
		return false;
	old = MemoryContextSwitchTo(acc->cxt);
	h->hold_id = DatumGetInt64(v[HC_HOLD_ID]);
	h->trace_id = DatumGetTextPCopy(v[HC_TRACE_ID]);
	h->amount = DatumGetInt64(v[HC_AMOUNT]);
	h->captured = DatumGetInt64(v[HC_CAPTURED]);
	h->released = DatumGetInt64(v[HC_RELEASED]);
	h->status = TextDatumGetCString(v[HC_STATUS]);
	h->expires_at = DatumGetTimestampTz(v[HC_EXPIRES_AT]);
	h->api_key = n[HC_API_KEY] ? NULL : DatumGetTextPCopy(v[HC_API_KEY]);
	memset(&h->shares, 0, sizeof(h->shares));
	if (!n[HC_GRANT_DRAWS])
		draws_from_datum(v[HC_GRANT_DRAWS], &h->shares);
	MemoryContextSwitchTo(old);
	return true;
}

/* the hold named by its trace id, or ZB030 */
static void
load_hold(Account *acc, text *hold_trace, Hold *h)
{
	if (!read_hold(acc, holds_table.key_index, PointerGetDatum(hold_trace), h))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_HOLD_NOT_FOUND),
				 errmsg("hold \"%s\" does not exist for account \"%s\"",
						text_to_cstring(hold_trace), acc->tenant),
				 errhint("Pass the trace id that billing_hold() was called with.")));
}

static void
load_hold_by_id(Account *acc, int64 hold_id, Hold *h)
{
	if (!read_hold(acc, "holds_pkey", Int64GetDatum(hold_id), h))
		elog(ERROR, "billing: hold " INT64_FORMAT " vanished", hold_id);
}

/* a hold that is no longer open: ZB031 when expired, ZB032 when settled */
static void
raise_not_open(Account *acc, Hold *h, const char *what)
{
	if (strcmp(h->status, "expired") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_HOLD_EXPIRED),
				 errmsg("hold \"%s\" has expired", text_to_cstring(h->trace_id)),
				 errdetail("It expired at %s; %s of %s had been captured.",
						   billing_format_ts(h->expires_at),
						   billing_format_micros(h->captured),
						   billing_format_micros(h->amount)),
				 errhint("An expired hold cannot be %s: charge with billing_deduct(), "
						 "or keep holds alive with billing_hold_extend().", what)));
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_HOLD_SETTLED),
			 errmsg("hold \"%s\" is already %s", text_to_cstring(h->trace_id), h->status),
			 errdetail("Amount %s, captured %s, released %s.",
					   billing_format_micros(h->amount),
					   billing_format_micros(h->captured),
					   billing_format_micros(h->released)),
			 errhint("A settled hold cannot be %s; create a new hold.", what)));
}

/* write the hold's changed columns (its row as read by load_hold) */
static void
save_hold(Account *acc, Hold *h)
{
	Datum		values[HC_NCOLS];
	bool		nulls[HC_NCOLS] = {0};
	bool		set[HC_NCOLS] = {0};

	values[HC_CAPTURED] = Int64GetDatum(h->captured);
	values[HC_RELEASED] = Int64GetDatum(h->released);
	values[HC_STATUS] = CStringGetTextDatum(h->status);
	values[HC_EXPIRES_AT] = TimestampTzGetDatum(h->expires_at);
	values[HC_UPDATED_AT] = TimestampTzGetDatum(acc->now);
	nulls[HC_GRANT_DRAWS] = h->shares.n == 0;
	values[HC_GRANT_DRAWS] = h->shares.n == 0 ? (Datum) 0 : draws_datum(&h->shares);
	set[HC_CAPTURED] = set[HC_RELEASED] = set[HC_STATUS] = true;
	set[HC_EXPIRES_AT] = set[HC_UPDATED_AT] = true;
	/* a database still at 1.3 has no grant_draws (direct_write skips it) */
	set[HC_GRANT_DRAWS] = true;
	direct_write(PointerGetDatum(acc->tenant_id), NULL, NULL, NULL,
				 &holds_table, &h->tid, values, nulls, set);
}

/*
 * A hold is settled now (captured in full, released): what it had reserved
 * of grant buckets and did not capture goes back to them; a share of a
 * bucket that has expired meanwhile expires now (after the caller's own
 * entry, if any).  (A hold's own expiry: account_expire_holds.)
 */
static void
give_back_shares(Account *acc, Hold *h, Draws *expired)
{
	if (h->shares.n == 0)
		return;
	grants_give_back(acc, &h->shares, true, acc->now, expired);
	memset(&h->shares, 0, sizeof(h->shares));
}

/*
 * Take up to `amount` of the hold's shares, in the order they were taken:
 * a capture spends what the hold reserved of those buckets.
 */
static void
consume_shares(Account *acc, Hold *h, int64 amount, Draws *out)
{
	for (int i = 0; i < h->shares.n && amount > 0; i++)
	{
		int64		take = Min(amount, h->shares.amount[i]);

		if (take <= 0)
			continue;
		draws_add(out, h->shares.grant_id[i], take);
		grants_unreserve(acc, h->shares.grant_id[i], take);
		h->shares.amount[i] -= take;
		amount -= take;
	}
	/* drop what is used up */
	{
		int			kept = 0;

		for (int i = 0; i < h->shares.n; i++)
			if (h->shares.amount[i] > 0)
			{
				h->shares.grant_id[kept] = h->shares.grant_id[i];
				h->shares.amount[kept] = h->shares.amount[i];
				kept++;
			}
		h->shares.n = kept;
	}
}

static void
journal(Account *acc, Hold *h, text *trace_id, const char *action,
		int64 amount, int64 entry_id, bool final)
{
	Datum		values[JC_NCOLS];
	bool		nulls[JC_NCOLS] = {0};

	/*
	 * Under the account lock the probe before (probe_event, a fresh
	 * snapshot) was exact in READ COMMITTED: every billing writer of this
	 * tenant's journal holds the lock, so this second probe is needed only
	 * under a transaction snapshot, where an operation committed since
	 * that snapshot may have taken the trace id (as record_rejection() in
	 * ledger.c: REPEATABLE READ and up only).  A row inserted by hand is
	 * still refused by the unique index.
	 */
	if (trace_id != NULL && IsolationUsesXactSnapshot() &&
		direct_key_exists(&journal_table, PointerGetDatum(acc->tenant_id),
						  PointerGetDatum(trace_id)))
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to a concurrent hold operation with trace id \"%s\"",
						text_to_cstring(trace_id)),
				 errhint("Retry the transaction; the retry returns the recorded outcome.")));
	values[JC_TENANT_ID] = PointerGetDatum(acc->tenant_id);
	values[JC_EVENT_ID] = Int64GetDatum(direct_nextval("hold_event_id_seq"));
	values[JC_HOLD_ID] = Int64GetDatum(h->hold_id);
	values[JC_TRACE_ID] = PointerGetDatum(trace_id);
	nulls[JC_TRACE_ID] = trace_id == NULL;
	values[JC_ACTION] = CStringGetTextDatum(action);
	values[JC_AMOUNT] = Int64GetDatum(amount);
	values[JC_ENTRY_ID] = Int64GetDatum(entry_id);
	nulls[JC_ENTRY_ID] = entry_id == 0;
	values[JC_EXPIRES_AT] = TimestampTzGetDatum(h->expires_at);
	values[JC_FINAL] = BoolGetDatum(final);
	values[JC_CREATED_AT] = TimestampTzGetDatum(acc->now);
	direct_write(PointerGetDatum(acc->tenant_id), &journal_table, values, nulls,
				 NULL, NULL, NULL, NULL, NULL);
}

/* ZB005 for a replayed trace id whose request differs in `fields` */
static void
replay_conflict(text *trace_id, StringInfo fields, StringInfo detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_TRACE_CONFLICT),
			 errmsg("trace id \"%s\" was already used with a different %s",
					text_to_cstring(trace_id), fields->data),
			 errdetail("%s.", detail->data),
			 errhint("Resend the original request unchanged to get its result, "
					 "or use a new trace id for a new request.")));
}

static const char *
show_text_or_null(text *t)
{
	return t ? quote_literal_cstr(text_to_cstring(t)) : "null";
}

#define NOTE_DIFF(name, orig, mine) \
	do { \
		appendStringInfo(&fields, "%s%s", fields.len ? ", " : "", name); \
		appendStringInfo(&detail, "%s%s: original %s, this request %s", \
						 detail.len ? "; " : "", name, orig, mine); \
	} while (0)

/* a replayed hold must be the same request: api key, description, metadata */
static void
check_hold_replay(Account *acc, int64 hold_id, text *api_key, text *description,
				  Jsonb *metadata)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, INT8OID};
	Datum		values[2];
	bool		isnull;
	Datum		d;
	text	   *was_key;
	text	   *was_desc;
	Jsonb	   *was_meta;
	StringInfoData fields;
	StringInfoData detail;

	billing_keep_plan(&plan,
					  "SELECT trace_id, api_key, description, metadata FROM billing.holds "
					  "WHERE tenant_id = $1 AND hold_id = $2",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = Int64GetDatum(hold_id);
	billing_spi_exec(plan, values, NULL, SPI_OK_SELECT, "reading the hold");
	d = billing_col(0, 2, &isnull);
	was_key = isnull ? NULL : DatumGetTextPP(d);
	d = billing_col(0, 3, &isnull);
	was_desc = isnull ? NULL : DatumGetTextPP(d);
	was_meta = DatumGetJsonbP(billing_col(0, 4, &isnull));

	initStringInfo(&fields);
	initStringInfo(&detail);
	if ((was_key == NULL) != (api_key == NULL) ||
		(api_key && strcmp(text_to_cstring(was_key), text_to_cstring(api_key)) != 0))
		NOTE_DIFF("api_key", show_text_or_null(was_key), show_text_or_null(api_key));
	if ((was_desc == NULL) != (description == NULL) ||
		(description && strcmp(text_to_cstring(was_desc), text_to_cstring(description)) != 0))
		NOTE_DIFF("description", billing_describe_text(was_desc), billing_describe_text(description));
	if (compareJsonbContainers(&was_meta->root, &metadata->root) != 0)
		NOTE_DIFF("metadata", billing_describe_jsonb(was_meta), billing_describe_jsonb(metadata));
	if (fields.len > 0)
		replay_conflict(DatumGetTextPP(billing_col(0, 1, &isnull)), &fields, &detail);
}

/* a replayed capture must be the same request: final, description, metadata, event_at */
static void
check_capture_replay(Account *acc, int64 hold_id, int64 entry_id, bool final,
					 EntryWrite *e)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {TEXTOID, INT8OID, INT8OID};
	Datum		values[3];
	bool		isnull;
	Datum		d;
	bool		was_final;
	text	   *was_desc;
	Jsonb	   *was_meta;
	bool		had_event_at;
	TimestampTz was_event_at = 0;
	StringInfoData fields;
	StringInfoData detail;

	billing_keep_plan(&plan,
					  "SELECT e.trace_id, coalesce(j.final, false), e.description, e.metadata, e.event_at "
					  "FROM billing.entries e JOIN billing.hold_events j "
					  "  ON j.tenant_id = e.tenant_id AND j.entry_id = e.entry_id "
					  "WHERE e.tenant_id = $1 AND e.entry_id = $2 AND j.hold_id = $3",
					  3, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = Int64GetDatum(entry_id);
	values[2] = Int64GetDatum(hold_id);
	billing_spi_exec(plan, values, NULL, SPI_OK_SELECT, "reading the capture");
	if (SPI_processed == 0)
		elog(ERROR, "billing: capture entry " INT64_FORMAT " vanished", entry_id);
	was_final = DatumGetBool(billing_col(0, 2, &isnull));
	d = billing_col(0, 3, &isnull);
	was_desc = isnull ? NULL : DatumGetTextPP(d);
	was_meta = DatumGetJsonbP(billing_col(0, 4, &isnull));
	d = billing_col(0, 5, &isnull);
	had_event_at = !isnull;
	if (had_event_at)
		was_event_at = DatumGetTimestampTz(d);

	initStringInfo(&fields);
	initStringInfo(&detail);
	if (was_final != final)
		NOTE_DIFF("final", was_final ? "true" : "false", final ? "true" : "false");
	if ((was_desc == NULL) != (e->description == NULL) ||
		(e->description && strcmp(text_to_cstring(was_desc), text_to_cstring(e->description)) != 0))
		NOTE_DIFF("description", billing_describe_text(was_desc), billing_describe_text(e->description));
	if (compareJsonbContainers(&was_meta->root, &e->metadata->root) != 0)
		NOTE_DIFF("metadata", billing_describe_jsonb(was_meta), billing_describe_jsonb(e->metadata));
	if (had_event_at != e->has_event_at || (had_event_at && was_event_at != e->event_at))
		NOTE_DIFF("event_at", had_event_at ? billing_format_ts(was_event_at) : "null",
				  e->has_event_at ? billing_format_ts(e->event_at) : "null");
	if (fields.len > 0)
		replay_conflict(DatumGetTextPP(billing_col(0, 1, &isnull)), &fields, &detail);
}
#undef NOTE_DIFF

/* billing.hold_result */
static Datum
hold_result(FunctionCallInfo fcinfo, Account *acc, Hold *h, bool replayed)
{
	TupleDesc	tupdesc;
	Datum		values[11];
	bool		nulls[11] = {0};

	MemoryContext old = MemoryContextSwitchTo(acc->cxt);	/* outlives SPI_finish */
	Datum		result;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	values[0] = Int64GetDatum(h->hold_id);
	values[1] = PointerGetDatum(acc->tenant_id);
	values[2] = PointerGetDatum(h->trace_id);
	values[3] = CStringGetTextDatum(h->status);
	values[4] = NumericGetDatum(billing_micros_to_numeric(h->amount));
	values[5] = NumericGetDatum(billing_micros_to_numeric(h->captured));
	values[6] = NumericGetDatum(billing_micros_to_numeric(h->released));
	values[7] = NumericGetDatum(billing_micros_to_numeric(hold_remaining(h)));
	values[8] = TimestampTzGetDatum(h->expires_at);
	values[9] = NumericGetDatum(account_available(acc));
	values[10] = BoolGetDatum(replayed);
	result = HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));
	MemoryContextSwitchTo(old);
	return result;
}

/*
 * billing_hold(tenant_id, amount, trace_id, expires_in, description,
 *				metadata, api_key) -> billing.hold_result
 */
Datum
billing_hold(PG_FUNCTION_ARGS)
{
	text	   *tenant_id = get_id(fcinfo, 0, "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	int64		amount;
	text	   *trace_id;
	int64		expires_in;
	text	   *description;
	Jsonb	   *metadata;
	text	   *api_key = NULL;
	Account		acc;
	ApiKey		key;
	Hold		h;
	Debit		debit = {0};
	Rejection	rej;
	int64		hold_id;
	int64		entry_id;
	Datum		result;

	billing_check_not_null(fcinfo, 1, "amount");
	amount = billing_amount_to_micros(PG_GETARG_NUMERIC(1), "amount", false);
	trace_id = get_id(fcinfo, 2, "trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	expires_in = check_expires_in(fcinfo, 3);
	description = billing_check_description(fcinfo, 4);
	metadata = billing_check_metadata(fcinfo, 5);
	if (!PG_ARGISNULL(6))
		api_key = billing_check_id(PG_GETARG_TEXT_PP(6), "api_key",
								   ERRCODE_BILLING_INVALID_ARGUMENT);

	account_lock(&acc, tenant_id, billing_spi_connect());

	if (probe_event(&acc, trace_id, "hold", trace_id, amount, &hold_id, &entry_id))
	{
		check_hold_replay(&acc, hold_id, api_key, description, metadata);
		account_expire_due(&acc);
		account_finish(&acc);
		load_hold_by_id(&acc, hold_id, &h);
		result = hold_result(fcinfo, &acc, &h, true);
		SPI_finish();
		return result;
	}

	account_expire_due(&acc);
	account_key_lock(&acc, &key, api_key);
	memset(&h, 0, sizeof(h));
	debit.reserve = amount;
	debit.counts_request = true;
	debit.funds_errcode = ERRCODE_BILLING_INSUFFICIENT_FUNDS;
	debit.draws = &h.shares;	/* the hold takes its share of the buckets now */
	if (!account_check_debit(&acc, &key, &debit, &rej))
		billing_raise_rejection(&rej);
	account_apply_debit(&acc, &key, &debit);

	h.trace_id = trace_id;
	h.amount = amount;
	h.status = "open";
	h.expires_at = acc.now + expires_in;
	h.api_key = api_key;
	{
		Datum		values[HC_NCOLS];
		bool		nulls[HC_NCOLS] = {0};

		h.hold_id = direct_nextval("hold_id_seq");
		values[HC_TENANT_ID] = PointerGetDatum(tenant_id);
		values[HC_HOLD_ID] = Int64GetDatum(h.hold_id);
		values[HC_TRACE_ID] = PointerGetDatum(trace_id);
		values[HC_AMOUNT] = Int64GetDatum(amount);
		values[HC_CAPTURED] = Int64GetDatum(0);
		values[HC_RELEASED] = Int64GetDatum(0);
		values[HC_STATUS] = CStringGetTextDatum(h.status);
		values[HC_EXPIRES_AT] = TimestampTzGetDatum(h.expires_at);
		values[HC_API_KEY] = PointerGetDatum(api_key);
		nulls[HC_API_KEY] = api_key == NULL;
		values[HC_DESCRIPTION] = PointerGetDatum(description);
		nulls[HC_DESCRIPTION] = description == NULL;
		values[HC_METADATA] = JsonbPGetDatum(metadata);
		values[HC_CREATED_AT] = TimestampTzGetDatum(acc.now);
		values[HC_UPDATED_AT] = TimestampTzGetDatum(acc.now);
		nulls[HC_GRANT_DRAWS] = h.shares.n == 0;
		values[HC_GRANT_DRAWS] = h.shares.n == 0 ? (Datum) 0 : draws_datum(&h.shares);
		direct_write(PointerGetDatum(tenant_id), &holds_table, values, nulls,
					 NULL, NULL, NULL, NULL, NULL);
	}
	journal(&acc, &h, trace_id, "hold", amount, 0, false);

	if (!acc.has_next_expiry || h.expires_at < acc.next_expiry)
	{
		acc.has_next_expiry = true;
		acc.next_expiry = h.expires_at;
	}
	acc.version++;
	account_save(&acc, false);
	account_key_save(&acc, &key);
	result = hold_result(fcinfo, &acc, &h, false);
	SPI_finish();
	return result;
}

/*
 * billing_capture(tenant_id, hold_trace_id, amount, trace_id, final,
 *				   description, metadata, event_at) -> billing.capture_result
 */
Datum
billing_capture(PG_FUNCTION_ARGS)
{
	text	   *tenant_id = get_id(fcinfo, 0, "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	text	   *hold_trace = get_id(fcinfo, 1, "hold_trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	int64		amount;
	text	   *trace_id;
	bool		final;
	EntryWrite	e = {0};
	Account		acc;
	ApiKey		key;
	Hold		h;
	Debit		debit = {0};
	Rejection	rej;
	int64		hold_id;
	int64		entry_id;
	int64		remaining;
	int64		take;
	int64		rest = 0;
	bool		replayed = false;
	Draws		draws = {0};
	Draws		expired = {0};
	TupleDesc	tupdesc;
	Datum		values[11];
	bool		nulls[11] = {0};

	billing_check_not_null(fcinfo, 2, "amount");
	amount = billing_amount_to_micros(PG_GETARG_NUMERIC(2), "amount", false);
	trace_id = get_id(fcinfo, 3, "trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	billing_check_not_null(fcinfo, 4, "final");
	final = PG_GETARG_BOOL(4);
	e.description = billing_check_description(fcinfo, 5);
	e.metadata = billing_check_metadata(fcinfo, 6);
	e.has_event_at = billing_check_event_at(fcinfo, 7, &e.event_at);

	account_lock(&acc, tenant_id, billing_spi_connect());

	if (probe_event(&acc, trace_id, "capture", hold_trace, amount, &hold_id, &entry_id))
	{
		replayed = true;
		check_capture_replay(&acc, hold_id, entry_id, final, &e);
		account_expire_due(&acc);
		account_finish(&acc);
		load_hold_by_id(&acc, hold_id, &h);
	}
	else
	{
		/* the key that marks priced usage is billing_deduct_usage's only */
		billing_check_usage_mark(&acc, e.metadata);
		/* a new capture: its event time must be in the accepted window */
		if (e.has_event_at)
			billing_check_event_at_window(e.event_at);
		/* the capture's entry must not take a recorded rejection's trace id */
		billing_check_not_rejected(&acc, trace_id, "capture");
		account_expire_due(&acc);
		load_hold(&acc, hold_trace, &h);
		if (strcmp(h.status, "open") != 0)
			raise_not_open(&acc, &h, "captured");

		remaining = hold_remaining(&h);
		take = Min(amount, remaining);
		account_key_lock(&acc, &key, h.api_key);
		debit.charge = amount;
		debit.covered = take;
		debit.funds_errcode = ERRCODE_BILLING_CAPTURE_EXCEEDS;
		debit.draws = &draws;	/* an excess over the hold: fresh from the buckets */
		if (!account_check_debit(&acc, &key, &debit, &rej))
		{
			if (rej.sqlerrcode == ERRCODE_BILLING_CAPTURE_EXCEEDS)
				rej.detail = psprintf("%s Hold \"%s\" had %s left, the capture asked for %s.",
									  rej.detail, text_to_cstring(hold_trace),
									  billing_format_micros(hold_remaining(&h)),
									  billing_format_micros(amount));
			billing_raise_rejection(&rej);
		}
		/* what the hold covers, from its shares of the buckets */
		consume_shares(&acc, &h, take, &draws);
		account_apply_debit(&acc, &key, &debit);

		h.captured = billing_add_micros(h.captured, amount, "captured amount of the hold");
		if (amount >= remaining || final)
		{
			/* settled: nothing left, an excess was charged, or final */
			rest = remaining - take;
			h.released = billing_add_micros(h.released, rest, "released amount of the hold");
			acc.holds = billing_add_micros(acc.holds, -rest, "open holds of the account");
			h.status = "captured";
			give_back_shares(&acc, &h, &expired);
		}

		e.kind = "capture";
		e.draws = &draws;
		e.amount = -amount;
		e.trace_id = trace_id;
		e.api_key = h.api_key;
		e.hold_id = h.hold_id;
		acc.version++;
		entry_id = billing_post_entry(&acc, &e);
		if (entry_id == 0)
			entry_conflict(&acc, trace_id);
		/*
		 * The entry as written (a grant expiry below may add entries; a
		 * BEFORE INSERT trigger on the ledger that changed these columns is
		 * not seen here: a replay reads the entry back)
		 */
		values[4] = NumericGetDatum(billing_micros_to_numeric(e.amount));
		values[5] = NumericGetDatum(billing_micros_to_numeric(acc.balance));
		values[9] = TimestampTzGetDatum(acc.now);
		save_hold(&acc, &h);
		journal(&acc, &h, trace_id, "capture", amount, entry_id, final);
		if (rest > 0)
			journal(&acc, &h, NULL, "release", rest, 0, false);
		grants_write_expiries(&acc, &expired, acc.now, "grant expired (a hold's unused share)");
		account_key_save(&acc, &key);
	}

	/* a replay: the entry as the original capture recorded it */
	if (replayed)
	{
		Oid			types[2] = {TEXTOID, INT8OID};
		static SPIPlanPtr plan_entry = NULL;
		Datum		args[2];
		bool		isnull;

		billing_keep_plan(&plan_entry,
						  "SELECT amount_micros, balance_after_micros, created_at "
						  "FROM billing.entries WHERE tenant_id = $1 AND entry_id = $2",
						  2, types);
		args[0] = PointerGetDatum(tenant_id);
		args[1] = Int64GetDatum(entry_id);
		billing_spi_exec(plan_entry, args, NULL, SPI_OK_SELECT, "reading the capture");
		if (SPI_processed != 1)
			elog(ERROR, "billing: capture entry " INT64_FORMAT " vanished", entry_id);
		values[4] = NumericGetDatum(billing_micros_to_numeric(billing_col_int64(0, 1, 0)));
		values[5] = NumericGetDatum(billing_micros_to_numeric(billing_col_int64(0, 2, 0)));
		values[9] = billing_col(0, 3, &isnull);
	}

	MemoryContextSwitchTo(acc.cxt);	/* the result tuple outlives SPI_finish */
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	values[0] = Int64GetDatum(entry_id);
	values[1] = Int64GetDatum(h.hold_id);
	values[2] = PointerGetDatum(tenant_id);
	values[3] = PointerGetDatum(trace_id);
	values[6] = NumericGetDatum(billing_micros_to_numeric(h.captured));
	values[7] = NumericGetDatum(billing_micros_to_numeric(hold_remaining(&h)));
	values[8] = CStringGetTextDatum(h.status);
	values[10] = BoolGetDatum(replayed);
	{
		Datum		result = HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));

		SPI_finish();
		return result;
	}
}

/*
 * billing_release(tenant_id, hold_trace_id, trace_id) -> billing.hold_result
 *
 * Frees what is left on the hold.  Releasing a hold that is already
 * settled or expired is not an error (nothing is left to free): the call
 * is journalled with amount 0, so its trace id replays like any other.
 */
Datum
billing_release(PG_FUNCTION_ARGS)
{
	text	   *tenant_id = get_id(fcinfo, 0, "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	text	   *hold_trace = get_id(fcinfo, 1, "hold_trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	text	   *trace_id = get_id(fcinfo, 2, "trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	Account		acc;
	Hold		h;
	int64		hold_id;
	int64		entry_id;
	Datum		result;

	account_lock(&acc, tenant_id, billing_spi_connect());

	if (probe_event(&acc, trace_id, "release", hold_trace, -1, &hold_id, &entry_id))
	{
		account_expire_due(&acc);
		account_finish(&acc);
		load_hold_by_id(&acc, hold_id, &h);
		result = hold_result(fcinfo, &acc, &h, true);
		SPI_finish();
		return result;
	}

	account_expire_due(&acc);
	load_hold(&acc, hold_trace, &h);
	{
		int64		rest = hold_remaining(&h);

		if (strcmp(h.status, "open") == 0)
		{
			Draws		expired = {0};

			h.released = billing_add_micros(h.released, rest, "released amount of the hold");
			h.status = "released";
			acc.holds = billing_add_micros(acc.holds, -rest, "open holds of the account");
			give_back_shares(&acc, &h, &expired);
			save_hold(&acc, &h);
			account_key_touch(&acc, h.api_key);	/* the key's open holds */
			acc.version++;
			account_save(&acc, false);
			grants_write_expiries(&acc, &expired, acc.now, "grant expired (a released hold's share)");
		}
		journal(&acc, &h, trace_id, "release", rest, 0, false);
	}
	account_finish(&acc);
	result = hold_result(fcinfo, &acc, &h, false);
	SPI_finish();
	return result;
}

/* has the grant bucket of a hold's share expired (by acc->now)? */
static bool
share_expired(Account *acc, int64 grant_id)
{
	for (int i = 0; i < acc->nbuckets; i++)
		if (acc->buckets[i].grant_id == grant_id)
			return acc->buckets[i].expires_at <= acc->now;
	/* a hold's share keeps its bucket listed (reserved) */
	elog(ERROR, "billing: a hold of \"%s\" has a share of grant " INT64_FORMAT ", which is not listed",
		 acc->tenant, grant_id);
	return false;				/* keep the compiler quiet */
}

/*
 * Extend an open hold to now() + expires_in.  A hold that is not open is
 * refused (ZB031/ZB032), or with if_open returned as it is.
 *
 * A hold keeps its shares of grant credit until it ends, also past a
 * grant's expiry, but an extension does not carry expired credit further:
 * the shares of grants that have expired leave the hold (they expire now,
 * with an 'expire' entry) and the hold reserves as much again from the
 * account's funds in burn order (other grants, the wallet, the credit
 * limit), as a new hold would.  When the funds cannot cover that, the
 * extension is refused (ZB004), or with if_open (a job's keep-alive, which
 * must not fail a whole claim) the hold is returned as it is, unextended.
 */
static Datum
hold_extend(FunctionCallInfo fcinfo, bool if_open)
{
	text	   *tenant_id = get_id(fcinfo, 0, "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	text	   *hold_trace = get_id(fcinfo, 1, "hold_trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	int64		expires_in = check_expires_in(fcinfo, 2);
	Account		acc;
	Hold		h;
	Datum		result;
	Draws		kept = {0};
	Draws		stale = {0};
	Draws		expired = {0};
	int64		moved = 0;

	account_lock(&acc, tenant_id, billing_spi_connect());
	account_expire_due(&acc);
	load_hold(&acc, hold_trace, &h);
	if (strcmp(h.status, "open") == 0)
	{
		for (int i = 0; i < h.shares.n; i++)
		{
			if (h.shares.amount[i] <= 0)
				continue;
			if (share_expired(&acc, h.shares.grant_id[i]))
			{
				draws_add(&stale, h.shares.grant_id[i], h.shares.amount[i]);
				moved += h.shares.amount[i];
			}
			else
				draws_add(&kept, h.shares.grant_id[i], h.shares.amount[i]);
		}
	}
	if (moved > 0)
	{
		/* available once the expired shares are gone, in 128 bits */
		int128		available = (int128) acc.balance - moved + acc.credit_limit - acc.holds;

		if (available < 0)
		{
			int64		shown = (int64) Max(Min(available, PG_INT64_MAX), PG_INT64_MIN);

			if (if_open)
			{
				account_finish(&acc);
				result = hold_result(fcinfo, &acc, &h, false);
				SPI_finish();
				return result;
			}
			metrics_count_refusal(ERRCODE_BILLING_INSUFFICIENT_FUNDS);
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_INSUFFICIENT_FUNDS),
					 errmsg("insufficient funds to extend hold \"%s\" of account \"%s\"",
							text_to_cstring(hold_trace), acc.tenant),
					 errdetail("The hold's share of expired grant credit (%s) must be reserved again; available after it expires %s (balance %s, credit limit %s, on hold %s).",
							   billing_format_micros(moved), billing_format_micros(shown),
							   billing_format_micros(acc.balance - moved),
							   billing_format_micros(acc.credit_limit),
							   billing_format_micros(acc.holds)),
					 errhint("Top up with billing_credit(), capture or release the hold before it expires, or let it expire.")));
		}
	}
	if (strcmp(h.status, "open") != 0)
	{
		if (!if_open)
			raise_not_open(&acc, &h, "extended");
		account_finish(&acc);	/* the expiry recorded on the way stays */
	}
	else
	{
		if (moved > 0)
		{
			grants_give_back(&acc, &stale, true, acc.now, &expired);
			grants_draw(&acc, moved, true, &kept);
			h.shares = kept;
		}
		h.expires_at = acc.now + expires_in;
		save_hold(&acc, &h);
		journal(&acc, &h, NULL, "extend", 0, 0, false);
		account_refresh_holds(&acc);
		account_key_touch(&acc, h.api_key);	/* its hash's next hold expiry */
		acc.version++;
		account_save(&acc, false);
		grants_write_expiries(&acc, &expired, acc.now, "grant expired (an extended hold's share)");
	}
	result = hold_result(fcinfo, &acc, &h, false);
	SPI_finish();
	return result;
}

/*
 * billing_hold_extend(tenant_id, hold_trace_id, expires_in)
 *	-> billing.hold_result
 *
 * The heartbeat of a long-running hold: expires_at becomes now() +
 * expires_in.  Only an open hold can be extended.
 */
Datum
billing_hold_extend(PG_FUNCTION_ARGS)
{
	return hold_extend(fcinfo, false);
}

/*
 * billing.internal_hold_extend(tenant_id, hold_trace_id, expires_in)
 *	-> billing.hold_result
 *
 * The job functions' keep-alive: as billing_hold_extend, but a hold that
 * expired (or was settled) while the caller waited for the account lock is
 * returned as it is, with its status, instead of failing the caller's whole
 * claim or rescue; so is an open hold whose share of expired grant credit
 * the account cannot reserve again (unextended).  The job's later steps see
 * the hold's state.
 */
Datum
billing_hold_keep(PG_FUNCTION_ARGS)
{
	return hold_extend(fcinfo, true);
}
