# test/t/121_refusal_classes.pl -- what a refusal means for an entry
# (issue 9, item 7):
#
#  - NOPERM for a key (outside the worker's ACL key patterns) is the entry's
#    own refusal: counted, and dead-lettered, not retried for ever; and the
#    UNLINK of 500 keys it shares with other entries is retried key by key,
#    so the other keys' entries are delivered at once;
#  - the dead-letter rule is attempts AND time: an entry refused
#    cachekit.max_attempts times stays queued until its first refusal is
#    cachekit.dead_letter_after old (reloadable), so a fixable WRONGTYPE is
#    delivered once fixed;
#  - a refused entry waits for its own retry: the queue behind it flows at
#    once even when cachekit.retry_max_delay is long;
#  - a write-through refused inside its script (OOM at its first set, or at
#    the SET of a key without tags) deletes the key's old value meanwhile;
#  - NOPERM for a command (EVALSHA not allowed) refuses everything alike: not
#    counted, never dead-lettered, delivered once the ACL is fixed.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
redis_cmd($redis, 'ACL', 'SETUSER', 'ck', 'on', '>ck-secret-pw', '~user:*', '~tag:*',
	'~cachekit:*', '~wrong*', '~flow:*', '+@all');
my $url  = 'redis://ck:ck-secret-pw@127.0.0.1:' . $redis->{port} . '/0';
my $node = new_cachekit_node('refusal_classes', $url,
	'cachekit.retry_max_delay'   => '500ms',
	'cachekit.max_attempts'      => '2',
	'cachekit.dead_letter_after' => '4s');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }
sub stat_of { return cachekit_stats($node)->{ $_[0] }; }

sub reload_setting
{
	my ($name, $value) = @_;
	sql("ALTER SYSTEM SET $name = '$value'");
	sql('SELECT pg_reload_conf()');
	return wait_for(
		sub { sql("SELECT setting || coalesce(unit, '') FROM pg_settings WHERE name = '$name'") eq $value },
		30);
}

# ---- NOPERM for one key in a chunk of 500 ---------------------------------

resp_fill($redis, 'x', (map { "user:$_" } 1 .. 601), 'secret:1');
# one entry per call, as separate transactions would leave them (calls in
# one transaction are gathered into few entries, pending.c), but committed
# together so that they form one batch
sql(q{
BEGIN;
INSERT INTO cachekit_queue (kind, keys) SELECT 'i', ARRAY['user:' || g] FROM generate_series(1, 300) g;
INSERT INTO cachekit_queue (kind, keys) VALUES ('i', ARRAY['secret:1', 'user:301']);
INSERT INTO cachekit_queue (kind, keys) SELECT 'i', ARRAY['user:' || g] FROM generate_series(302, 601) g;
COMMIT;
});
ok(wait_for(sub { queue_depth() == 1 }, 30), 'every entry but the one naming secret:1 was delivered');
ok(wait_for(sub { sql('SELECT attempts FROM cachekit_queue') >= 1 }, 30),
	'NOPERM for a key is counted as a refusal');
my $q = sql(q{SELECT last_error || '|' || (first_refused_at IS NOT NULL) FROM cachekit_queue});
like($q, qr/^NOPERM .*\|t(rue)?$/, "the entry keeps the error and its first refusal time ($q)");
is(resp_cmd($redis, 'EXISTS', map { "user:$_" } 1 .. 601), 0,
	'all 601 user keys are deleted, also those in the refused UNLINK chunk and the refused entry');
ok(redis_exists($redis, 'secret:1'), 'the key outside the ACL pattern is untouched');
ok(wait_for(sub { stat_of('dead_letters') eq '1' }, 60), 'and it is dead-lettered in the end');
my $dl = sql(q{SELECT keys::text || '|' || attempts || '|' || (failed_at - first_refused_at >= interval '4 s')
	|| '|' || error FROM cachekit_dead_letter});
my ($keys, $attempts, $waited, $error) = split /\|/, $dl, 4;
is($keys, '{secret:1,user:301}', 'dead letter: the refused entry');
cmp_ok($attempts, '>=', 2, "dead letter: after at least max_attempts ($attempts) attempts");
is($waited, 'true', 'dead letter: not before cachekit.dead_letter_after since its first refusal');
like($error, qr/NOPERM/, 'dead letter: the NOPERM error');
ok(redis_exists($redis, 'secret:1'), 'secret:1 is still there');
sql('DELETE FROM cachekit_dead_letter');

# ---- WRONGTYPE: attempts alone do not dead-letter; fixable in time ---------

ok(reload_setting('cachekit.dead_letter_after', '3600s'), 'dead_letter_after 1h by reload');
redis_cmd($redis, 'SET', 'tag:wrong', 'a string');
sql(q{SELECT cachekit_flush_tag('wrong')});
ok(wait_for(sub { sql('SELECT coalesce(max(attempts), 0) FROM cachekit_queue') >= 4 }, 60),
	'the WRONGTYPE flush was refused four times (twice max_attempts) ...');
is(stat_of('dead_letters'), '0', '... and is not dead-lettered: its first refusal is not an hour old');
# traffic behind it moves the worker's read floor: never past the waiting entry
for my $i (1 .. 5)
{
	redis_cmd($redis, 'SET', "flow:$i", 'x');
	sql("SELECT cachekit_delete('flow:$i')");
	ok(wait_for(sub { !redis_exists($redis, "flow:$i") }, 20), "later delete $i delivered meanwhile");
}
# the fix in one step (RENAME replaces the string), so no retry sees it halfway
redis_cmd($redis, 'SET', 'wrong:1', 'x');
redis_cmd($redis, 'SADD', 'fixed:wrong', 'wrong:1');
redis_cmd($redis, 'RENAME', 'fixed:wrong', 'tag:wrong');
# its retries are at most retry_max_delay (500 ms) apart; an entry the read
# floor had passed would only be read again after 5 s of idleness
ok(wait_for(sub { queue_depth() == 0 }, 4), 'fixed by the operator: delivered at its next retry');
ok(!redis_exists($redis, 'wrong:1') && !redis_exists($redis, 'tag:wrong'), 'the tag was flushed');
is(stat_of('dead_letters'), '0', 'no dead letter');

# ---- the queue behind a refused entry flows at once ---------------------------

ok(reload_setting('cachekit.retry_max_delay', '60000ms'), 'retry_max_delay 60s');
ok(reload_setting('cachekit.max_attempts', '1000'), 'max_attempts 1000');
redis_cmd($redis, 'SET', 'tag:wrong2', 'a string');
sql(q{SELECT cachekit_flush_tag('wrong2')});
# its own retries are 20 ms, 40 ms, ... apart: after 10 the next is 10 s away
ok(wait_for(sub { sql('SELECT coalesce(max(attempts), 0) FROM cachekit_queue') >= 10 }, 90),
	'the refused flush was retried ten times');
redis_cmd($redis, 'SET', 'flow:1', 'x');
sql(q{SELECT cachekit_delete('flow:1')});
ok(wait_for(sub { !redis_exists($redis, 'flow:1') }, 5),
	'a delete committed meanwhile is delivered at once, not after the refused entry\'s backoff');
is(queue_depth(), '1', 'only the refused entry waits');

# a hot key whose write is refused: its later writes wait too, but do not
# take the batch's slots (batch_size 10, 40 of them waiting)
sql(q{
CREATE TABLE hot (id int PRIMARY KEY, v int);
CREATE TRIGGER hot_cache AFTER INSERT OR UPDATE ON hot
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=user:hot', 'tag=wrong3');
});
redis_cmd($redis, 'SET', 'tag:wrong3', 'a string');
ok(reload_setting('cachekit.batch_size', '10'), 'batch_size 10');
sql(q{INSERT INTO hot VALUES (1, 0)});
ok(wait_for(sub { sql('SELECT count(*) FROM cachekit_queue WHERE attempts > 0') >= 2 }, 30),
	'the hot key\'s write is refused');
sql(qq{UPDATE hot SET v = $_}) for 1 .. 40;
redis_cmd($redis, 'SET', 'flow:2', 'x');
sql(q{SELECT cachekit_delete('flow:2')});
ok(wait_for(sub { !redis_exists($redis, 'flow:2') }, 20),
	'a delete behind 40 waiting writes of one key and a batch of 10 is delivered');
ok(!redis_exists($redis, 'user:hot'), 'the hot key holds no value while its writes are refused');
redis_cmd($redis, 'DEL', 'tag:wrong3');
ok(wait_for(sub { queue_depth() == 1 }, 60), 'once fixed, the hot key\'s writes go out (only the flush waits)');
like(redis_cmd($redis, 'GET', 'user:hot') // '', qr/"v": ?40\b/, 'with the newest value');
ok(reload_setting('cachekit.batch_size', '1000'), 'batch_size 1000');

# dead_letter_after lowered by reload: it goes
ok(reload_setting('cachekit.max_attempts', '2'), 'max_attempts 2');
ok(reload_setting('cachekit.dead_letter_after', '1s'), 'dead_letter_after 1s by reload');
ok(reload_setting('cachekit.retry_max_delay', '500ms'), 'retry_max_delay 500ms');
ok(wait_for(sub { stat_of('dead_letters') eq '1' }, 60), 'then it is dead-lettered');
is(queue_depth(), '0', 'queue empty');
sql('DELETE FROM cachekit_dead_letter');
redis_cmd($redis, 'DEL', 'tag:wrong2');

# ---- a write-through refused inside its script (Redis out of memory) ---------

# the sets are changed first, each allowed to fail: the failure deletes the
# key's old value (a miss, never stale) before the script answers
# (the key of a table without tags: the failure of its SET does the same)
redis_cmd($redis, 'SET', 'user:np1', 'old value');
redis_cmd($redis, 'SET', 'user:nt1', 'old value');
redis_cmd($redis, 'CONFIG', 'SET', 'maxmemory', '1');
sql(q{
CREATE TABLE np (id int PRIMARY KEY, v int);
CREATE TRIGGER np_cache AFTER INSERT OR UPDATE ON np
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=user:np{id}', 'tag=np');
CREATE TABLE nt (id int PRIMARY KEY, v int);
CREATE TRIGGER nt_cache AFTER INSERT OR UPDATE ON nt
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=user:nt{id}');
BEGIN;
INSERT INTO np VALUES (1, 7);
INSERT INTO nt VALUES (1, 8);
COMMIT;
});
ok(wait_for(sub { (stat_of('last_error') // '') =~ /: OOM command not allowed/ }, 30),
	'a write-through while Redis is out of memory fails with OOM');
ok(!redis_exists($redis, 'user:np1'), 'the key\'s old value is deleted (a miss, never stale)');
ok(!redis_exists($redis, 'user:nt1'), 'so is that of the key without tags');
ok(!redis_exists($redis, 'tag:np'), 'no set was made');
redis_cmd($redis, 'CONFIG', 'SET', 'maxmemory', '0');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'memory again: delivered');
like(redis_cmd($redis, 'GET', 'user:np1') // '', qr/"v": ?7\b/, 'the key holds the row');
is(redis_cmd($redis, 'SISMEMBER', 'tag:np', 'user:np1'), '1', 'and joined its set');
like(redis_cmd($redis, 'GET', 'user:nt1') // '', qr/"v": ?8\b/, 'the key without tags too');

# ---- NOPERM for a command: Redis refuses everything, nothing is counted -------

ok(reload_setting('cachekit.dead_letter_after', '0s'), 'dead_letter_after 0: attempts alone would do');
redis_cmd($redis, 'ACL', 'SETUSER', 'ck', '-evalsha');
redis_cmd($redis, 'SADD', 'tag:cmd', 'user:cmd');
redis_cmd($redis, 'SET', 'user:cmd', 'x');
my $f0 = stat_of('failed_attempts');
sql(q{SELECT cachekit_flush_tag('cmd')});
ok(wait_for(sub { stat_of('failed_attempts') >= $f0 + 5 }, 60), 'delivery fails again and again');
like(stat_of('last_error') // '', qr/NOPERM .*run/, 'last_error: the command is not allowed');
is(sql('SELECT attempts FROM cachekit_queue'), '0', 'no attempt is counted against the entry');
is(stat_of('dead_letters'), '0', 'nothing is dead-lettered');
redis_cmd($redis, 'ACL', 'SETUSER', 'ck', '+evalsha');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'delivered once the ACL allows EVALSHA again');
ok(!redis_exists($redis, 'user:cmd'), 'the tag was flushed');
unlike(slurp_file($node->logfile), qr/ck-secret-pw/, 'no password in the server log');

$node->stop;
stop_redis($redis);
done_testing();
