/*-------------------------------------------------------------------------
 *
 * ledger.h
 *	  Writing ledger entries under the account lock (ledger.c): one entry
 *	  for the other writers of entries (holds.c: captures), groups of
 *	  requests of one tenant for billing_deduct_many and the charge engine
 *	  (engine.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_LEDGER_H
#define BILLING_LEDGER_H

#include "account.h"

/* one ledger entry, written under the account lock */
typedef struct EntryWrite
{
	const char *kind;
	int64		amount;			/* signed */
	text	   *trace_id;
	text	   *description;	/* may be NULL */
	Jsonb	   *metadata;
	bool		has_event_at;
	TimestampTz event_at;
	text	   *api_key;		/* may be NULL */
	int64		hold_id;		/* 0: none */
	int64		grant_id;		/* 0: none (the wallet) */
	Draws	   *draws;			/* explicit buckets drawn or given back to */
	int64		refund_of;		/* 0: not a refund of a charge */
	text	   *actor;			/* NULL: billing_actor() (the charge engine
								 * writes for its callers) */
	bool		has_event_at_window;	/* event_at_window, not the session's
										 * billing.event_at_window, is the
										 * window (the charge engine: its
										 * caller's setting) */
	int			event_at_window;
} EntryWrite;

typedef enum PostMode
{
	POST_RAISE,					/* business rejection -> ERROR */
	POST_RECORD,				/* business rejection -> recorded outcome */
	POST_RETURN					/* business rejection, trace id conflict or
								 * unknown account -> outcome, nothing
								 * recorded (the charge engine raises it in
								 * its caller) */
} PostMode;

typedef struct LedgerRequest
{
	bool		is_debit;
	bool		no_request;		/* a debit that is no new request (a job's
								 * charge after its hold expired: the hold
								 * counted the request) */
	const char *usage_mark;		/* not NULL: the caller's metadata has the key
								 * that marks priced usage, refused (in 1.4's
								 * schema) unless a replay; the argument's
								 * name for the error */
	EntryWrite	entry;
} LedgerRequest;

typedef struct LedgerOutcome
{
	bool		committed;		/* false: rejected (POST_RETURN: failed) */
	bool		replayed;
	int64		id;				/* entry_id, or rejection_id when rejected */
	const char *kind;
	int64		amount;
	int64		balance_after;	/* valid when committed */
	int64		version;		/* valid when committed */
	TimestampTz created_at;
	Rejection	rejection;		/* valid when not committed */
	bool		refused;		/* the rejection is a business rule's (or the
								 * replay of one): billing_metrics() counts it
								 * when it is raised or recorded */
} LedgerOutcome;

extern int	ledger_item;

extern void ledger_parse_request(FunctionCallInfo fcinfo, bool is_debit,
								 LedgerRequest *req);
extern bool ledger_post_many(text *tenant_id, LedgerRequest **reqs,
							 LedgerOutcome **outs, int n, PostMode mode,
							 bool nowait);
extern Datum ledger_entry_result(FunctionCallInfo fcinfo, text *tenant_id,
								 text *trace_id, LedgerOutcome *out);

/* the order in which a batch applies its tenants (bytewise), for qsort */
extern int	ledger_tenant_cmp(const text *a, const text *b);
extern void ledger_init(void);

extern int64 billing_post_entry(Account *acc, EntryWrite *entry);
extern void billing_check_own_trace(Account *acc, text *trace_id);
extern void billing_check_usage_mark(Account *acc, Jsonb *metadata);
extern void billing_check_not_rejected(Account *acc, text *trace_id,
									   const char *kind);

#endif							/* BILLING_LEDGER_H */
