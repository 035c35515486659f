--
-- 001_install: install the extension and pin down its public surface.
--
-- Every later file runs in this same database, creates its own tenants
-- (with a file-specific prefix) and relies on the helper regress_error()
-- defined at the end of this file.
--
\set VERBOSITY default
\set SHOW_CONTEXT never

CREATE EXTENSION billing;

SELECT extname, extversion, extnamespace::regnamespace AS schema, extrelocatable
  FROM pg_extension WHERE extname = 'billing';

-- Every object that belongs to the extension.  A new, renamed or dropped
-- function, table, view, type or sequence shows up as a diff here.  From
-- PostgreSQL 17 on, pg_depend also lists the row type of every table and
-- view and every array type as members; they follow from their table or
-- type and are left out, so that every version shows the same list.
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS object
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'billing')
   AND d.deptype = 'e'
   AND NOT EXISTS (SELECT FROM pg_type t
                    WHERE d.classid = 'pg_type'::regclass AND t.oid = d.objid
                      AND (EXISTS (SELECT FROM pg_type e WHERE e.typarray = t.oid)
                           OR EXISTS (SELECT FROM pg_class c
                                       WHERE c.oid = t.typrelid AND c.relkind <> 'c')))
 ORDER BY 1;

-- The SQL API: argument names, defaults and result types of the billing_*
-- functions, and how they run.  The writers are SECURITY DEFINER with a
-- pinned search_path; nothing is executable by PUBLIC.
SELECT p.proname,
       pg_get_function_arguments(p.oid) AS arguments,
       pg_get_function_result(p.oid) AS result
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace
   AND p.proname LIKE 'billing\_%'
 ORDER BY p.proname, arguments;

SELECT p.oid::regprocedure AS function,
       l.lanname AS language,
       p.provolatile AS volatility,
       p.proisstrict AS strict,
       p.prosecdef AS security_definer,
       p.proconfig AS config,
       EXISTS (SELECT FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS public_execute
  FROM pg_proc p
  JOIN pg_language l ON l.oid = p.prolang
 WHERE (p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'billing\_%')
    OR p.pronamespace = 'billing'::regnamespace
 ORDER BY p.pronamespace::regnamespace::text, p.proname;

-- Tables, views and result types in schema billing, with their columns.
SELECT c.relname,
       CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view'
                      WHEN 'c' THEN 'type' WHEN 'S' THEN 'sequence'
                      ELSE c.relkind::text END AS kind,
       string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                  || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END,
                  ', ' ORDER BY a.attnum) AS columns
  FROM pg_class c
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                          AND c.relkind <> 'S'
 WHERE c.relnamespace = 'billing'::regnamespace
   AND c.relkind IN ('r', 'v', 'c', 'S')
 GROUP BY c.relname, c.relkind
 ORDER BY kind, c.relname;

-- Constraints and triggers of the tables (append-only enforcement).  NOT
-- NULL constraints are the columns' (PostgreSQL 18 also lists them here).
SELECT conrelid::regclass AS "table", conname, pg_get_constraintdef(oid) AS definition
  FROM pg_constraint
 WHERE connamespace = 'billing'::regnamespace AND contype <> 'n'
 ORDER BY conrelid::regclass::text, conname;

SELECT tgrelid::regclass AS "table", tgname, tgenabled,
       pg_get_triggerdef(oid) ~ 'FOR EACH STATEMENT' AS per_statement,
       array_to_string(ARRAY[CASE WHEN tgtype & 8 <> 0 THEN 'DELETE' END,
                             CASE WHEN tgtype & 16 <> 0 THEN 'UPDATE' END,
                             CASE WHEN tgtype & 32 <> 0 THEN 'TRUNCATE' END], ' ') AS events
  FROM pg_trigger
 WHERE tgrelid::regclass::text LIKE 'billing.%' AND NOT tgisinternal
 ORDER BY tgrelid::regclass::text, tgname;

-- The extension's tables are dumped by pg_dump (their data is the ledger),
-- all of it (no condition).
SELECT c::regclass AS dumped_table, e.extcondition[i] AS condition
  FROM pg_extension e, unnest(e.extconfig) WITH ORDINALITY AS x(c, i)
 WHERE e.extname = 'billing'
 ORDER BY c::regclass::text;

--
-- Test helper for the later files: run a statement and show its SQLSTATE,
-- message, detail and hint (or 'ok').  Timestamps in hints are masked, and
-- so are timestamps in details that follow the word "at" (the reset time
-- of a quota, the expiry time of a hold: they depend on the clock); the
-- rest is shown verbatim, so the timestamps a caller passed in (event_at
-- in a trace id conflict, a price's effective_from) stay visible.  The EXECUTE runs in a subtransaction, as an
-- erroring statement would in a client's transaction: a later query shows
-- that nothing of it remains.  The statement runs with the caller's
-- search_path; the helper's own expressions name pg_catalog explicitly, so
-- that the hostile search_path of 080_privileges cannot garble its report.
--
CREATE FUNCTION regress_mask_at(t text) RETURNS text
    LANGUAGE sql IMMUTABLE
AS $$
    SELECT pg_catalog.regexp_replace(t,
               '\m(at) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?([+-]\d\d(:\d\d)?)?'
               '|[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d(\.\d+)? \d{4}( [A-Z]{3,5})?)',
               '\1 <timestamp>', 'g')
$$;
GRANT EXECUTE ON FUNCTION regress_mask_at(text) TO PUBLIC;

CREATE FUNCTION regress_error(sql text) RETURNS text
    LANGUAGE plpgsql
AS $$
DECLARE
    st  text;
    msg text;
    det text;
    hnt text;
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    -- ISO ("2024-05-01 10:00:00+00") and Postgres ("Wed May 01 03:00:00 2024 PDT")
    hnt := pg_catalog.regexp_replace(hnt,
               '\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?([+-]\d\d(:\d\d)?)?', '<timestamp>', 'g');
    hnt := pg_catalog.regexp_replace(hnt,
               '[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d(\.\d+)? \d{4}( [A-Z]{3,5})?', '<timestamp>', 'g');
    det := public.regress_mask_at(det);
    RETURN pg_catalog.concat(st, ': ', msg,
        CASE WHEN det OPERATOR(pg_catalog.<>) '' THEN pg_catalog.concat(E'\nDETAIL: ', det) END,
        CASE WHEN hnt OPERATOR(pg_catalog.<>) '' THEN pg_catalog.concat(E'\nHINT: ', hnt) END);
END;
$$;
GRANT EXECUTE ON FUNCTION regress_error(text) TO PUBLIC;

SELECT regress_error('SELECT 1');
SELECT regress_error('SELECT 1/0');
-- detail and hint on lines of their own, timestamps in the hint masked
SELECT regress_error($q$DO $do$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = 'ZB999',
        DETAIL = 'd', HINT = 'at 2024-05-01 10:00:00.123+00 and Wed May 01 03:00:00.5 2024 PDT'; END $do$$q$);
-- in a detail only the timestamps after "at" are masked (regress_mask_at()
-- does the same for details read from a column)
SELECT regress_error($q$DO $do$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = 'ZB999',
        DETAIL = 'resets at 2024-05-01 10:00:00+00; expired at Wed May 01 03:00:00.5 2024 PDT; original 2024-05-01 10:00:00+00.'; END $do$$q$);
