# test/t/111_sentinel_failover.pl -- Sentinel failovers under pgbench write
# load: first SENTINEL FAILOVER (the master is demoted: READONLY, killed
# connections), then the new master's process is killed (Sentinel notices
# and promotes a replica). Each time delivery resumes on the new master
# within 2 s of Sentinel's switch (from the Sentinel's log to the worker's
# log), and at the end every key of the table is either gone or equal to
# its row on the final master: nothing delivered was lost by a failover.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::Local;

use CachekitTest;
use CachekitNet;
use CachekitFault;

my $group = start_sentinel_group(replicas => 2);
my %by_port = map { $_->port => $_ } $group->{master}, @{ $group->{replicas} };

my $node = new_cachekit_node('failover', sentinel_url($group));
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_redis_connected($node, 'postgres', 60), 'connected through Sentinel');

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $NROWS = 200;
sql(qq{
	CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, version int NOT NULL DEFAULT 0);
	CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=item:{id}', 'tag=items');
	INSERT INTO items SELECT g, g FROM generate_series(1, $NROWS) g;
});
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'initial rows delivered');

my $script = $node->basedir . '/update.sql';
append_to_file($script, <<'EOF');
\set id random(1, 200)
\set v random(1, 1000000)
UPDATE items SET v = :v, version = version + 1 WHERE id = :id;
EOF

sub start_load
{
	my ($secs) = @_;
	my @cmd = ('pgbench', '--no-vacuum', '-h', $node->host, '-p', $node->port,
		'-c', 4, '-j', 4, '-T', $secs, '-R', 400, '-f', $script, 'postgres');
	my %w = (out => '', err => '');
	$w{h} = IPC::Run::start(\@cmd, '<', \undef, '>', \$w{out}, '2>', \$w{err},
		IPC::Run::timeout($secs + 120));
	return \%w;
}

sub master_port { return sentinel_master_port($group); }

# a Redis log time "01 Dec 2026 01:45:15.834" or a PostgreSQL one
# "2026-12-01 01:45:15.834 UTC", in seconds
my %MON = (Jan => 0, Feb => 1, Mar => 2, Apr => 3, May => 4, Jun => 5,
	Jul => 6, Aug => 7, Sep => 8, Oct => 9, Nov => 10, Dec => 11);
sub redis_time
{
	my ($d, $mon, $y, $h, $mi, $s, $ms) = $_[0] =~ /(\d+) (\w+) (\d+) (\d+):(\d+):(\d+)\.(\d+)/;
	return timegm($s, $mi, $h, $d, $MON{$mon}, $y) + $ms / 1000;
}
sub pg_time
{
	my ($y, $mon, $d, $h, $mi, $s, $ms) = $_[0] =~ /(\d+)-(\d+)-(\d+) (\d+):(\d+):(\d+)\.(\d+)/;
	return timegm($s, $mi, $h, $d, $mon - 1, $y) + $ms / 1000;
}

# Wait for the Sentinels to agree on a new master; check the worker follows
# it within 2 s of the first Sentinel's switch to it. Returns its port.
sub follows_switch
{
	my ($label, $old_port, $offset) = @_;
	my $new_port;
	ok( wait_for(
			sub {
				my %named = map {
					(split /\n/, redis_cmd($_, 'SENTINEL', 'get-master-addr-by-name', 'mymaster'))[1] => 1
				} @{ $group->{sentinels} };
				($new_port) = keys %named;
				keys %named == 1 && $new_port ne $old_port;
			},
			90),
		"$label: the Sentinels agree on a new master");
	my $switch;
	for my $s (@{ $group->{sentinels} })
	{
		for my $l (split /\n/, slurp_file($s->{log}))
		{
			next unless $l =~ /\+switch-master mymaster 127\.0\.0\.1 \d+ 127\.0\.0\.1 $new_port\b/;
			my $t = redis_time($l);
			$switch = $t if !defined $switch || $t < $switch;
		}
	}
	ok(defined $switch, "$label: the Sentinels logged the switch");
	my $line;
	ok( wait_for(
			sub {
				($line) = log_since($node, $offset) =~
				  /^(.*cachekit worker reconnected to Redis at 127\.0\.0\.1:$new_port\/0.*)$/m;
				defined $line;
			},
			60),
		"$label: the worker reconnected to the new master");
	my $delay = pg_time($line // '') - ($switch // 0);
	note sprintf('%s: delivery resumed %.3f s after the switch', $label, $delay);
	cmp_ok($delay, '<=', 2.0, "$label: within 2 s of Sentinel's switch");
	return $new_port;
}

# ---- 1: SENTINEL FAILOVER under load ---------------------------------------------

my $load = start_load(45);
sleep 3;
my $old = master_port();
my $offset = log_offset($node);
redis_cmd($group->{sentinels}[0], 'SENTINEL', 'FAILOVER', 'mymaster');
my $new = follows_switch('SENTINEL FAILOVER', $old, $offset);

# the demoted master is a replica again before the next failover
ok( wait_for(
		sub {
			redis_cmd($by_port{$old}, 'INFO', 'replication') =~ /role:slave/
			  && redis_cmd($by_port{$old}, 'INFO', 'replication') =~ /master_link_status:up/;
		},
		60),
	'the old master follows the new one');

# ---- 2: the master's process killed under load ------------------------------------

sleep 7;    # Sentinel starts no new failover of a master within 2 x failover-timeout
$offset = log_offset($node);
$by_port{$new}->crash;
my $third = follows_switch('master killed', $new, $offset);

$load->{h}->finish;
is($? >> 8, 0, 'pgbench exited normally') or diag $load->{err};
like($load->{out}, qr/number of transactions actually processed: [1-9]/, 'the load committed transactions');

# ---- the end check on the final master -------------------------------------------------

ok(sql("SELECT cachekit_wait('120 s')") eq 't', 'the queue drained');
my $final = $by_port{$third};
my @keys = grep { /^item:\d+$/ } redis_keys($final, 'item:*');
my %value;
if (@keys)
{
	my @vals = split /\n/, redis_cmd($final, 'MGET', @keys), -1;
	@value{@keys} = @vals;
}
my %row = map { my ($id, $j) = split /\|/, $_, 2; ("item:$id" => $j) }
  split /\n/, sql(q{SELECT id || '|' || to_jsonb(i)::text FROM items i});
my @bad;
for my $k (sort keys %value)
{
	next if defined $row{$k} && sql("SELECT '$value{$k}'::jsonb = '$row{$k}'::jsonb") eq 't';
	push @bad, "$k: redis $value{$k}, row " . ($row{$k} // '(none)');
}
is(scalar @bad, 0, 'every key on the final master is gone or equal to its row')
  or diag join("\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);
note scalar(@keys) . " of $NROWS keys present at the end";
is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', 'nothing went to the dead letters');

$node->stop;
done_testing();
