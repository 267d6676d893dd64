# test/t/126_settle_place.pl -- the worker deletes delivered entries straight
# from the heap, by the place (ctid) it read them at (issue 15: no executor,
# no index lookup per entry). The guard of that shortcut: the row at that
# place must still be the entry it read. Here the entry is deleted by hand
# and the queue vacuumed while the worker waits for Redis, and a new entry
# takes the very same place; the worker's settle must leave the new entry
# alone, so that its key is still deleted in Redis.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
my $node  = new_cachekit_node('settle_place', $redis,
	'cachekit.command_timeout' => '60s',
	'autovacuum'               => 'off');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');
ok(wait_for_redis_connected($node, 'postgres', 30), 'worker is connected');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# a delivered entry first, then an empty, vacuumed queue
redis_cmd($redis, 'SET', 'warm:1', 'v');
sql(q{SELECT cachekit_delete('warm:1')});
ok(wait_for(sub { !redis_exists($redis, 'warm:1') }, 30), 'a first delete is delivered');
ok(wait_for(sub { sql('SELECT count(*) FROM cachekit_queue') == 0 }, 30), 'queue empty');
sql('VACUUM cachekit_queue');

# the worker reads entry A and waits for Redis, which is stopped
redis_cmd($redis, 'SET', 'a:1', 'v');
redis_cmd($redis, 'SET', 'b:1', 'v');
$redis->pause;
sql(q{SELECT cachekit_delete('a:1')});
ok(wait_worker_busy($node, 30), 'the worker is delivering entry A, Redis stopped');
my ($a_id, $a_place) = split /\|/, sql(q{SELECT id || '|' || ctid FROM cachekit_queue});

# A goes by hand, vacuum frees its place, entry B takes it
sql(qq{DELETE FROM cachekit_queue WHERE id = $a_id});
sql('VACUUM cachekit_queue');
sql(q{INSERT INTO cachekit_queue (kind, keys) VALUES ('i', ARRAY['b:1'])});
my ($b_id, $b_place) = split /\|/, sql(q{SELECT id || '|' || ctid FROM cachekit_queue});
isnt($b_id, $a_id, "entry B ($b_id) is another entry than A ($a_id)");
is($b_place, $a_place, "entry B took A's place $a_place");

# Redis answers A's delete: the worker settles A by its place
$redis->resume;
ok(wait_for(sub { !redis_exists($redis, 'a:1') }, 30), 'A was delivered');
ok(wait_for(sub { !redis_exists($redis, 'b:1') }, 30),
	'B was not deleted from the queue in A\'s place: its key is deleted too');
ok(wait_for(sub { sql('SELECT count(*) FROM cachekit_queue') == 0 }, 30), 'queue empty');
is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', 'no dead letter');

$node->stop;
done_testing();
