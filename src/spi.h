/*-------------------------------------------------------------------------
 *
 * spi.h
 *	  SPI helpers shared by the C files (spi.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef BILLING_SPI_H
#define BILLING_SPI_H

#include "executor/spi.h"

extern MemoryContext billing_spi_connect(void);
extern SPIPlanPtr billing_keep_plan(SPIPlanPtr *cache, const char *sql,
									int nargs, Oid *argtypes);
extern void billing_spi_exec(SPIPlanPtr plan, Datum *values, const char *nulls,
							 int expected, const char *what);
extern void billing_spi_read(SPIPlanPtr plan, Datum *values, const char *nulls,
							 const char *what);
extern Datum billing_col(int row, int colno, bool *isnull);
extern int64 billing_col_int64(int row, int colno, int64 if_null);
extern char *billing_col_cstring(int row, int colno, MemoryContext cxt);

#endif							/* BILLING_SPI_H */
