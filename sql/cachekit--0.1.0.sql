/* sql/cachekit--0.1.0.sql: objects of cachekit 0.1.0 */

\echo Use "CREATE EXTENSION cachekit" to load this file. \quit

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
	IF current_setting('cachekit.database', true) IS NULL THEN
		RAISE WARNING 'cachekit is not loaded through shared_preload_libraries'
			USING DETAIL = 'Work queued by cachekit''s triggers and functions is delivered by its background worker, which runs only when the library is preloaded.',
				  HINT = 'Add cachekit to shared_preload_libraries and restart the server.';
	ELSIF current_setting('cachekit.database') <> current_database() THEN
		RAISE WARNING 'cachekit''s worker serves database "%", not "%"',
			current_setting('cachekit.database'), current_database()
			USING DETAIL = 'Work queued in this database stays in its queue until the worker serves it.',
				  HINT = format('Set cachekit.database = %L and restart the server, or create the extension in database %I.',
								current_database(), current_setting('cachekit.database'));
	END IF;
END
$$;
