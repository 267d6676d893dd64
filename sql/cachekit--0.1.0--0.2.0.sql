/* sql/cachekit--0.1.0--0.2.0.sql: from cachekit 0.1.0 to 0.2.0 */

\echo Use "ALTER EXTENSION cachekit UPDATE TO '0.2.0'" to load this file. \quit

-- 0.1.0 (sql/cachekit--0.1.0.sql) is frozen as released: every change to the
-- extension's objects since then is made here, and a fresh CREATE EXTENSION
-- runs 0.1.0 and then this script, so that an upgraded and a fresh
-- installation hold the same objects.
