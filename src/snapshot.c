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
#include "miscadmin.h"
#include "sync.h"
#include "utils/array.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

PG_FUNCTION_INFO_V1(billing_sync_snapshot_of);

/* what a tenant's key hashes need of its account */
typedef struct TenantFacts
{
	char	   *tenant;
	int			input;
	int64		version;
	const char *timezone;
	DateADT		today;
	DateADT		this_month;
	List	   *keys;			/* SyncSnap * of its API keys */
	SyncSnap   *snap;			/* the tenant hash */
	bool		remote;			/* Citus: read through another node */
} TenantFacts;

/* Unix epoch milliseconds of a timestamptz, rounded like ::bigint */
static int64
epoch_ms(TimestampTz ts)
{
	int64		us = ts + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;

	return us >= 0 ? (us + 500) / 1000 : -((-us + 500) / 1000);
}

static char *
i64(int64 v)
{
	return psprintf(INT64_FORMAT, v);
}

/*
 * An amount or counter for the gateway scripts: Lua numbers are doubles,
 * exact only up to 2^53 - 1 micro-units (about 9 billion units), and the
 * scripts refuse anything beyond (BADSTATE).  Larger magnitudes are sent as
 * +-(2^53 - 1): funds and caps that large are never the limiting factor,
 * and a spend counter that large is over any cap that Lua can express.
 */
#define LUA_MAX_INT		INT64CONST(9007199254740991)

static char *
lua_int(int64 v)
{
	return i64(Max(Min(v, LUA_MAX_INT), -LUA_MAX_INT));
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

/* open holds still counting (the cached sum, unless one expired) */
static int64
effective_holds(char *tenant, Datum *v, bool *nulls, TimestampTz now)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	if (nulls[AC_HOLDS_NEXT_EXPIRY] ||
		DatumGetTimestampTz(v[AC_HOLDS_NEXT_EXPIRY]) > now)
		return DatumGetInt64(v[AC_HOLDS]);
	billing_keep_plan(&plan,
					  "SELECT coalesce(pg_catalog.sum(amount_micros OPERATOR(pg_catalog.-) captured_micros "
					  "OPERATOR(pg_catalog.-) released_micros), 0)::pg_catalog.int8 "
					  "FROM billing.holds WHERE tenant_id OPERATOR(pg_catalog.=) $1 "
					  "AND status OPERATOR(pg_catalog.=) 'open' "
					  "AND expires_at OPERATOR(pg_catalog.>) pg_catalog.now()",
					  1, types);
	values[0] = CStringGetTextDatum(tenant);
	billing_spi_read(plan, values, NULL, "summing open holds");
	return billing_col_int64(0, 1, 0);
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

/* the tenant hash; NULL when the account does not exist */
static SyncSnap *
tenant_snapshot(DirectReader *accounts, char *tenant, TenantFacts *facts,
				TimestampTz now, int64 synced_ms, MemoryContext out_cxt)
{
	Datum		v[AC_NCOLS];
	bool		nulls[AC_NCOLS];
	Fields		fl = {0};
	SyncSnap   *s;
	int64		holds;
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
	holds = effective_holds(tenant, v, nulls, now);

	old = MemoryContextSwitchTo(out_cxt);
	facts->tenant = pstrdup(tenant);
	facts->version = DatumGetInt64(v[AC_VERSION]);
	facts->timezone = TextDatumGetCString(v[AC_TIMEZONE]);
	facts->today = billing_local_date(facts->timezone, now);
	facts->this_month = billing_month_start(facts->today);
	same_day = !nulls[AC_USAGE_DAY] && DatumGetDateADT(v[AC_USAGE_DAY]) == facts->today;
	same_month = !nulls[AC_USAGE_MONTH] && DatumGetDateADT(v[AC_USAGE_MONTH]) == facts->this_month;

	add(&fl, "status", TextDatumGetCString(v[AC_STATUS]));
	add(&fl, "currency", TextDatumGetCString(v[AC_CURRENCY]));
	add(&fl, "balance", lua_int(DatumGetInt64(v[AC_BALANCE])));
	add(&fl, "credit_limit", lua_int(DatumGetInt64(v[AC_CREDIT_LIMIT])));
	add(&fl, "holds", lua_int(holds));
	add(&fl, "available", available(DatumGetInt64(v[AC_BALANCE]),
									DatumGetInt64(v[AC_CREDIT_LIMIT]), holds));
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
 * The query of the key hashes of tenants = ANY ($1): through
 * billing.api_keys (single node, or tenants of other nodes: Citus routes
 * it), or, for this node's tenants on Citus, over the union of the local
 * shards of api_keys and holds (a parameter array is not pruned by Citus:
 * the query would go to every shard of every node).  The local plan is
 * kept until the set of local shards changes.
 */
static void key_rows(TenantFacts *facts, int nfacts, int nrows, int64 synced_ms,
					 MemoryContext out_cxt);

#define KEY_COLUMNS \
	"SELECT k.tenant_id, k.key_id, k.status, k.budget_micros, k.budget_period, " \
	"       k.period_start, k.period_spend_micros, " \
	"       CASE WHEN k.budget_micros IS NOT NULL THEN " \
	"         (SELECT coalesce(pg_catalog.sum(h.amount_micros OPERATOR(pg_catalog.-) h.captured_micros " \
	"                  OPERATOR(pg_catalog.-) h.released_micros), 0)::pg_catalog.int8 " \
	"            FROM %s h " \
	"           WHERE h.tenant_id OPERATOR(pg_catalog.=) k.tenant_id " \
	"             AND h.api_key OPERATOR(pg_catalog.=) k.key_id " \
	"             AND h.status OPERATOR(pg_catalog.=) 'open' " \
	"             AND h.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()) END " \
	"FROM %s k WHERE k.tenant_id OPERATOR(pg_catalog.=) ANY ($1)"

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

static SPIPlanPtr
key_plan(bool local)
{
	static SPIPlanPtr plan_routed = NULL;
	static SPIPlanPtr plan_local = NULL;
	static char *local_signature = NULL;
	Oid			types[1] = {TEXTARRAYOID};
	Oid			nsp;
	StringInfoData sig;
	char	   *keys_u;
	char	   *holds_u;

	if (!local)
		return billing_keep_plan(&plan_routed,
								 psprintf(KEY_COLUMNS, "billing.holds", "billing.api_keys"),
								 1, types);
	nsp = get_namespace_oid("billing", false);
	initStringInfo(&sig);
	keys_u = shard_union(get_relname_relid("api_keys", nsp), &sig);
	holds_u = shard_union(get_relname_relid("holds", nsp), &sig);
	if (plan_local != NULL && local_signature != NULL &&
		strcmp(local_signature, sig.data) == 0)
		return plan_local;
	if (plan_local != NULL)
		SPI_freeplan(plan_local);
	plan_local = NULL;
	if (local_signature)
		pfree(local_signature);
	local_signature = MemoryContextStrdup(TopMemoryContext, sig.data);
	return billing_keep_plan(&plan_local, psprintf(KEY_COLUMNS, holds_u, keys_u), 1, types);
}

/* the hashes of the API keys of the tenants found, onto their facts */
static void
key_snapshots(TenantFacts *facts, int nfacts, int64 synced_ms,
			  MemoryContext out_cxt)
{
	bool		distributed = billing_is_distributed(get_relname_relid("api_keys",
																	   get_namespace_oid("billing", false)));

	/* this node's tenants, then (Citus) those read through other nodes */
	for (int pass = 0; pass < (distributed ? 2 : 1); pass++)
	{
		Datum		values[1];
		Datum	   *elems = palloc(sizeof(Datum) * Max(nfacts, 1));
		int			n = 0;
		int			nrows;

		for (int i = 0; i < nfacts; i++)
			if (facts[i].remote == (pass == 1))
				elems[n++] = CStringGetTextDatum(facts[i].tenant);
		if (n == 0)
			continue;
		values[0] = PointerGetDatum(construct_array(elems, n, TEXTOID, -1, false,
													TYPALIGN_INT));
		/* a budget counts the key's open holds (account.c): only then needed */
		billing_spi_read(key_plan(distributed && pass == 0), values, NULL, "reading api keys");
		if (SPI_processed > (uint64) INT_MAX)
			elog(ERROR, "billing: too many api keys in one snapshot batch");
		nrows = (int) SPI_processed;
		key_rows(facts, nfacts, nrows, synced_ms, out_cxt);
	}
}

/* the key hashes of the SPI result rows, onto their tenants' facts */
static void
key_rows(TenantFacts *facts, int nfacts, int nrows, int64 synced_ms,
		 MemoryContext out_cxt)
{
	for (int r = 0; r < nrows; r++)
	{
		TenantFacts probe = {0};
		TenantFacts *f;
		Fields		fl = {0};
		SyncSnap   *s;
		char	   *period;
		bool		isnull;
		bool		current;
		Datum		start;
		MemoryContext old = MemoryContextSwitchTo(out_cxt);

		probe.tenant = billing_col_cstring(r, 1, out_cxt);
		f = bsearch(&probe, facts, nfacts, sizeof(TenantFacts), cmp_facts);
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
		s->version = f->version;
		s->input = f->input;
		s->fields = fl.f;
		s->nfields = fl.n;
		f->keys = lappend(f->keys, s);
		MemoryContextSwitchTo(old);
	}
}

static int
cmp_snap_keys(const ListCell *a, const ListCell *b)
{
	return strcmp(((SyncSnap *) lfirst(a))->key_id, ((SyncSnap *) lfirst(b))->key_id);
}

/*
 * Snapshots of the given tenants (a tenant without an account is skipped),
 * in tenant order, each tenant's key hashes before its own hash (a gateway
 * script reads the key first: lua/README.md).  Strings are allocated in
 * out_cxt.  Needs a transaction with an active snapshot and SPI connected.
 */
int
billing_snapshot_build(char **tenants, int ntenants, MemoryContext out_cxt,
					   SyncSnap **out)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	int64		synced_ms = epoch_ms(GetCurrentTimestamp());
	TenantFacts *facts = palloc0(sizeof(TenantFacts) * Max(ntenants, 1));
	int			nfacts = 0;
	int			nsnaps = 0;
	SyncSnap   *snaps;
	DirectReader *accounts = direct_reader_open(&billing_accounts_table, true);

	for (int i = 0; i < ntenants; i++)
	{
		TenantFacts *f = &facts[nfacts];

		CHECK_FOR_INTERRUPTS();

		f->snap = tenant_snapshot(accounts, tenants[i], f, now, synced_ms, out_cxt);
		if (f->snap == NULL)
			continue;
		f->input = f->snap->input = i;
		nfacts++;
	}
	direct_reader_close(accounts);
	qsort(facts, nfacts, sizeof(TenantFacts), cmp_facts);
	/* a tenant named twice is one hash (as with = ANY in SQL) */
	for (int i = 1, kept = 1; i <= nfacts; i++)
	{
		if (i == nfacts)
		{
			nfacts = kept;
			break;
		}
		if (strcmp(facts[i].tenant, facts[kept - 1].tenant) != 0)
			facts[kept++] = facts[i];
	}
	if (nfacts > 0)
		key_snapshots(facts, nfacts, synced_ms, out_cxt);

	for (int i = 0; i < nfacts; i++)
		nsnaps += 1 + list_length(facts[i].keys);
	snaps = MemoryContextAlloc(out_cxt, sizeof(SyncSnap) * Max(nsnaps, 1));
	nsnaps = 0;
	for (int i = 0; i < nfacts; i++)
	{
		ListCell   *lc;

		list_sort(facts[i].keys, cmp_snap_keys);
		foreach(lc, facts[i].keys)
			snaps[nsnaps++] = *(SyncSnap *) lfirst(lc);
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
	int			ntenants = 0;
	char	  **tenants;
	SyncSnap   *snaps;
	int			nsnaps;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(0), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &enulls, &n);
	tenants = palloc(sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
		if (!enulls[i])
			tenants[ntenants++] = TextDatumGetCString(elems[i]);

	billing_spi_connect();
	nsnaps = billing_snapshot_build(tenants, ntenants, cxt, &snaps);
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
