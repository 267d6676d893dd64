# test/t/221_databases_load.pl -- several served databases under load.
#
# Three databases with the extension, each with its own Redis
# (ALTER DATABASE ... SET cachekit.redis_url), written by pgbench at the same
# time. Meanwhile:
#  - a fourth database is created, served, renamed, copied (CREATE DATABASE
#    ... TEMPLATE) and dropped, while its worker is stuck on a Redis that
#    does not answer (SIGSTOP) with a backlog: ALTER DATABASE ... RENAME,
#    CREATE DATABASE ... TEMPLATE and DROP DATABASE neither fail nor wait
#    for the worker; the copy is served;
#  - the third database's Redis is stopped for 30 s: the other two keep
#    delivering. Their COMMIT -> gone latency is measured from timestamps:
#    the key names carry the commit's clock, Redis's MONITOR the delivery's.
#    The goal is a p99 of 5 ms on a quiet machine; the assertion is generous
#    (the test machine is shared), the figure is printed.
# At the end every queue is empty.

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

use CachekitTest;

my $secs = 75;          # length of the load
my @dbs  = qw(db1 db2 db3);
my %redis = map { $_ => start_redis() } @dbs;
my $r4 = start_redis();

my $node = new_cachekit_node('dbload', undef,
	'cachekit.database'        => '',
	'cachekit.max_databases'   => '6',
	'cachekit.retry_max_delay' => '200ms',
	'cachekit.command_timeout' => '60s',
	'max_worker_processes'     => '16');

sub sql { $node->safe_psql(@_) }

sub make_db
{
	my ($db, $redis) = @_;
	sql('postgres', "CREATE DATABASE $db");
	sql('postgres', qq{ALTER DATABASE $db SET cachekit.redis_url = '} . redis_url($redis) . q{'});
	sql($db, <<'SQL');
CREATE EXTENSION cachekit;
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
INSERT INTO items (id) SELECT g FROM generate_series(1, 1000) g;
CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('item:{id}');
SQL
}

sub delivers
{
	my ($db, $redis, $key) = @_;
	redis_cmd($redis, 'SET', $key, 'x');
	sql($db, qq{SELECT cachekit_delete('$key')});
	return wait_for(sub { !redis_exists($redis, $key) }, 60);
}

make_db($_, $redis{$_}) for @dbs;
ok(delivers($_, $redis{$_}, "$_:ready"), "$_ is served by its own Redis") for @dbs;

# ---- the load ------------------------------------------------------------------

my $seq = 0;
sub script
{
	my ($text) = @_;
	my $file = $node->basedir . '/script_' . ++$seq . '.sql';
	PostgreSQL::Test::Utils::append_to_file($file, $text);
	return $file;
}
my $writes = script(<<'EOF');
\set id random(1, 1000)
UPDATE items SET v = v + 1 WHERE id = :id;
EOF

my @bench;
sub pgbench
{
	my ($db, $file, $rate) = @_;
	my %b = (db => $db, out => '', err => '');
	my @cmd = ('pgbench', '--no-vacuum', '-h', $node->host, '-p', $node->port,
		'-c', 1, '-j', 1, '-T', $secs, '-R', $rate, '-f', $file, $db);
	$b{h} = IPC::Run::start(\@cmd, '<', \undef, '>', \$b{out}, '2>', \$b{err},
		IPC::Run::timeout($secs + 180));
	push @bench, \%b;
}

# the latency probes: the key names carry the clock just before the commit
my %monitor;
for my $db (@dbs)
{
	my $probe = script(<<"EOF");
SELECT cachekit_delete('lat:$db:' || (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
EOF
	if ($db ne 'db3')
	{
		my $file = $node->basedir . "/monitor_$db.txt";
		$monitor{$db} = { file => $file };
		$monitor{$db}{h} = IPC::Run::start(
			[ 'redis-cli', '-h', '127.0.0.1', '-p', $redis{$db}->port, 'monitor' ],
			'<', \undef, '>', $file, '2>', \my $err);
	}
	pgbench($db, $writes, 100);
	pgbench($db, $probe, 20);
}
my $load_start = time();
sleep(3);

# ---- a fourth database: created, renamed and dropped under load ----------------

make_db('db4', $r4);
ok(delivers('db4', $r4, 'db4:ready'), 'db4, created during the load, is served');
pause_redis($r4);
sql('db4', q{SELECT cachekit_delete('db4:backlog:' || g) FROM generate_series(1, 20000) g});
ok(wait_for(sub { sql('db4', q{SELECT state FROM pg_stat_activity WHERE backend_type = 'cachekit worker' AND datname = 'db4'}) eq 'active' }, 30),
	'db4\'s worker is busy with a Redis that does not answer');

my $t = time();
my ($rc, $out, $err) = $node->psql('postgres', 'ALTER DATABASE db4 RENAME TO db4r');
is($rc, 0, 'ALTER DATABASE ... RENAME of a served database with a busy worker succeeds') or diag $err;
my $rename_s = time() - $t;
cmp_ok($rename_s, '<', 20, 'and does not wait for the worker\'s Redis command to time out');
note sprintf('rename took %.2f s', $rename_s);
resume_redis($r4);
ok(wait_for(sub { sql('db4r', 'SELECT count(*) FROM cachekit_queue') eq '0' }, 120),
	'db4r is served again under its new name: its backlog is delivered');
ok(wait_for(sub { sql('db1', q{SELECT status FROM cachekit_databases WHERE datname = 'db4r'}) eq 'served' }, 30),
	'cachekit_databases lists it under its new name');

pause_redis($r4);
sql('db4r', q{SELECT cachekit_delete('db4:again:' || g) FROM generate_series(1, 20000) g});
ok(wait_for(sub { sql('db4r', q{SELECT state FROM pg_stat_activity WHERE backend_type = 'cachekit worker' AND datname = 'db4r'}) eq 'active' }, 30),
	'db4r\'s worker is busy again');

# a copy of it, while its worker is busy: the copy (with the backlog) is served too
$t = time();
($rc, $out, $err) = $node->psql('postgres', 'CREATE DATABASE db4copy TEMPLATE db4r');
is($rc, 0, 'CREATE DATABASE ... TEMPLATE of a served database with a busy worker succeeds') or diag $err;
cmp_ok(time() - $t, '<', 20, 'and does not wait for the worker\'s Redis command to time out');
ok(wait_for(sub { sql('db1', q{SELECT status FROM cachekit_databases WHERE datname = 'db4copy'}) eq 'served' }, 60),
	'the copy is served');
ok(wait_for(sub { sql('db1', q{SELECT status FROM cachekit_databases WHERE datname = 'db4r'}) eq 'served' }, 60),
	'db4r has its worker back (it cannot reach its Redis either)');
($rc, $out, $err) = $node->psql('postgres', 'DROP DATABASE db4copy');
is($rc, 0, 'DROP DATABASE of the copy succeeds') or diag $err;
$t = time();
($rc, $out, $err) = $node->psql('postgres', 'DROP DATABASE db4r');
is($rc, 0, 'DROP DATABASE of a served database with a busy worker succeeds') or diag $err;
my $drop_s = time() - $t;
cmp_ok($drop_s, '<', 20, 'and does not wait for the worker\'s Redis command to time out');
note sprintf('drop took %.2f s', $drop_s);
resume_redis($r4);
ok(wait_for(sub { sql('db1', q{SELECT count(*) FROM cachekit_databases WHERE datname = 'db4r'}) eq '0' }, 60),
	'the dropped database leaves cachekit_databases');

# ---- db3's Redis stopped for 30 s ----------------------------------------------

my $outage_start = time();
stop_redis($redis{db3});
sleep(30);
my $outage_end = time();
restart_redis($redis{db3});

for my $b (@bench)
{
	$b->{h}->finish;
	is($?, 0, "$b->{db}: pgbench exited normally") or diag $b->{err};
}
ok(delivers($_, $redis{$_}, "$_:after"), "$_ is delivering at the end") for @dbs;
for my $db (@dbs)
{
	ok(wait_for(sub { sql($db, 'SELECT count(*) FROM cachekit_queue') eq '0' }, 120),
		"$db: every entry delivered");
}
like(sql('db3', 'SELECT failed_attempts FROM cachekit_stats'), qr/^[1-9]/,
	'db3 saw its Redis fail meanwhile');

# ---- latencies of db1 and db2 --------------------------------------------------

sleep(1);
for my $db (sort keys %monitor)
{
	$monitor{$db}{h}->kill_kill;
	my (@all, @during);
	for my $line (split /\n/, slurp_file($monitor{$db}{file}))
	{
		next unless $line =~ /^(\d+\.\d+) /;
		my $at = $1;
		while ($line =~ /"lat:$db:(\d+)"/g)
		{
			my $committed = $1 / 1e6;
			my $ms = ($at - $committed) * 1000;
			push @all, $ms;
			push @during, $ms if $committed >= $outage_start && $committed <= $outage_end;
		}
	}
	my $p99 = sub {
		my @s = sort { $a <=> $b } @_;
		return @s ? $s[ int(0.99 * $#s) ] : undef;
	};
	cmp_ok(scalar(@during), '>', 100, "$db: latency samples while db3's Redis was down");
	my $p = $p99->(@during);
	note sprintf('%s: COMMIT -> gone p99 %.2f ms while db3\'s Redis was down (%d samples), %.2f ms overall (%d)',
		$db, $p // -1, scalar(@during), $p99->(@all) // -1, scalar(@all));
	# the goal is 5 ms; a shared machine gets a generous bound
	cmp_ok($p // 1e9, '<', 1000, "$db: p99 COMMIT -> gone while db3's Redis was down stays far below the outage");
}

$node->stop;
done_testing();
