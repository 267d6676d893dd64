/* sql/cachekit--0.2.0.sql: objects of cachekit 0.2.0, for a fresh installation */

\echo Use "CREATE EXTENSION cachekit" to load this file. \quit

-- The objects of 0.1.0 (sql/cachekit--0.1.0.sql, frozen as released) with
-- every change of sql/cachekit--0.1.0--0.2.0.sql applied, in that order:
-- test/t/180_upgrade.pl checks that an updated installation and a fresh
-- one hold the same objects. Unlike 0.1.0's, its closing check qualifies
-- every function it calls: a look-alike planted in the target schema by a
-- database owner (format(text, name, text), say, a closer match than
-- pg_catalog's variadic format) would otherwise run as the superuser who
-- creates the extension.

-- ==== 0.1.0 ====

-- The durable queue. Triggers and the manual functions insert here inside
-- the writing transaction; the background worker reads committed entries in
-- id order, delivers them to Redis and deletes them once Redis answered.
--   kind 'i': delete every key in keys, flush every tag in tags
--   kind 'w': SET keys[1] to value (EX ttl when ttl > 0), SADD it to the
--             sets of tags, SREM it from the sets of untags
--   kind 'd': delete keys[1] and SREM it from the sets of untags (ttl -1:
--             a write-through value too large to send, counted as such)
CREATE TABLE cachekit_queue (
	id bigserial PRIMARY KEY,
	kind "char" NOT NULL,	-- no CHECK: it would cost every insert
	keys text[] NOT NULL,
	tags text[] NOT NULL DEFAULT '{}',
	untags text[] NOT NULL DEFAULT '{}',
	value text,
	ttl integer NOT NULL DEFAULT 0,
	attempts integer NOT NULL DEFAULT 0,
	last_error text,
	enqueued_at timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
		autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000,
		toast_tuple_target = 8160, vacuum_truncate = false, toast.vacuum_truncate = false);
-- Entries live for milliseconds: compressing a statement's keys would cost
-- the writer more than it saves. Entries up to a page stay in the heap
-- (statement-level triggers size theirs to fit) instead of going through
-- the toast table and its index. Vacuum leaves emptied pages in place:
-- truncating the table takes a lock that every writer of a watched table
-- would wait for. The worker gives them back when it goes idle.
ALTER TABLE cachekit_queue
	ALTER COLUMN keys SET STORAGE EXTERNAL,
	ALTER COLUMN tags SET STORAGE EXTERNAL,
	ALTER COLUMN untags SET STORAGE EXTERNAL,
	ALTER COLUMN value SET STORAGE EXTERNAL;
REVOKE ALL ON cachekit_queue FROM PUBLIC;
REVOKE ALL ON SEQUENCE cachekit_queue_id_seq FROM PUBLIC;

-- Entries Redis refused cachekit.max_attempts times, kept for inspection and
-- replay with cachekit_replay_dead_letters().
CREATE TABLE cachekit_dead_letter (
	id bigint PRIMARY KEY,
	kind "char" NOT NULL,
	keys text[] NOT NULL,
	tags text[] NOT NULL DEFAULT '{}',
	untags text[] NOT NULL DEFAULT '{}',
	value text,
	ttl integer NOT NULL,
	attempts integer NOT NULL,
	error text NOT NULL,
	enqueued_at timestamptz NOT NULL,
	failed_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON cachekit_dead_letter FROM PUBLIC;

CREATE FUNCTION cachekit_invalidate()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cachekit_invalidate'
LANGUAGE C;

CREATE FUNCTION cachekit_write_through()
RETURNS trigger
AS 'MODULE_PATHNAME', 'cachekit_write_through'
LANGUAGE C;

CREATE FUNCTION cachekit_delete(VARIADIC keys text[])
RETURNS void
AS 'MODULE_PATHNAME', 'cachekit_delete'
LANGUAGE C STRICT VOLATILE;

CREATE FUNCTION cachekit_flush_tag(VARIADIC tags text[])
RETURNS void
AS 'MODULE_PATHNAME', 'cachekit_flush_tag'
LANGUAGE C STRICT VOLATILE;

CREATE FUNCTION cachekit_wait(timeout interval DEFAULT '10 seconds')
RETURNS boolean
AS 'MODULE_PATHNAME', 'cachekit_wait'
LANGUAGE C STRICT VOLATILE;

-- Moves dead letters back to the end of the queue (all, or those with the
-- given ids). A write-through entry comes back as a delete of its key: newer
-- writes of that key may have been delivered since, and an old value must
-- never overwrite them.
CREATE FUNCTION cachekit_replay_dead_letters(ids bigint[] DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
	WITH moved AS (
		DELETE FROM @extschema@.cachekit_dead_letter
		WHERE ids IS NULL OR id = ANY (ids)
		RETURNING id, kind, keys, tags, untags, enqueued_at
	), queued AS (
		INSERT INTO @extschema@.cachekit_queue (kind, keys, tags, untags, enqueued_at)
		SELECT CASE kind WHEN 'w' THEN 'd' ELSE kind END,
			   keys,
			   CASE kind WHEN 'w' THEN '{}' ELSE tags END,
			   CASE kind WHEN 'w' THEN tags || untags ELSE untags END,
			   enqueued_at
		FROM moved ORDER BY id
		RETURNING 1
	)
	SELECT count(*) FROM queued;
$$;

CREATE FUNCTION cachekit_worker_state(
	OUT keys_deleted bigint,
	OUT tags_flushed bigint,
	OUT tag_keys_deleted bigint,
	OUT keys_written bigint,
	OUT values_too_large bigint,
	OUT entries_delivered bigint,
	OUT failed_attempts bigint,
	OUT dead_lettered bigint,
	OUT last_error text,
	OUT last_error_at timestamptz,
	OUT last_delivery_at timestamptz,
	OUT redis_connected boolean,
	OUT worker_pid integer)
RETURNS record
AS 'MODULE_PATHNAME', 'cachekit_worker_state'
LANGUAGE C STRICT VOLATILE;

-- One row: the queue as this database sees it and the worker's counters
-- since the server started. Runs with its owner's rights, so it can be
-- granted to monitoring roles without access to the queue itself.
CREATE VIEW cachekit_stats AS
SELECT q.queue_depth,
	   now() - q.oldest_enqueued_at AS oldest_entry_age,
	   q.oldest_enqueued_at,
	   (SELECT count(*) FROM @extschema@.cachekit_dead_letter) AS dead_letters,
	   w.keys_deleted,
	   w.tags_flushed,
	   w.tag_keys_deleted,
	   w.keys_written,
	   w.values_too_large,
	   w.entries_delivered,
	   w.failed_attempts,
	   w.dead_lettered,
	   w.last_error,
	   w.last_error_at,
	   w.last_delivery_at,
	   w.redis_connected,
	   w.worker_pid
FROM (SELECT count(*) AS queue_depth, min(enqueued_at) AS oldest_enqueued_at
	  FROM @extschema@.cachekit_queue) AS q,
	 @extschema@.cachekit_worker_state() AS w;

-- Nobody but the owner may create caching triggers or enqueue work until
-- granted: a trigger can delete or overwrite any key in Redis.
REVOKE ALL ON FUNCTION cachekit_invalidate() FROM PUBLIC;
REVOKE ALL ON FUNCTION cachekit_write_through() FROM PUBLIC;
REVOKE ALL ON FUNCTION cachekit_delete(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cachekit_flush_tag(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cachekit_wait(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION cachekit_replay_dead_letters(bigint[]) FROM PUBLIC;
REVOKE ALL ON cachekit_stats FROM PUBLIC;

-- Say so at once when nothing would deliver this database's queue.
DO $$
BEGIN
	IF pg_catalog.current_setting('cachekit.database', true) IS NULL THEN
		RAISE WARNING 'cachekit is not loaded through shared_preload_libraries'
			USING DETAIL = 'Work queued by cachekit''s triggers and functions is delivered by its background worker, which runs only when the library is preloaded.',
				  HINT = 'Add cachekit to shared_preload_libraries and restart the server.';
	ELSIF pg_catalog.current_setting('cachekit.database') OPERATOR(pg_catalog.<>) ''
		  AND pg_catalog.current_setting('cachekit.database') OPERATOR(pg_catalog.<>) pg_catalog.current_database()::pg_catalog.text THEN
		RAISE WARNING 'cachekit''s worker serves database "%" only, not "%"',
			pg_catalog.current_setting('cachekit.database'), pg_catalog.current_database()
			USING DETAIL = 'Work queued in this database stays in its queue until a worker serves it.',
				  HINT = 'Set cachekit.database = '''' (every database with the extension is served) and restart the server.';
	END IF;
END
$$;

-- ==== changes of 0.2.0 ====

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

-- ---- safety (issue 9): no function an ordinary role can plant is ever run ----

-- The worker's counters (behind cachekit_stats) are for monitoring roles
-- only. A view's functions run with the rights of whoever reads the view, so
-- a role reading cachekit_stats needs EXECUTE on this function too; the
-- built-in monitoring role pg_monitor gets both.
REVOKE ALL ON FUNCTION @extschema@.cachekit_worker_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cachekit_worker_state() TO pg_monitor;
GRANT SELECT ON @extschema@.cachekit_stats TO pg_monitor;

-- Replaying dead letters resolves nothing through the caller's search_path:
-- cachekit_replay_dead_letters is replaced so in the targets section below.

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

-- ---- delivery: refusals dead-letter by attempts and time (issue 9, item 7) ----
-- When Redis first refused an entry (a counted refusal: WRONGTYPE, a key
-- outside the worker's ACL key patterns...). An entry moves to
-- cachekit_dead_letter only once it was refused cachekit.max_attempts times
-- and this is cachekit.dead_letter_after old; the dead letter keeps it.
-- NULL until the first refusal; the writers' direct insert leaves it NULL.
ALTER TABLE @extschema@.cachekit_queue ADD COLUMN first_refused_at timestamptz;
ALTER TABLE @extschema@.cachekit_dead_letter ADD COLUMN first_refused_at timestamptz;

-- ---- every database (issue 13): the databases the launcher knows of ----
-- One row per database of the server: whether a worker serves it, and why
-- not (no extension, a template, no connections, cachekit.max_databases
-- reached, cachekit.database names another one). Server-wide: the same
-- rows in every database that has the extension. For superusers and
-- monitoring roles, like cachekit_stats.
CREATE FUNCTION @extschema@.cachekit_databases_state(
	OUT datid pg_catalog.oid,
	OUT datname pg_catalog.text,
	OUT served pg_catalog.bool,
	OUT worker_pid pg_catalog.int4,
	OUT status pg_catalog.text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cachekit_databases'
LANGUAGE C STRICT VOLATILE;
REVOKE ALL ON FUNCTION @extschema@.cachekit_databases_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cachekit_databases_state() TO pg_monitor;

CREATE VIEW @extschema@.cachekit_databases AS
SELECT datid, datname, served, worker_pid, status
FROM @extschema@.cachekit_databases_state();
REVOKE ALL ON @extschema@.cachekit_databases FROM PUBLIC;
GRANT SELECT ON @extschema@.cachekit_databases TO pg_monitor;

-- ---- named Redis targets and fan-out (issue 13, "Several targets") --------
-- cachekit.targets names Redis targets besides "default" (cachekit.redis_url).
-- targets: the targets that still owe an entry, NULL for the default target
-- alone (what every entry without target= gets: the writers' direct insert
-- leaves it NULL). The worker removes a target once it acknowledged the
-- entry, and deletes the entry when no target is left.
ALTER TABLE @extschema@.cachekit_queue ADD COLUMN targets text[];
-- A dead letter is an entry refused by one target: the others may have
-- taken it. The same queue entry may be dead-lettered once per target.
ALTER TABLE @extschema@.cachekit_dead_letter ADD COLUMN target text NOT NULL DEFAULT 'default';
ALTER TABLE @extschema@.cachekit_dead_letter DROP CONSTRAINT cachekit_dead_letter_pkey;
ALTER TABLE @extschema@.cachekit_dead_letter ADD PRIMARY KEY (id, target);

-- Replay: back into the queue for the target that refused it.
CREATE OR REPLACE FUNCTION @extschema@.cachekit_replay_dead_letters(ids bigint[] DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	WITH moved AS (
		DELETE FROM @extschema@.cachekit_dead_letter
		WHERE ids IS NULL OR id OPERATOR(pg_catalog.=) ANY (ids)
		RETURNING id, kind, keys, tags, untags, enqueued_at, target
	), queued AS (
		INSERT INTO @extschema@.cachekit_queue (kind, keys, tags, untags, enqueued_at, targets)
		SELECT CASE WHEN kind OPERATOR(pg_catalog.=) 'w'::"char" THEN 'd'::"char" ELSE kind END,
			   keys,
			   CASE WHEN kind OPERATOR(pg_catalog.=) 'w'::"char" THEN '{}'::text[] ELSE tags END,
			   CASE WHEN kind OPERATOR(pg_catalog.=) 'w'::"char"
					THEN tags OPERATOR(pg_catalog.||) untags ELSE untags END,
			   enqueued_at,
			   CASE WHEN target OPERATOR(pg_catalog.=) 'default' THEN NULL ELSE ARRAY[target] END
		FROM moved ORDER BY id, target
		RETURNING 1
	)
	SELECT pg_catalog.count(*) FROM queued;
$$;

-- cachekit_delete and cachekit_flush_tag for named targets (NULL or empty:
-- the default one), at commit; several targets get the work each.
CREATE FUNCTION @extschema@.cachekit_delete_in(targets text[], VARIADIC keys text[])
RETURNS void
AS 'MODULE_PATHNAME', 'cachekit_delete_in'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;
CREATE FUNCTION @extschema@.cachekit_flush_tag_in(targets text[], VARIADIC tags text[])
RETURNS void
AS 'MODULE_PATHNAME', 'cachekit_flush_tag_in'
LANGUAGE C CALLED ON NULL INPUT VOLATILE;
REVOKE ALL ON FUNCTION @extschema@.cachekit_delete_in(text[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.cachekit_flush_tag_in(text[], text[]) FROM PUBLIC;

-- One row per configured target of this database: the worker's state and
-- counters for it since the worker started (behind cachekit_target_stats).
CREATE FUNCTION @extschema@.cachekit_target_state(
	OUT target text,
	OUT connected boolean,
	OUT last_error text,
	OUT last_error_at timestamptz,
	OUT last_delivery_at timestamptz,
	OUT entries_delivered bigint,
	OUT failed_attempts bigint,
	OUT dead_lettered bigint,
	OUT keys_deleted bigint,
	OUT tags_flushed bigint,
	OUT tag_keys_deleted bigint,
	OUT keys_written bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cachekit_target_state'
LANGUAGE C STRICT VOLATILE;
REVOKE ALL ON FUNCTION @extschema@.cachekit_target_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cachekit_target_state() TO pg_monitor;

-- One row per target: each configured one, and each that queued entries
-- name without it being configured (they wait: last_error says so).
CREATE VIEW @extschema@.cachekit_target_stats AS
WITH owed AS (
	SELECT t.target, pg_catalog.count(*) AS backlog,
		   pg_catalog.min(q.enqueued_at) AS oldest_enqueued_at
	FROM @extschema@.cachekit_queue q,
		 pg_catalog.unnest(COALESCE(q.targets, ARRAY['default'::pg_catalog.text])) AS t(target)
	GROUP BY t.target
), dead AS (
	SELECT d.target, pg_catalog.count(*) AS dead_letters
	FROM @extschema@.cachekit_dead_letter d
	GROUP BY d.target
)
SELECT COALESCE(s.target, o.target) AS target,
	   s.target IS NOT NULL AS configured,
	   COALESCE(s.connected, false) AS connected,
	   COALESCE(o.backlog, 0) AS backlog,
	   pg_catalog.now() OPERATOR(pg_catalog.-) o.oldest_enqueued_at AS oldest_entry_age,
	   o.oldest_enqueued_at,
	   COALESCE(d.dead_letters, 0) AS dead_letters,
	   CASE WHEN s.target IS NULL THEN 'target is not configured in cachekit.targets'
			ELSE s.last_error END AS last_error,
	   s.last_error_at,
	   s.last_delivery_at,
	   COALESCE(s.entries_delivered, 0) AS entries_delivered,
	   COALESCE(s.failed_attempts, 0) AS failed_attempts,
	   COALESCE(s.dead_lettered, 0) AS dead_lettered,
	   COALESCE(s.keys_deleted, 0) AS keys_deleted,
	   COALESCE(s.tags_flushed, 0) AS tags_flushed,
	   COALESCE(s.tag_keys_deleted, 0) AS tag_keys_deleted,
	   COALESCE(s.keys_written, 0) AS keys_written
FROM @extschema@.cachekit_target_state() AS s
	 FULL JOIN owed o ON o.target OPERATOR(pg_catalog.=) s.target
	 LEFT JOIN dead d ON d.target OPERATOR(pg_catalog.=) COALESCE(s.target, o.target);
REVOKE ALL ON @extschema@.cachekit_target_stats FROM PUBLIC;
GRANT SELECT ON @extschema@.cachekit_target_stats TO pg_monitor;

-- ---- Redis Cluster (issue 11): the topology in cachekit_stats, the slot function ----
-- The Redis topology the worker last connected to: standalone (one node, or
-- a Sentinel's master) or cluster, how many nodes it writes to (a cluster's
-- primaries), when it last read the cluster's slot map, and how many MOVED
-- and ASK redirections it followed since the server started. Monitoring
-- data, like cachekit_worker_state.
CREATE FUNCTION @extschema@.cachekit_topology_state(
	OUT redis_mode pg_catalog.text,
	OUT redis_nodes pg_catalog.int4,
	OUT slot_map_read_at pg_catalog.timestamptz,
	OUT redirects_followed pg_catalog.int8)
RETURNS record
AS 'MODULE_PATHNAME', 'cachekit_topology_state'
LANGUAGE C STRICT VOLATILE;
REVOKE ALL ON FUNCTION @extschema@.cachekit_topology_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cachekit_topology_state() TO pg_monitor;

-- The Redis Cluster slot of a key as cachekit routes it (CRC16 of the key
-- or of its {hash tag}, modulo 16384): to check which keys share a slot.
CREATE FUNCTION @extschema@.cachekit_key_slot(key pg_catalog.text)
RETURNS pg_catalog.int4
AS 'MODULE_PATHNAME', 'cachekit_key_slot'
LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
REVOKE ALL ON FUNCTION @extschema@.cachekit_key_slot(pg_catalog.text) FROM PUBLIC;

-- cachekit_stats gains the topology's columns (at the end).
CREATE OR REPLACE VIEW @extschema@.cachekit_stats AS
SELECT q.queue_depth,
	   pg_catalog.now() OPERATOR(pg_catalog.-) q.oldest_enqueued_at AS oldest_entry_age,
	   q.oldest_enqueued_at,
	   (SELECT pg_catalog.count(*) FROM @extschema@.cachekit_dead_letter) AS dead_letters,
	   w.keys_deleted,
	   w.tags_flushed,
	   w.tag_keys_deleted,
	   w.keys_written,
	   w.values_too_large,
	   w.entries_delivered,
	   w.failed_attempts,
	   w.dead_lettered,
	   w.last_error,
	   w.last_error_at,
	   w.last_delivery_at,
	   w.redis_connected,
	   w.worker_pid,
	   t.redis_mode,
	   t.redis_nodes,
	   t.slot_map_read_at,
	   t.redirects_followed
FROM (SELECT pg_catalog.count(*) AS queue_depth, pg_catalog.min(enqueued_at) AS oldest_enqueued_at
	  FROM @extschema@.cachekit_queue) AS q,
	 @extschema@.cachekit_worker_state() AS w,
	 @extschema@.cachekit_topology_state() AS t;
