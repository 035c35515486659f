/*-------------------------------------------------------------------------
 *
 * ledger.c
 *	  billing_credit, billing_deduct, billing_try_deduct, billing_balance:
 *	  the hot path that writes one ledger entry per call.
 *
 * One call = one account row lock, one idempotency probe, one entry insert
 * and one account update, by direct heap and index access (direct.c); the
 * rarer statements (rejections, holds, keys) use SPI plans prepared once
 * per backend.
 *
 * Concurrency.  Every write for a tenant (entries, rejections, holds, the
 * cached balance and counters) happens while holding that tenant's account
 * row lock, taken first as SELECT ... FOR UPDATE would.  The idempotency
 * probe runs after the lock and sees every committed entry (a dirty
 * snapshot; the full replay read takes a fresh snapshot in READ
 * COMMITTED), so a concurrent call with the same trace id either
 * committed before we got the lock (we see its entry and replay it) or
 * rolled back (we see nothing and charge).  The unique index on
 * (tenant_id, trace_id) is only a backstop: no unique violation can reach
 * the caller.  In REPEATABLE READ or SERIALIZABLE, a concurrent change of
 * the same account surfaces as a serialization failure (40001): retry.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "account.h"
#include "catalog/namespace.h"
#include "citus.h"
#include "direct.h"
#include "guc.h"
#include "ledger.h"
#include "spi.h"
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "sync.h"
#include "utils/builtins.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "parser/analyze.h"
#include "utils/lsyscache.h"
#include "utils/array.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

PG_FUNCTION_INFO_V1(billing_credit);
PG_FUNCTION_INFO_V1(billing_deduct);
PG_FUNCTION_INFO_V1(billing_try_deduct);
PG_FUNCTION_INFO_V1(billing_balance);
PG_FUNCTION_INFO_V1(billing_deduct_many);

/* argument positions shared by credit, deduct and try_deduct */
#define ARG_TENANT		0
#define ARG_AMOUNT		1
#define ARG_TRACE		2
#define ARG_DESCRIPTION 3
#define ARG_METADATA	4
#define ARG_EVENT_AT	5
#define ARG_KIND		6
#define ARG_API_KEY		7		/* deduct and try_deduct only */
#define ARG_COUNTS_REQUEST 8	/* billing.internal_deduct only */

static const char *const credit_kinds[] = {"topup", "grant", "refund", "adjustment", NULL};
static const char *const debit_kinds[] = {"deduct", "adjustment", NULL};

/* SPI plans, prepared on first use and kept for the life of the backend */
static SPIPlanPtr plan_probe = NULL;
static SPIPlanPtr plan_reject = NULL;

/* ---------------------------------------------------------------------
 * arguments
 * ---------------------------------------------------------------------
 */
static const char *
kind_list(const char *const *kinds)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; kinds[i] != NULL; i++)
		appendStringInfo(&buf, "%s%s", i > 0 ? ", " : "", kinds[i]);
	return buf.data;
}

/*
 * Parse and check the arguments common to credit, deduct and try_deduct
 * (and billing_charge, which takes billing_deduct's).
 */
void
ledger_parse_request(FunctionCallInfo fcinfo, bool is_debit, LedgerRequest *req)
{
	const char *const *kinds = is_debit ? debit_kinds : credit_kinds;
	EntryWrite *e = &req->entry;
	int64		micros;
	bool		kind_ok = false;
	char	   *kind;

	billing_check_not_null(fcinfo, ARG_TENANT, "tenant_id");
	billing_check_not_null(fcinfo, ARG_AMOUNT, "amount");
	billing_check_not_null(fcinfo, ARG_TRACE, "trace_id");
	billing_check_not_null(fcinfo, ARG_KIND, "kind");

	memset(req, 0, sizeof(*req));
	(void) billing_check_id(PG_GETARG_TEXT_PP(ARG_TENANT), "tenant_id",
							ERRCODE_BILLING_INVALID_TENANT_ID);
	e->trace_id = billing_check_id(PG_GETARG_TEXT_PP(ARG_TRACE), "trace_id",
								   ERRCODE_BILLING_INVALID_TRACE_ID);
	micros = billing_amount_to_micros(PG_GETARG_NUMERIC(ARG_AMOUNT),
									  "amount", false);
	req->is_debit = is_debit;
	e->amount = is_debit ? -micros : micros;
	e->description = billing_check_description(fcinfo, ARG_DESCRIPTION);
	e->metadata = billing_check_metadata(fcinfo, ARG_METADATA);
	/*
	 * billing.internal_deduct (billing_deduct_usage's) may mark usage; the
	 * others may not, once the account is known to be 1.4's (post_one):
	 * 1.3's billing_deduct_usage, run with this library until ALTER EXTENSION
	 * UPDATE, marks usage through billing_deduct.
	 */
	if (is_debit && PG_NARGS() <= ARG_COUNTS_REQUEST && billing_has_usage_mark(e->metadata))
		req->usage_mark = "metadata";
	e->has_event_at = billing_check_event_at(fcinfo, ARG_EVENT_AT, &e->event_at);
	if (is_debit && !PG_ARGISNULL(ARG_API_KEY))
		e->api_key = billing_check_id(PG_GETARG_TEXT_PP(ARG_API_KEY), "api_key",
									  ERRCODE_BILLING_INVALID_ARGUMENT);
	if (is_debit && PG_NARGS() > ARG_COUNTS_REQUEST && !PG_ARGISNULL(ARG_COUNTS_REQUEST))
		req->no_request = !PG_GETARG_BOOL(ARG_COUNTS_REQUEST);

	/* an identifier first (ZB018), so the refusal below shows a bounded one */
	kind = text_to_cstring(billing_check_id(PG_GETARG_TEXT_PP(ARG_KIND), "kind",
											ERRCODE_BILLING_INVALID_ARGUMENT));
	for (int i = 0; kinds[i] != NULL; i++)
		if (strcmp(kind, kinds[i]) == 0)
			kind_ok = true;
	if (!kind_ok)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_KIND),
				 errmsg("invalid %s kind \"%s\"",
						is_debit ? "debit" : "credit", kind),
				 errdetail("Allowed kinds: %s.", kind_list(kinds)),
				 errhint("%s", is_debit ?
						 "Use billing_credit() for money going into the account." :
						 "Use billing_deduct() for money leaving the account.")));
	e->kind = kind;
}

/* ---------------------------------------------------------------------
 * idempotency
 * ---------------------------------------------------------------------
 */
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
	return has ? billing_format_ts(ts) : "null";
}

static void own_trace_rejection(MemoryContext cxt, Rejection *r);

/*
 * The probe found an earlier request with this trace id (row 0 of the SPI
 * result).  Raise the trace id conflict error unless every field matches.
 * Probe columns: 1 committed, 2 id, 3 kind, 4 amount, 5 balance_after,
 * 6 version, 7 description, 8 metadata, 9 event_at, 10 created_at,
 * 11 api_key, 12 sqlstate, 13 reason, 14 detail.
 */
static bool
check_same_request(EntryWrite *req, MemoryContext cxt, Rejection *conflict)
{
	bool		isnull;
	char	   *kind = TextDatumGetCString(billing_col(0, 3, &isnull));
	int64		amount = billing_col_int64(0, 4, 0);
	Datum		d;
	text	   *description;
	Jsonb	   *metadata;
	text	   *api_key;
	bool		has_event_at;
	TimestampTz event_at = 0;
	StringInfoData fields;
	StringInfoData detail;

	d = billing_col(0, 7, &isnull);
	description = isnull ? NULL : DatumGetTextPP(d);
	d = billing_col(0, 8, &isnull);
	metadata = isnull ? NULL : DatumGetJsonbP(d);
	d = billing_col(0, 9, &isnull);
	has_event_at = !isnull;
	if (has_event_at)
		event_at = DatumGetTimestampTz(d);
	d = billing_col(0, 11, &isnull);
	api_key = isnull ? NULL : DatumGetTextPP(d);

	/*
	 * billing's own entry (a grant's expiry, which this very call may have
	 * written just before) is never a request's original: ZB014, as for any
	 * new request with a trace id of billing's
	 */
	if (strcmp(kind, "expire") == 0 && strcmp(req->kind, "expire") != 0)
	{
		own_trace_rejection(cxt, conflict);
		return false;
	}

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
		DIFFERS("description", billing_describe_text(description),
				billing_describe_text(req->description));
	if (metadata == NULL ||
		compareJsonbContainers(&metadata->root, &req->metadata->root) != 0)
		DIFFERS("metadata", billing_describe_jsonb(metadata),
				billing_describe_jsonb(req->metadata));
	if (has_event_at != req->has_event_at ||
		(has_event_at && event_at != req->event_at))
		DIFFERS("event_at", show_ts(has_event_at, event_at),
				show_ts(req->has_event_at, req->event_at));
	if (!text_equal(api_key, req->api_key))
		DIFFERS("api_key", show_text(api_key), show_text(req->api_key));
#undef DIFFERS

	if (fields.len == 0)
		return true;
	conflict->sqlerrcode = ERRCODE_BILLING_TRACE_CONFLICT;
	conflict->message = MemoryContextStrdup(cxt,
											psprintf("trace id \"%s\" was already used with a different %s",
													 text_to_cstring(req->trace_id), fields.data));
	conflict->detail = MemoryContextStrdup(cxt,
										   psprintf("Ledger amounts are signed (debits negative). %s.",
													detail.data));
	conflict->hint = MemoryContextStrdup(cxt,
										 "Resend the original request unchanged to get its result, "
										 "or use a new trace id for a new request.");
	return false;
}

static int
sqlstate_from_text(const char *s)
{
	if (s == NULL || strlen(s) != 5)
		return ERRCODE_INTERNAL_ERROR;
	return MAKE_SQLSTATE(s[0], s[1], s[2], s[3], s[4]);
}

/*
 * Look the trace id up among the entries and recorded rejections.  On a
 * hit, fill *out as a replay (or raise the conflict / the recorded
 * rejection) and return true.
 */
static bool
probe_trace(Account *acc, EntryWrite *req, PostMode mode, LedgerOutcome *out)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	bool		isnull;

	billing_keep_plan(&plan_probe,
					  "SELECT true, entry_id, kind, amount_micros, balance_after_micros, "
					  "       version, description, metadata, event_at, created_at, "
					  "       api_key, NULL::text, NULL::text, NULL::text "
					  "  FROM billing.entries WHERE tenant_id = $1 AND trace_id = $2 "
					  "UNION ALL "
					  "SELECT false, rejection_id, kind, amount_micros, NULL, NULL, "
					  "       description, metadata, event_at, created_at, "
					  "       api_key, sqlstate, reason, detail "
					  "  FROM billing.rejections WHERE tenant_id = $1 AND trace_id = $2 "
					  "LIMIT 1",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(req->trace_id);
	billing_spi_exec(plan_probe, values, NULL, SPI_OK_SELECT, "idempotency probe");
	if (SPI_processed == 0)
		return false;

	if (!check_same_request(req, acc->cxt, &out->rejection))
	{
		if (mode != POST_RETURN)
			billing_raise_error(&out->rejection);
		out->committed = false;
		out->replayed = false;
		return true;
	}
	out->replayed = true;
	out->committed = DatumGetBool(billing_col(0, 1, &isnull));
	out->id = billing_col_int64(0, 2, 0);
	out->kind = billing_col_cstring(0, 3, acc->cxt);
	out->amount = billing_col_int64(0, 4, 0);
	out->balance_after = billing_col_int64(0, 5, 0);
	out->version = billing_col_int64(0, 6, 0);
	out->created_at = DatumGetTimestampTz(billing_col(0, 10, &isnull));
	if (!out->committed)
	{
		Rejection  *rej = &out->rejection;
		MemoryContext old;

		rej->sqlerrcode = sqlstate_from_text(billing_col_cstring(0, 12, acc->cxt));
		rej->message = billing_col_cstring(0, 13, acc->cxt);
		rej->detail = billing_col_cstring(0, 14, acc->cxt);
		old = MemoryContextSwitchTo(acc->cxt);
		rej->hint = psprintf("This trace id was rejected at %s and stays rejected; "
							 "retry with a new trace id.",
							 billing_format_ts(out->created_at));
		MemoryContextSwitchTo(old);
		if (mode == POST_RAISE)
			billing_raise_rejection(rej);
		out->refused = true;	/* POST_RETURN: raised (and counted) later */
	}
	return true;
}

/* ---------------------------------------------------------------------
 * API keys of a group of requests: each locked once, saved once
 * ---------------------------------------------------------------------
 */
typedef struct KeyCache
{
	int			n;
	int			max;
	ApiKey	   *keys;
	bool	   *charged;		/* an entry used it: save it */
	ApiKey		none;			/* for requests without a key */
} KeyCache;

static ApiKey *
key_get(Account *acc, KeyCache *kc, text *key_id, bool **charged)
{
	static bool ignored;

	*charged = &ignored;
	if (key_id == NULL)
	{
		memset(&kc->none, 0, sizeof(kc->none));
		return &kc->none;
	}
	for (int i = 0; i < kc->n; i++)
		if (text_equal(kc->keys[i].key_id, key_id))
		{
			*charged = &kc->charged[i];
			return &kc->keys[i];
		}
	if (kc->n == kc->max)
	{
		MemoryContext old = MemoryContextSwitchTo(acc->cxt);

		kc->max = kc->max ? kc->max * 2 : 4;
		kc->keys = kc->keys ? repalloc(kc->keys, sizeof(ApiKey) * kc->max) :
			palloc(sizeof(ApiKey) * kc->max);
		kc->charged = kc->charged ? repalloc(kc->charged, sizeof(bool) * kc->max) :
			palloc(sizeof(bool) * kc->max);
		MemoryContextSwitchTo(old);
	}
	{
		/* the key and its strings live as long as the account */
		MemoryContext old = MemoryContextSwitchTo(acc->cxt);

		account_key_lock(acc, &kc->keys[kc->n], key_id);
		MemoryContextSwitchTo(old);
	}
	kc->charged[kc->n] = false;
	*charged = &kc->charged[kc->n];
	return &kc->keys[kc->n++];
}

/* ZB014's text, in cxt: check_same_request's and billing_check_own_trace's */
static void
own_trace_rejection(MemoryContext cxt, Rejection *r)
{
	r->sqlerrcode = ERRCODE_BILLING_INVALID_TRACE_ID;
	r->message = MemoryContextStrdup(cxt, "trace_id must not start with \"" BILLING_TRACE_PREFIX "\"");
	r->detail = MemoryContextStrdup(cxt, "Trace ids that start with \"" BILLING_TRACE_PREFIX
									"\" are billing's own (the expiry of a grant).");
	r->hint = MemoryContextStrdup(cxt, "Use another prefix.");
}

/*
 * ZB018 for a caller's metadata with the key that marks priced usage (see
 * billing_has_usage_mark), in cxt; only the key is named, never its value
 */
static void
usage_mark_rejection(MemoryContext cxt, const char *argname, Rejection *r)
{
	r->sqlerrcode = ERRCODE_BILLING_INVALID_ARGUMENT;
	r->message = MemoryContextStrdup(cxt, psprintf("%s has the reserved key \"%s\"",
												   argname, BILLING_USAGE_MARK_KEY));
	r->detail = MemoryContextStrdup(cxt, "billing_deduct_usage() marks priced usage with it; "
									"billing.usage_by_token_type reports the charges that have it.");
	r->hint = MemoryContextStrdup(cxt, "Charge priced usage with billing_deduct_usage(), "
								  "or give the key another name.");
}

/*
 * ZB018 for a new entry of another kind than a charge (a capture) whose
 * metadata has the key that marks priced usage: only billing_deduct_usage
 * writes it.  Once the schema has grants (1.4), as for the charges.
 */
void
billing_check_usage_mark(Account *acc, Jsonb *metadata)
{
	if (acc->grants_supported && metadata != NULL && billing_has_usage_mark(metadata))
	{
		Rejection	r = {0};

		usage_mark_rejection(CurrentMemoryContext, "metadata", &r);
		billing_raise_error(&r);
	}
}

/*
 * ZB014 for a new entry or rejection whose trace id starts with "billing:":
 * those are billing's own (a grant's expiry).  Only new ones are refused,
 * and only once the schema has grants (1.4): a replay of an entry recorded
 * before with such an id still works.
 */
void
billing_check_own_trace(Account *acc, text *trace_id)
{
	int			len = VARSIZE_ANY_EXHDR(trace_id);
	int			plen = strlen(BILLING_TRACE_PREFIX);

	/* a database still at 1.3 writes no entries of its own */
	if (acc->grants_supported && len >= plen && memcmp(VARDATA_ANY(trace_id), BILLING_TRACE_PREFIX, plen) == 0)
	{
		Rejection	r = {0};

		own_trace_rejection(CurrentMemoryContext, &r);
		billing_raise_error(&r);
	}
}

/* remember a business rejection so that replays of the trace id get it */
static void
record_rejection(Account *acc, EntryWrite *req, LedgerOutcome *out)
{
	Oid			types[11] = {TEXTOID, TEXTOID, TEXTOID, INT8OID, TEXTOID,
		JSONBOID, TIMESTAMPTZOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[11];
	char		nulls[11];
	bool		isnull;

	billing_check_own_trace(acc, req->trace_id);

	billing_keep_plan(&plan_reject,
					  "INSERT INTO billing.rejections (tenant_id, trace_id, kind, "
					  "  amount_micros, description, metadata, event_at, sqlstate, "
					  "  reason, detail, api_key) "
					  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
					  "ON CONFLICT (tenant_id, trace_id) DO NOTHING "
					  "RETURNING rejection_id, created_at",
					  11, types);
	memset(nulls, ' ', sizeof(nulls));
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(req->trace_id);
	values[2] = CStringGetTextDatum(req->kind);
	values[3] = Int64GetDatum(req->amount);
	values[4] = PointerGetDatum(req->description);
	nulls[4] = req->description ? ' ' : 'n';
	values[5] = JsonbPGetDatum(req->metadata);
	values[6] = TimestampTzGetDatum(req->event_at);
	nulls[6] = req->has_event_at ? ' ' : 'n';
	values[7] = CStringGetTextDatum(unpack_sql_state(out->rejection.sqlerrcode));
	values[8] = CStringGetTextDatum(out->rejection.message);
	values[9] = CStringGetTextDatum(out->rejection.detail ? out->rejection.detail : "");
	values[10] = PointerGetDatum(req->api_key);
	nulls[10] = req->api_key ? ' ' : 'n';
	billing_spi_exec(plan_reject, values, nulls, SPI_OK_INSERT_RETURNING,
					 "recording the rejection");

	/*
	 * Only possible under REPEATABLE READ or SERIALIZABLE: the same trace id
	 * was recorded by a transaction our snapshot cannot see.  (In READ
	 * COMMITTED the probe after the lock would have found it.)
	 */
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to a concurrent charge with trace id \"%s\"",
						text_to_cstring(req->trace_id)),
				 errhint("Retry the transaction; the retry returns the recorded outcome.")));
	metrics_count_refusal(out->rejection.sqlerrcode);
	out->committed = false;
	out->id = billing_col_int64(0, 1, 0);
	out->kind = MemoryContextStrdup(acc->cxt, req->kind);
	out->amount = req->amount;
	out->created_at = DatumGetTimestampTz(billing_col(0, 2, &isnull));
}

/*
 * A write that names a ledger entry by its trace id outside ledger_post
 * (a capture) must not take a trace id recorded as a rejection: (tenant_id,
 * trace_id) is unique across the ledger and the recorded rejections, and a
 * replay of the rejected request must keep returning its rejection.  The
 * entry insert only probes the ledger, so check the rejections here (under
 * the account lock; only when the account has recorded any).  `kind` is
 * the kind of entry this request would write.
 */
void
billing_check_not_rejected(Account *acc, text *trace_id, const char *kind)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	bool		isnull;

	if (acc->rejections == 0)
		return;
	billing_keep_plan(&plan,
					  "SELECT kind, amount_micros, sqlstate, created_at "
					  "FROM billing.rejections WHERE tenant_id = $1 AND trace_id = $2",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(trace_id);
	billing_spi_exec(plan, values, NULL, SPI_OK_SELECT, "rejection probe");
	if (SPI_processed == 0)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_TRACE_CONFLICT),
			 errmsg("trace id \"%s\" was already used with a different kind",
					text_to_cstring(trace_id)),
			 errdetail("kind: original %s of %s, rejected with %s at %s; this request %s.",
					   billing_col_cstring(0, 1, CurrentMemoryContext),
					   billing_format_micros(billing_col_int64(0, 2, 0)),
					   billing_col_cstring(0, 3, CurrentMemoryContext),
					   billing_format_ts(DatumGetTimestampTz(billing_col(0, 4, &isnull))),
					   kind),
			 errhint("The trace id stays rejected; use a new trace id for the %s.", kind)));
}

/* ---------------------------------------------------------------------
 * writing
 * ---------------------------------------------------------------------
 */

static const char *const entry_cols[EC_NCOLS] = {
	"tenant_id", "entry_id", "trace_id", "kind", "amount_micros",
	"balance_after_micros", "version", "description", "metadata", "event_at",
	"created_at", "api_key", "hold_id",
	"actor", "grant_id", "draws", "refund_of"
};

static const Oid entry_types[EC_NCOLS] = {
	TEXTOID, INT8OID, TEXTOID, TEXTOID, INT8OID,
	INT8OID, INT8OID, TEXTOID, JSONBOID, TIMESTAMPTZOID,
	TIMESTAMPTZOID, TEXTOID, INT8OID,
	TEXTOID, INT8OID, INT8ARRAYOID, INT8OID
};

static int64 insert_entry(Account *acc, EntryWrite *e, bool with_account);

/* probed by (tenant_id, trace_id): the key index is entries_trace_key */
DirectTable billing_entries_table = {
	"entries", "entries_trace_key", EC_NCOLS, entry_cols, entry_types, true, 4
};

/*
 * Insert one entry carrying the account's new balance and version (the
 * caller has applied the amount and bumped acc->version) and save the
 * account, in one executor state (account_write).  Returns the entry id,
 * or 0 when an entry with this trace id already exists: then nothing was
 * written.  Under the account lock every billing writer of this tenant has
 * committed or rolled back, so the probe is exact; an insert in progress by
 * anyone else (a restore) is waited for, as a unique index would.
 */
int64
billing_post_entry(Account *acc, EntryWrite *e)
{
	return insert_entry(acc, e, true);
}

/*
 * billing_post_entry, with_account = false: insert the entry only; the
 * caller writes the account later (ledger_post_many: once for a group).
 */
static int64
insert_entry(Account *acc, EntryWrite *e, bool with_account)
{
	Datum		values[EC_NCOLS];
	bool		nulls[EC_NCOLS];
	int64		entry_id;

	if (direct_key_exists(&billing_entries_table, PointerGetDatum(acc->tenant_id),
						  PointerGetDatum(e->trace_id)))
		return 0;
	if (strcmp(e->kind, "expire") != 0)
		billing_check_own_trace(acc, e->trace_id);

	entry_id = direct_nextval("entry_id_seq");
	memset(nulls, false, sizeof(nulls));
	values[EC_TENANT_ID] = PointerGetDatum(acc->tenant_id);
	values[EC_ENTRY_ID] = Int64GetDatum(entry_id);
	values[EC_TRACE_ID] = PointerGetDatum(e->trace_id);
	values[EC_KIND] = CStringGetTextDatum(e->kind);
	values[EC_AMOUNT] = Int64GetDatum(e->amount);
	values[EC_BALANCE_AFTER] = Int64GetDatum(acc->balance);
	values[EC_VERSION] = Int64GetDatum(acc->version);
	values[EC_DESCRIPTION] = PointerGetDatum(e->description);
	nulls[EC_DESCRIPTION] = e->description == NULL;
	values[EC_METADATA] = JsonbPGetDatum(e->metadata);
	values[EC_EVENT_AT] = TimestampTzGetDatum(e->event_at);
	nulls[EC_EVENT_AT] = !e->has_event_at;
	values[EC_CREATED_AT] = TimestampTzGetDatum(acc->now);
	values[EC_API_KEY] = PointerGetDatum(e->api_key);
	nulls[EC_API_KEY] = e->api_key == NULL;
	values[EC_HOLD_ID] = Int64GetDatum(e->hold_id);
	nulls[EC_HOLD_ID] = e->hold_id == 0;
	values[EC_ACTOR] = PointerGetDatum(e->actor ? e->actor : billing_actor());
	values[EC_GRANT_ID] = Int64GetDatum(e->grant_id);
	nulls[EC_GRANT_ID] = e->grant_id == 0;
	nulls[EC_DRAWS] = e->draws == NULL || e->draws->n == 0;
	values[EC_DRAWS] = nulls[EC_DRAWS] ? (Datum) 0 : draws_datum(e->draws);
	values[EC_REFUND_OF] = Int64GetDatum(e->refund_of);
	nulls[EC_REFUND_OF] = e->refund_of == 0;
	if (with_account)
		account_write(acc, true, &billing_entries_table, values, nulls);
	else
		direct_write(PointerGetDatum(acc->tenant_id), &billing_entries_table, values, nulls,
					 NULL, NULL, NULL, NULL, NULL);
	metrics_count_entry(e->kind, e->amount);
	return entry_id;
}

/* what a group's requests left to write when the last one is done */
typedef struct PostGroup
{
	bool		save;			/* the account must be written */
	bool		wrote_entry;	/* an entry was written (last_entry_at) */
} PostGroup;

/* the item ledger_post_many is applying (-1: none): for the charge engine */
int			ledger_item = -1;

/*
 * One request of a group, under the account lock (ledger_post_many):
 * probe, check, write.  `last`: no request of the group follows, so the
 * entry may be written together with the account (one executor state, as
 * one billing_deduct has always done).
 */
static void
post_one(Account *acc, KeyCache *kc, LedgerRequest *req, LedgerOutcome *out,
		 PostMode mode, bool last, PostGroup *gs)
{
	EntryWrite *e = &req->entry;
	Account		before;
	Bucket	   *saved;
	int			nsaved;
	Draws		draws = {0};
	ApiKey	   *key;
	ApiKey		key_before;
	bool	   *key_charged;
	bool		ok = true;

	/* a charge may run no executor at all: let a batch be cancelled */
	CHECK_FOR_INTERRUPTS();
	memset(out, 0, sizeof(*out));

	/*
	 * 2. idempotency: a replay returns the original outcome, whatever changed
	 * since.  An earlier entry with this trace id is found by the write
	 * itself (step 4, an index probe), so the full probe runs up front only
	 * when the account has recorded rejections, which that probe cannot see.
	 */
	if (acc->rejections > 0 && probe_trace(acc, e, mode, out))
		return;

	/*
	 * The key that marks priced usage, from a caller: refused, unless this
	 * is a replay (of a charge 1.3 let through), as below.  A database still
	 * at 1.3 runs 1.3's billing_deduct_usage, which marks usage through
	 * billing_deduct.
	 */
	if (req->usage_mark != NULL && acc->grants_supported)
	{
		if (acc->rejections == 0 && probe_trace(acc, e, mode, out))
			return;
		/* the charge engine: this caller's error, not the batch's */
		usage_mark_rejection(acc->cxt, req->usage_mark, &out->rejection);
		if (mode != POST_RETURN)
			billing_raise_error(&out->rejection);
		out->committed = false;
		out->replayed = false;
		return;
	}

	/*
	 * An event time outside the accepted window is refused, unless this is
	 * a replay: the original outcome wins over today's rules, as below.
	 */
	if (e->has_event_at)
	{
		/* the session's window, or the one the charge engine's caller had */
		int			window = e->has_event_at_window ? e->event_at_window :
			billing_event_at_window;

		if (!billing_event_at_in_window_of(e->event_at, window))
		{
			Rejection  *r = &out->rejection;
			MemoryContext old;

			if (acc->rejections == 0 && probe_trace(acc, e, mode, out))
				return;
			/* the charge engine: this caller's error, not the batch's */
			old = MemoryContextSwitchTo(acc->cxt);
			r->sqlerrcode = ERRCODE_BILLING_EVENT_AT_WINDOW;
			billing_event_at_window_error(e->event_at, window, &r->message, &r->detail, &r->hint);
			MemoryContextSwitchTo(old);
			if (mode != POST_RETURN)
				billing_raise_error(r);
			out->committed = false;
			out->replayed = false;
			return;
		}
	}

	/* 3. business rules */
	key = key_get(acc, kc, e->api_key, &key_charged);
	/* to undo the in-memory charge on a replay (the buckets are an array) */
	before = *acc;
	key_before = *key;
	grants_copy(acc, &saved, &nsaved);
	if (req->is_debit)
	{
		Debit		debit = {0};

		debit.charge = -e->amount;
		debit.counts_request = !req->no_request;
		debit.funds_errcode = ERRCODE_BILLING_INSUFFICIENT_FUNDS;
		debit.draws = &draws;
		e->draws = &draws;
		ok = account_check_debit(acc, key, &debit, &out->rejection);
		if (ok)
			account_apply_debit(acc, key, &debit);
	}
	else if (strcmp(acc->status, "closed") == 0)
	{
		MemoryContext old = MemoryContextSwitchTo(acc->cxt);

		out->rejection.sqlerrcode = ERRCODE_BILLING_ACCOUNT_CLOSED;
		out->rejection.message = psprintf("account \"%s\" is closed", acc->tenant);
		out->rejection.detail = psprintf("A closed account accepts no entries (this %s of %s was refused).",
										 e->kind, billing_format_micros(e->amount));
		out->rejection.hint = pstrdup("Closed is final: open a new account for this customer.");
		MemoryContextSwitchTo(old);
		ok = false;
	}
	else
		acc->balance = billing_add_micros(acc->balance, e->amount, "account balance");

	if (!ok)
	{
		/* a replay of an earlier request wins over today's rules */
		if (acc->rejections == 0 && probe_trace(acc, e, mode, out))
			return;
		if (mode == POST_RAISE)
			billing_raise_rejection(&out->rejection);
		out->refused = true;
		if (mode == POST_RETURN)
			return;				/* the rejection is the outcome; nothing recorded */
		record_rejection(acc, e, out);

		/*
		 * Save the account (its rejection count, and holds if any expired):
		 * rewriting the row also makes a REPEATABLE READ or SERIALIZABLE
		 * transaction whose snapshot predates this rejection fail with a
		 * serialization error when it locks the account, instead of deciding
		 * the same trace id afresh.
		 */
		acc->rejections++;
		gs->save = true;
		return;
	}

	/*
	 * 4. write the entry (and, for the last request, the account with it).
	 * The thresholds see this request's key (events_before_write: its
	 * budget's quota.threshold), as billing_deduct's account_write does.
	 */
	acc->version++;
	acc->key = key;
	if (last)
		out->id = insert_entry(acc, e, true);
	else
		out->id = insert_entry(acc, e, false);
	if (out->id == 0)
	{
		/*
		 * The trace id is taken: a replay (or a conflict, which raises).
		 * Nothing was written; forget the charge applied in memory (balance,
		 * counters, version) but keep the expiry of holds done on the way.
		 */
		if (!probe_trace(acc, e, mode, out))
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not serialize access due to a concurrent charge with trace id \"%s\"",
							text_to_cstring(e->trace_id)),
					 errdetail("The entry was committed after this transaction's snapshot was taken."),
					 errhint("Retry the transaction; the retry returns the recorded outcome.")));
		*acc = before;
		*key = key_before;
		grants_restore(acc, saved, nsaved);
		return;
	}
	if (last)
		gs->save = false;		/* written with the entry */
	else
	{
		gs->save = true;
		gs->wrote_entry = true;

		/*
		 * The thresholds this request crossed, announced now with the state
		 * it left (balance, usage, its key's spend), not once for the group
		 * at the account's write: the same events, payloads and order as n
		 * billing_deduct calls (balance.low once per crossing, a
		 * quota.threshold per percentage and per key).  The account's write
		 * at the end runs it again, which announces nothing new.
		 */
		events_before_write(acc);
	}
	*key_charged = true;

	out->committed = true;
	out->kind = e->kind;
	out->amount = e->amount;
	out->balance_after = acc->balance;
	out->version = acc->version;
	out->created_at = acc->now;
}

/*
 * The heart of the ledger: apply n requests of one tenant, in order, under
 * one lock of its account, each checked against the account as the ones
 * before it left it (funds, limits, quotas and key budgets at the exact
 * edge), with one entry per request and one write of the account (and of
 * each API key) for all of them: a group of n charges costs n entry
 * inserts and one update, where n separate calls cost n updates of the
 * row, each slower than the last within one transaction.  billing_deduct
 * and its siblings are groups of one; billing_deduct_many and the charge
 * engine group the items of each tenant.
 *
 * Runs inside the caller's transaction; any ERROR rolls back everything it
 * did.  Outcomes (and their strings) are allocated in the caller's memory
 * context.  With nowait, an account locked by another transaction is not
 * waited for: false is returned and nothing was done (the charge engine
 * tries again later); otherwise true.
 */
bool
ledger_post_many(text *tenant_id, LedgerRequest **reqs, LedgerOutcome **outs,
				 int n, PostMode mode, bool nowait)
{
	MemoryContext outer;
	MemoryContext item_cxt = NULL;
	Account		acc;
	KeyCache	kc;
	PostGroup	gs = {0};

	/* a charge may run no executor at all: let a batch be cancelled */
	CHECK_FOR_INTERRUPTS();
	ledger_item = -1;
	memset(&kc, 0, sizeof(kc));
	outer = billing_spi_connect();

	/* 1. lock the account: every write for this tenant serializes here */
	switch (account_try_lock(&acc, tenant_id, outer, nowait))
	{
		case ACCOUNT_LOCKED:
			break;
		case ACCOUNT_BUSY:
			SPI_finish();
			return false;
		case ACCOUNT_MISSING:
			{
				Rejection	rej;
				MemoryContext old = MemoryContextSwitchTo(outer);

				account_missing(acc.tenant, &rej);
				MemoryContextSwitchTo(old);
				if (mode != POST_RETURN)
					billing_raise_error(&rej);
				for (int i = 0; i < n; i++)
				{
					memset(outs[i], 0, sizeof(LedgerOutcome));
					outs[i]->rejection = rej;
				}
				SPI_finish();
				return true;
			}
	}
	account_expire_due(&acc);

	/* per-request scratch memory, so that a big group runs in constant space */
	if (n > 1)
		item_cxt = AllocSetContextCreate(CurrentMemoryContext, "billing ledger request",
										 ALLOCSET_DEFAULT_SIZES);
	for (int i = 0; i < n; i++)
	{
		MemoryContext old = CurrentMemoryContext;

		ledger_item = i;
		if (item_cxt)
			MemoryContextSwitchTo(item_cxt);
		post_one(&acc, &kc, reqs[i], outs[i], mode, i == n - 1, &gs);
		MemoryContextSwitchTo(old);
		if (item_cxt)
			MemoryContextReset(item_cxt);
	}
	ledger_item = -1;
	if (item_cxt)
		MemoryContextDelete(item_cxt);

	/*
	 * 5. the account, unless the last request wrote it with its entry; a
	 * call that wrote nothing saves it only if holds or grants expired on
	 * the way (account_finish)
	 */
	if (gs.save)
	{
		/* only rejections to count: a new version if holds expired */
		if (!gs.wrote_entry && acc.holds_changed)
			acc.version++;
		account_save(&acc, gs.wrote_entry);
	}
	else
		account_finish(&acc);
	for (int i = 0; i < kc.n; i++)
		if (kc.charged[i])
			account_key_save(&acc, &kc.keys[i]);
	SPI_finish();
	return true;
}

/* one request: a group of one */
static void
ledger_post(text *tenant_id, LedgerRequest *req, PostMode mode,
			LedgerOutcome *out)
{
	(void) ledger_post_many(tenant_id, &req, &out, 1, mode, false);
}

/* billing.entry_result for credit and deduct (and billing_charge) */
Datum
ledger_entry_result(FunctionCallInfo fcinfo, text *tenant_id, text *trace_id,
					LedgerOutcome *out)
{
	TupleDesc	tupdesc;
	Datum		values[9];
	bool		nulls[9] = {0};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);

	values[0] = Int64GetDatum(out->id);
	values[1] = PointerGetDatum(tenant_id);
	values[2] = PointerGetDatum(trace_id);
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

	ledger_parse_request(fcinfo, false, &req);
	ledger_post(PG_GETARG_TEXT_PP(ARG_TENANT), &req, POST_RAISE, &out);
	return ledger_entry_result(fcinfo, PG_GETARG_TEXT_PP(ARG_TENANT), req.entry.trace_id, &out);
}

/*
 * billing_deduct(tenant_id, amount, trace_id, description, metadata,
 *				  event_at, kind DEFAULT 'deduct', api_key)
 *	-> billing.entry_result
 */
Datum
billing_deduct(PG_FUNCTION_ARGS)
{
	LedgerRequest req;
	LedgerOutcome out;

	ledger_parse_request(fcinfo, true, &req);
	ledger_post(PG_GETARG_TEXT_PP(ARG_TENANT), &req, POST_RAISE, &out);
	return ledger_entry_result(fcinfo, PG_GETARG_TEXT_PP(ARG_TENANT), req.entry.trace_id, &out);
}

/* the columns of billing.charge_outcome */
static void
outcome_values(LedgerOutcome *out, Datum tenant, Datum trace, Datum *values,
			   bool *nulls)
{
	memset(nulls, 0, sizeof(bool) * 13);
	values[0] = CStringGetTextDatum(out->committed ? "committed" : "rejected");
	values[1] = BoolGetDatum(out->replayed);
	values[2] = Int64GetDatum(out->id);
	nulls[2] = !out->committed;
	values[3] = tenant;
	values[4] = trace;
	values[5] = CStringGetTextDatum(out->kind);
	values[6] = NumericGetDatum(billing_micros_to_numeric(out->amount));
	values[7] = NumericGetDatum(billing_micros_to_numeric(out->balance_after));
	nulls[7] = !out->committed;
	values[8] = Int64GetDatum(out->version);
	nulls[8] = !out->committed;
	values[9] = TimestampTzGetDatum(out->created_at);
	if (out->committed)
		nulls[10] = nulls[11] = nulls[12] = true;
	else
	{
		values[10] = CStringGetTextDatum(unpack_sql_state(out->rejection.sqlerrcode));
		values[11] = CStringGetTextDatum(out->rejection.message);
		values[12] = CStringGetTextDatum(out->rejection.detail ? out->rejection.detail : "");
	}
}

/*
 * billing_try_deduct(...same arguments...) -> billing.charge_outcome
 *
 * Business rejections (funds, status, quotas, caps, key) are returned and
 * recorded instead of raised, so a replay of the trace id returns the same
 * rejection.  Caller bugs (bad arguments, a trace id conflict, an unknown
 * tenant or key) still raise.
 */
Datum
billing_try_deduct(PG_FUNCTION_ARGS)
{
	LedgerRequest req;
	LedgerOutcome out;
	TupleDesc	tupdesc;
	Datum		values[13];
	bool		nulls[13] = {0};

	ledger_parse_request(fcinfo, true, &req);
	ledger_post(PG_GETARG_TEXT_PP(ARG_TENANT), &req, POST_RECORD, &out);

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "billing: return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	outcome_values(&out, PG_GETARG_DATUM(ARG_TENANT), PointerGetDatum(req.entry.trace_id),
				   values, nulls);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* ---------------------------------------------------------------------
 * the batch API
 * ---------------------------------------------------------------------
 */
typedef struct BatchItem
{
	int			index;			/* position in the input arrays */
	text	   *tenant_id;
	LedgerRequest req;
	LedgerOutcome out;
} BatchItem;

int
ledger_tenant_cmp(const text *a, const text *b)
{
	int			la = VARSIZE_ANY_EXHDR(a);
	int			lb = VARSIZE_ANY_EXHDR(b);
	int			c = memcmp(VARDATA_ANY(a), VARDATA_ANY(b), Min(la, lb));

	if (c != 0)
		return c;
	return la == lb ? 0 : la < lb ? -1 : 1;
}

static int
cmp_items(const void *a, const void *b)
{
	const BatchItem *x = (const BatchItem *) a;
	const BatchItem *y = (const BatchItem *) b;
	int			c = ledger_tenant_cmp(x->tenant_id, y->tenant_id);

	return c != 0 ? c : x->index - y->index;
}

/*
 * Citus: is the tenant stored on this node?  (Always, without Citus.)
 */
static bool
tenant_is_local(text *tenant)
{
	Oid			nsp = get_namespace_oid("billing", false);
	int64		shardid;

	return OidIsValid(billing_shard_relid_if_local(get_relname_relid("accounts", nsp),
												   PointerGetDatum(tenant), &shardid));
}

/*
 * An item of a batch whose tenant is on another node (Citus): the same
 * charge by billing_deduct / billing_try_deduct called through SQL, which
 * Citus delegates to the tenant's node inside this transaction (the
 * functions are force-delegated).  One round trip per item; when the batch
 * wrote on several nodes Citus commits it with two-phase commit.  Every
 * argument is typed: the schema of the API is the database owner's, and an
 * untyped literal would let an overload planted there (text where the API
 * has timestamptz) win the call, which runs as the extension's owner.
 */
/*
 * While remote_post prepares and runs its plan, every parse analysis of a
 * call of billing_deduct or billing_try_deduct (also the one PostgreSQL
 * does again from the plan's text after a schema change) must find the
 * function in remote_guard_nsp.  The name checked before the call is the
 * schema's of then; a rename committed between that check and a new parse
 * could make the text name another schema, whose function this SECURITY
 * DEFINER code would run as the extension's owner.  That call fails
 * instead (55000).
 */
static post_parse_analyze_hook_type prev_post_parse_analyze = NULL;
static Oid	remote_guard_nsp = InvalidOid;

static void
remote_guard(ParseState *pstate, Query *query, JumbleState *jstate)
{
	ListCell   *lc;

	if (prev_post_parse_analyze)
		prev_post_parse_analyze(pstate, query, jstate);
	if (!OidIsValid(remote_guard_nsp))
		return;
	foreach(lc, query->rtable)
	{
		RangeTblEntry *rte = lfirst(lc);
		ListCell   *f;

		if (rte->rtekind != RTE_FUNCTION)
			continue;
		foreach(f, rte->functions)
		{
			RangeTblFunction *rtf = lfirst(f);
			Oid			fn;
			char	   *name;

			if (!IsA(rtf->funcexpr, FuncExpr))
				continue;
			fn = ((FuncExpr *) rtf->funcexpr)->funcid;
			name = get_func_name(fn);
			if (name != NULL &&
				(strcmp(name, "billing_deduct") == 0 || strcmp(name, "billing_try_deduct") == 0) &&
				get_func_namespace(fn) != remote_guard_nsp)
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("the schema of billing's functions changed during the call"),
						 errdetail("A charge of a tenant on another node found %s in schema oid %u, not in the extension's schema (oid %u).",
								   name, get_func_namespace(fn), remote_guard_nsp),
						 errhint("Call again: nothing of this call was written.")));
		}
	}
}

void
ledger_init(void)
{
	prev_post_parse_analyze = post_parse_analyze_hook;
	post_parse_analyze_hook = remote_guard;
}

static void
remote_post(Oid nsp, BatchItem *it, PostMode mode, LedgerOutcome *out)
{
	static SPIPlanPtr plan_raise = NULL;
	static SPIPlanPtr plan_record = NULL;
	static Oid	plan_nsp = InvalidOid;
	static char plan_nspname[NAMEDATALEN] = "";
	Oid			types[6] = {TEXTOID, NUMERICOID, TEXTOID, TEXTOID, JSONBOID, TEXTOID};
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	EntryWrite *e = &it->req.entry;
	SPIPlanPtr	plan;
	bool		isnull;
	const char *schema;
	MemoryContext outer;

	const char *nspname = get_namespace_name(nsp);

	if (nspname == NULL)
		elog(ERROR, "billing: the schema of billing_deduct_many (oid %u) is gone", nsp);

	/*
	 * The plans name the schema (SQL calls functions by name), so they are
	 * kept for its name, not only its oid: a kept plan is parsed again from
	 * its text whenever a schema changes, and after a rename that text would
	 * find whatever now has the old name, maybe a function the database
	 * owner put there, which this SECURITY DEFINER code would run as the
	 * extension's owner.
	 */
	if (plan_nsp != nsp || strcmp(plan_nspname, nspname) != 0)
	{
		if (plan_raise)
			SPI_freeplan(plan_raise);
		if (plan_record)
			SPI_freeplan(plan_record);
		plan_raise = plan_record = NULL;
		plan_nsp = nsp;
		strlcpy(plan_nspname, nspname, sizeof(plan_nspname));
	}
	schema = quote_identifier(nspname);
	outer = billing_spi_connect();
	values[0] = PointerGetDatum(it->tenant_id);
	values[1] = NumericGetDatum(billing_micros_to_numeric(-e->amount));
	values[2] = PointerGetDatum(e->trace_id);
	values[3] = PointerGetDatum(e->description);
	nulls[3] = e->description ? ' ' : 'n';
	values[4] = JsonbPGetDatum(e->metadata);
	values[5] = PointerGetDatum(e->api_key);
	nulls[5] = e->api_key ? ' ' : 'n';
	remote_guard_nsp = nsp;
	PG_TRY();
	{
		if (mode == POST_RAISE)
			plan = billing_keep_plan(&plan_raise,
									 psprintf("SELECT 'committed', replayed, entry_id, kind, "
											  "(amount * 1000000)::bigint, (balance_after * 1000000)::bigint, "
											  "version, created_at, NULL::text, NULL::text, NULL::text "
											  "FROM %s.billing_deduct($1, $2, $3, $4, $5, NULL::pg_catalog.timestamptz, "
											  "'deduct'::pg_catalog.text, $6)",
											  schema), 6, types);
		else
			plan = billing_keep_plan(&plan_record,
									 psprintf("SELECT status, replayed, entry_id, kind, "
											  "(amount * 1000000)::bigint, (balance_after * 1000000)::bigint, "
											  "version, created_at, sqlstate, reason, detail "
											  "FROM %s.billing_try_deduct($1, $2, $3, $4, $5, NULL::pg_catalog.timestamptz, "
											  "'deduct'::pg_catalog.text, $6)",
											  schema), 6, types);
		billing_spi_exec(plan, values, nulls, SPI_OK_SELECT, "charging an item on another node");
	}
	PG_FINALLY();
	{
		remote_guard_nsp = InvalidOid;
	}
	PG_END_TRY();
	if (SPI_processed != 1)
		elog(ERROR, "billing: a charge on another node returned %d rows", (int) SPI_processed);
	memset(out, 0, sizeof(*out));
	out->committed = strcmp(billing_col_cstring(0, 1, outer), "committed") == 0;
	out->replayed = DatumGetBool(billing_col(0, 2, &isnull));
	out->id = billing_col_int64(0, 3, 0);
	out->kind = billing_col_cstring(0, 4, outer);
	out->amount = billing_col_int64(0, 5, 0);
	out->balance_after = billing_col_int64(0, 6, 0);
	out->version = billing_col_int64(0, 7, 0);
	out->created_at = DatumGetTimestampTz(billing_col(0, 8, &isnull));
	if (!out->committed)
	{
		out->rejection.sqlerrcode = sqlstate_from_text(billing_col_cstring(0, 9, outer));
		out->rejection.message = billing_col_cstring(0, 10, outer);
		out->rejection.detail = billing_col_cstring(0, 11, outer);
	}
	SPI_finish();
}

/* the elements of an optional array argument, or NULL; checks its length */
static Datum *
batch_array(FunctionCallInfo fcinfo, int argno, Oid elemtype, int n,
			const char *argname, bool **elem_nulls)
{
	ArrayType  *arr;
	Datum	   *elems;
	int			nelems;
	int16		typlen;
	bool		typbyval;
	char		typalign;

	*elem_nulls = NULL;
	if (PG_ARGISNULL(argno))
		return NULL;
	arr = PG_GETARG_ARRAYTYPE_P(argno);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("%s must be a one-dimensional array", argname),
				 errhint("Pass one element per item.")));
	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	deconstruct_array(arr, elemtype, typlen, typbyval, typalign, &elems, elem_nulls, &nelems);
	if (n >= 0 && nelems != n)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("%s has %d elements, tenant_ids has %d", argname, nelems, n),
				 errhint("Pass arrays of the same length: one element per item.")));
	return elems;
}

/*
 * billing_deduct_many(tenant_ids text[], amounts numeric[], trace_ids text[],
 *					   descriptions text[], metadata jsonb[], api_keys text[],
 *					   on_reject text DEFAULT 'raise')
 *	-> SETOF billing.charge_outcome, one row per item, in input order
 *
 * Every item follows the rules of billing_deduct (idempotency by trace id,
 * limits, funds).  on_reject 'raise': the first business rejection raises
 * and the whole batch rolls back; 'record': rejections are recorded and
 * returned per item, like billing_try_deduct, and the other items commit.
 * Bad arguments always raise.  Items are applied in tenant order (then
 * input order), so concurrent batches over the same tenants lock accounts
 * in the same order: they wait for each other, never deadlock.
 */
Datum
billing_deduct_many(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum	   *tenants;
	Datum	   *amounts;
	Datum	   *traces;
	Datum	   *descs;
	Datum	   *metas;
	Datum	   *keys;
	bool	   *tenant_nulls;
	bool	   *amount_nulls;
	bool	   *trace_nulls;
	bool	   *desc_nulls;
	bool	   *meta_nulls;
	bool	   *key_nulls;
	int			n;
	PostMode	mode;
	BatchItem  *items;
	BatchItem **by_index;
	Jsonb	   *empty_metadata;
	char	   *on_reject;

	billing_check_not_null(fcinfo, 0, "tenant_ids");
	billing_check_not_null(fcinfo, 1, "amounts");
	billing_check_not_null(fcinfo, 2, "trace_ids");
	billing_check_not_null(fcinfo, 6, "on_reject");
	on_reject = text_to_cstring(PG_GETARG_TEXT_PP(6));
	if (strcmp(on_reject, "raise") == 0)
		mode = POST_RAISE;
	else if (strcmp(on_reject, "record") == 0)
		mode = POST_RECORD;
	else
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("on_reject must be 'raise' or 'record'"),
				 errdetail("The value given was %s.", quote_literal_cstr(on_reject)),
				 errhint("'raise': a rejection aborts the batch; 'record': it is returned per item.")));

	InitMaterializedSRF(fcinfo, 0);

	tenants = batch_array(fcinfo, 0, TEXTOID, -1, "tenant_ids", &tenant_nulls);
	n = ArrayGetNItems(ARR_NDIM(PG_GETARG_ARRAYTYPE_P(0)), ARR_DIMS(PG_GETARG_ARRAYTYPE_P(0)));
	if (n > 100000)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("a batch has at most 100000 items"),
				 errdetail("This one has %d.", n),
				 errhint("Split it into several calls.")));
	amounts = batch_array(fcinfo, 1, NUMERICOID, n, "amounts", &amount_nulls);
	traces = batch_array(fcinfo, 2, TEXTOID, n, "trace_ids", &trace_nulls);
	descs = batch_array(fcinfo, 3, TEXTOID, n, "descriptions", &desc_nulls);
	metas = batch_array(fcinfo, 4, JSONBOID, n, "metadata", &meta_nulls);
	keys = batch_array(fcinfo, 5, TEXTOID, n, "api_keys", &key_nulls);

	items = palloc0(sizeof(BatchItem) * Max(n, 1));
	by_index = palloc(sizeof(BatchItem *) * Max(n, 1));
	empty_metadata = NULL;
	for (int i = 0; i < n; i++)
	{
		BatchItem  *it = &items[i];
		EntryWrite *e = &it->req.entry;
		char		name[64];

		it->index = i;
		if (tenant_nulls[i] || amount_nulls[i] || trace_nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_NULL_ARGUMENT),
					 errmsg("item %d has a null tenant_id, amount or trace_id", i + 1),
					 errhint("Every item needs a tenant, an amount and a trace id.")));
		it->tenant_id = billing_check_id(DatumGetTextPP(tenants[i]), "tenant_id",
										 ERRCODE_BILLING_INVALID_TENANT_ID);
		e->trace_id = billing_check_id(DatumGetTextPP(traces[i]), "trace_id",
									   ERRCODE_BILLING_INVALID_TRACE_ID);
		snprintf(name, sizeof(name), "amount of item %d", i + 1);
		e->amount = -billing_amount_to_micros(DatumGetNumeric(amounts[i]), name, false);
		it->req.is_debit = true;
		e->kind = "deduct";
		if (descs && !desc_nulls[i])
		{
			snprintf(name, sizeof(name), "description of item %d", i + 1);
			e->description = billing_check_text_value(DatumGetTextPP(descs[i]), name,
													  BILLING_MAX_DESCRIPTION_CHARS);
		}
		if (metas && !meta_nulls[i])
		{
			snprintf(name, sizeof(name), "metadata of item %d", i + 1);
			e->metadata = billing_check_metadata_value(DatumGetJsonbP(metas[i]), name);
			if (billing_has_usage_mark(e->metadata))
				it->req.usage_mark = pstrdup(name);
		}
		else
		{
			/* one shared '{}' (parsing it per item cost kilobytes each) */
			if (empty_metadata == NULL)
				empty_metadata = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
			e->metadata = empty_metadata;
		}
		if (keys && !key_nulls[i])
			e->api_key = billing_check_id(DatumGetTextPP(keys[i]), "api_key",
										  ERRCODE_BILLING_INVALID_ARGUMENT);
	}

	/* a global lock order: tenants ascending */
	qsort(items, n, sizeof(BatchItem), cmp_items);

	/*
	 * The items of one tenant are one group: one account lock and one
	 * account write for all of them (ledger_post_many), so that a batch of
	 * many items for one tenant costs linear time.
	 */
	{
		LedgerRequest **reqs = palloc(sizeof(LedgerRequest *) * Max(n, 1));
		LedgerOutcome **outs = palloc(sizeof(LedgerOutcome *) * Max(n, 1));
		int			start = 0;

		for (int i = 0; i < n; i++)
		{
			reqs[i] = &items[i].req;
			outs[i] = &items[i].out;
			by_index[items[i].index] = &items[i];
		}
		while (start < n)
		{
			int			end = start + 1;

			while (end < n && text_equal(items[end].tenant_id, items[start].tenant_id))
				end++;
			if (tenant_is_local(items[start].tenant_id))
				ledger_post_many(items[start].tenant_id, &reqs[start], &outs[start],
								 end - start, mode, false);
			else
			{
				/* Citus: another node's tenant, one delegated call per item */
				MemoryContext batch_cxt = CurrentMemoryContext;
				MemoryContext item_cxt = AllocSetContextCreate(CurrentMemoryContext,
															   "billing batch item",
															   ALLOCSET_DEFAULT_SIZES);

				for (int i = start; i < end; i++)
				{
					LedgerOutcome *out = &items[i].out;

					/* per-item scratch memory, so a big batch runs in constant space */
					MemoryContextSwitchTo(item_cxt);
					remote_post(get_func_namespace(fcinfo->flinfo->fn_oid), &items[i], mode, out);
					MemoryContextSwitchTo(batch_cxt);
					out->kind = pstrdup(out->kind);
					if (!out->committed)
					{
						out->rejection.message = pstrdup(out->rejection.message);
						out->rejection.detail = out->rejection.detail ? pstrdup(out->rejection.detail) : NULL;
						out->rejection.hint = NULL;
					}
					MemoryContextReset(item_cxt);
				}
				MemoryContextDelete(item_cxt);
			}
			start = end;
		}
	}

	for (int i = 0; i < n; i++)
	{
		Datum		values[13];
		bool		nulls[13] = {0};

		outcome_values(&by_index[i]->out, PointerGetDatum(by_index[i]->tenant_id),
					   PointerGetDatum(by_index[i]->req.entry.trace_id), values, nulls);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * billing_balance(tenant_id) -> numeric: the cached balance, O(1), less what
 * it still holds of grants that have expired (their 'expire' entries are
 * written by the next call on the account): expired credit is never shown.
 */
Datum
billing_balance(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	DirectReader *r;
	Datum		values[AC_NCOLS];
	bool		nulls[AC_NCOLS];
	bool		found;
	int64		balance;

	billing_check_not_null(fcinfo, 0, "tenant_id");
	tenant = billing_check_id(PG_GETARG_TEXT_PP(0), "tenant_id",
							  ERRCODE_BILLING_INVALID_TENANT_ID);

	r = direct_reader_open(&billing_accounts_table, false);
	found = direct_reader_fetch(r, PointerGetDatum(tenant), values, nulls) == DIRECT_FOUND;
	direct_reader_close(r);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ACCOUNT_NOT_FOUND),
				 errmsg("account \"%s\" does not exist", text_to_cstring(tenant)),
				 errhint("Create it first with billing_account_create(%s).",
						 quote_literal_cstr(text_to_cstring(tenant)))));
	balance = DatumGetInt64(values[AC_BALANCE]);
	if (billing_accounts_table.attnum[AC_GRANTS_STATE] != InvalidAttrNumber &&
		!nulls[AC_GRANTS_STATE])
	{
		Account		acc;
		TimestampTz now = GetCurrentTimestamp();

		memset(&acc, 0, sizeof(acc));
		acc.cxt = CurrentMemoryContext;
		acc.tenant = text_to_cstring(tenant);
		acc.tenant_id = tenant;
		acc.has_next_expiry = !nulls[AC_HOLDS_NEXT_EXPIRY];
		if (acc.has_next_expiry)
			acc.next_expiry = DatumGetTimestampTz(values[AC_HOLDS_NEXT_EXPIRY]);
		grants_load(&acc, values[AC_GRANTS_STATE], false);
		balance = billing_add_micros(balance, -grants_expired_micros(&acc, now), "balance");
		if (acc.has_next_expiry && acc.next_expiry <= now)
		{
			/* rare: holds that expired may have reserved expired credit */
			billing_spi_connect();
			balance = billing_add_micros(balance, -grants_held_expired(&acc, now), "balance");
			SPI_finish();
		}
	}
	PG_RETURN_NUMERIC(billing_micros_to_numeric(balance));
}
