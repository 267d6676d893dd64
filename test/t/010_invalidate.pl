# test/t/010_invalidate.pl -- cachekit_invalidate end to end: a trigger on
# a table deletes the rendered keys and flushes the rendered tags in a real
# redis-server once the writing transaction commits; the worker is woken at
# commit; rolled back work (also to a savepoint) never reaches Redis; the
# manual functions cachekit_delete and cachekit_flush_tag act at commit only.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('inval', $redis,
	'cachekit.retry_max_delay' => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

# ---- local helpers --------------------------------------------------------

sub sql { return $node->safe_psql('postgres', $_[0]); }

# everything committed so far has been delivered
sub delivered
{
	return sql("SELECT cachekit_wait('10 seconds')") eq 't';
}

sub present { return redis_exists($redis, $_[0]); }

# SET each key to a dummy value (an application filling its cache)
sub fill
{
	redis_cmd($redis, 'MSET', map { ($_ => "cached:$_") } @_);
	return;
}

sub keys_present { return [ grep { present($_) } @_ ]; }

# ---- 1. end-to-end invalidation -----------------------------------------

sql(q{
	CREATE TABLE users(id int PRIMARY KEY, email text, team_id int);
	CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION
	cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');
	INSERT INTO users VALUES (1, 'a@x', 7), (2, 'b@x', 8), (4, NULL, 9);
});
ok(delivered(), 'the seed rows were delivered');

# what an application caches about the rows, plus keys nothing touches
sub fill_all
{
	fill(
		'user:1', 'user:email:a@x', 'user:2', 'user:email:b@x',
		'user:3', 'user:email:c@x', 'user:4', 'user:email:',
		'list:team:7', 'list:team:8', 'list:team:9',
		'unrelated', 'user:10', 'user:email:zz@x');
	redis_cmd($redis, 'DEL', 'tag:team:7', 'tag:team:8', 'tag:team:9');
	redis_cmd($redis, 'SADD', 'tag:team:7', 'list:team:7');
	redis_cmd($redis, 'SADD', 'tag:team:8', 'list:team:8');
	redis_cmd($redis, 'SADD', 'tag:team:9', 'list:team:9');
	return;
}

# INSERT: the new row's keys (negative cache entries) and its tag go
fill_all();
sql(q{INSERT INTO users VALUES (3, 'c@x', 8)});
ok(delivered(), 'INSERT delivered');
is_deeply(keys_present('user:3', 'user:email:c@x', 'list:team:8', 'tag:team:8'),
	[], 'INSERT deleted the new row\'s keys and flushed its tag (members and set)');
is_deeply(
	keys_present('user:1', 'user:email:a@x', 'user:2', 'user:email:b@x',
		'list:team:7', 'tag:team:7', 'list:team:9', 'unrelated'),
	[ 'user:1', 'user:email:a@x', 'user:2', 'user:email:b@x',
		'list:team:7', 'tag:team:7', 'list:team:9', 'unrelated' ],
	'INSERT left the other rows\' keys and tags alone');

# UPDATE that changes the email: the old and the new email key both go
fill_all();
sql(q{UPDATE users SET email = 'a2@x' WHERE id = 1});
ok(delivered(), 'UPDATE delivered');
is_deeply(keys_present('user:1', 'user:email:a@x', 'list:team:7', 'tag:team:7'),
	[], 'UPDATE deleted user:1, the old email key and flushed team:7');
is_deeply(keys_present('user:2', 'user:email:b@x', 'user:3', 'list:team:8', 'unrelated'),
	[ 'user:2', 'user:email:b@x', 'user:3', 'list:team:8', 'unrelated' ],
	'UPDATE of row 1 left other rows alone');

fill_all();
fill('user:email:a2@x', 'user:email:a3@x');
sql(q{UPDATE users SET email = 'a3@x' WHERE id = 1});
ok(delivered(), 'second email change delivered');
is_deeply(keys_present('user:email:a2@x', 'user:email:a3@x', 'user:1'),
	[], 'key change: both the old and the new email key were deleted');
ok(present('user:email:a@x'), 'an email key the row no longer had is left alone');

# UPDATE that moves a row to another team flushes both tags
fill_all();
sql(q{UPDATE users SET team_id = 9 WHERE id = 2});
ok(delivered(), 'team change delivered');
is_deeply(keys_present('tag:team:8', 'list:team:8', 'tag:team:9', 'list:team:9'),
	[], 'team change flushed the old and the new team tag');
ok(present('tag:team:7') && present('list:team:7'), 'an unrelated tag survives');

# a NULL column: that key is skipped, the others are deleted
fill_all();
sql(q{UPDATE users SET team_id = 7 WHERE id = 4});
ok(delivered(), 'UPDATE of the row with a NULL email delivered');
is_deeply(keys_present('user:4', 'tag:team:7', 'tag:team:9', 'list:team:7', 'list:team:9'),
	[], 'row with NULL email: its id key and tags were invalidated');
ok(present('user:email:'), 'no key was rendered from the NULL email (user:email: survives)');
is(sql(q{SELECT count(*) FROM cachekit_dead_letter}), '0', 'nothing was refused');

# DELETE
fill_all();
sql(q{DELETE FROM users WHERE id = 3});
ok(delivered(), 'DELETE delivered');
is_deeply(keys_present('user:3', 'user:email:c@x', 'tag:team:8', 'list:team:8'),
	[], 'DELETE deleted the row\'s keys and flushed its tag');
is_deeply(keys_present('user:1', 'user:2', 'user:10', 'user:email:zz@x', 'unrelated'),
	[ 'user:1', 'user:2', 'user:10', 'user:email:zz@x', 'unrelated' ],
	'DELETE left unrelated keys alone');

# a multi-row statement invalidates every row it touched
fill_all();
sql(q{UPDATE users SET email = email WHERE id IN (1, 2)});
ok(delivered(), 'multi-row UPDATE delivered');
is_deeply(keys_present('user:1', 'user:2', 'user:email:b@x', 'user:4'),
	[ 'user:4' ], 'a two-row UPDATE invalidated both rows, not a third');

is(sql('SELECT queue_depth FROM cachekit_stats'), '0', 'the queue is empty');

# ---- 2. the worker is woken at commit -----------------------------------
# The idle worker looks at the queue by itself only every 5 s; a commit
# that enqueued work sets its latch.

my @lat;
for my $i (1 .. 20)
{
	fill('user:1');
	# start the clock before the statement: this over- rather than
	# under-estimates the time from COMMIT to the key being gone
	my $t0 = time();
	sql(q{UPDATE users SET team_id = team_id WHERE id = 1});
	my $gone = wait_for(sub { !present('user:1') }, 10);
	my $dt = time() - $t0;
	ok($gone, "round $i: user:1 deleted after commit") or last;
	push @lat, $dt;
}
my @sorted = sort { $a <=> $b } @lat;
diag(sprintf('commit-to-deleted latency over %d rounds: median %.0f ms, max %.0f ms',
		scalar @sorted, 1000 * $sorted[ int(@sorted / 2) ], 1000 * $sorted[-1]));
cmp_ok($sorted[-1], '<', 2, 'every key was gone within 2 s of COMMIT (idle timer is 5 s)');

# ---- 3. rolled back work is never delivered ------------------------------

fill('user:1', 'user:2', 'user:email:b@x', 'rb:manual', 'rb:sp', 'rb:after', 'marker:1',
	'list:team:7');
redis_cmd($redis, 'SADD', 'tag:team:7', 'list:team:7');
redis_cmd($redis, 'SADD', 'tag:rb', 'rb:tagged');
fill('rb:tagged');

sql(q{
	BEGIN;
	UPDATE users SET email = 'rolled@x' WHERE id = 1;
	SELECT cachekit_delete('rb:manual');
	SELECT cachekit_flush_tag('rb');
	ROLLBACK;
});
sql(q{
	BEGIN;
	UPDATE users SET team_id = team_id WHERE id = 2;
	SAVEPOINT s1;
	SELECT cachekit_delete('rb:sp');
	UPDATE users SET email = 'sp@x' WHERE id = 1;
	ROLLBACK TO SAVEPOINT s1;
	SELECT cachekit_delete('rb:after');
	COMMIT;
});
# a later committed change: once it is gone the worker has certainly passed
# over everything committed before it
sql(q{SELECT cachekit_delete('marker:1')});
ok(delivered(), 'the later change was delivered');
ok(!present('marker:1'), 'marker key deleted');
ok(!present('user:2') && !present('user:email:b@x') && !present('rb:after'),
	'work outside the rolled back savepoint was delivered');
is_deeply(keys_present('user:1', 'rb:manual', 'rb:sp', 'tag:rb', 'rb:tagged',
		'list:team:7', 'tag:team:7'),
	[ 'user:1', 'rb:manual', 'rb:sp', 'tag:rb', 'rb:tagged', 'list:team:7', 'tag:team:7' ],
	'rolled back UPDATE, cachekit_delete, cachekit_flush_tag and savepoint deleted nothing');
ok(!present('user:email:rolled@x') && !present('user:email:sp@x'), 'sanity: no stray keys');
is(sql(q{SELECT email FROM users WHERE id = 1}), 'a3@x', 'the row itself was rolled back too');
is(sql('SELECT queue_depth FROM cachekit_stats'), '0', 'nothing of the rollbacks is queued');

# ---- 4. the manual functions act at commit -------------------------------

fill('homepage', 'nav', 'feat:1', 'feat:2', 'probe:1');
redis_cmd($redis, 'SADD', 'tag:featured', 'feat:1', 'feat:2');

my $bg = $node->background_psql('postgres', on_error_stop => 1);
$bg->query_safe('BEGIN');
$bg->query_safe(q{SELECT cachekit_delete('homepage', 'nav')});
$bg->query_safe(q{SELECT cachekit_flush_tag('featured')});

# another session commits work while that transaction is open; once that
# work is delivered the worker has run a pass and skipped the open one
sql(q{SELECT cachekit_delete('probe:1')});
ok(delivered(), 'a concurrent committed delete was delivered');
ok(!present('probe:1'), 'probe key deleted');
is_deeply(keys_present('homepage', 'nav', 'feat:1', 'feat:2', 'tag:featured'),
	[ 'homepage', 'nav', 'feat:1', 'feat:2', 'tag:featured' ],
	'before COMMIT: cachekit_delete and cachekit_flush_tag have done nothing');
is(sql('SELECT queue_depth FROM cachekit_stats'), '0',
	'other sessions see no queued entry before COMMIT');

my $t0 = time();
$bg->query_safe('COMMIT');
ok(wait_for(sub { !present('homepage') && !present('nav') && !present('tag:featured') }, 10),
	'after COMMIT the keys and the tag are gone');
cmp_ok(time() - $t0, '<', 2, 'without waiting for the idle timer');
is_deeply(keys_present('feat:1', 'feat:2'), [], 'the tag\'s member keys are gone');
$bg->quit;

# both at once in one transaction with a rollback of the manual calls only
fill('homepage', 'nav');
sql(q{
	BEGIN;
	SAVEPOINT a;
	SELECT cachekit_delete('homepage');
	ROLLBACK TO SAVEPOINT a;
	SELECT cachekit_delete('nav');
	COMMIT;
});
ok(delivered(), 'delivered');
ok(present('homepage') && !present('nav'), 'only the delete outside the rolled back savepoint ran');

my $st = cachekit_stats($node);
is($st->{dead_letters}, '0', 'no dead letters');
is($st->{queue_depth}, '0', 'queue drained');

$node->stop;
stop_redis($redis);
done_testing();
