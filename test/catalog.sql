-- test/catalog.sql: the definition of every object of the billing extension,
-- one line per fact, in a stable order, so that two databases can be
-- compared with diff (an upgraded one against a fresh install).
--
-- Covered: every extension member (schema, tables, sequences, views, types,
-- functions, event triggers, ...) and what hangs off a member table without
-- being a member itself: columns, constraints, indexes, triggers, policies,
-- row-level security flags, comments, privileges, ownership, the tables whose
-- data pg_dump keeps (pg_extension_config_dump).  Privileges are the
-- extension's own (pg_init_privs: what its scripts granted and revoked), not
-- what was granted to users later.  Role names in privileges are shown as
-- <owner> for the extension's owner; OIDs never appear.
WITH ext AS (
    SELECT e.oid, e.extowner, e.extconfig, e.extcondition
      FROM pg_catalog.pg_extension e WHERE e.extname = 'billing'
), members AS (
    SELECT d.classid, d.objid
      FROM pg_catalog.pg_depend d, ext
     WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
       AND d.refobjid = ext.oid AND d.deptype = 'e'
), rels AS (
    SELECT c.oid, c.relname, c.relkind
      FROM pg_catalog.pg_class c
      JOIN members m ON m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND m.objid = c.oid
), owner AS (
    SELECT r.rolname FROM pg_catalog.pg_roles r, ext WHERE r.oid = ext.extowner
), init AS (
    SELECT ip.classoid, ip.objoid, ip.objsubid, ip.initprivs::text AS acl
      FROM pg_catalog.pg_init_privs ip WHERE ip.privtype = 'e'
), facts(line) AS (
    -- every member, with its owner (the extension's, or another role)
    SELECT format('member %s owner %s', pg_catalog.pg_describe_object(m.classid, m.objid, 0),
                  CASE WHEN o.owner IS NULL THEN '-' WHEN o.owner = ext.extowner THEN '<owner>'
                       ELSE 'OTHER:' || o.owner::pg_catalog.regrole::text END)
      FROM members m, ext,
           LATERAL (SELECT c.relowner FROM pg_catalog.pg_class c
                     WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND c.oid = m.objid
                    UNION ALL
                    SELECT p.proowner FROM pg_catalog.pg_proc p
                     WHERE m.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = m.objid
                    UNION ALL
                    SELECT t.typowner FROM pg_catalog.pg_type t
                     WHERE m.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND t.oid = m.objid
                    UNION ALL
                    SELECT n.nspowner FROM pg_catalog.pg_namespace n
                     WHERE m.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND n.oid = m.objid
                    UNION ALL
                    SELECT et.evtowner FROM pg_catalog.pg_event_trigger et
                     WHERE m.classid = 'pg_catalog.pg_event_trigger'::pg_catalog.regclass AND et.oid = m.objid
                    UNION ALL
                    SELECT NULL::oid WHERE m.classid NOT IN ('pg_catalog.pg_class'::pg_catalog.regclass,
                                                             'pg_catalog.pg_proc'::pg_catalog.regclass,
                                                             'pg_catalog.pg_type'::pg_catalog.regclass,
                                                             'pg_catalog.pg_namespace'::pg_catalog.regclass,
                                                             'pg_catalog.pg_event_trigger'::pg_catalog.regclass)
                   ) AS o(owner)
    UNION ALL
    -- functions: the whole definition, privileges and comment
    SELECT format('function %s: %s', p.oid::pg_catalog.regprocedure,
                  pg_catalog.replace(pg_catalog.pg_get_functiondef(p.oid), E'\n', E'\n    '))
      FROM pg_catalog.pg_proc p JOIN members m ON m.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND m.objid = p.oid
     WHERE p.prokind <> 'a'
    UNION ALL
    SELECT format('function %s acl %s', p.oid::pg_catalog.regprocedure, i.acl)
      FROM pg_catalog.pg_proc p JOIN members m ON m.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND m.objid = p.oid
      LEFT JOIN init i ON i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid AND i.objsubid = 0
    UNION ALL
    -- relations: kind, options, row security, privileges
    SELECT format('relation %s kind %s options %s rls %s/%s acl %s', r.oid::pg_catalog.regclass, r.relkind,
                  c.reloptions::text, c.relrowsecurity, c.relforcerowsecurity, i.acl)
      FROM rels r JOIN pg_catalog.pg_class c ON c.oid = r.oid
      LEFT JOIN init i ON i.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass AND i.objoid = r.oid AND i.objsubid = 0
    UNION ALL
    -- columns in order: name, type, not null, default, collation, identity
    SELECT format('column %s.%s #%s %s%s%s%s', r.oid::pg_catalog.regclass, a.attname,
                  pg_catalog.row_number() OVER (PARTITION BY r.oid ORDER BY a.attnum),
                  pg_catalog.format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attnotnull THEN ' not null' ELSE '' END,
                  CASE WHEN ad.adbin IS NOT NULL THEN ' default ' || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid) ELSE '' END,
                  CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                       THEN ' collate ' || a.attcollation::pg_catalog.regcollation::text ELSE '' END
                  || CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END
                  || CASE WHEN i.acl IS NOT NULL THEN ' acl ' || i.acl ELSE '' END)
      FROM rels r
      JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
      LEFT JOIN init i ON i.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass AND i.objoid = r.oid AND i.objsubid = a.attnum
     WHERE r.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
    UNION ALL
    -- composite types that are members (their pg_class row is not)
    SELECT format('type %s: %s', t.oid::pg_catalog.regtype,
                  CASE t.typtype
                      WHEN 'c' THEN (SELECT pg_catalog.string_agg(a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
                                       FROM pg_catalog.pg_attribute a
                                      WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped)
                      WHEN 'e' THEN (SELECT pg_catalog.string_agg(e.enumlabel::text, ', ' ORDER BY e.enumsortorder)
                                       FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid)
                      WHEN 'd' THEN pg_catalog.format_type(t.typbasetype, t.typtypmod)
                      ELSE t.typtype::text
                  END)
      FROM pg_catalog.pg_type t JOIN members m ON m.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND m.objid = t.oid
    UNION ALL
    SELECT format('type %s acl %s', t.oid::pg_catalog.regtype, i.acl)
      FROM pg_catalog.pg_type t JOIN members m ON m.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND m.objid = t.oid
      LEFT JOIN init i ON i.classoid = 'pg_catalog.pg_type'::pg_catalog.regclass AND i.objoid = t.oid AND i.objsubid = 0
    UNION ALL
    -- constraints (NOT NULL ones are columns' "not null" above, on every version)
    SELECT format('constraint %s.%s: %s%s', r.oid::pg_catalog.regclass, co.conname,
                  pg_catalog.pg_get_constraintdef(co.oid),
                  CASE WHEN co.condeferrable THEN ' deferrable' ELSE '' END)
      FROM rels r JOIN pg_catalog.pg_constraint co ON co.conrelid = r.oid
     WHERE co.contype <> 'n'
    UNION ALL
    -- indexes (those of constraints too: their definition shows the method)
    SELECT format('index %s', pg_catalog.pg_get_indexdef(i.indexrelid))
      FROM rels r JOIN pg_catalog.pg_index i ON i.indrelid = r.oid
    UNION ALL
    -- triggers, with their enabled state (O, A, R, D)
    SELECT format('trigger %s enabled %s: %s', tg.tgname, tg.tgenabled, pg_catalog.pg_get_triggerdef(tg.oid))
      FROM rels r JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = r.oid AND NOT tg.tgisinternal
    UNION ALL
    -- row-level security policies
    SELECT format('policy %s.%s: %s %s to %s using (%s) with check (%s)', r.oid::pg_catalog.regclass, po.polname,
                  CASE WHEN po.polpermissive THEN 'permissive' ELSE 'restrictive' END, po.polcmd,
                  (SELECT pg_catalog.string_agg(CASE WHEN x = 0 THEN 'public' ELSE x::pg_catalog.regrole::text END, ',' ORDER BY 1)
                     FROM pg_catalog.unnest(po.polroles) x),
                  pg_catalog.pg_get_expr(po.polqual, po.polrelid), pg_catalog.pg_get_expr(po.polwithcheck, po.polrelid))
      FROM rels r JOIN pg_catalog.pg_policy po ON po.polrelid = r.oid
    UNION ALL
    -- views: the query
    SELECT format('view %s: %s', r.oid::pg_catalog.regclass,
                  pg_catalog.replace(pg_catalog.pg_get_viewdef(r.oid, true), E'\n', E'\n    '))
      FROM rels r WHERE r.relkind IN ('v', 'm')
    UNION ALL
    -- sequences: parameters and owning column
    SELECT format('sequence %s: %s start %s increment %s min %s max %s cache %s cycle %s owned by %s',
                  s.seqrelid::pg_catalog.regclass, pg_catalog.format_type(s.seqtypid, NULL), s.seqstart,
                  s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
                  (SELECT d.refobjid::pg_catalog.regclass || '.' || a.attname
                     FROM pg_catalog.pg_depend d
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = s.seqrelid
                      AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype = 'a'))
      FROM rels r JOIN pg_catalog.pg_sequence s ON s.seqrelid = r.oid
    UNION ALL
    -- event triggers
    SELECT format('event trigger %s on %s enabled %s tags %s function %s', et.evtname, et.evtevent,
                  et.evtenabled, et.evttags::text, et.evtfoid::pg_catalog.regprocedure)
      FROM pg_catalog.pg_event_trigger et
      JOIN members m ON m.classid = 'pg_catalog.pg_event_trigger'::pg_catalog.regclass AND m.objid = et.oid
    UNION ALL
    -- comments on members and on their columns
    SELECT format('comment on %s: %s',
                  pg_catalog.pg_describe_object(ds.classoid, ds.objoid, ds.objsubid), ds.description)
      FROM pg_catalog.pg_description ds
      JOIN members m ON m.classid = ds.classoid AND m.objid = ds.objoid
    UNION ALL
    -- what pg_dump keeps the data of
    SELECT format('config dump %s where %s', c::pg_catalog.regclass, coalesce(ext.extcondition[i], ''))
      FROM ext, pg_catalog.unnest(ext.extconfig) WITH ORDINALITY AS x(c, i)
    UNION ALL
    -- privileges on the schemas the extension created
    SELECT format('schema %s acl %s', n.nspname, i.acl)
      FROM pg_catalog.pg_namespace n
      JOIN members m ON m.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND m.objid = n.oid
      LEFT JOIN init i ON i.classoid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND i.objoid = n.oid AND i.objsubid = 0
)
SELECT x.line
  FROM (SELECT pg_catalog.regexp_replace(f.line, '(^|[{,=/])' || pg_catalog.quote_ident(o.rolname) || '(?=[=/,}])',
                                         '\1<owner>', 'g') AS line
          FROM facts f, owner o) AS x
 ORDER BY x.line COLLATE "C";
