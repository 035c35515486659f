/*-------------------------------------------------------------------------
 *
 * jobs.c
 *	  billing.job_guard(): the trigger that enforces the job state machine
 *	  and its billing invariants on billing.jobs, for every writer.
 *
 *	  queued ──claim──> processing ──complete──> completed
 *	     │                 │  │
 *	     │                 │  └──fail (attempts left) / rescue──> queued
 *	     │                 └──fail (no attempts left)──> failed ──retry──> queued
 *	     └──cancel──> cancelled <──cancel── processing
 *
 * Rules, checked on INSERT and UPDATE (the trigger is ENABLE ALWAYS, so a
 * direct UPDATE by the table owner is held to them too; see below for the
 * rows of a COPY FROM, i.e. a restore):
 *	- a new job is queued, with attempt 0;
 *	- only the transitions above; completed and cancelled jobs never change
 *	  again, a failed job only goes back to queued (retry);
 *	- identity (tenant_id, job_id, idempotency_key, kind, input) never
 *	  changes, nor does the hold, except when a failed job is retried;
 *	- completed => its charge exists: charge_entry_id names this job's debit
 *	  entry (trace id job:<id>:charge, amount = -actual cost), or the actual
 *	  cost is exactly 0;
 *	- completed, failed or cancelled => its hold is not open any more.
 * Violations raise ZB070 (transition) or ZB072 (invariant).
 *
 * Restores: pg_restore loads billing.jobs with COPY FROM, and pg_restore -j
 * loads each table in a session of its own, in no order (pg_dump records no
 * dependency between the data of two tables, whatever their foreign keys),
 * so a job may arrive before its charge entry and its hold.  A row of a
 * COPY billing.jobs FROM statement is therefore checked against what is
 * already there: a charge entry that is present must be this job's own, a
 * hold that is present must not be open; one that is not (yet) present is
 * no error.  billing_verify() checks every finished job against its charge
 * and its hold, so the audit that ends every restore covers them.  A plain
 * INSERT, and any write from inside a function, is checked in full.
 *
 * Every state change is logged in billing.job_events by this trigger, so
 * a direct UPDATE is logged too (billing_job_submit logs the submit).  The reason is the row's
 * `note`, which the billing_job_* functions set in the same UPDATE and the
 * trigger consumes (sets back to NULL); a write without a note is logged as
 * a direct update by the session user.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "account.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "nodes/plannodes.h"
#include "replication/logicalworker.h"
#include "tcop/pquery.h"
#include "utils/builtins.h"
#include "utils/portal.h"
#include "utils/rel.h"

PG_FUNCTION_INFO_V1(billing_job_guard);

/*
 * The trigger has no pinned search_path (it runs in whatever session writes
 * billing.jobs, on Citus also a worker's connection as the extension's
 * owner, with the database's default search_path): its queries name every
 * operator and function with its schema.
 */
static SPIPlanPtr plan_entry = NULL;
static SPIPlanPtr plan_hold = NULL;
static SPIPlanPtr plan_log = NULL;

typedef struct JobRow
{
	char	   *state;
	text	   *tenant_id;
	int64		job_id;
	text	   *idempotency_key;
	text	   *kind;
	Datum		input;
	bool		input_null;
	bool		has_charge;
	int64		charge_entry_id;
	bool		has_actual;
	int64		actual_micros;
	text	   *hold_trace_id;	/* may be NULL */
	int32		attempt;
	text	   *note;			/* may be NULL */
	text	   *worker;			/* may be NULL */
} JobRow;

static Datum
get(HeapTuple tuple, TupleDesc desc, const char *name, bool *isnull)
{
	int			attno = SPI_fnumber(desc, name);

	if (attno <= 0)
		elog(ERROR, "billing: billing.jobs has no column \"%s\"", name);
	return heap_getattr(tuple, attno, desc, isnull);
}

/*
 * A column the guard cannot do without.  The BEFORE ROW trigger runs ahead
 * of the table's NOT NULL constraints, so a NULL must be refused here.
 */
static Datum
get_required(HeapTuple tuple, TupleDesc desc, const char *name)
{
	bool		isnull;
	Datum		d = get(tuple, desc, name, &isnull);

	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NOT_NULL_VIOLATION),
				 errmsg("null value in column \"%s\" of billing.jobs violates its not-null constraint",
						name),
				 errdetail("The job state machine needs state, tenant_id, job_id, "
						   "idempotency_key, kind and attempt on every row."),
				 errhint("Change jobs with the billing_job_* functions; "
						 "a direct write must keep %s set.", name)));
	return d;
}

static void
read_job(HeapTuple tuple, TupleDesc desc, JobRow *job)
{
	bool		isnull;
	Datum		d;

	job->state = TextDatumGetCString(get_required(tuple, desc, "state"));
	job->tenant_id = DatumGetTextPP(get_required(tuple, desc, "tenant_id"));
	job->job_id = DatumGetInt64(get_required(tuple, desc, "job_id"));
	job->idempotency_key = DatumGetTextPP(get_required(tuple, desc, "idempotency_key"));
	job->kind = DatumGetTextPP(get_required(tuple, desc, "kind"));
	job->input = get(tuple, desc, "input", &job->input_null);
	d = get(tuple, desc, "charge_entry_id", &isnull);
	job->has_charge = !isnull;
	job->charge_entry_id = isnull ? 0 : DatumGetInt64(d);
	d = get(tuple, desc, "actual_micros", &isnull);
	job->has_actual = !isnull;
	job->actual_micros = isnull ? 0 : DatumGetInt64(d);
	d = get(tuple, desc, "hold_trace_id", &isnull);
	job->hold_trace_id = isnull ? NULL : DatumGetTextPP(d);
	job->attempt = DatumGetInt32(get_required(tuple, desc, "attempt"));
	d = get(tuple, desc, "note", &isnull);
	job->note = isnull ? NULL : DatumGetTextPP(d);
	d = get(tuple, desc, "worker", &isnull);
	job->worker = isnull ? NULL : DatumGetTextPP(d);
}

static bool
legal(const char *from, const char *to)
{
	static const char *const edges[][2] = {
		{"queued", "queued"},	/* reschedule, hold renewal */
		{"queued", "processing"},	/* claim */
		{"queued", "cancelled"},
		{"processing", "processing"},	/* heartbeat */
		{"processing", "completed"},
		{"processing", "queued"},	/* retryable failure, rescue */
		{"processing", "failed"},
		{"processing", "cancelled"},
		{"failed", "queued"},	/* retry */
	};

	for (int i = 0; i < lengthof(edges); i++)
		if (strcmp(edges[i][0], from) == 0 && strcmp(edges[i][1], to) == 0)
			return true;
	return false;
}

static bool
text_eq(text *a, text *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return VARSIZE_ANY_EXHDR(a) == VARSIZE_ANY_EXHDR(b) &&
		memcmp(VARDATA_ANY(a), VARDATA_ANY(b), VARSIZE_ANY_EXHDR(a)) == 0;
}

static void
invariant_failed(JobRow *job, const char *what, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_BILLING_JOB_INVARIANT),
			 errmsg("job " INT64_FORMAT " of tenant \"%s\" cannot be %s %s",
					job->job_id, text_to_cstring(job->tenant_id), job->state, what),
			 errhint("%s", hint)));
}

/*
 * Is this row one of a COPY billing.jobs FROM statement (what pg_restore
 * sends), rather than of an INSERT or of a write inside a function?  The
 * statement being run is that of the active portal: a multi-statement query
 * string runs each statement in a portal of its own, and the statements of
 * a function run inside the portal of the statement that called it.
 */
static bool
copy_from_into(Relation rel)
{
	PlannedStmt *pstmt;
	CopyStmt   *copy;

	if (ActivePortal == NULL || list_length(ActivePortal->stmts) != 1)
		return false;
	pstmt = linitial_node(PlannedStmt, ActivePortal->stmts);
	if (pstmt->commandType != CMD_UTILITY || pstmt->utilityStmt == NULL ||
		!IsA(pstmt->utilityStmt, CopyStmt))
		return false;
	copy = (CopyStmt *) pstmt->utilityStmt;
	return copy->is_from && copy->relation != NULL &&
		RangeVarGetRelid(copy->relation, NoLock, true) == RelationGetRelid(rel);
}

/*
 * completed => this job's own debit entry is its charge.  When restoring
 * (see above), an entry that is not there yet is no error.
 */
static void
check_charged(JobRow *job, bool restoring)
{
	Oid			types[4] = {TEXTOID, INT8OID, TEXTOID, INT8OID};
	Datum		values[4];
	bool		own = false;

	if (!job->has_charge)
	{
		if (job->has_actual && job->actual_micros == 0)
			return;
		invariant_failed(job, "without its charge",
						 "Complete jobs with billing_job_complete(), which captures the cost "
						 "and marks the job completed in one transaction.");
	}
	if (job->has_actual)
	{
		billing_keep_plan(&plan_entry,
						  "SELECT trace_id OPERATOR(pg_catalog.=) $3 "
						  "   AND amount_micros OPERATOR(pg_catalog.=) OPERATOR(pg_catalog.-) $4 "
						  "  FROM billing.entries "
						  " WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND entry_id OPERATOR(pg_catalog.=) $2",
						  4, types);
		values[0] = PointerGetDatum(job->tenant_id);
		values[1] = Int64GetDatum(job->charge_entry_id);
		values[2] = CStringGetTextDatum(psprintf("job:" INT64_FORMAT ":charge", job->job_id));
		values[3] = Int64GetDatum(job->actual_micros);
		billing_spi_exec(plan_entry, values, NULL, SPI_OK_SELECT, "checking the job charge");
		if (SPI_processed == 0 && restoring)
			return;
		if (SPI_processed > 0)
		{
			bool		isnull;
			Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

			own = !isnull && DatumGetBool(d);
		}
	}
	if (!own)
		invariant_failed(job, "with a charge that is not its own",
						 "charge_entry_id must name this job's debit entry (trace id "
						 "job:<job_id>:charge) for exactly its actual cost.");
}

/* failed/cancelled => the hold is not open */
static void
check_released(JobRow *job)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];

	if (job->hold_trace_id == NULL)
		return;
	billing_keep_plan(&plan_hold,
					  "SELECT 1 FROM billing.holds "
					  " WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND trace_id OPERATOR(pg_catalog.=) $2 "
					  "   AND status OPERATOR(pg_catalog.=) 'open'::pg_catalog.text "
					  "   AND expires_at OPERATOR(pg_catalog.>) pg_catalog.now()",
					  2, types);
	values[0] = PointerGetDatum(job->tenant_id);
	values[1] = PointerGetDatum(job->hold_trace_id);
	billing_spi_exec(plan_hold, values, NULL, SPI_OK_SELECT, "checking the job hold");
	if (SPI_processed > 0)
		invariant_failed(job, "while its hold is still open",
						 "Use billing_job_fail() or billing_job_cancel(), which release the hold "
						 "in the same transaction.");
}

/* the invariants of the state a row is in (SPI connected) */
static void
check_state_invariants(JobRow *job, bool restoring)
{
	if (strcmp(job->state, "completed") == 0)
		check_charged(job, restoring);
	if (strcmp(job->state, "completed") == 0 ||
		strcmp(job->state, "failed") == 0 ||
		strcmp(job->state, "cancelled") == 0)
		check_released(job);
}

/* log a transition in billing.job_events; reason = the row's note */
static void
log_transition(JobRow *newjob, const char *from_state)
{
	Oid			types[7] = {TEXTOID, INT8OID, TEXTOID, TEXTOID, INT4OID, TEXTOID, TEXTOID};
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};

	billing_keep_plan(&plan_log,
					  "INSERT INTO billing.job_events (tenant_id, job_id, from_state, "
					  "  to_state, attempt, reason, worker) VALUES ($1, $2, $3, $4, $5, $6, $7)",
					  7, types);
	values[0] = PointerGetDatum(newjob->tenant_id);
	values[1] = Int64GetDatum(newjob->job_id);
	values[2] = from_state ? CStringGetTextDatum(from_state) : (Datum) 0;
	nulls[2] = from_state ? ' ' : 'n';
	values[3] = CStringGetTextDatum(newjob->state);
	values[4] = Int32GetDatum(newjob->attempt);
	values[5] = newjob->note ? PointerGetDatum(newjob->note) :
		CStringGetTextDatum(psprintf("direct %s by %s", from_state ? "update" : "insert",
									 GetUserNameFromId(GetSessionUserId(), false)));
	values[6] = PointerGetDatum(newjob->worker);
	nulls[6] = newjob->worker ? ' ' : 'n';
	billing_spi_exec(plan_log, values, nulls, SPI_OK_INSERT, "logging the job transition");
}

/*
 * job.completed and job.failed (events.h), in the outbox in this
 * transaction (SPI connected).  A database still at 1.3 has no outbox.
 */
static void
job_event(JobRow *job, const char *from_state, HeapTuple tuple, TupleDesc desc)
{
	StringInfoData p;
	bool		isnull;
	Datum		d;

	if (!events_table_exists())
		return;
	ej_begin(&p);
	ej_int(&p, "job_id", job->job_id);
	ej_text(&p, "kind", job->kind);
	ej_text(&p, "idempotency_key", job->idempotency_key);
	ej_str(&p, "from_state", from_state);
	ej_int(&p, "attempt", job->attempt);
	d = get(tuple, desc, "estimated_micros", &isnull);
	if (isnull)
		ej_null(&p, "estimated_cost");
	else
		ej_money(&p, "estimated_cost", DatumGetInt64(d));
	if (strcmp(job->state, "completed") == 0)
	{
		if (job->has_actual)
			ej_money(&p, "actual_cost", job->actual_micros);
		else
			ej_null(&p, "actual_cost");
		if (job->has_charge)
			ej_int(&p, "charge_entry_id", job->charge_entry_id);
		else
			ej_null(&p, "charge_entry_id");
	}
	else
	{
		d = get(tuple, desc, "last_error", &isnull);
		ej_str(&p, "error", isnull ? NULL : TextDatumGetCString(d));
	}
	ej_text(&p, "worker", job->worker);
	ej_text(&p, "hold_trace_id", job->hold_trace_id);
	ej_end(&p);
	(void) events_write_sql(job->tenant_id,
							strcmp(job->state, "completed") == 0 ? "job.completed" : "job.failed",
							&p);
}

/* the note is consumed by the log: store NULL */
static HeapTuple
clear_note(HeapTuple tuple, TupleDesc desc, JobRow *job)
{
	int			attnum = SPI_fnumber(desc, "note");
	Datum		value = (Datum) 0;
	bool		isnull = true;

	(void) heap_getattr(tuple, attnum, desc, &isnull);
	if (isnull)
		return tuple;
	isnull = true;
	return heap_modify_tuple_by_cols(tuple, desc, 1, &attnum, &value, &isnull);
}

Datum
billing_job_guard(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	JobRow		newjob;
	HeapTuple	result;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing.job_guard() must be a FOR EACH ROW trigger")));

	desc = RelationGetDescr(trigdata->tg_relation);

	/* (an AFTER trigger of an older 1.x build: nothing to do any more) */
	if (!TRIGGER_FIRED_BEFORE(trigdata->tg_event))
		return PointerGetDatum(NULL);

	/*
	 * A logical replication apply worker replays a change that this trigger
	 * already checked and logged where it was made: a Citus shard move by
	 * logical replication (the default mode and the rebalancer's), which
	 * creates the trigger on the new shard before its last catch-up, or a
	 * subscription.  Logging it again would write a second transition and a
	 * second job event, and on Citus the log's INSERT would be routed to the
	 * old placement as the move's own role, which fails there, so the apply
	 * and with it the move would retry for ever.
	 */
	if (IsLogicalWorker())
		return PointerGetDatum(TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ?
							   trigdata->tg_newtuple : trigdata->tg_trigtuple);

	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
	{
		/*
		 * Any state may be inserted as long as the invariants hold: that is
		 * what pg_restore does (against what is already loaded, see above).
		 * billing_job_submit logs the submit itself; a direct INSERT is not
		 * logged (a restore brings the log along).
		 */
		bool		restoring = copy_from_into(trigdata->tg_relation);

		result = trigdata->tg_trigtuple;
		read_job(result, desc, &newjob);
		(void) billing_spi_connect();
		check_state_invariants(&newjob, restoring);
		SPI_finish();
		return PointerGetDatum(result);
	}

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		JobRow		oldjob;

		result = trigdata->tg_newtuple;
		read_job(trigdata->tg_trigtuple, desc, &oldjob);
		read_job(result, desc, &newjob);

		if (!legal(oldjob.state, newjob.state))
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_JOB_TRANSITION),
					 errmsg("illegal job transition from %s to %s", oldjob.state, newjob.state),
					 errdetail("Job " INT64_FORMAT " of tenant \"%s\" is %s%s.",
							   oldjob.job_id, text_to_cstring(oldjob.tenant_id), oldjob.state,
							   (strcmp(oldjob.state, "completed") == 0 ||
								strcmp(oldjob.state, "cancelled") == 0) ?
							   ", which is final" : ""),
					 errhint("Allowed: queued -> queued | processing | cancelled; processing -> "
							 "processing | completed | queued | failed | cancelled; failed -> queued (retry).")));

		if (oldjob.job_id != newjob.job_id ||
			!text_eq(oldjob.tenant_id, newjob.tenant_id) ||
			!text_eq(oldjob.idempotency_key, newjob.idempotency_key) ||
			!text_eq(oldjob.kind, newjob.kind) ||
			oldjob.input_null != newjob.input_null ||
			(!oldjob.input_null &&
			 compareJsonbContainers(&DatumGetJsonbP(oldjob.input)->root,
									&DatumGetJsonbP(newjob.input)->root) != 0))
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_JOB_INVARIANT),
					 errmsg("the identity of job " INT64_FORMAT " cannot change", oldjob.job_id),
					 errdetail("tenant_id, job_id, idempotency_key, kind and input are fixed at submit."),
					 errhint("Submit a new job instead.")));

		/* a retried job runs on a new hold (billing_job_retry takes one) */
		if (strcmp(oldjob.state, "failed") == 0 && strcmp(newjob.state, "queued") == 0 &&
			text_eq(oldjob.hold_trace_id, newjob.hold_trace_id))
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_JOB_INVARIANT),
					 errmsg("job " INT64_FORMAT " cannot be queued again without a new hold",
							oldjob.job_id),
					 errdetail("Its hold %s was released when it failed.",
							   oldjob.hold_trace_id ? text_to_cstring(oldjob.hold_trace_id) : "(none)"),
					 errhint("Use billing_job_retry(), which holds the estimate again.")));

		/* the hold changes only when a failed job is retried with a new one */
		if (!text_eq(oldjob.hold_trace_id, newjob.hold_trace_id) &&
			!(strcmp(oldjob.state, "failed") == 0 && strcmp(newjob.state, "queued") == 0))
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_JOB_INVARIANT),
					 errmsg("the hold of job " INT64_FORMAT " cannot change", oldjob.job_id),
					 errdetail("Only a retry of a failed job takes a new hold."),
					 errhint("Use billing_job_retry().")));

		(void) billing_spi_connect();
		check_state_invariants(&newjob, false);
		if (strcmp(oldjob.state, newjob.state) != 0)
		{
			log_transition(&newjob, oldjob.state);
			metrics_count_job(newjob.state);
			if (strcmp(newjob.state, "completed") == 0 || strcmp(newjob.state, "failed") == 0)
				job_event(&newjob, oldjob.state, result, desc);
		}
		SPI_finish();
		return PointerGetDatum(clear_note(result, desc, &newjob));
	}

	ereport(ERROR,
			(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
			 errmsg("billing.job_guard() handles INSERT and UPDATE only")));
	return PointerGetDatum(NULL);
}
