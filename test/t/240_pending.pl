# test/t/240_pending.pl -- a transaction's invalidations gathered in memory
# and written at pre-commit (src/pending.c).
#
# 1. Ten single-row UPDATEs in one transaction make one queue entry, and
#    every key and tag of them is delivered.
# 2. Savepoints: what a rolled-back savepoint (or PL/pgSQL exception
#    block) added is not sent; what it did not add is.
# 3. An entry of the enclosing transaction, written early because a
#    savepoint filled a full entry, is still sent when that savepoint
#    rolls back.
# 4. Entries of a released savepoint merge with those after it.
# 5. Order per key with entries written at once: a delete gathered before
#    a write-through of the same key is written before it.
# 6. A large transaction makes entries of bounded size.
# 7. PREPARE TRANSACTION writes the gathered entries; COMMIT PREPARED
#    delivers them, ROLLBACK PREPARED sends nothing.
# 8. cachekit_wait inside the writing transaction returns at once.
# 9. DROP EXTENSION after enqueueing in the same transaction commits.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('pending', $redis, 'max_prepared_transactions' => 5);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 60), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }

$node->safe_psql(
	'postgres', q{
CREATE TABLE users (id int PRIMARY KEY, team_id int, name text);
INSERT INTO users SELECT g, g % 10, 'u' || g FROM generate_series(1, 6000) g;
CREATE TRIGGER users_ck AFTER INSERT OR UPDATE OR DELETE ON users
  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'tag=team:{team_id}');
CREATE TABLE docs (id int PRIMARY KEY, body text);
INSERT INTO docs VALUES (1, 'one');
CREATE TRIGGER docs_wt AFTER INSERT OR UPDATE OR DELETE ON docs
  FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=doc:{id}', 'columns=id,body');
});

# entries the worker delivered while running $sql (and what came before it)
sub entries_for
{
	my ($sql) = @_;
	is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'queue drained before');
	my $before = sql(q{SELECT entries_delivered FROM cachekit_worker_state()});
	sql($sql);
	is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'queue drained after');
	return sql(q{SELECT entries_delivered FROM cachekit_worker_state()}) - $before;
}

sub set_keys { redis_cmd($redis, 'SET', $_, 'x') for @_; }

# ---- 1. ten UPDATEs, one entry -------------------------------------------------

set_keys(map { "user:$_" } 1 .. 10);
redis_cmd($redis, 'SADD', 'tag:team:3', 'member:3');
set_keys('member:3');
my $n = entries_for(
	'BEGIN; ' . join('', map { "UPDATE users SET name = name || 'x' WHERE id = $_; " } 1 .. 10) . 'COMMIT');
is($n, 1, 'ten single-row UPDATEs in one transaction make one entry');
ok(!redis_exists($redis, "user:$_"), "user:$_ deleted") for 1 .. 10;
ok(!redis_exists($redis, 'member:3'), 'the tag team:3 was flushed');

# ---- 2. savepoints ------------------------------------------------------------------

set_keys(map { "user:$_" } 11 .. 14);
sql(q{BEGIN;
UPDATE users SET name = name WHERE id = 11;
SAVEPOINT a;
UPDATE users SET name = name WHERE id = 12;
ROLLBACK TO a;
UPDATE users SET name = name WHERE id = 13;
SAVEPOINT b;
SAVEPOINT c;
UPDATE users SET name = name WHERE id = 14;
RELEASE c;
ROLLBACK TO b;
COMMIT});
is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'delivered');
ok(!redis_exists($redis, 'user:11'), 'before the savepoint: sent');
ok(redis_exists($redis, 'user:12'), 'in a rolled-back savepoint: not sent');
ok(!redis_exists($redis, 'user:13'), 'after the rolled-back savepoint: sent');
ok(redis_exists($redis, 'user:14'), 'released into a savepoint that rolls back: not sent');

set_keys('user:15', 'user:16');
sql(q{DO $$
BEGIN
	UPDATE users SET name = name WHERE id = 15;
	BEGIN
		UPDATE users SET name = name WHERE id = 16;
		RAISE EXCEPTION 'undo';
	EXCEPTION WHEN raise_exception THEN
		NULL;
	END;
END $$});
is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'delivered');
ok(!redis_exists($redis, 'user:15'), 'PL/pgSQL: outside the exception block: sent');
ok(redis_exists($redis, 'user:16'), 'PL/pgSQL: in the block that raised: not sent');

# ---- 3. the enclosing transaction's entry written inside a savepoint ------------

set_keys('user:17', 'user:3000');
sql(q{BEGIN;
UPDATE users SET name = name WHERE id = 17;
SAVEPOINT a;
UPDATE users SET name = name WHERE id BETWEEN 2001 AND 3000;
ROLLBACK TO a;
COMMIT});
is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'delivered');
ok(!redis_exists($redis, 'user:17'),
	'an entry written early inside a rolled-back savepoint is written again');
ok(redis_exists($redis, 'user:3000'), 'the savepoint\'s own entries are not sent');

set_keys('user:18', 'user:19');
sql(q{BEGIN;
UPDATE users SET name = name WHERE id = 18;
SAVEPOINT a;
SAVEPOINT b;
UPDATE users SET name = name WHERE id BETWEEN 2001 AND 3000;
RELEASE b;
ROLLBACK TO a;
UPDATE users SET name = name WHERE id = 19;
COMMIT});
is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'delivered');
ok(!redis_exists($redis, 'user:18'), 'written early in a nested savepoint, rolled back: written again');
ok(!redis_exists($redis, 'user:19'), 'and what came after it is sent');

# ---- 4. a released savepoint merges ---------------------------------------------------

$n = entries_for(q{BEGIN;
UPDATE users SET name = name WHERE id = 20;
SAVEPOINT a;
UPDATE users SET name = name WHERE id = 21;
RELEASE a;
UPDATE users SET name = name WHERE id = 22;
COMMIT});
is($n, 1, 'entries of a released savepoint merge with what follows');

# ---- 5. order per key with write-through ------------------------------------------

sql(q{BEGIN;
SELECT cachekit_delete('doc:1');
UPDATE docs SET body = 'two' WHERE id = 1;
COMMIT});
is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'delivered');
like(redis_cmd($redis, 'GET', 'doc:1') // '', qr/two/,
	'a delete gathered before a write of the same key goes first');

sql(q{BEGIN;
UPDATE docs SET body = 'three' WHERE id = 1;
SELECT cachekit_delete('doc:1');
COMMIT});
is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'delivered');
ok(!redis_exists($redis, 'doc:1'), 'a delete after a write of the same key goes last');

# ---- 6. bounded entries -----------------------------------------------------------------

is( sql(q{BEGIN;
UPDATE users SET name = name WHERE id BETWEEN 1 AND 5000;
SELECT count(*) >= 5 AND max(coalesce(array_length(keys, 1), 0) + coalesce(array_length(tags, 1), 0)) <= 1000
  FROM cachekit_queue WHERE xmin::text = txid_current()::text;
COMMIT}), 't', "5000 rows' keys are written before commit, in entries of at most 1000 strings");

# ---- 7. two-phase commit -------------------------------------------------------------------

set_keys('user:30', 'user:31');
sql(q{BEGIN; UPDATE users SET name = name WHERE id = 30; PREPARE TRANSACTION 'p1'});
sql(q{BEGIN; UPDATE users SET name = name WHERE id = 31; PREPARE TRANSACTION 'p2'});
is(sql(q{SELECT count(*) FROM pg_prepared_xacts}), '2', 'prepared');
sql(q{COMMIT PREPARED 'p1'});
sql(q{ROLLBACK PREPARED 'p2'});
ok(wait_for(sub { !redis_exists($redis, 'user:30') }, 60), 'COMMIT PREPARED delivers the gathered entry');
is(sql(q{SELECT cachekit_wait('60 seconds')}), 't', 'delivered');
ok(redis_exists($redis, 'user:31'), 'ROLLBACK PREPARED sends nothing');

# ---- 8. cachekit_wait inside the writing transaction ------------------------------------

set_keys('user:32');
is(sql(q{BEGIN;
UPDATE users SET name = name WHERE id = 32;
SELECT cachekit_wait('30 seconds');
COMMIT}), 't', 'cachekit_wait inside the transaction does not wait for its own work');
ok(wait_for(sub { !redis_exists($redis, 'user:32') }, 60), 'and that work is delivered after commit');

# ---- 9. DROP EXTENSION in the enqueueing transaction --------------------------------------

sql(q{BEGIN;
UPDATE users SET name = name WHERE id = 33;
DROP EXTENSION cachekit CASCADE;
COMMIT});
is(sql(q{SELECT count(*) FROM pg_extension WHERE extname = 'cachekit'}), '0',
	'DROP EXTENSION after enqueueing commits');
sql('CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 60), 'worker is running again');

$node->stop;
done_testing();
