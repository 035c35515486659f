/*-------------------------------------------------------------------------
 *
 * engine.h
 *	  The charge engine: billing_charge() hands a charge to a background
 *	  worker of its database through shared memory and sleeps on its latch;
 *	  the worker applies whatever is queued as one batch (grouped by tenant:
 *	  one account lock and one account write per tenant, one entry per
 *	  charge), commits once, and wakes every caller with its own result.
 *
 * Shared memory (only with shared_preload_libraries = 'billing'):
 *	- a fixed array of billing.engine_queue_size request slots, each big
 *	  enough for the largest request billing_deduct accepts; a caller owns
 *	  one while it waits (a full array is back-pressure: the next caller
 *	  waits for a slot), so memory is bounded;
 *	- a registry of engine workers, billing.engine_workers per database
 *	  that uses billing_charge (started on demand as dynamic background
 *	  workers, stopped after billing.engine_idle_timeout), each with a FIFO
 *	  queue of slots.  A tenant's charges always go to the same worker
 *	  (hash of the tenant id), so they are applied in the order they came.
 *
 * Slot life: FREE -> QUEUED (the caller filled it and linked it into its
 * engine's queue) -> TAKEN (the engine took it into a batch) -> DONE (the
 * engine wrote the result and set the caller's latch) -> FREE (the caller
 * read the result).  A caller that leaves early (cancel, terminate) unlinks
 * a QUEUED slot itself (nothing was charged) or marks a TAKEN one abandoned
 * (the engine frees it when the batch is done).  An engine that exits
 * marks the slots it had taken DONE with "outcome unknown".  Transitions
 * happen under EngineShared->lock; the result is written before DONE is
 * published (memory barrier).
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_ENGINE_H
#define BILLING_ENGINE_H

#include "billing.h"
#include "datatype/timestamp.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/lwlock.h"

/* settings (billing.c defines them when preloaded) */
extern int	billing_engine_workers;
extern int	billing_engine_queue_size;
extern int	billing_engine_idle_timeout;
extern int	billing_engine_lock_wait;
extern int	billing_engine_gather;

/* registry entries: engine workers of all databases together */
#define ENGINE_MAX				16
#define ENGINE_MAX_PER_DATABASE	8

/* the largest strings a request carries (billing_deduct's input limits) */
#define ENGINE_ID_BYTES			(BILLING_MAX_ID_CHARS * 4)
#define ENGINE_DATA_BYTES		(3 * ENGINE_ID_BYTES + \
								 BILLING_MAX_DESCRIPTION_CHARS * 4 + \
								 BILLING_MAX_METADATA_BYTES + 64)
#define ENGINE_KIND_LEN			16
/* error texts of a result, at most (they reuse the request's data area) */
#define ENGINE_MESSAGE_BYTES	4096
#define ENGINE_DETAIL_BYTES		8192
#define ENGINE_HINT_BYTES		4096

typedef enum EngineSlotState
{
	SLOT_FREE,
	SLOT_QUEUED,
	SLOT_TAKEN,
	SLOT_DONE
} EngineSlotState;

typedef enum EngineResult
{
	RESULT_NONE,
	RESULT_CHARGED,				/* committed (a new entry or a replay) */
	RESULT_ERROR,				/* refused or failed: sqlerrcode and texts */
	RESULT_UNKNOWN				/* the engine stopped while applying it */
} EngineResult;

typedef struct EngineSlot
{
	/* bookkeeping, under EngineShared->lock */
	EngineSlotState state;
	bool		abandoned;		/* its caller left: the engine frees it */
	int			next;			/* next slot of its queue or of the free list */
	int			engine;			/* registry entry it was queued on */
	uint64		seq;			/* arrival order */
	Latch	   *latch;			/* the caller's */
	pid_t		caller_pid;

	/* the request (checked by the caller as billing_deduct checks it) */
	Oid			database;
	int64		amount;			/* signed micros (negative: a debit) */
	bool		has_event_at;
	TimestampTz event_at;
	int			event_at_window;	/* the caller's billing.event_at_window (s) */
	char		kind[ENGINE_KIND_LEN];
	char		actor[NAMEDATALEN];
	int			tenant_len;
	int			trace_len;
	int			description_len;	/* -1: NULL */
	int			metadata_len;	/* bytes of the jsonb datum (with header) */
	int			api_key_len;	/* -1: NULL */
	bool		usage_mark;		/* the metadata has the key that marks priced
								 * usage: refused unless a replay */

	/* the result */
	EngineResult result;
	bool		replayed;
	bool		refused;		/* RESULT_ERROR: a business rule's rejection,
								 * counted by billing_metrics() as
								 * billing_deduct's are */
	int64		entry_id;
	int64		out_amount;
	int64		balance_after;
	int64		version;
	TimestampTz created_at;
	char		out_kind[ENGINE_KIND_LEN];
	int			sqlerrcode;
	int			message_len;
	int			detail_len;		/* -1: none */
	int			hint_len;		/* -1: none */

	/* tenant, trace id, description, metadata, api key; then the error texts */
	char		data[FLEXIBLE_ARRAY_MEMBER];
} EngineSlot;

#define ENGINE_SLOT_SIZE	MAXALIGN(offsetof(EngineSlot, data) + ENGINE_DATA_BYTES)

typedef enum EngineState
{
	ENGINE_NONE,				/* no worker: the next caller starts one */
	ENGINE_STARTING,			/* registered, not yet running */
	ENGINE_RUNNING
} EngineState;

typedef struct EngineInfo
{
	Oid			database;		/* InvalidOid: the entry is unused */
	int			index;			/* which of its database's workers */
	EngineState state;
	uint32		generation;		/* bumped at every start */
	TimestampTz start_requested;
	pid_t		pid;
	Latch	   *latch;
	/* its queue of QUEUED slots, oldest first */
	int			head;
	int			tail;
	int			queued;
	/* statistics since the entry was created (billing_engine_status) */
	int64		batches;
	int64		charges;
	int64		largest_batch;
	int64		retries;
	int64		deferrals;
	TimestampTz last_batch_at;
} EngineInfo;

typedef struct EngineShared
{
	LWLock	   *lock;			/* everything below, and slot bookkeeping */
	ConditionVariable slot_freed;	/* callers waiting for a free slot */
	int			free_head;
	int			nfree;
	uint64		next_seq;
	bool		test_gate;		/* billing.engine_test_gate(true) */
	EngineInfo	engines[ENGINE_MAX];
} EngineShared;

extern EngineShared *billing_engine;

static inline EngineSlot *
engine_slot(int i)
{
	return (EngineSlot *) ((char *) billing_engine + MAXALIGN(sizeof(EngineShared)) +
						   (Size) i * ENGINE_SLOT_SIZE);
}

/* the advisory lock of billing.engine_test_gate() (pg_advisory_lock(key)) */
#define ENGINE_GATE_KEY		INT64CONST(7101842596069107305)

extern void billing_engine_init(void);
extern void engine_gate_pass(void);
extern void engine_wake_queued(int engine);

/* the worker (engine_worker.c) */
extern PGDLLEXPORT void billing_engine_main(Datum arg);

#endif							/* BILLING_ENGINE_H */
