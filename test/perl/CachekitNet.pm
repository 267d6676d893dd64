# test/perl/CachekitNet.pm -- the Redis deployments production runs, made
# on loopback for the tests: certificates (made with the openssl command),
# a redis-server with a TLS port (with or without client certificates), a
# redis-server on a unix socket, and a master with a replica watched by
# three Sentinels.
#
#   my $pki   = make_pki("$tmp/pki");           # CA, server and client certs
#   my $r     = start_tls_redis($pki, auth_clients => 1);
#   my $url   = tls_url($r);                     # rediss://127.0.0.1:TLSPORT/0
#   my $u     = start_unix_redis();              # $u->{socket}
#   my $group = start_sentinel_group();          # {master, replica, sentinels}
#   my $surl  = sentinel_url($group);            # redis-sentinel://...#mymaster
#   my $cl    = start_cluster(pki => $pki);      # 3 primaries + 3 replicas
#   my $curl  = cluster_url($cl);                # rediss://h:p1,h:p2,h:p3/
#
# Every server is a CachekitTest::Redis (start_redis): it keeps its plain
# port on 127.0.0.1, so redis_cmd works on it as on any other, and it is
# stopped when the test ends.

package CachekitNet;

use strict;
use warnings;

use Carp;
use Exporter 'import';
use File::Path qw(mkpath);
use File::Temp ();
use IPC::Run;
use Time::HiRes;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

our @EXPORT = qw(
  make_pki make_cert_pair start_tls_redis tls_url start_unix_redis
  start_sentinel_group sentinel_url sentinel_master_port expect_outage
  start_cluster cluster_url cluster_primaries cluster_cli cluster_keys
  cluster_node_of cluster_wait_ok cluster_get cluster_check_rows cluster_quote
);

my $MASTER_NAME = 'mymaster';

# run one openssl command, dying with its output if it fails
sub _openssl
{
	my (@args) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'openssl', @args ], '<', \undef, '>', \$out, '2>', \$err)
	  or croak "openssl @args failed: $err";
	return $out;
}

=pod

=item make_cert_pair($dir, $name, $ca, $subject_alt_names)

Makes $dir/$name.key (mode 0600) and $dir/$name.crt, signed by $ca (a hash
with crt and key) or self-signed as a CA when $ca is undef. Returns
{ crt => ..., key => ... }.

=cut

sub make_cert_pair
{
	my ($dir, $name, $ca, $san) = @_;
	my %pair = (crt => "$dir/$name.crt", key => "$dir/$name.key");
	my @newkey = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes');

	if (!defined $ca)
	{
		_openssl('req', '-x509', @newkey, '-keyout', $pair{key}, '-out', $pair{crt},
			'-days', '30', '-subj', "/CN=cachekit test $name");
	}
	else
	{
		my $ext = "$dir/$name.ext";
		PostgreSQL::Test::Utils::append_to_file($ext,
			($san ? "subjectAltName=$san\n" : '') . "basicConstraints=CA:FALSE\n");
		_openssl('req', @newkey, '-keyout', $pair{key}, '-out', "$dir/$name.csr",
			'-subj', "/CN=cachekit test $name");
		_openssl('x509', '-req', '-in', "$dir/$name.csr", '-CA', $ca->{crt},
			'-CAkey', $ca->{key}, '-CAcreateserial', '-out', $pair{crt},
			'-days', '30', '-extfile', $ext);
	}
	chmod 0600, $pair{key};
	return \%pair;
}

=pod

=item make_pki($dir)

A CA, a server certificate for localhost, 127.0.0.1 and redis.test, a client
certificate, and a second CA that signed neither (for "wrong CA"). Returns
{ ca, server, client, other_ca } (each { crt, key }).

=cut

sub make_pki
{
	my ($dir) = @_;
	mkpath($dir);
	my %pki;
	$pki{ca}       = make_cert_pair($dir, 'ca');
	$pki{server}   = make_cert_pair($dir, 'server', $pki{ca},
		'DNS:localhost,IP:127.0.0.1,DNS:redis.test');
	$pki{client}   = make_cert_pair($dir, 'client', $pki{ca}, 'DNS:cachekit-worker');
	$pki{other_ca} = make_cert_pair($dir, 'other_ca');
	$pki{dir}      = $dir;
	return \%pki;
}

=pod

=item start_tls_redis($pki, %opts)

A redis-server with a TLS port ($r->{tls_port}) besides its plain port.
Options: auth_clients => 1 (client certificates required), password, args.

=cut

sub start_tls_redis
{
	my ($pki, %opts) = @_;
	my $tls_port = PostgreSQL::Test::Cluster::get_free_port();
	my $r = start_redis(
		password => $opts{password},
		args     => [
			'--tls-port'          => $tls_port,
			'--tls-cert-file'     => $pki->{server}{crt},
			'--tls-key-file'      => $pki->{server}{key},
			'--tls-ca-cert-file'  => $pki->{ca}{crt},
			'--tls-auth-clients'  => ($opts{auth_clients} ? 'yes' : 'no'),
			@{ $opts{args} // [] } ]);
	$r->{tls_port} = $tls_port;
	return $r;
}

=pod

=item tls_url($r [, $host [, $db]])

rediss://[:password@]HOST:TLSPORT/DB (host default 127.0.0.1).

=cut

sub tls_url
{
	my ($r, $host, $db) = @_;
	my $auth = defined $r->{password} ? ":$r->{password}@" : '';
	return sprintf('rediss://%s%s:%d/%d', $auth, $host // '127.0.0.1', $r->{tls_port}, $db // 0);
}

=pod

=item start_unix_redis(%opts)

A redis-server listening on a unix socket too ($r->{socket}, in a short
private folder: socket paths are limited to 107 bytes).

=cut

sub start_unix_redis
{
	my (%opts) = @_;
	my $sockdir = File::Temp::tempdir('ck_sock_XXXX', TMPDIR => 1, CLEANUP => 1);
	my $socket = "$sockdir/redis.sock";
	my $r = start_redis(
		password => $opts{password},
		args     => [ '--unixsocket' => $socket, '--unixsocketperm' => '700',
			@{ $opts{args} // [] } ]);
	$r->{socket} = $socket;
	return $r;
}

=pod

=item start_sentinel_group(%opts)

A master, a replica of it (or "replicas" of them), and three Sentinels monitoring the master as
"mymaster" (quorum 2, down after 1 s). Options: tls => $pki (every server
also gets a TLS port, and the replica and Sentinels talk TLS to them),
sentinel_password (the Sentinels require it), password (the master's and
replica's). Returns { master, replica, replicas => [...], sentinels => [...], name }.

=cut

sub start_sentinel_group
{
	my (%opts) = @_;
	my $pki = $opts{tls};
	my @auth = defined $opts{password}
	  ? ('--masterauth' => $opts{password}) : ();
	my $start = sub {
		my (@args) = @_;
		return $pki
		  ? start_tls_redis($pki, password => $opts{password},
			args => [ '--tls-replication' => 'yes', @auth, @args ])
		  : start_redis(password => $opts{password}, args => [ @auth, @args ]);
	};
	my $master = $start->();
	my $mport = $pki ? $master->{tls_port} : $master->port;
	my $nreplicas = $opts{replicas} // 1;
	my @replicas = map { $start->('--replicaof' => '127.0.0.1', $mport) } 1 .. $nreplicas;
	ok( wait_for(
			sub {
				!grep { redis_cmd($_, 'INFO', 'replication') !~ /master_link_status:up/ } @replicas;
			},
			60),
		'sentinel group: the replicas are in sync');

	my @sentinels;
	for my $i (1 .. 3)
	{
		my $dir = "$PostgreSQL::Test::Utils::tmp_check/sentinel_" . $$ . "_" . int(rand(1e9));
		mkpath($dir);
		my $conf = "$dir/sentinel.conf";
		my $text = "sentinel monitor $MASTER_NAME 127.0.0.1 $mport 2\n"
		  . "sentinel down-after-milliseconds $MASTER_NAME 1000\n"
		  . "sentinel failover-timeout $MASTER_NAME 3000\n"
		  . "sentinel parallel-syncs $MASTER_NAME 1\n";
		$text .= "sentinel auth-pass $MASTER_NAME $opts{password}\n" if defined $opts{password};
		$text .= "requirepass \"$opts{sentinel_password}\"\nsentinel sentinel-pass \"$opts{sentinel_password}\"\n"
		  if defined $opts{sentinel_password};
		if ($pki)
		{
			my $tport = PostgreSQL::Test::Cluster::get_free_port();
			$text .= "tls-port $tport\ntls-replication yes\n"
			  . "tls-cert-file $pki->{server}{crt}\ntls-key-file $pki->{server}{key}\n"
			  . "tls-ca-cert-file $pki->{ca}{crt}\ntls-auth-clients no\n";
			PostgreSQL::Test::Utils::append_to_file($conf, $text);
			my $s = start_redis(conf => $conf, sentinel => 1, dir => $dir,
				password => $opts{sentinel_password});
			$s->{tls_port} = $tport;
			push @sentinels, $s;
			next;
		}
		PostgreSQL::Test::Utils::append_to_file($conf, $text);
		push @sentinels, start_redis(conf => $conf, sentinel => 1, dir => $dir,
			password => $opts{sentinel_password});
	}
	my $group = { master => $master, replica => $replicas[0], replicas => \@replicas,
		sentinels => \@sentinels,
		name => $MASTER_NAME, tls => $pki };
	ok(wait_for(
			sub {
				for my $s (@sentinels)
				{
					my $info = redis_cmd($s, 'SENTINEL', 'MASTER', $MASTER_NAME);
					return 0 unless $info =~ /num-other-sentinels\n2\b/
					  && $info =~ /num-slaves\n$nreplicas\b/;
				}
				return 1;
			},
			60),
		'sentinel group: every Sentinel sees the replica and the two others');
	return $group;
}

=pod

=item sentinel_url($group, %opts)

redis-sentinel://[:password@]127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/0#mymaster
(rediss-sentinel:// and the TLS ports for a TLS group). Options: password,
db, name, query (text after '?'), sentinels (a list of ports to use instead).

=cut

sub sentinel_url
{
	my ($group, %opts) = @_;
	my $tls = $group->{tls};
	my @ports = @{ $opts{sentinels}
		  // [ map { $tls ? $_->{tls_port} : $_->port } @{ $group->{sentinels} } ] };
	my $auth = defined $opts{password} ? ":$opts{password}@" : '';
	return sprintf('%s://%s%s/%d%s#%s', $tls ? 'rediss-sentinel' : 'redis-sentinel', $auth,
		join(',', map { "127.0.0.1:$_" } @ports), $opts{db} // 0,
		defined $opts{query} ? "?$opts{query}" : '', $opts{name} // $MASTER_NAME);
}

=pod

=item expect_outage($node, $label, $re, $apply)

Runs $apply (which breaks the connection, e.g. by a setting and a reload),
then checks that last_error matches $re while redis_connected is false,
that the worker keeps retrying (failed_attempts grows), and that the log
got exactly one "cannot reach Redis" line, which matches $re too. Returns
the cachekit_stats row seen.

=cut

sub expect_outage
{
	my ($node, $label, $re, $apply) = @_;
	my $offset = -s $node->logfile;
	$apply->();
	my $st;
	ok( wait_for(
			sub {
				$st = cachekit_stats($node);
				($st->{last_error} // '') =~ $re && $st->{redis_connected} eq 'false';
			},
			60),
		"$label: last_error says why")
	  or diag 'last_error: ' . ($st->{last_error} // '(none)');
	my $failed = $st->{failed_attempts};
	ok(wait_for(sub { cachekit_stats($node)->{failed_attempts} >= $failed + 3 }, 60),
		"$label: the worker keeps retrying");
	my @lines = grep { /cachekit worker cannot reach Redis/ } split /\n/,
	  PostgreSQL::Test::Utils::slurp_file($node->logfile, $offset);
	is(scalar @lines, 1, "$label: one log line for the outage");
	like($lines[0] // '', $re, "$label: the log line says why");
	return $st;
}

=pod

=item sentinel_master_port($group)

The port the first Sentinel names for the master now.

=cut

sub sentinel_master_port
{
	my ($group) = @_;
	my $out = redis_cmd($group->{sentinels}[0], 'SENTINEL', 'get-master-addr-by-name', $MASTER_NAME);
	my (undef, $port) = split /\n/, $out;
	return $port;
}


=pod

=item start_cluster(%opts)

A Redis Cluster made like production makes one: redis-server nodes with
--cluster-enabled yes joined by redis-cli --cluster create. Options:
primaries (3), replicas per primary (1), pki (TLS on every node, the
cluster bus and replication too: tls-cluster, tls-replication), args.
Returns {nodes => [...], pki}; every node also keeps its plain port for
redis_cmd. Waits until every node says cluster_state:ok.

=cut

sub start_cluster
{
	my (%opts) = @_;
	my $primaries = $opts{primaries} // 3;
	my $replicas  = $opts{replicas}  // 1;
	my $pki       = $opts{pki};
	my @args = ('--cluster-enabled', 'yes', '--cluster-node-timeout', $opts{node_timeout} // 2000,
		@{ $opts{args} // [] });
	# the cluster bus port is a free port too (not the default port + 10000)
	my @nodes = map {
		my @bus = ('--cluster-port', PostgreSQL::Test::Cluster::get_free_port());
		$pki
		  ? start_tls_redis($pki,
			args => [ @args, @bus, '--tls-cluster', 'yes', '--tls-replication', 'yes' ])
		  : start_redis(args => [ @args, @bus ])
	} 1 .. $primaries * (1 + $replicas);
	my $cl = { nodes => \@nodes, pki => $pki };
	my @create = ('redis-cli', _cli_tls($cl), '--cluster', 'create',
		(map { '127.0.0.1:' . _node_port($cl, $_) } @nodes),
		'--cluster-replicas', $replicas, '--cluster-yes');
	my ($out, $err) = ('', '');
	IPC::Run::run(\@create, '<', \'', '>', \$out, '2>', \$err, IPC::Run::timeout(180));
	croak "redis-cli --cluster create failed:\n$out\n$err" if $?;
	cluster_wait_ok($cl, 120) or croak "the cluster did not reach cluster_state:ok";
	return $cl;
}

# the port clients (and the cluster bus) use: the TLS one on a TLS cluster
sub _node_port
{
	my ($cl, $r) = @_;
	return $cl->{pki} ? $r->{tls_port} : $r->{port};
}

# redis-cli options to reach a TLS cluster
sub _cli_tls
{
	my ($cl) = @_;
	return () unless $cl->{pki};
	return ('--tls', '--cacert', $cl->{pki}{ca}{crt});
}

=pod

=item cluster_wait_ok($cl, $timeout)

Waits until every running node says cluster_state:ok and knows all 16384
slots; true if they did in time.

=cut

sub cluster_wait_ok
{
	my ($cl, $timeout) = @_;
	return wait_for(
		sub {
			for my $r (grep { $_->running } @{ $cl->{nodes} })
			{
				my ($rc, $info) = redis_try_cmd($r, 'CLUSTER', 'INFO');
				return 0
				  unless $rc == 0
				  && $info =~ /cluster_state:ok/
				  && $info =~ /cluster_slots_ok:16384/;
			}
			return 1;
		},
		$timeout // 120);
}

=pod

=item cluster_url($cl [, @nodes])

redis:// (rediss:// on a TLS cluster) URL listing the nodes as seeds
(default: all of them).

=cut

sub cluster_url
{
	my ($cl, @nodes) = @_;
	@nodes = @{ $cl->{nodes} } unless @nodes;
	return ($cl->{pki} ? 'rediss://' : 'redis://')
	  . join(',', map { '127.0.0.1:' . _node_port($cl, $_) } @nodes) . '/';
}

=pod

=item cluster_primaries($cl)

The running nodes that are primaries serving slots now.

=cut

sub cluster_primaries
{
	my ($cl) = @_;
	return grep {
		my ($rc, $nodes) = redis_try_cmd($_, 'CLUSTER', 'NODES');
		my ($me) = grep { /myself/ } split /\n/, $nodes;
		$rc == 0 && $me && $me =~ /master/ && scalar(split / /, $me) > 8;
	} grep { $_->running && !$_->{paused} } @{ $cl->{nodes} };
}

=pod

=item cluster_cli($cl, $stdin, @args)

redis-cli -c (following redirections) against a running node; with
$stdin, one command per line is read from it (redis-cli's quoting:
"\x00" and the like). Returns the output.

=cut

sub cluster_cli
{
	my ($cl, $stdin, @args) = @_;
	my ($r) = grep { $_->running && !$_->{paused} } @{ $cl->{nodes} };
	my @cmd = ('redis-cli', '-c', '-h', '127.0.0.1', '-p', $r->{port}, '--raw', @args);
	my ($out, $err) = ('', '');
	my $in = $stdin // '';
	IPC::Run::run(\@cmd, '<', \$in, '>', \$out, '2>', \$err, IPC::Run::timeout(120));
	croak "redis-cli -c failed: @cmd\n$err$out" if $?;
	$out =~ s/^-> Redirected to slot .*\n//mg;
	$out =~ s/\n\z//;
	return $out;
}

=pod

=item cluster_keys($cl, $pattern)

Sorted keys matching $pattern over every primary.

=cut

sub cluster_keys
{
	my ($cl, $pattern) = @_;
	return sort map { redis_keys($_, $pattern) } cluster_primaries($cl);
}

=pod

=item cluster_node_of($cl, $key)

The primary serving a key's slot now.

=cut

sub cluster_node_of
{
	my ($cl, $key) = @_;
	my ($any) = grep { $_->running } @{ $cl->{nodes} };
	my $slot = redis_cmd($any, 'CLUSTER', 'KEYSLOT', $key);
	for my $r (cluster_primaries($cl))
	{
		return $r if _serves($r, $slot);
	}
	return undef;
}

# does a primary serve a slot (its own line of CLUSTER NODES lists it)?
sub _serves
{
	my ($r, $slot) = @_;
	my ($me) = grep { /myself/ } split /\n/, redis_cmd($r, 'CLUSTER', 'NODES');
	my @f = split / /, $me;
	for my $range (@f[ 8 .. $#f ])
	{
		next if $range =~ /^\[/;
		my ($lo, $hi) = split /-/, $range;
		$hi //= $lo;
		return 1 if $slot >= $lo && $slot <= $hi;
	}
	return 0;
}

=pod

=item cluster_quote($string)

A string quoted for a redis-cli command line read from stdin.

=cut

sub cluster_quote
{
	my ($s) = @_;
	$s =~ s/(["\\])/\\$1/g;
	$s =~ s/\t/\\t/g;
	$s =~ s/\n/\\n/g;
	return "\"$s\"";
}

=pod

=item cluster_get($cl, @keys)

The values of keys (undef when missing), read with redis-cli -c.

=cut

sub cluster_get
{
	my ($cl, @keys) = @_;
	my %v;
	return \%v unless @keys;
	my $in = join('', map { 'EXISTS ' . cluster_quote($_) . "\nGET " . cluster_quote($_) . "\n" } @keys);
	my @out = split /\n/, cluster_cli($cl, $in), -1;
	for my $k (@keys)
	{
		my ($exists, $val) = splice(@out, 0, 2);
		$v{$k} = $exists eq '1' ? $val : undef;
	}
	return \%v;
}

=pod

=item cluster_check_rows($node, $cl, $table, $prefix)

Every key "$prefix<id>" in the cluster is equal to to_jsonb of its row of
$table (by id); returns the list of mismatches (empty when all are).

=cut

sub cluster_check_rows
{
	my ($node, $cl, $table, $prefix) = @_;
	my @keys = grep { /^\Q$prefix\E\d+$/ } cluster_keys($cl, "$prefix*");
	my $vals = cluster_get($cl, @keys);
	my @bad;
	for my $k (@keys)
	{
		my ($id) = $k =~ /(\d+)$/;
		my $v = $vals->{$k} // next;
		my $same = $node->safe_psql('postgres',
			"SELECT coalesce((SELECT to_jsonb(t) = \$v\$$v\$v\$::jsonb FROM $table t WHERE id = $id), false)");
		push @bad, "$k: $v" unless $same eq 't';
	}
	return @bad;
}

1;
