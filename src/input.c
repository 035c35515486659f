/*-------------------------------------------------------------------------
 *
 * input.c
 *	  Money conversions and argument checks shared by every billing
 *	  function.
 *
 * Amounts arrive as numeric and are converted to int64 micro-units with
 * PostgreSQL's own numeric arithmetic: the value must be finite, within
 * range and have at most six significant decimal places (1.5000000 is
 * accepted, 1.0000001 is not).  Nothing here ever uses floating point.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "billing.h"
#include "guc.h"
#include "common/int.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/syscache.h"
#include "utils/fmgrprotos.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

/* cached numeric constants, allocated once per backend */
static Numeric micros_per_unit = NULL;
static Numeric max_amount = NULL;
static Numeric zero_amount = NULL;

static void
init_constants(void)
{
	MemoryContext old;

	if (micros_per_unit != NULL)
		return;
	old = MemoryContextSwitchTo(TopMemoryContext);
	max_amount = int64_to_numeric(BILLING_MAX_AMOUNT_MICROS / BILLING_MICROS_PER_UNIT);
	zero_amount = int64_to_numeric(0);
	micros_per_unit = int64_to_numeric(BILLING_MICROS_PER_UNIT);
	MemoryContextSwitchTo(old);
}

/*
 * A number given, for an error's detail: as it was, or when longer than 64
 * characters (a numeric may have 100,000 digits) its first 64 and how long
 * it was.
 */
static char *
show_number(Datum num)
{
	char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out, num));
	int			len = strlen(s);

	if (len <= 64)
		return s;
	return psprintf("%.64s... (%d characters)", s, len);
}

/*
 * ZB010: a negative amount, or zero where zero is not allowed.  `shown` is
 * the value as the detail shows it.
 */
static void
raise_not_positive(const char *argname, bool allow_zero, const char *shown)
{
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_INVALID_AMOUNT),
			 errmsg("%s must be %s", argname,
					allow_zero ? "zero or positive" : "positive"),
			 errdetail("The value given was %s.", shown),
			 strcmp(argname, "amount") == 0 ?
			 errhint("The function decides the direction of the money: "
					 "use billing_credit() to add and billing_deduct() "
					 "to take away, always with a positive amount.") :
			 errhint("Pass a %s value for %s.",
					 allow_zero ? "zero or positive" : "positive", argname)));
}

/*
 * Convert a numeric amount to micro-units, with one SQLSTATE per way it
 * can be wrong, checked in this order: not finite (ZB011), negative
 * (ZB010), out of range (ZB013), more than six decimal places (ZB012),
 * zero when not allowed (ZB010).  Negative amounts are always rejected,
 * whatever their size or precision: the sign of a ledger entry comes from
 * the function called, never from the caller's number.
 */
int64
billing_amount_to_micros(Numeric num, const char *argname, bool allow_zero)
{
	Datum		scaled;
	Datum		truncated;
	Numeric		absval;

	init_constants();

	if (numeric_is_nan(num) || numeric_is_inf(num))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_AMOUNT_NOT_FINITE),
				 errmsg("%s must be a finite number", argname),
				 errdetail("The value given was %s.", show_number(NumericGetDatum(num))),
				 errhint("Pass a decimal amount with at most %d decimal places.",
						 BILLING_SCALE)));

	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(num),
										  NumericGetDatum(zero_amount))) < 0)
	{
		/* shown with at least six decimals, as the other amounts are */
		Datum		shown = NumericGetDatum(num);

		if (DatumGetInt32(DirectFunctionCall1(numeric_scale, shown)) < BILLING_SCALE)
			shown = DirectFunctionCall2(numeric_round, shown,
										Int32GetDatum(BILLING_SCALE));
		raise_not_positive(argname, allow_zero, show_number(shown));
	}

	absval = DatumGetNumeric(DirectFunctionCall1(numeric_abs,
												 NumericGetDatum(num)));
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp,
										  NumericGetDatum(absval),
										  NumericGetDatum(max_amount))) > 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_AMOUNT_RANGE),
				 errmsg("%s is out of range", argname),
				 errdetail("The value given was %s; the largest allowed is %s.",
						   show_number(NumericGetDatum(num)),
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   NumericGetDatum(max_amount)))),
				 strcmp(argname, "amount") == 0 ?
				 errhint("Split the amount into several entries.") :
				 errhint("Pass at most %s for %s.",
						 DatumGetCString(DirectFunctionCall1(numeric_out,
															 NumericGetDatum(max_amount))),
						 argname)));

	scaled = DirectFunctionCall2(numeric_mul, NumericGetDatum(num),
								 NumericGetDatum(micros_per_unit));
	truncated = DirectFunctionCall2(numeric_trunc, scaled, Int32GetDatum(0));
	if (!DatumGetBool(DirectFunctionCall2(numeric_eq, scaled, truncated)))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_AMOUNT_PRECISION),
				 errmsg("%s has more than %d decimal places", argname,
						BILLING_SCALE),
				 errdetail("The value given was %s.", show_number(NumericGetDatum(num))),
				 errhint("Round the amount to %d decimal places before calling; "
						 "billing never rounds money silently.", BILLING_SCALE)));

	/* in range by the check above, so numeric_int8 cannot fail */
	{
		int64		micros = DatumGetInt64(DirectFunctionCall1(numeric_int8,
															   truncated));

		/* not negative by the check above; zero may still be refused */
		if (micros == 0 && !allow_zero)
			raise_not_positive(argname, allow_zero,
							   billing_format_micros(micros));
		return micros;
	}
}

/* micro-units -> numeric with scale exactly 6 */
Numeric
billing_micros_to_numeric(int64 micros)
{
	return int64_div_fast_to_numeric(micros, BILLING_SCALE);
}

/* micro-units -> "-12.345600" for messages */
char *
billing_format_micros(int64 micros)
{
	uint64		absval;

	absval = micros < 0 ? (uint64) 0 - (uint64) micros : (uint64) micros;
	return psprintf("%s" UINT64_FORMAT ".%06d", micros < 0 ? "-" : "",
					absval / (uint64) BILLING_MICROS_PER_UNIT,
					(int) (absval % (uint64) BILLING_MICROS_PER_UNIT));
}

/* a + b, or an error naming what overflowed */
int64
billing_add_micros(int64 a, int64 b, const char *what)
{
	int64		result;

	if (pg_add_s64_overflow(a, b, &result))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_AMOUNT_RANGE),
				 errmsg("%s would be out of range", what),
				 errdetail("Current value %s, change %s.",
						   billing_format_micros(a), billing_format_micros(b)),
				 errhint("Amounts are limited to what 64-bit micro-units hold.")));
	return result;
}

/*
 * Our functions are not STRICT: a NULL required argument is a caller bug
 * and must be an error, never a silent NULL result.
 */
void
billing_check_not_null(FunctionCallInfo fcinfo, int argno, const char *argname)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_NULL_ARGUMENT),
				 errmsg("%s must not be null", argname),
				 errhint("Pass a value for %s.", argname)));
}

/*
 * A character an identifier must not contain: control characters (C0, DEL,
 * C1) and the invisible ones that make two ids look alike in logs and
 * reports (zero-width spaces and joiners, direction marks and overrides,
 * the soft hyphen, the byte order mark, tag characters).  Returns the code
 * point, or -1 when the character is fine.  Without a UTF-8 server
 * encoding only the ASCII controls are known.
 */
static int
bad_id_char(const unsigned char *p, int len, int *charlen)
{
	pg_wchar	c;

	*charlen = 1;
	if (*p < 0x80)
		return (*p < 0x20 || *p == 0x7F) ? *p : -1;
	if (GetDatabaseEncoding() != PG_UTF8)
	{
		*charlen = pg_mblen((const char *) p);
		return -1;
	}
	*charlen = pg_utf_mblen(p);
	if (*charlen > len)
		return -1;				/* cannot happen in verified text */
	c = utf8_to_unicode(p);
	if ((c >= 0x80 && c <= 0x9F) || c == 0xAD || c == 0x061C || c == 0x180E ||
		(c >= 0x200B && c <= 0x200F) || (c >= 0x202A && c <= 0x202E) ||
		(c >= 0x2060 && c <= 0x206F) || c == 0xFEFF ||
		(c >= 0xFFF0 && c <= 0xFFFB) || (c >= 0xE0000 && c <= 0xE007F))
		return (int) c;
	return -1;
}

/* an id over BILLING_MAX_ID_CHARS characters: its length only, never itself */
static void
raise_id_too_long(const char *argname, int sqlerrcode, int nchars, const char *hint)
{
	ereport(ERROR,
			(errcode(sqlerrcode),
			 errmsg("%s is too long", argname),
			 errdetail("It has %d characters; the limit is %d.",
					   nchars, BILLING_MAX_ID_CHARS),
			 errhint("%s", hint)));
}

/*
 * Identifiers (tenant ids, trace ids, API key ids, ...): non-empty, at most
 * 255 characters, no control or invisible characters.  The error never
 * shows the value itself (it may be anything): its length, or the position
 * and code point of the bad character.
 */
text *
billing_check_id(text *id, const char *argname, int sqlerrcode)
{
	int			len = VARSIZE_ANY_EXHDR(id);
	const unsigned char *p = (const unsigned char *) VARDATA_ANY(id);
	int			nchars = 0;

	if (len == 0)
		ereport(ERROR,
				(errcode(sqlerrcode),
				 errmsg("%s must not be empty", argname),
				 errhint("Pass a non-empty identifier of at most %d characters.",
						 BILLING_MAX_ID_CHARS)));
	for (int i = 0; i < len;)
	{
		int			charlen;
		int			bad = bad_id_char(p + i, len - i, &charlen);

		nchars++;
		if (bad >= 0)
			ereport(ERROR,
					(errcode(sqlerrcode),
					 errmsg("%s contains a control or invisible character", argname),
					 errdetail("Character %d is U+%04X.", nchars, bad),
					 errhint("Use printable characters only, e.g. a UUID or a hash of the request.")));
		i += charlen;
	}
	if (nchars > BILLING_MAX_ID_CHARS)
		raise_id_too_long(argname, sqlerrcode, nchars,
						  "Use a shorter identifier, e.g. a UUID or a hash of the request.");
	return id;
}

/*
 * Only the length of an id (at most BILLING_MAX_ID_CHARS characters), for
 * the extension's internal calls on existing accounts: 1.3 checked no more,
 * so an account of then may have an id billing_check_id refuses now, and
 * the maintenance must still reach it.  Bounds what an error may echo.
 */
text *
billing_check_id_length(text *id, const char *argname, int sqlerrcode)
{
	int			nchars = pg_mbstrlen_with_len(VARDATA_ANY(id), VARSIZE_ANY_EXHDR(id));

	if (nchars > BILLING_MAX_ID_CHARS)
		raise_id_too_long(argname, sqlerrcode, nchars, "Pass the id of an existing account.");
	return id;
}

/*
 * A metadata value: a JSON object of at most BILLING_MAX_METADATA_BYTES
 * (its stored size).  The error shows neither the value nor more than its
 * type and size.
 */
Jsonb *
billing_check_metadata_value(Jsonb *jb, const char *argname)
{
	if (!JB_ROOT_IS_OBJECT(jb) || JB_ROOT_IS_SCALAR(jb))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("%s must be a json object", argname),
				 errdetail("The value given is a json %s.",
						   JB_ROOT_IS_SCALAR(jb) ? "scalar" : "array"),
				 errhint("Pass e.g. '{\"model\": \"gpt-4o\", \"api_key\": \"k1\"}'::jsonb, or leave it out.")));
	if (VARSIZE(jb) > BILLING_MAX_METADATA_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("%s is too large", argname),
				 errdetail("It takes %u bytes; the limit is %d.",
						   (unsigned int) VARSIZE(jb), BILLING_MAX_METADATA_BYTES),
				 errhint("Keep references (ids, URLs) in metadata, not documents.")));
	return jb;
}

/*
 * A debit's metadata from its caller.  billing_deduct_usage() marks a priced
 * usage charge with the key BILLING_USAGE_MARK_KEY, and
 * billing.usage_by_token_type reads the token breakdown of such charges
 * only: a charge made otherwise with that key would put made-up token
 * counts and prices into it.  The ledger refuses it (ledger.c post_one,
 * unless a replay of a charge 1.3 let through).
 */
bool
billing_has_usage_mark(Jsonb *jb)
{
	JsonbValue	key;

	key.type = jbvString;
	key.val.string.val = BILLING_USAGE_MARK_KEY;
	key.val.string.len = strlen(BILLING_USAGE_MARK_KEY);
	return findJsonbValueFromContainer(&jb->root, JB_FOBJECT, &key) != NULL;
}

/* optional metadata: NULL means {}, otherwise a bounded JSON object */
Jsonb *
billing_check_metadata(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	return billing_check_metadata_value(PG_GETARG_JSONB_P(argno), "metadata");
}

/*
 * A free-form text of at most maxchars characters (description, reason,
 * ...); the error shows its length, never the text.
 */
text *
billing_check_text_value(text *t, const char *argname, int maxchars)
{
	int			nchars;

	/* a byte count within the limit cannot hold more characters */
	if (VARSIZE_ANY_EXHDR(t) <= maxchars)
		return t;
	nchars = pg_mbstrlen_with_len(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	if (nchars > maxchars)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("%s is too long", argname),
				 errdetail("It has %d characters; the limit is %d.", nchars, maxchars),
				 errhint("Put structured details in metadata instead.")));
	return t;
}

/* optional description: NULL or at most BILLING_MAX_DESCRIPTION_CHARS */
text *
billing_check_description(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		return NULL;
	return billing_check_text_value(PG_GETARG_TEXT_PP(argno), "description",
									BILLING_MAX_DESCRIPTION_CHARS);
}

/*
 * A text for a message: quoted, and cut to maxchars characters with an
 * ellipsis when longer, so that an error or a log line never carries an
 * unbounded value.
 */
char *
billing_show_text(const char *s, int maxchars)
{
	int			len = strlen(s);
	int			cut = pg_mbcharcliplen(s, len, maxchars);

	if (cut >= len)
		return quote_literal_cstr(s);
	return psprintf("%s...", quote_literal_cstr(pnstrdup(s, cut)));
}

/*
 * What a trace id conflict (ZB005) says about a free-form field that
 * differs: its size, never its content.  The other request may be someone
 * else's (a charging role may charge any tenant), and the content is
 * unbounded.
 */
char *
billing_describe_text(text *t)
{
	if (t == NULL)
		return pstrdup("null");
	return psprintf("%d characters",
					pg_mbstrlen_with_len(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)));
}

char *
billing_describe_jsonb(Jsonb *j)
{
	if (j == NULL)
		return pstrdup("null");
	return psprintf("a json object of %u bytes", (unsigned int) VARSIZE(j));
}

/*
 * Optional event time: NULL or a finite time.  Whether it lies in the
 * accepted window is checked when the call would write something new
 * (billing_check_event_at_window): a replay of an earlier request returns
 * its outcome whenever it comes, even after its event time left the window.
 */
bool
billing_check_event_at(FunctionCallInfo fcinfo, int argno, TimestampTz *event_at)
{
	if (PG_ARGISNULL(argno))
		return false;
	*event_at = PG_GETARG_TIMESTAMPTZ(argno);
	if (TIMESTAMP_NOT_FINITE(*event_at))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_EVENT_AT_WINDOW),
				 errmsg("event_at must be a finite timestamp"),
				 errhint("Pass the time the usage happened, or leave it out.")));
	return true;
}

/*
 * The accepted window of event times: at most billing.event_at_window
 * before now (default 7 days; a superuser may widen it for a backfill) and
 * at most BILLING_EVENT_AT_FUTURE_SECS after it (clock skew).  Usage is
 * bucketed and priced by this time, so an unbounded one would let a caller
 * pick an old price, or break the calendar views of every tenant.
 */
bool
billing_event_at_in_window(TimestampTz event_at)
{
	return billing_event_at_in_window_of(event_at, billing_event_at_window);
}

/* ... of `window` seconds back (the charge engine: its caller's setting) */
bool
billing_event_at_in_window_of(TimestampTz event_at, int window)
{
	TimestampTz now = GetCurrentTimestamp();

	return event_at >= now - (int64) window * USECS_PER_SEC &&
		event_at <= now + (int64) BILLING_EVENT_AT_FUTURE_SECS * USECS_PER_SEC;
}

/* ZB019 unless event_at is in the accepted window */
void
billing_check_event_at_window(TimestampTz event_at)
{
	billing_check_event_at_window_of(event_at, billing_event_at_window);
}

void
billing_check_event_at_window_of(TimestampTz event_at, int window)
{
	char	   *message;
	char	   *detail;
	char	   *hint;

	if (billing_event_at_in_window_of(event_at, window))
		return;
	billing_event_at_window_error(event_at, window, &message, &detail, &hint);
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_EVENT_AT_WINDOW),
			 errmsg_internal("%s", message),
			 errdetail_internal("%s", detail),
			 errhint("%s", hint)));
}

/*
 * ZB019's text for an event time outside the window (palloc'd): what
 * billing_check_event_at_window_of raises, for a caller that returns it as
 * an outcome instead (the charge engine: ledger.c post_one)
 */
void
billing_event_at_window_error(TimestampTz event_at, int window,
							  char **message, char **detail, char **hint)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz earliest = now - (int64) window * USECS_PER_SEC;
	TimestampTz latest = now + (int64) BILLING_EVENT_AT_FUTURE_SECS * USECS_PER_SEC;

	*message = pstrdup("event_at is outside the accepted window");
	*detail = psprintf("It is %s; accepted are %s (billing.event_at_window = %d s before now) to %s.",
					   billing_format_ts(event_at), billing_format_ts(earliest),
					   window, billing_format_ts(latest));
	*hint = pstrdup("Pass the time the usage happened, or leave it out; charging older usage needs a superuser to widen billing.event_at_window.");
}

/*
 * The role that asked for what a call writes: the session's current role
 * (after SET ROLE), not the owner of the SECURITY DEFINER function that
 * runs it.  Ledger entries and account events record it.  The name is
 * looked up once per role and cached; a rename of a role resets the cache.
 */
static Oid	actor_oid = InvalidOid;
static text *actor_name = NULL;

static void
actor_reset(Datum arg, int cacheid, uint32 hashvalue)
{
	actor_oid = InvalidOid;
}

text *
billing_actor(void)
{
	static bool registered = false;
	Oid			role = GetOuterUserId();

	if (role != actor_oid || actor_name == NULL)
	{
		char	   *name = GetUserNameFromId(role, false);
		text	   *t = (text *) MemoryContextAlloc(TopMemoryContext,
												   VARHDRSZ + strlen(name));

		SET_VARSIZE(t, VARHDRSZ + strlen(name));
		memcpy(VARDATA(t), name, strlen(name));
		if (actor_name)
			pfree(actor_name);
		actor_name = t;
		actor_oid = role;
		if (!registered)
		{
			CacheRegisterSyscacheCallback(AUTHOID, actor_reset, (Datum) 0);
			registered = true;
		}
	}
	return actor_name;
}

/*
 * Whether the calling session is limited to some tenants (billing_scope_role):
 * billing.visible_tenants() is not NULL.  With ntenants, also how many it may
 * see.  False in a database still at 1.3, which has no scopes.
 */
bool
billing_caller_scope(int *ntenants)
{
	Oid			fn = LookupFuncName(list_make2(makeString("billing"), makeString("visible_tenants")),
									0, NULL, true);
	FmgrInfo	flinfo;
	Datum		result;

	LOCAL_FCINFO(call, 0);

	if (ntenants)
		*ntenants = 0;
	if (!OidIsValid(fn))
		return false;
	fmgr_info(fn, &flinfo);
	InitFunctionCallInfoData(*call, &flinfo, 0, InvalidOid, NULL, NULL);
	result = FunctionCallInvoke(call);
	if (call->isnull)
		return false;
	if (ntenants)
	{
		ArrayType  *tenants = DatumGetArrayTypeP(result);

		*ntenants = ArrayGetNItems(ARR_NDIM(tenants), ARR_DIMS(tenants));
	}
	return true;
}

/* billing.actor() -> text: the same, for the SQL-level functions */
PG_FUNCTION_INFO_V1(billing_actor_sql);
Datum
billing_actor_sql(PG_FUNCTION_ARGS)
{
	text	   *actor = billing_actor();

	/* a copy: the cached one may be freed when the role changes */
	PG_RETURN_TEXT_P(cstring_to_text_with_len(VARDATA(actor), VARSIZE(actor) - VARHDRSZ));
}

/*
 * billing.to_amount(bigint) -> numeric: micro-units to a scale-6 amount.
 * Used by the views.
 */
PG_FUNCTION_INFO_V1(billing_to_amount);
Datum
billing_to_amount(PG_FUNCTION_ARGS)
{
	PG_RETURN_NUMERIC(billing_micros_to_numeric(PG_GETARG_INT64(0)));
}

/*
 * billing.to_micros(amount numeric, argname text, allow_zero bool) -> bigint:
 * the checked conversion, for the SQL-level functions (NULL stays NULL).
 */
PG_FUNCTION_INFO_V1(billing_to_micros);
Datum
billing_to_micros(PG_FUNCTION_ARGS)
{
	char	   *argname = "amount";

	/* NULL in, NULL out: callers that require a value check for NULL first */
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	if (!PG_ARGISNULL(1))
		argname = text_to_cstring(PG_GETARG_TEXT_PP(1));
	PG_RETURN_INT64(billing_amount_to_micros(PG_GETARG_NUMERIC(0), argname,
											 !PG_ARGISNULL(2) && PG_GETARG_BOOL(2)));
}

/*
 * The same checks for the SQL-level functions (PL/pgSQL): NULL passes
 * (callers that require a value check for NULL first).
 *
 * billing.check_id(value text, argname text, sqlstate text) -> text
 */
PG_FUNCTION_INFO_V1(billing_check_id_sql);
Datum
billing_check_id_sql(PG_FUNCTION_ARGS)
{
	char	   *state;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	state = PG_ARGISNULL(2) ? "ZB018" : text_to_cstring(PG_GETARG_TEXT_PP(2));
	if (strlen(state) != 5)
		elog(ERROR, "billing.check_id: sqlstate must have 5 characters");
	PG_RETURN_TEXT_P(billing_check_id(PG_GETARG_TEXT_PP(0),
									  PG_ARGISNULL(1) ? "value" : text_to_cstring(PG_GETARG_TEXT_PP(1)),
									  MAKE_SQLSTATE(state[0], state[1], state[2], state[3], state[4])));
}

/* billing.check_text(value text, argname text, max_chars integer) -> text */
PG_FUNCTION_INFO_V1(billing_check_text_sql);
Datum
billing_check_text_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(billing_check_text_value(PG_GETARG_TEXT_PP(0),
											  PG_ARGISNULL(1) ? "value" : text_to_cstring(PG_GETARG_TEXT_PP(1)),
											  PG_ARGISNULL(2) ? BILLING_MAX_DESCRIPTION_CHARS : PG_GETARG_INT32(2)));
}

/* billing.check_json(value jsonb, argname text) -> jsonb: a bounded object */
PG_FUNCTION_INFO_V1(billing_check_json_sql);
Datum
billing_check_json_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_JSONB_P(billing_check_metadata_value(PG_GETARG_JSONB_P(0),
												   PG_ARGISNULL(1) ? "metadata" : text_to_cstring(PG_GETARG_TEXT_PP(1))));
}

/* billing.check_event_at(event_at timestamptz) -> timestamptz: finite, in the window */
PG_FUNCTION_INFO_V1(billing_check_event_at_sql);
Datum
billing_check_event_at_sql(PG_FUNCTION_ARGS)
{
	TimestampTz ts;

	if (!billing_check_event_at(fcinfo, 0, &ts))
		PG_RETURN_NULL();
	billing_check_event_at_window(ts);
	PG_RETURN_TIMESTAMPTZ(ts);
}

/*
 * billing.show(value text, max_chars integer DEFAULT 64) -> text: the value
 * quoted for a message, cut to max_chars characters ("...") when longer.
 */
PG_FUNCTION_INFO_V1(billing_show_sql);
Datum
billing_show_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_TEXT_P(cstring_to_text("null"));
	PG_RETURN_TEXT_P(cstring_to_text(billing_show_text(text_to_cstring(PG_GETARG_TEXT_PP(0)),
													   PG_ARGISNULL(1) ? 64 : Max(PG_GETARG_INT32(1), 1))));
}
