/*-------------------------------------------------------------------------
 *
 * events.h
 *	  Events out of the database: the transactional outbox (events.c), the
 *	  alert thresholds a charge checks on the account row (events.c), the
 *	  worker's delivery to Redis Streams (outbox.c) and the counters behind
 *	  billing_metrics() (metrics.c).
 *
 * An event is one row of billing.events, written in the transaction of the
 * change it reports (so a rolled-back change never has one and a committed
 * one always does), numbered per tenant (seq = 1, 2, 3, ... taken under the
 * account row lock, so a tenant's events commit in seq order) and
 * announced with NOTIFY billing_events at commit.  The background worker
 * copies committed events to Redis Streams, marks them delivered and
 * prunes them after billing.events_retention.
 *
 * Alert thresholds live on the account row (accounts.alert_*), like the
 * quotas, and what of them was announced too (accounts.alert_state): a
 * charge that crosses no threshold pays a few comparisons and no
 * statement; one that crosses writes its event row.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_EVENTS_H
#define BILLING_EVENTS_H

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "port/atomics.h"
#include "storage/lwlock.h"

/* at most this many percentages per account (billing_alerts_set) */
#define EVENTS_MAX_PERCENTS		10
/* the NOTIFY channel */
#define EVENTS_CHANNEL			"billing_events"

/*
 * accounts.alert_state: bit 0 = balance.low announced (re-armed when the
 * balance is no longer below the threshold); then 4 bits per account limit
 * (ALERT_Q_*): how many of alert_percents were announced in the current
 * period.
 */
#define ALERT_LOW_ANNOUNCED		0x1
#define ALERT_Q_DAY_REQUESTS	0
#define ALERT_Q_MONTH_REQUESTS	1
#define ALERT_Q_DAY_SPEND		2
#define ALERT_Q_MONTH_SPEND		3
#define ALERT_Q_COUNT			4
#define ALERT_LEVEL_SHIFT(q)	(4 + 4 * (q))
#define ALERT_LEVEL(state, q)	(((state) >> ALERT_LEVEL_SHIFT(q)) & 0xF)
#define ALERT_DAY_MASK			((0xF << ALERT_LEVEL_SHIFT(ALERT_Q_DAY_REQUESTS)) | \
								 (0xF << ALERT_LEVEL_SHIFT(ALERT_Q_DAY_SPEND)))
#define ALERT_MONTH_MASK		((0xF << ALERT_LEVEL_SHIFT(ALERT_Q_MONTH_REQUESTS)) | \
								 (0xF << ALERT_LEVEL_SHIFT(ALERT_Q_MONTH_SPEND)))

/* the counters of billing_metrics(): fixed label sets */
#define METRIC_OTHER			(-1)
typedef enum MetricEntryKind
{
	MK_TOPUP, MK_GRANT, MK_REFUND, MK_ADJUSTMENT, MK_DEDUCT, MK_CAPTURE,
	MK_EXPIRE, MK_OTHER, MK_COUNT
} MetricEntryKind;
#define METRIC_REFUSAL_CODES	13	/* the rejection SQLSTATEs + other */
#define METRIC_JOB_STATES		5
#define METRIC_EVENT_TYPES		10	/* the catalogue + other */
#define EVENTS_LAG_RING			1024
#define EVENTS_ERROR_LEN		256

extern const char *const metric_entry_kinds[MK_COUNT];
extern const char *const metric_refusal_codes[METRIC_REFUSAL_CODES];
extern const char *const metric_job_states[METRIC_JOB_STATES];
extern const char *const metric_event_types[METRIC_EVENT_TYPES];

/* shared memory (metrics.c): counters since the server started, delivery */
typedef struct EventsShared
{
	LWLock	   *lock;			/* the worker's statistics below */
	pg_atomic_uint64 entries[MK_COUNT];
	pg_atomic_uint64 charges;	/* committed debits (deduct, capture, debit adjustment) */
	pg_atomic_uint64 refusals[METRIC_REFUSAL_CODES];
	pg_atomic_uint64 jobs[METRIC_JOB_STATES];
	pg_atomic_uint64 written[METRIC_EVENT_TYPES];
	pg_atomic_uint64 committed; /* events committed (the worker's wake-up) */
	/* the worker's delivery (outbox.c), under lock */
	int64		delivered;
	int64		failed;
	TimestampTz last_delivered_at;
	TimestampTz last_prune_at;
	int64		pruned;
	char		last_error[EVENTS_ERROR_LEN];	/* billing_sync_status().events_last_error */
	TimestampTz last_error_at;
	int			lag_next;
	int			lag_count;
	int64		lag_us[EVENTS_LAG_RING];	/* created_at -> XADD reply */
} EventsShared;

extern EventsShared *billing_events;

struct Account;
struct ApiKey;
struct SyncSnap;

/* events.c: the backend side */
extern void events_init(void);
extern void events_load(struct Account *acc, Datum *values, bool *nulls);
extern void events_new_period(struct Account *acc, bool day, bool month);
extern void events_before_write(struct Account *acc);
extern void events_emit(struct Account *acc, const char *type, StringInfo payload);
extern int64 events_write_sql(text *tenant_id, const char *type, StringInfo payload);
extern bool events_table_exists(void);

/* a JSON object under construction (payloads) */
extern void ej_begin(StringInfo buf);
extern void ej_str(StringInfo buf, const char *key, const char *value);
extern void ej_text(StringInfo buf, const char *key, text *value);
extern void ej_int(StringInfo buf, const char *key, int64 value);
extern void ej_money(StringInfo buf, const char *key, int64 micros);
extern void ej_ts(StringInfo buf, const char *key, TimestampTz ts);
extern void ej_null(StringInfo buf, const char *key);
extern void ej_raw(StringInfo buf, const char *key, const char *json);
extern void ej_end(StringInfo buf);
extern char *events_iso_time(TimestampTz ts);

/* metrics.c: counters, flushed into shared memory at commit */
extern void metrics_init(void);
extern void metrics_sync_status(Datum *values, bool *nulls, int n, bool scoped);
extern void metrics_count_entry(const char *kind, int64 amount);
extern void metrics_count_refusal(int sqlerrcode);
extern void metrics_count_job(const char *state);
extern void metrics_count_event(const char *type);
extern void metrics_xact_end(bool commit);

/* outbox.c: the worker's side */
extern bool outbox_cycle(bool redis_ready);
extern void outbox_note_drift(struct SyncSnap *snaps, int n);
extern void outbox_drift_repaired(void);

#endif							/* BILLING_EVENTS_H */
