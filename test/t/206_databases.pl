# test/t/206_databases.pl -- the served database and its neighbours.
#
# 1. cachekit.database does not exist yet: cachekit says so once and waits,
#    without a worker failing and being restarted every few seconds; once
#    the database is created it is served.
# 2. Databases made from one template hold queue tables of the same OID. The
#    worker's read floor and its "drained" notices belong to the database
#    it serves: cachekit_wait in a copy that nobody serves must not take
#    them for its own (it would return true with work still queued).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('dbs', $redis, 'cachekit.database' => 'app');

# ---- 1. waiting for the database ----------------------------------------

ok(wait_for(sub { slurp_file($node->logfile) =~ /waiting for database "app"/ }, 60),
	'cachekit says it waits for the database');
# two of the old restart periods (5 s each) and more
sleep(12);
my $log = slurp_file($node->logfile);
my $waits = () = $log =~ /waiting for database "app"/g;
is($waits, 1, 'it says so once');
unlike($log, qr/FATAL|exited with exit code|database "app" does not exist/,
	'no worker failed or was restarted meanwhile');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cachekit worker'}),
	'0', 'no delivery worker runs yet');

# ---- 2. a template and two copies ----------------------------------------

$node->safe_psql('postgres', 'CREATE DATABASE tmpl');
$node->safe_psql('tmpl', 'CREATE EXTENSION cachekit');
$node->safe_psql('postgres', 'CREATE DATABASE app TEMPLATE tmpl');
$node->safe_psql('postgres', 'CREATE DATABASE other TEMPLATE tmpl');
ok(wait_for_worker($node, 'app', 60), 'the worker serves app once it exists');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cachekit worker'}),
	'1', 'one delivery worker');

my $relid = $node->safe_psql('app', q{SELECT 'cachekit_queue'::regclass::oid});
is($node->safe_psql('other', q{SELECT 'cachekit_queue'::regclass::oid}), $relid,
	'app and other have queue tables of the same OID');

# deliver enough in app, commit after commit, for the read floor to rise
for my $round (1 .. 20)
{
	$node->safe_psql('app',
		qq{SELECT cachekit_delete('app:$round:' || g) FROM generate_series(1, 50) g});
	is($node->safe_psql('app', q{SELECT cachekit_wait('30 seconds')}), 't', "app: round $round delivered")
	  if $round % 5 == 0;
}
ok(wait_for(sub { $node->safe_psql('app', q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 60),
	'app: everything delivered');

# other is served by nobody: its entry stays, and cachekit_wait says so
$node->safe_psql('other', q{SELECT cachekit_delete('other:1')});
is($node->safe_psql('other', q{SELECT cachekit_wait('2 seconds')}), 'f',
	'cachekit_wait in an unserved copy does not take app\'s floor for its own');
is($node->safe_psql('other', q{SELECT count(*) FROM cachekit_queue}), '1',
	'the copy\'s entry is still queued');

# and app goes on
redis_cmd($redis, 'SET', 'app:last', 'x');
$node->safe_psql('app', q{SELECT cachekit_delete('app:last')});
ok(wait_for(sub { !redis_exists($redis, 'app:last') }, 30), 'app is still served');

$node->stop;
done_testing();
