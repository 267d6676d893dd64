/* sql/cachekit--0.1.0--0.2.0.sql: from cachekit 0.1.0 to 0.2.0 */

\echo Use "ALTER EXTENSION cachekit UPDATE TO '0.2.0'" to load this file. \quit

-- 0.1.0 (sql/cachekit--0.1.0.sql) is frozen as released: every change to the
-- extension's objects since then is made here, and a fresh CREATE EXTENSION
-- runs 0.1.0 and then this script, so that an upgraded and a fresh
-- installation hold the same objects.

-- ---- triggers (issue 9 items 2-5, issue 14 preview) ----------------------

-- What a cachekit trigger would enqueue for one row change, enqueueing
-- nothing: one row per item, rendered by the trigger's own code. old_row
-- NULL is an INSERT, new_row NULL a DELETE, both NULL (typed, e.g.
-- NULL::users) a TRUNCATE. action is delete, flush_tag, write, tag_add or
-- tag_remove; value and ttl are set for write (the JSON written, and its
-- expiry in seconds, 0 for none).
CREATE FUNCTION @extschema@.cachekit_preview(tbl pg_catalog.regclass, trigger_name pg_catalog.name,
											 old_row anyelement, new_row anyelement,
											 OUT action pg_catalog.text, OUT name pg_catalog.text,
											 OUT value pg_catalog.text, OUT ttl pg_catalog.int4)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cachekit_preview'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;
REVOKE ALL ON FUNCTION @extschema@.cachekit_preview(pg_catalog.regclass, pg_catalog.name, anyelement, anyelement) FROM PUBLIC;

-- pg_dump keeps the dead letters, and the queue's id sequence with them:
-- dead letters keep the id their entry had in the queue, so a restored
-- database must hand out later ids only. The queue itself is not dumped:
-- its entries were meant for the old database's Redis, at the time.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.cachekit_dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.cachekit_queue_id_seq', '');

-- Since 0.2.0, CREATE TRIGGER checks a cachekit trigger's arguments and
-- records that the trigger depends on the columns they name (so that DROP
-- COLUMN is refused unless CASCADE). Do the same once for the triggers
-- created before: a trigger that fails the checks gets a warning and is
-- left as it is. The function is not kept.
CREATE FUNCTION @extschema@.cachekit_check_triggers()
RETURNS pg_catalog.int8
AS 'MODULE_PATHNAME', 'cachekit_check_triggers'
LANGUAGE C STRICT VOLATILE;
SELECT @extschema@.cachekit_check_triggers();
DROP FUNCTION @extschema@.cachekit_check_triggers();
