-- cachekit_write_through: arguments, JSON rendering, queue entries
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

CREATE TABLE products (
	id int PRIMARY KEY,
	sku text,
	price numeric(10,2),
	active boolean,
	meta jsonb,
	team_id int
);

CREATE FUNCTION attach(VARIADIC args text[]) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	r text;
BEGIN
	DROP TRIGGER IF EXISTS p_cache ON products;
	r := try(format('CREATE TRIGGER p_cache AFTER INSERT OR UPDATE OR DELETE ON products FOR EACH ROW EXECUTE FUNCTION cachekit_write_through(%s)',
					(SELECT string_agg(quote_literal(a), ', ') FROM unnest(args) a)));
	IF r = 'ok' THEN
		r := try('INSERT INTO products VALUES (1000, ''x'', 1, true, NULL, 1)');
	ELSE
		r := 'CREATE TRIGGER: ' || r;
	END IF;
	DELETE FROM products WHERE id = 1000;
	DROP TRIGGER IF EXISTS p_cache ON products;
	RETURN r;
END $$;

-- argument errors
SELECT attach('ttl=30');
SELECT attach('key=a:{id}', 'key=b:{id}');
SELECT attach('key=p:{id}', 'ttl=abc');
SELECT attach('key=p:{id}', 'ttl=-1');
SELECT attach('key=p:{id}', 'ttl=99999999999');
SELECT attach('key=p:{id}', 'ttl=');
SELECT attach('key=p:{id}', 'ttl=1', 'ttl=2');
SELECT attach('key=p:{id}', 'columns=id,nope');
SELECT attach('key=p:{id}', 'columns=id,,sku');
SELECT attach('key=p:{id}', 'columns=id,id');
SELECT attach('key=p:{id}', 'columns=');
SELECT attach('key=p:{id}', 'colour=red');
SELECT attach('key=p:{nope}');
SELECT attach('key=p:{id', 'ttl=1');
SELECT attach('key=p:{id}', 'tag=t:{nope}');
-- and what is accepted
SELECT attach('p:{id}');
SELECT attach('key=p:{id}', 'ttl=0', 'columns= id , sku ', 'tag=t:{team_id}', 'tag=all');
TRUNCATE cachekit_queue;

-- wrong firing
SELECT try('CREATE TRIGGER p_before BEFORE INSERT ON products FOR EACH ROW EXECUTE FUNCTION cachekit_write_through(''key=p:{id}'')');
SELECT try('CREATE TRIGGER p_stmt AFTER INSERT ON products REFERENCING NEW TABLE AS n FOR EACH STATEMENT EXECUTE FUNCTION cachekit_write_through(''key=p:{id}'')');
SELECT try('CREATE TRIGGER p_trunc AFTER TRUNCATE ON products FOR EACH STATEMENT EXECUTE FUNCTION cachekit_write_through(''key=p'')');

-- the queue entries of each kind of change
CREATE TRIGGER p_cache AFTER INSERT OR UPDATE OR DELETE ON products
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through(
		'key=product:{sku}', 'ttl=300', 'columns=id,sku,price,active,meta', 'tag=team:{team_id}', 'tag=products');
INSERT INTO products VALUES (1, 'A1', 9.50, true, '{"colour": "red", "sizes": [1, 2]}', 7);
UPDATE products SET price = 10 WHERE id = 1;              -- same key: one write
UPDATE products SET team_id = 8 WHERE id = 1;             -- leaves team:7
UPDATE products SET sku = 'A2' WHERE id = 1;              -- old key dropped, new key written
UPDATE products SET sku = NULL WHERE id = 1;              -- no key any more: dropped
UPDATE products SET sku = 'A3', team_id = NULL WHERE id = 1; -- NULL tag skipped
DELETE FROM products WHERE id = 1;                        -- dropped, leaves its sets
SELECT kind, keys, tags, untags, value, ttl FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- the value is JSON equal to to_jsonb of the chosen columns
CREATE TABLE typed (
	id bigint PRIMARY KEY,
	n numeric,
	f float8,
	txt text,
	b boolean,
	ts timestamptz,
	d date,
	j json,
	jb jsonb,
	arr int[],
	tarr text[],
	nul text,
	iv interval,
	u uuid,
	by bytea
);
CREATE TRIGGER typed_cache AFTER INSERT ON typed
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=typed:{id}');
INSERT INTO typed VALUES (1, 12345678901234567890.5, 1.5e-7, E'quote" back\\ nl\n tab\t ü 日本', false,
	'2024-02-29 12:34:56.789+02', '2024-02-29', '{"a": [1, {"b": null}]}', '{"z": 1, "a": [true, "x"]}',
	'{1,2,3}', '{"a b",NULL,"c\"d"}', NULL, '1 day 02:03:04', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef');
SELECT value FROM cachekit_queue;
SELECT q.value::jsonb = to_jsonb(r) AS equal FROM cachekit_queue q, typed r;
TRUNCATE cachekit_queue;

-- the columns follow ALTER TABLE
ALTER TABLE typed DROP COLUMN by;
ALTER TABLE typed ADD COLUMN extra int DEFAULT 42;
INSERT INTO typed (id) VALUES (2);
SELECT q.value::jsonb = to_jsonb(r) AS equal FROM cachekit_queue q, typed r WHERE r.id = 2;
TRUNCATE cachekit_queue;

-- a row of built-in types is rendered without row_to_json, planned once per
-- trigger: its text is row_to_json's, byte for byte, under any session settings
CREATE TABLE plain (
	id int PRIMARY KEY,
	s smallint,
	big bigint,
	r real,
	f float8,
	n numeric(12,3),
	b boolean,
	t text,
	v varchar(8),
	c char(4),
	u uuid,
	d date,
	ts timestamp,
	tz timestamptz,
	j json,
	jb jsonb,
	"odd ""name"" ü" text
);
CREATE TRIGGER plain_cache AFTER INSERT OR UPDATE ON plain
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=plain:{id}');
CREATE TRIGGER plain_some AFTER INSERT OR UPDATE ON plain
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=some:{id}', 'columns=tz,id,odd "name" ü,n');
INSERT INTO plain VALUES
	(1, -32768, 9223372036854775807, 'NaN', '-Infinity', 'NaN', true,
	 E'q" b\\ \n\t\u0001 ü 日本 \u2028', 'ab', 'x', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
	 'infinity', '-infinity', '2024-02-29 12:34:56.789+02', '[1, "a", {"b" : null}]',
	 '{"b": 2, "a": [1.50, "x"]}', ''),
	(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
	 NULL, NULL, NULL),
	(3, 0, -1, 1.5e-7, 1e300, -0.5, false, '', '', '', '00000000-0000-0000-0000-000000000000',
	 '4713-01-01 BC', '2000-01-01 00:00:00.000001', '1999-12-31 23:59:59.999999-11:30',
	 '"str"', 'null', E'tab\there'),
	(4, 7, 42, 'Infinity', 3.141592653589793, 123456789.125, true, 'plain', 'eight ch',
	 'ab', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '2024-02-29', 'infinity', '-infinity',
	 '12', '-0.0', 'z');
SELECT q.keys, q.value FROM cachekit_queue q ORDER BY q.id;
CREATE FUNCTION same_as_row_to_json() RETURNS TABLE (rows bigint, same bigint) LANGUAGE sql AS $$
	SELECT count(*), count(*) FILTER (WHERE q.value = CASE q.keys[1] WHEN 'plain:' || p.id
		THEN row_to_json(p)::text
		ELSE (SELECT row_to_json(x)::text FROM (SELECT p.tz, p.id, p."odd ""name"" ü", p.n) x) END)
	FROM cachekit_queue q JOIN plain p ON q.keys[1] IN ('plain:' || p.id, 'some:' || p.id)
$$;
SELECT * FROM same_as_row_to_json();
TRUNCATE cachekit_queue;
-- output functions and time zones are the session's at each row
SET TimeZone = 'Asia/Kolkata';
SET extra_float_digits = 0;
SET DateStyle = 'SQL, DMY';
UPDATE plain SET id = id;
SELECT * FROM same_as_row_to_json();
SELECT value FROM cachekit_queue WHERE keys[1] = 'some:3';
RESET TimeZone;
RESET extra_float_digits;
RESET DateStyle;
TRUNCATE cachekit_queue;
-- a changed column type changes the plan
ALTER TABLE plain ALTER COLUMN s TYPE text;
UPDATE plain SET id = id WHERE id = 4;
SELECT * FROM same_as_row_to_json();
SELECT value FROM cachekit_queue WHERE keys[1] = 'plain:4';
TRUNCATE cachekit_queue;
-- a column of another type leaves the row to row_to_json: a domain, an
-- enum with a cast to json, an array
CREATE DOMAIN small_count AS int CHECK (VALUE >= 0);
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql IMMUTABLE
	AS $$ SELECT json_build_object('mood', $1::text) $$;
CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
ALTER TABLE plain ADD COLUMN m mood DEFAULT 'happy', ADD COLUMN k small_count DEFAULT 3,
	ADD COLUMN a int[] DEFAULT '{1,2}';
UPDATE plain SET id = id WHERE id = 4;
SELECT value FROM cachekit_queue WHERE keys[1] = 'plain:4';
SELECT * FROM same_as_row_to_json();
TRUNCATE cachekit_queue;
DROP TABLE plain;
DROP FUNCTION same_as_row_to_json();
DROP CAST (mood AS json);
DROP FUNCTION mood_json(mood);
DROP TYPE mood;
DROP DOMAIN small_count;

-- a value over cachekit.max_value_bytes (a superuser-only reloadable
-- setting; the default is 512kB) deletes the key instead, and is counted in
-- cachekit_stats.values_too_large once delivered (never here: this
-- database's queue is not served)
CREATE TABLE big (id int PRIMARY KEY, body text);
CREATE TRIGGER big_cache AFTER INSERT OR UPDATE ON big
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=big:{id}', 'tag=bigs');
SELECT values_too_large AS before FROM cachekit_stats \gset
INSERT INTO big VALUES (1, repeat('x', 600 * 1024));
INSERT INTO big VALUES (2, repeat('x', 100));
SELECT kind, keys, tags, untags, length(value) FROM cachekit_queue ORDER BY id;
SELECT values_too_large - :before AS counted FROM cachekit_stats;
TRUNCATE cachekit_queue;

-- both trigger functions on one table
CREATE TRIGGER p_listing AFTER INSERT OR UPDATE OR DELETE ON products
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('tag=listing', 'products:count');
INSERT INTO products VALUES (2, 'B1', 1, true, NULL, 7);
SELECT kind, keys, tags, untags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- replaying a dead write-through entry deletes its key rather than writing an old value
INSERT INTO cachekit_dead_letter (id, kind, keys, tags, untags, value, ttl, attempts, error, enqueued_at)
VALUES (7, 'w', '{product:Z}', '{team:1}', '{team:0}', '{"old":true}', 60, 5, 'WRONGTYPE', now());
SELECT cachekit_replay_dead_letters();
SELECT kind, keys, tags, untags, value, ttl FROM cachekit_queue;

DROP TABLE products, typed, big;
DROP FUNCTION attach(text[]);
DROP FUNCTION try(text);
DROP EXTENSION cachekit;
