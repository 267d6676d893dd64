# test/t/020_tags.pl -- tag flushes in a real redis-server: every member of
# the set <tag_prefix><tag> is deleted and the set with them; a big tag is
# drained completely; cachekit.tag_prefix is honoured after a reload; a tag
# whose set name holds a string is refused, moved to cachekit_dead_letter
# after cachekit.max_attempts without holding up the entries behind it, and
# delivered after a fix and cachekit_replay_dead_letters().

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('tags', $redis,
	'cachekit.max_attempts'      => '2',
	'cachekit.dead_letter_after' => '0',    # the attempts alone (121 tests the time)
	'cachekit.retry_max_delay'   => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

# ---- local helpers --------------------------------------------------------

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub delivered
{
	return sql("SELECT cachekit_wait('10 seconds')") eq 't';
}

sub present { return redis_exists($redis, $_[0]); }

sub keys_present { return [ grep { present($_) } @_ ]; }

# SET many keys and list them in a tag set, 500 arguments per command
sub fill_tag
{
	my ($set, @members) = @_;
	while (my @chunk = splice(@members, 0, 500))
	{
		redis_cmd($redis, 'MSET', map { ($_ => 'v') } @chunk);
		redis_cmd($redis, 'SADD', $set, @chunk) if defined $set;
	}
	return;
}

sub stat_delta
{
	my ($before, $after, $name) = @_;
	return $after->{$name} - $before->{$name};
}

# Reload the configuration and wait until the worker has acted on it: it
# drops its Redis connection when it reloads, so once the connection it
# held is gone from CLIENT LIST the new settings are in force.
sub worker_client_ids
{
	my @ids;
	for my $line (split /\n/, redis_cmd($redis, 'CLIENT', 'LIST'))
	{
		next if $line =~ /\bcmd=client\|list\b/;    # that is us asking
		push @ids, $1 if $line =~ /^id=(\d+)/;
	}
	return @ids;
}

my $probe_seq = 0;

sub reload_and_wait
{
	# make sure the worker holds a connection to compare against
	my $probe = 'reload:probe:' . ++$probe_seq;
	redis_cmd($redis, 'SET', $probe, 'x');
	sql("SELECT cachekit_delete('$probe')");
	ok(delivered() && !present($probe), 'worker is connected before the reload');
	my @old = worker_client_ids();
	sql('SELECT pg_reload_conf()');
	my %old = map { ($_ => 1) } @old;
	ok( @old
		  && wait_for(sub { !grep { $old{$_} } worker_client_ids() }, 20),
		'worker dropped its connection: it has reloaded');
	return;
}

# ---- a small tag -----------------------------------------------------------

fill_tag('tag:featured', 'prod:1', 'prod:2', 'prod:3');
fill_tag('tag:other', 'prod:4');
fill_tag(undef, 'prod:5', 'featured', 'tag:featuredx');

my $s0 = cachekit_stats($node);
sql(q{SELECT cachekit_flush_tag('featured')});
ok(delivered(), 'flush of a small tag delivered');
is_deeply(keys_present('prod:1', 'prod:2', 'prod:3', 'tag:featured'),
	[], 'every member key and the tag set are gone');
is_deeply(keys_present('prod:4', 'tag:other', 'prod:5', 'featured', 'tag:featuredx'),
	[ 'prod:4', 'tag:other', 'prod:5', 'featured', 'tag:featuredx' ],
	'keys outside the tag, another tag and look-alike names survive');
is_deeply([ redis_keys($redis, 'cachekit:*') ], [], 'no private flushing set is left behind');
my $s1 = cachekit_stats($node);
is(stat_delta($s0, $s1, 'tags_flushed'),     1, 'stats: one tag flushed');
is(stat_delta($s0, $s1, 'tag_keys_deleted'), 3, 'stats: three tag keys deleted');

# flushing a tag that has no set is not an error
sql(q{SELECT cachekit_flush_tag('never-filled')});
ok(delivered(), 'flush of a tag without a set delivered');
is(cachekit_stats($node)->{dead_letters}, '0', 'an absent tag is not refused');

# a trigger's tag template goes through the same flush
sql(q{
	CREATE TABLE products(sku text PRIMARY KEY, category text);
	CREATE TRIGGER products_cache AFTER INSERT OR UPDATE OR DELETE ON products
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('product:{sku}', 'tag=category:{category}');
});
fill_tag('tag:category:shoes', 'page:shoes:1', 'page:shoes:2');
fill_tag('tag:category:hats',  'page:hats:1');
sql(q{INSERT INTO products VALUES ('s1', 'shoes')});
ok(delivered(), 'trigger with a tag delivered');
is_deeply(keys_present('page:shoes:1', 'page:shoes:2', 'tag:category:shoes'),
	[], 'the row\'s category tag was flushed');
ok(present('page:hats:1') && present('tag:category:hats'), 'the other category survives');

# ---- a big tag is drained completely (chunks of 500) -----------------------

my $n = 5000;
my @big = map { "big:item:$_" } 1 .. $n;
fill_tag('tag:big', @big);
fill_tag(undef, map { "keep:$_" } 1 .. 20);
is(redis_cmd($redis, 'SCARD', 'tag:big'), $n, "the big tag lists $n keys");
is(scalar(my @k = redis_keys($redis, 'big:item:*')), $n, "$n member keys exist");

$s0 = cachekit_stats($node);
sql(q{SELECT cachekit_flush_tag('big')});
ok(delivered(), 'flush of the big tag delivered');
is(scalar(@k = redis_keys($redis, 'big:item:*')), 0, 'every one of the member keys is gone');
ok(!present('tag:big'), 'the big tag set is gone');
is(scalar(@k = redis_keys($redis, 'keep:*')), 20, 'keys outside the tag survive');
is_deeply([ redis_keys($redis, 'cachekit:*') ], [], 'no private flushing set is left behind');
$s1 = cachekit_stats($node);
is(stat_delta($s0, $s1, 'tag_keys_deleted'), $n, "stats: $n tag keys deleted");
is(stat_delta($s0, $s1, 'tags_flushed'),     1,  'stats: one tag flushed');

# a member count that is an exact multiple of the chunk size, and one
# more, next to a small tag in the same transaction
fill_tag('tag:k1000', map { "k1000:$_" } 1 .. 1000);
fill_tag('tag:k1001', map { "k1001:$_" } 1 .. 1001);
fill_tag('tag:small', 'small:1');
sql(q{SELECT cachekit_flush_tag('k1000', 'k1001', 'small')});
ok(delivered(), 'three flushes in one entry delivered');
is(scalar(@k = redis_keys($redis, 'k100*')), 0, 'tags of 1000 and 1001 keys drained completely');
is_deeply(keys_present('tag:k1000', 'tag:k1001', 'tag:small', 'small:1'), [],
	'all three sets and the small tag\'s key are gone');

# a flush interrupted earlier left its private set behind: the next flush
# of that tag drains the leftover first, then the current set
fill_tag('cachekit:flushing:tag:resume', map { "left:$_" } 1 .. 600);
fill_tag('tag:resume', 'cur:1', 'cur:2');
sql(q{SELECT cachekit_flush_tag('resume')});
ok(delivered(), 'flush with a leftover private set delivered');
is(scalar(@k = redis_keys($redis, 'left:*')), 0, 'the leftover members are gone');
is_deeply(keys_present('cur:1', 'cur:2', 'tag:resume', 'cachekit:flushing:tag:resume'), [],
	'the current members and both sets are gone');

# ---- cachekit.tag_prefix -----------------------------------------------

sql(q{ALTER SYSTEM SET cachekit.tag_prefix = 'tg|'});
reload_and_wait();
fill_tag('tg|promo', 'promo:1', 'promo:2');
fill_tag('tag:promo', 'promo:old');
sql(q{SELECT cachekit_flush_tag('promo')});
ok(delivered(), 'flush with the new prefix delivered');
is_deeply(keys_present('promo:1', 'promo:2', 'tg|promo'), [],
	'the set under the new prefix was flushed');
ok(present('tag:promo') && present('promo:old'), 'the set under the old prefix was not touched');

sql(q{ALTER SYSTEM RESET cachekit.tag_prefix});
reload_and_wait();
sql(q{SELECT cachekit_flush_tag('promo')});
ok(delivered(), 'flush with the default prefix again delivered');
ok(!present('tag:promo') && !present('promo:old'), 'default prefix is back in force');

# ---- a tag name holding a string: dead letter, replay --------------------

redis_cmd($redis, 'SET', 'tag:bad', 'i am a string');
fill_tag('tag:good', 'good:1');
fill_tag(undef, 'after:1', 'after:2', 'bad:member');

$s0 = cachekit_stats($node);
sql(q{SELECT cachekit_flush_tag('bad')});
sql(q{SELECT cachekit_delete('after:1')});
sql(q{SELECT cachekit_flush_tag('good')});
ok( wait_for(
		sub {
			sql(q{SELECT count(*) = 1 AND (SELECT count(*) FROM cachekit_queue) = 0
			      FROM cachekit_dead_letter}) eq 't';
		},
		30),
	'the refused entry moved to cachekit_dead_letter and the queue drained');
ok(!present('after:1') && !present('good:1') && !present('tag:good'),
	'entries behind the refused one were delivered');
is(redis_cmd($redis, 'GET', 'tag:bad'), 'i am a string', 'the string was not touched');

my $dl = sql(q{SELECT kind, keys, tags, attempts, error FROM cachekit_dead_letter});
my ($kind, $dkeys, $dtags, $attempts, $error) = split /\|/, $dl, 5;
is($kind,     'i',     'dead letter: an invalidation');
is($dtags,    '{bad}', 'dead letter: the refused tag');
is($dkeys,    '{}',    'dead letter: no keys');
is($attempts, '2',     'dead letter: after cachekit.max_attempts = 2 attempts');
like($error, qr/WRONGTYPE/, 'dead letter: Redis\'s error text is kept');
like($error, qr/tag:bad/,   'dead letter: the error names the set');

$s1 = cachekit_stats($node);
is(stat_delta($s0, $s1, 'dead_lettered'), 1, 'stats: one entry dead-lettered');
cmp_ok(stat_delta($s0, $s1, 'failed_attempts'), '>=', 1, 'stats: the refusal counted as a failed attempt');
like($s1->{last_error} // '', qr/WRONGTYPE/, 'stats: last_error has the refusal');
is($s1->{dead_letters}, '1', 'stats: dead_letters = 1');
like(slurp_file($node->logfile), qr/WARNING:  cachekit moved queue entry \d+ to cachekit_dead_letter after 2 refusals/,
	'the move was logged as a WARNING');

# fix the key, then replay: now it is delivered
redis_cmd($redis, 'DEL', 'tag:bad');
fill_tag('tag:bad', 'bad:member');
is(sql(q{SELECT cachekit_replay_dead_letters()}), '1', 'replay moved one entry back');
ok(delivered(), 'the replayed entry was delivered');
ok(!present('bad:member') && !present('tag:bad'), 'after the fix the tag was flushed');
is(sql(q{SELECT count(*) FROM cachekit_dead_letter}), '0', 'no dead letters remain');
is(sql(q{SELECT queue_depth FROM cachekit_stats}), '0', 'queue drained');

# the same with one entry per batch, so that the entries behind the refused
# one are in later batches: it holds them up only for its max_attempts tries
sql(q{ALTER SYSTEM SET cachekit.batch_size = 1});
reload_and_wait();
redis_cmd($redis, 'SET', 'tag:bad2', 'another string');
fill_tag(undef, 'after:3', 'after:4', 'after:5');
sql(q{SELECT cachekit_flush_tag('bad2')});
sql(qq{SELECT cachekit_delete('after:$_')}) for 3 .. 5;
ok( wait_for(
		sub {
			sql(q{SELECT count(*) = 1 AND (SELECT count(*) FROM cachekit_queue) = 0
			      FROM cachekit_dead_letter}) eq 't';
		},
		30),
	'batch_size 1: the refused entry was dead-lettered and the queue drained');
is_deeply(keys_present('after:3', 'after:4', 'after:5'), [],
	'batch_size 1: the three entries behind it were delivered');
my $dlid = sql(q{SELECT id FROM cachekit_dead_letter WHERE tags = '{bad2}'});
like($dlid, qr/^\d+$/, 'the dead letter is the bad2 flush');
redis_cmd($redis, 'DEL', 'tag:bad2');
fill_tag('tag:bad2', 'bad2:member');
is(sql(qq{SELECT cachekit_replay_dead_letters(ARRAY[$dlid]::bigint[])}), '1',
	'replay by id moved it back');
ok(delivered(), 'replayed entry delivered');
ok(!present('bad2:member') && !present('tag:bad2'), 'after the fix the tag was flushed');
is(sql(q{SELECT count(*) FROM cachekit_dead_letter}), '0', 'no dead letters remain');

ok(present('after:2') && present('keep:1'), 'unrelated keys survive to the end');

$node->stop;
stop_redis($redis);
done_testing();
