/* sql/cachekit--0.1.0--0.2.0.sql: from cachekit 0.1.0 to 0.2.0 */

\echo Use "ALTER EXTENSION cachekit UPDATE TO '0.2.0'" to load this file. \quit

-- 0.1.0 (sql/cachekit--0.1.0.sql) is frozen as released: every change to the
-- extension's objects since then is made here, and a fresh CREATE EXTENSION
-- runs 0.1.0 and then this script, so that an upgraded and a fresh
-- installation hold the same objects.

-- ---- delivery: refusals dead-letter by attempts and time (issue 9, item 7) ----
-- When Redis first refused an entry (a counted refusal: WRONGTYPE, a key
-- outside the worker's ACL key patterns...). An entry moves to
-- cachekit_dead_letter only once it was refused cachekit.max_attempts times
-- and this is cachekit.dead_letter_after old; the dead letter keeps it.
-- NULL until the first refusal; the writers' direct insert leaves it NULL.
ALTER TABLE @extschema@.cachekit_queue ADD COLUMN first_refused_at timestamptz;
ALTER TABLE @extschema@.cachekit_dead_letter ADD COLUMN first_refused_at timestamptz;
