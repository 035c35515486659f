/*-------------------------------------------------------------------------
 *
 * logwindow.c
 *	  Bounded runs of log lines (see logwindow.h).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "logwindow.h"
#include "utils/timestamp.h"

/* a new window once the last one ended (a clock set back starts one too) */
static void
roll(LogWindow *w, TimestampTz now)
{
	if (now >= w->from && now < TimestampTzPlusMilliseconds(w->from, w->window_ms))
		return;
	if (w->unlogged > 0)
		ereport(LOG,
				(errmsg("%s " INT64_FORMAT " more %s since %s",
						w->prefix, w->unlogged, w->noun, timestamptz_to_str(w->from)),
				 errdetail("At most %d such failures are logged one by one in a window of %d s.",
						   w->max, w->window_ms / 1000),
				 errhint("%s", w->hint)));
	w->from = now;
	w->logged = 0;
	w->unlogged = 0;
}

bool
log_window_take(LogWindow *w)
{
	roll(w, GetCurrentTimestamp());
	if (w->logged >= w->max)
	{
		w->unlogged++;
		return false;
	}
	w->logged++;
	return true;
}

void
log_window_flush(LogWindow *w, TimestampTz now)
{
	if (w->unlogged > 0)
		roll(w, now);
}
