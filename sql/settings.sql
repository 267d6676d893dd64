-- Settings and privileges
\set SHOW_CONTEXT never
CREATE EXTENSION cachekit;

SELECT name, setting, unit, context FROM pg_settings WHERE name LIKE 'cachekit.%' ORDER BY name;

-- the prefix is reserved
SET cachekit.no_such_setting = 1;

-- a malformed URL is refused without echoing it
ALTER SYSTEM SET cachekit.redis_url = 'http://127.0.0.1:6379';
ALTER SYSTEM SET cachekit.redis_url = 'redis://:s3cret@127.0.0.1:99999/0';
ALTER SYSTEM SET cachekit.redis_url = 'redis://:s3cret@127.0.0.1:6379/db';
ALTER SYSTEM SET cachekit.redis_url = 'redis://s3cret@127.0.0.1:6379/0';
ALTER SYSTEM SET cachekit.redis_url = 'redis://:s3cret%zz@127.0.0.1/0';
ALTER SYSTEM SET cachekit.redis_url = 'redis://';
ALTER SYSTEM SET cachekit.redis_url = 'redis-sentinel://127.0.0.1';
ALTER SYSTEM SET cachekit.redis_url = 'unix://:s3cret@relative.sock';
ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:6379/0 extra';
ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:6379/0#mymaster';
-- several hosts are Redis Cluster seeds, and a cluster has only database 0
ALTER SYSTEM SET cachekit.redis_url = 'redis://:s3cret@127.0.0.1:7000,127.0.0.1:7001/2';
ALTER SYSTEM SET cachekit.redis_url = 'rediss://127.0.0.1:7000,:7001/';
ALTER SYSTEM SET cachekit.redis_url = 'redis-sentinel://:s3cret@h1,,h3/0#mymaster';
ALTER SYSTEM SET cachekit.redis_url = 'redis-sentinel://:s3cret@h1:26379/0?sentinel_passwd=x#mymaster';
ALTER SYSTEM SET cachekit.redis_url = 'redis://h1/0?sentinel_password=x';
ALTER SYSTEM SET cachekit.redis_url = 'unix:///run/redis.sock?db=two';
-- the forms of "Connecting to Redis" in the README are accepted
ALTER SYSTEM SET cachekit.redis_url = 'rediss://cachekit:s3cret@master.example.com:6379/0';
ALTER SYSTEM SET cachekit.redis_url = 'unix://:s3cret@/run/redis/redis-server.sock?db=2';
ALTER SYSTEM SET cachekit.redis_url = 'redis-sentinel://:s3cret@10.0.0.11,10.0.0.12:26380,[::1]/0#mymaster';
ALTER SYSTEM SET cachekit.redis_url = 'rediss-sentinel://h1?sentinel_password=s%40x#my%20master';
ALTER SYSTEM RESET cachekit.redis_url;
-- not settable per session
SET cachekit.redis_url = 'redis://127.0.0.1';

-- a role that only writes a watched table
CREATE ROLE ck_writer LOGIN;
CREATE ROLE ck_monitor LOGIN;
GRANT CREATE ON SCHEMA public TO ck_writer;
CREATE TABLE watched (id int PRIMARY KEY, v text);
CREATE TRIGGER watched_cache AFTER INSERT OR UPDATE ON watched
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('w:{id}');
GRANT INSERT, UPDATE, SELECT ON watched TO ck_writer;
GRANT SELECT ON cachekit_stats TO ck_monitor;
GRANT EXECUTE ON FUNCTION cachekit_worker_state() TO ck_monitor;
GRANT EXECUTE ON FUNCTION cachekit_topology_state() TO ck_monitor;
GRANT EXECUTE ON FUNCTION cachekit_wait(interval) TO ck_monitor;

SET ROLE ck_writer;
-- the password-bearing URL is hidden
SHOW cachekit.redis_url;
SELECT count(*) FROM pg_settings WHERE name = 'cachekit.redis_url';
SHOW cachekit.tag_prefix;
-- writes fire the trigger without any grant on the queue
INSERT INTO watched VALUES (1, 'a');
UPDATE watched SET v = 'b';
-- but the queue, the dead letters and the functions are closed
SELECT count(*) FROM cachekit_queue;
SELECT count(*) FROM cachekit_dead_letter;
INSERT INTO cachekit_queue (kind, keys) VALUES ('i', '{x}');
SELECT cachekit_delete('any');
SELECT cachekit_flush_tag('any');
SELECT cachekit_replay_dead_letters();
SELECT * FROM cachekit_stats;
-- and it cannot attach cachekit triggers to its own tables
CREATE TABLE mine (id int);
CREATE TRIGGER mine_cache AFTER INSERT ON mine
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('{id}');
CREATE TRIGGER mine_wt AFTER INSERT ON mine
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key={id}');
DROP TABLE mine;
RESET ROLE;

SELECT keys FROM cachekit_queue ORDER BY id;

-- a monitoring role sees the stats, not the secrets or the queue
SET ROLE ck_monitor;
SELECT queue_depth FROM cachekit_stats;
SELECT cachekit_wait('0');
SELECT count(*) FROM cachekit_queue;
SHOW cachekit.redis_url;
RESET ROLE;

-- the worker's state is not for everyone: not executable by PUBLIC,
-- while pg_monitor members may read the stats
SET ROLE ck_writer;
SELECT worker_pid FROM cachekit_worker_state();
SELECT queue_depth FROM cachekit_stats;
RESET ROLE;
SELECT has_function_privilege('public', 'cachekit_worker_state()', 'EXECUTE') AS public_may_execute,
	   has_function_privilege('pg_monitor', 'cachekit_worker_state()', 'EXECUTE') AS pg_monitor_may_execute,
	   has_table_privilege('pg_monitor', 'cachekit_stats', 'SELECT') AS pg_monitor_may_read;

-- the Redis Cluster slot of a key: CRC16 of the key or of its {hash tag}
SELECT k, cachekit_key_slot(k) FROM (VALUES ('123456789'), ('{123456789}x'), ('a{123456789}{b}'),
	('{}123456789'), ('{123456789'), ('x}{123456789}'), ('')) AS v(k);
DROP TABLE watched;
DROP EXTENSION cachekit;
REVOKE ALL ON SCHEMA public FROM ck_writer;
DROP ROLE ck_writer;
DROP ROLE ck_monitor;
