# test/t/122_tag_set_expiry.pl -- a tag set never expires before a key it
# lists (issue 9, item 6):
#
#  - a set that cache-aside readers filled without expiry (SADD tag:team:7
#    user:42) gets none from a write-through with a ttl, so a flush long
#    after that ttl still deletes user:42;
#  - a set a reader gave an expiry is kept alive at least as long as the
#    write-through key that joins it, or made persistent for a key without
#    ttl;
#  - a key joins its set once however often it is written and leaves it
#    with its row, so the set lists no more than the rows' keys.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
my $node  = new_cachekit_node('tag_set_expiry', $redis);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub drained { return wait_for(sub { sql('SELECT count(*) FROM cachekit_queue') == 0 }, 60); }
sub pttl { return resp_cmd($redis, 'PTTL', $_[0]); }

sql(q{
CREATE TABLE short_lived (id int PRIMARY KEY, team int, v text);
CREATE TRIGGER short_cache AFTER INSERT OR UPDATE OR DELETE ON short_lived
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=short:{id}', 'ttl=1', 'tag=team:{team}');
CREATE TABLE long_lived (id int PRIMARY KEY, team int, v text);
CREATE TRIGGER long_cache AFTER INSERT OR UPDATE OR DELETE ON long_lived
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=long:{id}', 'ttl=100', 'tag=team:{team}');
CREATE TABLE forever (id int PRIMARY KEY, team int, v text);
CREATE TRIGGER forever_cache AFTER INSERT OR UPDATE OR DELETE ON forever
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=forever:{id}', 'tag=team:{team}');
});

# ---- a reader's set without expiry stays without -----------------------------

resp_cmd($redis, 'SET', 'user:42', 'filled by a reader, no TTL');
resp_cmd($redis, 'SADD', 'tag:team:7', 'user:42');
sql(q{INSERT INTO short_lived VALUES (1, 7, 'a')});
ok(drained(), 'write-through with ttl=1 delivered');
is(resp_cmd($redis, 'SISMEMBER', 'tag:team:7', 'short:1'), 1, 'the key joined the set');
is(pttl('tag:team:7'), -1, 'the set the reader filled got no expiry');
# longer than any expiry the old rule (twice the ttl) gave the set
ok(wait_for(sub { !redis_exists($redis, 'short:1') }, 30), 'the written key expired');
sleep 2;
ok(redis_exists($redis, 'tag:team:7'), 'the set outlives it');
sql(q{SELECT cachekit_flush_tag('team:7')});
ok(drained(), 'flush delivered');
ok(!redis_exists($redis, 'user:42'), "the flush deleted the reader's key");

# a set cachekit creates has no expiry either (a reader may add to it later)
sql(q{INSERT INTO short_lived VALUES (2, 8, 'a')});
ok(drained(), 'delivered');
is(pttl('tag:team:8'), -1, 'a set created by a write-through has no expiry');

# ---- a reader's set with an expiry lives at least as long as the key ---------

resp_cmd($redis, 'SADD', 'tag:team:9', 'user:43');
resp_cmd($redis, 'EXPIRE', 'tag:team:9', 5);
sql(q{INSERT INTO long_lived VALUES (1, 9, 'a')});
ok(drained(), 'delivered');
my $t = pttl('tag:team:9');
cmp_ok($t, '>=', 99_000, "a set with a shorter expiry is kept alive as long as the key ($t ms)");
cmp_ok($t, '>=', pttl('long:1'), 'at least as long as the key itself');

resp_cmd($redis, 'EXPIRE', 'tag:team:9', 1000);
sql(q{UPDATE long_lived SET v = 'b' WHERE id = 1});
ok(drained(), 'delivered');
cmp_ok(pttl('tag:team:9'), '>', 900_000, 'a longer expiry is never shortened');

sql(q{INSERT INTO forever VALUES (1, 9, 'a')});
ok(drained(), 'delivered');
is(pttl('tag:team:9'), -1, 'a key without ttl joining makes the set persistent');

# ---- bounded: one member per row -------------------------------------------------

sql(q{INSERT INTO forever SELECT g, 10, 'a' FROM generate_series(2, 51) g});
sql(qq{UPDATE forever SET v = 'v$_' WHERE team = 10}) for 1 .. 5;
ok(drained(), 'fifty rows written six times');
is(resp_cmd($redis, 'SCARD', 'tag:team:10'), 50, 'their set lists fifty keys');
sql(q{UPDATE forever SET team = 11 WHERE id BETWEEN 2 AND 21});
sql(q{DELETE FROM forever WHERE id BETWEEN 22 AND 31});
ok(drained(), 'twenty rows moved to another tag, ten deleted');
is(resp_cmd($redis, 'SCARD', 'tag:team:10'), 20, 'the set lists the twenty rows left');
is(resp_cmd($redis, 'SCARD', 'tag:team:11'), 20, 'the other set the twenty moved');

$node->stop;
stop_redis($redis);
done_testing();
