# test/t/080_failover.pl -- failover to a streaming standby: the queue is
# replicated like any table; the standby runs no cachekit worker (and
# cachekit_stats there shows no worker pid) and so touches no key while in
# recovery; a backlog built on the primary while its Redis access is broken
# is delivered by the promoted standby after the primary crashed.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis   = start_redis();
my $primary = new_cachekit_node('primary', $redis,
	-init                      => { allows_streaming => 1 },
	'cachekit.retry_max_delay' => '200ms');
$primary->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($primary, 'postgres', 30), 'primary: worker is running');

sub psql_on { my ($n, $q) = @_; return $n->safe_psql('postgres', $q); }

sub count_present
{
	my $n = 0;
	$n += $_ for resp_pipeline($redis, map { [ 'EXISTS', $_ ] } @_);
	return $n;
}

my $NROWS = 500;
psql_on($primary, qq{
	CREATE TABLE users(id int PRIMARY KEY, email text, team int);
	INSERT INTO users SELECT g, 'u' || g || '\@x', g % 5 FROM generate_series(1, $NROWS) g;
	CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION
	cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team}');
});

redis_cmd($redis, 'SET', 'probe:1', 'x');
psql_on($primary, q{SELECT cachekit_delete('probe:1')});
ok(wait_for(sub { !redis_exists($redis, 'probe:1') }, 30), 'primary delivers');

# the standby, from a base backup taken while the primary's URL is the live
# Redis: it keeps that URL
$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby, 'replay', $primary->lsn('insert'));
is(psql_on($standby, 'SELECT pg_is_in_recovery()'), 't', 'standby is in recovery');
is(psql_on($standby, 'SHOW cachekit.redis_url'), redis_url($redis), 'standby points at the live Redis');
is(psql_on($standby, 'SELECT worker_pid IS NULL FROM cachekit_stats'), 't',
	'standby: cachekit_stats shows no worker pid');
is(psql_on($standby, q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cachekit worker'}),
	'0', 'standby: no cachekit worker process');
unlike(slurp_file($standby->logfile), qr/cachekit worker started/, 'standby: no worker started in its log');

# ---- the primary's Redis access breaks; a backlog builds ------------------

my $dead = dead_url();
psql_on($primary, qq{ALTER SYSTEM SET cachekit.redis_url = '$dead'});
psql_on($primary, 'SELECT pg_reload_conf()');
ok(wait_for(sub { psql_on($primary, 'SHOW cachekit.redis_url') eq $dead }, 20), 'primary: URL now a dead port');
psql_on($primary, q{SELECT cachekit_delete('probe:dead')});
my ($dead_port) = $dead =~ /:(\d+)\//;
ok( wait_for(
		sub { (cachekit_stats($primary)->{last_error} // '') =~ /:$dead_port\b/ },
		20),
	'primary: the worker fails against the dead port');

# the cache as the application filled it
resp_fill($redis, 'cached', (map { ("user:$_", "user:email:u$_\@x") } 1 .. $NROWS),
	'page:home', 'keep:1', 'keep:2');
resp_pipeline($redis, map { [ 'SADD', "tag:team:$_", "list:team:$_" ] } 0 .. 4);
resp_fill($redis, 'cached', map { "list:team:$_" } 0 .. 4);

psql_on($primary, q{UPDATE users SET email = 'new' || id || '@x' WHERE id % 2 = 0});
psql_on($primary, q{DELETE FROM users WHERE id % 2 = 1 AND id > 400});
psql_on($primary, q{SELECT cachekit_delete('page:home')});
my $depth = psql_on($primary, 'SELECT count(*) FROM cachekit_queue');
# a statement's keys are gathered into few entries (pending.c): count keys
cmp_ok(psql_on($primary, 'SELECT count(*) FROM cachekit_queue, unnest(keys) k'), '>=', 300,
	"primary: backlog of $depth entries, 300 keys or more");

$primary->wait_for_catchup($standby, 'replay', $primary->lsn('insert'));
is(psql_on($standby, 'SELECT count(*) FROM cachekit_queue'), $depth,
	'standby: the whole backlog is replicated');
is(psql_on($standby, 'SELECT worker_pid IS NULL FROM cachekit_stats'), 't',
	'standby: still no worker');
is(count_present(map { "user:$_" } 1 .. $NROWS), $NROWS,
	'nothing was delivered while the standby is in recovery');

# keys the backlog must delete: changed rows (old and new e-mail keys) and
# deleted rows, their teams' tags, the manual delete
my @stale = (
	(map { ("user:$_", "user:email:u$_\@x") } grep { $_ % 2 == 0 || $_ > 400 } 1 .. $NROWS),
	(map { ("tag:team:$_", "list:team:$_") } 0 .. 4),
	'page:home');
my @fresh = map { ("user:$_", "user:email:u$_\@x") } grep { $_ % 2 == 1 && $_ <= 400 } 1 .. $NROWS;
is(count_present(@stale), scalar @stale, scalar(@stale) . ' stale keys in Redis before the failover');

# ---- the primary crashes; the standby is promoted --------------------------

$primary->stop('immediate');
$standby->promote;
ok(wait_for(sub { psql_on($standby, 'SELECT pg_is_in_recovery()') eq 'f' }, 60), 'standby promoted');
ok(wait_for_worker($standby, 'postgres', 60), 'the promoted server starts its worker');
ok(wait_for(sub { psql_on($standby, 'SELECT count(*) FROM cachekit_queue') eq '0' }, 60),
	'the promoted server delivers the backlog');
is(count_present(@stale), 0, 'every stale key is gone');
is(count_present(@fresh), scalar @fresh, scalar(@fresh) . ' keys of untouched rows survive');
is(count_present('keep:1', 'keep:2'), 2, 'unrelated keys survive');

# new work on the new primary
redis_cmd($redis, 'SET', 'user:1', 'cached');
psql_on($standby, q{UPDATE users SET team = 9 WHERE id = 1});
ok(wait_for(sub { !redis_exists($redis, 'user:1') }, 30), 'the new primary delivers new work');
is(cachekit_stats($standby)->{dead_letters}, '0', 'no dead letters');

$standby->stop;
stop_redis($redis);
done_testing();
