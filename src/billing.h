/*-------------------------------------------------------------------------
 *
 * billing.h
 *	  Shared declarations of the billing extension: SQLSTATEs, money
 *	  conversions and argument checks.
 *
 * Money is stored as int64 micro-units (1 unit = 1,000,000 micros) and
 * exposed at the SQL API as numeric with scale 6.  No float anywhere.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_H
#define BILLING_H

#include "fmgr.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

/*
 * SQLSTATEs.  Class "ZB" (implementation-defined class letters start at I-Z).
 * Every code has its row in docs/errors.md (test/t/015_docs.pl checks it).
 */
#define ERRCODE_BILLING_ACCOUNT_NOT_FOUND	MAKE_SQLSTATE('Z','B','0','0','1')
#define ERRCODE_BILLING_ACCOUNT_SUSPENDED	MAKE_SQLSTATE('Z','B','0','0','2')
#define ERRCODE_BILLING_ACCOUNT_CLOSED		MAKE_SQLSTATE('Z','B','0','0','3')
#define ERRCODE_BILLING_INSUFFICIENT_FUNDS	MAKE_SQLSTATE('Z','B','0','0','4')
#define ERRCODE_BILLING_TRACE_CONFLICT		MAKE_SQLSTATE('Z','B','0','0','5')
#define ERRCODE_BILLING_ACCOUNT_CONFLICT	MAKE_SQLSTATE('Z','B','0','0','6')
#define ERRCODE_BILLING_INVALID_AMOUNT		MAKE_SQLSTATE('Z','B','0','1','0')
#define ERRCODE_BILLING_AMOUNT_NOT_FINITE	MAKE_SQLSTATE('Z','B','0','1','1')
#define ERRCODE_BILLING_AMOUNT_PRECISION	MAKE_SQLSTATE('Z','B','0','1','2')
#define ERRCODE_BILLING_AMOUNT_RANGE		MAKE_SQLSTATE('Z','B','0','1','3')
#define ERRCODE_BILLING_INVALID_TRACE_ID	MAKE_SQLSTATE('Z','B','0','1','4')
#define ERRCODE_BILLING_NULL_ARGUMENT		MAKE_SQLSTATE('Z','B','0','1','5')
#define ERRCODE_BILLING_INVALID_TENANT_ID	MAKE_SQLSTATE('Z','B','0','1','6')
#define ERRCODE_BILLING_INVALID_KIND		MAKE_SQLSTATE('Z','B','0','1','7')
#define ERRCODE_BILLING_INVALID_ARGUMENT	MAKE_SQLSTATE('Z','B','0','1','8')
#define ERRCODE_BILLING_EVENT_AT_WINDOW	MAKE_SQLSTATE('Z','B','0','1','9')
#define ERRCODE_BILLING_APPEND_ONLY			MAKE_SQLSTATE('Z','B','0','2','0')
#define ERRCODE_BILLING_DROP_REFUSED		MAKE_SQLSTATE('Z','B','0','2','1')
#define ERRCODE_BILLING_HOLD_NOT_FOUND		MAKE_SQLSTATE('Z','B','0','3','0')
#define ERRCODE_BILLING_HOLD_EXPIRED		MAKE_SQLSTATE('Z','B','0','3','1')
#define ERRCODE_BILLING_HOLD_SETTLED		MAKE_SQLSTATE('Z','B','0','3','2')
#define ERRCODE_BILLING_CAPTURE_EXCEEDS		MAKE_SQLSTATE('Z','B','0','3','3')
#define ERRCODE_BILLING_DAILY_REQUESTS		MAKE_SQLSTATE('Z','B','0','4','0')
#define ERRCODE_BILLING_MONTHLY_REQUESTS	MAKE_SQLSTATE('Z','B','0','4','1')
#define ERRCODE_BILLING_DAILY_SPEND			MAKE_SQLSTATE('Z','B','0','4','2')
#define ERRCODE_BILLING_MONTHLY_SPEND		MAKE_SQLSTATE('Z','B','0','4','3')
#define ERRCODE_BILLING_MAX_CHARGE			MAKE_SQLSTATE('Z','B','0','4','4')
#define ERRCODE_BILLING_RATE_LIMIT			MAKE_SQLSTATE('Z','B','0','4','5')
#define ERRCODE_BILLING_KEY_NOT_FOUND		MAKE_SQLSTATE('Z','B','0','5','0')
#define ERRCODE_BILLING_KEY_INACTIVE		MAKE_SQLSTATE('Z','B','0','5','1')
#define ERRCODE_BILLING_KEY_BUDGET			MAKE_SQLSTATE('Z','B','0','5','2')
#define ERRCODE_BILLING_UNKNOWN_MODEL		MAKE_SQLSTATE('Z','B','0','6','0')
#define ERRCODE_BILLING_INVALID_TOKENS		MAKE_SQLSTATE('Z','B','0','6','1')
#define ERRCODE_BILLING_JOB_TRANSITION		MAKE_SQLSTATE('Z','B','0','7','0')
#define ERRCODE_BILLING_JOB_NOT_FOUND		MAKE_SQLSTATE('Z','B','0','7','1')
#define ERRCODE_BILLING_JOB_INVARIANT		MAKE_SQLSTATE('Z','B','0','7','2')
#define ERRCODE_BILLING_JOB_LEASE_LOST		MAKE_SQLSTATE('Z','B','0','7','3')
#define ERRCODE_BILLING_TOO_MANY_GRANTS		MAKE_SQLSTATE('Z','B','0','8','0')
#define ERRCODE_BILLING_CHARGE_NOT_FOUND	MAKE_SQLSTATE('Z','B','0','9','0')
#define ERRCODE_BILLING_REFUND_EXCEEDS		MAKE_SQLSTATE('Z','B','0','9','1')
#define ERRCODE_BILLING_NOT_REFUNDABLE		MAKE_SQLSTATE('Z','B','0','9','2')
/* Citus (citus.c): the tenant's shard is on another node */
#define ERRCODE_BILLING_WRONG_NODE			MAKE_SQLSTATE('Z','B','1','0','0')
/* Citus: billing's tables are distributed in a way billing does not support */
#define ERRCODE_BILLING_BAD_DISTRIBUTION	MAKE_SQLSTATE('Z','B','1','0','1')
/* ZB102 (rows left in local tables), ZB103 (per-node work on a node without
 * shards) and ZB104 (billing_verify() cannot reach a node) are raised by SQL */
/* the charge engine (engine.c) */
#define ERRCODE_BILLING_ENGINE_IN_TRANSACTION	MAKE_SQLSTATE('Z','B','1','1','0')
#define ERRCODE_BILLING_ENGINE_OUTCOME_UNKNOWN	MAKE_SQLSTATE('Z','B','1','1','1')
#define ERRCODE_BILLING_ENGINE_UNAVAILABLE	MAKE_SQLSTATE('Z','B','1','1','2')

#define BILLING_MICROS_PER_UNIT		INT64CONST(1000000)
#define BILLING_SCALE				6
/* largest amount of one call: 10^12 units, i.e. 10^18 micros */
#define BILLING_MAX_AMOUNT_MICROS	INT64CONST(1000000000000000000)
/* longest tenant id / trace id, in characters */
#define BILLING_MAX_ID_CHARS		255
/* longest description or reason, in characters */
#define BILLING_MAX_DESCRIPTION_CHARS 1000
/* largest metadata (stored jsonb size), in bytes */
#define BILLING_MAX_METADATA_BYTES	16384
/* the metadata key that marks a priced usage charge (billing_deduct_usage) */
#define BILLING_USAGE_MARK_KEY		"price_effective_from"
/* how far in the future an event_at may lie (clock skew), in seconds */
#define BILLING_EVENT_AT_FUTURE_SECS 300

/* input.c */
extern int64 billing_amount_to_micros(Numeric num, const char *argname,
									  bool allow_zero);
extern Numeric billing_micros_to_numeric(int64 micros);
extern char *billing_format_micros(int64 micros);
extern int64 billing_add_micros(int64 a, int64 b, const char *what);
extern void billing_check_not_null(FunctionCallInfo fcinfo, int argno,
								   const char *argname);
extern text *billing_check_id(text *id, const char *argname, int sqlerrcode);
extern text *billing_check_id_length(text *id, const char *argname, int sqlerrcode);
extern Jsonb *billing_check_metadata(FunctionCallInfo fcinfo, int argno);
extern Jsonb *billing_check_metadata_value(Jsonb *jb, const char *argname);
extern bool billing_has_usage_mark(Jsonb *jb);
extern text *billing_check_description(FunctionCallInfo fcinfo, int argno);
extern text *billing_check_text_value(text *t, const char *argname, int maxchars);
extern char *billing_show_text(const char *s, int maxchars);
extern char *billing_describe_text(text *t);
extern char *billing_describe_jsonb(Jsonb *j);
extern text *billing_actor(void);
extern bool billing_caller_scope(int *ntenants);
extern char *billing_format_ts(TimestampTz ts);
extern bool billing_check_event_at(FunctionCallInfo fcinfo, int argno,
								   TimestampTz *event_at);
extern bool billing_event_at_in_window(TimestampTz event_at);
extern bool billing_event_at_in_window_of(TimestampTz event_at, int window);
extern void billing_check_event_at_window(TimestampTz event_at);
extern void billing_check_event_at_window_of(TimestampTz event_at, int window);
extern void billing_event_at_window_error(TimestampTz event_at, int window,
										  char **message, char **detail, char **hint);

/* guard.c */
extern void billing_guard_init(void);

#endif							/* BILLING_H */
