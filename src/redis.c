/*-------------------------------------------------------------------------
 *
 * redis.c
 *	  The worker's Redis client (one connection at a time).
 *
 * Redis and the network are untrusted: a reply can be of any type, any
 * size, or arrive one byte at a time, and the worker must neither crash
 * (a crashed worker takes the server through crash recovery) nor block
 * (a worker blocked in a read ignores SIGTERM and blocks shutdown).  So:
 *
 * - The socket is non-blocking.  hiredis writes and reads it
 *   (redisBufferWrite/redisBufferRead, which also do TLS); we wait under
 *   the connection's wait set in slices of REDIS_WAIT_SLICE_MS, checking
 *   interrupts and the caller's hook (reloads) after every slice, against
 *   one deadline per command or pipeline: billing.redis_command_timeout
 *   plus REDIS_US_PER_COMMAND per pipelined command, from the first byte
 *   sent to the last byte of the last reply.  A server that trickles a
 *   byte every half second fails it like one that never answers.  The
 *   latch is not part of these waits: committing backends set it at every
 *   commit, and the main loop sees it set afterwards.
 * - hiredis parses replies, but into objects made by our functions
 *   (the reader's redisReplyObjectFunctions), which refuse an array of
 *   more than REDIS_MAX_ELEMENTS elements or nested deeper than
 *   REDIS_MAX_DEPTH, and any object that would take the reply's memory
 *   beyond billing.redis_max_reply_size, before allocating it; bytes
 *   received but not yet parsed (a long string arriving) count against the
 *   same limit.  A reply therefore never takes more than about twice that
 *   setting of memory.
 * - Commands are written in RESP with explicit lengths (resp.c): whatever
 *   a reply contained is sent back as data.
 * - Any surprise closes the connection (replies would be misaligned) and
 *   is recorded; callers see false or NULL, and the worker reconnects
 *   after a backoff.
 *
 * hiredis allocates with malloc: replies are freed with redis_free before
 * anything can raise an error; the ones a caller still holds when an error
 * escapes are freed by redis_free_all() (the worker's error recovery).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#ifdef BILLING_REDIS_TLS
#include <hiredis/hiredis_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

#include "compat.h"
#include "guc.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "redis.h"
#include "resp.h"
#include "storage/latch.h"
#include "sync.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

static redisContext *ctx = NULL;

/*
 * The wait set of the connection: its socket (position 0, for reading or
 * writing) and the postmaster's death.  Made at the first wait, freed with
 * the connection: a set per wait (WaitLatchOrSocket) costs four system
 * calls, and the worker waits several times per batch it pushes.
 */
static WaitEventSet *wait_set = NULL;
static int	wait_set_events = 0;

#ifdef BILLING_REDIS_TLS
static SSL *tls_ssl = NULL;		/* owned by ctx; for the reason of a failure */
#endif

/* the reason the connection was lost, until the worker takes it */
static char failure[SYNC_ERROR_LEN];
static bool failed = false;

static RedisWaitHook wait_hook = NULL;

/* the command or pipeline in progress */
static const char *cmd_what = "";
static TimestampTz cmd_start = 0;
static int	cmd_sent = 0;		/* commands sent */
static int	cmd_received = 0;	/* replies received */
static bool uncounted = false;	/* a pipeline's chunk sent, its end not yet */
static bool cmd_stalled = false;	/* billing_sync_status() shows the stall */

/* replies handed to callers and not yet freed (see redis_free_all) */
#define MAX_OUTSTANDING 8
static redisReply *outstanding[MAX_OUTSTANDING];

/* ---------------------------------------------------------------------
 * reply objects
 * ---------------------------------------------------------------------
 */

/* memory the reply being parsed has taken so far, and why it was refused */
static size_t reply_used = 0;
static char reply_refusal[128] = "";

static void reply_free_object(void *obj);

static size_t
max_reply_bytes(void)
{
	return (size_t) billing_redis_max_reply_size * 1024;
}

static bool
reply_budget(size_t bytes)
{
	if (bytes > max_reply_bytes() || reply_used > max_reply_bytes() - bytes)
	{
		snprintf(reply_refusal, sizeof(reply_refusal),
				 "reply larger than billing.redis_max_reply_size (%d kB)",
				 billing_redis_max_reply_size);
		return false;
	}
	reply_used += bytes;
	return true;
}

/*
 * A new object for a read task; `extra` is what it needs besides its
 * struct (string bytes, element pointers).  An element's struct was paid
 * for with its array.
 */
static redisReply *
reply_new(const redisReadTask *task, size_t extra)
{
	redisReply *r;
	int			depth = 0;

	for (const redisReadTask *t = task->parent; t != NULL; t = t->parent)
		depth++;
	if (depth > REDIS_MAX_DEPTH)
	{
		snprintf(reply_refusal, sizeof(reply_refusal),
				 "reply nested deeper than %d levels", REDIS_MAX_DEPTH);
		return NULL;
	}
	if (!reply_budget((task->parent ? 0 : sizeof(redisReply)) + extra))
		return NULL;
	r = calloc(1, sizeof(redisReply));
	if (r == NULL)
	{
		strlcpy(reply_refusal, "out of memory", sizeof(reply_refusal));
		return NULL;
	}
	r->type = task->type;
	return r;
}

/* hang a new object into its parent array */
static void *
reply_link(const redisReadTask *task, redisReply *r)
{
	if (task->parent != NULL)
	{
		redisReply *parent = task->parent->obj;

		if (parent == NULL || parent->element == NULL ||
			task->idx < 0 || (size_t) task->idx >= parent->elements)
		{
			reply_free_object(r);
			strlcpy(reply_refusal, "malformed aggregate", sizeof(reply_refusal));
			return NULL;
		}
		parent->element[task->idx] = r;
	}
	return r;
}

static void
reply_free_object(void *obj)
{
	redisReply *r = obj;

	if (r == NULL)
		return;
	if (r->element != NULL)
	{
		for (size_t i = 0; i < r->elements; i++)
			reply_free_object(r->element[i]);
		free(r->element);
	}
	free(r->str);
	free(r);
}

static void *
reply_string(const redisReadTask *task, char *str, size_t len)
{
	redisReply *r;

	if (len >= max_reply_bytes())
	{
		(void) reply_budget(len + 1);	/* sets the refusal */
		return NULL;
	}
	r = reply_new(task, len + 1);
	if (r == NULL)
		return NULL;
	r->str = malloc(len + 1);
	if (r->str == NULL)
	{
		free(r);
		strlcpy(reply_refusal, "out of memory", sizeof(reply_refusal));
		return NULL;
	}
	memcpy(r->str, str, len);
	r->str[len] = '\0';
	r->len = len;
	return reply_link(task, r);
}

static void *
#if HIREDIS_MAJOR >= 1
reply_array(const redisReadTask *task, size_t elements)
#else
reply_array(const redisReadTask *task, int elements)
#endif
{
	redisReply *r;
	size_t		n;

#if HIREDIS_MAJOR < 1
	if (elements < 0)
		elements = REDIS_MAX_ELEMENTS + 1;	/* refused below */
#endif
	n = (size_t) elements;
	if (n > REDIS_MAX_ELEMENTS)
	{
		snprintf(reply_refusal, sizeof(reply_refusal),
				 "array of more than %d elements", REDIS_MAX_ELEMENTS);
		return NULL;
	}
	/* every element will take at least a struct: refuse now, not later */
	r = reply_new(task, n * (sizeof(redisReply *) + sizeof(redisReply)));
	if (r == NULL)
		return NULL;
	if (n > 0)
	{
		r->element = calloc(n, sizeof(redisReply *));
		if (r->element == NULL)
		{
			free(r);
			strlcpy(reply_refusal, "out of memory", sizeof(reply_refusal));
			return NULL;
		}
	}
	r->elements = n;
	return reply_link(task, r);
}

static void *
reply_integer(const redisReadTask *task, long long value)
{
	redisReply *r = reply_new(task, 0);

	if (r == NULL)
		return NULL;
	r->integer = value;
	return reply_link(task, r);
}

static void *
reply_nil(const redisReadTask *task)
{
	redisReply *r = reply_new(task, 0);

	if (r == NULL)
		return NULL;
	r->type = REDIS_REPLY_NIL;	/* the task says string or array ($-1, *-1) */
	return reply_link(task, r);
}

#if HIREDIS_MAJOR >= 1
/* RESP3 types: the worker never asks for them; kept as typed objects */
static void *
reply_double(const redisReadTask *task, double value, char *str, size_t len)
{
	redisReply *r = reply_string(task, str, len);

	if (r != NULL)
		r->dval = value;
	return r;
}

static void *
reply_bool(const redisReadTask *task, int value)
{
	redisReply *r = reply_new(task, 0);

	if (r == NULL)
		return NULL;
	r->integer = value != 0;
	return reply_link(task, r);
}
#endif

static redisReplyObjectFunctions reply_functions = {
	.createString = reply_string,
	.createArray = reply_array,
	.createInteger = reply_integer,
#if HIREDIS_MAJOR >= 1
	.createDouble = reply_double,
	.createBool = reply_bool,
#endif
	.createNil = reply_nil,
	.freeObject = reply_free_object,
};

/* ---------------------------------------------------------------------
 * replies handed out
 * ---------------------------------------------------------------------
 */
static void
remember(redisReply *r)
{
	for (int i = 0; i < MAX_OUTSTANDING; i++)
		if (outstanding[i] == NULL)
		{
			outstanding[i] = r;
			return;
		}
	/* a caller holds too many: a bug; it is freed with the others then */
	elog(WARNING, "billing sync: more than %d Redis replies held", MAX_OUTSTANDING);
}

void
redis_free(redisReply *r)
{
	if (r == NULL)
		return;
	for (int i = 0; i < MAX_OUTSTANDING; i++)
		if (outstanding[i] == r)
			outstanding[i] = NULL;
	reply_free_object(r);
}

void
redis_free_all(void)
{
	for (int i = 0; i < MAX_OUTSTANDING; i++)
	{
		reply_free_object(outstanding[i]);
		outstanding[i] = NULL;
	}
}

const char *
redis_type_name(int type)
{
	switch (type)
	{
		case REDIS_REPLY_STRING:
			return "string";
		case REDIS_REPLY_ARRAY:
			return "array";
		case REDIS_REPLY_INTEGER:
			return "integer";
		case REDIS_REPLY_NIL:
			return "nil";
		case REDIS_REPLY_STATUS:
			return "status";
		case REDIS_REPLY_ERROR:
			return "error";
		default:
			return "RESP3 type";
	}
}

bool
redis_is_string(const redisReply *r)
{
	return r != NULL && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS) &&
		r->str != NULL;
}

/*
 * A printable excerpt of a string, status or error reply (at most outlen-1
 * bytes, other bytes as '?'): for messages, never the raw bytes.
 */
void
redis_reply_text(const redisReply *r, char *out, size_t outlen)
{
	size_t		n = 0;

	if (r != NULL && r->str != NULL &&
		(r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS ||
		 r->type == REDIS_REPLY_ERROR))
	{
		for (; n + 1 < outlen && n < r->len; n++)
		{
			unsigned char c = (unsigned char) r->str[n];

			out[n] = (c >= 0x20 && c < 0x7f) ? (char) c : '?';
		}
	}
	else if (r != NULL)
		n = strlcpy(out, redis_type_name(r->type), outlen);
	out[Min(n, outlen - 1)] = '\0';
}

/*
 * A reply of a type the caller did not expect: close (nothing after it can
 * be trusted to line up), free it, return false.
 */
bool
redis_unexpected(redisReply *r, const char *what)
{
	return redis_unexpected_in(r, r, what);
}

/*
 * The same for part, one element of the array reply whole (EXEC's): whole
 * is freed.
 */
bool
redis_unexpected_in(redisReply *whole, const redisReply *part, const char *what)
{
	char		text[96];
	bool		error = part != NULL && part->type == REDIS_REPLY_ERROR;

	redis_reply_text(part, text, sizeof(text));
	redis_free(whole);
	if (error)
		redis_close("%s failed: %s", what, text);
	else
		redis_close("unexpected reply to %s: %s", what, text);
	return false;
}

/* ---------------------------------------------------------------------
 * connection
 * ---------------------------------------------------------------------
 */
void
redis_set_wait_hook(RedisWaitHook hook)
{
	wait_hook = hook;
}

bool
redis_tls_built(void)
{
#ifdef BILLING_REDIS_TLS
	return true;
#else
	return false;
#endif
}

const char *
redis_tls_support(void)
{
#ifdef BILLING_REDIS_TLS
	return "TLS available (hiredis " CppAsString2(HIREDIS_MAJOR) "." CppAsString2(HIREDIS_MINOR) " with hiredis_ssl)";
#else
	return "this build has no TLS support (built with hiredis " CppAsString2(HIREDIS_MAJOR) "." CppAsString2(HIREDIS_MINOR) "; TLS needs hiredis 1.0 or later with hiredis_ssl)";
#endif
}

bool
redis_is_open(void)
{
	return ctx != NULL;
}

static void
set_connected(bool connected)
{
	if (billing_sync == NULL)
		return;
	LWLockAcquire(billing_sync->lock, LW_EXCLUSIVE);
	billing_sync->connected = connected;
	LWLockRelease(billing_sync->lock);
}

/*
 * Close the connection.  With a reason: record it (billing_sync_status()),
 * and keep it for the worker's backoff and its log (redis_take_failure).
 */
void
redis_close(const char *fmt,...)
{
#ifdef BILLING_REDIS_TLS
	tls_ssl = NULL;
#endif
	if (wait_set != NULL)
		FreeWaitEventSet(wait_set);
	wait_set = NULL;
	wait_set_events = 0;
	if (ctx != NULL)
		redisFree(ctx);
	ctx = NULL;
	reply_used = 0;
	cmd_stalled = false;
	set_connected(false);
	if (fmt != NULL)
	{
		va_list		ap;

		va_start(ap, fmt);
		vsnprintf(failure, sizeof(failure), fmt, ap);
		va_end(ap);
		failed = true;
		billing_sync_record_error("%s", failure);
	}
}

/* Was the connection lost since the last call?  Then why. */
bool
redis_take_failure(char *msg, size_t len)
{
	if (!failed)
		return false;
	strlcpy(msg, failure, len);
	failed = false;
	return true;
}

/* hiredis' own message, before the context is freed */
static void
close_with_context_error(const char *doing)
{
	char		err[160];

#ifdef BILLING_REDIS_TLS
	if (tls_ssl != NULL && SSL_get_verify_result(tls_ssl) != X509_V_OK)
	{
		const char *name = billing_redis_tls_server_name[0] ? billing_redis_tls_server_name : billing_redis_host;

		strlcpy(err, X509_verify_cert_error_string(SSL_get_verify_result(tls_ssl)), sizeof(err));
		ERR_clear_error();
		redis_close("TLS: the certificate of Redis at %s:%d was refused: %s (expected name %s)",
					billing_redis_host, billing_redis_port, err, name);
		return;
	}
	if (tls_ssl != NULL && ERR_peek_last_error() != 0)
	{
		char		tls[128];

		ERR_error_string_n(ERR_peek_last_error(), tls, sizeof(tls));
		ERR_clear_error();
		redis_close("TLS: %s %s: %s", doing, cmd_what, tls);
		return;
	}
#endif
	if (ctx != NULL && ctx->err == REDIS_ERR_OOM && reply_refusal[0] != '\0')
		strlcpy(err, reply_refusal, sizeof(err));
	else if (ctx != NULL && ctx->errstr[0] != '\0')
		strlcpy(err, ctx->errstr, sizeof(err));
	else
		strlcpy(err, "connection error", sizeof(err));
	redis_close("%s %s: %s", doing, cmd_what, err);
}

/* what a timeout message adds when the TLS handshake is still going on */
static const char *
tls_note(void)
{
#ifdef BILLING_REDIS_TLS
	if (tls_ssl != NULL && !SSL_is_init_finished(tls_ssl))
		return " (the TLS handshake did not complete)";
#endif
	return "";
}

static int
remaining_ms(TimestampTz deadline)
{
	TimestampTz now = GetCurrentTimestamp();

	if (now >= deadline)
		return 0;
	return (int) Min((deadline - now + 999) / 1000, INT_MAX);
}

/*
 * Wait up to timeout_ms for `events` (WL_SOCKET_READABLE or _WRITEABLE) on
 * the connection's socket; the postmaster's death ends the process.
 * Returns the socket events that occurred, 0 at the timeout.
 */
static int
wait_connection(int events, long timeout_ms)
{
	WaitEvent	occurred;

	if (wait_set == NULL)
	{
		/* published only whole: an error (EMFILE) leaves none, not half of one */
		WaitEventSet *set = billing_create_wait_event_set(2);

		PG_TRY();
		{
			AddWaitEventToSet(set, events, ctx->fd, NULL, NULL);
			AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
		}
		PG_CATCH();
		{
			FreeWaitEventSet(set);
			PG_RE_THROW();
		}
		PG_END_TRY();
		wait_set = set;
		wait_set_events = events;
	}
	else if (events != wait_set_events)
	{
		ModifyWaitEvent(wait_set, 0, events, NULL);
		wait_set_events = events;
	}
	if (WaitEventSetWait(wait_set, timeout_ms, &occurred, 1, PG_WAIT_EXTENSION) == 0)
		return 0;
	return occurred.events & WL_SOCKET_MASK;
}

/*
 * Wait until the socket is ready for `events` or a slice passes; false
 * (connection closed) at the deadline or when the hook says so.
 */
static bool
wait_socket(int events, TimestampTz deadline, const char *doing)
{
	int			left = remaining_ms(deadline);
	int			stall_ms = Min(1000, billing_redis_command_timeout / 2);

	if (left <= 0)
	{
		redis_close("timeout %s %s: no complete reply within %d ms (Redis answered %d of %d commands)%s",
					doing, cmd_what,
					(int) ((GetCurrentTimestamp() - cmd_start) / 1000),
					cmd_received, cmd_sent, tls_note());
		return false;
	}
	(void) wait_connection(events, Min(left, REDIS_WAIT_SLICE_MS));
	CHECK_FOR_INTERRUPTS();
	if (wait_hook != NULL && !wait_hook())
	{
		redis_close(NULL);
		return false;
	}
	if (ctx == NULL)
		return false;			/* the hook closed it */

	/* a long wait shows in billing_sync_status(): not "connected" */
	if (!cmd_stalled &&
		TimestampDifferenceExceeds(cmd_start, GetCurrentTimestamp(), stall_ms))
	{
		cmd_stalled = true;
		set_connected(false);
		billing_sync_record_error("Redis at %s:%d stalls: %s %s for more than %d ms%s",
								  billing_redis_host, billing_redis_port,
								  doing, cmd_what, stall_ms, tls_note());
	}
	return true;
}

/* the password: billing.redis_password, or the first line of the file */
static bool
read_password(char *out, size_t outlen)
{
	int			fd;
	struct stat st;
	ssize_t		n;

	out[0] = '\0';
	if (billing_redis_password_file == NULL || billing_redis_password_file[0] == '\0')
	{
		if (billing_redis_password != NULL)
			strlcpy(out, billing_redis_password, outlen);
		return true;
	}
	if (billing_redis_password != NULL && billing_redis_password[0] != '\0')
	{
		redis_close("billing.redis_password and billing.redis_password_file are both set; set one");
		return false;
	}
	fd = open(billing_redis_password_file, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
	{
		redis_close("could not open billing.redis_password_file \"%s\": %m",
					billing_redis_password_file);
		return false;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
	{
		close(fd);
		redis_close("billing.redis_password_file \"%s\" is not a regular file",
					billing_redis_password_file);
		return false;
	}
	if (st.st_uid != geteuid() || (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
	{
		close(fd);
		redis_close("billing.redis_password_file \"%s\" must be owned by the database server's OS user and readable by it only (chmod 600)",
					billing_redis_password_file);
		return false;
	}
	n = read(fd, out, outlen - 1);
	close(fd);
	if (n < 0)
	{
		redis_close("could not read billing.redis_password_file \"%s\": %m",
					billing_redis_password_file);
		return false;
	}
	out[n] = '\0';
	out[strcspn(out, "\r\n")] = '\0';	/* the first line */
	return true;
}

#ifdef BILLING_REDIS_TLS
static void
tls_error(const char *what)
{
	unsigned long e = ERR_get_error();
	char		buf[128];

	ERR_error_string_n(e, buf, sizeof(buf));
	ERR_clear_error();
	redis_close("TLS: %s: %s", what, e ? buf : "failed");
}

/*
 * TLS on the connected socket: our own SSL object (host name verification,
 * TLS 1.2 or later), handed to hiredis.
 */
static bool
tls_start(void)
{
	static bool initialized = false;
	SSL_CTX    *sctx;
	SSL		   *ssl;
	const char *name = billing_redis_tls_server_name[0] ? billing_redis_tls_server_name : billing_redis_host;

	if (!initialized)
	{
		redisInitOpenSSL();
		initialized = true;
	}
	sctx = SSL_CTX_new(TLS_client_method());
	if (sctx == NULL)
	{
		tls_error("creating the context");
		return false;
	}
	(void) SSL_CTX_set_min_proto_version(sctx, TLS1_2_VERSION);
	if (billing_redis_tls_ca_file[0] != '\0'
		? SSL_CTX_load_verify_locations(sctx, billing_redis_tls_ca_file, NULL) != 1
		: SSL_CTX_set_default_verify_paths(sctx) != 1)
	{
		SSL_CTX_free(sctx);
		tls_error("loading billing.redis_tls_ca_file");
		return false;
	}
	if (billing_redis_tls_cert_file[0] != '\0' &&
		(SSL_CTX_use_certificate_chain_file(sctx, billing_redis_tls_cert_file) != 1 ||
		 SSL_CTX_use_PrivateKey_file(sctx,
									 billing_redis_tls_key_file[0] ? billing_redis_tls_key_file : billing_redis_tls_cert_file,
									 SSL_FILETYPE_PEM) != 1 ||
		 SSL_CTX_check_private_key(sctx) != 1))
	{
		SSL_CTX_free(sctx);
		tls_error("loading billing.redis_tls_cert_file / billing.redis_tls_key_file");
		return false;
	}
	SSL_CTX_set_verify(sctx, SSL_VERIFY_PEER, NULL);
	ssl = SSL_new(sctx);
	SSL_CTX_free(sctx);			/* the SSL object holds a reference */
	if (ssl == NULL)
	{
		tls_error("creating the connection");
		return false;
	}
	/* the certificate must name the server: an IP address or a DNS name */
	{
		X509_VERIFY_PARAM *param = SSL_get0_param(ssl);

		if (X509_VERIFY_PARAM_set1_ip_asc(param, name) != 1)
		{
			ERR_clear_error();
			if (SSL_set1_host(ssl, name) != 1 ||
				SSL_set_tlsext_host_name(ssl, name) != 1)
			{
				SSL_free(ssl);
				tls_error("setting the server name");
				return false;
			}
		}
	}
	/*
	 * hiredis starts the handshake (non-blocking) and owns the SSL object
	 * from now on; the handshake completes within the first command's
	 * deadline.  We keep a pointer to say why a certificate was refused.
	 */
	if (redisInitiateSSL(ctx, ssl) != REDIS_OK)
	{
		SSL_free(ssl);
		close_with_context_error("starting TLS for");
		return false;
	}
	tls_ssl = ssl;
	return true;
}
#endif

/*
 * Connect (non-blocking, under billing.redis_connect_timeout), TLS when
 * asked for, AUTH, SELECT.  False after closing and recording why.
 */
bool
redis_open(void)
{
	TimestampTz deadline;
	char		password[1024];
	int			soerr = 0;
	socklen_t	soerrlen = sizeof(soerr);

	if (ctx != NULL)
		return true;
	cmd_what = "connect";
	if (billing_redis_tls && !redis_tls_built())
	{
		redis_close("billing.redis_tls is on, but %s: the worker does not connect in plain text instead",
					redis_tls_support());
		return false;
	}
	if (!read_password(password, sizeof(password)))
		return false;

	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
										   billing_redis_connect_timeout);
	cmd_start = GetCurrentTimestamp();
	cmd_sent = cmd_received = 0;
	uncounted = false;
	{
#if HIREDIS_MAJOR >= 1
		redisOptions options = {0};

		REDIS_OPTIONS_SET_TCP(&options, billing_redis_host, billing_redis_port);
		options.options = REDIS_OPT_NONBLOCK | REDIS_OPT_NO_PUSH_AUTOFREE;
		ctx = redisConnectWithOptions(&options);
#else
		ctx = redisConnectNonBlock(billing_redis_host, billing_redis_port);
#endif
	}
	if (ctx == NULL)
	{
		explicit_bzero(password, sizeof(password));
		redis_close("connecting to Redis at %s:%d: out of memory",
					billing_redis_host, billing_redis_port);
		return false;
	}
	if (ctx->err)
	{
		explicit_bzero(password, sizeof(password));
		close_with_context_error("connecting for");
		return false;
	}
	/* our reply objects from now on (nothing was read yet) */
	ctx->reader->fn = &reply_functions;
#if HIREDIS_MAJOR >= 1
	redisSetPushCallback(ctx, NULL);	/* a push reply is a surprise too */
#endif

	/* the non-blocking connect completes when the socket is writable */
	for (;;)
	{
		int			rc = wait_connection(WL_SOCKET_WRITEABLE,
										 Min(Max(remaining_ms(deadline), 1), REDIS_WAIT_SLICE_MS));

		CHECK_FOR_INTERRUPTS();
		if (wait_hook != NULL && !wait_hook())
		{
			explicit_bzero(password, sizeof(password));
			redis_close(NULL);
			return false;
		}
		if (ctx == NULL)
			return false;
		if (rc & WL_SOCKET_WRITEABLE)
			break;
		if (remaining_ms(deadline) <= 0)
		{
			explicit_bzero(password, sizeof(password));
			redis_close("connecting to Redis at %s:%d: timeout after %d ms",
						billing_redis_host, billing_redis_port, billing_redis_connect_timeout);
			return false;
		}
	}
	if (getsockopt(ctx->fd, SOL_SOCKET, SO_ERROR, &soerr, &soerrlen) != 0 || soerr != 0)
	{
		explicit_bzero(password, sizeof(password));
		errno = soerr;
		redis_close("connecting to Redis at %s:%d: %m", billing_redis_host, billing_redis_port);
		return false;
	}
	(void) redisEnableKeepAlive(ctx);

#ifdef BILLING_REDIS_TLS
	if (billing_redis_tls && !tls_start())
	{
		explicit_bzero(password, sizeof(password));
		return false;
	}
#endif

	/* AUTH [user] password, SELECT db: one pipeline */
	{
		StringInfoData buf;
		int			n = 0;
		bool		auth = password[0] != '\0' ||
			(billing_redis_user != NULL && billing_redis_user[0] != '\0');

		initStringInfo(&buf);
		if (auth && billing_redis_user != NULL && billing_redis_user[0] != '\0')
		{
			const char *argv[] = {"AUTH", billing_redis_user, password};

			resp_command(&buf, 3, argv, NULL);
			n++;
		}
		else if (auth)
		{
			const char *argv[] = {"AUTH", password};

			resp_command(&buf, 2, argv, NULL);
			n++;
		}
		explicit_bzero(password, sizeof(password));
		if (billing_redis_db != 0)
		{
			char		db[16];
			const char *argv[] = {"SELECT", db};

			snprintf(db, sizeof(db), "%d", billing_redis_db);
			resp_command(&buf, 2, argv, NULL);
			n++;
		}
		if (n > 0)
		{
			redis_begin(auth ? "AUTH" : "SELECT");
			if (!redis_send(&buf, n))
			{
				explicit_bzero(buf.data, buf.maxlen);
				pfree(buf.data);
				return false;
			}
		}
		explicit_bzero(buf.data, buf.maxlen);
		pfree(buf.data);
		for (int i = 0; i < n; i++)
		{
			redisReply *r = redis_receive();
			const char *what = (auth && i == 0) ? "AUTH" : "SELECT";

			if (r == NULL)
				return false;
			if (r->type != REDIS_REPLY_STATUS)
				return redis_unexpected(r, what);
			redis_free(r);
		}
	}
	return true;
}

/* ---------------------------------------------------------------------
 * commands
 * ---------------------------------------------------------------------
 */

/* Start a command or pipeline: its deadline starts now. */
void
redis_begin(const char *what)
{
	cmd_what = what;
	cmd_start = GetCurrentTimestamp();
	cmd_sent = 0;
	cmd_received = 0;
	reply_used = 0;
	uncounted = false;
}

static TimestampTz
cmd_deadline(void)
{
	return cmd_start + (TimestampTz) billing_redis_command_timeout * 1000 +
		(TimestampTz) cmd_sent * REDIS_US_PER_COMMAND;
}

/*
 * Write what hiredis holds, as far as the socket takes it; with `all`,
 * wait until everything is written (or the output is back under a few
 * megabytes: Redis reads while it answers).
 */
#define OUTPUT_HIGH_WATER (4 * 1024 * 1024)

static bool
flush_output(bool all)
{
	bool		writable_useless = false;

	for (;;)
	{
		size_t		before = sdslen(ctx->obuf);
		int			done = 0;

		if (before == 0)
			return true;
		if (redisBufferWrite(ctx, &done) != REDIS_OK)
		{
			close_with_context_error("sending");
			return false;
		}
		if (done)
			return true;
		if (!all && sdslen(ctx->obuf) < OUTPUT_HIGH_WATER)
			return true;
		/*
		 * TLS may want to read before it can write (a renegotiation, a key
		 * update): then wait until the socket is readable, or this would
		 * spin.  Otherwise (plain TCP, or TLS whose write found the socket
		 * full) wait until it is writable, not readable: a server that
		 * answered a little and stopped reading would make that a spin.
		 */
#ifdef BILLING_REDIS_TLS
		writable_useless = tls_ssl != NULL && sdslen(ctx->obuf) == before &&
			SSL_want_read(tls_ssl);
#else
		(void) before;
#endif
		if (!wait_socket(writable_useless ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE,
						 cmd_deadline(), "sending"))
			return false;
	}
}

/*
 * Queue the commands written into buf (then empty it), and send what the
 * socket takes.  False: the connection is closed.
 */
bool
redis_send(StringInfo buf, int ncommands)
{
	if (ctx == NULL)
		return false;
	if (buf->len > 0 &&
		redisAppendFormattedCommand(ctx, buf->data, buf->len) != REDIS_OK)
	{
		close_with_context_error("queueing");
		return false;
	}
	resetStringInfo(buf);
	cmd_sent += ncommands;
	/* a chunk of a pipeline: its commands are counted with the last one */
	uncounted = ncommands == 0;
	return flush_output(false);
}

static size_t
unread_bytes(void)
{
	return ctx->reader->len - ctx->reader->pos;
}

/*
 * Were commands sent (or queued, or a chunk of a pipeline handed over)
 * whose replies were not read yet?  Then the connection is out of step:
 * after an error, close it.
 */
bool
redis_replies_owed(void)
{
	return ctx != NULL &&
		(cmd_received < cmd_sent || uncounted || sdslen(ctx->obuf) > 0);
}

/*
 * The next reply (the caller frees it with redis_free), or NULL: the
 * connection is closed (transport error, deadline, a reply beyond the
 * limits or malformed).
 */
redisReply *
redis_receive(void)
{
	for (;;)
	{
		void	   *reply = NULL;
		size_t		before;

		if (ctx == NULL)
			return NULL;
		reply_refusal[0] = '\0';
		if (redisGetReplyFromReader(ctx, &reply) != REDIS_OK)
		{
			close_with_context_error("reading the reply to");
			return NULL;
		}
		if (reply != NULL)
		{
			reply_used = 0;
			cmd_received++;
			if (cmd_stalled && cmd_received >= cmd_sent)
			{
				cmd_stalled = false;
				set_connected(true);
			}
			remember(reply);
			return reply;
		}
		if (unread_bytes() > max_reply_bytes())
		{
			redis_close("reading the reply to %s: reply larger than billing.redis_max_reply_size (%d kB)",
						cmd_what, billing_redis_max_reply_size);
			return NULL;
		}
		if (!flush_output(true))
			return NULL;
		before = unread_bytes();
		if (redisBufferRead(ctx) != REDIS_OK)
		{
			close_with_context_error("reading the reply to");
			return NULL;
		}
		if (unread_bytes() != before)
		{
			/*
			 * More may be buffered (TLS): read again.  A server that keeps
			 * the socket full never lets us wait: signals and SIGTERM are
			 * checked here too.  The deadline is not: a reply that keeps
			 * coming ends at billing.redis_max_reply_size (or the limits
			 * on elements and depth) instead, whatever the machine's speed.
			 */
			CHECK_FOR_INTERRUPTS();
			if (wait_hook != NULL && !wait_hook())
			{
				redis_close(NULL);
				return NULL;
			}
			continue;
		}
		if (!wait_socket(WL_SOCKET_READABLE, cmd_deadline(), "waiting for the reply to"))
			return NULL;
	}
}

/* One command and its reply (NULL: the connection is closed). */
redisReply *
redis_command(const char *what, int argc, const char *const *argv,
			  const size_t *lens)
{
	StringInfoData buf;
	bool		ok;

	if (ctx == NULL)
		return NULL;
	initStringInfo(&buf);
	resp_command(&buf, argc, argv, lens);
	redis_begin(what);
	ok = redis_send(&buf, 1);
	pfree(buf.data);
	return ok ? redis_receive() : NULL;
}
