-- Statement-level triggers on bulk statements: the shortcuts taken for
-- speed (typed printing, remembered values, unread new rows, keys known
-- to be distinct, entries sized to a page) give the same keys and tags as
-- rendering every row would.
CREATE EXTENSION cachekit;
SET client_min_messages = warning;

-- sorted keys and tags of everything queued so far, then an empty queue
CREATE FUNCTION queued(OUT keys text[], OUT tags text[]) LANGUAGE sql AS $$
	SELECT coalesce((SELECT array_agg(DISTINCT k ORDER BY k) FROM cachekit_queue, unnest(keys) k), '{}'),
		   coalesce((SELECT array_agg(DISTINCT t ORDER BY t) FROM cachekit_queue, unnest(tags) t), '{}')
$$;

-- 1. integers and text are printed without their output function: the
-- same text as the output function gives, for extreme values, padding,
-- domains, and next to types that still go through it
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE typed (id int8 PRIMARY KEY, s int2, i int4, t text, v varchar(10),
					c char(5), d posint, f float8, flag bool);
CREATE TRIGGER typed_row AFTER INSERT ON typed FOR EACH ROW
	EXECUTE FUNCTION cachekit_invalidate('k:{id}:{s}:{i}:{t}:{v}:{c}:{d}:{f}:{flag}');
INSERT INTO typed VALUES
	(-9223372036854775808, -32768, -2147483648, E'ü x\ty', 'v ', 'ab', 7, -0.0, true),
	(9223372036854775807, 32767, 2147483647, '', '', '', 1, 1e300, false),
	(0, 0, 0, '{}', 'x', 'abcde', 2147483647, '-0', false);
-- (the rows' keys are in one entry: a statement's invalidations are gathered)
SELECT k AS key,
	   k = format('k:%s:%s:%s:%s:%s:%s:%s:%s:%s', r.id, r.s, r.i, r.t, r.v, r.c, r.d, r.f, r.flag) AS same
FROM cachekit_queue q, unnest(q.keys) k, typed r
WHERE k LIKE 'k:' || r.id || ':%'
ORDER BY r.id;
TRUNCATE cachekit_queue;

-- 2. a statement's pass-by-value tag values are remembered: 3000 rows
-- with few distinct values give each tag once, NULLs none, and -0 and 0
-- (different datums, different text) both
CREATE TABLE many (id int PRIMARY KEY, flag bool, f float8, day date, n int8);
CREATE TRIGGER many_ins AFTER INSERT ON many REFERENCING NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate(
		'tag=flag:{flag}', 'tag=f:{f}', 'tag=day:{day}', 'tag=n:{n}', 'tag=pair:{flag}:{n}');
INSERT INTO many
SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END,
	   CASE WHEN g % 2 = 0 THEN '-0'::float8 ELSE 0 END,
	   date '2024-01-01' + g % 5, (g % 4) * 10000000000
FROM generate_series(1, 3000) g;
SELECT * FROM queued();
SELECT cardinality(tags) AS tags,
	   (SELECT count(DISTINCT flag) + count(DISTINCT f::text) + count(DISTINCT day) +
			   count(DISTINCT n) + count(DISTINCT (flag, n)) FILTER (WHERE flag IS NOT NULL)
		FROM many) AS expected
FROM queued();
TRUNCATE cachekit_queue;

-- 3. an UPDATE that assigns no templated column renders the old rows
-- only; whatever else can change a new row still counts
CREATE TABLE users (id int PRIMARY KEY, team_id int, note text);
INSERT INTO users (id, team_id) SELECT g, g % 3 FROM generate_series(1, 6) g;
CREATE TRIGGER users_stmt AFTER UPDATE ON users
	REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'tag=team:{team_id}');
UPDATE users SET note = 'a';
SELECT * FROM queued();
TRUNCATE cachekit_queue;
-- a generated column follows the column it is computed from
CREATE TABLE gen (id int PRIMARY KEY, team_id int, note text,
				  team_key int GENERATED ALWAYS AS (team_id * 10) STORED);
INSERT INTO gen (id, team_id) VALUES (1, 1), (2, 2);
CREATE TRIGGER gen_stmt AFTER UPDATE ON gen
	REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('gen:{id}', 'tag=tk:{team_key}');
UPDATE gen SET team_id = 7 WHERE id = 1;
SELECT * FROM queued();
TRUNCATE cachekit_queue;
-- a BEFORE ROW trigger that moves rows to another team
CREATE FUNCTION bump_team() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	NEW.team_id := NEW.team_id + 100;
	RETURN NEW;
END $$;
CREATE TRIGGER users_bump BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION bump_team();
UPDATE users SET note = 'b' WHERE id <= 2;
SELECT * FROM queued();
TRUNCATE cachekit_queue;
DROP TRIGGER users_bump ON users;
-- the same on a partition of a partitioned table, whose trigger the parent's
-- statement does not see
CREATE TABLE parts (id int, team_id int, note text) PARTITION BY RANGE (id);
CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (0) TO (100);
CREATE TABLE parts_high PARTITION OF parts FOR VALUES FROM (100) TO (200);
INSERT INTO parts VALUES (1, 1), (150, 2);
CREATE TRIGGER parts_stmt AFTER UPDATE ON parts
	REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('part:{id}', 'tag=team:{team_id}');
CREATE TRIGGER parts_bump BEFORE UPDATE ON parts_high FOR EACH ROW EXECUTE FUNCTION bump_team();
UPDATE parts SET note = 'c';
SELECT * FROM queued();
TRUNCATE cachekit_queue;
-- and on an inheritance child
CREATE TABLE base (id int, team_id int, note text);
CREATE TABLE child () INHERITS (base);
INSERT INTO child VALUES (5, 5);
CREATE TRIGGER base_stmt AFTER UPDATE ON base
	REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('base:{id}', 'tag=team:{team_id}');
CREATE TRIGGER child_bump BEFORE UPDATE ON child FOR EACH ROW EXECUTE FUNCTION bump_team();
UPDATE base SET note = 'd';
SELECT * FROM queued();
TRUNCATE cachekit_queue;
-- two UPDATEs of one table in one query (a data-modifying WITH) share the
-- transition tables, but the trigger sees the assigned columns of only one
-- of them: whichever fires it, the moved row's new team is flushed
WITH moved AS (UPDATE users SET team_id = 50 WHERE id = 3 RETURNING id)
UPDATE users SET note = 'e' WHERE id = 4;
SELECT * FROM queued();
TRUNCATE cachekit_queue;
WITH noted AS (UPDATE users SET note = 'f' WHERE id = 4 RETURNING id)
UPDATE users SET team_id = 60 WHERE id = 3;
SELECT * FROM queued();
TRUNCATE cachekit_queue;
-- and a plain UPDATE after that query
UPDATE users SET note = 'g' WHERE id = 4;
SELECT * FROM queued();
TRUNCATE cachekit_queue;

-- 4. keys of a column under a unique index are not checked for
-- duplicates; any other key is. A deferred unique constraint can hold
-- duplicates until commit, so it does not count.
CREATE TABLE dd (id int UNIQUE DEFERRABLE INITIALLY DEFERRED, team_id int);
CREATE TRIGGER dd_del AFTER DELETE ON dd REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('dd:{id}');
BEGIN;
-- two rows with id 1, far enough apart that the remembered values have
-- forgotten the first by the second
INSERT INTO dd VALUES (1, 1), (NULL, 3);
INSERT INTO dd SELECT g, 0 FROM generate_series(2, 20001) g;
INSERT INTO dd VALUES (1, 2), (NULL, 4);
DELETE FROM dd;
SELECT count(*) AS keys, count(DISTINCT k) AS distinct_keys,
	   count(*) FILTER (WHERE k = 'dd:1') AS dd_1
FROM cachekit_queue, unnest(keys) k;
ROLLBACK;
-- a non-unique column, and a unique index with a predicate, are checked too
CREATE TABLE pk (id int PRIMARY KEY, team_id int, code int);
CREATE UNIQUE INDEX pk_code ON pk (code) WHERE code > 0;
INSERT INTO pk SELECT g, g % 2, CASE WHEN g <= 2 THEN g ELSE -1 END FROM generate_series(1, 6) g;
CREATE TRIGGER pk_team AFTER DELETE ON pk REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('team:{team_id}');
CREATE TRIGGER pk_code AFTER DELETE ON pk REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('code:{code}');
CREATE TRIGGER pk_id AFTER DELETE ON pk REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('pk:{id}');
DELETE FROM pk;
SELECT (SELECT array_agg(k ORDER BY k) FROM unnest(keys) k) AS keys FROM cachekit_queue ORDER BY 1;
TRUNCATE cachekit_queue;

-- 5. a statement's entries fit a heap page: at most 1000 strings and about
-- 7 kB of them, a longer key alone in its own entry; none goes to the
-- queue's toast table
CREATE TABLE wide (id int PRIMARY KEY, name text);
CREATE TRIGGER wide_ins AFTER INSERT ON wide REFERENCING NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('wide:{id}:{name}', 'tag=w:{id}');
INSERT INTO wide SELECT g, repeat('n', g % 50) FROM generate_series(1, 5000) g;
SELECT pg_relation_size(reltoastrelid) AS toast_bytes FROM pg_class WHERE relname = 'cachekit_queue';
INSERT INTO wide VALUES (-1, repeat('x', 9000)), (-2, repeat('y', 9000));
SELECT count(*) > 10 AS several,
	   bool_and(cardinality(keys) + cardinality(tags) <= 1000) AS at_most_1000,
	   bool_and(pg_column_size(keys) + pg_column_size(tags) <= 8160) AS fit_a_page,
	   sum(cardinality(keys)) AS keys, sum(cardinality(tags)) AS tags
FROM cachekit_queue WHERE coalesce(keys[1], '') NOT LIKE 'wide:-%';
SELECT cardinality(keys) AS keys, cardinality(tags) AS tags, length(keys[1]) AS key_length
FROM cachekit_queue WHERE keys[1] LIKE 'wide:-%' ORDER BY keys[1];
SELECT option FROM pg_class, unnest(reloptions) option
WHERE relname = 'cachekit_queue' AND option ~ '^(toast_tuple_target|vacuum_truncate)' ORDER BY 1;
TRUNCATE cachekit_queue;

DROP TABLE typed, many, users, gen, parts, base, child, dd, pk, wide;
DROP FUNCTION queued(), bump_team();
DROP DOMAIN posint;
DROP EXTENSION cachekit;
