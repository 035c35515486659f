/*-------------------------------------------------------------------------
 *
 * logwindow.h
 *	  A bounded run of log lines about failures that may repeat for many
 *	  tenants (a Redis that refuses every tenant's key): at most `max`
 *	  lines in a window of `window_ms`, then, once that window has ended,
 *	  one line that counts the failures not logged.  The worker's pushes
 *	  (worker.c) and its delivery of events (outbox.c) use one each.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_LOGWINDOW_H
#define BILLING_LOGWINDOW_H

#include "datatype/timestamp.h"

typedef struct LogWindow
{
	/* the counting line: "<prefix> N more <noun> since <time>" */
	const char *prefix;
	const char *noun;
	const char *hint;			/* where the latest failure is shown */
	int			max;			/* lines per window */
	int			window_ms;
	/* state */
	TimestampTz from;			/* the window's start */
	int			logged;
	int64		unlogged;
} LogWindow;

#define LOG_WINDOW_INIT(prefix, noun, hint, max, window_ms) \
	{(prefix), (noun), (hint), (max), (window_ms), 0, 0, 0}

/* one more failure: true when it is to be logged (the caller logs it) */
extern bool log_window_take(LogWindow *w);

/* log the count of a window that has ended, if there is one to log */
extern void log_window_flush(LogWindow *w, TimestampTz now);

#endif							/* BILLING_LOGWINDOW_H */
