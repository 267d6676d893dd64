-- Bad trigger arguments and firings: clear errors with errcodes, raised
-- by CREATE TRIGGER itself (not at the trigger's first row)
CREATE EXTENSION cachekit;
\set SHOW_CONTEXT never
SET client_min_messages = warning;

CREATE FUNCTION try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE sql;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

CREATE TABLE t (id int, email text);
CREATE FUNCTION attach(VARIADIC args text[]) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	r text;
BEGIN
	DROP TRIGGER IF EXISTS t_cache ON t;
	r := try(format('CREATE TRIGGER t_cache AFTER INSERT OR UPDATE OR DELETE ON t FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate(%s)',
					(SELECT string_agg(quote_literal(a), ', ') FROM unnest(args) a)));
	IF r = 'ok' THEN
		r := try('INSERT INTO t VALUES (1, ''a@x'')');
	ELSE
		r := 'CREATE TRIGGER: ' || r;
	END IF;
	DROP TRIGGER IF EXISTS t_cache ON t;
	RETURN r;
END $$;

SELECT attach('user:{nope}');
SELECT attach('key=user:{id}', 'tag=team:{team_id}');
SELECT attach('user:{id');
SELECT attach('user:id}');
SELECT attach('user:{}');
SELECT attach('user:{a{b}');
SELECT attach('');
SELECT attach('key=');
SELECT attach('tag=');
SELECT attach('ttl=30', 'user:{id}');
SELECT attach('colour=red');
SELECT attach('Key=x');
SELECT attach('user:{{id}}');
SELECT count(*) FROM cachekit_queue;
TRUNCATE cachekit_queue;

-- no templates at all
SELECT try('CREATE TRIGGER t_none AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate()');

-- the full error, with its detail
CREATE TRIGGER t_bad AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('ok:{id}', 'bad:{mail}');
SELECT count(*) AS cachekit_triggers_left FROM pg_trigger WHERE tgrelid = 't'::regclass;

-- wrong timing and level
SELECT try('CREATE TRIGGER t_before BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate(''user:{id}'')');
SELECT try('CREATE TRIGGER t_stmt AFTER INSERT ON t FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(''users'')');
SELECT try('CREATE TRIGGER t_stmt AFTER UPDATE ON t REFERENCING NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(''user:{id}'')');
SELECT try('CREATE TRIGGER t_stmt AFTER INSERT OR DELETE ON t REFERENCING NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(''user:{id}'')');
SELECT try('CREATE TRIGGER t_stmt AFTER UPDATE ON t REFERENCING OLD TABLE AS o NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(''user:{nope}'')');
SELECT try('CREATE TRIGGER t_trunc AFTER TRUNCATE ON t FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(''user:{id}'')');
-- the crash of issue 9: INSERT OR TRUNCATE with a placeholder is refused
SELECT try('CREATE TRIGGER t_trunc AFTER INSERT OR TRUNCATE ON t FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(''t:{id}'')');
SELECT try('CREATE TRIGGER t_trunc AFTER INSERT OR TRUNCATE ON t REFERENCING NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(''t:{id}'')');
CREATE VIEW v AS SELECT * FROM t;
SELECT try('CREATE TRIGGER v_instead INSTEAD OF INSERT ON v FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate(''user:{id}'')');
DROP VIEW v;
-- none of them was left behind
SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass;

-- not callable directly
SELECT try('SELECT cachekit_invalidate()');

-- a failed trigger leaves no queue entry behind; the next valid one works
SELECT count(*) FROM cachekit_queue;
CREATE TRIGGER t_ok AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}');
INSERT INTO t VALUES (7, 'g');
SELECT keys FROM cachekit_queue;

DROP TABLE t;
DROP FUNCTION attach(text[]);
DROP FUNCTION try(text);
DROP EXTENSION cachekit;
