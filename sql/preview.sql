-- cachekit_preview: what a trigger would enqueue, enqueueing nothing
CREATE EXTENSION cachekit;
\set SHOW_CONTEXT never
SET client_min_messages = warning;

CREATE TABLE users (id int PRIMARY KEY, email text, team_id int);
CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');
CREATE TRIGGER users_bulk AFTER UPDATE ON users
	REFERENCING OLD TABLE AS o NEW TABLE AS n
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'tag=team:{team_id}');
CREATE TRIGGER users_trunc AFTER TRUNCATE ON users
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('tag=users');
CREATE TABLE products (id int, sku text, price numeric(10,2), team_id int);
CREATE TRIGGER products_cache AFTER INSERT OR UPDATE OR DELETE ON products
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=product:{sku}', 'ttl=300', 'columns=id,sku,price', 'tag=team:{team_id}');

-- the README's example: a changed email deletes both email keys, flushes the team
SELECT * FROM cachekit_preview('users', 'users_cache', ROW(42, 'old@x', 7)::users, ROW(42, 'new@x', 7)::users);
-- INSERT and DELETE
SELECT * FROM cachekit_preview('users', 'users_cache', NULL, ROW(1, 'a@x', 3)::users);
SELECT * FROM cachekit_preview('users', 'users_cache', ROW(1, NULL, 3)::users, NULL);
-- a statement-level trigger renders one row as its statement renders each
SELECT * FROM cachekit_preview('users', 'users_bulk', ROW(1, 'a', 3)::users, ROW(1, 'a', 4)::users);
-- a change the trigger does not fire for gives nothing
SELECT * FROM cachekit_preview('users', 'users_bulk', NULL, ROW(1, 'a', 3)::users);
-- TRUNCATE: both rows NULL
SELECT * FROM cachekit_preview('users', 'users_trunc', NULL::users, NULL::users);
-- write-through: the value and its ttl
SELECT * FROM cachekit_preview('products', 'products_cache', NULL, ROW(1, 'ab-1', 9.5, 7)::products);
SELECT * FROM cachekit_preview('products', 'products_cache', ROW(1, 'ab-1', 9.5, 7)::products, ROW(1, 'ab-2', 9.5, 8)::products);
SELECT * FROM cachekit_preview('products', 'products_cache', ROW(1, 'ab-1', 9.5, 7)::products, ROW(1, 'ab-1', 10, 8)::products);
SELECT * FROM cachekit_preview('products', 'products_cache', ROW(1, 'ab-1', 9.5, 7)::products, NULL);
-- nothing was enqueued
SELECT count(*) FROM cachekit_queue;

-- errors
SELECT * FROM cachekit_preview('users', 'nope', NULL, ROW(1, 'a', 3)::users);
SELECT * FROM cachekit_preview('users', 'users_cache', NULL, ROW(1, 'x', 2, 9.5)::products);
CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER users_noop AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION noop();
SELECT * FROM cachekit_preview('users', 'users_noop', NULL, ROW(1, 'a', 3)::users);

-- not for PUBLIC
CREATE ROLE preview_nobody;
SET ROLE preview_nobody;
SELECT * FROM cachekit_preview('users', 'users_cache', NULL, ROW(1, 'a', 3)::users);
RESET ROLE;
DROP ROLE preview_nobody;

DROP TABLE users, products;
DROP FUNCTION noop();
DROP EXTENSION cachekit;
