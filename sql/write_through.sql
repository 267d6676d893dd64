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
