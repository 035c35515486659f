/*-------------------------------------------------------------------------
 *
 * events.c
 *	  The transactional outbox and the alert thresholds (see events.h):
 *	  writing an event in the transaction of its change, checking the
 *	  thresholds of an account before its row is written, and the SQL
 *	  functions billing_alerts_set(), billing.event_write() and
 *	  billing.alerts_check().
 *
 * Where events come from:
 *	- balance.low, quota.threshold, grant.expiring: events_before_write(),
 *	  which account_write() calls before every write of a locked account:
 *	  it compares the account's new state with its thresholds (a few
 *	  integer comparisons; nothing when none are set) and writes an event
 *	  for each threshold crossed and not yet announced;
 *	- hold.expired (account.c) and grant.expired (grants.c), under the
 *	  account lock like the expiry itself;
 *	- job.completed, job.failed (the job guard trigger, jobs.c),
 *	  account.status_changed (billing_account_update) and mirror.repaired
 *	  (the worker, outbox.c): events_write_sql(), which takes the account
 *	  row lock and the next sequence number with one UPDATE.
 *
 * Either way the sequence number is taken under the tenant's account row
 * lock, which is held until commit: a tenant's events commit in sequence
 * order, so the worker, reading committed events, never sees seq n + 1
 * without seq n.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "account.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "events.h"
#include "funcapi.h"
#include "guc.h"
#include "miscadmin.h"
#include "spi.h"
#include "sync.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(billing_alerts_set);
PG_FUNCTION_INFO_V1(billing_event_write);
PG_FUNCTION_INFO_V1(billing_alerts_check);

/* longest grant_expiring lead billing_alerts_set accepts */
#define MAX_GRANT_LEAD_DAYS 366

static SPIPlanPtr plan_insert = NULL;
static SPIPlanPtr plan_write_sql = NULL;

/*
 * The notifications of the transaction's events (billing.events_notify),
 * in TopTransactionContext, each with the nesting level of the
 * subtransaction that wrote it.  They are handed to PostgreSQL only just
 * before commit: PREPARE TRANSACTION refuses a transaction with a pending
 * NOTIFY, and a prepared transaction (Citus' two-phase commit, or the
 * application's) announces nothing, as the documentation says.
 */
typedef struct PendingNotify
{
	int			level;
	char	   *payload;
} PendingNotify;

static List *pending_notifies = NIL;

/* at the end of a transaction: its notifications and counters (metrics.c) */
static void
events_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			/* PostgreSQL's PreCommit_Notify runs after this callback */
			foreach(lc, pending_notifies)
				Async_Notify(EVENTS_CHANNEL, ((PendingNotify *) lfirst(lc))->payload);
			pending_notifies = NIL;
			break;
		case XACT_EVENT_PRE_PREPARE:
			pending_notifies = NIL;
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			/*
			 * A prepared transaction counts when it is prepared: COMMIT
			 * PREPARED runs no callback of ours (a ROLLBACK PREPARED is not
			 * taken back).
			 */
			pending_notifies = NIL;
			metrics_xact_end(true);
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			pending_notifies = NIL;
			metrics_xact_end(false);
			break;
		default:
			break;
	}
}

/* a subtransaction ends: its notifications go to its parent, or away */
static void
events_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();
	ListCell   *lc;

	switch (event)
	{
		case SUBXACT_EVENT_COMMIT_SUB:
			foreach(lc, pending_notifies)
			{
				PendingNotify *n = lfirst(lc);

				if (n->level >= level)
					n->level = level - 1;
			}
			break;
		case SUBXACT_EVENT_ABORT_SUB:
			foreach(lc, pending_notifies)
			{
				PendingNotify *n = lfirst(lc);

				if (n->level >= level)
					pending_notifies = foreach_delete_current(pending_notifies, lc);
			}
			break;
		default:
			break;
	}
}

/* _PG_init */
void
events_init(void)
{
	RegisterXactCallback(events_xact_callback, NULL);
	RegisterSubXactCallback(events_subxact_callback, NULL);
	metrics_init();
}

/* ---------------------------------------------------------------------
 * JSON payloads
 * ---------------------------------------------------------------------
 */
void
ej_begin(StringInfo buf)
{
	initStringInfo(buf);
	appendStringInfoChar(buf, '{');
}

static void
ej_key(StringInfo buf, const char *key)
{
	if (buf->len > 1)
		appendStringInfoString(buf, ", ");
	escape_json(buf, key);
	appendStringInfoString(buf, ": ");
}

void
ej_str(StringInfo buf, const char *key, const char *value)
{
	ej_key(buf, key);
	if (value == NULL)
		appendStringInfoString(buf, "null");
	else
		escape_json(buf, value);
}

void
ej_text(StringInfo buf, const char *key, text *value)
{
	ej_str(buf, key, value ? text_to_cstring(value) : NULL);
}

void
ej_int(StringInfo buf, const char *key, int64 value)
{
	ej_key(buf, key);
	appendStringInfo(buf, INT64_FORMAT, value);
}

/* an amount: a JSON number with 6 decimals (jsonb keeps it exact) */
void
ej_money(StringInfo buf, const char *key, int64 micros)
{
	ej_key(buf, key);
	appendStringInfoString(buf, billing_format_micros(micros));
}

void
ej_ts(StringInfo buf, const char *key, TimestampTz ts)
{
	ej_str(buf, key, events_iso_time(ts));
}

void
ej_null(StringInfo buf, const char *key)
{
	ej_key(buf, key);
	appendStringInfoString(buf, "null");
}

void
ej_raw(StringInfo buf, const char *key, const char *json)
{
	ej_key(buf, key);
	appendStringInfoString(buf, json);
}

void
ej_end(StringInfo buf)
{
	appendStringInfoChar(buf, '}');
}

/*
 * "2026-11-22T09:17:00.123456Z": UTC, whatever the session's DateStyle
 * and TimeZone; NULL for an infinite time.
 */
char *
events_iso_time(TimestampTz ts)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(ts) || timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		return NULL;
	return psprintf("%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
					tm.tm_year, tm.tm_mon, tm.tm_mday,
					tm.tm_hour, tm.tm_min, tm.tm_sec, (int) fsec);
}

/* ---------------------------------------------------------------------
 * writing events
 * ---------------------------------------------------------------------
 */

/*
 * NOTIFY billing_events, '{"tenant_id": ..., "seq": ..., "event_id": ..., "type": ...}'
 * when billing.events_notify is on.  It is off by default: a transaction
 * that notifies holds PostgreSQL's notification queue lock from before its
 * commit record until its end, so the commits of all notifying
 * transactions (every job completion writes job.completed) would wait for
 * each other's WAL flush, one at a time.
 */
static void
notify(const char *tenant, int64 seq, int64 event_id, const char *type)
{
	MemoryContext old;
	StringInfoData buf;
	PendingNotify *n;

	if (!billing_events_notify)
		return;
	old = MemoryContextSwitchTo(TopTransactionContext);
	ej_begin(&buf);
	ej_str(&buf, "tenant_id", tenant);
	ej_int(&buf, "seq", seq);
	ej_int(&buf, "event_id", event_id);
	ej_str(&buf, "type", type);
	ej_end(&buf);
	n = palloc(sizeof(PendingNotify));
	n->level = GetCurrentTransactionNestLevel();
	n->payload = buf.data;
	pending_notifies = lappend(pending_notifies, n);
	MemoryContextSwitchTo(old);
}

bool
events_table_exists(void)
{
	Oid			nsp = get_namespace_oid("billing", true);

	return OidIsValid(nsp) && OidIsValid(get_relname_relid("events", nsp));
}

/*
 * An event of a locked account (inside SPI): the next sequence number is
 * the account's, written with the account row (account_write), which the
 * caller does after this.
 */
void
events_emit(Account *acc, const char *type, StringInfo payload)
{
	Oid			types[5] = {TEXTOID, INT8OID, TEXTOID, JSONBOID, TIMESTAMPTZOID};
	Datum		values[5];

	if (!acc->events_supported)
		return;
	billing_keep_plan(&plan_insert,
					  "INSERT INTO billing.events (tenant_id, seq, type, payload, created_at) "
					  "VALUES ($1, $2, $3, $4, $5) RETURNING event_id",
					  5, types);
	acc->events_seq++;
	acc->events_dirty = true;
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = Int64GetDatum(acc->events_seq);
	values[2] = CStringGetTextDatum(type);
	values[3] = DirectFunctionCall1(jsonb_in, CStringGetDatum(payload->data));
	values[4] = TimestampTzGetDatum(acc->now);
	billing_spi_exec(plan_insert, values, NULL, SPI_OK_INSERT_RETURNING, "writing an event");
	notify(acc->tenant, acc->events_seq, billing_col_int64(0, 1, 0), type);
	metrics_count_event(type);
}

/*
 * An event of a tenant whose account row nobody holds in memory (inside
 * SPI): one statement locks the row, takes the next sequence number and
 * writes the event.  ZB001 when the account does not exist.  Returns the
 * event's sequence number.
 */
int64
events_write_sql(text *tenant_id, const char *type, StringInfo payload)
{
	Oid			types[3] = {TEXTOID, TEXTOID, JSONBOID};
	Datum		values[3];
	int64		seq;

	billing_keep_plan(&plan_write_sql,
					  "WITH s AS (UPDATE billing.accounts a "
					  "    SET events_seq = a.events_seq OPERATOR(pg_catalog.+) 1 "
					  "  WHERE a.tenant_id OPERATOR(pg_catalog.=) $1 RETURNING a.events_seq) "
					  "INSERT INTO billing.events (tenant_id, seq, type, payload, created_at) "
					  "SELECT $1, s.events_seq, $2, $3, pg_catalog.clock_timestamp() FROM s "
					  "RETURNING seq, event_id",
					  3, types);
	values[0] = PointerGetDatum(tenant_id);
	values[1] = CStringGetTextDatum(type);
	values[2] = DirectFunctionCall1(jsonb_in, CStringGetDatum(payload->data));
	billing_spi_exec(plan_write_sql, values, NULL, SPI_OK_INSERT_RETURNING, "writing an event");
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ACCOUNT_NOT_FOUND),
				 errmsg("account \"%s\" does not exist", text_to_cstring(tenant_id)),
				 errhint("Create it first with billing_account_create(%s).",
						 quote_literal_cstr(text_to_cstring(tenant_id)))));
	seq = billing_col_int64(0, 1, 0);
	notify(text_to_cstring(tenant_id), seq, billing_col_int64(0, 2, 0), type);
	metrics_count_event(type);
	return seq;
}

/* ---------------------------------------------------------------------
 * the thresholds of an account
 * ---------------------------------------------------------------------
 */

/* the alert columns of a locked account (account_lock) */
void
events_load(Account *acc, Datum *values, bool *nulls)
{
	acc->events_supported = billing_accounts_table.attnum[AC_EVENTS_SEQ] != InvalidAttrNumber;
	acc->events_seq = 0;
	acc->events_dirty = false;
	acc->has_alert_low = false;
	acc->nalert_percents = 0;
	acc->alert_grant_lead = 0;
	acc->alert_state = 0;
	acc->has_grants_until = false;
	acc->alert_grants_gid = 0;
	acc->has_alert_next = false;
	acc->alerts_dirty = false;
	acc->alerts_config_dirty = false;
	acc->key = NULL;
	if (!acc->events_supported)
		return;
	if (!nulls[AC_EVENTS_SEQ])
		acc->events_seq = DatumGetInt64(values[AC_EVENTS_SEQ]);
	if (!nulls[AC_ALERT_STATE])
		acc->alert_state = DatumGetInt32(values[AC_ALERT_STATE]);
	if (!nulls[AC_ALERT_LOW])
	{
		acc->has_alert_low = true;
		acc->alert_low = DatumGetInt64(values[AC_ALERT_LOW]);
	}
	if (!nulls[AC_ALERT_PERCENTS])
	{
		ArrayType  *arr = DatumGetArrayTypeP(values[AC_ALERT_PERCENTS]);
		int			n = ArrayGetNItems(ARR_NDIM(arr), ARR_DIMS(arr));
		int32	   *p = (int32 *) ARR_DATA_PTR(arr);

		if (ARR_NDIM(arr) > 1 || ARR_HASNULL(arr) || n > EVENTS_MAX_PERCENTS)
			elog(ERROR, "billing: accounts.alert_percents of \"%s\" is malformed", acc->tenant);
		for (int i = 0; i < n; i++)
		{
			if (p[i] < 1 || p[i] > 100 || (i > 0 && p[i] <= p[i - 1]))
				elog(ERROR, "billing: accounts.alert_percents of \"%s\" is malformed", acc->tenant);
			acc->alert_percents[i] = p[i];
		}
		acc->nalert_percents = n;
	}
	if (!nulls[AC_ALERT_GRANT_LEAD])
	{
		Interval   *iv = DatumGetIntervalP(values[AC_ALERT_GRANT_LEAD]);

		acc->alert_grant_lead = iv->time + iv->day * USECS_PER_DAY +
			(int64) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;
	}
	if (!nulls[AC_ALERT_GRANTS_UNTIL])
	{
		acc->has_grants_until = true;
		acc->alert_grants_until = DatumGetTimestampTz(values[AC_ALERT_GRANTS_UNTIL]);
	}
	if (!nulls[AC_ALERT_GRANTS_GID])
		acc->alert_grants_gid = DatumGetInt64(values[AC_ALERT_GRANTS_GID]);
	if (!nulls[AC_ALERT_NEXT_AT])
	{
		acc->has_alert_next = true;
		acc->alert_next_at = DatumGetTimestampTz(values[AC_ALERT_NEXT_AT]);
	}
}

/* a new day or month: its thresholds are announced afresh */
void
events_new_period(Account *acc, bool day, bool month)
{
	int32		mask = (day ? ALERT_DAY_MASK : 0) | (month ? ALERT_MONTH_MASK : 0);

	if (acc->alert_state & mask)
	{
		acc->alert_state &= ~mask;
		acc->alerts_dirty = true;
	}
}

/* how many of the percentages `used` of `limit` (> 0) has reached */
static int
level_of(Account *acc, int64 used, int64 limit)
{
	int			n = 0;

	while (n < acc->nalert_percents &&
		   (int128) used * 100 >= (int128) acc->alert_percents[n] * limit)
		n++;
	return n;
}

static void
check_low_balance(Account *acc)
{
	bool		below = acc->balance < acc->alert_low;
	bool		announced = (acc->alert_state & ALERT_LOW_ANNOUNCED) != 0;

	if (below && !announced)
	{
		StringInfoData p;
		int128		available = (int128) acc->balance + acc->credit_limit - acc->holds;

		ej_begin(&p);
		ej_money(&p, "threshold", acc->alert_low);
		ej_money(&p, "balance", acc->balance);
		ej_money(&p, "available", (int64) Max(Min(available, PG_INT64_MAX), PG_INT64_MIN));
		ej_money(&p, "credit_limit", acc->credit_limit);
		ej_money(&p, "on_hold", acc->holds);
		ej_str(&p, "currency", acc->currency);
		ej_end(&p);
		events_emit(acc, "balance.low", &p);
		acc->alert_state |= ALERT_LOW_ANNOUNCED;
		acc->alerts_dirty = true;
	}
	else if (!below && announced)
	{
		/* re-armed: the next crossing below is announced again */
		acc->alert_state &= ~ALERT_LOW_ANNOUNCED;
		acc->alerts_dirty = true;
	}
}

/* one quota.threshold event */
static void
emit_quota(Account *acc, const char *quota, const char *key_id, int percent,
		   bool money, int64 used, int64 limit, const char *period,
		   bool has_reset, TimestampTz resets_at)
{
	StringInfoData p;

	ej_begin(&p);
	ej_str(&p, "quota", quota);
	if (key_id)
		ej_str(&p, "api_key", key_id);
	ej_int(&p, "percent", percent);
	if (money)
	{
		ej_money(&p, "used", used);
		ej_money(&p, "limit", limit);
		ej_str(&p, "currency", acc->currency);
	}
	else
	{
		ej_int(&p, "used", used);
		ej_int(&p, "limit", limit);
	}
	ej_str(&p, "period", period);
	if (has_reset)
		ej_ts(&p, "resets_at", resets_at);
	else
		ej_null(&p, "resets_at");
	ej_end(&p);
	events_emit(acc, "quota.threshold", &p);
}

static void
check_quotas(Account *acc)
{
	static const char *const names[ALERT_Q_COUNT] = {
		"daily_requests", "monthly_requests", "daily_spend", "monthly_spend"
	};

	for (int q = 0; q < ALERT_Q_COUNT; q++)
	{
		int64		limit;
		int64		used;
		int			was;
		int			now;
		bool		day = q == ALERT_Q_DAY_REQUESTS || q == ALERT_Q_DAY_SPEND;

		switch (q)
		{
			case ALERT_Q_DAY_REQUESTS:
				limit = acc->daily_requests, used = acc->day_requests;
				break;
			case ALERT_Q_MONTH_REQUESTS:
				limit = acc->monthly_requests, used = acc->month_requests;
				break;
			case ALERT_Q_DAY_SPEND:
				limit = acc->daily_spend, used = acc->day_spend;
				break;
			default:
				limit = acc->monthly_spend, used = acc->month_spend;
				break;
		}
		if (limit == NO_LIMIT || limit <= 0)
			continue;
		was = ALERT_LEVEL(acc->alert_state, q);
		now = level_of(acc, used, limit);
		if (now <= was)
			continue;
		for (int k = was; k < now; k++)
			emit_quota(acc, names[q], NULL, acc->alert_percents[k],
					   q == ALERT_Q_DAY_SPEND || q == ALERT_Q_MONTH_SPEND,
					   used, limit, day ? "day" : "month", true,
					   billing_local_midnight(acc->timezone,
											  day ? acc->today + 1 :
											  billing_next_month_start(acc->today)));
		acc->alert_state = (acc->alert_state & ~(0xF << ALERT_LEVEL_SHIFT(q))) |
			(now << ALERT_LEVEL_SHIFT(q));
		acc->alerts_dirty = true;
	}
}

/* the budget of the key this call charged (saved by account_key_save) */
static void
check_key(Account *acc, ApiKey *key)
{
	int			now;

	if (key->budget == NO_LIMIT || key->budget <= 0 || !key->levels_supported)
		return;
	now = level_of(acc, key->period_spend, key->budget);
	if (now <= key->alert_levels)
		return;
	for (int k = key->alert_levels; k < now; k++)
	{
		bool		lifetime = strcmp(key->period, "lifetime") == 0;
		bool		day = strcmp(key->period, "day") == 0;

		emit_quota(acc, "key_budget", key->key, acc->alert_percents[k], true,
				   key->period_spend, key->budget, key->period, !lifetime,
				   lifetime ? 0 :
				   billing_local_midnight(acc->timezone,
										  day ? acc->today + 1 :
										  billing_next_month_start(acc->today)));
	}
	key->alert_levels = now;
}

/* grant.expiring of one bucket */
static void
emit_expiring(Account *acc, Bucket *b)
{
	StringInfoData p;

	ej_begin(&p);
	ej_int(&p, "grant_id", b->grant_id);
	ej_int(&p, "priority", b->priority);
	ej_money(&p, "remaining", b->remaining);
	ej_money(&p, "reserved", b->reserved);
	ej_str(&p, "currency", acc->currency);
	ej_ts(&p, "expires_at", b->expires_at);
	ej_end(&p);
	events_emit(acc, "grant.expiring", &p);
}

/*
 * grant.expiring: a grant with something left is announced once when its
 * expiry is less than the lead away.  Watermark: every grant expiring up
 * to alert_grants_until, with an id up to alert_grants_gid, has been
 * announced (or had nothing to announce); a grant created later, or one
 * expiring later, is looked at.  alert_next_at is when the next one is due
 * (the worker's sweep for accounts nobody touches).
 */
static void
check_grants(Account *acc)
{
	TimestampTz horizon = acc->now + acc->alert_grant_lead;
	bool		announced = false;
	bool		has_next = false;
	TimestampTz next = 0;
	int64		maxgid = acc->alert_grants_gid;

	for (int i = 0; i < acc->nbuckets; i++)
	{
		Bucket	   *b = &acc->buckets[i];

		maxgid = Max(maxgid, b->grant_id);
		if (b->remaining + b->reserved <= 0 || TIMESTAMP_NOT_FINITE(b->expires_at) ||
			b->expires_at <= acc->now)
			continue;
		if (acc->has_grants_until && b->expires_at <= acc->alert_grants_until &&
			b->grant_id <= acc->alert_grants_gid)
			continue;			/* announced */
		if (b->expires_at <= horizon)
		{
			emit_expiring(acc, b);
			announced = true;
		}
		else if (!has_next || b->expires_at - acc->alert_grant_lead < next)
		{
			has_next = true;
			next = b->expires_at - acc->alert_grant_lead;
		}
	}
	if (announced)
	{
		acc->has_grants_until = true;
		acc->alert_grants_until = horizon;
		acc->alert_grants_gid = maxgid;
		acc->alerts_dirty = true;
	}
	if (has_next != acc->has_alert_next || (has_next && next != acc->alert_next_at))
	{
		acc->has_alert_next = has_next;
		acc->alert_next_at = next;
		acc->alerts_dirty = true;
	}
}

/*
 * Before a locked account's row is written (account_write): announce the
 * thresholds its new state crossed.  Cheap when none are set or none is
 * crossed: no statement, no allocation.
 */
void
events_before_write(Account *acc)
{
	if (!acc->events_supported)
		return;
	if (acc->has_alert_low)
		check_low_balance(acc);
	if (acc->nalert_percents > 0)
	{
		check_quotas(acc);
		if (acc->key != NULL && acc->key->present && acc->key->spend_changed)
			check_key(acc, acc->key);
	}
	if (acc->alert_grant_lead > 0)
		check_grants(acc);
	else if (acc->has_alert_next)
	{
		acc->has_alert_next = false;
		acc->alerts_dirty = true;
	}
}

/* ---------------------------------------------------------------------
 * SQL functions
 * ---------------------------------------------------------------------
 */

/*
 * billing.event_write(tenant_id text, type text, payload jsonb) -> bigint:
 * write an event of a tenant in this transaction (billing_account_update,
 * the background worker's mirror.repaired); returns its sequence number.
 */
Datum
billing_event_write(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	text	   *type;
	Jsonb	   *payload;
	StringInfoData buf;
	int64		seq;

	billing_check_not_null(fcinfo, 0, "tenant_id");
	billing_check_not_null(fcinfo, 1, "type");
	billing_check_not_null(fcinfo, 2, "payload");
	tenant = billing_check_id(PG_GETARG_TEXT_PP(0), "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	type = billing_check_id(PG_GETARG_TEXT_PP(1), "type", ERRCODE_BILLING_INVALID_ARGUMENT);
	payload = billing_check_metadata_value(PG_GETARG_JSONB_P(2), "payload");
	initStringInfo(&buf);
	appendStringInfoString(&buf, JsonbToCString(NULL, &payload->root, VARSIZE(payload)));
	billing_spi_connect();
	seq = events_write_sql(tenant, text_to_cstring(type), &buf);
	SPI_finish();
	PG_RETURN_INT64(seq);
}

/*
 * billing.alerts_check(tenant_id) -> boolean: what falls due by itself on
 * an account nobody touches (the worker's sweep, billing.alerts_due()):
 * expiries and grant.expiring.  True when an event was written.
 */
Datum
billing_alerts_check(PG_FUNCTION_ARGS)
{
	Account		acc;
	int64		seq;

	billing_check_not_null(fcinfo, 0, "tenant_id");
	account_lock(&acc, billing_check_id_length(PG_GETARG_TEXT_PP(0), "tenant_id",
												   ERRCODE_BILLING_INVALID_TENANT_ID),
				 billing_spi_connect());
	seq = acc.events_seq;
	account_expire_due(&acc);
	acc.version++;
	account_save(&acc, false);
	SPI_finish();
	PG_RETURN_BOOL(acc.events_seq != seq);
}

static int
cmp_int32(const void *a, const void *b)
{
	int32		x = *(const int32 *) a;
	int32		y = *(const int32 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* the percentages of billing_alerts_set: 1 to 10 of 1..100, sorted, unique */
static int
check_percents(ArrayType *arr, int32 *out)
{
	Datum	   *elems;
	bool	   *enulls;
	int			n;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("quota_percents must be a one-dimensional array"),
				 errhint("Pass e.g. ARRAY[80, 90, 100].")));
	deconstruct_array(arr, INT4OID, 4, true, TYPALIGN_INT, &elems, &enulls, &n);
	if (n < 1 || n > EVENTS_MAX_PERCENTS)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("quota_percents must have 1 to %d elements", EVENTS_MAX_PERCENTS),
				 errdetail("It has %d.", n),
				 errhint("Pass e.g. ARRAY[80, 90, 100], or NULL for no quota alerts.")));
	for (int i = 0; i < n; i++)
	{
		if (enulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
					 errmsg("quota_percents must not contain null"),
					 errdetail("Element %d is null.", i + 1),
					 errhint("Pass percentages from 1 to 100, e.g. ARRAY[80, 90, 100].")));
		out[i] = DatumGetInt32(elems[i]);
		if (out[i] < 1 || out[i] > 100)
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
					 errmsg("quota_percents must be between 1 and 100"),
					 errdetail("Element %d is %d.", i + 1, out[i]),
					 errhint("A percentage of a quota, spend cap or key budget: e.g. ARRAY[80, 90, 100].")));
	}
	qsort(out, n, sizeof(int32), cmp_int32);
	for (int i = 1; i < n; i++)
		if (out[i] == out[i - 1])
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
					 errmsg("quota_percents must not repeat a percentage"),
					 errdetail("%d is given twice.", out[i]),
					 errhint("Pass each percentage once.")));
	return n;
}

static int64
check_lead(Interval *iv)
{
	int64		usecs;

	if (iv->month != 0 ||
		iv->day < -MAX_GRANT_LEAD_DAYS || iv->day > MAX_GRANT_LEAD_DAYS ||
		iv->time < -MAX_GRANT_LEAD_DAYS * USECS_PER_DAY ||
		iv->time > 2 * (int64) MAX_GRANT_LEAD_DAYS * USECS_PER_DAY ||
		(usecs = iv->day * USECS_PER_DAY + iv->time) <= 0 ||
		usecs > MAX_GRANT_LEAD_DAYS * USECS_PER_DAY)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_INVALID_ARGUMENT),
				 errmsg("grant_expiring must be positive and at most %d days", MAX_GRANT_LEAD_DAYS),
				 errdetail("The value given was %s.",
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(iv)))),
				 errhint("Pass e.g. interval '3 days' (in days, hours, minutes; not months).")));
	return usecs;
}

static char *
show_percents(int32 *p, int n)
{
	StringInfoData buf;

	if (n == 0)
		return "null";
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '[');
	for (int i = 0; i < n; i++)
		appendStringInfo(&buf, "%s%d", i ? ", " : "", p[i]);
	appendStringInfoChar(&buf, ']');
	return buf.data;
}

static char *
show_lead(int64 usecs)
{
	Interval	iv;

	if (usecs == 0)
		return "null";
	iv.month = 0;
	iv.day = usecs / USECS_PER_DAY;
	iv.time = usecs % USECS_PER_DAY;
	return psprintf("\"%s\"", DatumGetCString(DirectFunctionCall1(interval_out,
																  IntervalPGetDatum(&iv))));
}

/*
 * billing_alerts_set(tenant_id, low_balance, quota_percents, grant_expiring,
 *					  reason) -> SETOF billing.alerts
 *
 * Replaces the account's alert thresholds (NULL = off), like
 * billing_limits_set replaces its limits, and records the change in
 * billing.account_events.  A threshold that changes is announced afresh:
 * the account is checked at once, so a balance already below a new
 * low_balance, or a quota already past a percentage, gets its event in
 * this transaction.
 */
Datum
billing_alerts_set(PG_FUNCTION_ARGS)
{
	text	   *tenant;
	bool		has_low = !PG_ARGISNULL(1);
	int64		low = 0;
	int32		percents[EVENTS_MAX_PERCENTS];
	int			npercents = 0;
	int64		lead = 0;
	text	   *reason = NULL;
	Account		acc;
	MemoryContext outer;
	StringInfoData changes;
	bool		low_changed;
	bool		percents_changed;
	bool		lead_changed;

	billing_check_not_null(fcinfo, 0, "tenant_id");
	tenant = billing_check_id(PG_GETARG_TEXT_PP(0), "tenant_id", ERRCODE_BILLING_INVALID_TENANT_ID);
	if (has_low)
		low = billing_amount_to_micros(PG_GETARG_NUMERIC(1), "low_balance", true);
	if (!PG_ARGISNULL(2))
		npercents = check_percents(PG_GETARG_ARRAYTYPE_P(2), percents);
	if (!PG_ARGISNULL(3))
		lead = check_lead(PG_GETARG_INTERVAL_P(3));
	if (!PG_ARGISNULL(4))
		reason = billing_check_text_value(PG_GETARG_TEXT_PP(4), "reason",
										  BILLING_MAX_DESCRIPTION_CHARS);

	InitMaterializedSRF(fcinfo, 0);
	outer = billing_spi_connect();
	account_lock(&acc, tenant, outer);
	if (!acc.events_supported)
		elog(ERROR, "billing: alerts need extension billing 1.4 (ALTER EXTENSION billing UPDATE)");
	if (strcmp(acc.status, "closed") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ACCOUNT_CLOSED),
				 errmsg("account \"%s\" is closed", acc.tenant),
				 errdetail("A closed account cannot be changed or reopened."),
				 errhint("Closed is final: open a new account for this customer.")));
	account_expire_due(&acc);

	low_changed = has_low != acc.has_alert_low || (has_low && low != acc.alert_low);
	percents_changed = npercents != acc.nalert_percents ||
		memcmp(percents, acc.alert_percents, sizeof(int32) * npercents) != 0;
	lead_changed = lead != acc.alert_grant_lead;

	ej_begin(&changes);
	if (low_changed)
	{
		StringInfoData c;

		ej_begin(&c);
		ej_raw(&c, "old", acc.has_alert_low ? billing_format_micros(acc.alert_low) : "null");
		ej_raw(&c, "new", has_low ? billing_format_micros(low) : "null");
		ej_end(&c);
		ej_raw(&changes, "low_balance", c.data);
		acc.has_alert_low = has_low;
		acc.alert_low = low;
		acc.alert_state &= ~ALERT_LOW_ANNOUNCED;
	}
	if (percents_changed)
	{
		StringInfoData c;
		Oid			types[1] = {TEXTOID};
		Datum		values[1];

		ej_begin(&c);
		ej_raw(&c, "old", show_percents(acc.alert_percents, acc.nalert_percents));
		ej_raw(&c, "new", show_percents(percents, npercents));
		ej_end(&c);
		ej_raw(&changes, "quota_percents", c.data);
		memcpy(acc.alert_percents, percents, sizeof(int32) * npercents);
		acc.nalert_percents = npercents;
		acc.alert_state &= ALERT_LOW_ANNOUNCED;
		/* the keys' levels count these percentages: announced afresh too */
		values[0] = PointerGetDatum(tenant);
		if (SPI_execute_with_args("UPDATE billing.api_keys SET alert_levels = 0 "
								  "WHERE tenant_id = $1 AND alert_levels <> 0",
								  1, types, values, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "billing: resetting the alert levels of the api keys failed");
	}
	if (lead_changed)
	{
		StringInfoData c;

		ej_begin(&c);
		ej_raw(&c, "old", show_lead(acc.alert_grant_lead));
		ej_raw(&c, "new", show_lead(lead));
		ej_end(&c);
		ej_raw(&changes, "grant_expiring", c.data);
		acc.alert_grant_lead = lead;
		acc.has_grants_until = false;
		acc.alert_grants_gid = 0;
	}
	ej_end(&changes);

	if (low_changed || percents_changed || lead_changed)
	{
		Oid			types[3] = {TEXTOID, JSONBOID, TEXTOID};
		Datum		values[3];
		char		nulls[3] = {' ', ' ', reason ? ' ' : 'n'};

		values[0] = PointerGetDatum(tenant);
		values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum(changes.data));
		values[2] = PointerGetDatum(reason);
		if (SPI_execute_with_args("INSERT INTO billing.account_events (tenant_id, action, changes, reason) "
								  "VALUES ($1, 'alerts', $2, $3)",
								  3, types, values, nulls, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "billing: recording the alert settings failed");
		acc.alerts_config_dirty = true;
		acc.alerts_dirty = true;
		/* the write checks the new thresholds (events_before_write) */
		account_save(&acc, false);
	}
	else
		account_finish(&acc);

	/* the billing.alerts row */
	{
		ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
		Oid			types[1] = {TEXTOID};
		Datum		values[1];

		values[0] = PointerGetDatum(tenant);
		/* not read-only: a new snapshot sees the row just written */
		if (SPI_execute_with_args("SELECT * FROM billing.alerts WHERE tenant_id = $1",
								  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "billing: reading billing.alerts failed");
		for (uint64 r = 0; r < SPI_processed; r++)
			tuplestore_puttuple(rsinfo->setResult, SPI_tuptable->vals[r]);
	}
	SPI_finish();
	return (Datum) 0;
}
