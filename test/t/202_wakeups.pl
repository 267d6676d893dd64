# test/t/202_wakeups.pl -- every commit path is delivered at once.
#
# 1. The read floor: while an early transaction holding a queue entry stays
#    open, later commits are delivered one by one (the worker's read floor
#    moves up behind them); then the early transaction commits with no
#    traffic after it. Its entry is below everything delivered since, and
#    must be delivered well under a second later, not when the 5 s idle
#    timer finally rereads the whole queue.
# 2. COMMIT PREPARED of a transaction that enqueued work is delivered as
#    fast as a plain commit.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('wakeups', $redis, 'max_prepared_transactions' => 5);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 60), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub gone_within
{
	my ($key, $seconds) = @_;
	my $t0 = time();
	my $ok = wait_for(sub { !redis_exists($redis, $key) }, 20);
	my $took = time() - $t0;
	note sprintf('%s gone after %.3f s', $key, $took);
	return $ok && $took < $seconds;
}

# ---- 1. an early transaction under a moving floor -----------------------

redis_cmd($redis, 'SET', 'floor:early', 'x');
my $early = $node->background_psql('postgres', on_error_stop => 1);
$early->query_safe('BEGIN');
$early->query_safe(q{SELECT cachekit_delete('floor:early')});

for my $i (1 .. 8)
{
	redis_cmd($redis, 'SET', "floor:later:$i", 'x');
	sql(qq{SELECT cachekit_delete('floor:later:$i')});
	ok(gone_within("floor:later:$i", 5), "later commit $i delivered while the early one is open");
}
my $ids = sql(q{SELECT count(*) FROM cachekit_queue});
is($ids, '0', 'no committed entry waits');
ok(redis_exists($redis, 'floor:early'), 'the early transaction\'s key is still there');

$early->query_safe('COMMIT');
ok(gone_within('floor:early', 1), 'the early transaction is delivered well under a second after its commit');
$early->quit;

# ---- 2. COMMIT PREPARED --------------------------------------------------

for my $round (1 .. 3)
{
	my $key = "prepared:$round";
	redis_cmd($redis, 'SET', $key, 'x');
	sql(qq{BEGIN; SELECT cachekit_delete('$key'); PREPARE TRANSACTION 'ck$round'});
	# a delivered commit just before: the worker starts a fresh idle wait
	redis_cmd($redis, 'SET', "probe:$round", 'x');
	sql(qq{SELECT cachekit_delete('probe:$round')});
	ok(gone_within("probe:$round", 5), "round $round: the worker is idle again");
	ok(redis_exists($redis, $key), "round $round: nothing of the prepared transaction is delivered");
	sql(qq{COMMIT PREPARED 'ck$round'});
	ok(gone_within($key, 1), "round $round: COMMIT PREPARED is delivered at once");
}

# a rolled back prepared transaction delivers nothing
redis_cmd($redis, 'SET', 'prepared:rollback', 'x');
sql(q{BEGIN; SELECT cachekit_delete('prepared:rollback'); PREPARE TRANSACTION 'ckr'});
sql(q{ROLLBACK PREPARED 'ckr'});
is(sql(q{SELECT cachekit_wait('10 seconds')}), 't', 'delivered what there is');
ok(redis_exists($redis, 'prepared:rollback'), 'ROLLBACK PREPARED sends nothing');

$node->stop;
done_testing();
