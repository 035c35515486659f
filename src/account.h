/*-------------------------------------------------------------------------
 *
 * account.h
 *	  The locked account and the rules every debit passes: status, holds,
 *	  quotas, spending caps, API-key budgets and funds.
 *
 * All functions here run inside SPI (between SPI_connect and SPI_finish)
 * with the tenant's account row locked by account_lock(): that lock is
 * what makes every check-then-write below race-free.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_ACCOUNT_H
#define BILLING_ACCOUNT_H

#include "billing.h"
#include "direct.h"
#include "events.h"
#include "grants.h"
#include "spi.h"
#include "storage/itemptr.h"
#include "utils/date.h"

/* a business rejection, allocated in the caller's memory context */
typedef struct Rejection
{
	int			sqlerrcode;
	char	   *message;
	char	   *detail;
	char	   *hint;
} Rejection;

#define NO_LIMIT	(-1)

typedef struct Account Account;

struct Account
{
	MemoryContext cxt;			/* where strings are copied (caller's) */
	ItemPointerData tid;		/* the locked row (version) */
	text	   *tenant_id;
	char	   *tenant;
	char	   *currency;
	char	   *status;
	char	   *timezone;
	int64		credit_limit;
	int64		balance;
	int64		version;
	int64		locked_version; /* the version account_lock found (Redis
								 * key hashes changed by this call get
								 * locked_version + 1: api_keys.version) */
	int64		holds;			/* remaining on open holds */
	bool		has_next_expiry;
	TimestampTz next_expiry;	/* earliest expires_at of an open hold */
	/* limits; NO_LIMIT when not set */
	int64		max_charge;
	int64		daily_requests;
	int64		monthly_requests;
	int64		daily_spend;
	int64		monthly_spend;
	int64		minute_requests;
	/* usage counters of the current periods (account time zone) */
	DateADT		usage_day;
	int64		day_requests;
	int64		day_spend;
	DateADT		usage_month;
	int64		month_requests;
	int64		month_spend;
	TimestampTz usage_minute;
	int64		minute_count;
	int64		rejections;		/* recorded rejections: 0 = no need to probe them */
	/* open explicit credit buckets, in burn order (grants.c) */
	bool		grants_supported;	/* the schema has them (1.4) */
	Bucket	   *buckets;
	int			nbuckets;
	int			maxbuckets;	/* allocated */
	bool		has_grants_expiry;
	TimestampTz grants_next_expiry; /* earliest expires_at of a bucket */
	bool		holds_changed;	/* account_expire_holds() wrote something */
	bool		grants_changed; /* the buckets changed since the last write */
	/* the outbox and the alert thresholds (events.c); 1.4 */
	bool		events_supported;	/* the schema has them */
	int64		events_seq;		/* the tenant's last event sequence number */
	bool		events_dirty;	/* events_seq changed since the last write */
	bool		has_alert_low;
	int64		alert_low;		/* balance.low below this */
	int			nalert_percents;
	int32		alert_percents[EVENTS_MAX_PERCENTS];	/* ascending */
	int64		alert_grant_lead;	/* grant.expiring this long ahead; 0: off */
	int32		alert_state;	/* what is announced (see events.h) */
	bool		has_grants_until;
	TimestampTz alert_grants_until; /* grant.expiring: announced up to */
	int64		alert_grants_gid;	/* ... and up to this grant id */
	bool		has_alert_next;
	TimestampTz alert_next_at;	/* the next grant.expiring is due then */
	bool		alerts_dirty;	/* the alert state changed since the last write */
	bool		alerts_config_dirty;	/* billing_alerts_set changed them */
	struct ApiKey *key;			/* the key this call charges (account_key_lock) */
	/* this call's clock reading: created_at of what it writes */
	TimestampTz now;
	DateADT		today;
	DateADT		this_month;
	TimestampTz this_minute;
};

typedef struct ApiKey
{
	bool		present;		/* false: the call named no key */
	bool		levels_supported;	/* api_keys.alert_levels exists (1.4) */
	int32		alert_levels;	/* alert_percents of the budget announced */
	bool		spend_changed;	/* period_spend changed in this call */
	text	   *key_id;
	char	   *key;
	char	   *status;
	int64		budget;			/* NO_LIMIT when none */
	char	   *period;			/* day, month or lifetime */
	DateADT		period_start;
	int64		period_spend;
	int64		open_holds;		/* remaining on this key's open holds */
} ApiKey;

/* what one call asks of the account */
typedef struct Debit
{
	int64		charge;			/* money leaving the balance now (>= 0) */
	int64		reserve;		/* money newly put on hold (>= 0) */
	int64		covered;		/* part of charge already reserved by a hold */
	bool		counts_request; /* a new request: quotas and rate limit */
	int			funds_errcode;	/* SQLSTATE when funds are short */
	Draws	   *draws;			/* if set: the grant buckets drawn from */
} Debit;

typedef enum AccountLockResult
{
	ACCOUNT_LOCKED,
	ACCOUNT_MISSING,			/* no such account */
	ACCOUNT_BUSY				/* nowait: locked by another transaction */
} AccountLockResult;

extern void account_lock(Account *acc, text *tenant_id, MemoryContext cxt);
extern AccountLockResult account_try_lock(Account *acc, text *tenant_id,
										  MemoryContext cxt, bool nowait);
extern void account_missing(const char *tenant, Rejection *rej);
extern void account_expire_holds(Account *acc);
extern void account_expire_due(Account *acc);
extern void account_refresh_holds(Account *acc);
extern void account_key_lock(Account *acc, ApiKey *key, text *key_id);
extern bool account_check_debit(Account *acc, ApiKey *key, Debit *debit,
								Rejection *rej);
extern void account_apply_debit(Account *acc, ApiKey *key, Debit *debit);
extern void account_save(Account *acc, bool wrote_entry);
extern void account_finish(Account *acc);
extern Numeric account_available(Account *acc);

extern void account_write(Account *acc, bool wrote_entry,
						  DirectTable *entries, Datum *evalues,
						  bool *enulls);
extern void account_key_save(Account *acc, ApiKey *key);
extern void account_key_touch(Account *acc, text *key_id);
extern void billing_raise_rejection(Rejection *rej);
extern void billing_raise_error(Rejection *rej);

/* calendar periods in an account's time zone */
extern DateADT billing_local_date(const char *tz, TimestampTz ts);
extern DateADT billing_month_start(DateADT d);
extern DateADT billing_next_month_start(DateADT d);
extern TimestampTz billing_local_midnight(const char *tz, DateADT d);

#endif							/* BILLING_ACCOUNT_H */
