# test/t/181_library_old_sql.pl -- the current shared library under the
# 0.1.0 SQL objects: what a server runs between installing a new package (or
# "make install") and ALTER EXTENSION cachekit UPDATE. Every 0.1.0 function
# and trigger works, the worker delivers, nothing crashes; then the update
# goes through with the worker running and delivery goes on.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('oldsql', $redis,
	'cachekit.max_attempts'    => '2',
	'cachekit.dead_letter_after' => '0',
	'cachekit.retry_max_delay' => '200ms');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub delivered { return sql(q{SELECT cachekit_wait('60 seconds')}) eq 't'; }

sql(q{CREATE EXTENSION cachekit VERSION '0.1.0'});
is(sql(q{SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'cachekit'}),
	'0.1.0', 'the SQL objects are 0.1.0');
ok(wait_for_worker($node), 'the worker runs for a 0.1.0 installation');
ok(wait_for_redis_connected($node), 'the worker connects to Redis');

# every 0.1.0 entry point, called through its 0.1.0 declaration
sql(q{
	CREATE TABLE users (id int PRIMARY KEY, email text, team_id int);
	CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'tag=team:{team_id}');
	CREATE TRIGGER users_cache_bulk AFTER UPDATE ON users
	  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
	  FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('bulk:{id}');
	CREATE TRIGGER users_truncate AFTER TRUNCATE ON users
	  FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('users:all');
	CREATE TABLE products (id int PRIMARY KEY, sku text, grp text);
	CREATE TRIGGER products_cache AFTER INSERT OR UPDATE OR DELETE ON products
	  FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=product:{sku}', 'ttl=300', 'tag=grp:{grp}');
	INSERT INTO users SELECT g, 'u' || g, 1 FROM pg_catalog.generate_series(1, 5) g;
});
ok(delivered(), 'inserts delivered');

redis_cmd($redis, 'SET', $_, 'cached') for qw(user:1 user:2 bulk:3 users:all page manual);
redis_cmd($redis, 'SADD', 'tag:team:1', 'page');
redis_cmd($redis, 'SADD', 'tag:manual', 'manual');
sql(q{UPDATE users SET email = 'x' WHERE id = 1});
sql(q{DELETE FROM users WHERE id = 2});
sql(q{UPDATE users SET email = 'y' WHERE id = 3});
sql(q{SELECT cachekit_delete('gone1', 'gone2'), cachekit_flush_tag('manual')});
sql(q{INSERT INTO products VALUES (1, 'a1', 'g1')});
ok(delivered(), 'cachekit_wait under 0.1.0 SQL');
ok(!redis_exists($redis, 'user:1'),  'row trigger: UPDATE delivered');
ok(!redis_exists($redis, 'user:2'),  'row trigger: DELETE delivered');
ok(!redis_exists($redis, 'page'),    'tag flush delivered');
ok(!redis_exists($redis, 'bulk:3'),  'statement trigger delivered');
ok(!redis_exists($redis, 'manual'),  'cachekit_flush_tag delivered');
like(redis_cmd($redis, 'GET', 'product:a1'), qr/"sku":\s*"a1"/, 'write-through delivered');
cmp_ok(redis_cmd($redis, 'TTL', 'product:a1'), '>', 0, 'write-through ttl');
sql(q{TRUNCATE users});
ok(delivered() && !redis_exists($redis, 'users:all'), 'TRUNCATE trigger delivered');

# the worker's figures through the 0.1.0 view and function
my $stats = cachekit_stats($node);
is($stats->{redis_connected}, 'true', 'cachekit_stats: connected');
# (a statement's or transaction's invalidations are one entry, pending.c)
cmp_ok($stats->{entries_delivered}, '>=', 5, 'cachekit_stats: entries delivered counted');
is($stats->{queue_depth}, '0', 'cachekit_stats: queue empty');
like(sql(q{SELECT worker_pid FROM cachekit_worker_state()}), qr/^\d+$/,
	'cachekit_worker_state() answers');

# dead letters and their replay
redis_cmd($redis, 'SET', 'tag:poisoned', 'string');
sql(q{SELECT cachekit_flush_tag('poisoned')});
ok(wait_for(sub { sql(q{SELECT count(*) FROM cachekit_dead_letter}) eq '1' }),
	'a refused entry becomes a dead letter');
redis_cmd($redis, 'DEL', 'tag:poisoned');
is(sql(q{SELECT cachekit_replay_dead_letters()}), '1', 'cachekit_replay_dead_letters() under 0.1.0');
ok(delivered(), 'the replayed entry is delivered');
is(sql(q{SELECT count(*) FROM cachekit_dead_letter}), '0', 'no dead letter left');

# Redis down and back: the worker's retry path with the old tables
stop_redis($redis);
sql(q{INSERT INTO users VALUES (10, 'z', 2)});
$redis = restart_redis($redis);
redis_cmd($redis, 'SET', 'user:10', 'cached');
sql(q{UPDATE users SET email = 'zz' WHERE id = 10});
ok(delivered(), 'delivery resumes after a Redis restart');
ok(!redis_exists($redis, 'user:10'), 'work queued during the outage is delivered');

# the update itself, with the worker running and work queued
sql(q{INSERT INTO products VALUES (2, 'b2', 'g1')});
sql(q{ALTER EXTENSION cachekit UPDATE});
isnt(sql(q{SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'cachekit'}),
	'0.1.0', 'updated while the worker runs');
redis_cmd($redis, 'SET', 'user:10', 'cached');
sql(q{DELETE FROM users WHERE id = 10});
ok(delivered(), 'delivery goes on after the update');
ok(!redis_exists($redis, 'user:10'), 'trigger after the update delivered');
like(redis_cmd($redis, 'GET', 'product:b2'), qr/"sku":\s*"b2"/, 'work queued before the update delivered');

unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC|TRAP:|server process .* exited with exit code [^0]/,
	'no crash in the server log');

$node->stop;
done_testing();
