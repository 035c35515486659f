/*-------------------------------------------------------------------------
 *
 * redis.h
 *	  The worker's Redis client: one connection, non-blocking I/O under
 *	  a wait set of its own with an overall deadline per command or pipeline,
 *	  replies parsed by hiredis into objects of our own making with
 *	  bounded sizes, AUTH (password or ACL user), TLS where the build has
 *	  it.
 *
 * Every failure (a transport error, a timeout, a reply too large, nested
 * too deep, or malformed) closes the connection and is recorded; the
 * caller sees false or NULL and starts over after a backoff.  Replies are
 * untrusted input: callers check the type of every element they use.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_REDIS_H
#define BILLING_REDIS_H

#include <hiredis/hiredis.h>

#include "lib/stringinfo.h"

/*
 * Limits of one reply besides billing.redis_max_reply_size (its memory):
 * the elements of one array, and how deeply arrays nest (the worker needs
 * two levels: SCAN's reply holds the key list).
 */
#define REDIS_MAX_ELEMENTS	(1024 * 1024)
#define REDIS_MAX_DEPTH		3

/* a pipeline's deadline grows by this many microseconds per command */
#define REDIS_US_PER_COMMAND 100

/*
 * Called every REDIS_WAIT_SLICE_MS while the client waits for Redis, after
 * CHECK_FOR_INTERRUPTS(): false aborts the command (the connection is
 * closed without a failure being recorded: e.g. a reload changed where
 * the worker pushes).
 */
#define REDIS_WAIT_SLICE_MS 100
typedef bool (*RedisWaitHook) (void);
extern void redis_set_wait_hook(RedisWaitHook hook);

/* what this build can do: "TLS (hiredis 1.2.0)" or why not */
extern const char *redis_tls_support(void);
extern bool redis_tls_built(void);

/* connection */
extern bool redis_open(void);
extern bool redis_is_open(void);
extern void redis_close(const char *fmt,...) pg_attribute_printf(1, 2);
extern bool redis_take_failure(char *msg, size_t len);

/* commands: begin, send (any number of times), receive one reply each */
extern void redis_begin(const char *what);
extern bool redis_send(StringInfo buf, int ncommands);
extern redisReply *redis_receive(void);
extern bool redis_replies_owed(void);
extern redisReply *redis_command(const char *what, int argc,
								 const char *const *argv, const size_t *lens);

/* replies */
extern void redis_free(redisReply *r);
extern void redis_free_all(void);
extern bool redis_unexpected(redisReply *r, const char *what);
extern bool redis_unexpected_in(redisReply *whole, const redisReply *part,
								const char *what);
extern const char *redis_type_name(int type);
extern void redis_reply_text(const redisReply *r, char *out, size_t outlen);
extern bool redis_is_string(const redisReply *r);

#endif							/* BILLING_REDIS_H */
