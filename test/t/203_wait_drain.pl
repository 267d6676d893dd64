# test/t/203_wait_drain.pl -- sessions in cachekit_wait do not slow delivery.
#
# A backlog builds up while Redis is down, then drains, once with nobody
# waiting and once with several sessions in cachekit_wait('2 min'). The
# work the drain does in the queue's id index (index entries read, all
# sessions together) must stay about the same: a waiter used to hold the
# worker's read floor back, so that every pass of the drain stepped over
# all the entries delivered before it. Times are shown, not judged (see
# bench/ for figures).

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use CachekitTest;

my $ENTRIES = 60000;
my $WAITERS = 4;

my $redis = start_redis();
my $node  = new_cachekit_node('waitdrain', $redis,
	'cachekit.retry_max_delay' => '100ms',
	'autovacuum'               => 'off');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 60), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub index_reads
{
	return sql(q{SELECT idx_tup_read FROM pg_stat_all_indexes
				 WHERE indexrelid = 'cachekit_queue_pkey'::regclass});
}

# make the worker flush its statistics: two passes more than a second apart
sub settle_stats
{
	for my $i (1 .. 2)
	{
		sleep(1.2);
		sql(q{SELECT cachekit_delete('stats:flush')});
		wait_for(sub { sql(q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 60);
	}
	sleep(1.2);
	return index_reads();
}

sub drain
{
	my ($label, $waiters) = @_;

	stop_redis($redis);
	# one entry per key, as many transactions leave them (one statement's
	# cachekit_delete calls are gathered into few entries, pending.c)
	sql(qq{INSERT INTO cachekit_queue (kind, keys)
	       SELECT 'i', ARRAY['drain:$label:' || g] FROM generate_series(1, $ENTRIES) g});
	is(sql(q{SELECT count(*) FROM cachekit_queue}), $ENTRIES, "$label: backlog of $ENTRIES entries");
	my $before = settle_stats_quiet();

	my @w;
	for (1 .. $waiters)
	{
		my ($out, $err) = ('', '');
		my $h = IPC::Run::start(
			[ 'psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
			  q{SELECT cachekit_wait('2 min')} ],
			'>', \$out, '2>', \$err);
		push @w, { h => $h, out => \$out, err => \$err };
	}
	# the waiters are waiting before Redis comes back
	ok(wait_for(sub {
		sql(q{SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT cachekit_wait%'
			  AND state = 'active' AND pid <> pg_backend_pid()}) == $waiters }, 60),
		"$label: $waiters sessions wait");

	my $t0 = time();
	restart_redis($redis);
	ok(wait_for(sub { sql(q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 300),
		"$label: the backlog drained");
	my $took = time() - $t0;
	for my $x (@w)
	{
		$x->{h}->finish;
		is(${ $x->{out} } =~ s/\s+\z//r, "t", "$label: a waiter returned true");
	}
	my $reads = settle_stats() - $before;
	note sprintf('%s: drained %d entries in %.2f s; %d index entries read', $label, $ENTRIES,
		$took, $reads);
	return $reads;
}

# before a drain: stats settled, without touching the queue
sub settle_stats_quiet
{
	sleep(1.2);
	return index_reads();
}

my $alone  = drain('alone', 0);
my $waited = drain('waited', $WAITERS);
cmp_ok($waited, '<=', 1.5 * $alone + 20000,
	"with $WAITERS waiters the drain reads about as much of the index ($waited vs $alone)");

$node->stop;
done_testing();
