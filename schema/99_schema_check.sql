/*
 * 99_schema_check: the API's schema and the calls other roles make to it.
 *
 * Nothing the extension runs as its owner finds a function in the API's
 * schema by name (see docs/security.md), but the calls of the roles that
 * use the API do: whoever may create functions in that schema can add one
 * with an API function's name and a closer argument type (integer where
 * the API takes numeric, text where it takes regrole), which then wins
 * such a call and runs with the caller's rights, a superuser's or the
 * treasury role's.  On PostgreSQL 15 and later the owner of a database
 * owns its schema public.  Say so when roles other than superusers may
 * create objects there.
 */
DO $$
DECLARE
    api   oid := (SELECT e.extnamespace FROM pg_catalog.pg_extension e
                   WHERE e.extname OPERATOR(pg_catalog.=) 'billing');
    n     bigint;
    names text[];
BEGIN
    SELECT pg_catalog.count(*), (pg_catalog.array_agg(pg_catalog.quote_ident(r.rolname) ORDER BY r.rolname))[1:5]
      INTO n, names
      FROM pg_catalog.pg_roles r
     WHERE NOT r.rolsuper
       AND NOT pg_catalog.starts_with(r.rolname, 'pg_')
       AND pg_catalog.has_schema_privilege(r.oid, api, 'CREATE');
    IF n OPERATOR(pg_catalog.>) 0 THEN
        RAISE WARNING 'billing: roles that are not superusers may create functions in schema %, where the API is',
                      pg_catalog.quote_ident((SELECT s.nspname FROM pg_catalog.pg_namespace s WHERE s.oid OPERATOR(pg_catalog.=) api))
            USING DETAIL = pg_catalog.format('%s role(s): %s%s. A function one of them creates there with the name of an API function and a closer argument type runs instead of it when another role calls it by name, with that role''s rights.',
                                             n, pg_catalog.array_to_string(names, ', '),
                                             CASE WHEN n OPERATOR(pg_catalog.>) 5 THEN ', ...' ELSE '' END),
                  HINT = 'Create the extension in a schema only superusers may create objects in (CREATE SCHEMA billing_api; CREATE EXTENSION billing SCHEMA billing_api), and let the roles that call it put that schema first in their search_path or call it schema-qualified (docs/security.md, "The schema of the API").';
    END IF;
END
$$;
