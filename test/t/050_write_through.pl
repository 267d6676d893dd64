# test/t/050_write_through.pl -- cachekit_write_through against a real Redis:
# INSERT/UPDATE/DELETE, key and tag changes, tag flushes, TTLs, the JSON of
# many column types, default columns, cachekit.max_value_bytes, together with
# cachekit_invalidate, NULL key columns and rolled back changes.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis = start_redis();
my $node = new_cachekit_node(
	'write_through', $redis,
	-init => { extra => [ '--encoding=UTF8', '--locale=C' ] },
	'cachekit.retry_max_delay' => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 60), 'worker is up');

# ---- helpers ---------------------------------------------------------------

sub sql
{
	my ($query) = @_;
	return $node->safe_psql('postgres', $query);
}

# a SQL string literal holding $s byte for byte (standard_conforming_strings)
sub lit
{
	my ($s) = @_;
	die "cannot pass a NUL byte in a SQL literal" if $s =~ /\0/;
	$s =~ s/'/''/g;
	return "'$s'";
}

# wait until everything committed so far has reached Redis
sub drained
{
	return sql("SELECT cachekit_wait('60 s')") eq 't';
}

sub rget
{
	my ($key) = @_;
	return redis_cmd($redis, 'GET', $key);
}

sub members
{
	my ($set) = @_;
	return [ sort grep { $_ ne '' } split /\n/, redis_cmd($redis, 'SMEMBERS', $set) ];
}

sub ttl_of
{
	my ($key) = @_;
	return redis_cmd($redis, 'TTL', $key);
}

sub stat_of
{
	my ($name) = @_;
	return cachekit_stats($node)->{$name};
}

# 't' when $key holds JSON equal (as jsonb) to to_jsonb of the single row
# $select returns; 'missing' without the key, 'no row' without the row,
# 'f' or 'invalid json: ...' otherwise.
sub key_matches
{
	my ($key, $select) = @_;
	return 'missing' unless redis_exists($redis, $key);
	my $value = rget($key);
	my $result = eval {
		sql(  "SELECT coalesce((SELECT "
			  . lit($value)
			  . "::jsonb = to_jsonb(s) FROM ($select) s)::text, '')");
	};
	$result = 'invalid json: ' . ($@ =~ s/\s+/ /gr) unless defined $result;
	$result = { true => 't', false => 'f', '' => 'no row' }->{$result} // $result;
	if ($result ne 't')
	{
		diag "$key holds: $value";
		diag 'the row is: ' . sql("SELECT to_jsonb(s) FROM ($select) s");
	}
	return $result;
}

# ---- the table and the trigger of the feature description ----------------

sql(<<'SQL');
CREATE TABLE products (
	id integer PRIMARY KEY,
	sku text UNIQUE,
	price numeric(10,2),
	active boolean NOT NULL DEFAULT true,
	meta jsonb,
	team_id integer,
	note text
);
CREATE TRIGGER products_cache AFTER INSERT OR UPDATE OR DELETE ON products
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through(
		'key=product:{sku}', 'ttl=300', 'columns=id,sku,price,active,meta', 'tag=team:{team_id}');
SQL

sub prow
{
	my ($id) = @_;
	return "SELECT id, sku, price, active, meta FROM products WHERE id = $id";
}

# ---- INSERT ----------------------------------------------------------------

my $written0 = stat_of('keys_written');
sql(q{INSERT INTO products VALUES (1, 'A1', 9.50, true, '{"colour": "red", "sizes": [1, 2]}', 7, 'not cached')});
ok(drained(), 'insert delivered');
is(key_matches('product:A1', prow(1)), 't', 'INSERT writes the selected columns as JSON');
unlike(rget('product:A1'), qr/not cached|team_id/, 'columns not listed are not in the value');
is_deeply(members('tag:team:7'), ['product:A1'], 'INSERT adds the key to its tag set');
cmp_ok(stat_of('keys_written'), '>', $written0, 'keys_written counts the write');

# ---- TTL of key and tag set ------------------------------------------------

my $ttl = ttl_of('product:A1');
ok($ttl >= 1 && $ttl <= 300, "key has a TTL within 1..300 (is $ttl)");
my $set_ttl = ttl_of('tag:team:7');
is($set_ttl, -1, 'the tag set gets no expiry (a reader may add keys without TTL to it; 122 tests the rule)');

# a key whose TTL ran down gets it back with the next write; the set keeps >= ttl
redis_cmd($redis, 'EXPIRE', 'product:A1', 5);
redis_cmd($redis, 'EXPIRE', 'tag:team:7', 5);
sql('UPDATE products SET price = 10.25 WHERE id = 1');
ok(drained(), 'update delivered');
is(key_matches('product:A1', prow(1)), 't', 'UPDATE rewrites the value');
like(rget('product:A1'), qr/10\.25/, 'the value has the new price');
$ttl = ttl_of('product:A1');
ok($ttl > 5 && $ttl <= 300, "an UPDATE sets the key's TTL again (is $ttl)");
$set_ttl = ttl_of('tag:team:7');
# raised from 5 s to the key's 300 s or past it (seconds may pass on a busy machine)
ok($set_ttl >= 280 && $set_ttl <= 600, "an UPDATE raises the tag set's TTL again (is $set_ttl)");

# several updates in one transaction: the last one counts
sql(q{BEGIN; UPDATE products SET price = 11 WHERE id = 1;
	  UPDATE products SET price = 12, meta = '{"colour": "blue"}' WHERE id = 1; COMMIT});
ok(drained(), 'two updates in one transaction delivered');
is(key_matches('product:A1', prow(1)), 't', 'the last update of a transaction wins');

# ---- key change -----------------------------------------------------------

sql(q{UPDATE products SET sku = 'A2' WHERE id = 1});
ok(drained(), 'key change delivered');
ok(!redis_exists($redis, 'product:A1'), 'a key change deletes the old key');
is(key_matches('product:A2', prow(1)), 't', 'a key change writes the new key');
is_deeply(members('tag:team:7'), ['product:A2'], 'the old key leaves the tag set, the new one joins it');

# ---- tag change -------------------------------------------------------------

sql(q{UPDATE products SET team_id = 8 WHERE id = 1});
ok(drained(), 'tag change delivered');
is_deeply(members('tag:team:7'), [], 'a tag change removes the key from the old tag set');
is_deeply(members('tag:team:8'), ['product:A2'], 'a tag change adds the key to the new tag set');
is(key_matches('product:A2', prow(1)), 't', 'the key stays written through a tag change');

# key and tag at once
sql(q{UPDATE products SET sku = 'A3', team_id = 9 WHERE id = 1});
ok(drained(), 'key and tag change delivered');
ok(!redis_exists($redis, 'product:A2'), 'key and tag change: old key deleted');
is_deeply(members('tag:team:8'), [], 'key and tag change: old key left the old tag set');
is_deeply(members('tag:team:9'), ['product:A3'], 'key and tag change: new key in the new tag set');
is(key_matches('product:A3', prow(1)), 't', 'key and tag change: new key holds the row');

# ---- cachekit_flush_tag of a write-through tag --------------------------------

sql(q{INSERT INTO products VALUES
	(2, 'B2', 2, true, NULL, 9, NULL),
	(3, 'B3', 3, false, '[]', 9, NULL),
	(4, 'C4', 4, true, '{}', 10, NULL)});
ok(drained(), 'more products delivered');
is_deeply(members('tag:team:9'), [ 'product:A3', 'product:B2', 'product:B3' ],
	'three keys listed under team:9');
sql(q{SELECT cachekit_flush_tag('team:9')});
ok(drained(), 'flush delivered');
ok(!redis_exists($redis, $_), "flushing team:9 deleted $_") for qw(product:A3 product:B2 product:B3);
ok(!redis_exists($redis, 'tag:team:9'), 'the flushed tag set is gone');
is(key_matches('product:C4', prow(4)), 't', 'a key of another tag stays');
is_deeply(members('tag:team:10'), ['product:C4'], 'the other tag set stays');

sql(q{UPDATE products SET price = 2.5 WHERE id = 2});
ok(drained(), 'write after the flush delivered');
is(key_matches('product:B2', prow(2)), 't', 'a write after a flush writes the key again');
is_deeply(members('tag:team:9'), ['product:B2'], 'and lists it in the tag set again');

# a flush and then a write of a key in that tag, in one transaction: the
# write comes last, so the key must hold the new row afterwards
sql(q{UPDATE products SET price = 3.5 WHERE id = 3});
ok(drained(), 'product 3 written again');
sql(q{BEGIN; SELECT cachekit_flush_tag('team:9');
	  UPDATE products SET price = 3.75 WHERE id = 3; COMMIT});
ok(drained(), 'flush then write delivered');
ok(!redis_exists($redis, 'product:B2'), 'the flush deleted the other key of the tag');
is(key_matches('product:B3', prow(3)), 't',
	'a write committed after a flush of its tag (same transaction) leaves the key written');
is_deeply(members('tag:team:9'), ['product:B3'], 'and the key is listed in the tag set');

# the other way round, a write and then a flush of its tag: the key goes
sql(q{UPDATE products SET price = 2.25 WHERE id = 2});
ok(drained(), 'product 2 written again');
sql(q{BEGIN; UPDATE products SET price = 2.3 WHERE id = 2;
	  SELECT cachekit_flush_tag('team:9'); COMMIT});
ok(drained(), 'write then flush delivered');
ok(!redis_exists($redis, 'product:B2'), 'a flush committed after a write of its tag deletes the key');
ok(!redis_exists($redis, 'product:B3'), 'and the other keys of the tag');

# ---- DELETE -----------------------------------------------------------------

sql(q{UPDATE products SET price = 2.75 WHERE id = 2});
ok(drained(), 'product 2 written again');
ok(redis_exists($redis, 'product:B2'), 'product:B2 is there before the DELETE');
sql(q{DELETE FROM products WHERE id = 2});
ok(drained(), 'delete delivered');
ok(!redis_exists($redis, 'product:B2'), 'DELETE deletes the key');
ok(!grep({ $_ eq 'product:B2' } @{ members('tag:team:9') }), 'DELETE removes the key from its tag set');

# ---- NULL key column ----------------------------------------------------------

my @product_keys = redis_keys($redis, 'product*');
my $team7 = members('tag:team:7');
sql(q{INSERT INTO products VALUES (60, NULL, 6, true, NULL, 7, NULL)});
sql(q{UPDATE products SET price = 6.5 WHERE id = 60});
ok(drained(), 'rows with a NULL key column delivered');
is_deeply([ redis_keys($redis, 'product*') ], \@product_keys, 'a NULL key column writes no key');
is_deeply(members('tag:team:7'), $team7, 'a NULL key column adds nothing to the tag set');
sql(q{UPDATE products SET sku = 'N60' WHERE id = 60});
ok(drained(), 'key column set delivered');
is(key_matches('product:N60', prow(60)), 't', 'the key is written once the key column is set');
is_deeply(members('tag:team:7'), ['product:N60'], 'and listed in its tag set');
sql(q{UPDATE products SET sku = NULL WHERE id = 60});
ok(drained(), 'key column reset to NULL delivered');
ok(!redis_exists($redis, 'product:N60'), 'setting the key column to NULL deletes the key');
is_deeply(members('tag:team:7'), [], 'and removes it from its tag set');

# ---- rolled back changes write nothing ------------------------------------------

sql(q{UPDATE products SET price = 40 WHERE id = 4});
ok(drained(), 'committed value delivered');
my $committed = rget('product:C4');
sql(q{BEGIN; UPDATE products SET price = 999 WHERE id = 4; ROLLBACK});
sql(q{BEGIN; DELETE FROM products WHERE id = 4; ROLLBACK});
sql(q{BEGIN; UPDATE products SET sku = 'C4X' WHERE id = 4; ROLLBACK});
# something committed afterwards, so that the worker surely has run a pass
sql(q{UPDATE products SET price = 3.8 WHERE id = 3});
ok(drained(), 'later commit delivered');
is(rget('product:C4'), $committed, 'rolled back changes leave the committed value in place');
is(key_matches('product:C4', prow(4)), 't', 'and the key still equals the row');
ok(!redis_exists($redis, 'product:C4X'), 'a rolled back key change writes no key');

sql(q{BEGIN; UPDATE products SET price = 41 WHERE id = 4; SAVEPOINT s;
	  UPDATE products SET price = 42 WHERE id = 4; ROLLBACK TO SAVEPOINT s; COMMIT});
ok(drained(), 'savepoint rollback delivered');
is(key_matches('product:C4', prow(4)), 't', 'a write rolled back to a savepoint is not delivered');
like(rget('product:C4'), qr/"price":\s*41(\.0+)?\b/, 'the value is that of before the savepoint');

# ---- no ttl= : no expiry on key and tag set ---------------------------------------

sql(<<'SQL');
CREATE TABLE typed (
	id integer PRIMARY KEY,
	i integer,
	b bigint,
	n numeric,
	t text,
	flag boolean,
	ts timestamptz,
	d date,
	jb jsonb,
	j json,
	ta text[],
	ia integer[],
	f double precision,
	u uuid,
	iv interval,
	by bytea,
	nothing text
);
CREATE TRIGGER typed_cache AFTER INSERT OR UPDATE OR DELETE ON typed
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=typed:{id}', 'tag=typed');
SQL

sql(<<'SQL');
INSERT INTO typed VALUES
	(1, -2147483648, 9223372036854775807, 12345678901234567890.123456789,
	 E'it''s "quoted" \\ back\\slash\nnew line\ttab caf\u00e9 \u2603 \U0001F600 </script>',
	 true, '2024-02-29 13:14:15.123456+05:30', '2024-02-29',
	 '{"a": {"b": [1, 2.50, {"c": null, "d": "x\"y"}]}, "e": [[], {}], "f": 1e3}',
	 '{"z": 1,  "a" : [true, false, null],  "s": "a\nb" }',
	 ARRAY['a', 'b c', 'd"e', NULL, E'caf\u00e9', '', 'NULL', E'x\\y'],
	 '{{1,2},{3,NULL}}', 1.5e300, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
	 '1 day 02:03:04.5', '\x00ff10', NULL),
	(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
	(3, 0, -1, -0.000001, '', false, '-infinity', 'infinity', '"just a string"', 'null',
	 '{}', '{}', -0.1, '00000000-0000-0000-0000-000000000000', '-3 months', '\x', ''),
	(4, 1, 1, 'NaN', E'\u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9 \u4e2d\u6587 \t\r\n\b\f', true,
	 'epoch', '0001-01-01 BC', '[1, "2", [3.0], {"4": false}]', '[]',
	 ARRAY['{', '}', ',', '\'], '{-1,0,1}', 'Infinity', NULL, '0', '\xdeadbeef', 'x');
SQL
ok(drained(), 'typed rows delivered');

for my $id (1 .. 4)
{
	is(key_matches("typed:$id", "SELECT * FROM typed WHERE id = $id"),
		't', "row $id of many column types: the JSON equals to_jsonb of the whole row");
}
like(rget('typed:2'), qr/"nothing":\s*null/, 'NULL columns appear as JSON null');
is(ttl_of('typed:1'), '-1', 'without ttl= the key has no expiry');
is(ttl_of('tag:typed'), '-1', 'without ttl= the tag set has no expiry');
is_deeply(members('tag:typed'), [ map { "typed:$_" } 1 .. 4 ], 'all typed keys are in their tag set');

# default columns follow the table: a new column appears, a dropped one goes
sql(q{ALTER TABLE typed ADD COLUMN extra text DEFAULT 'added'});
sql(q{UPDATE typed SET i = 7 WHERE id = 2});
ok(drained(), 'update after ADD COLUMN delivered');
is(key_matches('typed:2', 'SELECT * FROM typed WHERE id = 2'), 't',
	'after ADD COLUMN the value has all columns, the new one included');
like(rget('typed:2'), qr/"extra":\s*"added"/, 'the added column is in the value');
sql(q{ALTER TABLE typed DROP COLUMN nothing});
sql(q{UPDATE typed SET i = 8 WHERE id = 2});
ok(drained(), 'update after DROP COLUMN delivered');
is(key_matches('typed:2', 'SELECT * FROM typed WHERE id = 2'), 't',
	'after DROP COLUMN the value has the remaining columns');
unlike(rget('typed:2'), qr/"nothing"/, 'the dropped column is gone from the value');

sql(q{DELETE FROM typed WHERE id IN (3, 4)});
ok(drained(), 'typed deletes delivered');
ok(!redis_exists($redis, 'typed:3') && !redis_exists($redis, 'typed:4'), 'deleted typed rows lose their keys');
is_deeply(members('tag:typed'), [ 'typed:1', 'typed:2' ], 'and leave their tag set');

# ---- cachekit.max_value_bytes ---------------------------------------------------

sub set_max_value_bytes
{
	my ($setting, $expect) = @_;
	sql($setting);
	sql('SELECT pg_reload_conf()');
	return wait_for(
		sub {
			sql(q{SELECT setting FROM pg_settings WHERE name = 'cachekit.max_value_bytes'}) eq $expect;
		},
		60);
}

ok(set_max_value_bytes(q{ALTER SYSTEM SET cachekit.max_value_bytes = 300}, '300'),
	'max_value_bytes lowered to 300 by a reload');

my $too_large0 = stat_of('values_too_large');
redis_cmd($redis, 'SET', 'product:BIG', 'stale value');
redis_cmd($redis, 'SADD', 'tag:team:5', 'product:BIG', 'other:key');
sql(q{INSERT INTO products VALUES (50, 'BIG', 1, true,
	  jsonb_build_object('blob', repeat('x', 1000)), 5, NULL)});
ok(drained(), 'too large insert delivered');
ok(!redis_exists($redis, 'product:BIG'), 'a value over max_value_bytes is not written; the stale key is deleted');
is_deeply(members('tag:team:5'), ['other:key'], 'the key is removed from its tag set');
is(stat_of('values_too_large'), $too_large0 + 1, 'values_too_large counts it');

sql(q{UPDATE products SET meta = '{"small": true}' WHERE id = 50});
ok(drained(), 'small update delivered');
is(key_matches('product:BIG', prow(50)), 't', 'a value under the limit is written');
is_deeply(members('tag:team:5'), [ 'other:key', 'product:BIG' ], 'and the key joins its tag set');

my $written1 = stat_of('keys_written');
sql(q{UPDATE products SET meta = jsonb_build_object('blob', repeat('y', 400)) WHERE id = 50});
ok(drained(), 'update over the limit delivered');
ok(!redis_exists($redis, 'product:BIG'), 'an update over the limit deletes the cached value');
is_deeply(members('tag:team:5'), ['other:key'], 'and removes the key from its tag set');
is(stat_of('values_too_large'), $too_large0 + 2, 'values_too_large counts the update');
is(stat_of('keys_written'), $written1, 'keys_written does not count a value that was too large');

# a value right at the limit is written, one byte more is not
sql(q{UPDATE products SET meta = NULL, sku = 'EDGE' WHERE id = 50});
ok(drained(), 'edge row delivered');
my $base_len = length(rget('product:EDGE'));
ok($base_len > 0 && $base_len < 300, "value of the edge row has $base_len bytes");
# "meta":null becomes "meta":"zz...z": 4 bytes out, the string and 2 quotes in
my $pad = 300 - $base_len + length('null') - 2;
sql(qq{UPDATE products SET meta = to_jsonb(repeat('z', $pad)) WHERE id = 50});
ok(drained(), 'value of exactly max_value_bytes delivered');
is(length(rget('product:EDGE')), 300, 'a value of exactly max_value_bytes is written');
sql(qq{UPDATE products SET meta = to_jsonb(repeat('z', $pad + 1)) WHERE id = 50});
ok(drained(), 'value of max_value_bytes + 1 delivered');
ok(!redis_exists($redis, 'product:EDGE'), 'a value of max_value_bytes + 1 is not written');

ok(set_max_value_bytes(q{ALTER SYSTEM RESET cachekit.max_value_bytes}, '524288'),
	'max_value_bytes back to its default by a reload');
sql(q{UPDATE products SET meta = jsonb_build_object('blob', repeat('w', 5000)) WHERE id = 50});
ok(drained(), 'large value under the default delivered');
is(key_matches('product:EDGE', prow(50)), 't', 'with the default limit a 5 kB value is written');

# ---- cachekit_invalidate and cachekit_write_through on one table -------------------

sql(q{CREATE TRIGGER products_listing AFTER INSERT OR UPDATE OR DELETE ON products
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('tag=listing', 'products:count')});

sub seed_listing
{
	redis_cmd($redis, 'SET', $_, 'cached page') for qw(listing:page:1 listing:page:2 products:count);
	redis_cmd($redis, 'SADD', 'tag:listing', 'listing:page:1', 'listing:page:2');
}

sub listing_gone
{
	return !grep { redis_exists($redis, $_) } qw(listing:page:1 listing:page:2 products:count tag:listing);
}

seed_listing();
sql(q{UPDATE products SET price = 44 WHERE id = 4});
ok(drained(), 'update with both triggers delivered');
is(key_matches('product:C4', prow(4)), 't', 'both triggers: UPDATE writes the row key');
ok(listing_gone(), 'both triggers: UPDATE flushes the listing tag and deletes the count key');

seed_listing();
sql(q{INSERT INTO products VALUES (70, 'D70', 70, true, NULL, 11, NULL)});
ok(drained(), 'insert with both triggers delivered');
is(key_matches('product:D70', prow(70)), 't', 'both triggers: INSERT writes the row key');
is_deeply(members('tag:team:11'), ['product:D70'], 'both triggers: INSERT lists the key in its tag set');
ok(listing_gone(), 'both triggers: INSERT flushes the listing tag');

seed_listing();
sql(q{DELETE FROM products WHERE id = 70});
ok(drained(), 'delete with both triggers delivered');
ok(!redis_exists($redis, 'product:D70'), 'both triggers: DELETE deletes the row key');
ok(!redis_exists($redis, 'tag:team:11'), 'both triggers: DELETE empties its tag set');
ok(listing_gone(), 'both triggers: DELETE flushes the listing tag');
sql(q{DROP TRIGGER products_listing ON products});

# ---- nothing was refused along the way ----------------------------------------------

my $stats = cachekit_stats($node);
is($stats->{queue_depth}, '0', 'the queue is empty at the end');
is($stats->{dead_letters}, '0', 'no dead letters');
is($stats->{failed_attempts}, '0', 'no failed attempts') or diag "last_error: " . ($stats->{last_error} // '');

# ---- flush and write in two transactions that reach Redis in one batch --------

# Redis is down while both commit, so the worker delivers them together once
# it is back (the restarted Redis is empty). The write comes last.
sql(q{UPDATE products SET price = 3.9 WHERE id = 3});
ok(drained(), 'product 3 written before the outage');
stop_redis($redis);
sql(q{SELECT cachekit_flush_tag('team:9')});
sql(q{UPDATE products SET price = 3.95 WHERE id = 3});
restart_redis($redis);
ok(drained(), 'flush and write delivered after the outage');
is(key_matches('product:B3', prow(3)), 't',
	'a write committed after a flush of its tag (next transaction, same batch) leaves the key written');
is_deeply(members('tag:team:9'), ['product:B3'], 'and the key is listed in the tag set');

$node->stop;
stop_redis($redis);
done_testing();
