# test/t/165_clients.pl -- the lease client helpers (clients/node with
# ioredis, clients/python with redis-py) against real servers: a
# redis-server that a real PostgreSQL with cachekit delivers to, a Sentinel
# monitoring it, and a Redis Cluster of 3 primaries (redis-cli --cluster
# create). Runs node's test runner and pytest; each must pass.
#
# node_modules (ioredis, from clients/node/package-lock.json) is installed
# into the build folder by test/setup.sh.

use strict;
use warnings;

use File::Path qw(mkpath);
use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $src = $ENV{TESTDIR} // '.';
my $python = '/usr/bin/python3';

# ---- the tools ---------------------------------------------------------------

my ($node_version) = `node --version 2>/dev/null` =~ /^v(\d+)\./;
BAIL_OUT('node is not installed: the client tests need Node.js 20 (test/setup.sh checks for it)')
  unless $node_version;
cmp_ok($node_version, '>=', 18, "node is recent enough (v$node_version)");
ok(-d "$src/clients/node/node_modules/ioredis",
	'ioredis is installed in the build folder (npm ci by test/setup.sh)')
  or BAIL_OUT('clients/node/node_modules/ioredis missing');
is(system($python, '-c', 'import redis, pytest'), 0, 'python3-redis and python3-pytest are installed')
  or BAIL_OUT('python3-redis or python3-pytest missing');

# ---- Redis: a primary, a Sentinel, a cluster -----------------------------------

my $redis = start_redis();

my $sentinel_dir = "$PostgreSQL::Test::Utils::tmp_check/sentinel_165";
mkpath($sentinel_dir);
my $sentinel_conf = "$sentinel_dir/sentinel.conf";
open my $fh, '>', $sentinel_conf or die "cannot write $sentinel_conf: $!";
print $fh "sentinel monitor ckprimary 127.0.0.1 $redis->{port} 1\n",
  "sentinel down-after-milliseconds ckprimary 60000\n";
close $fh;
my $sentinel = start_redis(dir => $sentinel_dir, conf => $sentinel_conf, args => ['--sentinel']);
ok( wait_for(
		sub {
			redis_cmd($sentinel, 'SENTINEL', 'get-master-addr-by-name', 'ckprimary') =~
			  /^127\.0\.0\.1\n$redis->{port}$/;
		},
		60),
	'the Sentinel knows the primary');

# the cluster bus port is a free port too (the default, port + 10000, may be taken)
my @cluster = map {
	start_redis(args => [ '--cluster-enabled', 'yes',
			'--cluster-port', PostgreSQL::Test::Cluster::get_free_port() ])
} 1 .. 3;
my ($rc, $out, $err) = ('', '', '');
IPC::Run::run(
	[ 'redis-cli', '--cluster', 'create', (map { "127.0.0.1:$_->{port}" } @cluster),
		'--cluster-replicas', '0', '--cluster-yes' ],
	'<', \'', '>', \$out, '2>', \$err, IPC::Run::timeout(120));
is($?, 0, 'redis-cli --cluster create made a cluster of 3 primaries') or diag "$out\n$err";
ok( wait_for(
		sub {
			!grep { redis_cmd($_, 'CLUSTER', 'INFO') !~ /cluster_state:ok/ } @cluster;
		},
		120),
	'every cluster node says cluster_state:ok');

# ---- PostgreSQL with cachekit ------------------------------------------------

my $node = new_cachekit_node('clients', $redis);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');
$node->safe_psql(
	'postgres', q{
	CREATE TABLE items(id int PRIMARY KEY, v int NOT NULL, grp int NOT NULL);
	CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('item:{id}', 'tag=grp:{grp}');
	CREATE TABLE wt(id int PRIMARY KEY, v int NOT NULL);
	CREATE TRIGGER wt_cache AFTER INSERT OR UPDATE OR DELETE ON wt
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}', 'ttl=300');
});

local $ENV{CK_REDIS_PORT}    = $redis->{port};
local $ENV{CK_SENTINEL_PORT} = $sentinel->{port};
local $ENV{CK_SENTINEL_NAME} = 'ckprimary';
local $ENV{CK_CLUSTER_PORTS} = join(',', map { $_->{port} } @cluster);
local $ENV{CK_PGHOST}        = $node->host;
local $ENV{CK_PGPORT}        = $node->port;

# run a test program in a folder; its output goes to the test log
sub run_in
{
	my ($dir, $name, @cmd) = @_;
	my ($o, $e) = ('', '');
	my $ok = eval {
		IPC::Run::run(\@cmd, '<', \'', '>', \$o, '2>', \$e,
			init => sub { chdir $dir or die "chdir $dir: $!" },
			IPC::Run::timeout(600));
		1;
	};
	my $status = $ok ? $? : -1;
	note "$name output:\n$o\n$e";
	is($status, 0, "$name passes") or diag "$o\n$e" . ($ok ? '' : $@);
	return $o;
}

my $node_out = run_in("$src/clients/node", 'node client tests (node --test)',
	'node', '--test', 'test/');
like($node_out, qr/^# fail 0$/m, 'node: no test failed');
unlike($node_out, qr/^# (skipped|cancelled) [1-9]/m, 'node: none skipped or cancelled');

my $py_out = run_in("$src/clients/python", 'python client tests (pytest)',
	$python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rs', 'test_cachekit_lease.py');
unlike($py_out, qr/\bskipped\b/, 'python: none skipped');

done_testing();
