# test/t/001_harness.pl -- the test helpers themselves (test/perl/CachekitTest.pm):
# a private redis-server, redis-cli round trips, stop/start on the same
# port, pause/resume, and a node with cachekit preloaded whose worker starts.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

# ---- redis-server ----------------------------------------------------------

my $redis = start_redis();
ok($redis->{port} > 0 && $redis->{port} != 6379, "redis on a free port ($redis->{port})");
ok(redis_running($redis), 'redis-server process is running');
ok(-d $redis->{dir}, 'redis has its own folder');
is(redis_cmd($redis, 'PING'), 'PONG', 'PING answers PONG');

is(redis_cmd($redis, 'SET', 'greeting', "hello 'quoted' world"), 'OK', 'SET');
is(redis_cmd($redis, 'GET', 'greeting'), "hello 'quoted' world",
	'GET returns the value unchanged (spaces and quotes)');
is(redis_cmd($redis, 'GET', 'no:such:key'), '', 'GET of a missing key is empty');
is(redis_cmd($redis, 'SADD', 'tag:team:7', 'user:1', 'list:team:7'), '2', 'SADD');
is_deeply([ redis_keys($redis) ], [ 'greeting', 'tag:team:7' ], 'redis_keys lists all keys');
is_deeply([ redis_keys($redis, 'tag:*') ], ['tag:team:7'], 'redis_keys with a pattern');
ok(redis_exists($redis, 'greeting'), 'redis_exists: present');
ok(!redis_exists($redis, 'nope'), 'redis_exists: absent');
is(redis_cmd_stdin($redis, "line1\nline2", 'SET', 'multi'), 'OK', 'SET from stdin');
is(redis_cmd($redis, 'STRLEN', 'multi'), '11', 'value from stdin stored byte for byte');
like(redis_cmd($redis, 'NOSUCHCOMMAND'), qr/^ERR/, 'error replies come back as text');

# ---- stop and start again on the same port --------------------------------

my $port    = $redis->{port};
my $old_pid = $redis->{pid};
stop_redis($redis);
ok(!defined $redis->{pid}, 'stopped redis has no pid');
ok(!kill(0, $old_pid), 'old redis-server process is gone');
my ($rc) = redis_try_cmd($redis, 'PING');
isnt($rc, 0, 'nothing answers on the port after stop');
eval { redis_cmd($redis, 'PING') };
like($@, qr/redis command failed/, 'redis_cmd dies when redis is down');

restart_redis($redis);
is($redis->{port}, $port, 'restarted on the same port');
isnt($redis->{pid}, $old_pid, 'restarted as a new process');
is(redis_cmd($redis, 'PING'), 'PONG', 'restarted redis answers');
is(redis_cmd($redis, 'DBSIZE'), '0', 'restarted redis is empty (no persistence)');

# start_redis on a port that is already served must fail loudly
eval { start_redis(port => $port, timeout => 10) };
like($@, qr/exited during startup|did not answer/, 'start_redis on a busy port dies');
is(redis_cmd($redis, 'PING'), 'PONG', 'the first server is unaffected');

# ---- pause / resume -------------------------------------------------------

pause_redis($redis);
my ($prc) = redis_try_cmd($redis, 'PING');
isnt($prc, 0, 'a paused redis does not answer');
resume_redis($redis);
is(redis_cmd($redis, 'PING'), 'PONG', 'a resumed redis answers again');

# a second server alongside
my $redis2 = start_redis();
isnt($redis2->{port}, $redis->{port}, 'a second redis gets another port');
redis_cmd($redis2, 'SET', 'only', 'here');
is(redis_cmd($redis, 'EXISTS', 'only'), '0', 'the two servers are separate');
stop_redis($redis2);

# ---- wait_for -------------------------------------------------------------

my $n = 0;
ok(wait_for(sub { ++$n >= 3 }, 5), 'wait_for returns true once the condition holds');
ok(!wait_for(sub { 0 }, 0.2), 'wait_for returns false on timeout');
ok(!wait_for(sub { die "boom\n" }, 0.2), 'an exception in the condition counts as false');

# ---- a node with cachekit preloaded -------------------------------------

my $node = new_cachekit_node('main', $redis, 'cachekit.batch_size' => 100);
is($node->safe_psql('postgres', 'SHOW shared_preload_libraries'),
	'cachekit', 'cachekit is preloaded');
is($node->safe_psql('postgres', 'SHOW cachekit.redis_url'),
	redis_url($redis), 'cachekit.redis_url points at the test redis');
is($node->safe_psql('postgres', 'SHOW cachekit.database'), 'postgres', 'cachekit.database');

$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok( wait_for(
		sub {
			$node->safe_psql('postgres',
				'SELECT worker_pid IS NOT NULL FROM cachekit_stats') eq 't';
		},
		60),
	'the cachekit worker is running');
ok(wait_for_worker($node, 'postgres', 60), 'wait_for_worker agrees');

my $stats = cachekit_stats($node);
ok(exists $stats->{queue_depth} && exists $stats->{worker_pid},
	'cachekit_stats returns the view as a hash');
like($stats->{worker_pid} // '', qr/^\d+$/, 'worker_pid is a number');

# a manual delete goes through the worker to this redis
redis_cmd($redis, 'SET', 'homepage', '<html>');
$node->safe_psql('postgres', "SELECT cachekit_delete('homepage')");
ok(wait_for(sub { !redis_exists($redis, 'homepage') }, 60),
	'cachekit_delete reaches the test redis');
ok(wait_for_redis_connected($node, 'postgres', 60),
	'the worker reports its connection to the test redis');

$node->stop;
stop_redis($redis);
ok(!redis_running($redis), 'redis stopped at the end');

done_testing();
