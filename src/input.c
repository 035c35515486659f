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
#include "common/int.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/memutils.h"

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
				 errdetail("The value given was %s.",
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   NumericGetDatum(num)))),
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
		raise_not_positive(argname, allow_zero,
						   DatumGetCString(DirectFunctionCall1(numeric_out, shown)));
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
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   NumericGetDatum(num))),
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
				 errdetail("The value given was %s.",
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   NumericGetDatum(num)))),
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

/* tenant ids and trace ids: non-empty, at most 255 characters */
text *
billing_check_id(text *id, const char *argname, int sqlerrcode)
{
	int			len = VARSIZE_ANY_EXHDR(id);
	int			nchars;

	if (len == 0)
		ereport(ERROR,
				(errcode(sqlerrcode),
				 errmsg("%s must not be empty", argname),
				 errhint("Pass a non-empty identifier of at most %d characters.",
						 BILLING_MAX_ID_CHARS)));
	nchars = pg_mbstrlen_with_len(VARDATA_ANY(id), len);
	if (nchars > BILLING_MAX_ID_CHARS)
		ereport(ERROR,
				(errcode(sqlerrcode),
				 errmsg("%s is too long", argname),
				 errdetail("It has %d characters; the limit is %d.",
						   nchars, BILLING_MAX_ID_CHARS),
				 errhint("Use a shorter identifier, e.g. a UUID or a hash of the request.")));
	return id;
}

/* optional metadata: NULL means {}, otherwise it must be a JSON object */
Jsonb *
billing_check_metadata(FunctionCallInfo fcinfo, int argno)
{
	Jsonb	   *jb;

	if (PG_ARGISNULL(argno))
		return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	jb = PG_GETARG_JSONB_P(argno);
	if (!JB_ROOT_IS_OBJECT(jb) || JB_ROOT_IS_SCALAR(jb))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("metadata must be a json object"),
				 errdetail("The value given was %s.",
						   JsonbToCString(NULL, &jb->root, VARSIZE(jb))),
				 errhint("Pass e.g. '{\"model\": \"gpt-4o\", \"api_key\": \"k1\"}'::jsonb, or leave it out.")));
	return jb;
}

/* optional description: NULL or at most 1000 characters */
text *
billing_check_description(FunctionCallInfo fcinfo, int argno)
{
	text	   *t;
	int			nchars;

	if (PG_ARGISNULL(argno))
		return NULL;
	t = PG_GETARG_TEXT_PP(argno);
	nchars = pg_mbstrlen_with_len(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	if (nchars > BILLING_MAX_DESCRIPTION_CHARS)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("description is too long"),
				 errdetail("It has %d characters; the limit is %d.",
						   nchars, BILLING_MAX_DESCRIPTION_CHARS),
				 errhint("Put structured details in metadata instead.")));
	return t;
}

/* optional event time: NULL or a finite timestamp */
bool
billing_check_event_at(FunctionCallInfo fcinfo, int argno, TimestampTz *event_at)
{
	if (PG_ARGISNULL(argno))
		return false;
	*event_at = PG_GETARG_TIMESTAMPTZ(argno);
	if (TIMESTAMP_NOT_FINITE(*event_at))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("event_at must be a finite timestamp"),
				 errhint("Pass the time the usage happened, or leave it out.")));
	return true;
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
