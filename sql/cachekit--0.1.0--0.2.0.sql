/* sql/cachekit--0.1.0--0.2.0.sql: from cachekit 0.1.0 to 0.2.0 */

\echo Use "ALTER EXTENSION cachekit UPDATE TO '0.2.0'" to load this file. \quit

-- 0.1.0 (sql/cachekit--0.1.0.sql) is frozen as released: every change to the
-- extension's objects since then is made here, and a fresh CREATE EXTENSION
-- runs 0.1.0 and then this script, so that an upgraded and a fresh
-- installation hold the same objects.

-- ---- safety (issue 9): no function an ordinary role can plant is ever run ----

-- The worker's counters (behind cachekit_stats) are for monitoring roles
-- only. A view's functions run with the rights of whoever reads the view, so
-- a role reading cachekit_stats needs EXECUTE on this function too; the
-- built-in monitoring role pg_monitor gets both.
REVOKE ALL ON FUNCTION @extschema@.cachekit_worker_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cachekit_worker_state() TO pg_monitor;
GRANT SELECT ON @extschema@.cachekit_stats TO pg_monitor;

-- Replaying dead letters resolves nothing through the caller's search_path.
CREATE OR REPLACE FUNCTION @extschema@.cachekit_replay_dead_letters(ids bigint[] DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	WITH moved AS (
		DELETE FROM @extschema@.cachekit_dead_letter
		WHERE ids IS NULL OR id OPERATOR(pg_catalog.=) ANY (ids)
		RETURNING id, kind, keys, tags, untags, enqueued_at
	), queued AS (
		INSERT INTO @extschema@.cachekit_queue (kind, keys, tags, untags, enqueued_at)
		SELECT CASE WHEN kind OPERATOR(pg_catalog.=) 'w'::"char" THEN 'd'::"char" ELSE kind END,
			   keys,
			   CASE WHEN kind OPERATOR(pg_catalog.=) 'w'::"char" THEN '{}'::text[] ELSE tags END,
			   CASE WHEN kind OPERATOR(pg_catalog.=) 'w'::"char"
					THEN tags OPERATOR(pg_catalog.||) untags ELSE untags END,
			   enqueued_at
		FROM moved ORDER BY id
		RETURNING 1
	)
	SELECT pg_catalog.count(*) FROM queued;
$$;

-- ---- logical replication (issue 9): a subscriber of a FOR ALL TABLES ----
-- publication keeps its own queue. In the apply worker only (ENABLE
-- REPLICA), the publisher's new queue rows get ids of the subscriber's own
-- and write-through entries become deletes (they are dropped where the
-- library is not preloaded); the publisher's updates and deletes of queue
-- rows, and its dead letters, are skipped. See src/replica.c.
CREATE FUNCTION @extschema@.cachekit_replica_guard()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cachekit_replica_guard'
LANGUAGE C;
REVOKE ALL ON FUNCTION @extschema@.cachekit_replica_guard() FROM PUBLIC;

CREATE TRIGGER cachekit_replica_guard
	BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.cachekit_queue
	FOR EACH ROW EXECUTE FUNCTION @extschema@.cachekit_replica_guard();
ALTER TABLE @extschema@.cachekit_queue ENABLE REPLICA TRIGGER cachekit_replica_guard;

CREATE TRIGGER cachekit_replica_guard
	BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.cachekit_dead_letter
	FOR EACH ROW EXECUTE FUNCTION @extschema@.cachekit_replica_guard();
ALTER TABLE @extschema@.cachekit_dead_letter ENABLE REPLICA TRIGGER cachekit_replica_guard;
