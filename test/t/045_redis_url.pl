# test/t/045_redis_url.pl -- cachekit.redis_url: a change through ALTER
# SYSTEM and pg_reload_conf() moves delivery to another redis-server (and
# database number); a Redis that requires a password refuses a missing or
# wrong one, which shows in cachekit_stats without the password ever reaching
# the server log; fixing the URL delivers the backlog.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis1 = start_redis();
my $redis2 = start_redis();
my $node   = new_cachekit_node('url', $redis1,
	'cachekit.retry_max_delay' => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub delivered
{
	return sql("SELECT cachekit_wait('10 seconds')") eq 't';
}

sub queue_depth { return sql('SELECT queue_depth FROM cachekit_stats'); }

sub worker_client_ids
{
	my ($r) = @_;
	my @ids;
	for my $line (split /\n/, redis_cmd($r, 'CLIENT', 'LIST'))
	{
		next if $line =~ /\bcmd=client\|list\b/;
		push @ids, $1 if $line =~ /^id=(\d+)/;
	}
	return @ids;
}

my $probe_seq = 0;

# reload; wait until the worker, connected to database $db of $r, has
# dropped that connection
sub reload_and_wait
{
	my ($r, $db) = @_;
	my @sel = ('-n', $db // 0);
	my $probe = 'probe:' . ++$probe_seq;
	redis_cmd($r, @sel, 'SET', $probe, 'x');
	sql("SELECT cachekit_delete('$probe')");
	ok(delivered() && redis_cmd($r, @sel, 'EXISTS', $probe) eq '0',
		'worker is connected before the reload');
	my %old = map { ($_ => 1) } worker_client_ids($r);
	sql('SELECT pg_reload_conf()');
	ok(%old && wait_for(sub { !grep { $old{$_} } worker_client_ids($r) }, 20),
		'worker dropped its connection: it has reloaded');
	return;
}

# ---- 9. moving to a second redis-server ---------------------------------

redis_cmd($_, 'SET', 'moved:1', 'x') for $redis1, $redis2;
sql(q{SELECT cachekit_delete('moved:1')});
ok(delivered(), 'delivered');
ok(!redis_exists($redis1, 'moved:1') && redis_exists($redis2, 'moved:1'),
	'at first the worker delivers to the first server only');

my $url2 = redis_url($redis2);
sql(qq{ALTER SYSTEM SET cachekit.redis_url = '$url2'});
reload_and_wait($redis1);

redis_cmd($_, 'SET', 'moved:2', 'x') for $redis1, $redis2;
sql(q{SELECT cachekit_delete('moved:2')});
ok(delivered(), 'delivered after the change');
ok(!redis_exists($redis2, 'moved:2'), 'the key was deleted in the second server');
ok(redis_exists($redis1, 'moved:2'), 'the first server is no longer touched');
my $port2 = $redis2->{port};
like(slurp_file($node->logfile), qr/cachekit worker connected to Redis at 127\.0\.0\.1:$port2\/0/,
	'the log names the new server');

# another database number on the same server
my $url2db3 = redis_url($redis2, 3);
sql(qq{ALTER SYSTEM SET cachekit.redis_url = '$url2db3'});
reload_and_wait($redis2);
redis_cmd($redis2, 'SET', 'moved:3', 'db0');
redis_cmd($redis2, '-n', '3', 'SET', 'moved:3', 'db3');
sql(q{SELECT cachekit_delete('moved:3')});
ok(delivered(), 'delivered to database 3');
is(redis_cmd($redis2, '-n', '3', 'EXISTS', 'moved:3'), '0', 'deleted in database 3');
is(redis_cmd($redis2, 'GET', 'moved:3'), 'db0', 'database 0 is not touched');

# an invalid URL is refused by the reload and the working one is kept
my ($rc, $out, $err) = $node->psql('postgres',
	q{ALTER SYSTEM SET cachekit.redis_url = 'http://nope'});
isnt($rc, 0, 'ALTER SYSTEM refuses a malformed URL');
like($err, qr/invalid cachekit\.redis_url/, 'with a clear message');

# ---- 10. a Redis with a password ---------------------------------------
# The URLs with passwords go into postgresql.conf rather than through ALTER
# SYSTEM, whose statement text the test server would log (log_statement).

my $pw    = 'Pw-' . join('', map { ('a' .. 'z')[ rand 26 ] } 1 .. 12);
my $wrong = 'Wrong-' . join('', map { ('a' .. 'z')[ rand 26 ] } 1 .. 12);
my $redis3 = start_redis(password => $pw);
my $port3  = $redis3->{port};
redis_cmd($redis3, 'MSET', 'auth:1', 'x', 'auth:2', 'x', 'auth:keep', 'x');

sql(q{ALTER SYSTEM RESET cachekit.redis_url});
$node->append_conf('postgresql.conf',
	"cachekit.redis_url = 'redis://127.0.0.1:$port3/0'\n");
reload_and_wait($redis2, 3);

# no password at all
sql(q{SELECT cachekit_delete('auth:1')});
ok( wait_for(
		sub {
			my $s = cachekit_stats($node);
			$s->{redis_connected} eq 'false' && ($s->{last_error} // '') =~ /NOAUTH/;
		},
		20),
	'without a password: not connected, last_error says NOAUTH');
diag('last_error: ' . cachekit_stats($node)->{last_error});

# a wrong password
$node->append_conf('postgresql.conf',
	"cachekit.redis_url = 'redis://:$wrong\@127.0.0.1:$port3/0'\n");
sql('SELECT pg_reload_conf()');
sql(q{SELECT cachekit_delete('auth:2')});
ok( wait_for(
		sub {
			my $s = cachekit_stats($node);
			$s->{redis_connected} eq 'false'
			  && ($s->{last_error} // '') =~ /WRONGPASS|AUTH failed/;
		},
		20),
	'with a wrong password: not connected, last_error reports the failed AUTH');
my $st = cachekit_stats($node);
diag('last_error: ' . $st->{last_error});
unlike($st->{last_error}, qr/\Q$wrong\E/, 'last_error does not contain the password');
is(queue_depth(), 2, 'the entries wait in the queue');
ok(redis_exists($redis3, 'auth:1') && redis_exists($redis3, 'auth:2'), 'nothing was deleted');

# the right password: the backlog is delivered
$node->append_conf('postgresql.conf',
	"cachekit.redis_url = 'redis://:$pw\@127.0.0.1:$port3/0'\n");
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { queue_depth() == 0 }, 20), 'backlog delivered with the right password');
ok(!redis_exists($redis3, 'auth:1') && !redis_exists($redis3, 'auth:2'), 'keys deleted');
ok(redis_exists($redis3, 'auth:keep'), 'an unrelated key survives');
is(cachekit_stats($node)->{redis_connected}, 'true', 'stats: connected');

# the superuser-only setting is hidden from others
sql(q{CREATE ROLE plain LOGIN});
($rc, $out, $err) = $node->psql('postgres', 'SHOW cachekit.redis_url', extra_params => [ '-U', 'plain' ]);
isnt($rc, 0, 'an ordinary role cannot read cachekit.redis_url');

my $log = slurp_file($node->logfile);
# one line for the whole outage: its first failure was the missing password
like($log, qr/cachekit worker cannot reach Redis, retrying with backoff: PING failed: NOAUTH/,
	'the refused connection was logged');

# cachekit's own messages (the worker's, the URL check's) never have it
my @own = grep { /cachekit/ && !/parameter "cachekit\.redis_url" changed to/ } split /\n/, $log;
is_deeply([ grep { /\Q$wrong\E|\Q$pw\E/ } @own ], [],
	'no cachekit message contains a password');

# the requirement: the password is nowhere in the server log
my @leaks = grep { /\Q$wrong\E|\Q$pw\E/ } split /\n/, $log;
is(scalar @leaks, 0, 'neither password appears anywhere in the server log')
  or diag("log lines with a password:\n" . join("\n", @leaks));

$node->stop;
stop_redis($_) for $redis1, $redis2, $redis3;
done_testing();
