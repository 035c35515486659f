/*-------------------------------------------------------------------------
 *
 * guard.c
 *	  The DROP guard: the extension is dropped only in a session that said
 *	  SET billing.allow_drop = on, however the drop comes about.
 *
 * The event trigger billing_guard_drop (1.1, PL/pgSQL) refuses a plain
 * DROP EXTENSION billing.  It cannot see a cascade: DROP SCHEMA public
 * CASCADE (the extension depends on its install schema), DROP OWNED BY
 * <extension owner>, DROP EXTENSION plpgsql CASCADE... drop the
 * extension and every table of the ledger with it.  Nor can an sql_drop
 * event trigger: one that belongs to the extension is gone, with its
 * function, by the time sql_drop fires.
 *
 * So the drop itself is checked: an object_access_hook sees every object
 * the deletion machinery drops, the extension included, before it is
 * dropped, whatever the command; it raises ZB021 there and the whole
 * command rolls back.  The hook exists in a backend that has loaded the
 * library: always with shared_preload_libraries = 'billing', else the event
 * trigger billing_guard_drop_cascade (1.3) calls billing.guard_drop_cascade(),
 * a C function of the library, at the start of every DROP command, which
 * loads it.
 *
 * A guard against accidents, not a security boundary: a superuser can set
 * billing.allow_drop, or drop the whole database.  Without the superuser's
 * setting it also stops a non-superuser who may drop the install schema
 * (e.g. the database owner: public) from taking the ledger with it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "billing.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_extension.h"
#include "commands/event_trigger.h"
#include "commands/extension.h"
#include "guc.h"

static object_access_hook_type prev_object_access_hook = NULL;

static void
billing_object_access(ObjectAccessType access, Oid classId, Oid objectId,
					  int subId, void *arg)
{
	if (prev_object_access_hook)
		prev_object_access_hook(access, classId, objectId, subId, arg);

	if (access == OAT_DROP && classId == ExtensionRelationId &&
		!billing_allow_drop)
	{
		char	   *name = get_extension_name(objectId);

		if (name != NULL && strcmp(name, "billing") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_BILLING_DROP_REFUSED),
					 errmsg("dropping extension billing would destroy the ledger"),
					 errdetail("Every account, entry, hold and job is stored in the extension's tables."),
					 errhint("Take a pg_dump first; then SET billing.allow_drop = on in this session and drop it.")));
	}
}

void
billing_guard_init(void)
{
	prev_object_access_hook = object_access_hook;
	object_access_hook = billing_object_access;
}

/*
 * billing.guard_drop_cascade(): event trigger on ddl_command_start of the
 * DROP commands.  Being called loads the library, and with it the hook
 * above; the hook does the checking.
 */
PG_FUNCTION_INFO_V1(billing_guard_drop_cascade);

Datum
billing_guard_drop_cascade(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("billing.guard_drop_cascade() must be called as an event trigger")));
	PG_RETURN_VOID();
}
