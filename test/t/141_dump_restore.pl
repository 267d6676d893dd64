# test/t/141_dump_restore.pl -- pg_dump and pg_restore of a database that
# uses cachekit (issue 9, item 3).
#
# A database with row, statement, write-through and partitioned-table
# triggers (one of them after a column rename), dead letters and queue
# entries still in flight is dumped with pg_dump -Fc and restored with
# pg_restore into a fresh database of another server with cachekit
# preloaded. There: every trigger is back and works (its keys reach
# Redis), the triggers again depend on their columns, the dead letters are
# back with their ids and replay, later queue ids do not collide with them,
# and the in-flight entries are not replayed.

use strict;
use warnings;

use File::Temp ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

# the source server has no Redis: what it enqueues stays in flight
my $src = new_cachekit_node('dumpsrc', undef);
$src->safe_psql('postgres', 'CREATE EXTENSION cachekit');
$src->safe_psql('postgres', <<'EOF');
CREATE TABLE users (id int PRIMARY KEY, email text, team_id int);
CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');
CREATE TRIGGER users_bulk AFTER DELETE ON users REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('gone:{id}');
CREATE TRIGGER users_trunc AFTER TRUNCATE ON users
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('tag=all-users');
CREATE TABLE products (id int PRIMARY KEY, code text, price numeric(10,2));
CREATE TRIGGER products_cache AFTER INSERT OR UPDATE OR DELETE ON products
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=product:{code}', 'columns=id,code,price');
-- a migration before the dump: the trigger follows the rename
ALTER TABLE products RENAME COLUMN code TO sku;
CREATE TABLE orders (id int, region text) PARTITION BY LIST (region);
CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
CREATE TRIGGER orders_cache AFTER INSERT OR UPDATE OR DELETE ON orders
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('order:{id}');

INSERT INTO users VALUES (1, 'a@x', 7), (2, 'b@x', 7);
INSERT INTO products VALUES (1, 'p-1', 9.5);
INSERT INTO orders VALUES (1, 'eu');
-- two dead letters, moved from the queue with their ids as the worker does
SELECT cachekit_delete('dead:1');
SELECT cachekit_flush_tag('dead-tag');
WITH moved AS (
	DELETE FROM cachekit_queue WHERE 'dead:1' = ANY (keys) OR 'dead-tag' = ANY (tags) RETURNING *
)
INSERT INTO cachekit_dead_letter (id, kind, keys, tags, untags, value, ttl, attempts, error, enqueued_at)
SELECT id, kind, keys, tags, untags, value, ttl, 5, 'WRONGTYPE Operation against a key holding the wrong kind of value', enqueued_at
FROM moved;
EOF
my $dead = $src->safe_psql('postgres', q{SELECT string_agg(id || ':' || array_to_string(keys || tags, ','), ' ' ORDER BY id) FROM cachekit_dead_letter});
my $inflight = $src->safe_psql('postgres', 'SELECT count(*) FROM cachekit_queue');
ok($inflight > 0, "the source has $inflight entries in flight");
like($dead, qr/^\d+:dead:1 \d+:dead-tag$/, "the source has two dead letters ($dead)");

my $dir  = File::Temp::tempdir(CLEANUP => 1);
my $dump = "$dir/app.dump";
$src->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', 'postgres' ], 'pg_dump -Fc');

# the target serves database "restored", created empty and restored into
my $redis = start_redis();
my $dst = new_cachekit_node('dumpdst', $redis,
	'cachekit.database' => 'restored', 'cachekit.retry_max_delay' => '200ms');
$dst->safe_psql('postgres', 'CREATE DATABASE restored');
$dst->command_ok([ 'pg_restore', '--exit-on-error', '-d', 'restored', $dump ], 'pg_restore');
ok(wait_for_worker($dst, 'restored', 60), 'the worker serves the restored database');

sub sql { return $dst->safe_psql('restored', $_[0]); }

is(sql(q{SELECT string_agg(tgname || '=' || encode(tgargs, 'escape'), ' ' ORDER BY tgname)
		 FROM pg_trigger WHERE tgrelid = 'products'::regclass}),
	'products_cache=key=product:{sku}\000columns=id,sku,price\000',
	'the renamed column is in the restored trigger');
is(sql(q{SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
		 WHERE p.proname IN ('cachekit_invalidate', 'cachekit_write_through')}),
	'6', 'every cachekit trigger is back (with the partition\'s clone)');
is(sql('SELECT count(*) FROM cachekit_queue'), '0', 'the in-flight entries are not replayed');
is(sql(q{SELECT string_agg(id || ':' || array_to_string(keys || tags, ','), ' ' ORDER BY id) FROM cachekit_dead_letter}),
	$dead, 'the dead letters are back with their ids');
my $max_dead = sql('SELECT max(id) FROM cachekit_dead_letter');
# the id a new entry would get (entries are written at commit, pending.c)
my $next = sql(q{SELECT nextval('cachekit_queue_id_seq')});
($next) = $next =~ /(\d+)\s*$/;
ok($max_dead ne '' && $next > $max_dead,
	"a new entry's id ($next) comes after the dead letters' ($max_dead)");

# the triggers work: each change reaches Redis
redis_cmd($redis, 'SET', $_, 'cached') for qw(user:1 user:email:b@x gone:2 order:1 product:p-1);
redis_cmd($redis, 'SADD', 'tag:team:7', 'team-member');
sql(q{
	UPDATE users SET email = 'a2@x' WHERE id = 1;
	DELETE FROM users WHERE id = 2;
	UPDATE products SET price = 10 WHERE id = 1;
	UPDATE orders SET region = 'eu' WHERE id = 1;
});
is(sql(q{SELECT cachekit_wait('30 seconds')}), 't', 'the restored database\'s work is delivered');
ok(!redis_exists($redis, $_), "$_ deleted") for qw(user:1 user:email:b@x gone:2 order:1 team-member);
is(redis_cmd($redis, 'GET', 'product:p-1'), '{"id":1,"sku":"p-1","price":10.00}',
	'the write-through trigger wrote the new row');

# the restored triggers depend on their columns again
my ($rc, $out, $err) = $dst->psql('restored', 'ALTER TABLE users DROP COLUMN email');
like($err, qr/trigger users_cache on table users depends on column email/,
	'DROP COLUMN of a used column is refused after the restore');

# and the dead letters replay
redis_cmd($redis, 'SET', 'dead:1', 'cached');
is(sql('SELECT cachekit_replay_dead_letters()'), '2', 'the restored dead letters replay');
is(sql(q{SELECT cachekit_wait('30 seconds')}), 't', '... and are delivered');
ok(!redis_exists($redis, 'dead:1'), 'the dead letter\'s key is deleted');

done_testing();
