/*-------------------------------------------------------------------------
 *
 * resp.h
 *	  Commands in Redis' protocol (RESP), written into a StringInfo with
 *	  explicit lengths: every argument is a length prefix and its bytes,
 *	  so any byte (a NUL, CR LF) is data, never syntax.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_RESP_H
#define BILLING_RESP_H

#include "lib/stringinfo.h"

/* "*<n>\r\n" (a command of n arguments) or "$<n>\r\n" (a string of n bytes) */
extern void resp_head(StringInfo buf, char kind, size_t n);

/* one argument: "$<len>\r\n<bytes>\r\n" */
extern void resp_bulk(StringInfo buf, const char *s, size_t len);

/* one NUL-terminated argument */
extern void resp_str(StringInfo buf, const char *s);

/* a whole command; lens may be NULL when every argument is a C string */
extern void resp_command(StringInfo buf, int argc, const char *const *argv,
						 const size_t *lens);

#endif							/* BILLING_RESP_H */
