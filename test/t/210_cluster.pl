# test/t/210_cluster.pl -- Redis Cluster: 3 primaries + 3 replicas made by
# redis-cli --cluster create, first plain, then over TLS (cluster bus and
# replication too). Each time: cachekit finds the cluster from its seeds,
# routes every key to its slot's primary (its slot function agrees with
# CLUSTER KEYSLOT), deletes keys and flushes tags whose members live on all
# three primaries (one tag of 1,200 members, more than one drain chunk),
# writes through with tags in other slots, moves a key between tags, and
# handles {hash tags}, odd bytes and 10 kB keys; a flush cut short by an
# ACL refusal keeps the refused members and resumes. Every run ends with each
# key deleted or equal to its row, no private flush set left behind, and
# no dead letter.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;

my $pki = make_pki("$PostgreSQL::Test::Utils::tmp_check/pki_210");

my $node = new_cachekit_node('cluster', undef,
	'cachekit.redis_tls_ca_file' => $pki->{ca}{crt},
	'cachekit.retry_max_delay'   => '500ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub nkeys { my @k = cluster_keys(@_); return scalar @k; }

sql(q{
	CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, v int NOT NULL);
	CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
		FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('item:{id}', 'tag=grp:{grp}');
	CREATE TABLE wt (id int PRIMARY KEY, grp int NOT NULL, v text NOT NULL);
	CREATE TRIGGER wt_cache AFTER INSERT OR UPDATE OR DELETE ON wt
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}', 'tag=wgrp:{grp}', 'ttl=600');
	CREATE TABLE odd (id int PRIMARY KEY, k text NOT NULL);
	CREATE TRIGGER odd_cache AFTER INSERT OR UPDATE OR DELETE ON odd
		FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('{k}');
	CREATE TABLE ht (id int PRIMARY KEY, u int NOT NULL, v int NOT NULL);
	CREATE TRIGGER ht_cache AFTER INSERT OR UPDATE OR DELETE ON ht
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key={{user:{u}}}:post:{id}',
			'tag={{user:{u}}}:posts', 'tag=allposts');
});

# ---- the slot function, against Redis's own -----------------------------------

sub check_slots
{
	my ($cl) = @_;
	my @keys = ('123456789', '{123456789}x', 'a{123456789}{b}', '{}123456789',
		'{123456789', 'x}{123456789}', '{{a}}', 'a{}b{c}', '}{', 'user:1000',
		'{user1000}.following', "caf\x{c3}\x{a9}", ('k' x 300) . '{tag}');
	my @bad;
	for my $k (@keys)
	{
		my $theirs = cluster_cli($cl, undef, 'CLUSTER', 'KEYSLOT', $k);
		(my $q = $k) =~ s/'/''/g;
		my $ours = sql("SELECT cachekit_key_slot('$q')");
		push @bad, "$k: redis $theirs, cachekit $ours" if $theirs ne $ours;
	}
	is(scalar @bad, 0, 'cachekit_key_slot equals CLUSTER KEYSLOT (hash tags, {}, { without })')
	  or diag join("\n", @bad);
	is(sql("SELECT cachekit_key_slot('123456789')"), '12739', '"123456789" is slot 12739');
}

# ---- one run against a cluster --------------------------------------------------

sub run_cluster
{
	my ($label, $cl) = @_;

	$node->append_conf('postgresql.conf', "cachekit.redis_url = '" . cluster_url($cl) . "'\n");
	$node->reload;
	ok( wait_for(
			sub {
				my $s = cachekit_stats($node);
				$s->{redis_connected} eq 'true' && ($s->{redis_mode} // '') eq 'cluster';
			},
			60),
		"$label: the worker found the cluster from its seeds");
	my $stats = cachekit_stats($node);
	is($stats->{redis_nodes}, 3, "$label: cachekit_stats counts 3 primaries");
	ok(defined $stats->{slot_map_read_at}, "$label: the slot map was read");
	check_slots($cl);

	sql('TRUNCATE items, wt, odd, ht');
	sql("SELECT cachekit_wait('30 s')");

	# a reader's cache: item keys in tag sets, and one big tag
	my $in = '';
	for my $i (1 .. 120)
	{
		$in .= "SET item:$i cached\nSADD tag:grp:" . ($i % 4) . " item:$i\n";
	}
	$in .= "SET big:$_ cached\nSADD tag:big big:$_\n" for 1 .. 1200;
	cluster_cli($cl, $in);
	my @primaries = cluster_primaries($cl);
	is(scalar(grep { my @k = redis_keys($_, 'item:*'); @k > 0 } @primaries), 3,
		"$label: the cached items live on all three primaries");

	sql('INSERT INTO items SELECT g, g % 4, 0 FROM generate_series(1, 40) g');
	sql("SELECT cachekit_flush_tag('big')");
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: invalidations delivered");
	is(nkeys($cl, 'item:*'), 0,
		"$label: every item key is gone, those only its tags named too");
	is(nkeys($cl, 'big:*'), 0, "$label: all 1,200 members of a big tag are gone");
	is(nkeys($cl, 'tag:grp:*') + nkeys($cl, 'tag:big'), 0,
		"$label: the flushed tag sets are gone");
	is(nkeys($cl, 'cachekit:flushing:*'), 0,
		"$label: no private flush set is left");

	# write-through: values in the keys' slots, tag sets in theirs
	sql(q{INSERT INTO wt SELECT g, g % 3, 'v' || g FROM generate_series(1, 60) g});
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: writes delivered");
	is(nkeys($cl, 'wt:*'), 60, "$label: 60 values written");
	my @bad = cluster_check_rows($node, $cl, 'wt', 'wt:');
	is(scalar @bad, 0, "$label: every value equals its row") or diag join("\n", @bad);
	is(cluster_cli($cl, undef, 'SCARD', 'tag:wgrp:1'), 20, "$label: a tag set lists its 20 keys");
	like(cluster_cli($cl, undef, 'TTL', 'wt:5'), qr/^\d+$/, "$label: the ttl is set");

	sql(q{UPDATE wt SET grp = 7, v = v || '!' WHERE id <= 3});
	sql(q{DELETE FROM wt WHERE id BETWEEN 4 AND 6});
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: moves and deletes delivered");
	is(join(',', sort split /\n/, cluster_cli($cl, undef, 'SMEMBERS', 'tag:wgrp:7')),
		'wt:1,wt:2,wt:3', "$label: moved keys joined their new tag set");
	is(cluster_cli($cl, undef, 'SISMEMBER', 'tag:wgrp:1', 'wt:1'), '0',
		"$label: and left the old one");
	is(cluster_cli($cl, undef, 'SISMEMBER', 'tag:wgrp:1', 'wt:4'), '0',
		"$label: a deleted row's key left its tag set");
	is(nkeys($cl, 'wt:*'), 57, "$label: deleted rows' keys are gone");
	@bad = cluster_check_rows($node, $cl, 'wt', 'wt:');
	is(scalar @bad, 0, "$label: every value still equals its row") or diag join("\n", @bad);

	# flushing a write-through tag deletes its keys wherever they live
	sql("SELECT cachekit_flush_tag('wgrp:0')");
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: tag flush delivered");
	is(nkeys($cl, 'wt:*'), 39, "$label: the 18 keys of the flushed tag are gone");

	# hash tags: a user's posts and their set share a slot; a global tag does not
	sql('INSERT INTO ht SELECT g, g % 2, g FROM generate_series(1, 10) g');
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: hash-tagged writes delivered");
	is(cluster_cli($cl, undef, 'CLUSTER', 'KEYSLOT', '{user:1}:post:1'),
		cluster_cli($cl, undef, 'CLUSTER', 'KEYSLOT', 'tag:{user:1}:posts'),
		"$label: a hash-tagged key and its tag set share a slot");
	is(cluster_cli($cl, undef, 'SCARD', 'tag:{user:1}:posts'), 5, "$label: the user's set has 5 posts");
	is(cluster_cli($cl, undef, 'SCARD', 'tag:allposts'), 10, "$label: the global set has all 10");
	sql("SELECT cachekit_flush_tag('allposts')");
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: global tag flushed");
	is(nkeys($cl, '{user:*'), 0, "$label: every post key is gone");

	# odd bytes and 10 kB keys, in many slots
	my @odd = ("sp ace", "quo\"te", "tab\tkey", "caf\x{c3}\x{a9}", "{br}ace}", "{", "}{x",
		('x' x 10240) . '1', ('y' x 10240) . '{t}');
	cluster_cli($cl, join('', map { 'SET ' . cluster_quote($_) . " cached\n" } @odd));
	my $present = cluster_get($cl, @odd);
	is(scalar(grep { defined $present->{$_} } @odd), scalar @odd, "$label: odd keys cached");
	sql('INSERT INTO odd SELECT * FROM (VALUES ' . join(',', map {
		(my $sq = $odd[$_]) =~ s/'/''/g; "($_, '$sq')" } 0 .. $#odd) . ') v');
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: odd keys delivered");
	$present = cluster_get($cl, @odd);
	is(scalar(grep { defined $present->{$_} } @odd), 0,
		"$label: odd bytes, braces and 10 kB keys are deleted");

	is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', "$label: no dead letter");
}

my $plain = start_cluster();
run_cluster('plain', $plain);

# A flush cut short: a worker user whose ACL refuses some members' keys.
# Those members stay in the private set (it is in the tag's slot, they are
# not); the deleted one leaves it; once the ACL allows them the flush
# resumes, then flushes what joined the tag meanwhile.
my @pn = @{ $plain->{nodes} };
# (CLUSTER SHARDS refused too: the map is read with CLUSTER SLOTS, as from a
# Redis before 7)
redis_cmd($_, 'ACL', 'SETUSER', 'ck', 'on', '>ckpw', 'resetkeys', '~item:*', '~tag:*',
	'~cachekit:*', '+@all', '-cluster|shards') for @pn;
my $read_at = cachekit_stats($node)->{slot_map_read_at};
$node->append_conf('postgresql.conf',
	"cachekit.redis_url = 'redis://ck:ckpw\@127.0.0.1:" . $pn[0]->port . "/'\n");
my $log_offset = -s $node->logfile;
$node->reload;
ok(wait_for(sub { $node->log_contains('cachekit worker connected to Redis at Redis Cluster', $log_offset) },
	30), 'connected as an ACL user');
isnt(cachekit_stats($node)->{slot_map_read_at}, $read_at,
	'the slot map was read with CLUSTER SLOTS, CLUSTER SHARDS being refused');
cluster_cli($plain, "SET item:900 c\nSET locked:1 c\nSET locked:2 c\nSADD tag:lock item:900 locked:1 locked:2\n");
sql("SELECT cachekit_flush_tag('lock')");
ok(wait_for(sub { (cachekit_stats($node)->{last_error} // '') =~ /NOPERM/ }, 30),
	'members outside the ACL: the flush is refused');
my @priv = map { redis_keys($_, 'cachekit:flushing:*') } cluster_primaries($plain);
is(scalar @priv, 1, 'the private set remains');
like($priv[0], qr/^cachekit:flushing:\{[0-9a-z]+\}tag:lock$/, 'named with a hash tag of the tag set\'s slot');
is(cluster_cli($plain, undef, 'CLUSTER', 'KEYSLOT', $priv[0]),
	cluster_cli($plain, undef, 'CLUSTER', 'KEYSLOT', 'tag:lock'), 'in the tag set\'s slot');
is(join(',', sort split /\n/, cluster_cli($plain, undef, 'SMEMBERS', $priv[0])), 'locked:1,locked:2',
	'only the members whose delete was refused are left in it');
ok(!defined cluster_get($plain, 'item:900')->{'item:900'}, 'the member whose delete was acknowledged is gone');
cluster_cli($plain, "SET item:901 c\nSADD tag:lock item:901\n");
redis_cmd($_, 'ACL', 'SETUSER', 'ck', '~locked:*') for @pn;
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'the flush resumed and finished');
my $left = cluster_get($plain, 'locked:1', 'locked:2', 'item:901');
is(scalar(grep { defined } values %$left), 0, 'the refused members and the later one are gone');
is(nkeys($plain, 'cachekit:flushing:*') + nkeys($plain, 'tag:lock'), 0, 'no set is left');
is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', 'no dead letter');
$_->stop for @{ $plain->{nodes} };

my $tls = start_cluster(pki => $pki);
run_cluster('TLS', $tls);

# a manual failover over TLS: a replica takes over, writes follow it
my $redirects = cachekit_stats($node)->{redirects_followed};
my ($primary) = grep { my @k = redis_keys($_, 'wt:*'); @k > 0 } cluster_primaries($tls);
my ($replica_line) = split /\n/,
  redis_cmd($primary, 'CLUSTER', 'REPLICAS', redis_cmd($primary, 'CLUSTER', 'MYID'));
my ($rport) = $replica_line =~ /:(\d+)@/;
my ($replica) = grep { $_->{tls_port} == $rport || $_->port == $rport } @{ $tls->{nodes} };
redis_cmd($replica, 'CLUSTER', 'FAILOVER');
ok(wait_for(sub { redis_cmd($replica, 'INFO', 'replication') =~ /^role:master/m }, 60),
	'TLS: CLUSTER FAILOVER promoted a replica');
cluster_wait_ok($tls, 60);
sql(q{UPDATE wt SET v = v || '+'});
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'TLS: writes after the failover delivered');
my @bad = cluster_check_rows($node, $tls, 'wt', 'wt:');
is(scalar @bad, 0, 'TLS: every value equals its row after the failover') or diag join("\n", @bad);
is(nkeys($tls, 'wt:*'), 57, 'TLS: every row has its key again after the failover');
ok(cachekit_stats($node)->{redirects_followed} > $redirects, 'TLS: the worker followed MOVED to the new primary');
is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', 'TLS: no dead letter');

$node->stop;
done_testing();
