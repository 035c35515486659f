/*-------------------------------------------------------------------------
 *
 * engine.c
 *	  The charge engine, caller side: billing_charge(), the shared memory,
 *	  starting engine workers on demand, billing_engine_status() and the
 *	  test gate.  The worker is engine_worker.c; engine.h describes the
 *	  protocol between them.
 *
 * billing_charge() takes billing_deduct's arguments and returns its result,
 * but the charge is committed by an engine worker, in a transaction of its
 * own that commits many callers' charges at once, before billing_charge()
 * returns.  Hence:
 *	- it is refused inside a transaction block and in a transaction that has
 *	  written anything (ZB110): the charge would not be part of it, and the
 *	  engine could wait for a lock this transaction holds while we wait for
 *	  the engine; a statement that holds locks without writing (it reads a
 *	  billing table) can still be waited for, through a DDL queued behind
 *	  it: the caller looks for that deadlock while it waits (40P01,
 *	  engine_waits_for_us);
 *	- a caller that loses the answer (a lost connection, a cancel while the
 *	  engine applies the charge, an engine that stopped: ZB111) retries with
 *	  the same trace id: the retry returns the charge if it was made
 *	  (replayed = true) or makes it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "citus.h"
#include "commands/dbcommands.h"
#include "compat.h"
#include "executor/executor.h"
#include "common/hashfn.h"
#include "engine.h"
#include "guc.h"
#include "fmgr.h"
#include "funcapi.h"
#include "ledger.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "nodes/parsenodes.h"
#include "optimizer/planner.h"
#include "tcop/utility.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(billing_charge);
PG_FUNCTION_INFO_V1(billing_engine_status);
PG_FUNCTION_INFO_V1(billing_engine_test_gate);

EngineShared *billing_engine = NULL;

int			billing_engine_workers = 1;
int			billing_engine_queue_size = 128;
int			billing_engine_idle_timeout = 60;
int			billing_engine_lock_wait = 20;
int			billing_engine_gather = 0;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ProcessUtility_hook_type prev_process_utility_hook = NULL;
static ExecutorStart_hook_type prev_executor_start_hook = NULL;
static planner_hook_type prev_planner_hook = NULL;

/*
 * The top level of this transaction is a transaction block: BEGIN / START
 * TRANSACTION, the transaction COMMIT AND CHAIN started, or the implicit
 * block of several statements in one query string.  In a subtransaction (a
 * savepoint, a PL/pgSQL block with an EXCEPTION clause) IsTransactionBlock()
 * is true whether or not the top level is a block, and xact.c does not say
 * which.  A statement starts at the top level, through the planner (which
 * may run functions: constants, estimates), ProcessUtility or ExecutorStart,
 * before it can open a subtransaction: so the top level is looked at there
 * (note_top_level) and remembered with the transaction's local id.  (A
 * fast-path function call, PQfn, passes none of them: as the first call of
 * the transaction COMMIT AND CHAIN started, from an EXCEPTION block, it is
 * not refused.)  Only a note of the current transaction counts: a block that
 * failed ends without a commit or abort callback at its ROLLBACK (it was
 * aborted at the error), which the hook saw as a block.
 */
static LocalTransactionId top_level_block_lxid = InvalidLocalTransactionId;

/* how often a waiting caller looks whether its engine is alive */
#define ENGINE_CHECK_MS			1000
/* a start that shows no worker after this long is tried again */
#define ENGINE_START_TIMEOUT_MS 30000

/* the slot this backend waits on (-1: none), for its exit callback */
static int	my_slot = -1;

static bool exit_callback_registered = false;

/*
 * A start of entry claimed_engine (generation claimed_generation) that we
 * claimed and have not made yet (-1: none), for the error and exit paths
 */
static int	claimed_engine = -1;
static uint32 claimed_generation = 0;

static void check_engine_deadlock(int engine_pid, const char *context);
static const char *ended_context(EngineSlotState state);

/* ---------------------------------------------------------------------
 * shared memory
 * ---------------------------------------------------------------------
 */
static Size
engine_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(EngineShared)),
					mul_size(billing_engine_queue_size, ENGINE_SLOT_SIZE));
}

static void
engine_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(engine_shmem_size());
	RequestNamedLWLockTranche("billing engine", 1);
}

static void
engine_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	billing_engine = ShmemInitStruct("billing engine", engine_shmem_size(), &found);
	if (!found)
	{
		memset(billing_engine, 0, MAXALIGN(sizeof(EngineShared)));
		billing_engine->lock = &(GetNamedLWLockTranche("billing engine"))->lock;
		ConditionVariableInit(&billing_engine->slot_freed);
		billing_engine->free_head = -1;
		for (int i = billing_engine_queue_size - 1; i >= 0; i--)
		{
			EngineSlot *slot = engine_slot(i);

			memset(slot, 0, offsetof(EngineSlot, data));
			slot->state = SLOT_FREE;
			slot->next = billing_engine->free_head;
			billing_engine->free_head = i;
		}
		billing_engine->nfree = billing_engine_queue_size;
		for (int e = 0; e < ENGINE_MAX; e++)
		{
			billing_engine->engines[e].head = -1;
			billing_engine->engines[e].tail = -1;
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/* remember that the top level is a transaction block (top_level_block_lxid) */
static inline void
note_top_level(void)
{
	if (IsTransactionBlock() && !IsSubTransaction())
		top_level_block_lxid = billing_my_lxid();
}

/* the current transaction's top level is a block */
static inline bool
in_top_level_block(void)
{
	note_top_level();
	return top_level_block_lxid != InvalidLocalTransactionId &&
		top_level_block_lxid == billing_my_lxid();
}

static void
engine_process_utility(PlannedStmt *pstmt, const char *queryString,
					   bool readOnlyTree, ProcessUtilityContext context,
					   ParamListInfo params, QueryEnvironment *queryEnv,
					   DestReceiver *dest, QueryCompletion *qc)
{
	/* before: SAVEPOINT, DO or CALL in a block; after: BEGIN */
	note_top_level();
	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context,
								  params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
	note_top_level();
}

static void
engine_executor_start(QueryDesc *queryDesc, int eflags)
{
	/* a query of a block: it may call a function with an EXCEPTION clause */
	note_top_level();
	if (prev_executor_start_hook)
		prev_executor_start_hook(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

static PlannedStmt *
engine_planner(Query *parse, const char *query_string, int cursorOptions,
			   ParamListInfo boundParams)
{
	/* the planner may run the query's functions (a constant, an estimate) */
	note_top_level();
	if (prev_planner_hook)
		return prev_planner_hook(parse, query_string, cursorOptions, boundParams);
	return standard_planner(parse, query_string, cursorOptions, boundParams);
}

static void
engine_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		top_level_block_lxid = InvalidLocalTransactionId;
}

void
billing_engine_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = engine_process_utility;
	prev_executor_start_hook = ExecutorStart_hook;
	ExecutorStart_hook = engine_executor_start;
	prev_planner_hook = planner_hook;
	planner_hook = engine_planner;
	RegisterXactCallback(engine_xact_callback, NULL);
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = engine_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = engine_shmem_startup;
}

/* ---------------------------------------------------------------------
 * engines: find, start, wake
 * ---------------------------------------------------------------------
 */

/*
 * The registry entry of worker `index` of database `db`, created if need be
 * (caller holds the lock exclusively); -1 when the registry is full.
 */
static int
engine_entry(Oid db, int index)
{
	int			unused = -1;

	for (int e = 0; e < ENGINE_MAX; e++)
	{
		EngineInfo *info = &billing_engine->engines[e];

		if (info->database == db && info->index == index)
			return e;
		if (unused < 0 &&
			(info->database == InvalidOid ||
			 (info->state == ENGINE_NONE && info->queued == 0)))
			unused = e;
	}
	if (unused >= 0)
	{
		EngineInfo *info = &billing_engine->engines[unused];
		uint32		generation = info->generation;

		memset(info, 0, sizeof(EngineInfo));
		info->generation = generation;
		info->database = db;
		info->index = index;
		info->state = ENGINE_NONE;
		info->head = info->tail = -1;
	}
	return unused;
}

/* set the latches of the callers queued on an engine (caller holds the lock) */
void
engine_wake_queued(int engine)
{
	for (int i = billing_engine->engines[engine].head; i >= 0; i = engine_slot(i)->next)
		if (engine_slot(i)->latch)
			SetLatch(engine_slot(i)->latch);
}

/*
 * Start the worker of registry entry `e`, which we marked STARTING with
 * generation `generation`.  False (and the entry back to NONE) if it could
 * not be started; *why says why.
 */
static bool
engine_start(int e, uint32 generation, const char **why)
{
	BackgroundWorker w;
	BackgroundWorkerHandle *handle;
	BgwHandleStatus status;
	pid_t		pid;

	memset(&w, 0, sizeof(w));
	w.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	w.bgw_start_time = BgWorkerStart_RecoveryFinished;
	w.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(w.bgw_library_name, "billing", BGW_MAXLEN);
	strlcpy(w.bgw_function_name, "billing_engine_main", BGW_MAXLEN);
	snprintf(w.bgw_name, BGW_MAXLEN, "billing charge engine %d", e);
	strlcpy(w.bgw_type, "billing charge engine", BGW_MAXLEN);
	w.bgw_main_arg = Int32GetDatum(e);
	memcpy(w.bgw_extra, &generation, sizeof(generation));
	w.bgw_notify_pid = MyProcPid;

	*why = NULL;
	if (!RegisterDynamicBackgroundWorker(&w, &handle))
		*why = "no background worker slot is free (max_worker_processes)";
	else
	{
		status = WaitForBackgroundWorkerStartup(handle, &pid);
		if (status == BGWH_STOPPED)
			*why = "the worker stopped as soon as it started (see the server log)";
		else if (status == BGWH_POSTMASTER_DIED)
			*why = "the postmaster died";
		pfree(handle);
	}
	if (*why == NULL)
		return true;
	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	if (billing_engine->engines[e].generation == generation &&
		billing_engine->engines[e].state == ENGINE_STARTING)
	{
		billing_engine->engines[e].state = ENGINE_NONE;
		billing_engine->engines[e].pid = 0;
	}
	LWLockRelease(billing_engine->lock);
	return false;
}

/*
 * Does entry e need a worker started?  If so mark it STARTING (caller
 * holds the lock exclusively) and return true with its new generation.
 */
static bool
engine_claim_start(int e, uint32 *generation)
{
	EngineInfo *info = &billing_engine->engines[e];

	if (info->state == ENGINE_STARTING && info->pid == 0 &&
		TimestampDifferenceExceeds(info->start_requested, GetCurrentTimestamp(),
								   ENGINE_START_TIMEOUT_MS))
		info->state = ENGINE_NONE;	/* a start that never happened */
	if (info->state != ENGINE_NONE)
		return false;
	info->state = ENGINE_STARTING;
	info->generation++;
	info->pid = 0;
	info->latch = NULL;
	info->start_requested = GetCurrentTimestamp();
	*generation = info->generation;
	return true;
}

/* engine_claim_start, remembering the claim until the start is made */
static bool
claim_start(int e, uint32 *generation)
{
	if (!engine_claim_start(e, generation))
		return false;
	claimed_engine = e;
	claimed_generation = *generation;
	return true;
}

/*
 * A start we claimed and did not make (an error or a cancel came first, or
 * the charge was refused with ZB112): the entry back to NONE and its queued
 * callers woken to claim it again, instead of their waiting for
 * ENGINE_START_TIMEOUT_MS to take it over.
 */
static void
unclaim_start(void)
{
	int			e = claimed_engine;

	claimed_engine = -1;
	if (e < 0 || billing_engine == NULL)
		return;
	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	if (billing_engine->engines[e].generation == claimed_generation &&
		billing_engine->engines[e].state == ENGINE_STARTING &&
		billing_engine->engines[e].pid == 0)
	{
		billing_engine->engines[e].state = ENGINE_NONE;
		engine_wake_queued(e);
	}
	LWLockRelease(billing_engine->lock);
}

/* ---------------------------------------------------------------------
 * slots
 * ---------------------------------------------------------------------
 */

/* free a slot (caller holds the lock exclusively); true if one was freed */
static void
slot_free(int i)
{
	EngineSlot *slot = engine_slot(i);

	slot->state = SLOT_FREE;
	slot->abandoned = false;
	slot->latch = NULL;
	slot->next = billing_engine->free_head;
	billing_engine->free_head = i;
	billing_engine->nfree++;
}

/* unlink a QUEUED slot from its engine's queue (caller holds the lock) */
static void
slot_unqueue(int i)
{
	EngineInfo *info = &billing_engine->engines[engine_slot(i)->engine];
	int			prev = -1;

	for (int j = info->head; j >= 0; prev = j, j = engine_slot(j)->next)
	{
		if (j != i)
			continue;
		if (prev < 0)
			info->head = engine_slot(j)->next;
		else
			engine_slot(prev)->next = engine_slot(j)->next;
		if (info->tail == i)
			info->tail = prev;
		info->queued--;
		break;
	}
}

/*
 * Give up our slot: a QUEUED one is withdrawn (nothing will be charged), a
 * TAKEN one is left to the engine, which frees it after its batch, a DONE
 * one is freed.  Returns the state it was in.
 */
static EngineSlotState
slot_release(int i)
{
	EngineSlot *slot = engine_slot(i);
	EngineSlotState state;

	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	state = slot->state;
	if (state == SLOT_QUEUED)
	{
		slot_unqueue(i);
		slot_free(i);
	}
	else if (state == SLOT_TAKEN)
		slot->abandoned = true;
	else if (state == SLOT_DONE)
		slot_free(i);
	LWLockRelease(billing_engine->lock);
	if (state != SLOT_TAKEN)
		ConditionVariableBroadcast(&billing_engine->slot_freed);
	return state;
}

/*
 * Withdraw our charge if no engine has taken it yet (under the lock, so
 * that no engine can take it in between): true if withdrawn, and the slot
 * is no longer ours.
 */
static bool
slot_withdraw(int i)
{
	bool		withdrawn = false;

	LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
	if (engine_slot(i)->state == SLOT_QUEUED)
	{
		slot_unqueue(i);
		slot_free(i);
		withdrawn = true;
	}
	LWLockRelease(billing_engine->lock);
	if (withdrawn)
	{
		my_slot = -1;
		ConditionVariableBroadcast(&billing_engine->slot_freed);
	}
	return withdrawn;
}

/* a backend that exits while it waits (pg_terminate_backend) */
static void
engine_backend_exit(int code, Datum arg)
{
	unclaim_start();
	if (my_slot >= 0 && billing_engine != NULL)
	{
		(void) slot_release(my_slot);
		my_slot = -1;
	}
}

/* a free slot; waits for one while all are in use (back-pressure) */
static int
slot_acquire(void)
{
	int			i = -1;

	if (!exit_callback_registered)
	{
		before_shmem_exit(engine_backend_exit, (Datum) 0);
		exit_callback_registered = true;
	}
	for (;;)
	{
		LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
		if (billing_engine->free_head >= 0)
		{
			i = billing_engine->free_head;
			billing_engine->free_head = engine_slot(i)->next;
			billing_engine->nfree--;
			engine_slot(i)->state = SLOT_QUEUED;	/* ours; linked below */
			engine_slot(i)->next = -1;
			engine_slot(i)->abandoned = false;
			my_slot = i;
		}
		LWLockRelease(billing_engine->lock);
		if (i >= 0)
			break;
		if (ConditionVariableTimedSleep(&billing_engine->slot_freed, ENGINE_CHECK_MS,
										PG_WAIT_EXTENSION))
		{
			/*
			 * No place for a second: is that because an engine of this
			 * database waits for a lock we hold (check_engine_deadlock)?
			 * Nothing is queued yet, so nothing is charged if so.
			 */
			int			pids[ENGINE_MAX];
			int			n = 0;

			LWLockAcquire(billing_engine->lock, LW_SHARED);
			for (int e = 0; e < ENGINE_MAX; e++)
				if (billing_engine->engines[e].database == MyDatabaseId &&
					billing_engine->engines[e].state == ENGINE_RUNNING)
					pids[n++] = billing_engine->engines[e].pid;
			LWLockRelease(billing_engine->lock);
			for (int k = 0; k < n; k++)
				check_engine_deadlock(pids[k], ended_context(SLOT_QUEUED));
		}
	}
	ConditionVariableCancelSleep();
	return i;
}

/* ---------------------------------------------------------------------
 * the test gate
 * ---------------------------------------------------------------------
 */

/*
 * While billing.engine_test_gate(true) holds the gate, the engines and the
 * callers of billing_charge (after queueing) wait for its advisory lock:
 * the callers show as blocked by the gate's session (as isolation tests
 * need), and everything queued meanwhile becomes one batch.
 */
void
engine_gate_pass(void)
{
	LOCKTAG		tag;

	if (!billing_engine->test_gate)
		return;
	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (ENGINE_GATE_KEY >> 32),
						 (uint32) ENGINE_GATE_KEY, 1);
	(void) LockAcquire(&tag, ShareLock, true, false);
	LockRelease(&tag, ShareLock, true);
}

/*
 * billing.engine_test_gate(on boolean) -> void: for tests only (superuser).
 * on: take the gate (an exclusive session advisory lock) and make the
 * engines and billing_charge's callers pass it; off: let go.
 */
Datum
billing_engine_test_gate(PG_FUNCTION_ARGS)
{
	bool		on = !PG_ARGISNULL(0) && PG_GETARG_BOOL(0);
	LOCKTAG		tag;

	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only a superuser may use billing.engine_test_gate()")));
	if (billing_engine == NULL)
		PG_RETURN_VOID();
	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (ENGINE_GATE_KEY >> 32),
						 (uint32) ENGINE_GATE_KEY, 1);
	if (on)
	{
		(void) LockAcquire(&tag, ExclusiveLock, true, false);
		billing_engine->test_gate = true;
	}
	else
	{
		LockRelease(&tag, ExclusiveLock, true);
		billing_engine->test_gate = false;
		/* wake the engines that may sleep with work queued */
		LWLockAcquire(billing_engine->lock, LW_SHARED);
		for (int e = 0; e < ENGINE_MAX; e++)
			if (billing_engine->engines[e].latch)
				SetLatch(billing_engine->engines[e].latch);
		LWLockRelease(billing_engine->lock);
	}
	PG_RETURN_VOID();
}

/* ---------------------------------------------------------------------
 * billing_charge
 * ---------------------------------------------------------------------
 */

/*
 * What an error while we waited (a cancel) means for the charge, by the
 * state our slot was in when we gave it up (slot_release, under the lock:
 * an engine may take the charge until that instant)
 */
static const char *
ended_context(EngineSlotState state)
{
	if (state == SLOT_QUEUED)
		return "billing_charge: the call ended before the charge engine took the charge: nothing was charged";
	if (state == SLOT_TAKEN)
		return "billing_charge: the charge engine was applying this charge when the call ended, so it may have been made; "
			"call billing_charge again with the same trace id to get its outcome";
	if (state == SLOT_DONE)
		return "billing_charge: the charge engine had finished this charge when the call ended, so it may have been made; "
			"call billing_charge again with the same trace id to get its outcome";
	return NULL;
}

/*
 * Does the engine wait for a lock this session holds, directly or through
 * the processes queued between?  We wait for the engine on our latch, which
 * PostgreSQL's deadlock detector does not see: a statement that holds a lock
 * on a billing table (SELECT billing_charge(...) FROM billing.accounts ...)
 * while a DDL queues behind it for that table, and the engine behind the
 * DDL, would otherwise wait for ever.  pg_blocking_pids() follows the lock
 * waits, one step at a time, from the engine to at most ENGINE_BLOCKERS_MAX
 * processes.  Only after ENGINE_CHECK_MS of waiting.  Returns the process
 * the engine waits for first on the way to us (the engine's own pid when
 * it waits for us directly), or 0.
 */
#define ENGINE_BLOCKERS_MAX 32

static int
engine_waits_for_us(int engine_pid)
{
	MemoryContext tmp = AllocSetContextCreate(CurrentMemoryContext, "billing engine blockers",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(tmp);
	int			pids[ENGINE_BLOCKERS_MAX];
	int			via[ENGINE_BLOCKERS_MAX];	/* the first step from the engine */
	int			n = 1;
	int			found = 0;

	pids[0] = engine_pid;
	via[0] = engine_pid;
	for (int i = 0; i < n && found == 0; i++)
	{
		ArrayType  *a = DatumGetArrayTypeP(DirectFunctionCall1(pg_blocking_pids,
															   Int32GetDatum(pids[i])));
		Datum	   *elems;
		int			nelems;

		deconstruct_array(a, INT4OID, sizeof(int32), true, TYPALIGN_INT,
						  &elems, NULL, &nelems);
		for (int j = 0; j < nelems; j++)
		{
			int			pid = DatumGetInt32(elems[j]);
			bool		seen = false;

			if (pid == MyProcPid)
			{
				found = via[i];
				break;
			}
			for (int k = 0; k < n && !seen; k++)
				seen = pids[k] == pid;
			if (!seen && n < ENGINE_BLOCKERS_MAX)
			{
				pids[n] = pid;
				via[n] = i == 0 ? pid : via[i];
				n++;
			}
		}
	}
	MemoryContextSwitchTo(old);
	MemoryContextDelete(tmp);
	return found;
}

/*
 * 40P01 when the engine (engine_pid, 0: none) waits, directly or not, for a
 * lock this session holds, while we wait for it on our latch or for a place
 * in its queue: a deadlock PostgreSQL's detector does not see.  `context`
 * (NULL: none) is the CONTEXT line saying what became of the charge.
 */
static void
check_engine_deadlock(int engine_pid, const char *context)
{
	int			blocker;

	if (engine_pid == 0 || (blocker = engine_waits_for_us(engine_pid)) == 0)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_T_R_DEADLOCK_DETECTED),
			 errmsg("billing_charge waits for the charge engine, which waits for a lock this session holds"),
			 blocker == engine_pid ?
			 errdetail("The engine worker (process %d) waits for a lock held by this session (process %d).",
					   engine_pid, MyProcPid) :
			 errdetail("The engine worker (process %d) waits for process %d, which waits, directly or not, for a lock held by this session (process %d).",
					   engine_pid, blocker, MyProcPid),
			 errhint("Call billing_charge in a statement that reads no billing table and holds no lock the engine needs, or use billing_deduct()."),
			 context ? errcontext("%s", context) : 0));
}

static void
engine_unavailable(const char *why, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_ENGINE_UNAVAILABLE),
			 errmsg("the billing charge engine is not available"),
			 errdetail("%s; nothing was charged.", why),
			 errhint("%s", hint)));
}

static void
fill_text(EngineSlot *slot, int *off, text *t, int *len)
{
	if (t == NULL)
	{
		*len = -1;
		return;
	}
	*len = VARSIZE_ANY_EXHDR(t);
	memcpy(slot->data + *off, VARDATA_ANY(t), *len);
	*off += *len;
}

/*
 * billing_charge(tenant_id, amount, trace_id, description, metadata,
 *				  event_at, kind DEFAULT 'deduct', api_key)
 *	-> billing.entry_result
 *
 * billing_deduct's arguments, rules and result; committed by the charge
 * engine before it returns (engine.h).
 */
Datum
billing_charge(PG_FUNCTION_ARGS)
{
	LedgerRequest req;
	LedgerOutcome out;
	volatile bool slot_refused = false;
	EntryWrite *e = &req.entry;
	text	   *tenant;
	text	   *actor;
	EngineSlot *slot;
	int			i;
	int			engine;
	int			off = 0;
	uint32		generation = 0;
	bool		start = false;
	volatile int starts = 0;
	volatile bool withdrawn = false;
	MemoryContext cxt = CurrentMemoryContext;

	if (billing_engine == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ENGINE_UNAVAILABLE),
				 errmsg("the billing charge engine is not available"),
				 errdetail("billing is not in shared_preload_libraries, so there are no engine workers; nothing was charged."),
				 errhint("Add billing to shared_preload_libraries and restart, or use billing_deduct().")));
	/*
	 * A transaction block: BEGIN ..., COMMIT AND CHAIN, or several
	 * statements in one query string; also from a savepoint or an
	 * EXCEPTION block in one.
	 */
	if (in_top_level_block())
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ENGINE_IN_TRANSACTION),
				 errmsg("billing_charge cannot run inside a transaction block"),
				 errdetail("The charge engine commits the charge on its own, before billing_charge returns: it would not be part of this transaction."),
				 errhint("Call billing_charge outside BEGIN ... COMMIT, one statement at a time, or use billing_deduct() to charge inside a transaction.")));
	if (TransactionIdIsValid(GetTopTransactionIdIfAny()))
		ereport(ERROR,
				(errcode(ERRCODE_BILLING_ENGINE_IN_TRANSACTION),
				 errmsg("billing_charge cannot run in a transaction that has written data"),
				 errdetail("The charge engine commits the charge in a transaction of its own, which might have to wait for the locks this one holds."),
				 errhint("Call billing_charge in a statement of its own, or use billing_deduct() to charge inside a transaction.")));
	PreventCommandIfReadOnly("billing_charge()");

	ledger_parse_request(fcinfo, true, &req);
	tenant = PG_GETARG_TEXT_PP(0);
	actor = billing_actor();

	/*
	 * Citus: Citus runs the call on the tenant's node (billing_charge is a
	 * distributed function, as billing_deduct), whose engine applies it to
	 * the tenant's shard there.  A call that reached another node (a form
	 * Citus does not delegate) is refused here, nothing queued: ZB100.
	 */
	{
		Oid			nsp = get_namespace_oid("billing", true);
		Oid			accounts = OidIsValid(nsp) ? get_relname_relid("accounts", nsp) : InvalidOid;
		int64		shardid;

		if (OidIsValid(accounts))
			(void) billing_shard_relid(accounts, PointerGetDatum(tenant), false, &shardid);
	}

	/* a slot an error left us after our last answer came (out of memory) */
	if (my_slot >= 0)
	{
		(void) slot_release(my_slot);
		my_slot = -1;
	}
	i = slot_acquire();
	slot = engine_slot(i);

	/* the request (the slot is ours: QUEUED but not linked yet) */
	slot->database = MyDatabaseId;
	slot->amount = e->amount;
	slot->has_event_at = e->has_event_at;
	slot->usage_mark = req.usage_mark != NULL;
	slot->event_at = e->event_at;
	/* the window of the caller's session (a superuser may widen or narrow it) */
	slot->event_at_window = billing_event_at_window;
	strlcpy(slot->kind, e->kind, sizeof(slot->kind));
	{
		int			alen = Min(VARSIZE_ANY_EXHDR(actor), NAMEDATALEN - 1);

		memcpy(slot->actor, VARDATA_ANY(actor), alen);
		slot->actor[alen] = '\0';
	}
	fill_text(slot, &off, tenant, &slot->tenant_len);
	fill_text(slot, &off, e->trace_id, &slot->trace_len);
	fill_text(slot, &off, e->description, &slot->description_len);
	slot->metadata_len = VARSIZE(e->metadata);
	memcpy(slot->data + off, e->metadata, slot->metadata_len);
	off += slot->metadata_len;
	fill_text(slot, &off, e->api_key, &slot->api_key_len);
	Assert(off <= ENGINE_DATA_BYTES);
	slot->result = RESULT_NONE;
	slot->latch = MyLatch;
	slot->caller_pid = MyProcPid;

	PG_TRY();
	{
		/* link it into the queue of the engine of this tenant */
		int			index = hash_bytes((const unsigned char *) VARDATA_ANY(tenant),
									   VARSIZE_ANY_EXHDR(tenant)) %
			(uint32) Max(Min(billing_engine_workers, ENGINE_MAX_PER_DATABASE), 1);
		Latch	   *engine_latch = NULL;

		LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
		engine = engine_entry(MyDatabaseId, index);
		if (engine >= 0)
		{
			EngineInfo *info = &billing_engine->engines[engine];

			slot->engine = engine;
			slot->seq = ++billing_engine->next_seq;
			slot->next = -1;
			if (info->tail >= 0)
				engine_slot(info->tail)->next = i;
			else
				info->head = i;
			info->tail = i;
			info->queued++;
			engine_latch = info->latch;
			start = claim_start(engine, &generation);
		}
		LWLockRelease(billing_engine->lock);
		if (engine < 0)
			engine_unavailable("every entry of the engines' registry is in use (at most 16 engine workers in all databases)",
							   "Lower billing.engine_workers, or use billing_charge in fewer databases at once.");
		if (engine_latch)
			SetLatch(engine_latch);

		engine_gate_pass();

		/* wait for the result */
		for (;;)
		{
			EngineSlotState state;
			const char *why;

			if (start)
			{
				start = false;
				/*
				 * An engine that keeps stopping before it takes our charge,
				 * or none can be started: refused only if the charge is
				 * withdrawn, atomically (an engine that took it meanwhile
				 * makes it, and we wait for its answer).
				 */
				if (++starts > 3 && slot_withdraw(i))
				{
					withdrawn = true;
					engine_unavailable("the engine worker stopped three times before it took the charge (see the server log)",
									   "Check that the database accepts connections and the server log for the engine's errors, or use billing_deduct().");
				}
				claimed_engine = -1;	/* engine_start undoes its own failure */
				if (!engine_start(engine, generation, &why) && slot_withdraw(i))
				{
					withdrawn = true;
					engine_unavailable(psprintf("the engine worker could not be started: %s", why),
									   "Raise max_worker_processes (each database that uses billing_charge needs billing.engine_workers of them), or use billing_deduct().");
				}
			}

			ResetLatch(MyLatch);
			state = slot->state;
			pg_read_barrier();
			if (state == SLOT_DONE)
				break;
			if (WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						  ENGINE_CHECK_MS, PG_WAIT_EXTENSION) & WL_TIMEOUT)
			{
				/* is our engine alive?  (one that stops wakes us at once) */
				int			engine_pid = 0;

				LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
				if (slot->state == SLOT_QUEUED)
					start = claim_start(engine, &generation);
				if (billing_engine->engines[engine].state == ENGINE_RUNNING)
					engine_pid = billing_engine->engines[engine].pid;
				LWLockRelease(billing_engine->lock);

				/* a deadlock through our own locks */
				check_engine_deadlock(engine_pid, NULL);	/* PG_CATCH says */
			}
			else
			{
				LWLockAcquire(billing_engine->lock, LW_EXCLUSIVE);
				if (slot->state == SLOT_QUEUED &&
					billing_engine->engines[engine].state == ENGINE_NONE)
					start = claim_start(engine, &generation);
				LWLockRelease(billing_engine->lock);
			}
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_CATCH();
	{
		const char *what = NULL;

		unclaim_start();
		if (!withdrawn)
			what = ended_context(slot_release(i));
		my_slot = -1;
		if (what != NULL)
		{
			ErrorData  *edata;

			/* the error says what became of the charge (its first CONTEXT line) */
			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			edata->context = edata->context ?
				psprintf("%s\n%s", what, edata->context) : pstrdup(what);
			ReThrowError(edata);
		}
		PG_RE_THROW();
	}
	PG_END_TRY();

	/* DONE: the slot is ours again; read the result, then free it */
	memset(&out, 0, sizeof(out));
	if (slot->result == RESULT_CHARGED)
	{
		out.committed = true;
		out.replayed = slot->replayed;
		out.id = slot->entry_id;
		out.kind = pstrdup(slot->out_kind);
		out.amount = slot->out_amount;
		out.balance_after = slot->balance_after;
		out.version = slot->version;
		out.created_at = slot->created_at;
	}
	else if (slot->result == RESULT_ERROR)
	{
		slot_refused = slot->refused;
		out.rejection.sqlerrcode = slot->sqlerrcode;
		out.rejection.message = pnstrdup(slot->data, slot->message_len);
		out.rejection.detail = slot->detail_len < 0 ? NULL :
			pnstrdup(slot->data + slot->message_len, slot->detail_len);
		out.rejection.hint = slot->hint_len < 0 ? NULL :
			pnstrdup(slot->data + slot->message_len + Max(slot->detail_len, 0),
					 slot->hint_len);

		/*
		 * Citus: the tenant was stored here when the charge was queued (see
		 * above), so a ZB100 of the engine means its shard moved away (or
		 * billing.citus_distribute() ran) before the engine applied it:
		 * nothing was charged, and a retry is routed to the tenant's node,
		 * as for a billing_deduct that waited for a move.
		 */
		if (out.rejection.sqlerrcode == ERRCODE_BILLING_WRONG_NODE)
		{
			out.rejection.sqlerrcode = ERRCODE_T_R_SERIALIZATION_FAILURE;
			out.rejection.detail = psprintf("The charge engine found the tenant's shard elsewhere when it applied the charge: %s",
											out.rejection.detail ? out.rejection.detail : out.rejection.message);
			out.rejection.message = psprintf("the shard of tenant \"%s\" left this node while the charge was queued",
											 text_to_cstring(tenant));
			out.rejection.hint = pstrdup("Retry the call with the same trace id: it is routed to the tenant's new node. Nothing was charged.");
		}
	}
	else
	{
		out.rejection.sqlerrcode = ERRCODE_BILLING_ENGINE_OUTCOME_UNKNOWN;
		out.rejection.message = psprintf("the outcome of the charge with trace id \"%s\" is unknown",
										 text_to_cstring(e->trace_id));
		out.rejection.detail = pstrdup("The charge engine stopped while it was applying this charge, which may or may not have been committed.");
		out.rejection.hint = pstrdup("Call billing_charge again with the same trace id (and the same arguments): it returns the charge if it was made (replayed = true), or makes it.");
	}
	(void) slot_release(i);
	my_slot = -1;

	/* counted by billing_metrics() only when billing_deduct's would be */
	if (!out.committed && slot_refused)
		billing_raise_rejection(&out.rejection);
	else if (!out.committed)
		billing_raise_error(&out.rejection);
	return ledger_entry_result(fcinfo, tenant, e->trace_id, &out);
}

/* ---------------------------------------------------------------------
 * billing_engine_status
 * ---------------------------------------------------------------------
 */

/*
 * billing_engine_status() -> SETOF billing.engine_info: one row per engine
 * worker known since the server started (those of every database).
 */
Datum
billing_engine_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EngineInfo	copy[ENGINE_MAX];
	int			free_slots = 0;

	InitMaterializedSRF(fcinfo, 0);
	if (billing_engine == NULL)
		return (Datum) 0;
	LWLockAcquire(billing_engine->lock, LW_SHARED);
	memcpy(copy, billing_engine->engines, sizeof(copy));
	free_slots = billing_engine->nfree;
	LWLockRelease(billing_engine->lock);

	for (int e = 0; e < ENGINE_MAX; e++)
	{
		EngineInfo *info = &copy[e];
		Datum		values[12];
		bool		nulls[12] = {0};
		char	   *dbname;

		if (info->database == InvalidOid)
			continue;
		dbname = get_database_name(info->database);
		values[0] = CStringGetTextDatum(dbname ? dbname : "?");
		values[1] = Int32GetDatum(info->index + 1);
		values[2] = Int32GetDatum(info->pid);
		nulls[2] = info->pid == 0 || info->state != ENGINE_RUNNING;
		values[3] = CStringGetTextDatum(info->state == ENGINE_RUNNING ? "running" :
										info->state == ENGINE_STARTING ? "starting" : "stopped");
		values[4] = Int32GetDatum(info->queued);
		values[5] = Int32GetDatum(free_slots);
		values[6] = Int64GetDatum(info->batches);
		values[7] = Int64GetDatum(info->charges);
		values[8] = Int64GetDatum(info->largest_batch);
		values[9] = Int64GetDatum(info->retries);
		values[10] = Int64GetDatum(info->deferrals);
		values[11] = TimestampTzGetDatum(info->last_batch_at);
		nulls[11] = info->last_batch_at == 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
