# test/t/110_sentinel.pl -- delivery through Sentinel
# (redis-sentinel://host:port,host:port,host:port/db#master_name): a master,
# its replica and three Sentinels, all with passwords. The worker asks the
# Sentinels in order, skips one that is down, connects to the master they
# name, and checks it is one; the Sentinels' own password comes from
# cachekit.redis_sentinel_password or the URL. "No Sentinel reachable" and
# "unknown master name" are told apart in last_error, and no password is
# ever logged.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;
use CachekitFault;

my $MASTER_PW   = 'Master-pw-9f2';
my $SENTINEL_PW = 'Sentinel-pw-4c7';
my $group = start_sentinel_group(password => $MASTER_PW, sentinel_password => $SENTINEL_PW);
my $master = $group->{master};

my $url = sentinel_url($group, password => $MASTER_PW, db => 2);
my $node = new_cachekit_node('sentinel', $url,
	'cachekit.redis_sentinel_password' => $SENTINEL_PW,
	'cachekit.retry_max_delay'         => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_redis_connected($node, 'postgres', 60), 'connected through Sentinel');
like(slurp_file($node->logfile),
	qr/connected to Redis at 127\.0\.0\.1:${\ $master->port}\/2 \(master "mymaster" named by Sentinel\)/,
	'the log names the master the Sentinels gave');

my $probe = 0;
sub delivers
{
	my ($label) = @_;
	$probe++;
	redis_cmd($master, '-n', '2', 'SET', "s:$probe", 'x');
	$node->safe_psql('postgres', "SELECT cachekit_delete('s:$probe')");
	ok(wait_for(sub { redis_cmd($master, '-n', '2', 'EXISTS', "s:$probe") eq '0' }, 60),
		"$label: delivered to the master");
}

delivers('through Sentinel');

# Set the URL (and settings), reload; wait for last_error to match.
sub fails_with
{
	my ($label, $re, %set) = @_;
	expect_outage($node, $label, $re, sub { set_all(%set) });
}

# Set these settings in postgresql.conf (never through SQL: no password in
# the statement log) and reload once.
sub set_all
{
	my (%set) = @_;
	for my $name (sort keys %set)
	{
		(my $v = $set{$name}) =~ s/'/''/g;
		$node->append_conf('postgresql.conf', "$name = '$v'");
	}
	$node->reload;
}

sub recovers
{
	my ($label, %set) = @_;
	set_all(%set);
	ok(wait_for_redis_connected($node, 'postgres', 60), "$label: connected");
	delivers($label);
}

# ---- the two failures told apart ------------------------------------------------

fails_with('unknown master name', qr/unknown master name "nosuchmaster": 3 of 3 Sentinels answered/,
	'cachekit.redis_url' => sentinel_url($group, password => $MASTER_PW, db => 2, name => 'nosuchmaster'));
recovers('right name', 'cachekit.redis_url' => $url);

my @dead = map { PostgreSQL::Test::Cluster::get_free_port() } 1 .. 2;
fails_with('no Sentinel reachable', qr/no Sentinel reachable \(2 tried\), last error: Sentinel at 127\.0\.0\.1:\d+: could not connect to 127\.0\.0\.1:\d+: Connection refused/,
	'cachekit.redis_url' => sentinel_url($group, password => $MASTER_PW, db => 2, sentinels => \@dead));

# a dead Sentinel first in the list is skipped
recovers('the first Sentinel is down',
	'cachekit.redis_url' => sentinel_url($group, password => $MASTER_PW, db => 2,
		sentinels => [ $dead[0], map { $_->port } @{ $group->{sentinels} } ]));

# ---- the Sentinels' password ---------------------------------------------------------

fails_with('Sentinels without their password', qr/no Sentinel reachable.*NOAUTH|no Sentinel reachable.*AUTH/,
	'cachekit.redis_sentinel_password' => '');
recovers('the Sentinel password as a URL parameter',
	'cachekit.redis_url' => sentinel_url($group, password => $MASTER_PW, db => 2,
		query => "sentinel_password=$SENTINEL_PW"));
fails_with('a wrong master password', qr/AUTH failed: (WRONGPASS|ERR invalid password)/,
	'cachekit.redis_url' => sentinel_url($group, password => 'wrong-Master-pw', db => 2,
		query => "sentinel_password=$SENTINEL_PW"));
recovers('all right again', 'cachekit.redis_url' => $url, 'cachekit.redis_sentinel_password' => $SENTINEL_PW);

# the master the Sentinels name must answer ROLE as a master: a Sentinel
# group whose "master" is in fact a replica is refused
my $fake = start_redis(password => $MASTER_PW, args => [ '--masterauth' => $MASTER_PW ]);
redis_cmd($fake, 'REPLICAOF', '127.0.0.1', $master->port);
my $sconf = "$PostgreSQL::Test::Utils::tmp_check/sentinel_fake.conf";
append_to_file($sconf, "sentinel monitor other 127.0.0.1 ${\ $fake->port} 1\n"
	  . "sentinel auth-pass other $MASTER_PW\n");
my $lone = start_redis(conf => $sconf, sentinel => 1);
fails_with('a named master that is a replica', qr/named master "other" by a Sentinel, is a slave/,
	'cachekit.redis_url' => "redis-sentinel://:$MASTER_PW\@127.0.0.1:${\ $lone->port}/2#other",
	'cachekit.redis_sentinel_password' => '');
recovers('back to the real group', 'cachekit.redis_url' => $url,
	'cachekit.redis_sentinel_password' => $SENTINEL_PW);

# ---- a new master that missed what the old one acknowledged ---------------------------
# A master without replicas (so no WAIT) takes a write-through value and a
# tag flush; then its Sentinel names another server, which holds an older
# value and the unflushed tag. On connecting there, the worker deletes the
# keys and flushes the tags it delivered lately: nothing stale is left.

my $old_master = start_redis();
my $new_master = start_redis();
my $wconf = "$PostgreSQL::Test::Utils::tmp_check/sentinel_switch.conf";
append_to_file($wconf, "sentinel monitor wt 127.0.0.1 ${\ $old_master->port} 1\n");
my $switcher = start_redis(conf => $wconf, sentinel => 1);
conf_set_and_reload($node, 'cachekit.redis_url', "redis-sentinel://127.0.0.1:${\ $switcher->port}/0#wt");
conf_set_and_reload($node, 'cachekit.redis_sentinel_password', '');
ok(wait_for(sub { my $s = cachekit_stats($node); $s->{redis_connected} eq 'true' }, 60)
	  && wait_for(sub { slurp_file($node->logfile) =~ /connected to Redis at 127\.0\.0\.1:${\ $old_master->port}\/0 \(master "wt"/ }, 60),
	'connected to the first master');
$node->safe_psql('postgres', q{
	CREATE TABLE w (id int PRIMARY KEY, v int);
	CREATE TRIGGER w_wt AFTER INSERT OR UPDATE OR DELETE ON w
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=w:{id}');
	INSERT INTO w VALUES (1, 1);
});
ok($node->safe_psql('postgres', "SELECT cachekit_wait('60 s')") eq 't', 'first value delivered');
# the new master as a lagging replica would have it: the old value, the unflushed tag
redis_cmd($new_master, 'SET', 'w:1', redis_cmd($old_master, 'GET', 'w:1'));
redis_cmd($new_master, 'SET', 'page:1', 'stale');
redis_cmd($new_master, 'SADD', 'tag:grp', 'page:1');
$node->safe_psql('postgres', q{UPDATE w SET v = 2 WHERE id = 1; SELECT cachekit_flush_tag('grp')});
ok($node->safe_psql('postgres', "SELECT cachekit_wait('60 s')") eq 't', 'the update and the flush delivered');
is(redis_cmd($old_master, 'GET', 'w:1'), '{"id":1,"v":2}', 'the old master has the new value');

# the old master is demoted under the worker's open connection: its next
# write gets READONLY, which makes the worker resolve again, without
# counting an attempt
my $offset2 = log_offset($node);
my $failed0 = cachekit_stats($node)->{failed_attempts};
redis_cmd($switcher, 'SENTINEL', 'REMOVE', 'wt');
redis_cmd($switcher, 'SENTINEL', 'MONITOR', 'wt', '127.0.0.1', $new_master->port, '1');
redis_cmd($old_master, 'REPLICAOF', '127.0.0.1', $new_master->port);
$node->safe_psql('postgres', q{SELECT cachekit_delete('probe:switch')});
ok(wait_for(sub { log_since($node, $offset2) =~ /connected to Redis at 127\.0\.0\.1:${\ $new_master->port}\/0/ }, 60),
	'the worker follows the Sentinel to the new master');
like(cachekit_stats($node)->{last_error}, qr/READONLY/, 'after a READONLY from the demoted master');
ok($node->safe_psql('postgres', "SELECT cachekit_wait('60 s')") eq 't', 'the entry is delivered');
is($node->safe_psql('postgres', 'SELECT count(*) FROM cachekit_dead_letter'), '0',
	'READONLY never leads to a dead letter');
like(log_since($node, $offset2), qr/deleted \d+ keys and flushed 1 tags delivered in the last 30 s on the new Redis master/,
	'and repeats its recent deliveries there');
ok(!redis_exists($new_master, 'w:1'), 'the stale value is gone from the new master');
ok(!redis_exists($new_master, 'page:1'), 'the key of the tag flushed on the old master is gone too');

# ---- no password anywhere in the log ------------------------------------------------

# set through SQL too: the statement log and "parameter changed" lines are masked
$node->safe_psql('postgres', "ALTER SYSTEM SET cachekit.redis_sentinel_password = '$SENTINEL_PW'");
$node->safe_psql('postgres', "ALTER SYSTEM SET cachekit.redis_url = '"
	  . sentinel_url($group, password => $MASTER_PW, db => 2, query => "sentinel_password=$SENTINEL_PW") . "'");
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
ok(wait_for(sub { slurp_file($node->logfile) =~ /parameter "cachekit.redis_sentinel_password" changed to "\*\*\*"/ }, 30),
	'the Sentinel password setting is logged masked');
ok(wait_for_redis_connected($node, 'postgres', 60), 'connected with the settings made by SQL');

my @leaks = grep { /\Q$MASTER_PW\E|\Q$SENTINEL_PW\E/ } split /\n/, slurp_file($node->logfile);
is(scalar @leaks, 0, 'neither password appears in the server log') or diag join("\n", @leaks[0 .. 4]);
my $st = cachekit_stats($node);
unlike($st->{last_error} // '', qr/\Q$MASTER_PW\E|\Q$SENTINEL_PW\E/, 'nor in last_error');

$node->stop;
done_testing();
