-- Template rendering: placeholders, escaping, NULLs, types, odd bytes
CREATE EXTENSION cachekit;

CREATE TABLE items (
	id int PRIMARY KEY,
	name text,
	price numeric(10,2),
	active boolean,
	born date,
	tags text[],
	"Mixed Case" text
);

CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate(
		'item:{id}',
		'key=item:name:{name}',
		'key=lit:{{braces}}:{id}',
		'key=p:{price}:a:{active}:d:{born}:t:{tags}',
		'key={Mixed Case}',
		'tag=items',
		'tag=item-tag:{id}');

-- INSERT renders from NEW
INSERT INTO items VALUES (1, 'apple', 1.5, true, '2024-02-29', '{a,b}', 'X');
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- a NULL column skips that key only
INSERT INTO items VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL);
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- UPDATE renders from OLD and NEW: both keys when they differ, once when equal
UPDATE items SET name = 'pear' WHERE id = 1;
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- DELETE renders from OLD
DELETE FROM items WHERE id = 2;
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- values with spaces, quotes, newlines, braces and non-ASCII text pass unchanged
UPDATE items SET name = E'it''s a "b\r\nc" {x} ü 日本' WHERE id = 1;
SELECT keys[array_upper(keys, 1)] AS new_key FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- 10 kB keys are fine
UPDATE items SET name = repeat('k', 10000) WHERE id = 1;
SELECT length(keys[array_upper(keys, 1)]) FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- a renamed column is followed into the trigger's arguments (the parsed
-- trigger is thrown away by the rename), and renamed back again
ALTER TABLE items RENAME COLUMN name TO title;
UPDATE items SET price = 2 WHERE id = 1;
ALTER TABLE items RENAME COLUMN title TO name;
UPDATE items SET price = 3 WHERE id = 1;
SELECT keys[1] FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- a trigger with only tags, on a table whose rows produce nothing
CREATE TABLE notes (id int, team int);
CREATE TRIGGER notes_cache AFTER INSERT ON notes
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('tag=team:{team}');
INSERT INTO notes VALUES (1, NULL);
INSERT INTO notes VALUES (2, 7), (3, 7);
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- TRUNCATE triggers take templates without placeholders
CREATE TRIGGER notes_truncate AFTER TRUNCATE ON notes
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('notes:all', 'tag=notes', 'key={{literal}}');
TRUNCATE notes;
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- a rolled back statement leaves nothing
BEGIN;
INSERT INTO notes VALUES (4, 8);
ROLLBACK;
BEGIN;
SAVEPOINT s;
INSERT INTO notes VALUES (5, 9);
ROLLBACK TO SAVEPOINT s;
INSERT INTO notes VALUES (6, 10);
COMMIT;
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

DROP TABLE items, notes;
DROP EXTENSION cachekit;

-- statement-level triggers read the transition tables: one entry per
-- statement (or per page of keys and tags), each key and tag once
CREATE EXTENSION cachekit;
CREATE TABLE users (id int PRIMARY KEY, email text, team_id int);
INSERT INTO users SELECT g, 'u' || g || '@x', g % 3 FROM generate_series(1, 10) g;
CREATE TRIGGER users_stmt AFTER UPDATE ON users
	REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'key=email:{email}', 'tag=team:{team_id}');
CREATE TRIGGER users_stmt_ins AFTER INSERT ON users
	REFERENCING NEW TABLE AS new_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'tag=team:{team_id}');
CREATE TRIGGER users_stmt_del AFTER DELETE ON users
	REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'tag=team:{team_id}');
UPDATE users SET team_id = 5 WHERE id <= 4;
SELECT kind, (SELECT array_agg(x ORDER BY x) FROM unnest(keys) x) AS keys,
	   (SELECT array_agg(x ORDER BY x) FROM unnest(tags) x) AS tags
FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;
UPDATE users SET email = NULL WHERE id = 1;
INSERT INTO users VALUES (11, 'a', 1), (12, 'b', 1);
DELETE FROM users WHERE id > 10;
UPDATE users SET team_id = team_id WHERE false;
SELECT kind, (SELECT array_agg(x ORDER BY x) FROM unnest(keys) x) AS keys,
	   (SELECT array_agg(x ORDER BY x) FROM unnest(tags) x) AS tags
FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;
-- a large statement is split into entries of at most 1000 keys and tags
-- that fit a heap page (about 7 kB of them)
UPDATE users SET id = id + 0;
INSERT INTO users SELECT g, NULL, g % 7 FROM generate_series(100, 2599) g;
SELECT kind, cardinality(keys) AS keys, cardinality(tags) AS tags FROM cachekit_queue ORDER BY id;
SELECT count(DISTINCT k) AS distinct_keys, count(*) AS keys FROM cachekit_queue, unnest(keys) k;
TRUNCATE cachekit_queue;
DROP TABLE users;
DROP EXTENSION cachekit;
