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
#include "executor/spi.h"
#include "spi.h"
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

/*
 * The earliest expiry of a bucket that still holds something: the one
 * account_expire_grants() must look at next.  A bucket already expired
 * that only open holds still reserve from needs no more looking at (what
 * comes back to it expires then).
 */
static void
set_next_expiry(Account *acc)
{
	acc->has_grants_expiry = false;
	for (int i = 0; i < acc->nbuckets; i++)
		if (acc->buckets[i].remaining > 0 &&
			!TIMESTAMP_NOT_FINITE(acc->buckets[i].expires_at) &&
			(!acc->has_grants_expiry || acc->buckets[i].expires_at < acc->grants_next_expiry))
		{
			acc->has_grants_expiry = true;
			acc->grants_next_expiry = acc->buckets[i].expires_at;
		}
}

/* room for one more listed bucket */
static void
reserve_room(Account *acc)
{
	if (acc->nbuckets < acc->maxbuckets)
		return;
	acc->maxbuckets = Max(acc->maxbuckets * 2, 8);
	if (acc->buckets == NULL)
		acc->buckets = MemoryContextAlloc(acc->cxt, sizeof(Bucket) * acc->maxbuckets);
	else
		acc->buckets = repalloc(acc->buckets, sizeof(Bucket) * acc->maxbuckets);
}

/* buckets with nothing left and nothing reserved leave the list */
static void
drop_closed(Account *acc)
{
	int			kept = 0;

	for (int i = 0; i < acc->nbuckets; i++)
		if (acc->buckets[i].remaining != 0 || acc->buckets[i].reserved != 0)
			acc->buckets[kept++] = acc->buckets[i];
	acc->nbuckets = kept;
}

/*
 * Parse a grants_state array into buckets (palloc'd in CurrentMemoryContext;
 * NULL when there are none).  Malformed input (a corrupted or hand-edited
 * row) is an error, never a crash.
 */
static Bucket *
parse_state(Datum state, const char *tenant, int *nbuckets)
{
	Datum	   *elems;
	bool	   *enulls;
	int			n;
	Bucket	   *buckets;

	deconstruct_array(DatumGetArrayTypeP(state), INT8OID, 8, FLOAT8PASSBYVAL,
					  TYPALIGN_DOUBLE, &elems, &enulls, &n);
	if (n % GRANTS_STATE_WIDTH != 0 || n / GRANTS_STATE_WIDTH > GRANTS_MAX_LISTED)
		elog(ERROR, "billing: accounts.grants_state of \"%s\" is malformed (%d numbers)",
			 tenant, n);
	*nbuckets = n / GRANTS_STATE_WIDTH;
	buckets = palloc(sizeof(Bucket) * Max(*nbuckets, 1));
	for (int i = 0; i < n; i++)
		if (enulls[i])
			elog(ERROR, "billing: accounts.grants_state of \"%s\" has a null", tenant);
	for (int b = 0; b < *nbuckets; b++)
	{
		Datum	   *e = &elems[b * GRANTS_STATE_WIDTH];

		buckets[b].grant_id = DatumGetInt64(e[0]);
		buckets[b].remaining = DatumGetInt64(e[1]);
		buckets[b].reserved = DatumGetInt64(e[2]);
		buckets[b].priority = DatumGetInt64(e[3]);
		buckets[b].expires_at = DatumGetInt64(e[4]);
		if (buckets[b].remaining < 0 || buckets[b].reserved < 0)
			elog(ERROR, "billing: accounts.grants_state of \"%s\" has a negative amount", tenant);
	}
	pfree(elems);
	pfree(enulls);
	return buckets;
}

/* the buckets of accounts.grants_state (account_lock) */
void
grants_load(Account *acc, Datum state, bool isnull)
{
	acc->buckets = NULL;
	acc->nbuckets = 0;
	acc->maxbuckets = 0;
	acc->has_grants_expiry = false;
	if (!isnull)
	{
		MemoryContext old = MemoryContextSwitchTo(acc->cxt);

		acc->buckets = parse_state(state, acc->tenant, &acc->nbuckets);
		acc->maxbuckets = Max(acc->nbuckets, 1);
		MemoryContextSwitchTo(old);
	}
	set_next_expiry(acc);
}

/* accounts.grants_state of the buckets (account_write); NULL when none */
Datum
grants_state_datum(Account *acc, bool *isnull)
{
	Datum	   *elems;
	int			n = 0;

	*isnull = acc->nbuckets == 0;
	if (*isnull)
		return (Datum) 0;
	elems = palloc(sizeof(Datum) * acc->nbuckets * GRANTS_STATE_WIDTH);
	for (int i = 0; i < acc->nbuckets; i++)
	{
		if (acc->buckets[i].remaining == 0 && acc->buckets[i].reserved == 0)
			continue;			/* closed: leaves the list */
		elems[n++] = Int64GetDatum(acc->buckets[i].grant_id);
		elems[n++] = Int64GetDatum(acc->buckets[i].remaining);
		elems[n++] = Int64GetDatum(acc->buckets[i].reserved);
		elems[n++] = Int64GetDatum(acc->buckets[i].priority);
		elems[n++] = Int64GetDatum(acc->buckets[i].expires_at);
	}
	if (n == 0)
	{
		*isnull = true;
		return (Datum) 0;
	}
	return PointerGetDatum(construct_array(elems, n, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

/* a copy of the buckets, to undo an in-memory change (a charge that replays) */
void
grants_copy(Account *acc, Bucket **buckets, int *n)
{
	*n = acc->nbuckets;
	*buckets = NULL;
	if (acc->nbuckets > 0)
	{
		*buckets = palloc(sizeof(Bucket) * acc->nbuckets);
		memcpy(*buckets, acc->buckets, sizeof(Bucket) * acc->nbuckets);
	}
}

void
grants_restore(Account *acc, Bucket *buckets, int n)
{
	/* a fresh array: the account's may have moved since the copy */
	acc->buckets = NULL;
	acc->maxbuckets = 0;
	acc->nbuckets = 0;
	for (int i = 0; i < n; i++)
	{
		reserve_room(acc);
		acc->buckets[acc->nbuckets++] = buckets[i];
	}
	set_next_expiry(acc);
}

/*
 * What the balance still holds of buckets whose expiry time has passed but
 * whose 'expire' entry is not written yet: every reader subtracts it, so
 * expired credit is never shown as spendable.  (Shares that open holds
 * reserve of such buckets stay reserved while the holds are open; what
 * holds that expired themselves reserved: grants_held_expired.)
 */
int64
grants_expired_micros(Account *acc, TimestampTz now)
{
	int64		sum = 0;

	if (!acc->has_grants_expiry || acc->grants_next_expiry > now)
		return 0;
	for (int i = 0; i < acc->nbuckets; i++)
		if (acc->buckets[i].expires_at <= now)
			sum = billing_add_micros(sum, acc->buckets[i].remaining, "expired credit");
	return sum;
}

/*
 * Of the shares a hold that expires at hold_expires_at reserved, what has
 * expired by `at`: a share comes back to its bucket when the hold expires
 * and expires with the bucket, so it is gone once both times have passed.
 */
int64
grants_shares_expired(Bucket *buckets, int nbuckets, Draws *shares,
					  TimestampTz hold_expires_at, TimestampTz at)
{
	int64		sum = 0;

	if (hold_expires_at > at)
		return 0;
	for (int s = 0; s < shares->n; s++)
		for (int i = 0; i < nbuckets; i++)
			if (buckets[i].grant_id == shares->grant_id[s])
			{
				if (buckets[i].expires_at <= at && shares->amount[s] > 0)
					sum = billing_add_micros(sum, shares->amount[s], "expired credit");
				break;
			}
	return sum;
}

/*
 * What holds that have expired (but are not marked so yet) reserved of
 * buckets that have expired too: gone from the balance as well.  Reads the
 * holds only when both can be the case, which is rare.  Needs SPI.
 */
int64
grants_held_expired(Account *acc, TimestampTz now)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TIMESTAMPTZOID};
	Datum		values[2];
	bool		any = false;
	int64		sum = 0;

	if (!acc->has_next_expiry || acc->next_expiry > now)
		return 0;
	for (int i = 0; i < acc->nbuckets && !any; i++)
		any = acc->buckets[i].reserved > 0 && acc->buckets[i].expires_at <= now;
	if (!any)
		return 0;
	billing_keep_plan(&plan,
					  "SELECT grant_draws, expires_at FROM billing.holds "
					  "WHERE tenant_id OPERATOR(pg_catalog.=) $1 "
					  "  AND status OPERATOR(pg_catalog.=) 'open' "
					  "  AND expires_at OPERATOR(pg_catalog.<=) $2 "
					  "  AND grant_draws IS NOT NULL",
					  2, types);
	values[0] = PointerGetDatum(acc->tenant_id);
	values[1] = TimestampTzGetDatum(now);
	/* in the snapshot the account row was read with (a read, never a new one) */
	billing_spi_read(plan, values, NULL, "reading expired holds");
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		Draws		shares;
		TimestampTz h_expires;

		draws_from_datum(billing_col((int) r, 1, &isnull), &shares);
		h_expires = DatumGetTimestampTz(billing_col((int) r, 2, &isnull));
		sum = billing_add_micros(sum, grants_shares_expired(acc->buckets, acc->nbuckets,
															&shares, h_expires, now),
								 "expired credit");
	}
	return sum;
}

/* the wallet: the balance beyond every bucket (negative: debt) */
int64
grants_wallet(Account *acc)
{
	int64		wallet = acc->balance;

	for (int i = 0; i < acc->nbuckets; i++)
	{
		wallet = billing_add_micros(wallet, -acc->buckets[i].remaining, "wallet");
		wallet = billing_add_micros(wallet, -acc->buckets[i].reserved, "wallet");
	}
	return wallet;
}

/* insert a bucket in burn order */
static void
insert_bucket(Account *acc, Bucket *b)
{
	int			pos;

	reserve_room(acc);
	pos = acc->nbuckets;
	while (pos > 0 && burn_cmp(b, &acc->buckets[pos - 1]) < 0)
	{
		acc->buckets[pos] = acc->buckets[pos - 1];
		pos--;
	}
	acc->buckets[pos] = *b;
	acc->nbuckets++;
	set_next_expiry(acc);
}

/* a new grant's bucket (billing_grant has checked GRANTS_MAX_OPEN) */
void
grants_add_bucket(Account *acc, int64 grant_id, int64 amount, int64 priority,
				  TimestampTz expires_at)
{
	Bucket		b;

	b.grant_id = grant_id;
	b.remaining = amount;
	b.reserved = 0;
	b.priority = priority;
	b.expires_at = expires_at;
	insert_bucket(acc, &b);
	acc->grants_changed = true;
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
	/* grant.expired (events.h), before the write that saves its sequence */
	{
		StringInfoData p;

		ej_begin(&p);
		ej_int(&p, "grant_id", grant_id);
		ej_money(&p, "amount", amount);
		ej_str(&p, "currency", acc->currency);
		ej_ts(&p, "expired_at", expired_at);
		ej_str(&p, "entry_trace_id", trace);
		ej_str(&p, "reason", why);
		ej_money(&p, "balance", acc->balance);
		ej_end(&p);
		events_emit(acc, "grant.expired", &p);
	}
	if (billing_post_entry(acc, &e) == 0)
		elog(ERROR, "billing: expiry entry %s exists already", trace);
}

/*
 * Write the expiry of every bucket whose time has come: what is left in it
 * leaves the balance through an 'expire' entry dated at its expiry time.
 * A bucket open holds still reserve from stays listed (what they give back
 * expires then).  Cheap when nothing is due (one comparison), so every
 * call on the account runs it.
 */
void
account_expire_grants(Account *acc)
{
	if (!acc->has_grants_expiry || acc->grants_next_expiry > acc->now)
		return;
	for (int i = 0; i < acc->nbuckets; i++)
	{
		Bucket	   *b = &acc->buckets[i];

		if (b->expires_at <= acc->now && b->remaining > 0)
		{
			int64		amount = b->remaining;

			b->remaining = 0;
			write_expiry(acc, b->grant_id, amount, b->expires_at, "grant expired");
		}
	}
	drop_closed(acc);
	set_next_expiry(acc);
	acc->grants_changed = true;
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
 * beyond it, the credit limit, which need no bookkeeping here.  With
 * `reserve` (a hold) the amount moves from remaining to reserved; without,
 * it is spent.  `out` gets the explicit buckets taken from.  Expired
 * buckets have nothing left (account_expire_grants ran first).
 */
void
grants_draw(Account *acc, int64 amount, bool reserve, Draws *out)
{
	if (acc->nbuckets == 0 || amount <= 0)
		return;
	for (int i = 0; i < acc->nbuckets && amount > 0; i++)
	{
		Bucket	   *b = &acc->buckets[i];
		int64		take = Min(amount, b->remaining);

		if (take <= 0)
			continue;
		draws_add(out, b->grant_id, take);
		b->remaining -= take;
		if (reserve)
			b->reserved += take;
		amount -= take;
	}
	drop_closed(acc);
	set_next_expiry(acc);
	acc->grants_changed = true;
}

/* a capture consumed `amount` of what a hold reserved of bucket grant_id */
void
grants_unreserve(Account *acc, int64 grant_id, int64 amount)
{
	for (int i = 0; i < acc->nbuckets; i++)
		if (acc->buckets[i].grant_id == grant_id)
		{
			if (acc->buckets[i].reserved < amount)
				elog(ERROR, "billing: grant " INT64_FORMAT " of \"%s\" has " INT64_FORMAT
					 " reserved, a capture consumes " INT64_FORMAT,
					 grant_id, acc->tenant, acc->buckets[i].reserved, amount);
			acc->buckets[i].reserved -= amount;
			drop_closed(acc);
			acc->grants_changed = true;
			return;
		}
	elog(ERROR, "billing: a hold of \"%s\" reserved of grant " INT64_FORMAT
		 ", which is not open", acc->tenant, grant_id);
}

/*
 * Give shares back to their buckets at time `when`: a hold's unused
 * reservation (`reserved`: it leaves the bucket's reserved amount), or a
 * refund (the bucket is reopened from billing.grants if it ran out).  A
 * share that comes back at or after its bucket's expiry goes into
 * `expired`: the caller writes its expiry, dated `when`, after its own
 * entry (grants_write_expiries); the others are spendable again.
 */
void
grants_give_back(Account *acc, Draws *shares, bool reserved, TimestampTz when,
				 Draws *expired)
{
	static SPIPlanPtr plan = NULL;

	for (int s = 0; s < shares->n; s++)
	{
		int64		gid = shares->grant_id[s];
		int64		amount = shares->amount[s];
		Bucket	   *b = NULL;

		if (amount <= 0)
			continue;
		for (int i = 0; i < acc->nbuckets; i++)
			if (acc->buckets[i].grant_id == gid)
			{
				b = &acc->buckets[i];
				break;
			}
		if (reserved)
		{
			if (b == NULL || b->reserved < amount)
				elog(ERROR, "billing: a hold of \"%s\" gives back " INT64_FORMAT
					 " of grant " INT64_FORMAT ", which has %s reserved",
					 acc->tenant, amount, gid,
					 b ? billing_format_micros(b->reserved) : "nothing");
			b->reserved -= amount;
		}
		if (b != NULL)
		{
			if (b->expires_at <= when)
				draws_add(expired, gid, amount);
			else
				b->remaining = billing_add_micros(b->remaining, amount, "remaining of a grant");
		}
		else
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
			if (expires_at <= when)
				draws_add(expired, gid, amount);
			else
			{
				Bucket		nb;

				nb.grant_id = gid;
				nb.remaining = amount;
				nb.reserved = 0;
				nb.priority = priority;
				nb.expires_at = expires_at;
				insert_bucket(acc, &nb);
			}
		}
	}
	drop_closed(acc);
	set_next_expiry(acc);
	acc->grants_changed = true;
}

/* the expiry, at `when`, of shares given back to buckets that had expired */
void
grants_write_expiries(Account *acc, Draws *expired, TimestampTz when, const char *why)
{
	for (int i = 0; i < expired->n; i++)
		if (expired->amount[i] > 0)
			write_expiry(acc, expired->grant_id[i], expired->amount[i], when, why);
}
