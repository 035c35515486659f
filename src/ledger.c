/*-------------------------------------------------------------------------
 *
 * ledger.c
 *	  billing_credit, billing_deduct, billing_try_deduct, billing_balance:
 *	  the hot path that writes one ledger entry per call.
 *
 * One call = one account row lock, one idempotency probe, one entry insert
 * and one account update, all through SPI plans prepared once per backend.
 *
 * Concurrency.  Every write for a tenant (entries, rejections, the cached
 * balance) happens while holding that tenant's account row lock, taken
 * first with SELECT ... FOR UPDATE.  The idempotency probe runs after the
 * lock, with a fresh snapshot (SPI takes one per statement in READ
 * COMMITTED), so a concurrent call with the same trace id either committed
 * before we got the lock (we see its entry and replay it) or rolled back
 * (we see nothing and charge).  The unique index on (tenant_id, trace_id)
 * is only a backstop: no unique violation can reach the caller.
 * In REPEATABLE READ or SERIALIZABLE, a concurrent change of the same
 * account surfaces as a serialization failure (40001): retry the call.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "billing.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

PG_FUNCTION_INFO_V1(billing_credit);
PG_FUNCTION_INFO_V1(billing_deduct);
PG_FUNCTION_INFO_V1(billing_try_deduct);
PG_FUNCTION_INFO_V1(billing_balance);

/* argument positions shared by credit, deduct and try_deduct */
#define ARG_TENANT		0
#define ARG_AMOUNT		1
#define ARG_TRACE		2
#define ARG_DESCRIPTION 3
#define ARG_METADATA	4
#define ARG_EVENT_AT	5
#define ARG_KIND		6

typedef enum PostMode
{
	POST_RAISE,					/* business rejection -> ERROR */
	POST_RECORD					/* business rejection -> recorded outcome */
} PostMode;

typedef struct LedgerRequest
{
	text	   *tenant_id;
	text	   *trace_id;
	char	   *kind;
	int64		amount;			/* signed micro-units, as stored */
	bool		is_debit;
	text	   *description;	/* NULL when not given */
	Jsonb	   *metadata;		/* never NULL ({} when not given) */
	bool		has_event_at;
	TimestampTz event_at;
} LedgerRequest;

typedef struct LedgerOutcome
{
	bool		committed;		/* false: rejected */
	bool		replayed;
	int64		id;				/* entry_id, or rejection_id when rejected */
	char	   *kind;
	int64		amount;
	int64		balance_after;	/* valid when committed */
	int64		version;		/* valid when committed */
	TimestampTz created_at;
	int			sqlerrcode;		/* valid when rejected */
	char	   *message;
	char	   *detail;
	char	   *hint;
} LedgerOutcome;

static const char *const credit_kinds[] = {"topup", "grant", "refund", "adjustment", NULL};
static const char *const debit_kinds[] = {"deduct", "adjustment", NULL};

/* SPI plans, prepared on first use and kept for the life of the backend */
static SPIPlanPtr plan_lock = NULL;
static SPIPlanPtr plan_probe = NULL;
static SPIPlanPtr plan_insert = NULL;
static SPIPlanPtr plan_update = NULL;
static SPIPlanPtr plan_reject = NULL;
static SPIPlanPtr plan_balance = NULL;

static SPIPlanPtr
keep_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

		if (plan == NULL)
			elog(ERROR, "billing: SPI_prepare failed: %s",
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "billing: SPI_keepplan failed");
		*cache = plan;
	}
	return *cache;
}

/* column accessors for the current SPI result */
static Datum
col(int row, int colno, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc,
						 colno, isnull);
}

static int64
col_int64(int row, int colno)
{
	bool		isnull;
	Datum		d = col(row, colno, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/* a text column copied into context cxt, or NULL */
static char *
col_cstring(int row, int colno, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = col(row, colno, &isnull);
	MemoryContext old;
	char	   *s;

	if (isnull)
		return NULL;
	old = MemoryContextSwitchTo(cxt);
	s = TextDatumGetCString(d);
	MemoryContextSwitchTo(old);
	return s;
}

static const char *
kind_list(const char *const *kinds)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; kinds[i] != NULL; i++)
		appendStringInfo(&buf, "%s%s", i > 0 ? ", " : "", kinds[i]);
	return buf.data;
}

/* Parse and check the arguments common to credit, deduct and try_deduct. */
static void
parse_request(FunctionCallInfo fcinfo, bool is_debit, LedgerRequest *req)
{
	const char *const *kinds = is_debit ? debit_kinds : credit_kinds;
	int64		micros;
	bool		kind_ok = false;

	billing_check_not_null(fcinfo, ARG_TENANT, "tenant_id");
	billing_check_not_null(fcinfo, ARG_AMOUNT, "amount");
	billing_check_not_null(fcinfo, ARG_TRACE, "trace_id");
	billing_check_not_null(fcinfo, ARG_KIND, "kind");

	req->tenant_id = billing_check_id(PG_GETARG_TEXT_PP(ARG_TENANT),
									  "tenant_id",
									  ERRCODE_BILLING_INVALID_TENANT_ID);
	req->trace_id = billing_check_id(PG_GETARG_TEXT_PP(ARG_TRACE),
									 "trace_id",
									 ERRCODE_BILLING_INVALID_TRACE_ID);
	micros = billing_amount_to_micros(PG_GETARG_NUMERIC(ARG_AMOUNT),
									  "amount", false);
	req->is_debit = is_debit;
	req->amount = is_debit ? -micros : micros;
	req->description = billing_check_description(fcinfo, ARG_DESCRIPTION);
	req->metadata = billing_check_metadata(fcinfo, ARG_METADATA);
	req->has_event_at = billing_check_event_at(fcinfo, ARG_EVENT_AT,
											   &req->event_at);

	req->kind = text_to_cstring(PG_GETARG_TEXT_PP(ARG_KIND));
	for (int i = 0; kinds[i] != NULL; i++)
		if (strcmp(req->kind, kinds[i]) == 0)
			kind_ok = true;
	if (!kind_ok)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_KIND),
				 errmsg("invalid %s kind \"%s\"",
						is_debit ? "debit" : "credit", req->kind),
				 errdetail("Allowed kinds: %s.", kind_list(kinds)),
				 errhint("%s", is_debit ?
						 "Use billing_credit() for money going into the account." :
						 "Use billing_deduct() for money leaving the account.")));
}

static bool
text_equal(text *a, text *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return VARSIZE_ANY_EXHDR(a) == VARSIZE_ANY_EXHDR(b) &&
		memcmp(VARDATA_ANY(a), VARDATA_ANY(b), VARSIZE_ANY_EXHDR(a)) == 0;
}

static const char *
show_text(text *t)
{
	return t == NULL ? "null" : quote_literal_cstr(text_to_cstring(t));
}

static const char *
show_ts(bool has, TimestampTz ts)
{
	return has ? DatumGetCString(DirectFunctionCall1(timestamptz_out,
													 TimestampTzGetDatum(ts))) : "null";
}

/*
 * The probe found an earlier request with this trace id (row 0 of the SPI
 * result).  Raise the trace id conflict error unless every field matches.
 * Probe columns: 1 committed, 2 id, 3 kind, 4 amount, 5 balance_after,
 * 6 version, 7 description, 8 metadata, 9 event_at, 10 created_at,
 * 11 sqlstate, 12 reason, 13 detail.
 */
static void
check_same_request(LedgerRequest *req)
{
	bool		isnull;
	char	   *kind = TextDatumGetCString(col(0, 3, &isnull));
	int64		amount = col_int64(0, 4);
	Datum		d;
	text	   *description;
	Jsonb	   *metadata;
	bool		has_event_at;
	TimestampTz event_at = 0;
	StringInfoData fields;
	StringInfoData detail;

	d = col(0, 7, &isnull);
	description = isnull ? NULL : DatumGetTextPP(d);
	d = col(0, 8, &isnull);
	metadata = isnull ? NULL : DatumGetJsonbP(d);
	d = col(0, 9, &isnull);
	has_event_at = !isnull;
	if (has_event_at)
		event_at = DatumGetTimestampTz(d);

	initStringInfo(&fields);
	initStringInfo(&detail);

#define DIFFERS(name, orig, mine) \
	do { \
		appendStringInfo(&fields, "%s%s", fields.len > 0 ? ", " : "", name); \
		appendStringInfo(&detail, "%s%s: original %s, this request %s", \
						 detail.len > 0 ? "; " : "", name, orig, mine); \
	} while (0)

	if (strcmp(kind, req->kind) != 0)
		DIFFERS("kind", kind, req->kind);
	if (amount != req->amount)
		DIFFERS("amount", billing_format_micros(amount),
				billing_format_micros(req->amount));
	if (!text_equal(description, req->description))
		DIFFERS("description", show_text(description),
				show_text(req->description));
	if (metadata == NULL ||
		compareJsonbContainers(&metadata->root, &req->metadata->root) != 0)
		DIFFERS("metadata",
				metadata ? JsonbToCString(NULL, &metadata->root, VARSIZE(metadata)) : "null",
				JsonbToCString(NULL, &req->metadata->root, VARSIZE(req->metadata)));
	if (has_event_at != req->has_event_at ||
		(has_event_at && event_at != req->event_at))
		DIFFERS("event_at", show_ts(has_event_at, event_at),
				show_ts(req->has_event_at, req->event_at));
#undef DIFFERS

	if (fields.len > 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_TRACE_CONFLICT),
				 errmsg("trace id \"%s\" was already used with a different %s",
						text_to_cstring(req->trace_id), fields.data),
				 errdetail("Ledger amounts are signed (debits negative). %s.",
						   detail.data),
				 errhint("Resend the original request unchanged to get its result, "
						 "or use a new trace id for a new request.")));
}

/*
 * Decide a business rejection: raise it, or fill *out so the caller can
 * record it.  Message texts are built in the caller's memory context.
 */
static void
reject(PostMode mode, LedgerOutcome *out, int sqlerrcode,
	   char *message, char *detail, char *hint)
{
	if (mode == POST_RAISE)
		ereport(ERROR,
				(errcode(sqlerrcode),
				 errmsg_internal("%s", message),
				 detail ? errdetail_internal("%s", detail) : 0,
				 hint ? errhint("%s", hint) : 0));
	out->committed = false;
	out->sqlerrcode = sqlerrcode;
	out->message = message;
	out->detail = detail;
	out->hint = hint;
}

static int
sqlstate_from_text(const char *s)
{
	if (s == NULL || strlen(s) != 5)
		return ERRCODE_INTERNAL_ERROR;
	return MAKE_SQLSTATE(s[0], s[1], s[2], s[3], s[4]);
}

/*
 * The heart of the ledger: lock, probe, check, write.  Runs inside the
 * caller's transaction; any ERROR rolls back everything it did.
 */
static void
ledger_post(LedgerRequest *req, PostMode mode, LedgerOutcome *out)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	Datum		values[11];
	char		nulls[11];
	char	   *tenant = text_to_cstring(req->tenant_id);
	char	   *status;
	int64		credit_limit;
	int64		balance;
	int64		version;
	int			ret;

	memset(out, 0, sizeof(*out));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "billing: SPI_connect failed");

	/* 1. lock the account: every write for this tenant serializes here */
	{
		Oid			types[1] = {TEXTOID};

		keep_plan(&plan_lock,
				  "SELECT status, credit_limit_micros, balance_micros, version "
				  "FROM billing.accounts WHERE tenant_id = $1 FOR UPDATE",
				  1, types);
	}
	values[0] = PointerGetDatum(req->tenant_id);
	ret = SPI_execute_plan(plan_lock, values, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "billing: account lock failed: %s",
			 SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ACCOUNT_NOT_FOUND),
				 errmsg("account \"%s\" does not exist", tenant),
				 errhint("Create it first with billing_account_create(%s).",
						 quote_literal_cstr(tenant))));
	status = col_cstring(0, 1, caller_cxt);
	credit_limit = col_int64(0, 2);
	balance = col_int64(0, 3);
	version = col_int64(0, 4);

	/* 2. idempotency probe: entries and recorded rejections */
	{
		Oid			types[2] = {TEXTOID, TEXTOID};

		keep_plan(&plan_probe,
				  "SELECT true, entry_id, kind, amount_micros, balance_after_micros, "
				  "       version, description, metadata, event_at, created_at, "
				  "       NULL::text, NULL::text, NULL::text "
				  "  FROM billing.entries WHERE tenant_id = $1 AND trace_id = $2 "
				  "UNION ALL "
				  "SELECT false, rejection_id, kind, amount_micros, NULL, NULL, "
				  "       description, metadata, event_at, created_at, "
				  "       sqlstate, reason, detail "
				  "  FROM billing.rejections WHERE tenant_id = $1 AND trace_id = $2 "
				  "LIMIT 1",
				  2, types);
	}
	values[1] = PointerGetDatum(req->trace_id);
	ret = SPI_execute_plan(plan_probe, values, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "billing: idempotency probe failed: %s",
			 SPI_result_code_string(ret));
	if (SPI_processed > 0)
	{
		bool		isnull;

		check_same_request(req);
		out->replayed = true;
		out->committed = DatumGetBool(col(0, 1, &isnull));
		out->id = col_int64(0, 2);
		out->kind = col_cstring(0, 3, caller_cxt);
		out->amount = col_int64(0, 4);
		out->balance_after = col_int64(0, 5);
		out->version = col_int64(0, 6);
		out->created_at = DatumGetTimestampTz(col(0, 10, &isnull));
		if (!out->committed)
		{
			char	   *sqlstate = col_cstring(0, 11, caller_cxt);
			char	   *message = col_cstring(0, 12, caller_cxt);
			char	   *detail = col_cstring(0, 13, caller_cxt);
			MemoryContext old = MemoryContextSwitchTo(caller_cxt);
			char	   *hint = psprintf("This trace id was rejected at %s and stays rejected; "
										"retry with a new trace id.",
										show_ts(true, out->created_at));

			MemoryContextSwitchTo(old);
			reject(mode, out, sqlstate_from_text(sqlstate), message, detail, hint);
		}
		SPI_finish();
		return;
	}

	/* 3. business rules */
	{
		MemoryContext old = MemoryContextSwitchTo(caller_cxt);
		int64		new_balance = billing_add_micros(balance, req->amount,
													 "account balance");
		bool		rejected = true;

		if (strcmp(status, "closed") == 0)
			reject(mode, out, ERRCODE_BILLING_ACCOUNT_CLOSED,
				   psprintf("account \"%s\" is closed", tenant),
				   psprintf("A closed account accepts no entries (this %s of %s was refused).",
							req->kind, billing_format_micros(req->amount)),
				   pstrdup("Closed is final: open a new account for this customer."));
		else if (req->is_debit && strcmp(status, "active") != 0)
			reject(mode, out, ERRCODE_BILLING_ACCOUNT_SUSPENDED,
				   psprintf("account \"%s\" is %s", tenant, status),
				   psprintf("A %s account cannot be charged (required %s).",
							status, billing_format_micros(-req->amount)),
				   psprintf("Reactivate it with billing_account_update(%s, status => 'active').",
							quote_literal_cstr(tenant)));
		else if (req->is_debit && new_balance < -credit_limit)
		{
			int64		available = billing_add_micros(balance, credit_limit,
													   "available funds");

			reject(mode, out, ERRCODE_BILLING_INSUFFICIENT_FUNDS,
				   psprintf("insufficient funds in account \"%s\"", tenant),
				   psprintf("Required %s, available %s (balance %s, credit limit %s).",
							billing_format_micros(-req->amount),
							billing_format_micros(available),
							billing_format_micros(balance),
							billing_format_micros(credit_limit)),
				   pstrdup("Top up with billing_credit(), raise the credit limit, or charge less."));
		}
		else
			rejected = false;
		MemoryContextSwitchTo(old);

		if (rejected)
		{
			/* only POST_RECORD gets here: remember the outcome for replays */
			Oid			types[10] = {TEXTOID, TEXTOID, TEXTOID, INT8OID, TEXTOID,
			JSONBOID, TIMESTAMPTZOID, TEXTOID, TEXTOID, TEXTOID};

			keep_plan(&plan_reject,
					  "INSERT INTO billing.rejections (tenant_id, trace_id, kind, "
					  "  amount_micros, description, metadata, event_at, sqlstate, "
					  "  reason, detail) "
					  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
					  "RETURNING rejection_id, created_at",
					  10, types);
			memset(nulls, ' ', sizeof(nulls));
			values[2] = CStringGetTextDatum(req->kind);
			values[3] = Int64GetDatum(req->amount);
			values[4] = req->description ? PointerGetDatum(req->description) : (Datum) 0;
			nulls[4] = req->description ? ' ' : 'n';
			values[5] = JsonbPGetDatum(req->metadata);
			values[6] = TimestampTzGetDatum(req->event_at);
			nulls[6] = req->has_event_at ? ' ' : 'n';
			values[7] = CStringGetTextDatum(unpack_sql_state(out->sqlerrcode));
			values[8] = CStringGetTextDatum(out->message);
			values[9] = CStringGetTextDatum(out->detail);
			ret = SPI_execute_plan(plan_reject, values, nulls, false, 1);
			if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
				elog(ERROR, "billing: recording the rejection failed: %s",
					 SPI_result_code_string(ret));
			out->id = col_int64(0, 1);
			out->kind = MemoryContextStrdup(caller_cxt, req->kind);
			out->amount = req->amount;
			{
				bool		isnull;

				out->created_at = DatumGetTimestampTz(col(0, 2, &isnull));
			}
			SPI_finish();
			return;
		}

		balance = new_balance;
	}

	/* 4. write the entry and the cached balance */
	version++;
	out->created_at = GetCurrentTimestamp();
	{
		Oid			types[10] = {TEXTOID, TEXTOID, TEXTOID, INT8OID, INT8OID,
		INT8OID, TEXTOID, JSONBOID, TIMESTAMPTZOID, TIMESTAMPTZOID};

		keep_plan(&plan_insert,
				  "INSERT INTO billing.entries (tenant_id, trace_id, kind, "
				  "  amount_micros, balance_after_micros, version, description, "
				  "  metadata, event_at, created_at) "
				  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
				  "RETURNING entry_id",
				  10, types);
	}
	memset(nulls, ' ', sizeof(nulls));
	values[2] = CStringGetTextDatum(req->kind);
	values[3] = Int64GetDatum(req->amount);
	values[4] = Int64GetDatum(balance);
	values[5] = Int64GetDatum(version);
	values[6] = req->description ? PointerGetDatum(req->description) : (Datum) 0;
	nulls[6] = req->description ? ' ' : 'n';
	values[7] = JsonbPGetDatum(req->metadata);
	values[8] = TimestampTzGetDatum(req->event_at);
	nulls[8] = req->has_event_at ? ' ' : 'n';
	values[9] = TimestampTzGetDatum(out->created_at);
	ret = SPI_execute_plan(plan_insert, values, nulls, false, 1);
	if (ret != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "billing: inserting the entry failed: %s",
			 SPI_result_code_string(ret));
	out->id = col_int64(0, 1);

	{
		Oid			types[4] = {TEXTOID, INT8OID, INT8OID, TIMESTAMPTZOID};

		keep_plan(&plan_update,
				  "UPDATE billing.accounts SET balance_micros = $2, version = $3, "
				  "  last_entry_at = $4 WHERE tenant_id = $1",
				  4, types);
	}
	values[1] = Int64GetDatum(balance);
	values[2] = Int64GetDatum(version);
	values[3] = TimestampTzGetDatum(out->created_at);
	ret = SPI_execute_plan(plan_update, values, NULL, false, 1);
	if (ret != SPI_OK_UPDATE || SPI_processed != 1)
		elog(ERROR, "billing: updating the account failed: %s",
			 SPI_result_code_string(ret));

	SPI_finish();

	out->committed = true;
	out->kind = req->kind;
	out->amount = req->amount;
	out->balance_after = balance;
	out->version = version;
}

/* billing.entry_result for credit and deduct */
static Datum
entry_result(FunctionCallInfo fcinfo, LedgerRequest *req, LedgerOutcome *out)
{
	TupleDesc	tupdesc;
	Datum		values[9];
	bool		nulls[9] = {0};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);

	values[0] = Int64GetDatum(out->id);
	values[1] = PointerGetDatum(req->tenant_id);
	values[2] = PointerGetDatum(req->trace_id);
	values[3] = CStringGetTextDatum(out->kind);
	values[4] = NumericGetDatum(billing_micros_to_numeric(out->amount));
	values[5] = NumericGetDatum(billing_micros_to_numeric(out->balance_after));
	values[6] = Int64GetDatum(out->version);
	values[7] = TimestampTzGetDatum(out->created_at);
	values[8] = BoolGetDatum(out->replayed);
	return HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls));
}

/*
 * billing_credit(tenant_id, amount, trace_id, description, metadata,
 *				  event_at, kind DEFAULT 'topup') -> billing.entry_result
 */
Datum
billing_credit(PG_FUNCTION_ARGS)
{
	LedgerRequest req;
	LedgerOutcome out;

	parse_request(fcinfo, false, &req);
	ledger_post(&req, POST_RAISE, &out);
	return entry_result(fcinfo, &req, &out);
}

/*
 * billing_deduct(tenant_id, amount, trace_id, description, metadata,
 *				  event_at, kind DEFAULT 'deduct') -> billing.entry_result
 */
Datum
billing_deduct(PG_FUNCTION_ARGS)
{
	LedgerRequest req;
	LedgerOutcome out;

	parse_request(fcinfo, true, &req);
	ledger_post(&req, POST_RAISE, &out);
	return entry_result(fcinfo, &req, &out);
}

/*
 * billing_try_deduct(...same arguments...) -> billing.charge_outcome
 *
 * Business rejections (insufficient funds, suspended or closed account)
 * are returned and recorded instead of raised, so a replay of the trace id
 * returns the same rejection.  Caller bugs (bad arguments, a trace id
 * conflict, an unknown tenant) still raise.
 */
Datum
billing_try_deduct(PG_FUNCTION_ARGS)
{
	LedgerRequest req;
	LedgerOutcome out;
	TupleDesc	tupdesc;
	Datum		values[12];
	bool		nulls[12] = {0};

	parse_request(fcinfo, true, &req);
	ledger_post(&req, POST_RECORD, &out);

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);

	values[0] = CStringGetTextDatum(out.committed ? "committed" : "rejected");
	values[1] = BoolGetDatum(out.replayed);
	values[2] = Int64GetDatum(out.id);
	nulls[2] = !out.committed;
	values[3] = PointerGetDatum(req.tenant_id);
	values[4] = PointerGetDatum(req.trace_id);
	values[5] = CStringGetTextDatum(out.kind);
	values[6] = NumericGetDatum(billing_micros_to_numeric(out.amount));
	values[7] = NumericGetDatum(billing_micros_to_numeric(out.balance_after));
	nulls[7] = !out.committed;
	values[8] = TimestampTzGetDatum(out.created_at);
	if (out.committed)
	{
		nulls[9] = nulls[10] = nulls[11] = true;
	}
	else
	{
		values[9] = CStringGetTextDatum(unpack_sql_state(out.sqlerrcode));
		values[10] = CStringGetTextDatum(out.message);
		values[11] = CStringGetTextDatum(out.detail ? out.detail : "");
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* billing_balance(tenant_id) -> numeric: the cached balance, O(1) */
Datum
billing_balance(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	Datum		values[1];
	Oid			types[1] = {TEXTOID};
	int64		balance;
	int			ret;

	billing_check_not_null(fcinfo, 0, "tenant_id");
	tenant = PG_GETARG_TEXT_PP(0);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "billing: SPI_connect failed");
	keep_plan(&plan_balance,
			  "SELECT balance_micros FROM billing.accounts WHERE tenant_id = $1",
			  1, types);
	values[0] = PointerGetDatum(tenant);
	ret = SPI_execute_plan(plan_balance, values, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "billing: balance lookup failed: %s",
			 SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ACCOUNT_NOT_FOUND),
				 errmsg("account \"%s\" does not exist", text_to_cstring(tenant)),
				 errhint("Create it first with billing_account_create(%s).",
						 quote_literal_cstr(text_to_cstring(tenant)))));
	balance = col_int64(0, 1);
	SPI_finish();

	PG_RETURN_NUMERIC(billing_micros_to_numeric(balance));
}
