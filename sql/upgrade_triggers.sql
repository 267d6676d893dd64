-- ALTER EXTENSION UPDATE from 0.1.0: the triggers created before get the
-- column dependencies CREATE TRIGGER records since 0.2.0; a trigger that
-- was broken already gets a warning and does not stop the upgrade
CREATE EXTENSION cachekit VERSION '0.1.0';
SET client_min_messages = warning;
CREATE TABLE u (id int, team int, note text);
CREATE TRIGGER u_cache AFTER INSERT ON u FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('u:{id}', 'tag=t:{team}');
CREATE TABLE w (id int, code text);
CREATE TRIGGER w_cache AFTER INSERT ON w FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=w:{id}', 'columns=id, code');
CREATE TABLE v (id int, gone int);
CREATE TRIGGER v_cache AFTER INSERT ON v FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('v:{gone}');
-- as 0.1.0 left them: no dependencies on columns, and v's column dropped
DELETE FROM pg_depend WHERE classid = 'pg_trigger'::regclass AND refobjsubid > 0
	AND refobjid IN ('u'::regclass, 'v'::regclass, 'w'::regclass);
ALTER TABLE v DROP COLUMN gone;
ALTER EXTENSION cachekit UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'cachekit';
SELECT t.tgname, a.attname
FROM pg_depend d JOIN pg_trigger t ON t.oid = d.objid
	JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE d.classid = 'pg_trigger'::regclass AND d.refobjid IN ('u'::regclass, 'v'::regclass, 'w'::regclass)
ORDER BY 1, 2;
ALTER TABLE u DROP COLUMN team;
ALTER TABLE u DROP COLUMN note;
-- the helper is gone
SELECT count(*) FROM pg_proc WHERE proname = 'cachekit_check_triggers';
DROP TABLE u, v, w;
DROP EXTENSION cachekit;
