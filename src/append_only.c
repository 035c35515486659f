/*-------------------------------------------------------------------------
 *
 * append_only.c
 *	  Trigger function that makes the ledger tables append-only.
 *
 * billing.append_only() is attached as a BEFORE ... FOR EACH STATEMENT
 * trigger for UPDATE, DELETE and TRUNCATE (or a subset: accounts may be
 * updated but never deleted) and marked ENABLE ALWAYS, so it fires for
 * every role, the table owner and superusers included, and also with
 * session_replication_role = replica.  Being statement-level, it refuses
 * the statement itself, even one that would touch no row.  The optional
 * trigger argument is the hint shown to the user (what to do instead).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "billing.h"
#include "citus.h"
#include "commands/trigger.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

PG_FUNCTION_INFO_V1(billing_append_only);

Datum
billing_append_only(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	const char *op;
	const char *relname;
	const char *hint;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing.append_only() must be called as a trigger")));

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		op = "UPDATE";
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		op = "DELETE";
	else if (TRIGGER_FIRED_BY_TRUNCATE(trigdata->tg_event))
	{
		/*
		 * On Citus the local heap of a distributed table is read by no one:
		 * rows create_distributed_table copied into the shards and left
		 * here.  Emptying it is allowed (truncate_local_data_after_
		 * distributing_table); a TRUNCATE of the table itself reaches the
		 * shards too, whose own copy of this trigger refuses it.
		 */
		if (billing_is_citus_table(RelationGetRelid(trigdata->tg_relation)))
			return PointerGetDatum(NULL);
		op = "TRUNCATE";
	}
	else
		return PointerGetDatum(NULL);	/* INSERT is what append-only allows */

	relname = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(trigdata->tg_relation)),
										 RelationGetRelationName(trigdata->tg_relation));

	if (trigdata->tg_trigger->tgnargs > 0)
		hint = trigdata->tg_trigger->tgargs[0];
	else
		hint = "Record a correction as a new entry instead.";

	ereport(ERROR,
			(errcode(ERRCODE_BILLING_APPEND_ONLY),
			 errmsg("%s is append-only", relname),
			 errdetail("%s of %s is not allowed for any role; history is never rewritten.",
					   op, relname),
			 errhint("%s", hint)));
	return PointerGetDatum(NULL);	/* keep compiler quiet */
}
