# test/t/125_tag_begins.pl -- the tags of a batch begin their flushes in one
# call on one node (issue 15: one script call per batch, not one per tag),
# and that shortcut keeps every tag's own fate:
#
#  - one tag whose set holds another type is refused alone: the other tags
#    of the same call are flushed, only its entry waits and is counted;
#  - a call refused as a whole for one tag's sake (NOPERM for a key outside
#    the worker's ACL key patterns) is split: each tag begins alone, the
#    others are flushed at once, only the refused tag's entry waits;
#  - more tags than one call takes (500) are begun in several calls, each
#    tag's answer read from its own place;
#  - tags without a set cost no TYPE check (one EXISTS answers for the
#    call), yet a tag with members or with only a leftover private set
#    among them is still flushed, and a user without EXISTS still flushes.
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
my $node = acl_cachekit_node('tag_begins', $redis, 'ck-begin-pw',
	[ '~user:*', '~tag:ok*', '~tag:wrong*', '~cachekit:*' ]);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }

# tag:<prefix><i> holds user:<prefix><i>, for i in 1 .. n
sub fill_tags
{
	my ($prefix, $n) = @_;
	my @cmds;
	for my $i (1 .. $n)
	{
		push @cmds, [ 'SET', "user:$prefix$i", 'v' ], [ 'SADD', "tag:$prefix$i", "user:$prefix$i" ];
	}
	resp_pipeline($redis, @cmds);
	return;
}

# how many of the n tag sets and member keys are left
sub left
{
	my ($prefix, $n) = @_;
	return resp_cmd($redis, 'EXISTS', map { ("tag:$prefix$_", "user:$prefix$_") } 1 .. $n);
}

# one flush entry per tag (as separate transactions would leave them), plus
# one for the odd tag, committed together
sub queue_flushes
{
	my ($prefix, $n, $odd) = @_;
	sql(qq{
BEGIN;
INSERT INTO cachekit_queue (kind, keys, tags)
	SELECT 'i', '{}', ARRAY['$prefix' || g] FROM generate_series(1, $n / 2) g;
INSERT INTO cachekit_queue (kind, keys, tags) VALUES ('i', '{}', ARRAY['$odd']);
INSERT INTO cachekit_queue (kind, keys, tags)
	SELECT 'i', '{}', ARRAY['$prefix' || g] FROM generate_series($n / 2 + 1, $n) g;
COMMIT;
});
	return;
}

# ---- one tag of wrong type among 40 -----------------------------------------

fill_tags('oka', 40);
redis_cmd($redis, 'SET', 'tag:wrong1', 'a string');
queue_flushes('oka', 40, 'wrong1');
ok(wait_for(sub { left('oka', 40) == 0 }, 30), 'the 40 good tags of the call are flushed');
ok(wait_for(sub { sql('SELECT coalesce(max(attempts), 0) FROM cachekit_queue') >= 1 }, 30),
	'the tag of the wrong type is refused');
is(queue_depth(), '1', 'only its entry waits');
like(sql('SELECT tags::text || last_error FROM cachekit_queue'),
	qr/^\{wrong1\}WRONGTYPE tag set tag:wrong1 holds a string, not a set/,
	'with its own error');
redis_cmd($redis, 'DEL', 'tag:wrong1');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'fixed: delivered at its retry');

# ---- a call refused as a whole for one tag's sake ------------------------------

fill_tags('okb', 40);
redis_cmd($redis, 'SADD', 'tag:secret1', 'user:kept');
queue_flushes('okb', 40, 'secret1');
ok(wait_for(sub { left('okb', 40) == 0 }, 30),
	'the other 40 tags are flushed although their shared call was refused');
ok(wait_for(sub { sql('SELECT coalesce(max(attempts), 0) FROM cachekit_queue') >= 1 }, 30),
	'the tag outside the ACL key patterns is refused');
is(queue_depth(), '1', 'only its entry waits');
like(sql('SELECT tags::text || last_error FROM cachekit_queue'), qr/^\{secret1\}NOPERM/,
	'with the NOPERM error');
ok(resp_exists($redis, 'tag:secret1'), 'its set is untouched');
sql('DELETE FROM cachekit_queue');

# ---- empty tags: one EXISTS answers for the whole call ---------------------------

# one transaction of flush entries, one per tag
sub flush_together
{
	my $list = join(',', map { "'$_'" } @_);
	sql(qq{INSERT INTO cachekit_queue (kind, keys, tags)
		SELECT 'i', '{}', ARRAY[t] FROM unnest(ARRAY[$list]) t});
	return;
}

resp_cmd($redis, 'CONFIG', 'RESETSTAT');
flush_together(map { "okempty$_" } 1 .. 40);
ok(wait_for(sub { queue_depth() == 0 }, 30), '40 flushes of tags without a set are delivered');
is(resp_calls($redis, 'type'), 0, 'no TYPE check ran for them (one EXISTS answered for the call)');
cmp_ok(resp_calls($redis, 'exists'), '>=', 1, 'the EXISTS ran');

# among empty tags: a tag with members, and one whose set is gone but whose
# private set an interrupted flush left behind (only the private name
# exists: the pair must be found by both of its names)
resp_cmd($redis, 'CONFIG', 'RESETSTAT');
fill_tags('okf', 2);
resp_pipeline($redis, [ 'SET', 'user:okleft1', 'v' ], [ 'SET', 'user:okleft2', 'v' ],
	[ 'SADD', 'cachekit:flushing:tag:okleft', 'user:okleft1', 'user:okleft2' ]);
flush_together((map { "okempty$_" } 1 .. 20), 'okf1', (map { "okempty$_" } 21 .. 40),
	'okleft', 'okf2');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'the mixed call is delivered');
is(left('okf', 2), 0, 'the tags with members among empty ones are flushed');
is(resp_cmd($redis, 'EXISTS', 'user:okleft1', 'user:okleft2', 'cachekit:flushing:tag:okleft'),
	0, 'the leftover private set of a tag without a set is drained');
# the two tags with a set take two TYPE checks each, the leftover one: the
# 40 empty tags none (an EXISTS per pair answered for them)
cmp_ok(resp_calls($redis, 'type'), '<=', 5, 'the empty tags among them took no TYPE check');

# a worker user whose ACL lacks EXISTS (set up before it was used) still
# flushes: the TYPE checks answer for every tag
redis_cmd($redis, 'ACL', 'SETUSER', 'ck', '-exists');
resp_cmd($redis, 'CONFIG', 'RESETSTAT');
fill_tags('okg', 3);
flush_together((map { "okempty$_" } 1 .. 10), map { "okg$_" } 1 .. 3);
ok(wait_for(sub { queue_depth() == 0 }, 30), 'delivered without EXISTS');
is(left('okg', 3), 0, 'the tags are flushed without EXISTS');
cmp_ok(resp_calls($redis, 'exists', 'rejected_calls'), '>=', 1, 'EXISTS was refused');
cmp_ok(resp_calls($redis, 'type'), '>=', 13, 'and the TYPE checks ran instead');
redis_cmd($redis, 'ACL', 'SETUSER', 'ck', '+exists');

# ---- more tags than one call takes -----------------------------------------------

# a refusal now dead-letters at once: a good tag read from another tag's
# place in the reply would show there
sql(q{ALTER SYSTEM SET cachekit.max_attempts = 1});
sql(q{ALTER SYSTEM SET cachekit.dead_letter_after = '0s'});
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { sql(q{SELECT current_setting('cachekit.dead_letter_after')}) eq '0' }, 30),
	'max_attempts 1, dead_letter_after 0 by reload');
sleep 1;	# the worker reloads on its own SIGHUP
fill_tags('okc', 1201);
redis_cmd($redis, 'SET', 'tag:wrong2', 'a string');
queue_flushes('okc', 1201, 'wrong2');
ok(wait_for(sub { left('okc', 1201) == 0 }, 60), 'the 1201 good tags (more than one call) are flushed');
ok(wait_for(sub { queue_depth() == 0 }, 30), 'the queue is empty');
is(sql(q{SELECT string_agg(tags::text || ' ' || error, ', ') FROM cachekit_dead_letter}),
	'{wrong2} WRONGTYPE tag set tag:wrong2 holds a string, not a set',
	'the tag of the wrong type among them alone was refused, with its own error');
my $flushed = cachekit_stats($node)->{tags_flushed};
cmp_ok($flushed, '>=', 40 + 40 + 1201 + 1, "tags_flushed counts every tag ($flushed)");

$node->stop;
done_testing();
