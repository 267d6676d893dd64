# test/t/120_key_order.pl -- write-through values of one key never go
# backwards (issue 9, item 5):
#
#  - a write that fails transiently, or is refused, in one pipeline while a
#    later write of the same key sits in the next pipeline (the batch is split
#    at a tag flush): the key ends equal to its row, and Redis never saw an
#    older value after a newer one (MONITOR records every SET, also those a
#    script runs);
#  - a refused write that waits for its retry holds the later writes of its
#    key that come in later passes;
#  - a script that fails on a tag set holding a string (one the key joins,
#    or one it leaves) leaves no value behind
#    (no SET then failure: Lua scripts do not roll back); the key is deleted
#    until the cause is fixed, then written once with the newest value.
#
# Errors are injected by a proxy in front of a real Redis (CachekitFault).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
my $proxy = start_fault_proxy($redis);
my $node  = new_cachekit_node('key_order', $proxy->{url},
	'cachekit.retry_max_delay'   => '1s',
	'cachekit.max_attempts'      => '3',
	'cachekit.dead_letter_after' => '1h');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');
my $mon = start_monitor($redis);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }
sub drained { return wait_for(sub { queue_depth() == 0 }, $_[0] // 60); }

sql(q{
CREATE TABLE wt (id int PRIMARY KEY, ver int NOT NULL, note text, grp text);
CREATE TRIGGER wt_cache AFTER INSERT OR UPDATE OR DELETE ON wt
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}', 'columns=id,ver,note', 'tag=grp:{grp}');
INSERT INTO wt SELECT g, 0, 'MARK-0', 'g' FROM generate_series(1, 5) g;
});
ok(drained(), 'first values delivered');

# Point the worker away, so that the next commits form one batch.
sub hold_delivery
{
	conf_set_and_reload($node, 'cachekit.redis_url', dead_url());
	ok(wait_for(sub { cachekit_stats($node)->{redis_connected} eq 'false' }, 30),
		'worker lost Redis');
	return;
}

sub release_delivery
{
	conf_set_and_reload($node, 'cachekit.redis_url', $proxy->{url});
	return;
}

# The versions Redis was SET to for a key, in order (from MONITOR).
sub versions_set
{
	my ($key) = @_;
	return map { /"SET" "\Q$key\E" ".*?MARK-(\d+)/ ? ($1) : () } monitor_lines($mon);
}

sub never_backwards
{
	my ($what, $key) = @_;
	my @v = versions_set($key);
	my @sorted = sort { $a <=> $b } @v;
	is_deeply(\@v, \@sorted, "$what: $key never went backwards (SET versions: @v)");
	return;
}

sub equals_row
{
	my ($what, $id) = @_;
	my $v = redis_cmd($redis, 'GET', "wt:$id") // '(nil)';
	my $row = sql("SELECT ver FROM wt WHERE id = $id");
	like($v, qr/"ver": ?$row\b/, "$what: wt:$id holds the row's version $row ($v)");
	return;
}

# ---- a write, a flush, a later write of the same key: one batch, two pipelines

for my $case (
	[ 'transient error in the first pipeline', 2, 'TRYAGAIN injected by the test' ],
	[ 'refusal in the first pipeline',         3, 'ERR injected refusal' ])
{
	my ($what, $id, $error) = @$case;
	fault_proxy_rules($proxy, { match => qr/MARK-1\b/, error => $error, times => 2 });
	hold_delivery();
	sql("UPDATE wt SET ver = 1, note = 'MARK-1' WHERE id = $id");
	sql(q{SELECT cachekit_flush_tag('unrelated')});
	sql("UPDATE wt SET ver = 2, note = 'MARK-2' WHERE id = $id");
	release_delivery();
	ok(drained(), "$what: delivered");
	equals_row($what, $id);
	never_backwards($what, "wt:$id");
}

# ---- the final write fails transiently: everything waits, nothing older goes out

fault_proxy_rules($proxy, { match => qr/MARK-12\b/, error => 'LOADING injected', times => 2 });
hold_delivery();
sql(q{UPDATE wt SET ver = 11, note = 'MARK-11' WHERE id = 4});
sql(q{SELECT cachekit_flush_tag('unrelated')});
sql(q{UPDATE wt SET ver = 12, note = 'MARK-12' WHERE id = 4});
release_delivery();
ok(drained(), 'final write failing transiently: delivered');
ok((grep { /injected/ } fault_proxy_log($proxy)), 'the proxy did inject errors');
equals_row('final write failing transiently', 4);
never_backwards('final write failing transiently', 'wt:4');
fault_proxy_rules($proxy);

# ---- a refused write waiting for its retry holds later writes of its key

fault_proxy_rules($proxy, { match => qr/MARK-21\b/, error => 'ERR injected refusal', times => 8 });
sql(q{UPDATE wt SET ver = 21, note = 'MARK-21' WHERE id = 1});
ok( wait_for(sub { sql(q{SELECT coalesce(max(attempts), 0) FROM cachekit_queue}) >= 5 }, 60),
	'the write was refused five times (it now waits a while for its retry)');
sql(q{UPDATE wt SET ver = 22, note = 'MARK-22' WHERE id = 1});
ok(drained(), 'held write: delivered');
equals_row('held write', 1);
never_backwards('held write', 'wt:1');
is(cachekit_stats($node)->{dead_letters}, '0', 'nothing was dead-lettered');
fault_proxy_rules($proxy);

# ---- a tag set that holds a string: no SET before the failure -----------------

redis_cmd($redis, 'SET', 'tag:grp:bad', 'a string, not a set');
hold_delivery();
sql(q{UPDATE wt SET ver = 31, note = 'MARK-31', grp = 'bad' WHERE id = 5});
sql(q{SELECT cachekit_flush_tag('unrelated')});
sql(q{UPDATE wt SET ver = 32, note = 'MARK-32' WHERE id = 5});
release_delivery();
ok( wait_for(sub { sql(q{SELECT coalesce(min(attempts), 0) FROM cachekit_queue}) >= 2 }, 60),
	'tag set holding a string: the writes are refused and counted');
like(sql(q{SELECT string_agg(DISTINCT last_error, ',') FROM cachekit_queue}), qr/WRONGTYPE/,
	'with WRONGTYPE');
ok(!redis_exists($redis, 'wt:5'), 'the refused write left no value (the key is deleted, never stale)');
is_deeply([ versions_set('wt:5') ], [0], 'no SET of a refused version reached Redis');
redis_cmd($redis, 'DEL', 'tag:grp:bad');
ok(drained(), 'once the set is fixed: delivered');
equals_row('after the fix', 5);
never_backwards('tag set holding a string', 'wt:5');
is_deeply(resp_cmd($redis, 'SMEMBERS', 'tag:grp:bad'), ['wt:5'], 'and the key joined its tag set');
is(cachekit_stats($node)->{dead_letters}, '0', 'nothing was dead-lettered');

# ---- the tag set a key leaves holds a string: no SET either ------------------

sql(q{UPDATE wt SET ver = 40, note = 'MARK-40', grp = 'leaving' WHERE id = 2});
ok(drained(), 'wt:2 moved to grp:leaving');
is(redis_cmd($redis, 'SISMEMBER', 'tag:grp:leaving', 'wt:2'), '1', 'wt:2 is in tag:grp:leaving');
redis_cmd($redis, 'DEL', 'tag:grp:leaving');
redis_cmd($redis, 'SET', 'tag:grp:leaving', 'a string, not a set');
sql(q{UPDATE wt SET ver = 41, note = 'MARK-41', grp = 'arrived' WHERE id = 2});
ok( wait_for(sub { sql(q{SELECT coalesce(min(attempts), 0) FROM cachekit_queue}) >= 1 }, 60),
	'the set left holds a string: the write is refused');
like(sql(q{SELECT last_error FROM cachekit_queue}),
	qr/^WRONGTYPE tag set tag:grp:leaving holds a string, not a set/, 'naming the set left');
ok(!redis_exists($redis, 'wt:2'), 'the refused write left no value (the key is deleted, never stale)');
is_deeply([ grep { $_ == 41 } versions_set('wt:2') ], [], 'no SET of the refused version reached Redis');
redis_cmd($redis, 'DEL', 'tag:grp:leaving');
ok(drained(), 'once the set is fixed: delivered');
equals_row('after the fix of the set left', 2);
never_backwards('tag set left holding a string', 'wt:2');
is(redis_cmd($redis, 'SISMEMBER', 'tag:grp:arrived', 'wt:2'), '1', 'wt:2 joined tag:grp:arrived');

$node->stop;
stop_redis($redis);
done_testing();
