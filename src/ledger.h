/*-------------------------------------------------------------------------
 *
 * ledger.h
 *	  Writing one ledger entry under the account lock (ledger.c), for the
 *	  other writers of entries (holds.c: captures).
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
} EntryWrite;

extern int64 billing_post_entry(Account *acc, EntryWrite *entry);
extern void billing_check_own_trace(Account *acc, text *trace_id);
extern void billing_check_not_rejected(Account *acc, text *trace_id,
									   const char *kind);

#endif							/* BILLING_LEDGER_H */
