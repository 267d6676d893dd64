-- named targets: target= in triggers, cachekit_delete_in/cachekit_flush_tag_in,
-- what the queue records (targets: NULL for the default target alone)
CREATE EXTENSION cachekit;
\set SHOW_CONTEXT never
\set VERBOSITY default

CREATE TABLE acct (id int PRIMARY KEY, region text);

-- no target=: the default target, targets stays NULL
CREATE TRIGGER acct_default AFTER INSERT ON acct
  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('acct:{id}');
-- targets not configured here (cachekit.targets is empty): a warning each
CREATE TRIGGER acct_fan AFTER INSERT ON acct
  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('target=eu', 'fan:{id}', 'target=us', 'target=eu');
CREATE TRIGGER acct_wt AFTER INSERT ON acct
  FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}', 'target=default', 'target=eu');
-- target=default alone is the default target
CREATE TRIGGER acct_dflt AFTER INSERT ON acct
  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('dflt:{id}', 'target=default');
INSERT INTO acct VALUES (1, 'eu');
SELECT kind, keys, targets FROM cachekit_queue ORDER BY keys[1];
TRUNCATE cachekit_queue;

-- malformed target names are errors, naming the trigger and argument
CREATE TRIGGER acct_bad AFTER INSERT ON acct
  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('target=EU', 'x:{id}');
CREATE TRIGGER acct_bad AFTER INSERT ON acct
  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('target=', 'x:{id}');
CREATE TRIGGER acct_bad AFTER INSERT ON acct
  FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=x:{id}', 'target=a b');

-- the manual functions for targets
SELECT cachekit_delete_in('{eu,us,eu}', 'k1', 'k2');
SELECT cachekit_flush_tag_in('{default}', 't1');
SELECT cachekit_delete_in(NULL, 'k3');
SELECT cachekit_delete_in('{}', 'k4');
SELECT cachekit_delete_in('{eu}', VARIADIC '{}'::text[]);
SELECT kind, keys, tags, targets FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;
SELECT cachekit_delete_in('{Bad}', 'k');
SELECT cachekit_delete_in(ARRAY['eu', NULL], 'k');
SELECT cachekit_flush_tag_in('{eu}', VARIADIC ARRAY[NULL::text]);

-- preview renders a trigger with target= like any other
SELECT * FROM cachekit_preview('acct', 'acct_fan', NULL::acct, ROW(7, 'x')::acct);

-- dead letters record the target; replay queues each for its target
INSERT INTO cachekit_dead_letter (id, kind, keys, ttl, attempts, error, enqueued_at, target)
VALUES (100, 'i', '{a}', 0, 5, 'refused', now(), 'eu'),
       (100, 'i', '{a}', 0, 5, 'refused', now(), 'us'),
       (101, 'i', '{b}', 0, 5, 'refused', now(), DEFAULT);
SELECT cachekit_replay_dead_letters();
SELECT kind, keys, targets FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- the view: configured targets (only default here) and those entries name
SELECT cachekit_delete_in('{mars}', 'k');
SELECT target, configured, connected, backlog, dead_letters, last_error
FROM cachekit_target_stats ORDER BY target;

-- privileges: like cachekit_stats
SELECT has_table_privilege('pg_monitor', 'cachekit_target_stats', 'SELECT') AS monitor,
       has_function_privilege('public', 'cachekit_target_state()', 'EXECUTE') AS public_state,
       has_function_privilege('public', 'cachekit_delete_in(text[], text[])', 'EXECUTE') AS public_delete_in;
DROP TABLE acct;
DROP EXTENSION cachekit;
