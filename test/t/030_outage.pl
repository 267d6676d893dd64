# test/t/030_outage.pl -- Redis outages lose nothing: writes go on while
# Redis is unreachable, the queue holds the work, and once Redis is back
# every affected key is deleted. Entries naming the same key are collapsed
# within a batch. One log line per outage and its end, and no spinning.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('outage', $redis,
	'cachekit.retry_max_delay' => '500ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

# ---- local helpers --------------------------------------------------------

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub delivered
{
	return sql("SELECT cachekit_wait('10 seconds')") eq 't';
}

sub present { return redis_exists($redis, $_[0]); }

sub count_keys
{
	my @k = redis_keys($redis, $_[0]);
	return scalar @k;
}

# MSET (and SADD to $set when defined) 500 keys per command
sub fill
{
	my ($set, @keys) = @_;
	while (my @chunk = splice(@keys, 0, 500))
	{
		redis_cmd($redis, 'MSET', map { ($_ => 'v') } @chunk);
		redis_cmd($redis, 'SADD', $set, @chunk) if defined $set;
	}
	return;
}

sub queue_depth { return sql('SELECT queue_depth FROM cachekit_stats'); }

sub log_since
{
	my ($offset) = @_;
	return slurp_file($node->logfile, $offset);
}

sub count_matches
{
	my ($text, $re) = @_;
	my $n = () = $text =~ /$re/g;
	return $n;
}

my $probe_seq = 0;

# the worker holds a live connection (it connects only when it has work)
sub make_worker_connect
{
	my $probe = 'probe:' . ++$probe_seq;
	redis_cmd($redis, 'SET', $probe, 'x');
	sql("SELECT cachekit_delete('$probe')");
	return delivered() && !present($probe);
}

sub worker_client_ids
{
	my @ids;
	for my $line (split /\n/, redis_cmd($redis, 'CLIENT', 'LIST'))
	{
		next if $line =~ /\bcmd=client\|list\b/;
		push @ids, $1 if $line =~ /^id=(\d+)/;
	}
	return @ids;
}

# reload and wait until the worker has dropped its connection, i.e. reloaded
sub reload_and_wait
{
	ok(make_worker_connect(), 'worker is connected before the reload');
	my %old = map { ($_ => 1) } worker_client_ids();
	sql('SELECT pg_reload_conf()');
	ok(%old && wait_for(sub { !grep { $old{$_} } worker_client_ids() }, 20),
		'worker dropped its connection: it has reloaded');
	return;
}

# the cache of the users table: per row two keys, per team a tag
my $nusers = 2000;
my $nteams = 20;

sub fill_user_cache
{
	fill(undef, map { ("user:$_", "user:email:u$_\@x") } 1 .. $nusers);
	for my $t (0 .. $nteams - 1)
	{
		fill("tag:team:$t", map { "list:team:$t:$_" } 1 .. 3);
	}
	fill(undef, 'page:home', 'page:nav');
	fill('tag:promo', 'promo:1', 'promo:2');
	fill(undef, map { "keep:$_" } 1 .. 50);
	return;
}

# run the outage workload: all rows updated in four transactions, plus
# manual deletes and a tag flush; returns the slowest transaction's seconds
sub outage_writes
{
	my $slowest = 0;
	my $per     = $nusers / 4;
	for my $i (0 .. 3)
	{
		my ($lo, $hi) = ($i * $per + 1, ($i + 1) * $per);
		my $t0 = time();
		sql("UPDATE users SET email = email WHERE id BETWEEN $lo AND $hi");
		my $dt = time() - $t0;
		$slowest = $dt if $dt > $slowest;
	}
	my $t0 = time();
	sql(q{BEGIN; SELECT cachekit_delete('page:home', 'page:nav');
	      SELECT cachekit_flush_tag('promo'); COMMIT;});
	my $dt = time() - $t0;
	$slowest = $dt if $dt > $slowest;
	return $slowest;
}

# after the outage: every affected key is gone, the rest is there
sub check_all_invalidated
{
	my ($what) = @_;
	is(count_keys('user:*'),      0, "$what: all ${\ (2 * $nusers)} user keys deleted");
	is(count_keys('list:team:*'), 0, "$what: all team tag members deleted");
	is(count_keys('tag:*'),       0, "$what: all tag sets flushed");
	is(count_keys('page:*') + count_keys('promo:*'), 0,
		"$what: manual deletes and the manual tag flush delivered");
	is(count_keys('keep:*'), 50, "$what: the 50 unrelated keys survive");
	is(count_keys('cachekit:*'), 0, "$what: no private flushing set left");
	return;
}

sql(qq{
	CREATE TABLE users(id int PRIMARY KEY, email text, team_id int);
	INSERT INTO users SELECT g, 'u' || g || '\@x', g % $nteams FROM generate_series(1, $nusers) g;
	CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION
	cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');
});

# ---- 6. entries naming the same key collapse within a batch ---------------
# Redis is down while a hundred transactions update row 1, so all hundred
# entries are queued when the worker next gets through: they form one batch.
# (One transaction would make one entry: it gathers its keys, pending.c.)

ok(make_worker_connect(), 'worker connected');
stop_redis($redis);
my $s0 = cachekit_stats($node);
sql(q{DO $$ BEGIN FOR i IN 1..100 LOOP
	UPDATE users SET email = email WHERE id = 1; COMMIT; END LOOP; END $$});
is(queue_depth(), 100, 'a hundred entries queued while Redis is down');
ok(wait_for(sub { cachekit_stats($node)->{failed_attempts} > $s0->{failed_attempts} }, 20),
	'the worker tried and failed');
restart_redis($redis);
ok(wait_for(sub { queue_depth() == 0 }, 30), 'queue drained after Redis came back');
my $s1 = cachekit_stats($node);
my $kd = $s1->{keys_deleted} - $s0->{keys_deleted};
cmp_ok($kd, '<=', 5, "keys_deleted grew by $kd for 100 entries naming the same 2 keys");
cmp_ok($kd, '>=', 2, 'both keys were deleted');
is($s1->{entries_delivered} - $s0->{entries_delivered}, 100, 'all 100 entries delivered');
is($s1->{tags_flushed} - $s0->{tags_flushed}, 1, 'the common tag flushed once');

# ---- 7a. worker pointed at a dead port, cache refilled, pointed back -----

my $dead_port = PostgreSQL::Test::Cluster::get_free_port();
ok(make_worker_connect(), 'worker connected');
my $off = -s $node->logfile;
sql(qq{ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:$dead_port/0'});
reload_and_wait();

my $slowest = outage_writes();
cmp_ok($slowest, '<', 3, sprintf('writes go on while Redis is unreachable (slowest transaction %.2fs)', $slowest));
# a transaction's keys are gathered into entries of up to 1000 (pending.c):
# count the keys and tags queued, not the entries
is( sql(q{SELECT count(DISTINCT k) FROM cachekit_queue, unnest(keys || tags) k}),
	2 * $nusers + $nteams + 3,
	'every change is queued (2000 rows: two keys each, their tags; two deletes, one flush)');
ok( wait_for(
		sub {
			my $s = cachekit_stats($node);
			$s->{redis_connected} eq 'false'
			  && ($s->{last_error} // '') =~ /could not connect to 127\.0\.0\.1:$dead_port/;
		},
		20),
	'stats: not connected, last_error names the unreachable port');
ok(defined cachekit_stats($node)->{last_error_at}, 'stats: last_error_at set');

# the application refills its cache from the (already changed) database
fill_user_cache();
is(count_keys('user:*'), 2 * $nusers, 'cache filled');

sql(q{ALTER SYSTEM RESET cachekit.redis_url});
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'queue drained once the worker points back');
check_all_invalidated('redirect');
ok(wait_for(sub { cachekit_stats($node)->{redis_connected} eq 'true' }, 10), 'stats: connected again');
my $seg = log_since($off);
is(count_matches($seg, qr/cachekit worker cannot reach Redis/), 1,
	'one "cannot reach Redis" line for the whole outage');
is(count_matches($seg, qr/cachekit worker reconnected to Redis/), 1,
	'one "reconnected" line at its end');

# ---- 7b. redis-server stopped and started again --------------------------
# The data set is saved to dump.rdb before the stop, so the restarted
# server holds the stale keys again: the worker must delete them.

ok(make_worker_connect(), 'worker connected');
fill_user_cache();
is(redis_cmd($redis, 'SAVE'), 'OK', 'cache saved to dump.rdb');

$off = -s $node->logfile;
stop_redis($redis);
$s0 = cachekit_stats($node);
$slowest = outage_writes();
cmp_ok($slowest, '<', 3, sprintf('writes go on while Redis is stopped (slowest transaction %.2fs)', $slowest));
cmp_ok(queue_depth(), '>', 0, 'queue_depth > 0 during the outage');
is(sql(q{SELECT cachekit_wait('1 second')}), 'f', 'cachekit_wait reports the work undelivered');
ok( wait_for(
		sub {
			sql(qq{SELECT NOT redis_connected AND last_error IS NOT NULL
			       AND last_error_at > '$s0->{last_error_at}'::timestamptz
			       FROM cachekit_stats}) eq 't';
		},
		20),
	'stats: redis_connected false and a fresh last_error');
diag('last_error during the outage: ' . cachekit_stats($node)->{last_error});

# no spinning: commit work every 100 ms for 3 s (each commit wakes the
# worker) and count the worker's attempts meanwhile
my $sa    = cachekit_stats($node);
my $t0    = time();
my $nwake = 0;
while (time() - $t0 < 3)
{
	sql("SELECT cachekit_delete('wake:" . ++$nwake . "')");
	Time::HiRes::sleep(0.1);
}
my $sb      = cachekit_stats($node);
my $elapsed = time() - $t0;
my $tries   = $sb->{failed_attempts} - $sa->{failed_attempts};
diag(sprintf('%d failed attempts in %.1fs of outage with %d wake-ups (retry_max_delay 500ms)',
		$tries, $elapsed, $nwake));
cmp_ok($tries, '<', 10 * $elapsed, 'the worker backs off instead of spinning');
cmp_ok($tries, '>=', 3, 'the worker keeps retrying');

restart_redis($redis);
ok(wait_for(sub { queue_depth() == 0 }, 30), 'queue drained after Redis restarted');
check_all_invalidated('restart');
ok(wait_for(sub { cachekit_stats($node)->{redis_connected} eq 'true' }, 10), 'stats: connected again');
$seg = log_since($off);
is(count_matches($seg, qr/cachekit worker cannot reach Redis/), 1,
	'one "cannot reach Redis" line for the outage, not one per attempt');
is(count_matches($seg, qr/cachekit worker reconnected to Redis/), 1,
	'one "reconnected" line at its end');
is(cachekit_stats($node)->{dead_letters}, '0', 'nothing was dead-lettered');

$node->stop;
stop_redis($redis);
done_testing();
