# test/t/123_worker_memory.pl -- the worker's memory is bounded (issue 9,
# item 9):
#
#  - a batch is bounded in bytes (cachekit.batch_bytes): 150 write-through
#    values of 400 kB are read a row at a time and delivered in batches of
#    a few MB, so the worker's peak memory does not grow by their sum;
#  - over a long Redis outage the worker's memory stays flat: many failed
#    cycles (small cachekit.retry_max_delay) of each kind -- nothing
#    listening, a server refusing the connection set-up, one answering BUSY
#    to every delivery, one refusing every entry -- and the memory contexts'
#    used bytes and VmRSS do not grow after a warm-up.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
my $node  = new_cachekit_node('worker_memory', $redis,
	'shared_buffers'             => '16MB',
	'cachekit.batch_bytes'       => '2MB',
	'cachekit.max_attempts'      => '1000000',
	'cachekit.dead_letter_after' => '1h');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }
sub stat_of { return cachekit_stats($node)->{ $_[0] }; }

# ---- a batch bounded in bytes -------------------------------------------------------

sql(q{
CREATE TABLE big (id int PRIMARY KEY, payload text);
CREATE TRIGGER big_cache AFTER INSERT OR UPDATE OR DELETE ON big
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=big:{id}');
INSERT INTO big VALUES (0, 'warm-up');
});
ok(wait_for(sub { queue_depth() == 0 }, 60), 'warm-up delivered');
my $pid = worker_pid_activity($node);
my $hwm0 = proc_status($pid)->{VmHWM};
sql(q{INSERT INTO big SELECT g, repeat(chr(65 + g % 26), 400000) FROM generate_series(1, 150) g});
ok(wait_for(sub { queue_depth() == 0 }, 180), '150 values of 400 kB delivered');
is(worker_pid_activity($node), $pid, 'by the same worker');
my $hwm1 = proc_status($pid)->{VmHWM};
my $grew = int(($hwm1 - $hwm0) / 1024);
note "worker VmHWM: $hwm0 kB before, $hwm1 kB after (+$grew MB) for 60 MB of values";
cmp_ok($grew, '<', 48, "the worker's peak memory grew by $grew MB, not by the 60 MB of values (times copies)");
is(resp_cmd($redis, 'EXISTS', map { "big:$_" } 1 .. 150), 150, 'every value is in Redis');
cmp_ok(resp_cmd($redis, 'STRLEN', 'big:150'), '>', 400000, 'whole');

# ---- memory flat over many failed cycles -----------------------------------------

sub memory_used
{
	my $off = log_offset($node);
	sql("SELECT pg_log_backend_memory_contexts($pid)");
	my ($used, $batch);
	wait_for(
		sub {
			my $log = log_since($node, $off);
			($used)  = $log =~ /Grand total: \d+ bytes in \d+ blocks; \d+ free \(\d+ chunks\); (\d+) used/;
			($batch) = $log =~ /cachekit batch: \d+ total in \d+ blocks; \d+ free \(\d+ chunks\); (\d+) used/;
			defined $used && defined $batch;
		},
		30);
	# the batch context is emptied after every pass: the log may catch one in it
	return (defined $used ? $used - $batch : -1, proc_status($pid)->{VmRSS});
}

sub wait_cycles
{
	my ($n) = @_;
	my $f0 = stat_of('failed_attempts');
	return wait_for(sub { stat_of('failed_attempts') >= $f0 + $n }, 120);
}

sql(q{ALTER SYSTEM SET cachekit.retry_max_delay = '10ms'});
sql('SELECT pg_reload_conf()');

my $busy = start_fake_redis(error => 'BUSY Redis is busy running a script.', setup_ok => 1);
my $refuse = start_fake_redis(error => 'ERR refused by the test', setup_ok => 1);
my $loading = start_fake_redis(error => 'LOADING Redis is loading the dataset in memory');
my $queued = 0;
for my $case (
	[ 'nothing listening',                  dead_url() ],
	[ 'connection set-up refused (LOADING)', $loading->{url} ],
	[ 'every delivery BUSY',                $busy->{url} ],
	[ 'every entry refused',                $refuse->{url} ])
{
	my ($what, $url) = @$case;
	sql("ALTER SYSTEM SET cachekit.redis_url = '$url'");
	sql('SELECT pg_reload_conf()');
	if (!$queued++)
	{
		# queued only now, so that they stay queued through every case
		ok(wait_for(sub { sql('SHOW cachekit.redis_url') eq $url }, 30), 'URL changed');
		sql(q{SELECT cachekit_delete('k1', 'k2')});
		sql(q{SELECT cachekit_flush_tag('t1')});
		sql(q{UPDATE big SET payload = 'small' WHERE id = 0});
	}
	ok(wait_cycles(200), "$what: 200 failed cycles (warm-up)");
	my ($used0, $rss0) = memory_used();
	ok(wait_cycles(1000), "$what: 1000 more failed cycles");
	my ($used1, $rss1) = memory_used();
	note "$what: memory contexts used (but the batch) $used0 -> $used1 bytes, VmRSS $rss0 -> $rss1 kB";
	cmp_ok($used0, '>', 0, "$what: memory contexts logged");
	cmp_ok($used1 - $used0, '<', 64 * 1024, "$what: memory contexts did not grow (" . ($used1 - $used0) . ' bytes)');
	cmp_ok($rss1 - $rss0, '<', 4096, "$what: VmRSS did not grow (" . ($rss1 - $rss0) . ' kB)');
	is(worker_pid_activity($node), $pid, "$what: the same worker");
}
is(stat_of('dead_letters'), '0', 'nothing was dead-lettered');

sql('ALTER SYSTEM RESET cachekit.redis_url');
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { queue_depth() == 0 }, 60), 'delivered once Redis is back');

$node->stop;
stop_redis($redis);
done_testing();
