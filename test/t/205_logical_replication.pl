# test/t/205_logical_replication.pl -- a FOR ALL TABLES publication does not
# break logical replication, and each side keeps its own queue.
#
# The publisher runs cachekit with its own Redis; a subscriber with cachekit
# preloaded and its own Redis, and a bare subscriber where the extension is
# installed but the library not preloaded, subscribe to a publication FOR
# ALL TABLES (cachekit's tables included). Promised:
#   - apply never fails on cachekit's rows (initial copy and streaming);
#   - the subscriber delivers the publisher's invalidations to its own Redis,
#     and the publisher's write-through entries as deletes of their keys
#     (never a value, so never one out of order);
#   - the publisher's worker deleting its delivered entries never removes
#     the subscriber's own entries (whose ids are the same numbers);
#   - the publisher's dead letters stay the publisher's;
#   - the bare subscriber keeps nothing (no worker would ever deliver it).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $rpub = start_redis();
my $rsub = start_redis();
my $pub  = new_cachekit_node('pub', $rpub,
	-init                      => { allows_streaming => 'logical' },
	'cachekit.max_attempts'    => 1,
	'cachekit.dead_letter_after' => 0,
	'cachekit.retry_max_delay' => '100ms');
my $sub  = new_cachekit_node('sub', $rsub, 'cachekit.retry_max_delay' => '100ms');
my $bare = PostgreSQL::Test::Cluster->new('bare');
$bare->init;
$bare->start;

sub q_on { my ($n, $q) = @_; return $n->safe_psql('postgres', $q); }

my $schema = q{
	CREATE EXTENSION cachekit;
	CREATE TABLE users(id int PRIMARY KEY, email text, team int);
	CREATE TRIGGER users_inval AFTER INSERT OR UPDATE OR DELETE ON users
		FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}');
	CREATE TRIGGER users_wt AFTER INSERT OR UPDATE OR DELETE ON users
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}', 'columns=id,email', 'tag=team:{team}');
};
q_on($_, $schema) for $pub, $sub, $bare;
q_on($sub, q{
	CREATE TABLE local_things(id int PRIMARY KEY);
	CREATE TABLE local_unpublished(id int);
	CREATE TRIGGER local_inval AFTER INSERT ON local_things
		FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('local:{id}');
});
q_on($bare, q{CREATE TABLE local_things(id int PRIMARY KEY)});
ok(wait_for_worker($pub, 'postgres', 60) && wait_for_worker($sub, 'postgres', 60), 'workers run');

# the publisher has history before the subscription: delivered entries,
# and a dead letter (its tag set is a string, and one refusal is enough)
my $N = 40;
q_on($pub, qq{INSERT INTO users SELECT g, 'u' || g, g % 4 FROM generate_series(1, $N) g});
redis_cmd($rpub, 'SET', 'tag:broken', 'not a set');
q_on($pub, q{SELECT cachekit_flush_tag('broken')});
ok(wait_for(sub { q_on($pub, q{SELECT count(*) FROM cachekit_dead_letter}) eq '1' }, 60),
	'the publisher has a dead letter');
# and entries still queued when the subscription copies the table
q_on($pub, q{ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:1/0'});
q_on($pub, q{SELECT pg_reload_conf()});
q_on($pub, q{SELECT cachekit_delete('queued:before:' || g) FROM generate_series(1, 5) g});

q_on($pub, q{CREATE PUBLICATION everything FOR ALL TABLES});
my $pubconn = $pub->connstr('postgres') =~ s/'/''/gr;
q_on($sub, qq{CREATE SUBSCRIPTION s_sub CONNECTION '$pubconn' PUBLICATION everything});
q_on($bare, qq{CREATE SUBSCRIPTION s_bare CONNECTION '$pubconn' PUBLICATION everything});
for my $n ([$sub, 's_sub'], [$bare, 's_bare'])
{
	ok($n->[0]->poll_query_until('postgres',
			q{SELECT count(*) = 0 FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's')}),
		"$n->[1]: initial copy done");
}

sub catch_up
{
	$pub->wait_for_catchup($_) for 's_sub', 's_bare';
}

sub no_apply_errors
{
	my ($what) = @_;
	for my $n ([$sub, 's_sub'], [$bare, 's_bare'])
	{
		is(q_on($n->[0], qq{SELECT apply_error_count + sync_error_count
							FROM pg_stat_subscription_stats WHERE subname = '$n->[1]'}),
			'0', "$what: $n->[1] applied without an error");
		my @errors = grep { /ERROR:/ } split /\n/, slurp_file($n->[0]->logfile);
		is(join("\n", @errors), '', "$what: no error in $n->[1]'s log");
	}
}

# the publisher delivers again; its history drains from its queue
q_on($pub, q{ALTER SYSTEM RESET cachekit.redis_url});
q_on($pub, q{SELECT pg_reload_conf()});
ok(wait_for(sub { q_on($pub, q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 60),
	'the publisher drained its queue');
catch_up();
no_apply_errors('initial copy');
is(q_on($sub, q{SELECT count(*) FROM cachekit_dead_letter}), '0',
	'the publisher\'s dead letter is not the subscriber\'s');
is(q_on($bare, q{SELECT count(*) FROM cachekit_queue}), '0', 'the bare subscriber keeps no entry');

# ---- the publisher's work reaches the subscriber's Redis as deletes -------

redis_cmd($rsub, 'SET', "user:$_", 'stale') for 1 .. $N;
redis_cmd($rsub, 'SET', "wt:$_", 'stale') for 1 .. $N;
q_on($pub, q{UPDATE users SET email = email || '.new'});
q_on($pub, q{UPDATE users SET email = email || '.newer' WHERE id <= 10});
catch_up();
ok(wait_for(sub { q_on($sub, q{SELECT cachekit_wait('1 second')}) eq 't'
		&& q_on($sub, q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 60),
	'the subscriber delivered what came from the publisher');
is(scalar(grep { redis_exists($rsub, "user:$_") } 1 .. $N), 0,
	'the publisher\'s invalidations deleted the keys in the subscriber\'s Redis');
is(scalar(grep { redis_exists($rsub, "wt:$_") } 1 .. $N), 0,
	'its write-through entries arrived as deletes: no value was written');
is(redis_cmd($rpub, 'GET', 'wt:3'), '{"id":3,"email":"u3.new.newer"}',
	'the publisher itself still writes through');

# ---- the publisher's deletes of its entries leave the subscriber's alone ----

q_on($sub, q{ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:1/0'});
q_on($sub, q{SELECT pg_reload_conf()});
# the subscriber's next ids are the publisher's next ids
my $next = q_on($pub, q{SELECT last_value FROM cachekit_queue_id_seq});
q_on($sub, qq{SELECT setval('cachekit_queue_id_seq', $next)});
# thirty transactions: thirty entries (one transaction's would be gathered into one)
q_on($sub, q{DO $$ BEGIN FOR g IN 1..30 LOOP INSERT INTO local_things VALUES (g); COMMIT; END LOOP; END $$});
my $own = q_on($sub, q{SELECT count(*) FROM cachekit_queue WHERE keys[1] LIKE 'local:%'});
is($own, '30', 'the subscriber queued its own entries');
my $ids = q_on($sub, q{SELECT min(id) || '-' || max(id) FROM cachekit_queue});
note "subscriber's queue ids: $ids";
# the publisher enqueues, delivers and deletes entries of the same ids and more
q_on($pub, q{DO $$ BEGIN FOR g IN 1..200 LOOP PERFORM cachekit_delete('pub:' || g); COMMIT; END LOOP; END $$});
ok(wait_for(sub { q_on($pub, q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 60),
	'the publisher delivered and deleted its entries');
catch_up();
is(q_on($sub, q{SELECT count(*) FROM cachekit_queue WHERE keys[1] LIKE 'local:%'}), '30',
	'the subscriber\'s own entries are all still queued');
redis_cmd($rsub, 'SET', "local:$_", 'x') for 1 .. 30;
q_on($sub, q{ALTER SYSTEM RESET cachekit.redis_url});
q_on($sub, q{SELECT pg_reload_conf()});
ok(wait_for(sub { !grep { redis_exists($rsub, "local:$_") } 1 .. 30 }, 60),
	'and delivered once its Redis is back');
no_apply_errors('streaming');
is(q_on($bare, q{SELECT count(*) FROM cachekit_queue}), '0', 'the bare subscriber still keeps nothing');
is(q_on($sub, q{SELECT count(*) FROM cachekit_dead_letter}), '0', 'no dead letter on the subscriber');

$_->stop for $sub, $bare, $pub;
done_testing();
