# test/t/075_busy_ddl.pl -- DDL and reloads while the worker is busy with
# a batch in flight to a hung Redis (SIGSTOP, long command timeout):
#
#  - SELECT pg_reload_conf() does not hang anything;
#  - DROP DATABASE of another database returns promptly;
#  - DROP EXTENSION cachekit returns promptly; the worker then idles without
#    a crash loop (same pid throughout, no restart in the log) until CREATE
#    EXTENSION cachekit, after which new work is delivered.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
# the long command timeout keeps the worker inside its Redis round trip for
# the whole sequence below, unless something cuts it short
my $node = new_cachekit_node('busyddl', $redis,
	'cachekit.retry_max_delay' => '200ms',
	'cachekit.command_timeout' => '30s');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# run SQL with a bounded wait: (ok, seconds, stderr)
sub timed_sql
{
	my ($db, $query) = @_;
	my $timed_out = 0;
	my $t0 = time();
	my ($rc, $out, $err) = $node->psql($db, $query,
		timeout   => 60,
		timed_out => \$timed_out);
	return ($rc == 0 && !$timed_out, time() - $t0, $err);
}

my $pid = worker_pid_activity($node);
like($pid, qr/^\d+$/, "worker pid $pid");

redis_cmd($redis, 'SET', 'probe:1', 'x');
sql(q{SELECT cachekit_delete('probe:1')});
ok(wait_for(sub { !redis_exists($redis, 'probe:1') }, 30), 'worker connected to Redis');

# another database, used once, to be dropped later
sql('CREATE DATABASE db2');
is($node->safe_psql('db2', 'SELECT current_database()'), 'db2', 'connected to db2');

redis_cmd($redis, 'SET', 'keep', 'x');
my $round = 0;

# a big backlog, and Redis hung while the worker delivers a batch of it;
# whatever happened before, start from a drained queue and a live connection
sub make_busy
{
	$round++;
	resume_redis($redis) if $redis->{paused};
	ok(wait_for(sub { sql('SELECT count(*) FROM cachekit_queue') eq '0' }, 60),
		"round $round: queue drained");
	redis_cmd($redis, 'SET', "probe:r$round", 'x');
	sql(qq{SELECT cachekit_delete('probe:r$round')});
	ok(wait_for(sub { !redis_exists($redis, "probe:r$round") }, 30),
		"round $round: worker connected");
	pause_redis($redis);
	sql(qq{INSERT INTO cachekit_queue (kind, keys)
	       SELECT 'i', ARRAY['busy:$round:' || g] FROM generate_series(1, 50000) g;
	       SELECT cachekit_delete('busy:wake')});
	ok(wait_worker_busy($node, 20), "round $round: the worker is inside a round trip to the hung Redis");
	return;
}

my $off = log_offset($node);

# ---- reload -----------------------------------------------------------------

make_busy();
my ($ok, $secs, $err) = timed_sql('postgres',
	q{ALTER SYSTEM SET cachekit.batch_size = 500; SELECT pg_reload_conf()});
ok($ok, 'pg_reload_conf() succeeded') or diag($err);
cmp_ok($secs, '<', 5, sprintf('pg_reload_conf() returned in %.2fs', $secs));
ok(wait_for(sub { sql('SHOW cachekit.batch_size') eq '500' }, 10),
	'new sessions see the reloaded setting at once');
($ok, $secs, $err) = timed_sql('postgres', 'SELECT queue_depth FROM cachekit_stats');
ok($ok && $secs < 5, sprintf('cachekit_stats answers after the reload (%.2fs)', $secs))
  or diag($err);
resume_redis($redis);
ok(wait_for(sub { sql('SELECT count(*) FROM cachekit_queue') eq '0' }, 60),
	'the backlog drains after the hang and the reload');

# ---- DROP DATABASE ----------------------------------------------------------

make_busy();
($ok, $secs, $err) = timed_sql('postgres', 'DROP DATABASE db2');
ok($ok, 'DROP DATABASE db2 succeeded') or diag($err);
cmp_ok($secs, '<', 5, sprintf('DROP DATABASE returned in %.2fs while the worker was busy', $secs));
is(sql(q{SELECT count(*) FROM pg_database WHERE datname = 'db2'}), '0', 'db2 is gone');

# ---- DROP EXTENSION ---------------------------------------------------------

make_busy();
($ok, $secs, $err) = timed_sql('postgres', 'DROP EXTENSION cachekit');
ok($ok, 'DROP EXTENSION succeeded') or diag($err);
cmp_ok($secs, '<', 5, sprintf('DROP EXTENSION returned in %.2fs while the worker was busy', $secs));
is(sql(q{SELECT to_regclass('cachekit_queue') IS NULL}), 't', 'the queue is gone');

resume_redis($redis);
# the batch in flight gets its answers; its settlement finds no queue
ok( wait_for(
		sub {
			my (undef, $state) = split /\|/, worker_activity($node);
			defined $state && $state eq 'idle';
		},
		40),
	'the worker went idle after its batch came back');
is(worker_pid_activity($node), $pid, 'the same worker process runs on');

# give a crash loop every chance to show (a restart takes bgw_restart_time 5s)
# (an observation window, not an assertion: the checks follow)
my $t_idle = time();
wait_for(
	sub {
		log_since($node, $off) =~ /cachekit worker started/
		  || time() - $t_idle > 7;
	},
	15);
my $seg = log_since($node, $off);
is(count_matches($seg, qr/cachekit worker started/), 0, 'no worker restart in the log');
unlike($seg, qr/background worker "cachekit worker" \(PID \d+\) (exited|was terminated)/,
	'no worker exit in the log');
is(worker_pid_activity($node), $pid, 'still the same worker process');
diag('worker log lines: ' . join(' | ', grep { /\[$pid\]/ } split /\n/, $seg));

# ---- CREATE EXTENSION again -------------------------------------------------

sql('CREATE EXTENSION cachekit');
redis_cmd($redis, 'MSET', 'after:1', 'x', 'after:2', 'x');
sql(q{SELECT cachekit_delete('after:1', 'after:2')});
ok(wait_for(sub { !redis_exists($redis, 'after:1') && !redis_exists($redis, 'after:2') }, 30),
	'new work is delivered after CREATE EXTENSION');
ok(wait_for(sub { sql('SELECT queue_depth FROM cachekit_stats') eq '0' }, 30), 'queue empty');
is(sql('SELECT worker_pid FROM cachekit_stats'), $pid, 'by the same worker');
ok(redis_exists($redis, 'keep'), 'an unrelated key survives');
is(count_matches(log_since($node, $off), qr/cachekit worker started/), 0,
	'no worker restart at all');

$node->stop;
stop_redis($redis);
done_testing();
