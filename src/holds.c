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
#include "ledger.h"
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(billing_hold);
PG_FUNCTION_INFO_V1(billing_capture);
PG_FUNCTION_INFO_V1(billing_release);
PG_FUNCTION_INFO_V1(billing_hold_extend);

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
} Hold;

static SPIPlanPtr plan_probe_event = NULL;
static SPIPlanPtr plan_probe_entry = NULL;
static SPIPlanPtr plan_load[2];
static SPIPlanPtr plan_load_id[2];
static SPIPlanPtr plan_insert_hold[2];
static SPIPlanPtr plan_update_hold[2];
static SPIPlanPtr plan_event = NULL;

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
 * Columns: 1 action, 2 hold_id, 3 amount, 4 entry_id, 5 hold trace id.
 */
static bool
probe_event(Account *acc, text *trace_id, const char *action,
			text *hold_trace, int64 amount, int64 *hold_id, int64 *entry_id)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	char	   *was_action;
	char	   *was_hold;
	int64		was_amount;

	billing_keep_plan(&plan_probe_event,
					  "SELECT e.action, e.hold_id, e.amount_micros, e.entry_id, h.trace_id "
					  "FROM billing.hold_events e JOIN billing.holds h "
					  "  ON h.tenant_id = e.tenant_id AND h.hold_id = e.hold_id "
					  "WHERE e.tenant_id = $1 AND e.trace_id = $2",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(trace_id);
	billing_spi_exec(plan_probe_event, values, NULL, SPI_OK_SELECT, "hold journal probe");
	if (SPI_processed == 0)
		return false;

	was_action = billing_col_cstring(0, 1, CurrentMemoryContext);
	was_hold = billing_col_cstring(0, 5, CurrentMemoryContext);
	was_amount = billing_col_int64(0, 3, 0);
	*hold_id = billing_col_int64(0, 2, 0);
	*entry_id = billing_col_int64(0, 4, 0);

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

static void
fill_hold(Hold *h, MemoryContext cxt)
{
	bool		isnull;
	Datum		d;
	MemoryContext old;

	h->hold_id = billing_col_int64(0, 1, 0);
	old = MemoryContextSwitchTo(cxt);
	h->trace_id = DatumGetTextPCopy(billing_col(0, 2, &isnull));
	h->amount = billing_col_int64(0, 3, 0);
	h->captured = billing_col_int64(0, 4, 0);
	h->released = billing_col_int64(0, 5, 0);
	h->status = billing_col_cstring(0, 6, cxt);
	h->expires_at = DatumGetTimestampTz(billing_col(0, 7, &isnull));
	d = billing_col(0, 8, &isnull);
	h->api_key = isnull ? NULL : DatumGetTextPCopy(d);
	memset(&h->shares, 0, sizeof(h->shares));
	if (SPI_tuptable->tupdesc->natts >= 9)
	{
		d = billing_col(0, 9, &isnull);
		if (!isnull)
			draws_from_datum(d, &h->shares);
	}
	MemoryContextSwitchTo(old);
}

/*
 * The columns of a hold; since 1.4 also its shares of grant buckets.  The
 * plans come in two versions, [0] for a database still at 1.3.
 */
#define HOLD_COLUMNS "hold_id, trace_id, amount_micros, captured_micros, " \
	"released_micros, status, expires_at, api_key"
#define HOLD_COLUMNS_14 HOLD_COLUMNS ", grant_draws"

/* the hold named by its trace id, or ZB030 */
static void
load_hold(Account *acc, text *hold_trace, Hold *h)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];

	int			v = acc->grants_supported;

	billing_keep_plan(&plan_load[v],
					  v ? "SELECT " HOLD_COLUMNS_14 " FROM billing.holds "
					  "WHERE tenant_id = $1 AND trace_id = $2" :
					  "SELECT " HOLD_COLUMNS " FROM billing.holds "
					  "WHERE tenant_id = $1 AND trace_id = $2",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(hold_trace);
	billing_spi_exec(plan_load[v], values, NULL, SPI_OK_SELECT, "loading the hold");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_HOLD_NOT_FOUND),
				 errmsg("hold \"%s\" does not exist for account \"%s\"",
						text_to_cstring(hold_trace), acc->tenant),
				 errhint("Pass the trace id that billing_hold() was called with.")));
	fill_hold(h, acc->cxt);
}

static void
load_hold_by_id(Account *acc, int64 hold_id, Hold *h)
{
	Oid			types[2] = {TEXTOID, INT8OID};
	Datum		values[2];

	int			v = acc->grants_supported;

	billing_keep_plan(&plan_load_id[v],
					  v ? "SELECT " HOLD_COLUMNS_14 " FROM billing.holds "
					  "WHERE tenant_id = $1 AND hold_id = $2" :
					  "SELECT " HOLD_COLUMNS " FROM billing.holds "
					  "WHERE tenant_id = $1 AND hold_id = $2",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = Int64GetDatum(hold_id);
	billing_spi_exec(plan_load_id[v], values, NULL, SPI_OK_SELECT, "loading the hold");
	if (SPI_processed != 1)
		elog(ERROR, "billing: hold " INT64_FORMAT " vanished", hold_id);
	fill_hold(h, acc->cxt);
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

static void
save_hold(Account *acc, Hold *h)
{
	Oid			types[8] = {TEXTOID, INT8OID, INT8OID, INT8OID, TEXTOID,
	TIMESTAMPTZOID, TIMESTAMPTZOID, INT8ARRAYOID};
	Datum		values[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			v = acc->grants_supported;

	billing_keep_plan(&plan_update_hold[v],
					  v ? "UPDATE billing.holds SET captured_micros = $3, released_micros = $4, "
					  "  status = $5, expires_at = $6, updated_at = $7, grant_draws = $8 "
					  "WHERE tenant_id = $1 AND hold_id = $2" :
					  "UPDATE billing.holds SET captured_micros = $3, released_micros = $4, "
					  "  status = $5, expires_at = $6, updated_at = $7 "
					  "WHERE tenant_id = $1 AND hold_id = $2",
					  v ? 8 : 7, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = Int64GetDatum(h->hold_id);
	values[2] = Int64GetDatum(h->captured);
	values[3] = Int64GetDatum(h->released);
	values[4] = CStringGetTextDatum(h->status);
	values[5] = TimestampTzGetDatum(h->expires_at);
	values[6] = TimestampTzGetDatum(acc->now);
	nulls[7] = h->shares.n == 0 ? 'n' : ' ';
	values[7] = h->shares.n == 0 ? (Datum) 0 : draws_datum(&h->shares);
	billing_spi_exec(plan_update_hold[v], values, nulls, SPI_OK_UPDATE, "updating the hold");
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
	Oid			types[9] = {TEXTOID, INT8OID, TEXTOID, TEXTOID, INT8OID, INT8OID,
	TIMESTAMPTZOID, TIMESTAMPTZOID, BOOLOID};
	Datum		values[9];
	char		nulls[9];

	billing_keep_plan(&plan_event,
					  "INSERT INTO billing.hold_events (tenant_id, hold_id, trace_id, "
					  "  action, amount_micros, entry_id, expires_at, created_at, final) "
					  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
					  "ON CONFLICT (tenant_id, trace_id) DO NOTHING",
					  9, types);
	memset(nulls, ' ', sizeof(nulls));
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = Int64GetDatum(h->hold_id);
	values[2] = PointerGetDatum(trace_id);
	nulls[2] = trace_id ? ' ' : 'n';
	values[3] = CStringGetTextDatum(action);
	values[4] = Int64GetDatum(amount);
	values[5] = Int64GetDatum(entry_id);
	nulls[5] = entry_id ? ' ' : 'n';
	values[6] = TimestampTzGetDatum(h->expires_at);
	values[7] = TimestampTzGetDatum(acc->now);
	values[8] = BoolGetDatum(final);
	billing_spi_exec(plan_event, values, nulls, SPI_OK_INSERT, "journalling the hold");
	/* see record_rejection() in ledger.c: REPEATABLE READ and up only */
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to a concurrent hold operation with trace id \"%s\"",
						text_to_cstring(trace_id)),
				 errhint("Retry the transaction; the retry returns the recorded outcome.")));
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
		Oid			types[10] = {TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID, TEXTOID,
		TEXTOID, JSONBOID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT8ARRAYOID};
		Datum		values[10];
		char		nulls[10];
		int			v = acc.grants_supported;

		billing_keep_plan(&plan_insert_hold[v],
						  v ? "INSERT INTO billing.holds (tenant_id, trace_id, amount_micros, "
						  "  expires_at, api_key, description, metadata, created_at, updated_at, "
						  "  grant_draws) "
						  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING hold_id" :
						  "INSERT INTO billing.holds (tenant_id, trace_id, amount_micros, "
						  "  expires_at, api_key, description, metadata, created_at, updated_at) "
						  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING hold_id",
						  v ? 10 : 9, types);
		memset(nulls, ' ', sizeof(nulls));
		values[0] = PointerGetDatum(tenant_id);
		values[1] = PointerGetDatum(trace_id);
		values[2] = Int64GetDatum(amount);
		values[3] = TimestampTzGetDatum(h.expires_at);
		values[4] = PointerGetDatum(api_key);
		nulls[4] = api_key ? ' ' : 'n';
		values[5] = PointerGetDatum(description);
		nulls[5] = description ? ' ' : 'n';
		values[6] = JsonbPGetDatum(metadata);
		values[7] = TimestampTzGetDatum(acc.now);
		values[8] = TimestampTzGetDatum(acc.now);
		nulls[9] = h.shares.n == 0 ? 'n' : ' ';
		values[9] = h.shares.n == 0 ? (Datum) 0 : draws_datum(&h.shares);
		billing_spi_exec(plan_insert_hold[v], values, nulls, SPI_OK_INSERT_RETURNING,
						 "inserting the hold");
		h.hold_id = billing_col_int64(0, 1, 0);
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
		save_hold(&acc, &h);
		journal(&acc, &h, trace_id, "capture", amount, entry_id, final);
		if (rest > 0)
			journal(&acc, &h, NULL, "release", rest, 0, false);
		grants_write_expiries(&acc, &expired, acc.now, "grant expired (a hold's unused share)");
		account_key_save(&acc, &key);
	}

	/* the entry as recorded (on a replay: the original one) */
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
	text	   *tenant_id = get_id(fcinfo, 0, "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	text	   *hold_trace = get_id(fcinfo, 1, "hold_trace_id", ERRCODE_BILLING_INVALID_TRACE_ID);
	int64		expires_in = check_expires_in(fcinfo, 2);
	Account		acc;
	Hold		h;
	Datum		result;

	account_lock(&acc, tenant_id, billing_spi_connect());
	account_expire_due(&acc);
	load_hold(&acc, hold_trace, &h);
	if (strcmp(h.status, "open") != 0)
		raise_not_open(&acc, &h, "extended");

	h.expires_at = acc.now + expires_in;
	save_hold(&acc, &h);
	journal(&acc, &h, NULL, "extend", 0, 0, false);
	account_refresh_holds(&acc);
	acc.version++;
	account_save(&acc, false);
	result = hold_result(fcinfo, &acc, &h, false);
	SPI_finish();
	return result;
}
