# test/t/230_targets.pl -- named Redis targets (cachekit.targets) and
# fan-out: triggers and manual calls pick targets; each target gets each
# entry; a stopped target holds back only itself (the others keep
# delivering while its backlog grows) and drains when it returns, both
# ending equal to the rows; an entry leaves the queue once every target it
# names took it; refusals dead-letter per target; a target named before it
# is configured waits and is reported; the setting is checked and never
# shows a password.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $main = start_redis();
my $eu   = start_redis();
my $us   = start_redis(password => 'us-secret-7');
my $us_url = 'redis://:us-secret-7@127.0.0.1:' . $us->port . '/0';
# us comes before eu: the stopped target is served first in each round
my $node = new_cachekit_node('targets', $main,
	'cachekit.targets'          => "us=$us_url, eu=" . redis_url($eu),
	'cachekit.retry_max_delay'  => '300ms',
	'cachekit.max_attempts'     => '1',
	'cachekit.dead_letter_after' => '0',
	'log_statement'             => 'all');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub delivered { return sql("SELECT cachekit_wait('20 seconds')") eq 't'; }

# ---- the setting ------------------------------------------------------------

for my $case (
	[ 'eu=redis://127.0.0.1:1/0, eu=redis://127.0.0.1:2/0', qr/target "eu" is named twice/ ],
	[ 'EU=redis://127.0.0.1:1/0',                         qr/does not start with a target name/ ],
	[ 'default=redis://127.0.0.1:1/0',                    qr/reserved for cachekit.redis_url/ ],
	[ 'x=http://:pw-in-bad-url@h/0',                      qr/URL of target "x" is invalid/ ],
	[ 'redis://:pw-no-name@127.0.0.1:1/0',                qr/each entry must be name=url/ ],
	[ 'eu=redis://127.0.0.1:1/0,',                        qr/an entry of the list is empty/ ])
{
	my ($value, $re) = @$case;
	my ($rc, $out, $err) = $node->psql('postgres',
		"ALTER SYSTEM SET cachekit.targets = '$value'",
		on_error_stop => 0, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	like($err, $re, "cachekit.targets refused: $value") or diag $err;
	like($err, qr/22023/, 'with invalid_parameter_value');
	unlike($err, qr/pw-in-bad-url|pw-no-name/, 'the error shows no password');
}
is(sql("SELECT setting FROM pg_settings WHERE name = 'cachekit.targets'") =~ /us-secret-7/ ? 1 : 0,
	1, 'a superuser sees the setting');
sql('CREATE ROLE watcher LOGIN');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_settings WHERE name = 'cachekit.targets'",
		extra_params => [ '-U', 'watcher' ]),
	'0', 'other roles do not see it');

# ---- fan-out by triggers ----------------------------------------------------

sql(q{
	CREATE TABLE users (id int PRIMARY KEY, name text);
	INSERT INTO users SELECT g, 'n' || g FROM generate_series(1, 50) g;
	CREATE TRIGGER users_regions AFTER INSERT OR UPDATE OR DELETE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('target=eu', 'target=us', 'user:{id}');
	CREATE TRIGGER users_page AFTER INSERT OR UPDATE OR DELETE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('page:{id}');
	CREATE TABLE items (id int PRIMARY KEY, v int);
	INSERT INTO items SELECT g, 0 FROM generate_series(1, 40) g;
	CREATE TRIGGER items_wt AFTER INSERT OR UPDATE OR DELETE ON items
	  FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=item:{id}', 'target=eu', 'target=us');
});
for my $r ($main, $eu, $us)
{
	redis_cmd($r, 'MSET', map { ("user:$_" => 'x', "page:$_" => 'x') } 1 .. 50);
}
sql('UPDATE users SET name = name || \'!\' WHERE id <= 10');
ok(delivered(), 'fan-out delivered');
is(scalar(grep { redis_exists($eu, "user:$_") } 1 .. 10), 0, 'eu: the keys are gone');
is(scalar(grep { redis_exists($us, "user:$_") } 1 .. 10), 0, 'us: the keys are gone');
is(scalar(grep { redis_exists($main, "user:$_") } 1 .. 10), 10, 'default: not a target of that trigger');
is(scalar(grep { redis_exists($main, "page:$_") } 1 .. 10), 0, 'default: its own trigger delivered');
is(scalar(grep { redis_exists($eu, "page:$_") } 1 .. 10), 10, 'eu: not a target of the default trigger');
is(sql('SELECT count(*) FROM cachekit_queue'), '0', 'every entry left the queue');
is(sql('SELECT redis_connected FROM cachekit_stats'), 't', 'cachekit_stats: every target connected');
is(sql(q{SELECT string_agg(target || ':' || connected || ':' || backlog, ',' ORDER BY target)
	FROM cachekit_target_stats}), 'default:true:0,eu:true:0,us:true:0', 'cachekit_target_stats: one row per target');

# ---- manual calls -----------------------------------------------------------

for my $r ($main, $eu, $us) { redis_cmd($r, 'MSET', 'm:1', 'x', 'm:2', 'x'); }
sql(q{SELECT cachekit_delete_in('{eu}', 'm:1'); SELECT cachekit_delete('m:2')});
ok(delivered(), 'manual deletes delivered');
sub where_present { my $key = shift; return join(',', map { redis_exists($_, $key) ? 1 : 0 } @_); }
is(where_present('m:1', $main, $eu, $us), '1,0,1', 'cachekit_delete_in: eu only');
is(where_present('m:2', $main, $eu, $us), '0,1,1', 'cachekit_delete: default only');
for my $r ($main, $eu, $us) { redis_cmd($r, 'SET', 'tk', 'x'); redis_cmd($r, 'SADD', 'tag:t1', 'tk'); }
sql(q{SELECT cachekit_flush_tag_in('{us,default}', 't1')});
ok(delivered(), 'manual flush delivered');
is(where_present('tk', $main, $eu, $us), '0,1,0', 'cachekit_flush_tag_in: us and default');

# ---- one target stopped: the others keep delivering -------------------------

$us->stop;
sql("UPDATE items SET v = v + 1");
ok(wait_for(sub { sql(q{SELECT connected FROM cachekit_target_stats WHERE target = 'us'}) eq 'f' }, 30),
	'us is reported disconnected') or diag sql('SELECT * FROM cachekit_target_stats');
for my $round (1 .. 5)
{
	sql("UPDATE items SET v = v + 1");
	redis_cmd($eu, 'SET', "user:$round", 'x');
	sql("UPDATE users SET name = name || '.' WHERE id = $round");
	ok(wait_for(sub { !redis_exists($eu, "user:$round") }, 30),
		"eu keeps delivering while us is down (round $round)");
}
is(sql("SELECT count(*) FROM cachekit_queue WHERE targets IS NULL OR 'eu' = ANY (targets)"), '0',
	'nothing waits for eu');
ok(sql(q{SELECT backlog FROM cachekit_target_stats WHERE target = 'us'}) >= 45, 'us: its backlog grows');
is(sql(q{SELECT oldest_entry_age IS NOT NULL AND last_error IS NOT NULL FROM cachekit_target_stats WHERE target = 'us'}),
	't', 'us: oldest entry age and last error reported');
is(sql('SELECT redis_connected FROM cachekit_stats'), 'f', 'cachekit_stats: not every target is connected');
is(sql("SELECT cachekit_wait('300ms')"), 'f', 'cachekit_wait waits for every target');

$us->restart;
ok(delivered(), 'us drains its backlog when it returns');
my $rows = sql(q{SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM items});
for my $r ([ eu => $eu ], [ us => $us ])
{
	my @got;
	for my $id (1 .. 40)
	{
		my $json = redis_cmd($r->[1], 'GET', "item:$id");
		push @got, $json =~ /"v": ?(\d+)/ ? "$id=$1" : "$id=?";
	}
	is(join(',', @got), $rows, "$r->[0]: every key equals its row");
}
is(scalar(grep { redis_exists($main, "item:$_") } 1 .. 40), 0, 'default got no write-through');
is(sql('SELECT redis_connected FROM cachekit_stats'), 't', 'connected again');

# ---- refusals dead-letter per target ----------------------------------------

redis_cmd($eu, 'SET', 'tag:bad', 'a string');
sql(q{SELECT cachekit_flush_tag_in('{eu,us}', 'bad')});
ok(wait_for(sub { sql('SELECT count(*) FROM cachekit_dead_letter') eq '1' }, 30), 'one dead letter');
is(sql('SELECT target FROM cachekit_dead_letter'), 'eu', 'it records the target that refused');
ok(wait_for(sub { sql('SELECT count(*) FROM cachekit_queue') eq '0' }, 30), 'us took it: the entry left the queue');
redis_cmd($eu, 'DEL', 'tag:bad');
for my $r ($eu, $us) { redis_cmd($r, 'SET', 'bk', 'x'); redis_cmd($r, 'SADD', 'tag:bad', 'bk'); }
is(sql('SELECT cachekit_replay_dead_letters()'), '1', 'replayed');
ok(delivered(), 'the replay is delivered');
is(where_present('bk', $eu, $us), '0,1', 'to the target that refused it only');

# ---- a target named before it is configured ---------------------------------

# entries of unconfigured targets dead-letter after dead_letter_after: not yet
sql("ALTER SYSTEM SET cachekit.dead_letter_after = '1h'");
sql('SELECT pg_reload_conf()');

my ($rc, $out, $err) = $node->psql('postgres', q{
	CREATE TRIGGER users_asia AFTER UPDATE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('target=asia', 'user:{id}')});
like($err, qr/WARNING:  target "asia" named in trigger "users_asia" on table "users" is not configured/,
	'a trigger naming an unconfigured target: a warning');
($rc, $out, $err) = $node->psql('postgres', q{
	CREATE TRIGGER users_bad AFTER UPDATE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('target=Asia!', 'user:{id}')});
like($err, qr/lowercase identifier/, 'a malformed target name: an error');
sql("UPDATE users SET name = name WHERE id = 1");
ok(wait_for(sub { sql(q{SELECT configured::text || backlog FROM cachekit_target_stats WHERE target = 'asia'}) eq 'false1' }, 30),
	'its entry waits, reported in cachekit_target_stats');
like(sql(q{SELECT last_error FROM cachekit_target_stats WHERE target = 'asia'}), qr/not configured/,
	'with the reason');
my $asia = start_redis();
redis_cmd($asia, 'SET', 'user:1', 'x');
sql("ALTER SYSTEM SET cachekit.targets = 'us=$us_url, eu=" . redis_url($eu) . ", asia=" . redis_url($asia) . "'");
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { !redis_exists($asia, 'user:1') }, 60), 'configured by a reload: its entry is delivered');
ok(delivered(), 'the queue is empty');

# ---- a target that stays unconfigured: dead letters after dead_letter_after --

($rc, $out, $err) = $node->psql('postgres', q{
	CREATE TRIGGER users_mars AFTER UPDATE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('target=mars', 'target=eu', 'user:{id}')});
like($err, qr/target "mars" .* is not configured/, 'mars: a warning');
redis_cmd($eu, 'SET', 'user:2', 'x');
sql("UPDATE users SET name = name WHERE id = 2");
ok(wait_for(sub { !redis_exists($eu, 'user:2') }, 30), 'eu takes the entry mars owes too');
ok(wait_for(sub { sql('SELECT string_agg(targets::text, \' \') FROM cachekit_queue') eq '{mars}' }, 30),
	'only mars still owes it');
sleep(2);
is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', 'it waits while younger than dead_letter_after');
sql("ALTER SYSTEM SET cachekit.dead_letter_after = '1s'");
sql('SELECT pg_reload_conf()');
ok(wait_for(sub { sql(q{SELECT count(*) FROM cachekit_dead_letter WHERE target = 'mars'}) eq '1' }, 60),
	'then it moves to the dead letters for mars');
like(sql(q{SELECT error FROM cachekit_dead_letter WHERE target = 'mars'}), qr/target "mars" is not configured/,
	'with the reason');
is(sql('SELECT count(*) FROM cachekit_queue'), '0', 'and leaves the queue');

# ---- no password in any log line -------------------------------------------

my $log = slurp_file($node->logfile);
unlike($log, qr/us-secret-7|pw-in-bad-url|pw-no-name/, 'no password of cachekit.targets in the log');

done_testing();
