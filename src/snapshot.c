/*-------------------------------------------------------------------------
 *
 * snapshot.c
 *	  What the Redis mirror holds for a tenant: the fields of its hash
 *	  billing:{tenant} and of its API keys' hashes, built from the committed
 *	  account row (see lua/README.md for the field list).
 *
 * The background worker calls billing_snapshot_build() for every batch of
 * dirty tenants, so it reads each account by its primary key directly (one
 * index scan, rescanned per tenant, for the whole batch) and formats the
 * fields in C (the SQL version cost ~17 us of worker CPU per tenant, on the
 * same cores as the charges); billing.sync_snapshot_of()
 * exposes the same rows to SQL (resync pages, tests comparing Redis with
 * the database).  Periods are those of the account's time zone, as the
 * charges count them (account.c); "now" is the transaction start, like
 * now() in SQL.  The background worker runs the queries here: every
 * function, operator and type in them is schema-qualified.
 *
 * Of a dirty tenant's API keys only those whose hashes changed are read
 * (the ones its transactions named, or those whose api_keys.version is
 * above what was pushed), at most a batch's worth per tenant: a tenant
 * with 20,000 keys costs the mirror what changed, not 20,000 hashes per
 * charge (issue 12, M6).  The tenant hash shows what billing_balance()
 * shows: expired grant credit is never in balance or available, even
 * before its 'expire' entry is written; the expiries to come are listed
 * (grants_expiries) for the gateway scripts to leave them out once Redis'
 * clock passes them, before the worker pushes again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "account.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "citus.h"
#include "direct.h"
#include "catalog/namespace.h"
#include "utils/lsyscache.h"
#include "funcapi.h"
#include "ledger.h"
#include "miscadmin.h"
#include "sync.h"
#include "utils/array.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

PG_FUNCTION_INFO_V1(billing_sync_snapshot_of);

/* what a tenant's key hashes need of its account, and what to push of them */
typedef struct TenantFacts
{
	char	   *tenant;
	int			input;
	SyncWant   *want;
	int64		version;
	const char *timezone;
	DateADT		today;
	DateADT		this_month;
	List	   *held_keys;		/* keys of open holds that expired (char *) */
	List	   *keys;			/* SyncSnap * of its API keys */
	SyncSnap   *snap;			/* the tenant hash */
	bool		remote;			/* Citus: read through another node */
} TenantFacts;

/*
 * Most entries of grants_expiries: the rest expire, for the gateways, with
 * the last one listed (earlier than they do: never later).
 */
#define GRANTS_SCHEDULE_MAX 16

/* Unix epoch milliseconds of a timestamptz, rounded like ::bigint */
static int64
epoch_ms(TimestampTz ts)
{
	int64		us = ts + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;

	return us >= 0 ? (us + 500) / 1000 : -((-us + 500) / 1000);
}

/*
 * The same, rounded down: for an expiry time, which a gateway must then
 * see no later than the database (expires_at is the first instant the
 * credit is gone).
 */
static int64
epoch_ms_floor(TimestampTz ts)
{
	int64		us = ts + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;

	return us >= 0 ? us / 1000 : -((-us + 999) / 1000);
}

static char *
i64(int64 v)
{
	char	   *out = palloc(MAXINT8LEN + 1);

	(void) pg_lltoa(v, out);	/* a dozen of these per push: not psprintf */
	return out;
}

/*
 * An amount or counter for the gateway scripts: Lua numbers are doubles,
 * exact only up to 2^53 - 1 micro-units (about 9 billion units), and the
 * scripts refuse anything beyond (BADSTATE).  Larger magnitudes are sent as
 * +-(2^53 - 1): funds and caps that large are never the limiting factor,
 * and a spend counter that large is over any cap that Lua can express.
 */
#define LUA_MAX_INT		INT64CONST(9007199254740991)

static int64
lua_clamp(int64 v)
{
	return Max(Min(v, LUA_MAX_INT), -LUA_MAX_INT);
}

static char *
lua_int(int64 v)
{
	return i64(lua_clamp(v));
}

/* a field list under construction */
typedef struct Fields
{
	char	  **f;
	int			n;
	int			cap;
} Fields;

static void
add(Fields *fl, const char *name, char *value)
{
	if (fl->n + 2 > fl->cap)
	{
		fl->cap = Max(32, fl->cap * 2);
		fl->f = fl->f ? repalloc(fl->f, sizeof(char *) * fl->cap) :
			palloc(sizeof(char *) * fl->cap);
	}
	fl->f[fl->n++] = pstrdup(name);
	fl->f[fl->n++] = value;
}

/* the open holds of an account that count now */
typedef struct HoldsNow
{
	int64		sum;			/* remaining on holds not expired */
	bool		has_next;
	TimestampTz next;			/* the earliest expiry of one of them */
	List	   *expired_keys;	/* keys of open holds already expired (char *) */
} HoldsNow;

/*
 * Open holds still counting: the cached sum, unless one expired (then from
 * the holds, with the keys of those that expired: their key hashes change
 * too).
 */
static void
effective_holds(char *tenant, Datum *v, bool *nulls, TimestampTz now,
				MemoryContext out_cxt, HoldsNow *h)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	bool		isnull;
	Datum		d;

	memset(h, 0, sizeof(*h));
	if (nulls[AC_HOLDS_NEXT_EXPIRY] ||
		DatumGetTimestampTz(v[AC_HOLDS_NEXT_EXPIRY]) > now)
	{
		h->sum = DatumGetInt64(v[AC_HOLDS]);
		h->has_next = !nulls[AC_HOLDS_NEXT_EXPIRY];
		if (h->has_next)
			h->next = DatumGetTimestampTz(v[AC_HOLDS_NEXT_EXPIRY]);
		return;
	}
	billing_keep_plan(&plan,
					  "SELECT coalesce(pg_catalog.sum(amount_micros OPERATOR(pg_catalog.-) captured_micros "
					  "         OPERATOR(pg_catalog.-) released_micros) "
					  "         FILTER (WHERE expires_at OPERATOR(pg_catalog.>) pg_catalog.now()), 0)::pg_catalog.int8, "
					  "       pg_catalog.min(expires_at) FILTER (WHERE expires_at OPERATOR(pg_catalog.>) pg_catalog.now()), "
					  "       pg_catalog.array_agg(DISTINCT api_key) "
					  "         FILTER (WHERE expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() AND api_key IS NOT NULL) "
					  "FROM billing.holds WHERE tenant_id OPERATOR(pg_catalog.=) $1 "
					  "AND status OPERATOR(pg_catalog.=) 'open'",
					  1, types);
	values[0] = CStringGetTextDatum(tenant);
	billing_spi_read(plan, values, NULL, "summing open holds");
	h->sum = billing_col_int64(0, 1, 0);
	d = billing_col(0, 2, &isnull);
	h->has_next = !isnull;
	if (!isnull)
		h->next = DatumGetTimestampTz(d);
	d = billing_col(0, 3, &isnull);
	if (!isnull)
	{
		Datum	   *elems;
		bool	   *enulls;
		int			n;
		MemoryContext old = MemoryContextSwitchTo(out_cxt);

		deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &enulls, &n);
		for (int i = 0; i < n; i++)
			if (!enulls[i])
				h->expired_keys = lappend(h->expired_keys, TextDatumGetCString(elems[i]));
		MemoryContextSwitchTo(old);
	}
}

/* balance + credit limit - holds (lua_int: beyond int64 it is beyond 2^53) */
static char *
available(int64 balance, int64 credit, int64 holds)
{
	int64		a;
	Numeric		n;

	if (!pg_add_s64_overflow(balance, credit, &a) &&
		!pg_sub_s64_overflow(a, holds, &a))
		return lua_int(a);
	n = DatumGetNumeric(DirectFunctionCall2(numeric_add,
											NumericGetDatum(int64_to_numeric(balance)),
											NumericGetDatum(int64_to_numeric(credit))));
	n = DatumGetNumeric(DirectFunctionCall2(numeric_sub, NumericGetDatum(n),
											NumericGetDatum(int64_to_numeric(holds))));
	return lua_int(DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(n),
													 NumericGetDatum(int64_to_numeric(0)))) > 0 ?
				   PG_INT64_MAX : PG_INT64_MIN);
}

static void
add_limit(Fields *fl, const char *name, Datum *v, bool *nulls, int col)
{
	if (!nulls[col])
		add(fl, name, lua_int(DatumGetInt64(v[col])));
}

/*
 * On Citus, a tenant marked on a node that does not hold it: a change made
 * by SQL that Citus routed elsewhere (a PL/pgSQL function that ran on the
 * coordinator), or a tenant whose shard moved away.  Read its account
 * through Citus (a routed query) so the mirror gets it all the same.
 */
static bool
remote_account(char *tenant, Datum *v, bool *nulls)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	if (plan == NULL)
	{
		StringInfoData sql;

		initStringInfo(&sql);
		appendStringInfoString(&sql, "SELECT ");
		for (int c = 0; c < AC_NCOLS; c++)
			appendStringInfo(&sql, "%s%s", c ? ", " : "",
							 quote_identifier(billing_accounts_table.cols[c]));
		appendStringInfoString(&sql, " FROM billing.accounts WHERE tenant_id OPERATOR(pg_catalog.=) $1");
		billing_keep_plan(&plan, sql.data, 1, types);
	}
	values[0] = CStringGetTextDatum(tenant);
	billing_spi_read(plan, values, NULL, "reading an account of another node");
	if (SPI_processed == 0)
		return false;
	for (int c = 0; c < AC_NCOLS; c++)
	{
		Datum		d = billing_col(0, c + 1, &nulls[c]);
		Form_pg_attribute att = TupleDescAttr(SPI_tuptable->tupdesc, c);

		v[c] = nulls[c] ? (Datum) 0 : datumCopy(d, att->attbyval, att->attlen);
	}
	return true;
}

/* an upcoming expiry of grant credit: when, and how much is left to expire */
typedef struct Expiry
{
	TimestampTz at;
	int64		amount;
} Expiry;

static int
cmp_expiry(const void *a, const void *b)
{
	TimestampTz x = ((const Expiry *) a)->at;
	TimestampTz y = ((const Expiry *) b)->at;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * Grant credit, by the rule of billing_balance() (ledger.c): the balance
 * less what it still holds of grants that have expired (their 'expire'
 * entries are written later), and the expiries to come (what is left in
 * each bucket, by expiry time), for the gateways to leave out once Redis'
 * clock passes them.  Needs SPI (holds that expired may have reserved
 * expired credit).
 */
static int64
grant_credit(char *tenant, Datum *v, bool *nulls, TimestampTz now,
			 Expiry **schedule, int *nschedule)
{
	Account		acc;
	int64		balance = DatumGetInt64(v[AC_BALANCE]);

	*schedule = NULL;
	*nschedule = 0;
	if (billing_accounts_table.attnum[AC_GRANTS_STATE] == InvalidAttrNumber ||
		nulls[AC_GRANTS_STATE])
		return balance;
	memset(&acc, 0, sizeof(acc));
	acc.cxt = CurrentMemoryContext;
	acc.tenant = tenant;
	acc.tenant_id = cstring_to_text(tenant);
	acc.has_next_expiry = !nulls[AC_HOLDS_NEXT_EXPIRY];
	if (acc.has_next_expiry)
		acc.next_expiry = DatumGetTimestampTz(v[AC_HOLDS_NEXT_EXPIRY]);
	grants_load(&acc, v[AC_GRANTS_STATE], false);
	balance = billing_add_micros(balance, -grants_expired_micros(&acc, now), "balance");
	if (acc.has_next_expiry && acc.next_expiry <= now)
		balance = billing_add_micros(balance, -grants_held_expired(&acc, now), "balance");

	*schedule = palloc(sizeof(Expiry) * Max(acc.nbuckets, 1));
	for (int i = 0; i < acc.nbuckets; i++)
	{
		Bucket	   *b = &acc.buckets[i];

		if (b->remaining > 0 && !TIMESTAMP_NOT_FINITE(b->expires_at) && b->expires_at > now)
		{
			(*schedule)[*nschedule].at = b->expires_at;
			(*schedule)[*nschedule].amount = b->remaining;
			(*nschedule)++;
		}
	}
	qsort(*schedule, *nschedule, sizeof(Expiry), cmp_expiry);
	/* one entry per expiry time */
	if (*nschedule > 0)
	{
		int			kept = 1;

		for (int i = 1; i < *nschedule; i++)
		{
			if ((*schedule)[i].at == (*schedule)[kept - 1].at)
				(*schedule)[kept - 1].amount =
					billing_add_micros((*schedule)[kept - 1].amount, (*schedule)[i].amount,
									   "expiring credit");
			else
				(*schedule)[kept++] = (*schedule)[i];
		}
		*nschedule = kept;
	}
	/* beyond the most listed, the rest expires with the last one listed */
	if (*nschedule > GRANTS_SCHEDULE_MAX)
	{
		for (int i = GRANTS_SCHEDULE_MAX; i < *nschedule; i++)
			(*schedule)[GRANTS_SCHEDULE_MAX - 1].amount =
				billing_add_micros((*schedule)[GRANTS_SCHEDULE_MAX - 1].amount,
								   (*schedule)[i].amount, "expiring credit");
		*nschedule = GRANTS_SCHEDULE_MAX;
	}
	return balance;
}

/* the tenant hash; NULL when the account does not exist */
static SyncSnap *
tenant_snapshot(DirectReader *accounts, char *tenant, TenantFacts *facts,
				TimestampTz now, int64 synced_ms, MemoryContext out_cxt)
{
	Datum		v[AC_NCOLS];
	bool		nulls[AC_NCOLS];
	Fields		fl = {0};
	SyncSnap   *s;
	HoldsNow	holds;
	int64		balance;
	Expiry	   *schedule;
	int			nschedule;
	bool		same_day;
	bool		same_month;
	MemoryContext old;

	switch (direct_reader_fetch(accounts, CStringGetTextDatum(tenant), v, nulls))
	{
		case DIRECT_FOUND:
			break;
		case DIRECT_NOT_HERE:
			/* Citus: another node holds it (see remote_account) */
			if (!remote_account(tenant, v, nulls))
				return NULL;
			facts->remote = true;
			break;
		default:
			return NULL;
	}
	effective_holds(tenant, v, nulls, now, out_cxt, &holds);
	balance = grant_credit(tenant, v, nulls, now, &schedule, &nschedule);

	old = MemoryContextSwitchTo(out_cxt);
	facts->tenant = pstrdup(tenant);
	facts->version = DatumGetInt64(v[AC_VERSION]);
	facts->timezone = TextDatumGetCString(v[AC_TIMEZONE]);
	facts->today = billing_local_date(facts->timezone, now);
	facts->this_month = billing_month_start(facts->today);
	facts->held_keys = holds.expired_keys;
	same_day = !nulls[AC_USAGE_DAY] && DatumGetDateADT(v[AC_USAGE_DAY]) == facts->today;
	same_month = !nulls[AC_USAGE_MONTH] && DatumGetDateADT(v[AC_USAGE_MONTH]) == facts->this_month;

	add(&fl, "status", TextDatumGetCString(v[AC_STATUS]));
	add(&fl, "currency", TextDatumGetCString(v[AC_CURRENCY]));
	add(&fl, "balance", lua_int(balance));
	add(&fl, "credit_limit", lua_int(DatumGetInt64(v[AC_CREDIT_LIMIT])));
	add(&fl, "holds", lua_int(holds.sum));
	add(&fl, "available", available(balance, DatumGetInt64(v[AC_CREDIT_LIMIT]), holds.sum));
	add(&fl, "day_requests", lua_int(same_day ? DatumGetInt64(v[AC_DAY_REQUESTS]) : 0));
	add(&fl, "day_spend", lua_int(same_day ? DatumGetInt64(v[AC_DAY_SPEND]) : 0));
	add(&fl, "month_requests", lua_int(same_month ? DatumGetInt64(v[AC_MONTH_REQUESTS]) : 0));
	add(&fl, "month_spend", lua_int(same_month ? DatumGetInt64(v[AC_MONTH_SPEND]) : 0));
	add(&fl, "day_resets_at_ms",
		i64(epoch_ms(billing_local_midnight(facts->timezone, facts->today + 1))));
	add(&fl, "month_resets_at_ms",
		i64(epoch_ms(billing_local_midnight(facts->timezone,
											billing_next_month_start(facts->this_month)))));
	add(&fl, "synced_at_ms", i64(synced_ms));
	if (holds.has_next)
		add(&fl, "holds_expire_at_ms", i64(epoch_ms_floor(holds.next)));
	if (nschedule > 0)
	{
		StringInfoData list;

		initStringInfo(&list);
		for (int i = 0; i < nschedule; i++)
			appendStringInfo(&list, "%s" INT64_FORMAT ":" INT64_FORMAT, i ? "," : "",
							 epoch_ms_floor(schedule[i].at), lua_clamp(schedule[i].amount));
		add(&fl, "grants_expire_at_ms", i64(epoch_ms_floor(schedule[0].at)));
		add(&fl, "grants_expire_amount", lua_int(schedule[0].amount));
		add(&fl, "grants_expiries", list.data);
	}
	add_limit(&fl, "max_charge", v, nulls, AC_MAX_CHARGE);
	add_limit(&fl, "daily_requests_quota", v, nulls, AC_DAILY_REQUESTS);
	add_limit(&fl, "monthly_requests_quota", v, nulls, AC_MONTHLY_REQUESTS);
	add_limit(&fl, "daily_spend_cap", v, nulls, AC_DAILY_SPEND);
	add_limit(&fl, "monthly_spend_cap", v, nulls, AC_MONTHLY_SPEND);

	s = palloc0(sizeof(SyncSnap));
	s->tenant = facts->tenant;
	s->version = facts->version;
	s->fields = fl.f;
	s->nfields = fl.n;
	MemoryContextSwitchTo(old);
	return s;
}

static int
cmp_facts(const void *a, const void *b)
{
	return strcmp(((const TenantFacts *) a)->tenant, ((const TenantFacts *) b)->tenant);
}

/*
 * The columns of a key hash's row, for every query below: the key, its
 * open holds that count (a budget counts them, account.c: only then
 * needed) and the earliest expiry among them, and its version
 * (api_keys.version; 1.3's schema has none: the account's, appended by the
 * caller).  w is the list of what was asked for, k the keys.
 */
#define KEY_COLUMNS \
	"k.tenant_id, k.key_id, k.status, k.budget_micros, k.budget_period, " \
	"k.period_start, k.period_spend_micros, hs.holds, hs.next_expiry"
#define KEY_HOLDS \
	"LEFT JOIN LATERAL (" \
	"  SELECT coalesce(pg_catalog.sum(h.amount_micros OPERATOR(pg_catalog.-) h.captured_micros " \
	"           OPERATOR(pg_catalog.-) h.released_micros), 0)::pg_catalog.int8 AS holds, " \
	"         pg_catalog.min(h.expires_at) AS next_expiry " \
	"    FROM %2$s h " \
	"   WHERE k.budget_micros IS NOT NULL " \
	"     AND h.tenant_id OPERATOR(pg_catalog.=) k.tenant_id " \
	"     AND h.api_key OPERATOR(pg_catalog.=) k.key_id " \
	"     AND h.status OPERATOR(pg_catalog.=) 'open' " \
	"     AND h.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()) hs ON true "

/*
 * The queries below are templates: %1$s is where the API keys are read,
 * %2$s the holds.  On a single node they are billing.api_keys and
 * billing.holds.  On Citus the worker of each node reads its own tenants
 * from the union of its local shards (key_plan): Citus does not prune a
 * query by a parameter array, so through the distributed tables it would go
 * to every shard of every node.
 */

/* 1.3: every key of the tenants, at the account's version */
static const char *const keys_all_sql =
"SELECT " KEY_COLUMNS ", NULL::pg_catalog.int8 "
"FROM %1$s k " KEY_HOLDS
"WHERE k.tenant_id OPERATOR(pg_catalog.=) ANY ($1)";

/*
 * Citus: every key of tenants that another node holds (a change Citus
 * routed elsewhere, or a shard that moved away), through the distributed
 * tables; scalar subqueries correlated on the distribution column, which
 * Citus pushes down to the tenants' nodes.
 */
#define REMOTE_HOLDS(agg) \
	"CASE WHEN k.budget_micros IS NOT NULL THEN (SELECT " agg " FROM billing.holds h " \
	"   WHERE h.tenant_id OPERATOR(pg_catalog.=) k.tenant_id " \
	"     AND h.api_key OPERATOR(pg_catalog.=) k.key_id " \
	"     AND h.status OPERATOR(pg_catalog.=) 'open' " \
	"     AND h.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()) END"
static const char *const keys_remote_sql =
"SELECT k.tenant_id, k.key_id, k.status, k.budget_micros, k.budget_period, "
"       k.period_start, k.period_spend_micros, "
REMOTE_HOLDS("coalesce(pg_catalog.sum(h.amount_micros OPERATOR(pg_catalog.-) h.captured_micros "
			 "OPERATOR(pg_catalog.-) h.released_micros), 0)::pg_catalog.int8") ", "
REMOTE_HOLDS("pg_catalog.min(h.expires_at)") ", k.version "
"FROM billing.api_keys k WHERE k.tenant_id OPERATOR(pg_catalog.=) ANY ($1)";

/* 1.4: the keys named (tenant, key pairs) */
static const char *const keys_named_sql =
"SELECT " KEY_COLUMNS ", k.version "
"FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[])) "
"       AS w(tenant_id, key_id) "
"CROSS JOIN LATERAL (SELECT k.* FROM %1$s k "
"   WHERE k.tenant_id OPERATOR(pg_catalog.=) w.tenant_id "
"     AND k.key_id OPERATOR(pg_catalog.=) w.key_id) k " KEY_HOLDS;

/*
 * 1.4: per tenant, the keys whose version is above `since`, in (version,
 * key_id) order after the key a previous batch stopped at, at most `lim`
 * (NULL: all).
 */
static const char *const keys_scan_sql =
"SELECT " KEY_COLUMNS ", k.version "
"FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.int8[]), "
"                pg_catalog.unnest($3::pg_catalog.int8[]), pg_catalog.unnest($4::pg_catalog.text[]), "
"                pg_catalog.unnest($5::pg_catalog.int4[])) WITH ORDINALITY "
"       AS w(tenant_id, since, after_version, after_key, lim, ord) "
"CROSS JOIN LATERAL (SELECT k.* FROM %1$s k "
"   WHERE k.tenant_id OPERATOR(pg_catalog.=) w.tenant_id "
"     AND k.version OPERATOR(pg_catalog.>) w.since "
"     AND (w.after_key IS NULL "
"          OR k.version OPERATOR(pg_catalog.>) w.after_version "
"          OR (k.version OPERATOR(pg_catalog.=) w.after_version "
"              AND k.key_id COLLATE pg_catalog.\"C\" OPERATOR(pg_catalog.>) w.after_key)) "
"   ORDER BY k.version, k.key_id COLLATE pg_catalog.\"C\" "
"   LIMIT w.lim) k " KEY_HOLDS
"ORDER BY w.ord, k.version, k.key_id COLLATE pg_catalog.\"C\"";

static char *
shard_union(Oid relid, StringInfo signature)
{
	bool		distributed;
	List	   *shards = billing_local_shards(relid, &distributed);
	StringInfoData u;
	ListCell   *lc;

	initStringInfo(&u);
	appendStringInfoChar(&u, '(');
	foreach(lc, shards)
	{
		appendStringInfo(&u, "%sSELECT * FROM %s", u.len > 1 ? " UNION ALL " : "",
						 quote_qualified_identifier("billing", get_rel_name(lfirst_oid(lc))));
		appendStringInfo(signature, "%u,", lfirst_oid(lc));
	}
	if (shards == NIL)
		appendStringInfo(&u, "SELECT * FROM %s WHERE false",
						 quote_qualified_identifier("billing", get_rel_name(relid)));
	appendStringInfoChar(&u, ')');
	return u.data;
}

/*
 * A kept plan of one of the templates above: over billing.api_keys and
 * billing.holds, or (local: Citus, this node's tenants) over the union of
 * this node's shards of them, planned again when that set changes.
 */
typedef struct KeyPlan
{
	SPIPlanPtr	routed;
	SPIPlanPtr	local;
	char	   *signature;		/* the local shards local was planned for */
} KeyPlan;

static SPIPlanPtr
key_plan(KeyPlan *kp, const char *tmpl, int nargs, Oid *types, bool local)
{
	Oid			nsp;
	StringInfoData sig;
	char	   *keys_u;
	char	   *holds_u;

	if (!local && kp->routed != NULL)
		return kp->routed;
	if (!local)
		return billing_keep_plan(&kp->routed,
								 psprintf(tmpl, "billing.api_keys", "billing.holds"),
								 nargs, types);
	nsp = get_namespace_oid("billing", false);
	initStringInfo(&sig);
	keys_u = shard_union(get_relname_relid("api_keys", nsp), &sig);
	holds_u = shard_union(get_relname_relid("holds", nsp), &sig);
	if (kp->local != NULL && kp->signature != NULL &&
		strcmp(kp->signature, sig.data) == 0)
		return kp->local;
	if (kp->local != NULL)
		SPI_freeplan(kp->local);
	kp->local = NULL;
	if (kp->signature)
		pfree(kp->signature);
	kp->signature = MemoryContextStrdup(TopMemoryContext, sig.data);
	return billing_keep_plan(&kp->local, psprintf(tmpl, keys_u, holds_u), nargs, types);
}

static TenantFacts *
find_facts(TenantFacts *facts, int nfacts, char *tenant)
{
	TenantFacts probe = {0};

	probe.tenant = tenant;
	return bsearch(&probe, facts, nfacts, sizeof(TenantFacts), cmp_facts);
}

/* the key hashes of the rows of the last query, onto their tenants' facts */
static void
key_rows(TenantFacts *facts, int nfacts, int64 synced_ms, MemoryContext out_cxt,
		 bool *skip)
{
	if (SPI_processed > (uint64) INT_MAX)
		elog(ERROR, "billing: too many api keys in one snapshot batch");
	for (int r = 0; r < (int) SPI_processed; r++)
	{
		TenantFacts *f;
		Fields		fl = {0};
		SyncSnap   *s;
		char	   *tenant;
		char	   *period;
		bool		isnull;
		bool		current;
		Datum		start;
		Datum		d;
		MemoryContext old;

		if (skip != NULL && skip[r])
			continue;
		old = MemoryContextSwitchTo(out_cxt);
		tenant = billing_col_cstring(r, 1, out_cxt);
		f = find_facts(facts, nfacts, tenant);
		if (f == NULL)
		{
			MemoryContextSwitchTo(old);
			continue;
		}
		period = billing_col_cstring(r, 5, out_cxt);	/* NULL: lifetime */
		start = billing_col(r, 6, &isnull);
		current = period == NULL || strcmp(period, "lifetime") == 0 ||
			(!isnull && DatumGetDateADT(start) ==
			 (strcmp(period, "day") == 0 ? f->today : f->this_month));

		add(&fl, "status", billing_col_cstring(r, 3, out_cxt));
		add(&fl, "period", period ? period : pstrdup("lifetime"));
		add(&fl, "spent", lua_int(current ? billing_col_int64(r, 7, 0) : 0));
		add(&fl, "synced_at_ms", i64(synced_ms));
		(void) billing_col(r, 4, &isnull);
		if (!isnull)
		{
			add(&fl, "budget", lua_int(billing_col_int64(r, 4, 0)));
			add(&fl, "holds", lua_int(billing_col_int64(r, 8, 0)));
			d = billing_col(r, 9, &isnull);
			if (!isnull)
				add(&fl, "holds_expire_at_ms", i64(epoch_ms_floor(DatumGetTimestampTz(d))));
		}
		if (period && strcmp(period, "day") == 0)
			add(&fl, "resets_at_ms", i64(epoch_ms(billing_local_midnight(f->timezone, f->today + 1))));
		else if (period && strcmp(period, "month") == 0)
			add(&fl, "resets_at_ms",
				i64(epoch_ms(billing_local_midnight(f->timezone,
													billing_next_month_start(f->this_month)))));

		s = palloc0(sizeof(SyncSnap));
		s->tenant = f->tenant;
		s->key_id = billing_col_cstring(r, 2, out_cxt);
		s->version = billing_col_int64(r, 10, f->version);
		s->input = f->input;
		s->first_commit = f->want->first_commit;
		s->fields = fl.f;
		s->nfields = fl.n;
		f->keys = lappend(f->keys, s);
		MemoryContextSwitchTo(old);
	}
}

static Datum
text_array(List *strings)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(list_length(strings), 1));
	int			n = 0;
	ListCell   *lc;

	foreach(lc, strings)
		elems[n++] = CStringGetTextDatum(lfirst(lc));
	return PointerGetDatum(construct_array(elems, n, TEXTOID, -1, false, TYPALIGN_INT));
}

static Datum
int8_array(int64 *v, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		elems[i] = Int64GetDatum(v[i]);
	return PointerGetDatum(construct_array(elems, n, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

/*
 * The key hashes of the tenants found, onto their facts: with 1.3's schema
 * every key; else the keys each want names, those of its holds that
 * expired (their open holds changed), and those its scan finds (at most
 * max_keys when max_keys > 0: the want then says where to go on).
 */
static void
key_snapshots(TenantFacts *facts, int nfacts, int max_keys, int64 synced_ms,
			  MemoryContext out_cxt)
{
	static KeyPlan plan_all;
	static KeyPlan plan_named;
	static KeyPlan plan_scan;
	static SPIPlanPtr plan_remote = NULL;
	bool		distributed;
	List	   *remote = NIL;
	List	   *named_t = NIL;
	List	   *named_k = NIL;
	List	   *scan_t = NIL;
	int64	   *since = palloc(sizeof(int64) * Max(nfacts, 1));
	int64	   *after_v = palloc(sizeof(int64) * Max(nfacts, 1));
	Datum	   *after_k = palloc(sizeof(Datum) * Max(nfacts, 1));
	bool	   *after_null = palloc(sizeof(bool) * Max(nfacts, 1));
	Datum	   *lims = palloc(sizeof(Datum) * Max(nfacts, 1));
	bool	   *lim_null = palloc(sizeof(bool) * Max(nfacts, 1));
	bool	   *skip;
	int			nscan = 0;

	if (billing_accounts_table.attnum[AC_GRANTS_STATE] == InvalidAttrNumber)
	{
		/* 1.3's schema: api_keys has no version (the one of 1.4 does) */
		Oid			types[1] = {TEXTARRAYOID};
		Datum		values[1];
		List	   *tenants = NIL;

		for (int i = 0; i < nfacts; i++)
			tenants = lappend(tenants, facts[i].tenant);
		values[0] = text_array(tenants);
		billing_spi_read(key_plan(&plan_all, keys_all_sql, 1, types, false),
						 values, NULL, "reading api keys");
		key_rows(facts, nfacts, synced_ms, out_cxt, NULL);
		return;
	}

	/* Citus: this node's tenants from its shards, the others routed */
	distributed = billing_is_distributed(get_relname_relid("api_keys",
														   get_namespace_oid("billing", false)));
	for (int i = 0; i < nfacts; i++)
	{
		TenantFacts *f = &facts[i];
		SyncWant   *w = f->want;
		ListCell   *lc;

		if (f->remote)
		{
			/* every key, in one go (rare: see keys_remote_sql) */
			remote = lappend(remote, f->tenant);
			continue;
		}
		for (int k = 0; k < w->nkeys; k++)
		{
			named_t = lappend(named_t, f->tenant);
			named_k = lappend(named_k, w->keys[k]);
		}
		foreach(lc, f->held_keys)
		{
			named_t = lappend(named_t, f->tenant);
			named_k = lappend(named_k, lfirst(lc));
		}
		if (w->scan_since != SYNC_NO_SCAN)
		{
			scan_t = lappend(scan_t, f->tenant);
			since[nscan] = w->scan_since;
			after_null[nscan] = !w->resume;
			after_v[nscan] = w->resume ? w->after_version : 0;
			after_k[nscan] = w->resume ? CStringGetTextDatum(w->after_key) : (Datum) 0;
			lim_null[nscan] = max_keys <= 0;
			lims[nscan] = Int32GetDatum(max_keys + 1);	/* one more: are there more? */
			nscan++;
		}
	}

	if (named_t != NIL)
	{
		Oid			types[2] = {TEXTARRAYOID, TEXTARRAYOID};
		Datum		values[2];

		values[0] = text_array(named_t);
		values[1] = text_array(named_k);
		billing_spi_read(key_plan(&plan_named, keys_named_sql, 2, types, distributed),
						 values, NULL, "reading api keys");
		key_rows(facts, nfacts, synced_ms, out_cxt, NULL);
	}
	if (nscan > 0)
	{
		Oid			types[5] = {TEXTARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TEXTARRAYOID, INT4ARRAYOID};
		Datum		values[5];
		int			dims[1] = {nscan};
		int			lbs[1] = {1};

		values[0] = text_array(scan_t);
		values[1] = int8_array(since, nscan);
		values[2] = int8_array(after_v, nscan);
		values[3] = PointerGetDatum(construct_md_array(after_k, after_null, 1, dims, lbs,
													   TEXTOID, -1, false, TYPALIGN_INT));
		values[4] = PointerGetDatum(construct_md_array(lims, lim_null, 1, dims, lbs,
													   INT4OID, 4, true, TYPALIGN_INT));
		billing_spi_read(key_plan(&plan_scan, keys_scan_sql, 5, types, distributed),
						 values, NULL, "reading api keys");

		/*
		 * A tenant with more than max_keys rows: the last row only says that
		 * there are more.  Keep max_keys; the want goes on after the last.
		 */
		skip = palloc0(sizeof(bool) * Max(SPI_processed, 1));
		if (max_keys > 0)
		{
			int			run = 0;

			for (int r = 0; r < (int) SPI_processed; r++)
			{
				char	   *t = billing_col_cstring(r, 1, CurrentMemoryContext);
				char	   *next = r + 1 < (int) SPI_processed ?
					billing_col_cstring(r + 1, 1, CurrentMemoryContext) : NULL;

				run++;
				if (next == NULL || strcmp(next, t) != 0)
				{
					TenantFacts *f = find_facts(facts, nfacts, t);

					if (run > max_keys && f != NULL)
					{
						skip[r] = true;
						f->want->more = true;
						f->want->resume = true;
						f->want->after_version = billing_col_int64(r - 1, 10, 0);
						f->want->after_key = billing_col_cstring(r - 1, 2, out_cxt);
					}
					run = 0;
				}
			}
		}
		key_rows(facts, nfacts, synced_ms, out_cxt, skip);
	}
	if (remote != NIL)
	{
		Oid			types[1] = {TEXTARRAYOID};
		Datum		values[1];

		billing_keep_plan(&plan_remote, keys_remote_sql, 1, types);
		values[0] = text_array(remote);
		billing_spi_read(plan_remote, values, NULL, "reading api keys of other nodes");
		key_rows(facts, nfacts, synced_ms, out_cxt, NULL);
	}
}

static int
cmp_snap_keys(const ListCell *a, const ListCell *b)
{
	return strcmp(((SyncSnap *) lfirst(a))->key_id, ((SyncSnap *) lfirst(b))->key_id);
}

/*
 * Snapshots of what the wants ask for (a tenant without an account is
 * skipped; a tenant named twice counts once, as its first want says), in
 * tenant order, each tenant's key hashes before its own hash (a gateway
 * script reads the key first: lua/README.md).  At most max_keys key hashes
 * per tenant (0: no bound) where the schema has key versions (1.4): a want
 * with more left gets more = true and where to go on, and its tenant hash
 * waits for the last of them.  Strings are allocated in out_cxt.  Needs a
 * transaction with an active snapshot and SPI connected.
 */
int
billing_snapshot_build(SyncWant *wants, int nwants, int max_keys,
					   MemoryContext out_cxt, SyncSnap **out)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	int64		synced_ms = epoch_ms(GetCurrentTimestamp());
	TenantFacts *facts = palloc0(sizeof(TenantFacts) * Max(nwants, 1));
	int			nfacts = 0;
	int			nsnaps = 0;
	SyncSnap   *snaps;
	DirectReader *accounts = direct_reader_open(&billing_accounts_table, true);

	for (int i = 0; i < nwants; i++)
	{
		TenantFacts *f = &facts[nfacts];

		CHECK_FOR_INTERRUPTS();
		wants[i].more = false;
		f->snap = tenant_snapshot(accounts, wants[i].tenant, f, now, synced_ms, out_cxt);
		if (f->snap == NULL)
			continue;
		f->input = f->snap->input = i;
		f->snap->first_commit = wants[i].first_commit;
		f->want = &wants[i];
		nfacts++;
	}
	direct_reader_close(accounts);
	qsort(facts, nfacts, sizeof(TenantFacts), cmp_facts);
	/* a tenant named twice is one hash (as with = ANY in SQL): the first want */
	for (int i = 1, kept = 1; i <= nfacts; i++)
	{
		if (i == nfacts)
		{
			nfacts = kept;
			break;
		}
		if (strcmp(facts[i].tenant, facts[kept - 1].tenant) != 0)
			facts[kept++] = facts[i];
		else if (facts[i].input < facts[kept - 1].input)
			facts[kept - 1] = facts[i];
	}
	if (nfacts > 0)
		key_snapshots(facts, nfacts, max_keys, synced_ms, out_cxt);

	for (int i = 0; i < nfacts; i++)
		nsnaps += 1 + list_length(facts[i].keys);
	snaps = MemoryContextAlloc(out_cxt, sizeof(SyncSnap) * Max(nsnaps, 1));
	nsnaps = 0;
	for (int i = 0; i < nfacts; i++)
	{
		ListCell   *lc;
		char	   *prev = NULL;

		list_sort(facts[i].keys, cmp_snap_keys);
		foreach(lc, facts[i].keys)
		{
			SyncSnap   *k = lfirst(lc);

			/* a key both named and found by its version: once */
			if (prev != NULL && strcmp(prev, k->key_id) == 0)
				continue;
			prev = k->key_id;
			snaps[nsnaps++] = *k;
		}
		if (!facts[i].want->more)
			snaps[nsnaps++] = *facts[i].snap;
	}
	*out = snaps;
	return nsnaps;
}

/*
 * billing.sync_snapshot_of(tenants text[]) -> SETOF (tenant_id, key_id,
 * version, fields text[]): the same snapshots, for SQL.
 */
Datum
billing_sync_snapshot_of(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext cxt = CurrentMemoryContext;
	Datum	   *elems;
	bool	   *enulls;
	int			n;
	int			nwants = 0;
	SyncWant   *wants;
	SyncSnap   *snaps;
	int			nsnaps;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(0), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &enulls, &n);
	wants = palloc0(sizeof(SyncWant) * Max(n, 1));
	for (int i = 0; i < n; i++)
		if (!enulls[i])
		{
			wants[nwants].tenant = TextDatumGetCString(elems[i]);
			wants[nwants].scan_since = SYNC_SCAN_ALL;	/* every key */
			nwants++;
		}

	billing_spi_connect();
	nsnaps = billing_snapshot_build(wants, nwants, 0, cxt, &snaps);
	SPI_finish();

	for (int i = 0; i < nsnaps; i++)
	{
		Datum		values[4];
		bool		nulls[4] = {0};
		Datum	   *f = palloc(sizeof(Datum) * Max(snaps[i].nfields, 1));

		for (int j = 0; j < snaps[i].nfields; j++)
			f[j] = CStringGetTextDatum(snaps[i].fields[j]);
		values[0] = CStringGetTextDatum(snaps[i].tenant);
		values[1] = snaps[i].key_id ? CStringGetTextDatum(snaps[i].key_id) : (Datum) 0;
		nulls[1] = snaps[i].key_id == NULL;
		values[2] = Int64GetDatum(snaps[i].version);
		values[3] = PointerGetDatum(construct_array(f, snaps[i].nfields, TEXTOID,
													-1, false, TYPALIGN_INT));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
