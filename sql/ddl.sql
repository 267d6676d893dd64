-- Migrations and cachekit triggers: arguments checked at CREATE TRIGGER
-- (also for partitions), renamed columns followed, dropped and retyped
-- columns refused while a trigger uses them
CREATE EXTENSION cachekit;
\set SHOW_CONTEXT never
SET client_min_messages = warning;

CREATE FUNCTION args(tbl regclass) RETURNS TABLE (trigger name, args text) LANGUAGE sql AS $$
	SELECT tgname, encode(tgargs, 'escape') FROM pg_trigger WHERE tgrelid = tbl ORDER BY tgname
$$;

CREATE TABLE users (id int PRIMARY KEY, email text, team_id int, name text, note text);
CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');
CREATE TRIGGER users_wt AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=u:{id}', 'columns=id, email,name', 'tag=t:{team_id}:{{x}}');
-- the trigger depends on the columns its arguments name
SELECT tgname, attname
FROM pg_depend JOIN pg_trigger t ON t.oid = objid
	JOIN pg_attribute ON attrelid = refobjid AND attnum = refobjsubid
WHERE classid = 'pg_trigger'::regclass AND refobjid = 'users'::regclass
ORDER BY 1, 2;

-- RENAME COLUMN follows into the arguments, and writes go on
ALTER TABLE users RENAME COLUMN id TO uid;
ALTER TABLE users RENAME COLUMN email TO "e mail";
ALTER TABLE users RENAME COLUMN team_id TO team;
SELECT * FROM args('users');
INSERT INTO users VALUES (1, 'a@x', 7, 'Ann', 'n');
SELECT kind, keys, tags, untags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;
-- a name a placeholder or a columns= list cannot hold is refused, naming the trigger
ALTER TABLE users RENAME COLUMN team TO "te{am}";
ALTER TABLE users RENAME COLUMN name TO "a,b";
-- columns no trigger uses rename freely
ALTER TABLE users RENAME COLUMN note TO remark;
SELECT * FROM args('users');

-- DROP COLUMN of a used column is refused; CASCADE drops the trigger
ALTER TABLE users DROP COLUMN team;
ALTER TABLE users DROP COLUMN name;
ALTER TABLE users DROP COLUMN remark;
-- a type change of a used column is refused, naming the trigger
ALTER TABLE users ALTER COLUMN team TYPE bigint;
ALTER TABLE users DROP COLUMN team CASCADE;
SELECT * FROM args('users');
INSERT INTO users VALUES (2, 'b@x', 'Bob');
SELECT kind, keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;

-- partitions: the trigger is checked on every clone, and renames reach them
CREATE TABLE orders (id int, region text, total numeric) PARTITION BY LIST (region);
CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
CREATE TRIGGER orders_cache AFTER INSERT OR UPDATE OR DELETE ON orders
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('order:{id}', 'tag=region:{region}');
-- a partition with its columns in another order
CREATE TABLE orders_us (total numeric, region text, id int);
ALTER TABLE orders ATTACH PARTITION orders_us FOR VALUES IN ('us');
CREATE TABLE orders_asia PARTITION OF orders FOR VALUES IN ('asia');
ALTER TABLE orders RENAME COLUMN id TO order_id;
SELECT * FROM args('orders_us');
SELECT * FROM args('orders_asia');
INSERT INTO orders VALUES (1, 'eu', 1), (2, 'us', 2), (3, 'asia', 3);
SELECT keys, tags FROM cachekit_queue ORDER BY id;
TRUNCATE cachekit_queue;
ALTER TABLE orders DROP COLUMN order_id;
-- a bad template on a partitioned table is refused before any clone
CREATE TRIGGER orders_bad AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('o:{nope}');
SELECT count(*) FROM pg_trigger WHERE tgname = 'orders_bad';

-- inheritance children: a rename of the parent's column reaches their triggers
CREATE TABLE animals (id int, kind text);
CREATE TABLE dogs () INHERITS (animals);
CREATE TRIGGER dogs_cache AFTER INSERT ON dogs
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('animal:{kind}:{id}');
ALTER TABLE animals RENAME COLUMN kind TO species;
SELECT * FROM args('dogs');
INSERT INTO dogs VALUES (1, 'dog');
SELECT keys FROM cachekit_queue;
TRUNCATE cachekit_queue;

-- a rolled-back rename leaves the arguments as they were
BEGIN;
ALTER TABLE animals RENAME COLUMN species TO sp;
ROLLBACK;
SELECT * FROM args('dogs');

-- CREATE OR REPLACE TRIGGER is checked too, and keeps the old one on error
CREATE OR REPLACE TRIGGER dogs_cache AFTER INSERT ON dogs FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('a:{nope}');
SELECT * FROM args('dogs');
-- a valid replacement's dependencies are its own
CREATE OR REPLACE TRIGGER dogs_cache AFTER INSERT ON dogs FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('animal:{id}');
ALTER TABLE animals DROP COLUMN species;
SELECT * FROM args('dogs');

DROP TABLE users, orders, animals, dogs;
DROP FUNCTION args(regclass);
DROP EXTENSION cachekit;
