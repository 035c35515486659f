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
 * grants_state, a bigint[] of grant_id, remaining, reserved, priority,
 * expires_at per bucket, kept in burn order): every charge locks and
 * rewrites that row anyway, so drawing from buckets costs no extra write.
 * A bucket is open, and listed, while something is left in it (remaining)
 * or reserved from it by open holds (reserved).  Burn order: higher
 * priority first, then earliest expiry (never-expiring last), then oldest;
 * the wallet after every explicit bucket; beyond the wallet, debt (up to
 * the credit limit), which the next credit pays back first.  The wallet is
 * the balance less every bucket's remaining and reserved.
 *
 * A debit records which explicit buckets it drew from (entries.draws: grant
 * id, amount pairs; a grant entry: its bucket and what went into it); a
 * hold moves its share of the buckets from remaining to reserved when it is
 * placed (holds.grant_draws says which), a capture consumes reserved, and
 * what a hold does not capture goes back to remaining.  When a bucket's
 * expiry time passes, what is left in it leaves the balance through an
 * 'expire' entry dated at that time, written by the first operation on the
 * account after it (as hold expiry is); until then every reader subtracts
 * it (grants_expired_micros, grants_held_expired).  A share that comes back
 * at or after its bucket's expiry (a release, a hold's own expiry, a
 * refund) expires at the moment it comes back.
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
	int64		reserved;		/* taken by open holds, not captured yet */
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

/* most open grants an account may have (billing_grant refuses more: ZB080) */
#define GRANTS_MAX_OPEN		64
/*
 * Holds and refunds give shares back to grants that ran out, and may thus
 * list more; a grants_state longer than this is malformed.
 */
#define GRANTS_MAX_LISTED	100000
/* the bigint[] of accounts.grants_state: five numbers per bucket */
#define GRANTS_STATE_WIDTH	5
/* ids of entries billing writes itself (expiry) start with this */
#define BILLING_TRACE_PREFIX "billing:"

struct Account;

extern void grants_load(struct Account *acc, Datum state, bool isnull);
extern Datum grants_state_datum(struct Account *acc, bool *isnull);
extern void grants_copy(struct Account *acc, Bucket **buckets, int *n);
extern void grants_restore(struct Account *acc, Bucket *buckets, int n);
extern int64 grants_expired_micros(struct Account *acc, TimestampTz now);
extern int64 grants_held_expired(struct Account *acc, TimestampTz now);
extern int64 grants_wallet(struct Account *acc);
extern void account_expire_grants(struct Account *acc);
extern void grants_draw(struct Account *acc, int64 amount, bool reserve, Draws *out);
extern void grants_unreserve(struct Account *acc, int64 grant_id, int64 amount);
extern void grants_add_bucket(struct Account *acc, int64 grant_id, int64 amount,
							  int64 priority, TimestampTz expires_at);
extern void grants_give_back(struct Account *acc, Draws *shares, bool reserved,
							 TimestampTz when, Draws *expired);
extern void grants_write_expiries(struct Account *acc, Draws *expired,
								  TimestampTz when, const char *why);
extern int64 grants_shares_expired(Bucket *buckets, int nbuckets, Draws *shares,
								   TimestampTz hold_expires_at, TimestampTz at);
extern void draws_add(Draws *d, int64 grant_id, int64 amount);
extern Datum draws_datum(Draws *d);
extern void draws_from_datum(Datum arr, Draws *out);

#endif							/* BILLING_GRANTS_H */
