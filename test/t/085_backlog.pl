# test/t/085_backlog.pl -- a backlog of one million queue entries, built
# while the worker cannot reach Redis, drains once it can, deleting each of
# the million keys; the worker's memory stays bounded meanwhile (it reads a
# batch at a time, never the backlog), and once idle it gives the queue
# table's emptied pages back. The drain time is reported.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;
use CachekitFault;

my $N = 1_000_000;
my $MEM_LIMIT_KB = 100 * 1024;

# DEBUG POPULATE fills Redis with the million keys in a moment
my $redis = start_redis(args => [ '--enable-debug-command', 'yes' ]);
# small shared buffers: the resident size of a process counts the shared
# pages it touched, and reading a million rows touches every buffer
my $node = new_cachekit_node('backlog', $redis,
	'cachekit.retry_max_delay' => '200ms',
	'shared_buffers'           => '32MB',
	'log_statement'            => 'none');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }

is(redis_cmd($redis, 'DEBUG', 'POPULATE', $N, 'k'), 'OK', 'DEBUG POPULATE');
redis_cmd($redis, 'MSET', 'keep:1', 'x', 'keep:2', 'x');
is(redis_cmd($redis, 'DBSIZE'), $N + 2, "$N keys k:0 .. k:" . ($N - 1) . ' in Redis');

# break Redis access
my $dead = dead_url();
my ($dead_port) = $dead =~ /:(\d+)\//;
sql("ALTER SYSTEM SET cachekit.redis_url = '$dead'");
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { sql('SHOW cachekit.redis_url') eq $dead }, 20), 'worker pointed at a dead port');
sql(q{SELECT cachekit_delete('probe:dead')});
ok(wait_for(sub { (cachekit_stats($node)->{last_error} // '') =~ /:$dead_port\b/ }, 20),
	'the worker fails against the dead port');

my $t0 = time();
sql(qq{INSERT INTO cachekit_queue (kind, keys)
       SELECT 'i', ARRAY['k:' || g] FROM generate_series(0, $N - 1) g});
diag(sprintf('%d entries inserted in %.1fs (queue table %s)', $N, time() - $t0,
		sql(q{SELECT pg_size_pretty(pg_total_relation_size('cachekit_queue'))})));
is(queue_depth(), $N + 1, 'a million entries (and the probe) queued');

my $pid = cachekit_stats($node)->{worker_pid};
my $st0 = proc_status($pid);
ok($st0 && $st0->{VmRSS}, "the worker's /proc/$pid/status is readable");
diag("worker before the drain: VmRSS $st0->{VmRSS} kB, VmHWM $st0->{VmHWM} kB, RssAnon $st0->{RssAnon} kB");

# Redis is back: drain, sampling the worker's memory all along
sql('ALTER SYSTEM RESET cachekit.redis_url');
my $t_drain = time();
sql('SELECT pg_reload_conf()');
my ($max_rss, $max_anon, $samples, $last_depth_check) = (0, 0, 0, 0);
my $drained = 0;
my $deadline = time() + 110;
while (time() < $deadline)
{
	my $st = proc_status($pid) or last;
	$samples++;
	$max_rss  = $st->{VmRSS}   if $st->{VmRSS} > $max_rss;
	$max_anon = $st->{RssAnon} if $st->{RssAnon} > $max_anon;
	if (time() - $last_depth_check > 1)
	{
		$last_depth_check = time();
		if (sql('SELECT NOT EXISTS (SELECT 1 FROM cachekit_queue)') eq 't')
		{
			$drained = 1;
			last;
		}
	}
	Time::HiRes::sleep(0.02);
}
my $drain_s = time() - $t_drain;
my $st1 = proc_status($pid);
ok($drained, 'the million-entry backlog drained');
diag(sprintf('drained %d entries in %.1fs (%.0f entries/s)', $N, $drain_s, $N / $drain_s));
ok($st1, 'the same worker process did the whole drain');
diag(sprintf('worker memory: %d samples; peak VmRSS %d kB, peak RssAnon %d kB, VmHWM %d kB',
		$samples, $max_rss, $max_anon, $st1 ? $st1->{VmHWM} : -1));
cmp_ok($st1 ? $st1->{VmHWM} : 1e9, '<', $MEM_LIMIT_KB, 'the worker\'s peak resident size (VmHWM) stayed below 100 MB');
cmp_ok($max_anon, '<', $MEM_LIMIT_KB, 'its private memory (RssAnon) stayed below 100 MB');

is(redis_cmd($redis, 'DBSIZE'), '2', 'all million keys deleted, the two unrelated keys left');
my $s = cachekit_stats($node);
cmp_ok($s->{entries_delivered}, '>=', $N, "entries_delivered $s->{entries_delivered}");
is($s->{dead_letters}, '0', 'no dead letters');

# the worker's vacuums during the drain keep the emptied pages; once it has
# been idle for a while it gives them back
my $size_drained = sql(q{SELECT pg_relation_size('cachekit_queue')});
cmp_ok($size_drained, '>', 10 * 1024 * 1024,
	"the drained queue table still holds its pages ($size_drained bytes)");
my $t_idle = time();
ok(wait_for(sub { sql(q{SELECT pg_relation_size('cachekit_queue')}) < 1024 * 1024 }, 60),
	'idle, the worker shrinks the queue table below 1 MB');
diag(sprintf('queue table %s after %.1fs idle',
		sql(q{SELECT pg_size_pretty(pg_relation_size('cachekit_queue'))}), time() - $t_idle));

$node->stop;
stop_redis($redis);
done_testing();
