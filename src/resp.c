/*-------------------------------------------------------------------------
 *
 * resp.c
 *	  Commands in Redis' protocol (RESP), written into a StringInfo.
 *
 * The worker writes whole pipelines this way (a batch of pushes is one
 * buffer, handed to the connection about a megabyte at a time, see
 * mirror.c): per argument a length prefix and the bytes, without hiredis'
 * printf-style formatting of every argument, which was a sixth of the
 * worker's time under load, and with the length always explicit, so that
 * data that came from Redis (a key name a SCAN returned) is sent back
 * byte for byte, whatever it contains.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "resp.h"
#include "utils/builtins.h"

void
resp_head(StringInfo buf, char kind, size_t n)
{
	char		digits[MAXINT8LEN + 1];

	appendStringInfoChar(buf, kind);
	appendBinaryStringInfo(buf, digits, pg_ulltoa_n((uint64) n, digits));
	appendBinaryStringInfo(buf, "\r\n", 2);
}

void
resp_bulk(StringInfo buf, const char *s, size_t len)
{
	char		digits[MAXINT8LEN + 1];
	int			ndigits = pg_ulltoa_n((uint64) len, digits);
	char	   *p;

	/* one enlargement and no appends: the worker writes ~35 of these a push */
	enlargeStringInfo(buf, 1 + ndigits + 2 + len + 2);
	p = buf->data + buf->len;
	*p++ = '$';
	memcpy(p, digits, ndigits);
	p += ndigits;
	*p++ = '\r';
	*p++ = '\n';
	memcpy(p, s, len);
	p += len;
	*p++ = '\r';
	*p++ = '\n';
	*p = '\0';
	buf->len = p - buf->data;
}

void
resp_str(StringInfo buf, const char *s)
{
	resp_bulk(buf, s, strlen(s));
}

void
resp_command(StringInfo buf, int argc, const char *const *argv,
			 const size_t *lens)
{
	resp_head(buf, '*', argc);
	for (int i = 0; i < argc; i++)
		resp_bulk(buf, argv[i], lens ? lens[i] : strlen(argv[i]));
}
