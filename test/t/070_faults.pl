# test/t/070_faults.pl -- fault injection around the worker:
#
#  1. redis-server stopped in the middle of a pgbench write workload and
#     started again (with its data on disk): writers see no error and are
#     not slowed down, and the backlog deletes every stale key afterwards;
#  1b. the entry of a transaction that stays open while a stream of later
#     commits is delivered is delivered promptly once it commits;
#  2. a hung Redis (SIGSTOP): the command timeout drops it, the worker
#     reports it and reconnects after SIGCONT; a fast shutdown is not held
#     up by a batch in flight to the hung Redis, nor by the worker
#     connecting to it;
#  3. PostgreSQL crash (immediate stop) with a backlog: nothing lost, and
#     an uncommitted transaction's work is never delivered;
#  4. the worker terminated (pg_terminate_backend) and killed (SIGKILL,
#     crash recovery): a new worker delivers everything queued meanwhile.
#
# Every scenario ends with each affected key deleted from Redis, and with
# unaffected keys still there.

use strict;
use warnings;

use File::Glob qw(bsd_glob);
use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;
use CachekitFault;

# the data set goes to an append-only file, so a restarted redis-server
# comes back with the keys it held when it was stopped
my $redis = start_redis(args => [ '--appendonly', 'yes', '--appendfsync', 'always' ]);
my $node = new_cachekit_node(
	'faults', $redis,
	'cachekit.retry_max_delay' => '200ms',
	'cachekit.command_timeout' => '1s',
	'cachekit.connect_timeout' => '1s',
	'restart_after_crash'      => 'on');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

# ---- local helpers --------------------------------------------------------

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }

sub drained
{
	my ($timeout) = @_;
	return wait_for(sub { queue_depth() == 0 }, $timeout // 60);
}

sub stat_of { return cachekit_stats($node)->{ $_[0] }; }

my $probe_seq = 0;

# a delete that must reach Redis now; true once it has
sub probe_delivered
{
	my $probe = 'probe:' . ++$probe_seq;
	redis_cmd($redis, 'SET', $probe, 'x');
	sql("SELECT cachekit_delete('$probe')");
	return wait_for(sub { !redis_exists($redis, $probe) }, 30);
}

# point the worker at another URL (ALTER SYSTEM + reload) and wait until a
# new session sees it, i.e. the postmaster has passed the reload on
sub set_url
{
	my ($url) = @_;
	if (defined $url)
	{
		sql("ALTER SYSTEM SET cachekit.redis_url = '$url'");
	}
	else
	{
		sql('ALTER SYSTEM RESET cachekit.redis_url');
		$url = redis_url($redis);
	}
	sql('SELECT pg_reload_conf()');
	return wait_for(sub { sql('SHOW cachekit.redis_url') eq $url }, 20);
}

# break the worker's access to Redis: a dead port; true once it has failed there
sub break_redis_access
{
	my $url = dead_url();
	my ($port) = $url =~ /:(\d+)\//;
	ok(set_url($url), "worker pointed at the dead port $port");
	sql(q{SELECT cachekit_delete('probe:dead')});
	return wait_for(
		sub {
			my $s = cachekit_stats($node);
			($s->{last_error} // '') =~ /127\.0\.0\.1:$port/ && $s->{redis_connected} eq 'false';
		},
		20);
}

# after a fast stop with Redis paused: resume Redis, make sure the old
# postmaster is gone (pg_ctl may have given up waiting), start again
sub restart_after_stop
{
	my ($stopped) = @_;
	resume_redis($redis);
	if (!$stopped)
	{
		my $pidfile = $node->data_dir . '/postmaster.pid';
		wait_for(sub { !-e $pidfile }, 120);
		$node->_update_pid(-1);
	}
	$node->start;
	return;
}

# count how many of the keys exist in Redis (one pipelined round trip)
sub count_present
{
	my @keys = @_;
	return 0 unless @keys;
	my $n = 0;
	$n += $_ for resp_pipeline($redis, map { [ 'EXISTS', $_ ] } @keys);
	return $n;
}

# ---- 1. Redis stopped during a write workload ------------------------------

my $NROWS = 2000;
my $NGRP  = 10;
sql(qq{
	CREATE TABLE items(id int PRIMARY KEY, grp int NOT NULL, v int NOT NULL DEFAULT 0);
	INSERT INTO items SELECT g, (g / 2) % $NGRP FROM generate_series(1, $NROWS) g;
	CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('item:{id}', 'tag=grp:{grp}');
});

my $bench_dir = "$PostgreSQL::Test::Utils::tmp_check/pgbench_070";
mkdir $bench_dir;
my $script = "$bench_dir/update.sql";
PostgreSQL::Test::Utils::append_to_file($script,
	"\\set id 2 * random(1, $NROWS / 2)\nUPDATE items SET v = v + 1 WHERE id = :id;\n");

# The workload updates even rows only: the odd rows' keys must survive.
# (Even rows are in every group, so every group's tag gets flushed.)
# start pgbench in the background: 2 clients at $RATE transactions per
# second in all (enough for thousands of changes, and a backlog that drains
# in seconds), every transaction logged
my $RATE = 3000;
sub start_pgbench
{
	my ($name, $seconds) = @_;
	my $prefix = "$bench_dir/$name";
	unlink bsd_glob("$prefix.*");
	my %h = (prefix => $prefix, out => '', err => '');
	# (not every one of its statements in the server log)
	local $ENV{PGOPTIONS} = '-c log_statement=none';
	$h{run} = IPC::Run::start(
		[
			'pgbench', '-n', '-h', $node->host, '-p', $node->port,
			'-c', '2', '-j', '2', '-T', $seconds, '-R', $RATE, '-f', $script,
			'-l', "--log-prefix=$prefix", 'postgres'
		],
		'>', \$h{out}, '2>', \$h{err},
		IPC::Run::timeout($seconds + 120));
	return \%h;
}

# wait for it; returns its exit code and [end time, run time in s] of every
# transaction (the run time without the schedule lag of --rate)
sub finish_pgbench
{
	my ($h) = @_;
	$h->{run}->finish;
	my $rc = $? >> 8;
	my @tx;
	for my $file (bsd_glob("$h->{prefix}.*"))
	{
		open my $fh, '<', $file or die "cannot read $file: $!";
		while (<$fh>)
		{
			my ($client, $no, $us, $script_no, $epoch, $epoch_us, $lag_us) = split ' ';
			next unless defined $epoch_us && $us =~ /^\d+$/;
			push @tx, [ $epoch + $epoch_us / 1e6, ($us - ($lag_us // 0)) / 1e6 ];
		}
		close $fh;
	}
	return ($rc, \@tx);
}

sub median
{
	my @s = sort { $a <=> $b } @_;
	return undef unless @s;
	return $s[ int($#s / 2) ];
}

sub quantile
{
	my ($q, @v) = @_;
	my @s = sort { $a <=> $b } @v;
	return $s[ int($q * $#s) ];
}

# baseline: Redis up, the worker delivering along
my $bl = start_pgbench('baseline', 3);
my ($brc, $btx) = finish_pgbench($bl);
is($brc, 0, 'baseline pgbench ran without error') or diag($bl->{err});
my $base_median = median(map { $_->[1] } @$btx);
diag(sprintf('baseline with Redis up: %d transactions, median %.2f ms',
		scalar @$btx, 1000 * ($base_median // 0)));
ok(drained(), 'baseline changes delivered');

# the rows start unchanged again (no trigger), the cache is full
sql(q{SET session_replication_role = replica; UPDATE items SET v = 0});
resp_fill($redis, 'cached', map { "item:$_" } 1 .. $NROWS);
resp_pipeline($redis, map { [ 'SADD', "tag:grp:$_", "list:grp:$_:1", "list:grp:$_:2" ] } 0 .. $NGRP - 1);
resp_fill($redis, 'cached', map { ("list:grp:$_:1", "list:grp:$_:2") } 0 .. $NGRP - 1);
resp_fill($redis, 'keep', map { "keep:$_" } 1 .. 50);
ok(probe_delivered(), 'worker connected before the outage');

my $s_before = cachekit_stats($node);
my $w = start_pgbench('outage', 8);
ok(wait_for(sub { sql('SELECT count(*) FROM items WHERE v > 0') >= 50 }, 30),
	'the workload is running');
my $t_stop = time();
stop_redis($redis);
my $t_stopped = time();
note sprintf('redis-server stopped in %.2fs', $t_stopped - $t_stop);
ok(!redis_running($redis), 'redis-server is stopped while pgbench writes');

my ($wrc, $wtx) = finish_pgbench($w);
is($wrc, 0, 'no writer saw an error while Redis went away') or diag($w->{err});
like($w->{out}, qr/number of failed transactions: 0\b/, 'pgbench reports no failed transaction')
  or diag($w->{out});
my @down = map { $_->[1] } grep { $_->[0] > $t_stopped + 0.1 } @$wtx;
my $down_median = median(@down);
diag(sprintf('with Redis down: %d transactions, median %.2f ms, p99 %.2f ms, max %.2f ms',
		scalar @down, 1000 * ($down_median // 0),
		1000 * (quantile(0.99, @down) // 0), 1000 * (quantile(1, @down) // 0)));
cmp_ok(scalar @down, '>=', 1000, 'thousands of transactions committed while Redis was down');
ok( defined $down_median && defined $base_median
	  && $down_median <= 3 * $base_median,
	sprintf('writers are not slowed by the outage (median %.2f ms vs %.2f ms with Redis up)',
		1000 * ($down_median // 0), 1000 * ($base_median // 0)));

my $changed = sql('SELECT count(*) FROM items WHERE v > 0');
cmp_ok(queue_depth(), '>', 0, "a backlog waits ($changed rows changed)");
ok( wait_for(
		sub {
			my $s = cachekit_stats($node);
			$s->{redis_connected} eq 'false'
			  && $s->{failed_attempts} > $s_before->{failed_attempts};
		},
		20),
	'the worker noticed the outage');

my $backlog = queue_depth();
my $t_restart = time();
restart_redis($redis);
is(count_present(map { "keep:$_" } 1 .. 50), 50,
	'the restarted redis-server came back with its data (append-only file)');
ok(drained(), 'the backlog drains after Redis is back');
diag(sprintf('backlog of %d entries drained %.1fs after the restart', $backlog, time() - $t_restart));
my @changed_ids   = split /,/, sql(q{SELECT string_agg(id::text, ',') FROM items WHERE v > 0});
my @unchanged_ids = split /,/, sql(q{SELECT string_agg(id::text, ',') FROM items WHERE v = 0});
is(scalar(@changed_ids) + scalar(@unchanged_ids), $NROWS, 'every row accounted for');
is(scalar(grep { $_ % 2 } @changed_ids), 0, 'only even rows were changed');
cmp_ok(scalar(@unchanged_ids), '>=', $NROWS / 2, 'the odd rows were not changed');
is(count_present(map { "item:$_" } @changed_ids), 0,
	sprintf('all %d keys of changed rows are gone from Redis', scalar @changed_ids));
is(count_present(map { "item:$_" } @unchanged_ids), scalar @unchanged_ids,
	sprintf('the %d keys of unchanged rows are still there', scalar @unchanged_ids));
is(count_present(map { ("tag:grp:$_", "list:grp:$_:1", "list:grp:$_:2") } 0 .. $NGRP - 1),
	0, 'every group tag was flushed with its members');
is(count_present(map { "keep:$_" } 1 .. 50), 50, 'unrelated keys survive');
is(stat_of('dead_letters'), '0', 'nothing dead-lettered');

# ---- 1b. a long transaction's entry under a steady stream of commits -------
# Its entry gets an id below entries that commit and are delivered long
# before it commits; it must still be delivered promptly once it commits,
# while the stream goes on (the worker never goes idle meanwhile).

resp_fill($redis, 'x', 'early:1', 'early:2');
my $long = $node->background_psql('postgres', on_error_stop => 0);
$long->query_safe(q{BEGIN; SELECT cachekit_delete('early:1')});
my $stream = start_pgbench('stream', 10);
ok(wait_for(sub { sql('SELECT count(*) FROM items WHERE v > 0') >= $NROWS / 4 }, 30),
	'a stream of commits is being delivered around the open transaction');
ok(redis_exists($redis, 'early:1'), 'the open transaction has delivered nothing');
sql(q{SELECT cachekit_delete('early:2')});
ok(wait_for(sub { !redis_exists($redis, 'early:2') }, 20), 'work committed later is delivered');
my $t_commit = time();
$long->query_safe('COMMIT');
ok(wait_for(sub { !redis_exists($redis, 'early:1') }, 30),
	'the long transaction\'s entry is delivered after its commit');
my $late = time() - $t_commit;
cmp_ok($late, '<', 4, sprintf('... %.2fs after the commit, with the stream still running', $late));
ok($stream->{run}->pumpable, 'the stream was still running');
$long->quit;
my ($src) = finish_pgbench($stream);
is($src, 0, 'the stream ran without error');
ok(drained(), 'the stream is delivered');

# ---- 2. Redis hangs (SIGSTOP) ----------------------------------------------

resp_fill($redis, 'x', map { "hang:$_" } 1 .. 100);
ok(probe_delivered(), 'worker connected before the hang');
my $s0 = cachekit_stats($node);
pause_redis($redis);
sql(q{SELECT cachekit_delete('hang:' || g) FROM generate_series(1, 100) g});
ok( wait_for(
		sub {
			my $s = cachekit_stats($node);
			$s->{redis_connected} eq 'false'
			  && defined $s->{last_error_at}
			  && ($s0->{last_error_at} // '') ne $s->{last_error_at}
			  && $s->{last_error} =~ /time(d)? ?out|temporarily unavailable|lost the connection/i;
		},
		20),
	'a hung Redis is dropped after the command timeout: redis_connected false')
  or diag(explain(cachekit_stats($node)));
my $hang_error = stat_of('last_error');
diag("last_error with Redis hung: $hang_error");
like($hang_error, qr/time(d)? ?out|temporarily unavailable|lost the connection/i,
	'last_error tells of a timeout or lost connection');
my $f1 = stat_of('failed_attempts');
ok(wait_for(sub { stat_of('failed_attempts') >= $f1 + 2 }, 20),
	'the worker keeps trying (each attempt bounded by the timeouts)');
is(sql(q{SELECT count(*) FROM cachekit_queue, unnest(keys) k WHERE k LIKE 'hang:%'}), 100,
	'the hundred keys wait in the queue');

resume_redis($redis);
ok(drained(30), 'delivered after SIGCONT');
ok(wait_for(sub { stat_of('redis_connected') eq 'true' }, 20), 'redis_connected true again');
is(count_present(map { "hang:$_" } 1 .. 100), 0, 'all hundred keys deleted');

# a fast shutdown while a batch is in flight to a hung Redis: the command
# timeout is 20s, so only cutting the round trip lets it finish quickly
sql(q{ALTER SYSTEM SET cachekit.command_timeout = '20s'});
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { sql('SHOW cachekit.command_timeout') eq '20s' }, 20), 'command timeout now 20s');
ok(probe_delivered(), 'worker connected with the long timeout');
resp_fill($redis, 'x', map { "stop:$_" } 1 .. 100);
pause_redis($redis);
sql(q{SELECT cachekit_delete('stop:' || g) FROM generate_series(1, 100) g});
ok(wait_worker_busy($node, 20), 'the worker is waiting for the hung Redis');
my $t0      = time();
my $stopped = $node->stop('fast', fail_ok => 1);
my $stop_s  = time() - $t0;
ok($stopped, 'pg_ctl stop -m fast succeeded');
cmp_ok($stop_s, '<', 10, sprintf('fast shutdown took %.2fs with a batch in flight', $stop_s));

restart_after_stop($stopped);
ok(wait_for_worker($node, 'postgres', 30), 'worker running after the restart');
ok(drained(), 'the interrupted batch is delivered after the restart');
is(count_present(map { "stop:$_" } 1 .. 100), 0, 'all keys of the interrupted batch deleted');

# the same while the worker is (re)connecting to the hung Redis: a reload
# makes it drop its connection and connect again at once, and it waits for
# the answer to its first command
ok(probe_delivered(), 'worker connected');
my $wpid = stat_of('worker_pid');
pause_redis($redis);
sql('SELECT pg_reload_conf()');
# the worker reconnects at once and then waits (in a latch wait) for the
# hung Redis to answer its first command; give it a moment to get there
wait_for(sub { 0 }, 1);
$t0      = time();
$stopped = $node->stop('fast', fail_ok => 1);
$stop_s  = time() - $t0;
ok($stopped, 'pg_ctl stop -m fast succeeded');
cmp_ok($stop_s, '<', 10, sprintf('fast shutdown took %.2fs while the worker was connecting', $stop_s));
restart_after_stop($stopped);
ok(wait_for_worker($node, 'postgres', 30), 'worker running after the restart');
sql(q{ALTER SYSTEM RESET cachekit.command_timeout});
sql('SELECT pg_reload_conf()');
ok(probe_delivered(), 'the worker delivers after the restart');

# ---- 3. PostgreSQL crash with a backlog ------------------------------------

resp_fill($redis, 'x', map { "item:$_" } 1 .. 300);
resp_fill($redis, 'x', 'crash:manual', 'uncommitted:1');
ok(break_redis_access(), 'worker cannot reach Redis');
sql(q{UPDATE items SET v = v + 1 WHERE id <= 300});
sql(q{SELECT cachekit_delete('crash:manual')});
my $depth = queue_depth();
# one statement's keys are gathered into few entries (pending.c): count keys
cmp_ok(sql(q{SELECT count(*) FROM cachekit_queue, unnest(keys) k}), '>=', 301,
	"backlog of $depth entries (every key) before the crash");

# a transaction that is still open at the crash
my $open = $node->background_psql('postgres', on_error_stop => 0);
$open->query_safe(q{BEGIN; SELECT cachekit_delete('uncommitted:1')});

$node->stop('immediate');
eval { $open->quit; };
$node->start;
is(queue_depth(), $depth, 'the whole backlog survived the crash');
ok(wait_for_worker($node, 'postgres', 30), 'worker running after crash recovery');
ok(set_url(undef), 'worker pointed back at Redis');
ok(drained(), 'the backlog is delivered after the crash');
is(count_present(map { "item:$_" } 1 .. 300), 0, 'keys of the 300 rows changed before the crash are gone');
ok(!redis_exists($redis, 'crash:manual'), 'the manual delete queued before the crash arrived');
ok(redis_exists($redis, 'uncommitted:1'), 'the transaction open at the crash delivered nothing');

# ---- 4a. worker terminated ------------------------------------------------

ok(probe_delivered(), 'worker delivering');
my $pid1 = stat_of('worker_pid');
like($pid1, qr/^\d+$/, "worker pid $pid1");
resp_fill($redis, 'x', map { "term:$_" } 1 .. 200);
my $off = log_offset($node);
is(sql("SELECT pg_terminate_backend($pid1)"), 't', 'pg_terminate_backend(worker_pid)');
sql(q{DO $$ BEGIN FOR i IN 1..200 LOOP PERFORM cachekit_delete('term:' || i); COMMIT; END LOOP; END $$});
my $pid2 = wait_new_worker($node, $pid1, 30);
ok(defined $pid2, 'a new worker started (pid ' . ($pid2 // 'none') . ')');
ok(drained(), 'the new worker delivers what was queued meanwhile');
is(count_present(map { "term:$_" } 1 .. 200), 0, 'all 200 keys queued while no worker ran are gone');
is(stat_of('worker_pid'), $pid2, 'cachekit_stats shows the new worker');
my $seg = log_since($node, $off);
like($seg, qr/background worker "cachekit worker" \(PID $pid1\) exited with exit code 1/,
	'the log shows the terminated worker exit');
unlike($seg, qr/terminated by signal|reinitializing/, 'no crash recovery for a terminated worker');

# ---- 4b. worker killed (SIGKILL) -----------------------------------------

resp_fill($redis, 'x', map { "kill:$_" } 1 .. 200);
ok(break_redis_access(), 'worker cannot reach Redis');
sql(q{SELECT cachekit_delete('kill:' || g) FROM generate_series(1, 200) g});
$depth = queue_depth();
$pid2  = stat_of('worker_pid');
$off   = log_offset($node);
ok(kill('KILL', $pid2), "SIGKILL to worker $pid2");
ok( wait_for(sub { log_since($node, $off) =~ /all server processes terminated; reinitializing/ }, 30),
	'the postmaster reinitializes after the worker was killed');
like(log_since($node, $off),
	qr/background worker "cachekit worker" \(PID $pid2\) was terminated by signal 9/,
	'the log names the killed worker');
my $pid3 = wait_new_worker($node, $pid2, 60);
ok(defined $pid3, 'a new worker after crash recovery (pid ' . ($pid3 // 'none') . ')');
is(queue_depth(), $depth, "the backlog of $depth entries survived");
ok(set_url(undef), 'worker pointed back at Redis');
ok(drained(), 'the backlog is delivered by the new worker');
is(count_present(map { "kill:$_" } 1 .. 200), 0, 'all keys queued before the kill are gone');
is(count_present(map { "keep:$_" } 1 .. 50), 50, 'unrelated keys survive everything');
is(stat_of('dead_letters'), '0', 'nothing dead-lettered');

$node->stop;
stop_redis($redis);
done_testing();
