/*-------------------------------------------------------------------------
 *
 * guc.h
 *	  The billing.* settings, defined in billing.c: one declaration for the
 *	  file that defines them and every file that reads them (PostgreSQL
 *	  18's PGXS builds with -Wmissing-variable-declarations).
 *
 * billing.sync_max_dirty is sync.c's (it sizes its shared memory).
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_GUC_H
#define BILLING_GUC_H

/* the worker: where it connects */
extern char *billing_database;
extern char *billing_worker_role;

/* Redis: where, who, how */
extern char *billing_redis_host;
extern int	billing_redis_port;
extern char *billing_redis_user;
extern char *billing_redis_password;
extern char *billing_redis_password_file;
extern int	billing_redis_db;
extern char *billing_redis_prefix;
extern int	billing_redis_connect_timeout;
extern int	billing_redis_command_timeout;
extern int	billing_redis_max_reply_size;
extern bool billing_redis_tls;
extern char *billing_redis_tls_ca_file;
extern char *billing_redis_tls_cert_file;
extern char *billing_redis_tls_key_file;
extern char *billing_redis_tls_server_name;

/* the mirror and the maintenance */
extern int	billing_sync_batch_size;
extern int	billing_maintenance_interval;
extern int	billing_check_interval;
extern int	billing_purge_interval;
extern int	billing_sync_delay;
extern char *billing_lua_dir;

/* the events' delivery (outbox.c) */
extern int	billing_events_retention;
extern int	billing_events_maxlen;
extern int	billing_events_all_maxlen;
extern bool billing_events_notify;

/* sessions */
extern bool billing_allow_drop;
extern int	billing_event_at_window;

#endif							/* BILLING_GUC_H */
