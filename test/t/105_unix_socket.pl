# test/t/105_unix_socket.pl -- delivery to a Redis on a unix socket
# (unix:///path?db=N, with a password as in redis://), and a socket that is
# missing gives one clear log line and last_error while the worker retries.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;
use CachekitFault;

my $PW = 'unix-Secret-pw';
my $redis = start_unix_redis(password => $PW);
ok(-S $redis->{socket}, 'redis-server listens on its unix socket');

my $url = "unix://:$PW\@$redis->{socket}?db=3";
my $node = new_cachekit_node('unix', $url, 'cachekit.retry_max_delay' => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_redis_connected($node, 'postgres', 60), 'connected over the unix socket');
like(slurp_file($node->logfile), qr/connected to Redis at unix socket \Q$redis->{socket}\E db 3/,
	'the log names the socket and the database');

redis_cmd($redis, '-n', '3', 'SET', 'u:1', 'x');
redis_cmd($redis, 'SET', 'u:1', 'db0');
$node->safe_psql('postgres', q{SELECT cachekit_delete('u:1')});
ok(wait_for(sub { redis_cmd($redis, '-n', '3', 'EXISTS', 'u:1') eq '0' }, 60),
	'delivered over the unix socket to database 3');
is(redis_cmd($redis, 'GET', 'u:1'), 'db0', 'database 0 untouched');

my @clients = grep { /laddr=\Q$redis->{socket}\E|addr=\/|flags=U/ } split /\n/,
  redis_cmd($redis, 'CLIENT', 'LIST');
ok(scalar(grep { /db=3/ } @clients) >= 1, 'Redis lists the worker as a unix-socket client on db 3');

# a socket path where nothing listens
my $offset = log_offset($node);
my $missing = "$redis->{socket}.missing";
conf_set_and_reload($node, 'cachekit.redis_url', "unix://:$PW\@$missing");
my $st;
ok( wait_for(
		sub {
			$st = cachekit_stats($node);
			($st->{last_error} // '') =~ /could not connect to unix socket "\Q$missing\E": No such file/;
		},
		60),
	'a missing socket: last_error says so')
  or diag 'last_error: ' . ($st->{last_error} // '(none)');
redis_cmd($redis, '-n', '3', 'SET', 'u:2', 'x');
$node->safe_psql('postgres', q{SELECT cachekit_delete('u:2')});
my $failed = $st->{failed_attempts};
ok(wait_for(sub { cachekit_stats($node)->{failed_attempts} >= $failed + 3 }, 60), 'the worker keeps retrying');
is(count_matches(log_since($node, $offset), qr/cachekit worker cannot reach Redis.*unix socket/), 1,
	'one log line for it');

is(redis_cmd($redis, '-n', '3', 'EXISTS', 'u:2'), '1', 'the key waits meanwhile');
conf_set_and_reload($node, 'cachekit.redis_url', $url);
ok(wait_for(sub { redis_cmd($redis, '-n', '3', 'EXISTS', 'u:2') eq '0' }, 60),
	'the waiting entry is delivered once the socket is back');

my @leaks = grep { /\Q$PW\E/ } split /\n/, slurp_file($node->logfile);
is(scalar @leaks, 0, 'the password appears nowhere in the log');

$node->stop;
done_testing();
