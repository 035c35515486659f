/* updates/billing--1.3--1.4.sql: upgrade from 1.3 to 1.4 (see CHANGELOG.md) */

\echo Use "ALTER EXTENSION billing UPDATE TO '1.4'" to load this file. \quit

/*
 * Run as the extension's owner, whoever runs ALTER EXTENSION UPDATE (another
 * superuser, say): what this script creates must belong to the owner, and
 * its grants and revokes be the owner's, exactly as in a fresh install.  The
 * caller's role comes back at the end of the script.
 */
SELECT pg_catalog.set_config('billing_upgrade.caller', current_user, true);
DO $$
BEGIN
    EXECUTE pg_catalog.format('SET LOCAL ROLE %I',
        (SELECT r.rolname FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_roles r ON r.oid = e.extowner WHERE e.extname = 'billing'));
END
$$;

-- ---------------------------------------------------------------------------
-- (1.4's changes follow, by area)
-- ---------------------------------------------------------------------------

-- always last: back to the caller's role
DO $$
BEGIN
    EXECUTE pg_catalog.format('SET LOCAL ROLE %I', pg_catalog.current_setting('billing_upgrade.caller'));
END
$$;
