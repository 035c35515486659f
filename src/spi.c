/*-------------------------------------------------------------------------
 *
 * spi.c
 *	  SPI helpers shared by the C files: plans prepared once per backend,
 *	  checked execution, and column access to the current result.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "spi.h"
#include "utils/builtins.h"

SPIPlanPtr
billing_keep_plan(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

		if (plan == NULL)
			elog(ERROR, "billing: SPI_prepare failed: %s",
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "billing: SPI_keepplan failed");
		*cache = plan;
	}
	return *cache;
}

/*
 * SPI_connect, returning the caller's memory context: what must outlive
 * SPI_finish (result strings, returned tuples) is allocated there, since
 * SPI_finish deletes the context SPI_connect switched to.
 */
MemoryContext
billing_spi_connect(void)
{
	MemoryContext outer = CurrentMemoryContext;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "billing: SPI_connect failed");
	return outer;
}

/* run a kept plan read-write; any result but `expected` is an internal error */
void
billing_spi_exec(SPIPlanPtr plan, Datum *values, const char *nulls,
				 int expected, const char *what)
{
	int			ret = SPI_execute_plan(plan, values, nulls, false, 0);

	if (ret != expected)
		elog(ERROR, "billing: %s failed: %s", what, SPI_result_code_string(ret));
}

/* run a kept SELECT plan read-only: in the active snapshot, no new one */
void
billing_spi_read(SPIPlanPtr plan, Datum *values, const char *nulls,
				 const char *what)
{
	int			ret = SPI_execute_plan(plan, values, nulls, true, 0);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "billing: %s failed: %s", what, SPI_result_code_string(ret));
}

Datum
billing_col(int row, int colno, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc,
						 colno, isnull);
}

int64
billing_col_int64(int row, int colno, int64 if_null)
{
	bool		isnull;
	Datum		d = billing_col(row, colno, &isnull);

	return isnull ? if_null : DatumGetInt64(d);
}

/* a text column copied into context cxt, or NULL */
char *
billing_col_cstring(int row, int colno, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = billing_col(row, colno, &isnull);
	MemoryContext old;
	char	   *s;

	if (isnull)
		return NULL;
	old = MemoryContextSwitchTo(cxt);
	s = TextDatumGetCString(d);
	MemoryContextSwitchTo(old);
	return s;
}
