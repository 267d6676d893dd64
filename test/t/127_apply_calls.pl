# test/t/127_apply_calls.pl -- on one node, the write-through keys of a
# batch are applied by one script call for many keys (issue 15: a script
# call per key cost Redis more than the writes), and that shortcut keeps
# every key's own fate and the order against tag flushes:
#
#  - 250 keys written together take a few calls (at most 100 keys each),
#    each key's value and tag set as before;
#  - one key whose tag set holds another type is refused alone: the other
#    keys of its call are written, only its entry waits;
#  - a call refused as a whole for one key's sake (NOPERM for a key outside
#    the worker's ACL key patterns) is sent again key by key: the other
#    keys are written, only the refused one's entry waits; a tag flush
#    queued after them still comes after their writes;
#  - a tag set seen twice in one call, for keys of different ttls, is kept
#    alive for the longer one;
#  - out of memory, no write of a call gets through (Redis refuses a
#    script's writes only until it changed something): not behind a delete
#    of the same call, nor behind the first refused write, nor a write
#    whose key leaves a set.
#
# Each case commits all its entries in one transaction, so that the worker
# reads them as one batch.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
my $node = acl_cachekit_node('apply_calls', $redis, 'ck-apply-pw',
	[ '~user:*', '~tag:*', '~cachekit:*' ]);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }

# write-through entries committed together: [key, value, ttl, tag] each
sub write_together
{
	my @rows = map {
		my ($k, $v, $ttl, $tag) = @$_;
		"('w', ARRAY['$k'], ARRAY['$tag'], '$v', $ttl)"
	} @_;
	sql('INSERT INTO cachekit_queue (kind, keys, tags, value, ttl) VALUES ' . join(', ', @rows));
	return;
}

# how many of the keys hold their expected value and are in their set
sub written
{
	my $ok = 0;
	for my $r (@_)
	{
		my ($k, $v, $ttl, $tag) = @$r;
		$ok++
		  if (resp_cmd($redis, 'GET', $k) // '') eq $v
		  && resp_cmd($redis, 'SISMEMBER', "tag:$tag", $k) == 1;
	}
	return $ok;
}

# ---- many keys: a few calls ------------------------------------------------------

my @many = map { [ "user:many$_", "v$_", 300, 'team' . ($_ % 7) ] } 1 .. 250;
resp_cmd($redis, 'CONFIG', 'RESETSTAT');
write_together(@many);
ok(wait_for(sub { queue_depth() == 0 }, 30), '250 write-through entries are delivered');
is(written(@many), 250, 'each key holds its value and is in its tag set');
cmp_ok(resp_calls($redis, 'evalsha'), '<=', 3, 'in at most three script calls, not one per key');
cmp_ok(resp_calls($redis, 'evalsha'), '>=', 3, 'and no call applied more than 100 keys');
my $ttl = resp_cmd($redis, 'TTL', 'user:many1');
ok($ttl > 250 && $ttl <= 300, 'with its ttl');

# ---- one key of a call refused: only it waits -------------------------------------

my @oka = map { [ "user:oka$_", "a$_", 300, 'oka' ] } 1 .. 20;
redis_cmd($redis, 'SET', 'tag:wrong1', 'a string');
write_together(@oka[0 .. 9], [ 'user:wrongkey', 'w', 300, 'wrong1' ], @oka[10 .. 19]);
ok(wait_for(sub { written(@oka) == 20 }, 30), 'the 20 good keys of the call are written');
ok(wait_for(sub { sql('SELECT coalesce(max(attempts), 0) FROM cachekit_queue') >= 1 }, 30),
	'the key whose set holds a string is refused');
is(queue_depth(), '1', 'only its entry waits');
like(sql('SELECT keys::text || last_error FROM cachekit_queue'),
	qr/^\{user:wrongkey\}WRONGTYPE tag set tag:wrong1 holds a string, not a set/,
	'with its own error');
is(resp_cmd($redis, 'EXISTS', 'user:wrongkey'), 0, 'and no value');
redis_cmd($redis, 'DEL', 'tag:wrong1');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'fixed: delivered at its retry');

# ---- a call refused as a whole: key by key, still before the flush ------------------

my @okb = map { [ "user:okb$_", "b$_", 300, 'okb' ] } 1 .. 20;
resp_pipeline($redis, [ 'SET', 'user:okbflushed', 'old' ],
	[ 'SADD', 'tag:okbflush', 'user:okbflushed' ]);
sql(q{
BEGIN;
INSERT INTO cachekit_queue (kind, keys, tags, value, ttl)
	SELECT 'w', ARRAY['user:okb' || g], ARRAY['okb'], 'b' || g, 300 FROM generate_series(1, 10) g;
INSERT INTO cachekit_queue (kind, keys, tags, value, ttl)
	VALUES ('w', ARRAY['user:okbflushed'], ARRAY['okbflush'], 'new', 300),
	       ('w', ARRAY['secret:1'], '{}', 's', 300);
INSERT INTO cachekit_queue (kind, keys, tags, value, ttl)
	SELECT 'w', ARRAY['user:okb' || g], ARRAY['okb'], 'b' || g, 300 FROM generate_series(11, 20) g;
INSERT INTO cachekit_queue (kind, keys, tags) VALUES ('i', '{}', ARRAY['okbflush']);
COMMIT;
});
ok(wait_for(sub { written(@okb) == 20 }, 30),
	'the other 20 keys are written although their shared call was refused');
ok(wait_for(sub { sql('SELECT coalesce(max(attempts), 0) FROM cachekit_queue') >= 1 }, 30),
	'the key outside the ACL key patterns is refused');
is(queue_depth(), '1', 'only its entry waits');
like(sql('SELECT keys::text || last_error FROM cachekit_queue'), qr/^\{secret:1\}NOPERM/,
	'with the NOPERM error');
is(resp_cmd($redis, 'EXISTS', 'user:okbflushed', 'tag:okbflush'), 0,
	'the tag flush queued after a key of the refused call deleted its new value');
sql('DELETE FROM cachekit_queue');

# ---- one set, two ttls in one call ------------------------------------------------

# a reader gave the set an expiry; the keys sort in this order in the call
resp_pipeline($redis, [ 'SADD', 'tag:twottl', 'user:reader' ], [ 'EXPIRE', 'tag:twottl', 10 ]);
write_together([ 'user:ttla', 'a', 100, 'twottl' ], [ 'user:ttlb', 'b', 1000, 'twottl' ]);
ok(wait_for(sub { queue_depth() == 0 }, 30), 'both keys are delivered');
cmp_ok(resp_cmd($redis, 'TTL', 'tag:twottl'), '>', 900,
	'the set lives past the longer ttl of the two keys that joined it in one call');

# ---- out of memory: no write of a call gets through ------------------------------

# user:oomadel sorts first: its delete must not go before the writes
my @oom = map { [ "user:oomb$_", "new$_", 300, 'oomb' ] } 1 .. 10;
resp_pipeline($redis, [ 'SET', 'user:oomadel', 'old' ], (map { [ 'SET', $_->[0], 'old' ] } @oom),
	[ 'SET', 'user:ooma-leave', 'old' ], [ 'SADD', 'tag:oomold', 'user:ooma-leave' ]);
resp_cmd($redis, 'CONFIG', 'SET', 'maxmemory', '1');
sql(q{
BEGIN;
INSERT INTO cachekit_queue (kind, keys) VALUES ('d', ARRAY['user:oomadel']);
INSERT INTO cachekit_queue (kind, keys, tags, value, ttl)
	SELECT 'w', ARRAY['user:oomb' || g], ARRAY['oomb'], 'new' || g, 300 FROM generate_series(1, 10) g;
COMMIT;
});
ok(wait_for(sub { (cachekit_stats($node)->{last_error} // '') =~ /: OOM command not allowed/ }, 30),
	'out of memory, the writes of the call are refused with OOM');
is(queue_depth(), '10', 'the ten writes wait');
is(resp_cmd($redis, 'EXISTS', map { $_->[0] } @oom), 0,
	'none of them wrote its value behind the delete of the call (old values deleted)');
is(resp_cmd($redis, 'EXISTS', 'user:oomadel'), 0, 'the delete went out');
# a write whose key leaves a set (first in its call): the SREM comes after
# the SET
sql(q{INSERT INTO cachekit_queue (kind, keys, untags, value, ttl)
	VALUES ('w', ARRAY['user:ooma-leave'], ARRAY['oomold'], 'new', 300)});
ok(wait_for(sub { resp_cmd($redis, 'EXISTS', 'user:ooma-leave') == 0 }, 30),
	'a write that leaves a set is refused too: its old value deleted, no value written behind its SREM');
is(queue_depth(), '11', 'it waits with the ten');
resp_cmd($redis, 'CONFIG', 'SET', 'maxmemory', '0');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'memory back: all delivered at their retry');
is(written(@oom), 10, 'with their values');
is(resp_cmd($redis, 'GET', 'user:ooma-leave'), 'new', 'the key that left its set too');
is(resp_cmd($redis, 'SISMEMBER', 'tag:oomold', 'user:ooma-leave'), 0, 'which no longer lists it');

done_testing();
