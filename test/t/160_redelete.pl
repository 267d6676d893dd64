# test/t/160_redelete.pl -- cachekit.redelete_after: off by default; when
# set, the worker deletes every invalidated key and flushes every tag a
# second time that long after the first delivery, so that a stale value a
# slow cache-aside reader wrote back after the first delete is gone too.
# A key write-through wrote is deleted a second time only if it no longer
# holds the value written.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('redelete', $redis);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub delivered { return sql("SELECT cachekit_wait('30 seconds')") eq 't'; }
sub present { return redis_exists($redis, $_[0]); }

sql(q{
	CREATE TABLE items(id int PRIMARY KEY, v int, grp int);
	CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('item:{id}', 'tag=grp:{grp}');
	CREATE TABLE rows_wt(id int PRIMARY KEY, v int);
	CREATE TRIGGER rows_wt_cache AFTER INSERT OR UPDATE OR DELETE ON rows_wt
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}');
	INSERT INTO items SELECT g, 0, g % 2 FROM generate_series(1, 4) g;
	INSERT INTO rows_wt VALUES (1, 0);
});
ok(delivered(), 'seed rows delivered');

# a slow reader writes back what it read before the UPDATE, after the delete
sub stale_refill
{
	redis_cmd($redis, 'SET', 'item:1', 'v=0');
	redis_cmd($redis, 'SET', 'list:grp:1', 'old list');
	redis_cmd($redis, 'SADD', 'tag:grp:1', 'list:grp:1');
	return;
}

# ---- off by default ----------------------------------------------------------

is(sql('SHOW cachekit.redelete_after'), '0', 'cachekit.redelete_after is off by default');
sql('UPDATE items SET v = 1 WHERE id = 1');
ok(delivered(), 'UPDATE delivered');
stale_refill();
# the worker has nothing to do; give a second delete every chance to happen
sleep(3);
ok(delivered(), 'nothing left to deliver');
ok(present('item:1') && present('list:grp:1'),
	'off: a value written back after the delete stays');

# ---- on: deleted again after the delay ---------------------------------------

sql(q{ALTER SYSTEM SET cachekit.redelete_after = '4s'});
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { sql('SHOW cachekit.redelete_after') eq '4s' }, 30), 'setting reloaded');
# the worker reloads at its next wake-up: an empty transaction is not enough,
# so wait until a delivery made after the reload proves it woke
sql('UPDATE items SET v = 1 WHERE id = 3');
ok(delivered(), 'a delivery after the reload');

my $t0 = time();
sql('UPDATE items SET v = 2 WHERE id = 1');
ok(delivered(), 'UPDATE delivered');
ok(!present('item:1') && !present('list:grp:1'), 'the first delete happened');
stale_refill();
# well within the 4 s delay (a slow machine only makes this check skip)
my $soon = time() - $t0 < 3;
SKIP:
{
	skip 'the machine took more than 3 s for the refill', 1 unless $soon;
	ok(present('item:1') && present('list:grp:1'),
		'the stale value is there between the two deletes');
}
ok(wait_for(sub { !present('item:1') }, 60), 'the key written back is deleted a second time');
ok(wait_for(sub { !present('list:grp:1') && !present('tag:grp:1') }, 60),
	'the tag is flushed a second time (a member added after the first flush is gone)');
cmp_ok(time() - $t0, '>=', 3.9, 'the second delete came after the delay, not before');

# a key written after the second delete stays: it happens once
redis_cmd($redis, 'SET', 'item:1', 'v=2');
sleep(5);
ok(present('item:1'), 'one second delete per delivery, not more');

# ---- write-through: the value written stays, a stale one over it goes --------

sql('UPDATE rows_wt SET v = 5 WHERE id = 1');
ok(delivered(), 'write-through UPDATE delivered');
my $wt = redis_cmd($redis, 'GET', 'wt:1');
like($wt, qr/"v": ?5\b/, 'write-through value written');
sleep(6);
is(redis_cmd($redis, 'GET', 'wt:1'), $wt,
	'the write-through value is still there after the delay');

# two writes in one transaction (one batch): the last value is the one kept
sql('BEGIN; UPDATE rows_wt SET v = 6 WHERE id = 1; UPDATE rows_wt SET v = 7 WHERE id = 1; COMMIT');
ok(delivered(), 'two write-through UPDATEs delivered');
my $wt7 = redis_cmd($redis, 'GET', 'wt:1');
like($wt7, qr/"v": ?7\b/, 'the last write-through value written');
sleep(6);
is(redis_cmd($redis, 'GET', 'wt:1'), $wt7,
	'the last value of a batch is kept after the delay');

# a reader puts an older value over the written one: deleted a second time
sql('UPDATE rows_wt SET v = 8 WHERE id = 1');
ok(delivered(), 'write-through UPDATE delivered');
redis_cmd($redis, 'SET', 'wt:1', $wt7);
ok(wait_for(sub { !present('wt:1') }, 60),
	'a stale value put over a write-through value is deleted a second time');

# ---- a DELETE of a write-through row is repeated -----------------------------

sql('DELETE FROM rows_wt WHERE id = 1');
ok(delivered(), 'write-through DELETE delivered');
redis_cmd($redis, 'SET', 'wt:1', $wt);
ok(wait_for(sub { !present('wt:1') }, 60), 'a write-through delete is repeated');

# ---- the memory bound: the oldest pending second deletes go early -------------

# with a delay of an hour, a stale value stays until more than 32 MB of keys
# are pending; then the oldest second deletes are sent at once
sql(q{ALTER SYSTEM SET cachekit.redelete_after = '1h'});
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { sql('SHOW cachekit.redelete_after') eq '1h' }, 30), 'delay of an hour');
sql('UPDATE items SET v = 1 WHERE id = 4');
ok(delivered(), 'a delivery after the reload');
sql('UPDATE items SET v = 2 WHERE id = 2');
ok(delivered(), 'UPDATE delivered');
redis_cmd($redis, 'SET', 'item:2', 'v=1');
sleep(3);
ok(present('item:2'), 'the stale value waits for its second delete');
# 4000 keys of 10 kB: 40 MB of pending second deletes
sql(q{SELECT cachekit_delete(VARIADIC array_agg(g || repeat('k', 10000))) FROM generate_series(1, 4000) g});
ok(delivered(), '40 MB of key deletes delivered');
ok(wait_for(sub { !present('item:2') }, 120),
	'over the bound, the oldest second delete is sent early (not dropped)');
sql('UPDATE items SET v = 2 WHERE id = 3');
ok(delivered(), 'UPDATE delivered');
redis_cmd($redis, 'SET', 'item:3', 'v=1');
sleep(3);
ok(present('item:3'), 'back under the bound, second deletes wait for their time again');

# ---- turned off again: no more second deletes --------------------------------

sql(q{ALTER SYSTEM SET cachekit.redelete_after = 0});
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { sql('SHOW cachekit.redelete_after') eq '0' }, 30), 'turned off');
sql('UPDATE items SET v = 9 WHERE id = 3');
ok(delivered(), 'a delivery after the reload');
sql('UPDATE items SET v = 3 WHERE id = 1');
ok(delivered(), 'UPDATE delivered');
stale_refill();
sleep(6);
ok(present('item:1'), 'off again: the value written back stays');

done_testing();
