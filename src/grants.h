/*-------------------------------------------------------------------------
 *
 * grants.h
 *	  Credit buckets: grants that expire and are spent in a burn order,
 *	  and refunds that restore a charge to the buckets it drew from.
 *
 * Every credit goes into a bucket.  billing_credit() (top-ups, and every
 * other kind) puts money into the account's wallet: one bucket per account,
 * paid, never expiring, not stored on its own (the wallet is what the
 * balance holds beyond the explicit buckets).  billing_grant() creates an
 * explicit bucket with a category, a priority and maybe an expiry time.
 *
 * The open explicit buckets of an account live on its row (accounts.
 * grants_state, a bigint[] of grant_id, remaining, priority, expires_at per
 * bucket, kept in burn order): every charge locks and rewrites that row
 * anyway, so drawing from buckets costs no extra write.  Burn order: higher
 * priority first, then earliest expiry (never-expiring last), then oldest;
 * the wallet after every explicit bucket; beyond the wallet, debt (up to
 * the credit limit), which the next credit pays back first.
 *
 * A debit records which explicit buckets it drew from (entries.draws: grant
 * id, amount pairs); a hold takes its share out of the buckets when it is
 * placed (holds.grant_draws) and gives back what it does not capture.  When
 * a bucket's expiry time passes, what is left in it leaves the balance
 * through an 'expire' entry, written by the first operation on the account
 * after that time (as hold expiry is); until then every reader subtracts it
 * (grants_expired_micros).  A share given back to a bucket that has expired
 * meanwhile (a release, a refund) expires on the spot.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_GRANTS_H
#define BILLING_GRANTS_H

#include "datatype/timestamp.h"

/* one open explicit bucket */
typedef struct Bucket
{
	int64		grant_id;
	int64		remaining;		/* not spent, not reserved by a hold */
	int64		priority;		/* higher is spent first */
	TimestampTz expires_at;		/* DT_NOEND: never */
} Bucket;

/* explicit buckets an amount was taken from (or given back to) */
typedef struct Draws
{
	int			n;
	int			max;
	int64	   *grant_id;
	int64	   *amount;
} Draws;

/* most open explicit buckets an account may have */
#define GRANTS_MAX_OPEN		64
/* the bigint[] of accounts.grants_state: four numbers per bucket */
#define GRANTS_STATE_WIDTH	4
/* ids of entries billing writes itself (expiry) start with this */
#define BILLING_TRACE_PREFIX "billing:"

struct Account;

extern void grants_load(struct Account *acc, Datum state, bool isnull);
extern Datum grants_state_datum(struct Account *acc, bool *isnull);
extern int64 grants_expired_micros(struct Account *acc, TimestampTz now);
extern void account_expire_grants(struct Account *acc);
extern void grants_draw(struct Account *acc, int64 amount, Draws *out);
extern void grants_add_bucket(struct Account *acc, int64 grant_id, int64 amount,
							  int64 priority, TimestampTz expires_at);
extern void grants_give_back(struct Account *acc, Draws *shares, Draws *expired);
extern void grants_write_expiries(struct Account *acc, Draws *expired, const char *why);
extern void draws_add(Draws *d, int64 grant_id, int64 amount);
extern Datum draws_datum(Draws *d);
extern void draws_from_datum(Datum arr, Draws *out);

#endif							/* BILLING_GRANTS_H */
