# test/t/211_cluster_changes.pl -- a Redis Cluster (3 primaries, 3 replicas)
# that changes under cachekit: scripts flushed (NOSCRIPT), a slot migration in progress (CLUSTER SETSLOT
# MIGRATING/IMPORTING and MIGRATE, so that ASK and TRYAGAIN really happen),
# a whole redis-cli --cluster reshard while pgbench writes, CLUSTER FAILOVER
# on a replica and a killed primary under load, and a primary down with no
# replica left (CLUSTERDOWN until it is back). Each run ends with every
# write-through key equal to its row or gone, and no dead letter.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;

my $cl = start_cluster();
my $node = new_cachekit_node('cluster_changes', cluster_url($cl),
	'cachekit.retry_max_delay' => '500ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_redis_connected($node, 'postgres', 60), 'connected to the cluster');

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub nkeys { my @k = cluster_keys(@_); return scalar @k; }
sub redirects { return cachekit_stats($node)->{redirects_followed}; }
sub myid { return redis_cmd($_[0], 'CLUSTER', 'MYID'); }

my $NROWS = 300;
sql(qq{
	CREATE TABLE wt (id int PRIMARY KEY, grp int NOT NULL, v int NOT NULL);
	CREATE TRIGGER wt_cache AFTER INSERT OR UPDATE OR DELETE ON wt
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}', 'tag=wgrp:{grp}');
	CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, v int NOT NULL);
	CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
		FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('item:{id}', 'tag=grp:{grp}');
	INSERT INTO wt SELECT g, g % 5, g FROM generate_series(1, $NROWS) g;
	INSERT INTO items SELECT g, g % 5, g FROM generate_series(1, $NROWS) g;
});
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'initial rows delivered');

# every write-through key equal to its row (or gone), no dead letter
sub check_end
{
	my ($label) = @_;
	ok(sql("SELECT cachekit_wait('180 s')") eq 't', "$label: the queue drained");
	my @bad = cluster_check_rows($node, $cl, 'wt', 'wt:');
	is(scalar @bad, 0, "$label: every key is gone or equal to its row")
	  or diag join("\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);
	is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', "$label: no dead letter");
}

my $script = $node->basedir . '/update.sql';
append_to_file($script, <<"EOF");
\\set id random(1, $NROWS)
\\set g random(0, 6)
\\set v random(1, 1000000)
UPDATE wt SET v = :v, grp = :g WHERE id = :id;
UPDATE items SET v = :v WHERE id = :id;
EOF

sub start_load
{
	my ($secs) = @_;
	my @cmd = ('pgbench', '--no-vacuum', '-h', $node->host, '-p', $node->port,
		'-c', 2, '-j', 2, '-T', $secs, '-R', 200, '-f', $script, 'postgres');
	my %w = (out => '', err => '');
	$w{h} = IPC::Run::start(\@cmd, '<', \undef, '>', \$w{out}, '2>', \$w{err},
		IPC::Run::timeout($secs + 180));
	return \%w;
}

sub finish_load
{
	my ($w, $label) = @_;
	$w->{h}->finish;
	like($w->{out}, qr/number of transactions actually processed: [1-9]/,
		"$label: the load committed transactions") or diag $w->{err};
}

# ---- NOSCRIPT: scripts flushed on every node are loaded again on demand ------

my $failed0 = cachekit_stats($node)->{failed_attempts};
redis_cmd($_, 'SCRIPT', 'FLUSH') for cluster_primaries($cl);
sql('UPDATE wt SET v = v + 1 WHERE id <= 20');
ok(sql("SELECT cachekit_wait('30 s')") eq 't', 'writes after SCRIPT FLUSH delivered');
is(cachekit_stats($node)->{failed_attempts}, $failed0,
	'NOSCRIPT: the scripts were loaded on the node and the command sent again, no failed attempt');

# ---- a slot migration in progress: ASK, then TRYAGAIN ------------------------

my $slot = redis_cmd($cl->{nodes}[0], 'CLUSTER', 'KEYSLOT', '{mig}');
my $src = cluster_node_of($cl, '{mig}');
my ($dst) = grep { $_ != $src } cluster_primaries($cl);
redis_cmd($src, 'SET', "{mig}:$_", 'cached') for 1 .. 10;
redis_cmd($dst, 'CLUSTER', 'SETSLOT', $slot, 'IMPORTING', myid($src));
redis_cmd($src, 'CLUSTER', 'SETSLOT', $slot, 'MIGRATING', myid($dst));
redis_cmd($src, 'MIGRATE', '127.0.0.1', $dst->port, '', 0, 5000, 'KEYS', map { "{mig}:$_" } 1 .. 5);
is(redis_cmd($dst, 'CLUSTER', 'COUNTKEYSINSLOT', $slot), 5, 'half of the slot moved');

my $before = redirects();
sql("SELECT cachekit_delete('{mig}:1')");
ok(sql("SELECT cachekit_wait('30 s')") eq 't', 'a moved key: delivered');
is(redis_cmd($dst, 'CLUSTER', 'COUNTKEYSINSLOT', $slot), 4,
	'it was deleted on the importing node (ASKING, then the command)');
ok(redirects() > $before, 'cachekit_stats counts the ASK redirection');
like(redis_cmd($dst, 'CLUSTER', 'NODES'), qr/\[$slot-<-/, 'the slot is still importing');

sql("SELECT cachekit_delete('{mig}:6')");
ok(sql("SELECT cachekit_wait('30 s')") eq 't', 'a key not moved yet: delivered');
is(redis_cmd($src, 'CLUSTER', 'COUNTKEYSINSLOT', $slot), 4, 'deleted on the migrating node');

# keys on both sides of the migration in one UNLINK: TRYAGAIN until it ends
my $failed = cachekit_stats($node)->{failed_attempts};
sql("SELECT cachekit_delete('{mig}:2', '{mig}:3', '{mig}:7', '{mig}:8')");
ok( wait_for(
		sub {
			my $s = cachekit_stats($node);
			$s->{failed_attempts} > $failed && ($s->{last_error} // '') =~ /TRYAGAIN/;
		},
		60),
	'keys on both sides: TRYAGAIN, retried') or diag explain cachekit_stats($node);
is(sql("SELECT cachekit_wait('1 s')"), 'f', 'not delivered while the slot migrates');
redis_cmd($src, 'MIGRATE', '127.0.0.1', $dst->port, '', 0, 5000, 'KEYS', map { "{mig}:$_" } 7 .. 10);
redis_cmd($_, 'CLUSTER', 'SETSLOT', $slot, 'NODE', myid($dst)) for $dst, $src;
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'delivered once the migration ended');
my $left = cluster_get($cl, map { "{mig}:$_" } 1 .. 10);
is(join(',', grep { defined $left->{"{mig}:$_"} } 1 .. 10), '4,5,9,10',
	'exactly the deleted keys are gone');
is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', 'TRYAGAIN sent nothing to the dead letters');

# ---- a whole reshard under load: MOVED ---------------------------------------------

$before = redirects();
my ($from, $to) = cluster_primaries($cl);
my $load = start_load(30);
sleep 2;
my ($out, $err) = ('', '');
IPC::Run::run(
	[ 'redis-cli', '--cluster', 'reshard', '127.0.0.1:' . $from->port,
		'--cluster-from', myid($from), '--cluster-to', myid($to),
		'--cluster-slots', 2000, '--cluster-yes' ],
	'<', \'', '>', \$out, '2>', \$err, IPC::Run::timeout(300));
is($?, 0, 'redis-cli --cluster reshard moved 2000 slots under load') or diag "$out\n$err";
finish_load($load, 'reshard');
cluster_wait_ok($cl, 60);
ok(redirects() > $before, 'the worker followed MOVED');
check_end('reshard');

# ---- CLUSTER FAILOVER on a replica, then a killed primary, under load --------------

sub replica_of
{
	my ($p) = @_;
	my ($line) = split /\n/, redis_cmd($p, 'CLUSTER', 'REPLICAS', myid($p));
	my ($port) = $line =~ /:(\d+)@/;
	return (grep { $_->port == $port } @{ $cl->{nodes} })[0];
}

$load = start_load(30);
sleep 3;
my ($p1) = cluster_primaries($cl);
my $r1 = replica_of($p1);
redis_cmd($r1, 'CLUSTER', 'FAILOVER');
ok(wait_for(sub { redis_cmd($r1, 'INFO', 'replication') =~ /^role:master/m }, 60),
	'CLUSTER FAILOVER promoted a replica under load');
sleep 3;
my ($p2) = grep { $_ != $r1 } cluster_primaries($cl);
my $r2 = replica_of($p2);
$p2->crash;
ok(wait_for(sub { redis_cmd($r2, 'INFO', 'replication') =~ /^role:master/m }, 90),
	'a killed primary: its replica took over');
finish_load($load, 'failovers');
check_end('failovers');
$p2->restart;
cluster_wait_ok($cl, 90);

# ---- a primary down with no replica: CLUSTERDOWN until it is back -----------------

my ($p3) = grep { $_ != $r1 && $_ != $r2 } cluster_primaries($cl);
my $r3 = replica_of($p3);
$r3->stop;
$p3->stop;
ok( wait_for(sub { redis_cmd($r1, 'CLUSTER', 'INFO') =~ /cluster_state:fail/ }, 60),
	'the cluster is down');
sql('UPDATE wt SET v = v + 1 WHERE id <= 50');
sql('UPDATE items SET v = v + 1 WHERE id <= 50');
is(sql("SELECT cachekit_wait('5 s')"), 'f', 'nothing delivered while the cluster is down');
like(cachekit_stats($node)->{last_error}, qr/CLUSTERDOWN|connect|refused|reach/i,
	'the last error tells why');
$p3->restart;
$r3->restart;
cluster_wait_ok($cl, 90);
check_end('node down');

$node->stop;
done_testing();
