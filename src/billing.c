/*-------------------------------------------------------------------------
 *
 * billing.c
 *	  Module entry point of the billing extension: settings, shared memory
 *	  and the background worker.
 *
 * The SQL-callable functions live in one file per concern (input.c,
 * ledger.c, account.c, holds.c, jobs.c, append_only.c, guard.c).  The
 * ledger works without shared_preload_libraries; preloading adds the Redis
 * mirror (sync.c, worker.c) and the charge engine (engine.c,
 * engine_worker.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "billing.h"
#include "citus.h"
#include "events.h"
#include "engine.h"
#include "fmgr.h"
#include "guc.h"
#include "ledger.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "sync.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

char	   *billing_database = NULL;
char	   *billing_worker_role = NULL;
char	   *billing_redis_host = NULL;
int			billing_redis_port = 6379;
char	   *billing_redis_user = NULL;
char	   *billing_redis_password = NULL;
char	   *billing_redis_password_file = NULL;
int			billing_redis_db = 0;
char	   *billing_redis_prefix = NULL;
int			billing_redis_connect_timeout = 1000;
int			billing_redis_command_timeout = 1000;
int			billing_redis_max_reply_size = 16384;
bool		billing_redis_tls = false;
char	   *billing_redis_tls_ca_file = NULL;
char	   *billing_redis_tls_cert_file = NULL;
char	   *billing_redis_tls_key_file = NULL;
char	   *billing_redis_tls_server_name = NULL;
int			billing_sync_batch_size = 500;
int			billing_maintenance_interval = 1000;
int			billing_check_interval = 60;
int			billing_purge_interval = 60;
int			billing_sync_delay = 5;
char	   *billing_lua_dir = NULL;
int			billing_events_retention = 7 * 24 * 3600;
int			billing_events_maxlen = 1000;
int			billing_events_all_maxlen = 100000;
bool		billing_events_notify = false;
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

/*
 * billing.redis_password is shown as ******** (SHOW, current_setting):
 * GUC_SUPERUSER_ONLY still lets members of pg_read_all_settings read it.
 * It is not listed in pg_settings (GUC_NO_SHOW_ALL): the show hook does not
 * mask that view's reset_val, the raw string.  billing.redis_password_file
 * keeps the secret out of the settings altogether.
 */
static const char *
show_redis_password(void)
{
	return billing_redis_password && billing_redis_password[0] ? "********" : "";
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
	DefineCustomStringVariable("billing.redis_user",
							   "Redis ACL user (AUTH user password); empty: the default user.",
							   NULL, &billing_redis_user, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.redis_password",
							   "Redis password (AUTH); empty: none.  Prefer billing.redis_password_file.",
							   NULL, &billing_redis_password, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL, NULL, NULL,
							   show_redis_password);
	DefineCustomStringVariable("billing.redis_password_file",
							   "File holding the Redis password (first line), readable by the server's OS user only.",
							   NULL, &billing_redis_password_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomBoolVariable("billing.redis_tls",
							 "Connect to Redis with TLS (the certificate is verified).",
							 "Refused (the worker does not connect) by a build without TLS support.",
							 &billing_redis_tls, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.redis_tls_ca_file",
							   "CA certificates that sign Redis' certificate; empty: the system's.",
							   NULL, &billing_redis_tls_ca_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.redis_tls_cert_file",
							   "Client certificate for Redis (tls-auth-clients); empty: none.",
							   NULL, &billing_redis_tls_cert_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.redis_tls_key_file",
							   "Private key of the client certificate; empty: in the certificate file.",
							   NULL, &billing_redis_tls_key_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.redis_tls_server_name",
							   "Name Redis' certificate must carry (and SNI); empty: billing.redis_host.",
							   NULL, &billing_redis_tls_server_name, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
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
							"Longest a Redis command or pipelined batch may take, from sending it to its last reply.",
							"A batch of n commands gets 0.1 ms more per command.",
							&billing_redis_command_timeout, 1000, 10, 60000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.redis_max_reply_size",
							"Largest Redis reply the worker accepts (a larger one closes the connection).",
							NULL, &billing_redis_max_reply_size, 16384, 64, 1048576,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);
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
	DefineCustomIntVariable("billing.purge_interval",
							"How often the worker removes expired gateway reservations of every account from Redis (0: never).",
							"Gateways' scripts remove them too, on the accounts they charge.",
							&billing_purge_interval, 60, 0, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("billing.lua_dir",
							   "Directory of the Lua scripts; empty: SHAREDIR/extension/billing.",
							   NULL, &billing_lua_dir, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.events_retention",
							"How long delivered events stay in the outbox (billing.events) before the worker prunes them (0: forever).",
							"Events not yet delivered to Redis are kept, unless billing.redis_host is empty.",
							&billing_events_retention, 7 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.events_maxlen",
							"Approximate length a tenant's Redis stream of events is trimmed to (XADD MAXLEN ~).",
							NULL, &billing_events_maxlen, 1000, 1, 100000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("billing.events_all_maxlen",
							"Approximate length the Redis stream of every tenant's events is trimmed to (XADD MAXLEN ~).",
							NULL, &billing_events_all_maxlen, 100000, 1, 1000000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("billing.events_notify",
							 "Announce the events a transaction writes with NOTIFY billing_events when it commits.",
							 "Off by default: PostgreSQL serializes the commits of every transaction that notifies, so announcing each job.completed caps job completions at one commit flush at a time.  Superuser only: any role that can connect may LISTEN, and the announcements name tenants.",
							 &billing_events_notify, false,
							 PGC_SUSET, 0, NULL, NULL, NULL);
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
								   "A change restarts the worker.",
								   &billing_database, "postgres",
								   PGC_SIGHUP, 0, NULL, NULL, NULL);
		DefineCustomStringVariable("billing.worker_role",
								   "Role the background worker connects as; empty: the bootstrap superuser.",
								   "Needs the rights billing_grant_worker() grants.  A change restarts the worker.",
								   &billing_worker_role, "",
								   PGC_SIGHUP, 0, NULL, NULL, NULL);
		DefineCustomIntVariable("billing.engine_workers",
								"Charge engine workers per database that uses billing_charge().",
								"A tenant's charges always go to the same worker.",
								&billing_engine_workers, 1, 1, ENGINE_MAX_PER_DATABASE,
								PGC_SIGHUP, 0, NULL, NULL, NULL);
		DefineCustomIntVariable("billing.engine_queue_size",
								"Charges that can wait for the charge engine at once (shared memory: 24 kB each).",
								"A caller that finds every place taken waits for one.",
								&billing_engine_queue_size, 128, 8, 65536,
								PGC_POSTMASTER, 0, NULL, NULL, NULL);
		DefineCustomIntVariable("billing.engine_idle_timeout",
								"How long a charge engine worker stays without work before it stops.",
								"The next billing_charge() starts it again.",
								&billing_engine_idle_timeout, 60, 1, 86400,
								PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
		DefineCustomIntVariable("billing.engine_lock_wait",
								"How long the charge engine puts off the charges of an account another transaction has locked before it waits for the lock.",
								"Until then the other tenants' charges go ahead without them.",
								&billing_engine_lock_wait, 20, 0, 60000,
								PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
		DefineCustomIntVariable("billing.engine_gather",
								"How long the charge engine may wait for the charges of concurrent callers to gather into one batch (0: never).",
								"Only when the recent batches had several charges: a lone caller's charge is never held back.",
								&billing_engine_gather, 0, 0, 100,
								PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
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
	billing_citus_init();
	ledger_init();
	billing_sync_init();
	events_init();
	billing_engine_init();
	if (process_shared_preload_libraries_in_progress)
		register_worker();
}
