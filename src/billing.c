/*-------------------------------------------------------------------------
 *
 * billing.c
 *	  Module entry point of the billing extension: settings, shared memory
 *	  and the background worker.
 *
 * The SQL-callable functions live in one file per concern (input.c,
 * ledger.c, account.c, holds.c, jobs.c, append_only.c, guard.c).  The
 * ledger works without shared_preload_libraries; preloading adds the Redis
 * mirror (sync.c, worker.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "billing.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "sync.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

char	   *billing_database = NULL;
char	   *billing_redis_host = NULL;
int			billing_redis_port = 6379;
char	   *billing_redis_password = NULL;
int			billing_redis_db = 0;
char	   *billing_redis_prefix = NULL;
int			billing_redis_connect_timeout = 1000;
int			billing_redis_command_timeout = 1000;
int			billing_sync_batch_size = 500;
int			billing_maintenance_interval = 1000;
int			billing_check_interval = 60;
int			billing_sync_delay = 5;
char	   *billing_lua_dir = NULL;
bool		billing_allow_drop = false;
int			billing_event_at_window = 7 * 24 * 3600;

/*
 * billing.redis_prefix: the keys are <prefix>:{tenant}..., and Redis Cluster
 * hashes only the first {...} of a key.  A brace in the prefix would make
 * that the prefix's (all tenants in one slot, or a tenant's keys in
 * different slots: CROSSSLOT for the scripts), so it is refused.
 */
static bool
check_redis_prefix(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
	{
		GUC_check_errdetail("The prefix must not be empty.");
		GUC_check_errhint("Use e.g. billing (the default) or app:billing.");
		return false;
	}
	if (strpbrk(*newval, "{}") != NULL)
	{
		GUC_check_errdetail("The keys are <prefix>:{tenant}; a brace in the prefix would change the Redis Cluster hash tag.");
		GUC_check_errhint("Use a prefix without { and }, e.g. billing or app:billing.");
		return false;
	}
	return true;
}

static void
define_settings(void)
{
	DefineCustomStringVariable("billing.redis_host",
							   "Redis host (IP or name) the worker pushes to; empty: no mirror.",
							   NULL, &billing_redis_host, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.redis_port", "Redis port.", NULL,
							&billing_redis_port, 6379, 1, 65535,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.redis_password",
							   "Redis password (AUTH); empty: none.",
							   NULL, &billing_redis_password, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.redis_db", "Redis database number (SELECT).", NULL,
							&billing_redis_db, 0, 0, 1024,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.redis_prefix",
							   "Prefix of the Redis keys: <prefix>:{tenant}.",
							   NULL, &billing_redis_prefix, "billing",
							   PGC_SIGHUP, 0, check_redis_prefix, NULL, NULL);
	DefineCustomIntVariable("billing.redis_connect_timeout",
							"Timeout of a connection attempt to Redis.", NULL,
							&billing_redis_connect_timeout, 1000, 10, 60000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.redis_command_timeout",
							"Timeout of every Redis command (read and write).", NULL,
							&billing_redis_command_timeout, 1000, 10, 60000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.sync_batch_size",
							"Accounts read and pushed per pipelined batch.", NULL,
							&billing_sync_batch_size, 500, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.maintenance_interval",
							"How often the worker expires due holds and rescues stuck jobs.", NULL,
							&billing_maintenance_interval, 1000, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.sync_delay",
							"How long the worker gathers commits after a wake-up before pushing them in one batch.",
							NULL, &billing_sync_delay, 5, 0, 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.check_interval",
							"How often the worker compares Redis with the database and repairs drift (0: never).",
							NULL, &billing_check_interval, 60, 0, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.lua_dir",
							   "Directory of the Lua scripts; empty: SHAREDIR/extension/billing.",
							   NULL, &billing_lua_dir, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.event_at_window",
							"How far back a charge may date its usage (event_at).",
							"Usage is bucketed and priced by its event time; older times are refused with ZB019.",
							&billing_event_at_window, 7 * 24 * 3600, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomBoolVariable("billing.allow_drop",
							 "Allow DROP EXTENSION billing in this session (it destroys the ledger).",
							 "Read by the event trigger billing_guard_drop and by the check of every drop of the extension (e.g. by DROP SCHEMA ... CASCADE).",
							 &billing_allow_drop, false,
							 PGC_SUSET, 0, NULL, NULL, NULL);

	/*
	 * Settings of the worker and its shared memory exist only when we are
	 * preloaded: a PGC_POSTMASTER variable cannot be created later, and the
	 * ledger must work in a plain CREATE EXTENSION too.
	 */
	if (process_shared_preload_libraries_in_progress)
	{
		DefineCustomStringVariable("billing.database",
								   "Database the background worker mirrors to Redis.",
								   NULL, &billing_database, "postgres",
								   PGC_POSTMASTER, 0, NULL, NULL, NULL);
		DefineCustomIntVariable("billing.sync_max_dirty",
								"Changed accounts remembered in shared memory between pushes (beyond: full resync).",
								NULL, &billing_sync_max_dirty, 20000, 100, 10000000,
								PGC_POSTMASTER, 0, NULL, NULL, NULL);
	}
	MarkGUCPrefixReserved("billing");
}

static void
register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	strlcpy(worker.bgw_library_name, "billing", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "billing_worker_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "billing sync", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "billing sync", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

void
_PG_init(void)
{
	/* pg_upgrade's binary-upgrade server must not start workers */
	if (IsBinaryUpgrade)
		return;
	define_settings();
	billing_guard_init();
	billing_sync_init();
	if (process_shared_preload_libraries_in_progress)
		register_worker();
}
