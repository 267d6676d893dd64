# test/t/040_extension.pl -- the worker and the extension's lifetime: the
# worker runs but does nothing until CREATE EXTENSION; DROP EXTENSION does
# not wait for a worker stuck delivering to an unresponsive Redis; after
# CREATE EXTENSION again, delivery resumes and new work is not lost.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;

my $redis = start_redis();
# a long command timeout keeps the worker stuck on a paused Redis for the
# whole DROP/CREATE sequence below
my $node = new_cachekit_node('ext', $redis,
	'cachekit.retry_max_delay' => '200ms',
	'cachekit.command_timeout' => '20s');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub present { return redis_exists($redis, $_[0]); }

sub delivered
{
	return sql("SELECT cachekit_wait('10 seconds')") eq 't';
}

sub worker_activity
{
	return sql(q{SELECT pid || '|' || coalesce(state, '') || '|' || coalesce(query, '')
	             FROM pg_stat_activity WHERE backend_type = 'cachekit worker'});
}

sub other_redis_clients
{
	return scalar grep { !/\bcmd=client\|list\b/ }
	  split /\n/, redis_cmd($redis, 'CLIENT', 'LIST');
}

# ---- 8a. before CREATE EXTENSION the worker waits and does nothing -------

my $pid;
ok( wait_for(
		sub {
			my ($p, $state) = split /\|/, worker_activity();
			$pid = $p;
			defined $state && $state eq 'idle';
		},
		30),
	'the worker runs and has gone idle after its first look at the queue');
like($pid, qr/^\d+$/, "worker pid $pid");
is(sql(q{SELECT count(*) FROM pg_extension WHERE extname = 'cachekit'}), '0',
	'the extension does not exist yet');
is(other_redis_clients(), 0, 'the worker has not connected to Redis');
my $log = slurp_file($node->logfile);
my $nstart = () = $log =~ /cachekit worker started/g;
is($nstart, 1, 'the worker started once (no crash and restart)');
unlike($log, qr/\[$pid\] (ERROR|FATAL|WARNING)/, 'the worker logged no error');

$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 10), 'cachekit_stats shows the worker');
is(cachekit_stats($node)->{worker_pid}, $pid, 'worker_pid is the same worker');

redis_cmd($redis, 'SET', 'first', 'x');
sql(q{SELECT cachekit_delete('first')});
ok(delivered() && !present('first'), 'the worker delivers once the extension exists');

# ---- 8b. DROP EXTENSION while the worker is stuck on Redis ---------------

redis_cmd($redis, 'MSET', 'new:1', 'x', 'new:2', 'x', 'new:3', 'x', 'later:1', 'x', 'keep', 'x');
pause_redis($redis);

my $t0 = time();
sql(q{SELECT count(cachekit_delete('bulk:' || g)) FROM generate_series(1, 5000) g});
cmp_ok(time() - $t0, '<', 5, '5000 entries queued quickly while Redis is paused');

ok( wait_for(
		sub {
			my (undef, $state, $query) = split /\|/, worker_activity(), 3;
			$state eq 'active' && $query eq 'delivering to Redis';
		},
		10),
	'the worker is busy delivering to the paused Redis');

# a session waiting for delivery must not hold DROP EXTENSION up either
my $waiter = $node->background_psql('postgres', on_error_stop => 0);
$waiter->query_until(qr/waiting/, "\\echo waiting\nSELECT cachekit_wait('15 seconds');\n");
ok( wait_for(
		sub {
			sql(q{SELECT count(*) FROM pg_stat_activity
			      WHERE state = 'active' AND query LIKE 'SELECT cachekit_wait(%'}) eq '1';
		},
		10),
	'another session is inside cachekit_wait');

$t0 = time();
my ($rc, $out, $err) = $node->psql('postgres',
	q{SET statement_timeout = '30s'; DROP EXTENSION cachekit},
	timeout => 60);
my $drop_s = time() - $t0;
is($rc, 0, 'DROP EXTENSION succeeded') or diag($err);
cmp_ok($drop_s, '<', 3, sprintf('DROP EXTENSION returned in %.2fs while the worker was stuck', $drop_s));
is(sql(q{SELECT to_regclass('cachekit_queue') IS NULL}), 't', 'the queue table is gone');
diag("worker state after DROP: " . (worker_activity() || '(no worker)'));

$t0 = time();
$waiter->quit;
cmp_ok(time() - $t0, '<', 5, 'a cachekit_wait in progress ended after the DROP');

# recreate it at once and enqueue new work while the old batch is in flight
sql('CREATE EXTENSION cachekit');
ok(1, 'CREATE EXTENSION again works');
# (three entries, ids 1 to 3 of the new queue; the old batch has ids from 2)
sql(qq{SELECT cachekit_delete('new:$_')}) for 1 .. 3;
is(sql('SELECT queue_depth FROM cachekit_stats'), '3', 'the new queue has the three new entries');
diag('ids in the new queue: ' . sql(q{SELECT string_agg(id::text, ',' ORDER BY id) FROM cachekit_queue}));

resume_redis($redis);
ok(wait_for(sub { !present('new:1') && !present('new:2') && !present('new:3') }, 20),
	'work queued after the re-creation is delivered (not lost to the old batch)')
  or diag('still in Redis: ' . join(' ', grep { present($_) } 'new:1', 'new:2', 'new:3')
	  . '; entries left in the new queue: ' . sql('SELECT count(*) FROM cachekit_queue'));

# whatever became of the old batch, delivery goes on afterwards
ok(wait_for_worker($node, 'postgres', 30), 'a worker is running');
sql(q{SELECT cachekit_delete('later:1')});
ok(wait_for(sub { !present('later:1') }, 30), 'delivery resumes after DROP and CREATE');
ok(wait_for(sub { sql('SELECT queue_depth FROM cachekit_stats') eq '0' }, 30), 'queue drained');
ok(present('keep'), 'an unrelated key survives');

$node->stop;
stop_redis($redis);
done_testing();
