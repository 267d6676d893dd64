# test/t/077_refusals.pl -- Redis answering errors:
#
#  - a permanent refusal (WRONGTYPE: a tag's set name holds a string) moves
#    that entry to cachekit_dead_letter after cachekit.max_attempts, with
#    the error text and time, while the entries behind it are delivered;
#    once the cause is fixed, a replay delivers it;
#  - transient errors are retried for ever and never dead-lettered: a fake
#    Redis answering -LOADING to everything, then one that lets the worker
#    connect but answers -BUSY to every delivery command;
#  - a wrong password: last_error names the AUTH failure, no password in
#    the server log, and fixing the URL by reload delivers.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;
use CachekitFault;

my $MAX_ATTEMPTS = 3;
my $redis = start_redis();
my $node  = new_cachekit_node('refusals', $redis,
	'cachekit.retry_max_delay'   => '100ms',
	'cachekit.dead_letter_after' => '0',    # the attempts alone (121 tests the time)
	'cachekit.max_attempts'      => $MAX_ATTEMPTS);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub queue_depth { return sql('SELECT count(*) FROM cachekit_queue'); }

sub stat_of { return cachekit_stats($node)->{ $_[0] }; }

sub drained
{
	return wait_for(sub { queue_depth() == 0 }, $_[0] // 30);
}

sub gone
{
	my ($r, @keys) = @_;
	return !grep { redis_exists($r, $_) } @keys;
}

# ---- WRONGTYPE: dead letter after max_attempts -----------------------------

redis_cmd($redis, 'SET', 'tag:bad', 'x');
redis_cmd($redis, 'SADD', 'tag:good', 'good:1', 'good:2');
redis_cmd($redis, 'MSET', 'good:1', 'x', 'good:2', 'x', (map { ("ok:$_" => 'x') } 1 .. 10),
	'later:1', 'x', 'keep', 'x');

my $t_start = sql('SELECT now()');
my $off     = log_offset($node);
sql(q{SELECT cachekit_delete('ok:1', 'ok:2')});
sql(q{SELECT cachekit_flush_tag('bad')});
sql(qq{SELECT cachekit_delete('ok:$_')}) for 3 .. 10;
sql(q{SELECT cachekit_flush_tag('good')});

ok(wait_for(sub { stat_of('dead_letters') eq '1' }, 30), 'the refused flush became a dead letter');
ok(drained(), 'the queue is empty');
ok(gone($redis, map { "ok:$_" } 1 .. 10), 'the deletes before and after the refused entry were delivered');
ok(gone($redis, 'tag:good', 'good:1', 'good:2'), 'the good tag was flushed');
is(redis_cmd($redis, 'GET', 'tag:bad'), 'x', 'the string at tag:bad is untouched');
is_deeply([ redis_keys($redis, 'cachekit:*') ], [], 'no private flushing set was left behind');

my $dl = $node->safe_psql('postgres', q{
	SELECT kind::text || '|' || keys::text || '|' || tags::text || '|' || attempts || '|'
	       || (failed_at >= enqueued_at) || '|' || error
	FROM cachekit_dead_letter});
my ($kind, $keys, $tags, $attempts, $ordered, $error) = split /\|/, $dl, 6;
is($kind,     'i',     'dead letter: kind i');
is($tags,     '{bad}', 'dead letter: the tag bad');
is($keys,     '{}',    'dead letter: no keys');
is($attempts, $MAX_ATTEMPTS, "dead letter: $MAX_ATTEMPTS attempts");
like($error, qr/WRONGTYPE/, 'dead letter: the WRONGTYPE error text');
diag("dead letter error: $error");
is(sql(qq{SELECT count(*) FROM cachekit_dead_letter
          WHERE failed_at >= '$t_start' AND failed_at <= now()}), '1',
	'dead letter: failed_at set during this test');
is($ordered, 'true', 'dead letter: failed after it was enqueued');
my $s = cachekit_stats($node);
is($s->{dead_lettered}, '1', 'stats: dead_lettered 1');
like($s->{last_error} // '', qr/WRONGTYPE/, 'stats: last_error WRONGTYPE');
my $seg = log_since($node, $off);
like($seg, qr/WARNING:  cachekit moved queue entry \d+ to cachekit_dead_letter after $MAX_ATTEMPTS refusals/,
	'a WARNING in the log');
like($seg, qr/DETAIL:  Redis answered: WRONGTYPE/, 'with the error as DETAIL');

# work queued after the dead letter flows too
sql(q{SELECT cachekit_delete('later:1')});
ok(wait_for(sub { !redis_exists($redis, 'later:1') }, 20), 'later work is delivered');

# fix the cause and replay: nothing lost
redis_cmd($redis, 'DEL', 'tag:bad');
redis_cmd($redis, 'SADD', 'tag:bad', 'bad:1');
redis_cmd($redis, 'SET', 'bad:1', 'x');
is(sql('SELECT cachekit_replay_dead_letters()'), '1', 'one dead letter replayed');
ok(wait_for(sub { gone($redis, 'tag:bad', 'bad:1') }, 20), 'the replayed flush is delivered');
ok(drained(), 'queue empty');
is(stat_of('dead_letters'), '0', 'no dead letters left');
ok(redis_exists($redis, 'keep'), 'an unrelated key survives');

# ---- transient errors: a fake Redis answering -LOADING to everything -------

sub transient_round
{
	my ($what, $fake, $key_prefix, $error_re, $never_connects) = @_;

	sql(qq{ALTER SYSTEM SET cachekit.redis_url = '$fake->{url}'});
	sql('SELECT pg_reload_conf()');
	ok(wait_for(sub { sql('SHOW cachekit.redis_url') eq $fake->{url} }, 20),
		"$what: worker pointed at the fake Redis");
	redis_cmd($redis, 'MSET', map { ("$key_prefix:$_" => 'x') } 1 .. 20);
	redis_cmd($redis, 'SADD', "tag:$key_prefix", "$key_prefix:member");
	redis_cmd($redis, 'SET', "$key_prefix:member", 'x');
	my $f0 = stat_of('failed_attempts');
	sql(qq{SELECT cachekit_delete('$key_prefix:' || g) FROM generate_series(1, 10) g});
	sql(qq{SELECT cachekit_flush_tag('$key_prefix')});
	sql(qq{SELECT cachekit_delete('$key_prefix:' || g) FROM generate_series(11, 20) g});
	my $queued = queue_depth();

	my $want = $f0 + 4 * $MAX_ATTEMPTS;
	ok(wait_for(sub { stat_of('failed_attempts') >= $want }, 60),
		"$what: failed_attempts grew past 4 x max_attempts");
	my $st = cachekit_stats($node);
	like($st->{last_error} // '', $error_re, "$what: last_error: " . ($st->{last_error} // ''));
	is($st->{dead_letters}, '0', "$what: nothing in cachekit_dead_letter");
	is(queue_depth(), $queued, "$what: all $queued entries still queued");
	is(sql('SELECT max(attempts) FROM cachekit_queue'), '0', "$what: no attempt counted on any entry");
	# (a server that lets the worker connect shows connected for a moment
	# between the reconnect and the next refusal)
	is($st->{redis_connected}, 'false', "$what: redis_connected false") if $never_connects;

	sql('ALTER SYSTEM RESET cachekit.redis_url');
	sql('SELECT pg_reload_conf()');
	ok(drained(), "$what: delivered once pointed back at Redis");
	ok(gone($redis, (map { "$key_prefix:$_" } 1 .. 20), "tag:$key_prefix", "$key_prefix:member"),
		"$what: all keys and the tag deleted");
	is(stat_of('dead_letters'), '0', "$what: still no dead letters");
	return;
}

my $fake1 = start_fake_redis(error => 'LOADING Redis is loading the dataset in memory');
transient_round('LOADING', $fake1, 'ld', qr/LOADING/, 1);
my @cmds = fake_commands($fake1);
cmp_ok(scalar(@cmds), '>=', 4 * $MAX_ATTEMPTS, scalar(@cmds) . ' commands reached the LOADING server');
stop_fake_redis($fake1);

# ---- transient errors on the delivery commands themselves ------------------

my $fake2 = start_fake_redis(
	error    => 'BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.',
	setup_ok => 1);
transient_round('BUSY', $fake2, 'bz', qr/BUSY/, 0);
@cmds = fake_commands($fake2);
my $deliveries = grep { /^(UNLINK|EVALSHA|DEL)$/ } @cmds;
cmp_ok($deliveries, '>=', 4 * $MAX_ATTEMPTS,
	"$deliveries delivery commands reached the BUSY server (entries were really tried)");
stop_fake_redis($fake2);

# ---- wrong password ----------------------------------------------------------

my $GOOD_PW = 'Corr3ct-Horse-Battery';
my $BAD_PW  = 'Wr0ng-Staple-Donkey';
my $redis_pw = start_redis(password => $GOOD_PW);
redis_cmd($redis_pw, 'MSET', 'pw:1', 'x', 'pw:2', 'x', 'pw:keep', 'x');
my $port = $redis_pw->{port};

$off = log_offset($node);
conf_set_and_reload($node, 'cachekit.redis_url', "redis://:$BAD_PW\@127.0.0.1:$port/0");
ok(wait_for(sub { sql('SHOW cachekit.redis_url') =~ /:$port\/0$/ }, 20), 'URL with the wrong password loaded');
sql(q{SELECT cachekit_delete('pw:1', 'pw:2')});
ok( wait_for(
		sub {
			my $st = cachekit_stats($node);
			$st->{redis_connected} eq 'false' && ($st->{last_error} // '') =~ /AUTH/;
		},
		20),
	'the worker reports the failed authentication');
my $auth_error = stat_of('last_error');
diag("last_error with a wrong password: $auth_error");
like($auth_error, qr/AUTH failed: (WRONGPASS|ERR invalid password)/, 'last_error names the AUTH failure');
unlike($auth_error, qr/\Q$BAD_PW\E|\Q$GOOD_PW\E/, 'last_error holds no password');
ok(redis_exists($redis_pw, 'pw:1'), 'nothing delivered with the wrong password');
is(stat_of('dead_letters'), '0', 'an auth failure dead-letters nothing');

conf_set_and_reload($node, 'cachekit.redis_url', "redis://:$GOOD_PW\@127.0.0.1:$port/0");
ok(wait_for(sub { gone($redis_pw, 'pw:1', 'pw:2') }, 30), 'delivered once the URL is fixed by reload');
ok(drained(), 'queue empty');
ok(redis_exists($redis_pw, 'pw:keep'), 'an unrelated key survives');
$seg = log_since($node, $off);
like($seg, qr/cachekit worker cannot reach Redis.*AUTH/, 'the log tells of the AUTH failure');
unlike($seg, qr/\Q$BAD_PW\E/, 'the wrong password is not in the server log');
unlike($seg, qr/\Q$GOOD_PW\E/, 'the right password is not in the server log');
unlike(slurp_file($node->logfile), qr/\Q$BAD_PW\E|\Q$GOOD_PW\E/, 'no password anywhere in the server log');

$node->stop;
stop_redis($redis_pw);
stop_redis($redis);
done_testing();
