# test/t/180_upgrade.pl -- ALTER EXTENSION cachekit UPDATE from 0.1.0:
# an installation holding queued entries, dead letters and cachekit triggers
# is updated while Redis is down; afterwards its objects equal a fresh
# installation's (compared from the catalogs, whatever the upgrade scripts
# add), the queue and the dead letters are unchanged and get delivered
# (replay), and the triggers created under 0.1.0 keep working. The
# comparison itself is checked: each of a list of small changes to a fresh
# installation makes it report a difference.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitCatalog;

# the append-only file keeps the keys over the Redis restart below
my $redis = start_redis(args => [ '--appendonly', 'yes' ]);
my $node  = new_cachekit_node('upgrade', $redis,
	'cachekit.max_attempts'    => '2',
	'cachekit.dead_letter_after' => '0',
	'cachekit.retry_max_delay' => '200ms');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# the value of a key as normalised JSON (jsonb's text), '' when absent
sub json_at
{
	my ($key) = @_;
	my $value = redis_cmd($redis, 'GET', $key);
	return '' if $value eq '';
	$value =~ s/'/''/g;
	return sql("SELECT '$value'::jsonb");
}

my $default_version = sql(
	q{SELECT default_version FROM pg_catalog.pg_available_extensions WHERE name = 'cachekit'});
note "default_version $default_version";

# ---- a 0.1.0 installation in use -------------------------------------------

sql(q{CREATE EXTENSION cachekit VERSION '0.1.0'});
is(sql(q{SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'cachekit'}),
	'0.1.0', 'installed 0.1.0');
ok(wait_for_redis_connected($node), 'the worker delivers for 0.1.0');

sql(q{
	CREATE TABLE users (id int PRIMARY KEY, email text, team_id int);
	CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');
	CREATE TRIGGER users_cache_bulk AFTER UPDATE ON users
	  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
	  FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('bulk:{id}');
	CREATE TABLE products (id int PRIMARY KEY, sku text, price numeric(10,2), grp text);
	CREATE TRIGGER products_cache AFTER INSERT OR UPDATE OR DELETE ON products
	  FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=product:{sku}', 'columns=id,sku,price', 'tag=grp:{grp}');
	INSERT INTO users SELECT g, 'u' || g || '@x', g % 3 FROM pg_catalog.generate_series(1, 20) g;
	INSERT INTO products VALUES (1, 'a1', 9.50, 'good');
});
ok(sql(q{SELECT cachekit_wait('60 seconds')}), 'the first rows are delivered');
is(json_at('product:a1'), '{"id": 1, "sku": "a1", "price": 9.50}',
	'write-through under 0.1.0');

# dead letters: a tag set and a write-through's tag set that hold strings
redis_cmd($redis, 'SET', 'tag:poisoned', 'not a set');
redis_cmd($redis, 'SET', 'tag:grp:bad',  'not a set');
sql(q{SELECT cachekit_flush_tag('poisoned')});
sql(q{INSERT INTO products VALUES (2, 'b2', 1.25, 'bad')});
ok( wait_for(sub { sql(q{SELECT count(*) FROM cachekit_dead_letter}) eq '2' }),
	'two entries refused by Redis became dead letters');

# queued entries: Redis is down while rows change
redis_cmd($redis, 'SET', "user:$_", 'cached') for 1 .. 20;
redis_cmd($redis, 'SET', "bulk:$_", 'cached') for 1 .. 20;
redis_cmd($redis, 'SADD', 'tag:team:1', 'team-one-page');
redis_cmd($redis, 'SET',  'team-one-page', 'cached');
stop_redis($redis);
sql(q{UPDATE users SET email = 'new' || id || '@x' WHERE id <= 10});
sql(q{DELETE FROM users WHERE id = 20});
sql(q{UPDATE products SET price = 10.00 WHERE sku = 'a1'});
sql(q{SELECT cachekit_delete('homepage')});
my $depth = sql(q{SELECT queue_depth FROM cachekit_stats});
# a statement's invalidations are gathered into one entry (pending.c): the
# 11 rows' keys are in 2 entries, the write-through's and the manual delete
# in one each
cmp_ok($depth, '>=', 4, "work waits in the queue while Redis is down ($depth entries)");
cmp_ok(sql(q{SELECT count(*) FROM cachekit_queue, unnest(keys) k}), '>=', 13,
	'every changed row\'s keys are queued');

my $queue_sql = q{SELECT id, kind, keys, tags, untags, value, ttl, enqueued_at
                  FROM cachekit_queue ORDER BY id};
my $dead_sql = q{SELECT id, kind, keys, tags, untags, value, ttl, attempts, error, enqueued_at, failed_at
                 FROM cachekit_dead_letter ORDER BY id};
my $queue_before = sql($queue_sql);
my $dead_before  = sql($dead_sql);

# ---- the update ---------------------------------------------------------------

sql(q{ALTER EXTENSION cachekit UPDATE});
is(sql(q{SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'cachekit'}),
	$default_version, "ALTER EXTENSION UPDATE reached $default_version");
is(sql($queue_sql), $queue_before, 'the queued entries are unchanged by the update');
is(sql($dead_sql),  $dead_before,  'the dead letters are unchanged by the update');

# ---- same objects as a fresh installation ------------------------------------

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION cachekit');
my @upgraded = extension_snapshot($node, 'postgres');
my @fresh    = extension_snapshot($node, 'fresh');
cmp_ok(scalar(grep { /^member\|/ } @fresh), '>=', 11,
	'the snapshot finds the extension\'s members');
ok((grep { /^relation acl\|.*cachekit_stats\|/ } @fresh)
	  && (grep { /^column\|.*cachekit_queue\.keys\|.*storage=e/ } @fresh)
	  && (grep { /^relation\|.*cachekit_queue\|.*vacuum_truncate=false.*toast_options=vacuum_truncate=false/ } @fresh)
	  && (grep { /^function\|.*cachekit_wait\(interval\)\|.*STRICT/ } @fresh),
	'the snapshot has ACLs, column storage, table and toast options, function definitions');
my @diff = snapshot_diff(\@upgraded, \@fresh);
is(scalar(@diff), 0, "the updated extension's objects equal a fresh $default_version installation's")
  or diag join("\n", '- only after the update, + only in a fresh installation:', @diff);

# each change makes the comparison fail
my @changes = (
	q{GRANT SELECT ON cachekit_queue TO PUBLIC},
	q{GRANT EXECUTE ON FUNCTION cachekit_wait(interval) TO PUBLIC},
	q{ALTER FUNCTION cachekit_wait(interval) COST 7},
	q{ALTER FUNCTION cachekit_replay_dead_letters(bigint[]) SECURITY DEFINER},
	q{ALTER TABLE cachekit_queue SET (fillfactor = 50)},
	q{ALTER TABLE cachekit_queue SET (toast.autovacuum_enabled = false)},
	q{ALTER TABLE cachekit_queue ALTER COLUMN value SET STORAGE EXTENDED},
	q{ALTER TABLE cachekit_dead_letter ALTER COLUMN error DROP NOT NULL},
	q{ALTER TABLE cachekit_dead_letter ADD COLUMN extra int},
	q{CREATE INDEX ON cachekit_dead_letter (failed_at)},
	q{CREATE OR REPLACE VIEW cachekit_stats AS SELECT * FROM cachekit_stats WHERE queue_depth >= 0},
	q{ALTER EXTENSION cachekit DROP FUNCTION cachekit_delete(text[])},
	q{COMMENT ON TABLE cachekit_queue IS 'x'},
	q{UPDATE pg_catalog.pg_extension SET extconfig = ARRAY['cachekit_dead_letter'::regclass::oid],
	  extcondition = ARRAY[''] WHERE extname = 'cachekit'},
);
for my $change (@changes)
{
	my $out = $node->safe_psql('fresh',
		"BEGIN;\n$change;\n" . CachekitCatalog::snapshot_sql() . ";\nROLLBACK;");
	my @changed = split /\n/, $out;
	isnt(scalar(snapshot_diff(\@changed, \@fresh)), 0, "the comparison sees: $change");
}

# ---- delivery after the update -------------------------------------------------

$redis = restart_redis($redis);
ok(wait_for(sub { sql(q{SELECT queue_depth FROM cachekit_stats}) eq '0' }),
	'the queue drains once Redis is back');
ok(!redis_exists($redis, "user:$_"), "user:$_ deleted") for (1 .. 10, 20);
ok(redis_exists($redis, 'user:11'), 'user:11 (unchanged row) kept');
ok(!redis_exists($redis, "bulk:$_"), "bulk:$_ deleted by the statement trigger") for 1 .. 10;
ok(!redis_exists($redis, 'team-one-page'), 'the tag team:1 was flushed');
is(json_at('product:a1'), '{"id": 1, "sku": "a1", "price": 10.00}',
	'the queued write-through was delivered');

redis_cmd($redis, 'DEL', 'tag:poisoned', 'tag:grp:bad');
redis_cmd($redis, 'SET', 'product:b2', 'stale');
is(sql(q{SELECT cachekit_replay_dead_letters()}), '2', 'both dead letters replayed');
ok(sql(q{SELECT cachekit_wait('60 seconds')}), 'the replayed entries are delivered');
is(sql(q{SELECT count(*) FROM cachekit_dead_letter}), '0', 'no dead letters left');
ok(!redis_exists($redis, 'product:b2'), 'the replayed write-through deleted its key');

# ---- triggers created under 0.1.0 keep working ---------------------------------

redis_cmd($redis, 'SET', 'user:11', 'cached');
redis_cmd($redis, 'SET', 'user:email:u12@x', 'cached');
redis_cmd($redis, 'SET', 'bulk:13', 'cached');
sql(q{UPDATE users SET team_id = 9 WHERE id = 11});
sql(q{DELETE FROM users WHERE id = 12});
sql(q{UPDATE users SET email = 'z@x' WHERE id = 13});
sql(q{INSERT INTO products VALUES (3, 'c3', 2.00, 'good')});
ok(sql(q{SELECT cachekit_wait('60 seconds')}), 'changes after the update are delivered');
ok(!redis_exists($redis, 'user:11'),          'row trigger after the update: UPDATE');
ok(!redis_exists($redis, 'user:email:u12@x'), 'row trigger after the update: DELETE');
ok(!redis_exists($redis, 'bulk:13'),          'statement trigger after the update');
is(json_at('product:c3'), '{"id": 3, "sku": "c3", "price": 2.00}',
	'write-through trigger after the update');
is(redis_cmd($redis, 'SISMEMBER', 'tag:grp:good', 'product:c3'), '1',
	'write-through tag after the update');

my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|PANIC|TRAP:/, 'no crash in the server log');

$node->stop;
done_testing();
