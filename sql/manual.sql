-- cachekit_delete, cachekit_flush_tag and cachekit_wait inside transactions
CREATE EXTENSION cachekit;
\set SHOW_CONTEXT never

SELECT cachekit_delete('homepage', 'nav');
SELECT cachekit_flush_tag('featured');
SELECT cachekit_delete(VARIADIC ARRAY['a b', E'quote''s', E'cr\r\nlf', '{x}', 'ключ']);
SELECT cachekit_delete(VARIADIC '{}'::text[]);
SELECT kind, keys, tags, attempts, last_error FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- nothing is queued on rollback, or from a rolled back savepoint
BEGIN;
SELECT cachekit_delete('gone');
SELECT cachekit_flush_tag('gone');
ROLLBACK;
BEGIN;
SELECT cachekit_delete('kept');
SAVEPOINT s;
SELECT cachekit_flush_tag('undone');
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;

-- bad input
SELECT cachekit_delete(VARIADIC ARRAY['a', NULL]);
SELECT cachekit_flush_tag(VARIADIC ARRAY[NULL::text]);
SELECT cachekit_delete(VARIADIC NULL::text[]);
SELECT cachekit_wait('-1 second');

-- cachekit_wait: this database's queue is not served by the worker here
-- (cachekit.database is 'postgres'), so committed work stays pending.
SELECT cachekit_wait('50 milliseconds');
TRUNCATE cachekit_queue;
SELECT cachekit_wait('50 milliseconds');
-- work of the calling transaction itself is not waited for
BEGIN;
SELECT cachekit_delete('mine');
SELECT cachekit_wait('50 milliseconds');
ROLLBACK;
-- nor is work that commits after the call started
SELECT cachekit_wait();

-- the stats view: no worker serves this database (only cachekit.database)
SELECT queue_depth, oldest_entry_age IS NULL AS no_age, dead_letters, worker_pid IS NOT NULL AS worker
FROM cachekit_stats;
SELECT cachekit_delete('x');
SELECT queue_depth, oldest_entry_age >= '0'::interval AS has_age FROM cachekit_stats;

-- dead letters go back to the queue on replay
TRUNCATE cachekit_queue;
INSERT INTO cachekit_dead_letter (id, kind, keys, tags, ttl, attempts, error, enqueued_at)
VALUES (1, 'i', '{k1}', '{}', 0, 5, 'WRONGTYPE', now()),
	   (2, 'i', '{}', '{t1}', 0, 5, 'WRONGTYPE', now());
SELECT cachekit_replay_dead_letters(ARRAY[2]::bigint[]);
SELECT kind, keys, tags, attempts FROM cachekit_queue;
SELECT cachekit_replay_dead_letters();
SELECT kind, keys, tags, attempts FROM cachekit_queue ORDER BY id;
SELECT count(*) FROM cachekit_dead_letter;

DROP EXTENSION cachekit;
