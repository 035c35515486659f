/*-------------------------------------------------------------------------
 *
 * account.c
 *	  Lock an account, expire its holds lazily, check a debit against
 *	  every limit, and write the new state back.
 *
 * Quotas and caps are counted on the account row itself (usage_day,
 * day_requests, ...), in calendar periods of the account's time zone
 * computed with PostgreSQL's own time zone code.  Because the counters live
 * on the row we lock anyway, checking a limit costs no extra statement and
 * N sessions racing for the last unit of a quota serialize on that lock:
 * they can never overshoot.
 *
 * Holds expire without any background process: the account caches the sum
 * of its open holds and the earliest expiry, and the first call that finds
 * that expiry in the past marks the expired holds and recomputes the sum
 * (account_expire_holds), under the same lock.  Readers (views) compute the
 * same thing from billing.holds with expires_at > now().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "account.h"
#include "direct.h"
#include "sync.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "datatype/timestamp.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/array.h"
#include "utils/timestamp.h"

static SPIPlanPtr plan_expire = NULL;
static SPIPlanPtr plan_expire_shares = NULL;
static SPIPlanPtr plan_open_holds = NULL;
static SPIPlanPtr plan_key_lock[2];
static SPIPlanPtr plan_key_holds = NULL;
static SPIPlanPtr plan_key_save[4];	/* [1.4's version column * 2 + alert_levels] */
static SPIPlanPtr plan_key_touch = NULL;

char *
billing_format_ts(TimestampTz ts)
{
	return DatumGetCString(DirectFunctionCall1(timestamptz_out,
											   TimestampTzGetDatum(ts)));
}

/* the calendar date of ts in time zone tz */
DateADT
billing_local_date(const char *tz, TimestampTz ts)
{
	Datum		local = DirectFunctionCall2(timestamptz_zone,
											CStringGetTextDatum(tz),
											TimestampTzGetDatum(ts));

	return DatumGetDateADT(DirectFunctionCall1(timestamp_date, local));
}

/* first day of d's month */
DateADT
billing_month_start(DateADT d)
{
	int			year,
				month,
				day;

	j2date(d + POSTGRES_EPOCH_JDATE, &year, &month, &day);
	return date2j(year, month, 1) - POSTGRES_EPOCH_JDATE;
}

/* first day of the month after d's */
DateADT
billing_next_month_start(DateADT d)
{
	int			year,
				month,
				day;

	j2date(d + POSTGRES_EPOCH_JDATE, &year, &month, &day);
	if (++month > 12)
	{
		month = 1;
		year++;
	}
	return date2j(year, month, 1) - POSTGRES_EPOCH_JDATE;
}

/* midnight at the start of local date d in time zone tz, as timestamptz */
TimestampTz
billing_local_midnight(const char *tz, DateADT d)
{
	Datum		ts = DirectFunctionCall1(date_timestamp, DateADTGetDatum(d));

	return DatumGetTimestampTz(DirectFunctionCall2(timestamp_zone,
												   CStringGetTextDatum(tz),
												   ts));
}

static const char *const account_cols[AC_NCOLS] = {
	"tenant_id", "status", "timezone", "currency", "credit_limit_micros",
	"balance_micros", "version", "holds_micros", "holds_next_expiry",
	"max_charge_micros", "daily_request_quota", "monthly_request_quota",
	"daily_spend_cap_micros", "monthly_spend_cap_micros",
	"minute_request_limit", "usage_day", "day_requests", "day_spend_micros",
	"usage_month", "month_requests", "month_spend_micros", "usage_minute",
	"minute_requests", "rejections", "last_entry_at",
	"grants_state", "grants_next_expiry",
	"events_seq", "alert_low_balance_micros", "alert_percents", "alert_grant_lead",
	"alert_state", "alert_grants_until", "alert_grants_gid", "alert_next_at"
};

static const Oid account_types[AC_NCOLS] = {
	TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT8OID,
	INT8OID, INT8OID, INT8OID, TIMESTAMPTZOID, INT8OID,
	INT8OID, INT8OID, INT8OID, INT8OID,
	INT8OID, DATEOID, INT8OID, INT8OID,
	DATEOID, INT8OID, INT8OID, TIMESTAMPTZOID,
	INT8OID, INT8OID, TIMESTAMPTZOID,
	INT8ARRAYOID, TIMESTAMPTZOID,
	INT8OID, INT8OID, INT4ARRAYOID, INTERVALOID,
	INT4OID, TIMESTAMPTZOID, INT8OID, TIMESTAMPTZOID
};

DirectTable billing_accounts_table = {
	"accounts", "accounts_pkey", AC_NCOLS, account_cols, account_types, false, 10
};

static int64
int64_or(Datum *values, bool *nulls, int col, int64 if_null)
{
	return nulls[col] ? if_null : DatumGetInt64(values[col]);
}

void
account_lock(Account *acc, text *tenant_id, MemoryContext cxt)
{
	if (account_try_lock(acc, tenant_id, cxt, false) == ACCOUNT_MISSING)
	{
		Rejection	rej;

		account_missing(acc->tenant, &rej);
		billing_raise_error(&rej);
	}
}

/* ZB001 for an account that does not exist */
void
account_missing(const char *tenant, Rejection *rej)
{
	rej->sqlerrcode = ERRCODE_BILLING_ACCOUNT_NOT_FOUND;
	rej->message = psprintf("account \"%s\" does not exist", tenant);
	rej->detail = NULL;
	rej->hint = psprintf("Create it first with billing_account_create(%s).",
						 quote_literal_cstr(tenant));
}

/*
 * account_lock, but an account that does not exist is ACCOUNT_MISSING (with
 * acc->tenant set) instead of an error, and with nowait an account locked by
 * another transaction is ACCOUNT_BUSY instead of waited for.
 */
AccountLockResult
account_try_lock(Account *acc, text *tenant_id, MemoryContext cxt, bool nowait)
{
	Datum		values[AC_NCOLS];
	bool		nulls[AC_NCOLS];
	MemoryContext old = MemoryContextSwitchTo(cxt);
	char	   *tenant = text_to_cstring(tenant_id);
	bool		busy = false;

	memset(acc, 0, sizeof(*acc));
	acc->cxt = cxt;				/* the caller's: survives SPI_finish */
	acc->tenant = tenant;
	MemoryContextSwitchTo(old); /* the row's values: temporary */
	if (!direct_lock_row_nowait(&billing_accounts_table, PointerGetDatum(tenant_id),
								values, nulls, &acc->tid, nowait, &busy))
		return busy ? ACCOUNT_BUSY : ACCOUNT_MISSING;

	acc->tenant_id = tenant_id;
	acc->tenant = tenant;
	old = MemoryContextSwitchTo(cxt);
	acc->status = TextDatumGetCString(values[AC_STATUS]);
	acc->timezone = TextDatumGetCString(values[AC_TIMEZONE]);
	acc->currency = TextDatumGetCString(values[AC_CURRENCY]);
	MemoryContextSwitchTo(old);
	acc->credit_limit = int64_or(values, nulls, AC_CREDIT_LIMIT, 0);
	acc->balance = int64_or(values, nulls, AC_BALANCE, 0);
	acc->version = int64_or(values, nulls, AC_VERSION, 0);
	acc->locked_version = acc->version;
	acc->holds = int64_or(values, nulls, AC_HOLDS, 0);
	acc->has_next_expiry = !nulls[AC_HOLDS_NEXT_EXPIRY];
	if (acc->has_next_expiry)
		acc->next_expiry = DatumGetTimestampTz(values[AC_HOLDS_NEXT_EXPIRY]);
	acc->max_charge = int64_or(values, nulls, AC_MAX_CHARGE, NO_LIMIT);
	acc->daily_requests = int64_or(values, nulls, AC_DAILY_REQUESTS, NO_LIMIT);
	acc->monthly_requests = int64_or(values, nulls, AC_MONTHLY_REQUESTS, NO_LIMIT);
	acc->daily_spend = int64_or(values, nulls, AC_DAILY_SPEND, NO_LIMIT);
	acc->monthly_spend = int64_or(values, nulls, AC_MONTHLY_SPEND, NO_LIMIT);
	acc->minute_requests = int64_or(values, nulls, AC_MINUTE_LIMIT, NO_LIMIT);
	acc->usage_day = nulls[AC_USAGE_DAY] ? DATEVAL_NOBEGIN : DatumGetDateADT(values[AC_USAGE_DAY]);
	acc->day_requests = int64_or(values, nulls, AC_DAY_REQUESTS, 0);
	acc->day_spend = int64_or(values, nulls, AC_DAY_SPEND, 0);
	acc->usage_month = nulls[AC_USAGE_MONTH] ? DATEVAL_NOBEGIN : DatumGetDateADT(values[AC_USAGE_MONTH]);
	acc->month_requests = int64_or(values, nulls, AC_MONTH_REQUESTS, 0);
	acc->month_spend = int64_or(values, nulls, AC_MONTH_SPEND, 0);
	acc->usage_minute = nulls[AC_USAGE_MINUTE] ? DT_NOBEGIN : DatumGetTimestampTz(values[AC_USAGE_MINUTE]);
	acc->minute_count = int64_or(values, nulls, AC_MINUTE_REQUESTS, 0);
	acc->rejections = int64_or(values, nulls, AC_REJECTIONS, 0);
	acc->grants_supported = billing_accounts_table.attnum[AC_GRANTS_STATE] != InvalidAttrNumber;
	grants_load(acc, values[AC_GRANTS_STATE], nulls[AC_GRANTS_STATE]);
	events_load(acc, values, nulls);

	/* the periods we are in now; counters of older periods start over */
	acc->now = GetCurrentTimestamp();
	acc->today = billing_local_date(acc->timezone, acc->now);
	acc->this_month = billing_month_start(acc->today);
	acc->this_minute = acc->now - acc->now % USECS_PER_MINUTE;
	if (acc->usage_day != acc->today)
	{
		acc->usage_day = acc->today;
		acc->day_requests = 0;
		acc->day_spend = 0;
		events_new_period(acc, true, false);
	}
	if (acc->usage_month != acc->this_month)
	{
		acc->usage_month = acc->this_month;
		acc->month_requests = 0;
		acc->month_spend = 0;
		events_new_period(acc, false, true);
	}
	if (acc->usage_minute != acc->this_minute)
	{
		acc->usage_minute = acc->this_minute;
		acc->minute_count = 0;
	}
	return ACCOUNT_LOCKED;
}

/*
 * Expire the holds whose time has come, if any: they stop counting against
 * available funds and can no longer be captured.  Cheap when nothing is due
 * (one comparison), so every call on the account runs it.
 */
void
account_expire_holds(Account *acc)
{
	Datum		values[2];
	Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};

	if (!acc->has_next_expiry || acc->next_expiry > acc->now)
		return;

	/* 1.3's schema: holds take no shares of grant buckets */
	if (!acc->grants_supported)
		billing_keep_plan(&plan_expire,
						  "WITH expired AS ("
						  "  UPDATE billing.holds h SET status = 'expired', "
						  "    released_micros = h.amount_micros - h.captured_micros, "
						  "    updated_at = $2 "
						  "  WHERE h.tenant_id = $1 AND h.status = 'open' AND h.expires_at <= $2 "
						  "  RETURNING h.hold_id, h.amount_micros - h.captured_micros AS freed) "
						  "INSERT INTO billing.hold_events (tenant_id, hold_id, action, "
						  "  amount_micros, created_at) "
						  "SELECT $1, hold_id, 'expire', freed, $2 FROM expired",
						  2, types);
	else
		billing_keep_plan(&plan_expire_shares,
						  "WITH expired AS ("
						  "  UPDATE billing.holds h SET status = 'expired', "
						  "    released_micros = h.amount_micros - h.captured_micros, "
						  "    grant_draws = NULL, updated_at = $2 "
						  "  FROM billing.holds o "
						  "  WHERE h.tenant_id = $1 AND h.status = 'open' AND h.expires_at <= $2 "
						  "    AND o.tenant_id = h.tenant_id AND o.hold_id = h.hold_id "
						  "  RETURNING h.hold_id, h.amount_micros - h.captured_micros AS freed, "
						  "    o.grant_draws AS shares, h.expires_at, h.trace_id, h.amount_micros, "
						  "    h.captured_micros, h.api_key), "
						  "ev AS (INSERT INTO billing.hold_events (tenant_id, hold_id, action, "
						  "  amount_micros, created_at) "
						  "  SELECT $1, hold_id, 'expire', freed, $2 FROM expired) "
						  "SELECT shares, expires_at, hold_id, trace_id, amount_micros, "
						  "  captured_micros, freed, api_key FROM expired "
						  "ORDER BY expires_at, hold_id",
						  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = TimestampTzGetDatum(acc->now);
	if (!acc->grants_supported)
		billing_spi_exec(plan_expire, values, NULL, SPI_OK_INSERT, "expiring holds");
	else
	{
		Draws	   *shares;
		TimestampTz *when;
		text	  **keys;
		StringInfoData *payloads;
		uint64		nrows;

		billing_spi_exec(plan_expire_shares, values, NULL, SPI_OK_SELECT, "expiring holds");
		nrows = SPI_processed;
		shares = palloc0(sizeof(Draws) * Max(nrows, 1));
		when = palloc(sizeof(TimestampTz) * Max(nrows, 1));
		keys = palloc0(sizeof(text *) * Max(nrows, 1));
		payloads = palloc(sizeof(StringInfoData) * Max(nrows, 1));
		for (uint64 r = 0; r < nrows; r++)
		{
			bool		isnull;
			Datum		d;
			StringInfo	p = &payloads[r];

			d = billing_col((int) r, 1, &isnull);
			if (!isnull)
				draws_from_datum(d, &shares[r]);
			when[r] = DatumGetTimestampTz(billing_col((int) r, 2, &isnull));
			d = billing_col((int) r, 8, &isnull);
			if (!isnull)
				keys[r] = DatumGetTextPCopy(d);
			/* hold.expired (events.h) */
			ej_begin(p);
			ej_int(p, "hold_id", billing_col_int64((int) r, 3, 0));
			ej_str(p, "trace_id", billing_col_cstring((int) r, 4, CurrentMemoryContext));
			ej_money(p, "amount", billing_col_int64((int) r, 5, 0));
			ej_money(p, "captured", billing_col_int64((int) r, 6, 0));
			ej_money(p, "released", billing_col_int64((int) r, 7, 0));
			ej_str(p, "currency", acc->currency);
			ej_ts(p, "expires_at", when[r]);
			ej_str(p, "api_key", billing_col_cstring((int) r, 8, CurrentMemoryContext));
			ej_end(p);
		}

		/* the open holds of these keys changed: their Redis hashes too */
		for (uint64 r = 0; r < nrows; r++)
		{
			bool		seen = false;

			for (uint64 q = 0; q < r && keys[r] && !seen; q++)
				seen = keys[q] && VARSIZE_ANY_EXHDR(keys[q]) == VARSIZE_ANY_EXHDR(keys[r]) &&
					memcmp(VARDATA_ANY(keys[q]), VARDATA_ANY(keys[r]), VARSIZE_ANY_EXHDR(keys[r])) == 0;
			if (keys[r] && !seen)
				account_key_touch(acc, keys[r]);
		}

		/*
		 * What an expired hold had reserved of grant buckets goes back to
		 * them at the moment the hold expired: spendable again if the grant
		 * was still valid then (it then expires with the grant), else it
		 * expires at that moment.
		 */
		for (uint64 r = 0; r < nrows; r++)
		{
			Draws		expired = {0};

			events_emit(acc, "hold.expired", &payloads[r]);
			if (shares[r].n == 0)
				continue;
			grants_give_back(acc, &shares[r], true, when[r], &expired);
			grants_write_expiries(acc, &expired, when[r], "grant expired (an expired hold's share)");
		}
	}
	account_refresh_holds(acc);
	acc->holds_changed = true;
}

/*
 * Everything that falls due by itself, first of all in every call on the
 * account: expired holds (their shares of grant buckets go back), then
 * expired grants (what is left in them leaves the balance).
 */
void
account_expire_due(Account *acc)
{
	account_expire_holds(acc);
	account_expire_grants(acc);
}

/* Recompute the cached sum of open holds and the earliest expiry. */
void
account_refresh_holds(Account *acc)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	bool		isnull;
	Datum		d;

	billing_keep_plan(&plan_open_holds,
					  "SELECT coalesce(sum(amount_micros - captured_micros - released_micros), 0)::bigint, "
					  "       min(expires_at) "
					  "FROM billing.holds WHERE tenant_id = $1 AND status = 'open'",
					  1, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	billing_spi_exec(plan_open_holds, values, NULL, SPI_OK_SELECT, "summing holds");
	acc->holds = billing_col_int64(0, 1, 0);
	d = billing_col(0, 2, &isnull);
	acc->has_next_expiry = !isnull;
	if (!isnull)
		acc->next_expiry = DatumGetTimestampTz(d);
}

/* Lock the API key a call names (after the account: fixed lock order). */
void
account_key_lock(Account *acc, ApiKey *key, text *key_id)
{
	Oid			types[3] = {TEXTOID, TEXTOID, TIMESTAMPTZOID};
	Datum		values[3];
	bool		isnull;
	Datum		d;

	int			v = acc->events_supported;

	memset(key, 0, sizeof(*key));
	acc->key = key;
	if (key_id == NULL)
		return;

	/* [1]: 1.4's, with the key's announced alert thresholds */
	billing_keep_plan(&plan_key_lock[v],
					  v ? "SELECT status, budget_micros, budget_period, period_start, "
					  "  period_spend_micros, alert_levels "
					  "FROM billing.api_keys WHERE tenant_id = $1 AND key_id = $2 FOR UPDATE" :
					  "SELECT status, budget_micros, budget_period, period_start, "
					  "  period_spend_micros "
					  "FROM billing.api_keys WHERE tenant_id = $1 AND key_id = $2 FOR UPDATE",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(key_id);
	billing_spi_exec(plan_key_lock[v], values, NULL, SPI_OK_SELECT, "api key lock");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_KEY_NOT_FOUND),
				 errmsg("api key \"%s\" does not exist for account \"%s\"",
						text_to_cstring(key_id), acc->tenant),
				 errhint("Create it with billing_api_key_create(%s, %s).",
						 quote_literal_cstr(acc->tenant),
						 quote_literal_cstr(text_to_cstring(key_id)))));

	key->present = true;
	key->key_id = key_id;
	key->key = text_to_cstring(key_id);
	key->status = billing_col_cstring(0, 1, acc->cxt);
	key->budget = billing_col_int64(0, 2, NO_LIMIT);
	key->period = billing_col_cstring(0, 3, acc->cxt);
	d = billing_col(0, 4, &isnull);
	key->period_start = isnull ? DATEVAL_NOBEGIN : DatumGetDateADT(d);
	key->period_spend = billing_col_int64(0, 5, 0);
	key->levels_supported = v;
	if (v)
	{
		d = billing_col(0, 6, &isnull);
		key->alert_levels = isnull ? 0 : DatumGetInt32(d);	/* an integer column */
	}

	/* budget periods start over like the account's */
	if (key->period != NULL && strcmp(key->period, "lifetime") != 0)
	{
		DateADT		start = strcmp(key->period, "day") == 0 ?
			acc->today : acc->this_month;

		if (key->period_start != start)
		{
			key->period_start = start;
			key->period_spend = 0;
			key->alert_levels = 0;
		}
	}

	if (key->budget != NO_LIMIT)
	{
		billing_keep_plan(&plan_key_holds,
						  "SELECT coalesce(sum(amount_micros - captured_micros - released_micros), 0)::bigint "
						  "FROM billing.holds WHERE tenant_id = $1 AND api_key = $2 "
						  "AND status = 'open' AND expires_at > $3",
						  3, types);
		values[2] = TimestampTzGetDatum(acc->now);
		billing_spi_exec(plan_key_holds, values, NULL, SPI_OK_SELECT, "api key holds");
		key->open_holds = billing_col_int64(0, 1, 0);
	}
}

static bool
set_rejection(Rejection *rej, int sqlerrcode, char *message, char *detail,
			  char *hint)
{
	rej->sqlerrcode = sqlerrcode;
	rej->message = message;
	rej->detail = detail;
	rej->hint = hint;
	return false;
}

void
billing_raise_rejection(Rejection *rej)
{
	metrics_count_refusal(rej->sqlerrcode);
	billing_raise_error(rej);
}

/*
 * billing_raise_rejection, but not counted as a refusal by billing_metrics():
 * an unknown account or a trace id conflict, which billing_deduct has always
 * raised as plain errors
 */
void
billing_raise_error(Rejection *rej)
{
	ereport(ERROR,
			(errcode(rej->sqlerrcode),
			 errmsg_internal("%s", rej->message),
			 rej->detail ? errdetail_internal("%s", rej->detail) : 0,
			 rej->hint ? errhint("%s", rej->hint) : 0));
}

/*
 * Check one debit against every rule, in a fixed order.  Returns true when
 * it may go ahead; otherwise fills *rej (in acc->cxt) and returns false.
 * "fresh" is the money this call newly needs from available funds: what it
 * charges beyond what a hold already reserved, plus what it reserves.
 */
bool
account_check_debit(Account *acc, ApiKey *key, Debit *debit, Rejection *rej)
{
	MemoryContext old = MemoryContextSwitchTo(acc->cxt);
	int64		fresh = debit->charge - debit->covered + debit->reserve;
	int64		requested = debit->charge + debit->reserve;
	bool		ok = true;

	/* reset times, formatted only for the message of a rejection */
#define tomorrow billing_format_ts(billing_local_midnight(acc->timezone, acc->today + 1))
#define next_month billing_format_ts(billing_local_midnight(acc->timezone, billing_next_month_start(acc->today)))

	if (strcmp(acc->status, "closed") == 0)
		ok = set_rejection(rej, ERRCODE_BILLING_ACCOUNT_CLOSED,
						   psprintf("account \"%s\" is closed", acc->tenant),
						   psprintf("A closed account accepts no entries (required %s).",
									billing_format_micros(requested)),
						   pstrdup("Closed is final: open a new account for this customer."));
	else if (fresh > 0 && strcmp(acc->status, "active") != 0)
		ok = set_rejection(rej, ERRCODE_BILLING_ACCOUNT_SUSPENDED,
						   psprintf("account \"%s\" is %s", acc->tenant, acc->status),
						   psprintf("A %s account cannot be charged (required %s).",
									acc->status, billing_format_micros(fresh)),
						   psprintf("Reactivate it with billing_account_update(%s, status => 'active').",
									quote_literal_cstr(acc->tenant)));
	else if ((debit->counts_request || fresh > 0) && acc->max_charge != NO_LIMIT &&
			 requested > acc->max_charge)
		ok = set_rejection(rej, ERRCODE_BILLING_MAX_CHARGE,
						   psprintf("charge exceeds the per-charge maximum of account \"%s\"",
									acc->tenant),
						   psprintf("Required %s, maximum per charge %s.",
									billing_format_micros(requested),
									billing_format_micros(acc->max_charge)),
						   pstrdup("Split the work into smaller charges, or raise max_charge with billing_limits_set()."));
	else if (debit->counts_request && acc->minute_requests != NO_LIMIT &&
			 acc->minute_count + 1 > acc->minute_requests)
		ok = set_rejection(rej, ERRCODE_BILLING_RATE_LIMIT,
						   psprintf("rate limit of account \"%s\" reached", acc->tenant),
						   psprintf("Limit %lld requests per minute, used %lld; resets at %s.",
									(long long) acc->minute_requests,
									(long long) acc->minute_count,
									billing_format_ts(acc->this_minute + USECS_PER_MINUTE)),
						   pstrdup("Retry after the reset time with a new trace id."));
	else if (debit->counts_request && acc->daily_requests != NO_LIMIT &&
			 acc->day_requests + 1 > acc->daily_requests)
		ok = set_rejection(rej, ERRCODE_BILLING_DAILY_REQUESTS,
						   psprintf("daily request quota of account \"%s\" exceeded", acc->tenant),
						   psprintf("Limit %lld requests per day, used %lld; resets at %s.",
									(long long) acc->daily_requests,
									(long long) acc->day_requests, tomorrow),
						   pstrdup("Wait for the reset, or raise daily_requests with billing_limits_set()."));
	else if (debit->counts_request && acc->monthly_requests != NO_LIMIT &&
			 acc->month_requests + 1 > acc->monthly_requests)
		ok = set_rejection(rej, ERRCODE_BILLING_MONTHLY_REQUESTS,
						   psprintf("monthly request quota of account \"%s\" exceeded", acc->tenant),
						   psprintf("Limit %lld requests per month, used %lld; resets at %s.",
									(long long) acc->monthly_requests,
									(long long) acc->month_requests, next_month),
						   pstrdup("Wait for the reset, or raise monthly_requests with billing_limits_set()."));
	else if (fresh > 0 && acc->daily_spend != NO_LIMIT &&
			 (int128) acc->day_spend + acc->holds + fresh > acc->daily_spend)
		ok = set_rejection(rej, ERRCODE_BILLING_DAILY_SPEND,
						   psprintf("daily spend cap of account \"%s\" exceeded", acc->tenant),
						   psprintf("Cap %s per day, spent %s, on hold %s, required %s; resets at %s.",
									billing_format_micros(acc->daily_spend),
									billing_format_micros(acc->day_spend),
									billing_format_micros(acc->holds),
									billing_format_micros(fresh), tomorrow),
						   pstrdup("Wait for the reset, or raise daily_spend with billing_limits_set()."));
	else if (fresh > 0 && acc->monthly_spend != NO_LIMIT &&
			 (int128) acc->month_spend + acc->holds + fresh > acc->monthly_spend)
		ok = set_rejection(rej, ERRCODE_BILLING_MONTHLY_SPEND,
						   psprintf("monthly spend cap of account \"%s\" exceeded", acc->tenant),
						   psprintf("Cap %s per month, spent %s, on hold %s, required %s; resets at %s.",
									billing_format_micros(acc->monthly_spend),
									billing_format_micros(acc->month_spend),
									billing_format_micros(acc->holds),
									billing_format_micros(fresh), next_month),
						   pstrdup("Wait for the reset, or raise monthly_spend with billing_limits_set()."));
	else if (key->present && fresh > 0 && strcmp(key->status, "active") != 0)
		ok = set_rejection(rej, ERRCODE_BILLING_KEY_INACTIVE,
						   psprintf("api key \"%s\" is %s", key->key, key->status),
						   psprintf("Charges through a %s key are refused (required %s).",
									key->status, billing_format_micros(fresh)),
						   pstrdup(strcmp(key->status, "revoked") == 0 ?
								   "A revoked key is final: use another key." :
								   "Use an active key, or reactivate this one with billing_api_key_update()."));
	else if (key->present && fresh > 0 && key->budget != NO_LIMIT &&
			 (int128) key->period_spend + key->open_holds + fresh > key->budget)
		ok = set_rejection(rej, ERRCODE_BILLING_KEY_BUDGET,
						   psprintf("budget of api key \"%s\" exceeded", key->key),
						   strcmp(key->period, "lifetime") == 0 ?
						   psprintf("Budget %s (lifetime), spent %s, on hold %s, required %s.",
									billing_format_micros(key->budget),
									billing_format_micros(key->period_spend),
									billing_format_micros(key->open_holds),
									billing_format_micros(fresh)) :
						   psprintf("Budget %s per %s, spent %s, on hold %s, required %s; resets at %s.",
									billing_format_micros(key->budget), key->period,
									billing_format_micros(key->period_spend),
									billing_format_micros(key->open_holds),
									billing_format_micros(fresh),
									strcmp(key->period, "day") == 0 ? tomorrow : next_month),
						   pstrdup("Raise the key's budget with billing_api_key_update(), or use another key."));
	else if (fresh > 0)
	{
		/* available = balance + credit_limit - holds, in 128 bits: no overflow */
		int128		available128 = (int128) acc->balance + acc->credit_limit - acc->holds;
		int64		available = (int64) Max(Min(available128, PG_INT64_MAX), PG_INT64_MIN);

		if (fresh > available128)
			ok = set_rejection(rej, debit->funds_errcode,
							   debit->funds_errcode == ERRCODE_BILLING_CAPTURE_EXCEEDS ?
							   psprintf("capture exceeds the hold and the available funds of account \"%s\"",
										acc->tenant) :
							   psprintf("insufficient funds in account \"%s\"", acc->tenant),
							   psprintf("Required %s, available %s (balance %s, credit limit %s, on hold %s).",
										billing_format_micros(fresh),
										billing_format_micros(available),
										billing_format_micros(acc->balance),
										billing_format_micros(acc->credit_limit),
										billing_format_micros(acc->holds)),
							   pstrdup("Top up with billing_credit(), raise the credit limit, or charge less."));
	}

#undef tomorrow
#undef next_month
	MemoryContextSwitchTo(old);
	return ok;
}

/*
 * counter + n for a usage counter (spend of a period, requests): saturates
 * at PG_INT64_MAX instead of wrapping.  Such a counter only feeds the cap
 * checks, where a value that large means "over any cap", so the caps keep
 * failing closed; money itself (balance, holds) is added exactly with
 * billing_add_micros(), which raises on overflow.
 */
static inline int64
usage_add(int64 counter, int64 n)
{
	int64		result;

	if (pg_add_s64_overflow(counter, n, &result))
		return n > 0 ? PG_INT64_MAX : PG_INT64_MIN;
	return result;
}

/*
 * Apply a checked debit to the in-memory account and key.  The money it
 * newly takes (charged beyond what a hold covered, or reserved) comes out
 * of the grant buckets in burn order; debit->draws, if given, gets the
 * buckets it came from.
 */
void
account_apply_debit(Account *acc, ApiKey *key, Debit *debit)
{
	if (debit->draws)
	{
		/* a hold reserves of the buckets; a charge spends them */
		if (debit->reserve > 0 && debit->charge > 0)
			elog(ERROR, "billing: a debit both reserves and charges");
		if (debit->reserve > 0)
			grants_draw(acc, debit->reserve, true, debit->draws);
		else
			grants_draw(acc, debit->charge - debit->covered, false, debit->draws);
	}
	acc->balance = billing_add_micros(acc->balance, -debit->charge, "account balance");
	acc->holds = billing_add_micros(acc->holds, debit->reserve - debit->covered,
									"open holds of the account");
	if (debit->counts_request)
	{
		acc->minute_count = usage_add(acc->minute_count, 1);
		acc->day_requests = usage_add(acc->day_requests, 1);
		acc->month_requests = usage_add(acc->month_requests, 1);
	}
	acc->day_spend = usage_add(acc->day_spend, debit->charge);
	acc->month_spend = usage_add(acc->month_spend, debit->charge);
	if (key->present && debit->charge > 0)
	{
		key->period_spend = usage_add(key->period_spend, debit->charge);
		key->spend_changed = true;
	}
}

/* the datums of an int4[] */
static Datum *
int32_datums(int32 *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int32GetDatum(v[i]);
	return d;
}

/* microseconds as an interval of days and time */
static Interval *
lead_interval(int64 usecs)
{
	Interval   *iv = palloc(sizeof(Interval));

	iv->month = 0;
	iv->day = usecs / USECS_PER_DAY;
	iv->time = usecs % USECS_PER_DAY;
	return iv;
}

/*
 * Write the account's new state (one HOT update of the locked row), and
 * with it, if `entries` is given, one new ledger entry: the two writes of
 * a charge share one executor state (direct_write).  The caller has bumped
 * acc->version already (entries carry the new version).
 */
void
account_write(Account *acc, bool wrote_entry, DirectTable *entries,
			  Datum *evalues, bool *enulls)
{
	Datum		values[AC_NCOLS];
	bool		nulls[AC_NCOLS];
	bool		set[AC_NCOLS];

	/* thresholds the new state crosses: their events first (events.c) */
	events_before_write(acc);

	memset(nulls, false, sizeof(nulls));
	memset(set, false, sizeof(set));
#define SET(col, datum) (values[col] = (datum), set[col] = true)
	SET(AC_BALANCE, Int64GetDatum(acc->balance));
	SET(AC_VERSION, Int64GetDatum(acc->version));
	if (wrote_entry)
		SET(AC_LAST_ENTRY_AT, TimestampTzGetDatum(acc->now));
	SET(AC_HOLDS, Int64GetDatum(acc->holds));
	SET(AC_HOLDS_NEXT_EXPIRY, TimestampTzGetDatum(acc->next_expiry));
	nulls[AC_HOLDS_NEXT_EXPIRY] = !acc->has_next_expiry;
	SET(AC_USAGE_DAY, DateADTGetDatum(acc->usage_day));
	SET(AC_DAY_REQUESTS, Int64GetDatum(acc->day_requests));
	SET(AC_DAY_SPEND, Int64GetDatum(acc->day_spend));
	SET(AC_USAGE_MONTH, DateADTGetDatum(acc->usage_month));
	SET(AC_MONTH_REQUESTS, Int64GetDatum(acc->month_requests));
	SET(AC_MONTH_SPEND, Int64GetDatum(acc->month_spend));
	SET(AC_USAGE_MINUTE, TimestampTzGetDatum(acc->usage_minute));
	SET(AC_MINUTE_REQUESTS, Int64GetDatum(acc->minute_count));
	SET(AC_REJECTIONS, Int64GetDatum(acc->rejections));
	if (acc->grants_supported)
	{
		SET(AC_GRANTS_STATE, grants_state_datum(acc, &nulls[AC_GRANTS_STATE]));
		SET(AC_GRANTS_NEXT_EXPIRY, TimestampTzGetDatum(acc->grants_next_expiry));
		nulls[AC_GRANTS_NEXT_EXPIRY] = !acc->has_grants_expiry;
	}
	if (acc->events_dirty)
		SET(AC_EVENTS_SEQ, Int64GetDatum(acc->events_seq));
	if (acc->alerts_dirty)
	{
		SET(AC_ALERT_STATE, Int32GetDatum(acc->alert_state));
		SET(AC_ALERT_GRANTS_UNTIL, TimestampTzGetDatum(acc->alert_grants_until));
		nulls[AC_ALERT_GRANTS_UNTIL] = !acc->has_grants_until;
		SET(AC_ALERT_GRANTS_GID, Int64GetDatum(acc->alert_grants_gid));
		nulls[AC_ALERT_GRANTS_GID] = !acc->has_grants_until;
		SET(AC_ALERT_NEXT_AT, TimestampTzGetDatum(acc->alert_next_at));
		nulls[AC_ALERT_NEXT_AT] = !acc->has_alert_next;
	}
	if (acc->alerts_config_dirty)
	{
		SET(AC_ALERT_LOW, Int64GetDatum(acc->alert_low));
		nulls[AC_ALERT_LOW] = !acc->has_alert_low;
		SET(AC_ALERT_PERCENTS, acc->nalert_percents == 0 ? (Datum) 0 :
			PointerGetDatum(construct_array(int32_datums(acc->alert_percents, acc->nalert_percents),
											acc->nalert_percents, INT4OID, 4, true, TYPALIGN_INT)));
		nulls[AC_ALERT_PERCENTS] = acc->nalert_percents == 0;
		SET(AC_ALERT_GRANT_LEAD, acc->alert_grant_lead == 0 ? (Datum) 0 :
			IntervalPGetDatum(lead_interval(acc->alert_grant_lead)));
		nulls[AC_ALERT_GRANT_LEAD] = acc->alert_grant_lead == 0;
	}
#undef SET
	direct_write(PointerGetDatum(acc->tenant_id), entries, evalues, enulls,
				 &billing_accounts_table, &acc->tid,
				 values, nulls, set);
	billing_sync_mark_account(VARDATA_ANY(acc->tenant_id), VARSIZE_ANY_EXHDR(acc->tenant_id),
							  acc->locked_version);
	acc->holds_changed = false;
	acc->grants_changed = false;
	acc->events_dirty = false;
	acc->alerts_dirty = false;
	acc->alerts_config_dirty = false;
}

void
account_save(Account *acc, bool wrote_entry)
{
	account_write(acc, wrote_entry, NULL, NULL, NULL);
}

/*
 * Before leaving a call that saved nothing: if it expired holds on the way
 * (a replay, a release of a settled hold...), the account's cached sum of
 * open holds must follow the holds table.
 */
void
account_finish(Account *acc)
{
	if (acc->holds_changed || acc->grants_changed)
	{
		acc->version++;
		account_save(acc, false);
	}
	else if (acc->events_dirty || acc->alerts_dirty)
		account_save(acc, false);	/* the mirror shows neither */
}

/*
 * Save the key's counters.  Its Redis hash changes with them: the key row
 * gets a new version (1.4's api_keys.version; the schema of 1.3 has none,
 * whose worker pushes every key), locked_version + 1, which the call's own
 * version bump covers, and the key is marked for the mirror, so that the
 * worker pushes this key's hash and not every key of the tenant.
 */
void
account_key_save(Account *acc, ApiKey *key)
{
	Oid			types[7] = {TEXTOID, TEXTOID, DATEOID, INT8OID, TIMESTAMPTZOID, INT8OID, INT4OID};
	Datum		values[7];
	int			g = acc->grants_supported ? 1 : 0;	/* api_keys.version (1.4) */
	int			v = key->levels_supported ? 1 : 0;	/* api_keys.alert_levels (1.4) */
	int			nargs = 5 + g + v;
	char		sql[512];

	if (acc->key == key)
		acc->key = NULL;
	if (!key->present)
		return;
	snprintf(sql, sizeof(sql),
			 "UPDATE billing.api_keys SET period_start = $3, "
			 "  period_spend_micros = $4, last_used_at = $5%s%s "
			 "WHERE tenant_id = $1 AND key_id = $2",
			 g ? ", version = $6" : "",
			 v ? (g ? ", alert_levels = $7" : ", alert_levels = $6") : "");
	if (!g)
		types[5] = INT4OID;
	billing_keep_plan(&plan_key_save[g * 2 + v], sql, nargs, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = PointerGetDatum(key->key_id);
	values[2] = DateADTGetDatum(key->period_start);
	values[3] = Int64GetDatum(key->period_spend);
	values[4] = TimestampTzGetDatum(acc->now);
	if (g)
		values[5] = Int64GetDatum(acc->locked_version + 1);
	values[5 + g] = Int32GetDatum(key->alert_levels);
	billing_spi_exec(plan_key_save[g * 2 + v], values, NULL, SPI_OK_UPDATE,
					 "saving the api key");
	billing_sync_mark_key(VARDATA_ANY(acc->tenant_id), VARSIZE_ANY_EXHDR(acc->tenant_id),
						  VARDATA_ANY(key->key_id), VARSIZE_ANY_EXHDR(key->key_id),
						  acc->locked_version);
}

/*
 * The hash of a key changed without its counters (a hold of the key
 * released or expired: its open holds): a new version and a mark, as
 * account_key_save gives.  The caller bumps the account version.
 */
void
account_key_touch(Account *acc, text *key_id)
{
	Oid			types[3] = {TEXTOID, TEXTOID, INT8OID};
	Datum		values[3];

	if (key_id == NULL)
		return;
	if (acc->grants_supported)
	{
		billing_keep_plan(&plan_key_touch,
						  "UPDATE billing.api_keys SET version = $3 "
						  "WHERE tenant_id = $1 AND key_id = $2",
						  3, types);
		values[0] = PointerGetDatum(acc->tenant_id);
		values[1] = PointerGetDatum(key_id);
		values[2] = Int64GetDatum(acc->locked_version + 1);
		billing_spi_exec(plan_key_touch, values, NULL, SPI_OK_UPDATE, "saving the api key");
	}
	billing_sync_mark_key(VARDATA_ANY(acc->tenant_id), VARSIZE_ANY_EXHDR(acc->tenant_id),
						  VARDATA_ANY(key_id), VARSIZE_ANY_EXHDR(key_id),
						  acc->locked_version);
}

/*
 * billing.expire_holds_of(tenant_id) -> boolean: expire the due holds and
 * grants of one account (the worker's maintenance; every other call on the
 * account does the same on its way).  True when something expired.
 */
PG_FUNCTION_INFO_V1(billing_expire_holds_of);
Datum
billing_expire_holds_of(PG_FUNCTION_ARGS)
{
	Account		acc;
	bool		due;

	billing_check_not_null(fcinfo, 0, "tenant_id");
	account_lock(&acc, billing_check_id_length(PG_GETARG_TEXT_PP(0), "tenant_id",
												   ERRCODE_BILLING_INVALID_TENANT_ID),
				 billing_spi_connect());
	due = (acc.has_next_expiry && acc.next_expiry <= acc.now) ||
		(acc.has_grants_expiry && acc.grants_next_expiry <= acc.now);
	if (due)
	{
		account_expire_due(&acc);
		acc.version++;
		account_save(&acc, false);
	}
	SPI_finish();
	PG_RETURN_BOOL(due);
}

/* available funds as numeric (the int64 sum could overflow) */
Numeric
account_available(Account *acc)
{
	Datum		sum;

	sum = DirectFunctionCall2(numeric_add,
							  NumericGetDatum(billing_micros_to_numeric(acc->balance)),
							  NumericGetDatum(billing_micros_to_numeric(acc->credit_limit)));
	return DatumGetNumeric(DirectFunctionCall2(numeric_sub, sum,
											   NumericGetDatum(billing_micros_to_numeric(acc->holds))));
}
