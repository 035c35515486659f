/*-------------------------------------------------------------------------
 *
 * grants.c
 *	  Credit buckets (see grants.h): the open buckets of a locked account,
 *	  the burn order, expiry, and shares given back by holds and refunds.
 *	  The SQL functions billing_grant() and billing_refund() are in
 *	  credits.c.
 *
 * Everything here runs under the account row lock (account_lock), inside
 * SPI, like the rest of account.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "account.h"
#include "catalog/pg_type.h"
#include "grants.h"
#include "ledger.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

/* burn order: priority desc, expires_at asc (never last), grant_id asc */
static int
burn_cmp(const Bucket *a, const Bucket *b)
{
	if (a->priority != b->priority)
		return a->priority > b->priority ? -1 : 1;
	if (a->expires_at != b->expires_at)
		return a->expires_at < b->expires_at ? -1 : 1;
	if (a->grant_id != b->grant_id)
		return a->grant_id < b->grant_id ? -1 : 1;
	return 0;
}

static void
set_next_expiry(Account *acc)
{
	acc->has_grants_expiry = false;
	for (int i = 0; i < acc->nbuckets; i++)
		if (!TIMESTAMP_NOT_FINITE(acc->buckets[i].expires_at) &&
			(!acc->has_grants_expiry || acc->buckets[i].expires_at < acc->grants_next_expiry))
		{
			acc->has_grants_expiry = true;
			acc->grants_next_expiry = acc->buckets[i].expires_at;
		}
}

/* the buckets of accounts.grants_state (account_lock) */
void
grants_load(Account *acc, Datum state, bool isnull)
{
	Datum	   *elems;
	bool	   *enulls;
	int			n;

	acc->buckets = MemoryContextAlloc(acc->cxt, sizeof(Bucket) * GRANTS_MAX_OPEN);
	acc->nbuckets = 0;
	acc->has_grants_expiry = false;
	if (isnull)
		return;
	deconstruct_array(DatumGetArrayTypeP(state), INT8OID, 8, FLOAT8PASSBYVAL,
					  TYPALIGN_DOUBLE, &elems, &enulls, &n);
	if (n % GRANTS_STATE_WIDTH != 0 || n / GRANTS_STATE_WIDTH > GRANTS_MAX_OPEN)
		elog(ERROR, "billing: accounts.grants_state of \"%s\" is malformed (%d numbers)",
			 acc->tenant, n);
	for (int i = 0; i < n; i += GRANTS_STATE_WIDTH)
	{
		Bucket	   *b = &acc->buckets[acc->nbuckets++];

		for (int k = 0; k < GRANTS_STATE_WIDTH; k++)
			if (enulls[i + k])
				elog(ERROR, "billing: accounts.grants_state of \"%s\" has a null", acc->tenant);
		b->grant_id = DatumGetInt64(elems[i]);
		b->remaining = DatumGetInt64(elems[i + 1]);
		b->priority = DatumGetInt64(elems[i + 2]);
		b->expires_at = DatumGetInt64(elems[i + 3]);
	}
	set_next_expiry(acc);
}

/* accounts.grants_state of the buckets (account_write); NULL when none */
Datum
grants_state_datum(Account *acc, bool *isnull)
{
	Datum		elems[GRANTS_MAX_OPEN * GRANTS_STATE_WIDTH];
	int			n = 0;

	*isnull = acc->nbuckets == 0;
	if (*isnull)
		return (Datum) 0;
	for (int i = 0; i < acc->nbuckets; i++)
	{
		elems[n++] = Int64GetDatum(acc->buckets[i].grant_id);
		elems[n++] = Int64GetDatum(acc->buckets[i].remaining);
		elems[n++] = Int64GetDatum(acc->buckets[i].priority);
		elems[n++] = Int64GetDatum(acc->buckets[i].expires_at);
	}
	return PointerGetDatum(construct_array(elems, n, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

/*
 * What the balance still holds of buckets whose expiry time has passed but
 * whose 'expire' entry is not written yet: every reader subtracts it, so
 * expired credit is never shown as spendable.
 */
int64
grants_expired_micros(Account *acc, TimestampTz now)
{
	int64		sum = 0;

	if (!acc->has_grants_expiry || acc->grants_next_expiry > now)
		return 0;
	for (int i = 0; i < acc->nbuckets; i++)
		if (acc->buckets[i].expires_at <= now)
			sum += acc->buckets[i].remaining;
	return sum;
}

/* insert a bucket in burn order; ZB080 beyond GRANTS_MAX_OPEN */
static void
insert_bucket(Account *acc, Bucket *b)
{
	int			pos = acc->nbuckets;

	if (acc->nbuckets >= GRANTS_MAX_OPEN)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_TOO_MANY_GRANTS),
				 errmsg("account \"%s\" has too many open grants", acc->tenant),
				 errdetail("It has %d open grants; the limit is %d.",
						   acc->nbuckets, GRANTS_MAX_OPEN),
				 errhint("Let some grants run out or expire, or top up the wallet with billing_credit().")));
	while (pos > 0 && burn_cmp(b, &acc->buckets[pos - 1]) < 0)
	{
		acc->buckets[pos] = acc->buckets[pos - 1];
		pos--;
	}
	acc->buckets[pos] = *b;
	acc->nbuckets++;
	set_next_expiry(acc);
}

void
grants_add_bucket(Account *acc, int64 grant_id, int64 amount, int64 priority,
				  TimestampTz expires_at)
{
	Bucket		b;

	b.grant_id = grant_id;
	b.remaining = amount;
	b.priority = priority;
	b.expires_at = expires_at;
	insert_bucket(acc, &b);
}

/*
 * An 'expire' entry taking `amount` of bucket grant_id out of the balance.
 * Its event_at is when the money left the balance: the bucket's expiry time
 * for what the bucket held then (no entry can lie between that time and
 * this one: the first operation after it writes the expiry), and now for a
 * share given back later.
 */
static void
write_expiry(Account *acc, int64 grant_id, int64 amount, TimestampTz expired_at,
			 const char *why)
{
	EntryWrite	e = {0};
	char	   *trace;

	acc->balance = billing_add_micros(acc->balance, -amount, "account balance");
	acc->version++;
	/* unique per tenant: a bucket can expire again (a share given back) */
	trace = psprintf(BILLING_TRACE_PREFIX "expire:" INT64_FORMAT ":" INT64_FORMAT,
					 grant_id, acc->version);
	e.kind = "expire";
	e.amount = -amount;
	e.trace_id = cstring_to_text(trace);
	e.description = cstring_to_text(why);
	e.metadata = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	e.has_event_at = true;
	e.event_at = expired_at;
	e.grant_id = grant_id;
	if (billing_post_entry(acc, &e) == 0)
		elog(ERROR, "billing: expiry entry %s exists already", trace);
}

/*
 * Write the expiry of every bucket whose time has come: what is left in it
 * leaves the balance through an 'expire' entry.  Cheap when nothing is due
 * (one comparison), so every call on the account runs it.
 */
void
account_expire_grants(Account *acc)
{
	int			kept = 0;
	Bucket	   *due;
	int			ndue = 0;

	if (!acc->has_grants_expiry || acc->grants_next_expiry > acc->now)
		return;
	due = palloc(sizeof(Bucket) * acc->nbuckets);
	for (int i = 0; i < acc->nbuckets; i++)
	{
		if (acc->buckets[i].expires_at <= acc->now)
			due[ndue++] = acc->buckets[i];
		else
			acc->buckets[kept++] = acc->buckets[i];
	}
	acc->nbuckets = kept;
	set_next_expiry(acc);
	for (int i = 0; i < ndue; i++)
		if (due[i].remaining > 0)
			write_expiry(acc, due[i].grant_id, due[i].remaining, due[i].expires_at,
						 "grant expired");
	/* nothing may have been written (buckets already spent): save the state */
	acc->grants_changed = true;
	pfree(due);
}

void
draws_add(Draws *d, int64 grant_id, int64 amount)
{
	for (int i = 0; i < d->n; i++)
		if (d->grant_id[i] == grant_id)
		{
			d->amount[i] += amount;
			return;
		}
	if (d->n == d->max)
	{
		d->max = d->max ? d->max * 2 : 4;
		d->grant_id = d->grant_id ? repalloc(d->grant_id, sizeof(int64) * d->max) :
			palloc(sizeof(int64) * d->max);
		d->amount = d->amount ? repalloc(d->amount, sizeof(int64) * d->max) :
			palloc(sizeof(int64) * d->max);
	}
	d->grant_id[d->n] = grant_id;
	d->amount[d->n] = amount;
	d->n++;
}

/* the bigint[] of grant id, amount pairs (entries.draws, holds.grant_draws) */
Datum
draws_datum(Draws *d)
{
	Datum	   *elems = palloc(sizeof(Datum) * 2 * Max(d->n, 1));

	for (int i = 0; i < d->n; i++)
	{
		elems[2 * i] = Int64GetDatum(d->grant_id[i]);
		elems[2 * i + 1] = Int64GetDatum(d->amount[i]);
	}
	return PointerGetDatum(construct_array(elems, 2 * d->n, INT8OID, 8,
										   FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

void
draws_from_datum(Datum arr, Draws *out)
{
	Datum	   *elems;
	bool	   *enulls;
	int			n;

	memset(out, 0, sizeof(*out));
	deconstruct_array(DatumGetArrayTypeP(arr), INT8OID, 8, FLOAT8PASSBYVAL,
					  TYPALIGN_DOUBLE, &elems, &enulls, &n);
	if (n % 2 != 0)
		elog(ERROR, "billing: a draws array has an odd number of elements");
	for (int i = 0; i < n; i += 2)
	{
		if (enulls[i] || enulls[i + 1])
			elog(ERROR, "billing: a draws array has a null");
		draws_add(out, DatumGetInt64(elems[i]), DatumGetInt64(elems[i + 1]));
	}
}

/*
 * Take `amount` from the explicit buckets in burn order (the caller has
 * checked the funds); what they do not cover comes from the wallet and,
 * beyond it, the credit limit, which need no bookkeeping here.  Exhausted
 * buckets leave the account's list (billing.grants keeps their facts).
 * `out` gets the explicit buckets taken from.
 */
void
grants_draw(Account *acc, int64 amount, Draws *out)
{
	int			kept = 0;

	if (acc->nbuckets == 0 || amount <= 0)
		return;
	for (int i = 0; i < acc->nbuckets; i++)
	{
		Bucket	   *b = &acc->buckets[i];
		int64		take = Min(amount, b->remaining);

		if (take > 0)
		{
			draws_add(out, b->grant_id, take);
			b->remaining -= take;
			amount -= take;
		}
		if (b->remaining > 0)
			acc->buckets[kept++] = *b;
	}
	acc->nbuckets = kept;
	set_next_expiry(acc);
	acc->grants_changed = true;
}

/*
 * Give shares back to their buckets (a hold's unused reservation, a
 * refund): to the bucket itself if it is still open, reopened from
 * billing.grants if it ran out meanwhile and has not expired.  A share of a
 * bucket whose expiry time has passed goes into `expired`: the caller
 * writes its expiry (grants_write_expiries) after its own entry, so the
 * balance never keeps expired credit.
 */
void
grants_give_back(Account *acc, Draws *shares, Draws *expired)
{
	static SPIPlanPtr plan = NULL;

	for (int s = 0; s < shares->n; s++)
	{
		int64		gid = shares->grant_id[s];
		int64		amount = shares->amount[s];
		bool		found = false;

		if (amount <= 0)
			continue;
		for (int i = 0; i < acc->nbuckets; i++)
			if (acc->buckets[i].grant_id == gid)
			{
				acc->buckets[i].remaining =
					billing_add_micros(acc->buckets[i].remaining, amount, "remaining of a grant");
				found = true;
				break;
			}
		if (!found)
		{
			Oid			types[2] = {TEXTOID, INT8OID};
			Datum		values[2];
			bool		isnull;
			TimestampTz expires_at;
			int64		priority;

			billing_keep_plan(&plan,
							  "SELECT priority, expires_at FROM billing.grants "
							  "WHERE tenant_id = $1 AND grant_id = $2",
							  2, types);
			values[0] = PointerGetDatum(acc->tenant_id);
			values[1] = Int64GetDatum(gid);
			billing_spi_exec(plan, values, NULL, SPI_OK_SELECT, "reading a grant");
			if (SPI_processed != 1)
				elog(ERROR, "billing: grant " INT64_FORMAT " of \"%s\" vanished", gid, acc->tenant);
			priority = billing_col_int64(0, 1, 0);
			expires_at = DatumGetTimestampTz(billing_col(0, 2, &isnull));
			if (isnull)
				expires_at = DT_NOEND;
			if (expires_at <= acc->now)
				draws_add(expired, gid, amount);
			else
				grants_add_bucket(acc, gid, amount, priority, expires_at);
		}
	}
	acc->grants_changed = true;
}

/* the expiry, now, of shares given back to buckets that have expired */
void
grants_write_expiries(Account *acc, Draws *expired, const char *why)
{
	for (int i = 0; i < expired->n; i++)
		if (expired->amount[i] > 0)
			write_expiry(acc, expired->grant_id[i], expired->amount[i], acc->now, why);
}
