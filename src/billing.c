/*-------------------------------------------------------------------------
 *
 * billing.c
 *	  Module entry point of the billing extension.
 *
 * The SQL-callable functions live in one file per concern (input.c,
 * ledger.c, append_only.c).  Loading the library needs no
 * shared_preload_libraries; only the background worker (added separately)
 * needs preloading.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
	/* no settings yet: reserve our prefix so typos in billing.* are caught */
	MarkGUCPrefixReserved("billing");
}
