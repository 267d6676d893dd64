# test/t/101_tls_hung_peer.pl -- a TLS handshake with a peer that accepted
# the TCP connection and then never answers (a stopped redis-server) must
# not hold anything up: the barrier of DROP DATABASE, a configuration reload
# and SIGTERM are all served during the handshake, long before
# cachekit.connect_timeout (set to ten minutes here) would end it.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;
use CachekitFault;

my $pki  = make_pki("$PostgreSQL::Test::Utils::tmp_check/pki_101");
my $good = start_tls_redis($pki);
my $hung = start_tls_redis($pki);
$hung->pause;

my $node = new_cachekit_node('hung', tls_url($hung),
	'cachekit.redis_tls_ca_file' => $pki->{ca}{crt},
	'cachekit.connect_timeout'   => '10min',
	'cachekit.command_timeout'   => '10min');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
$node->safe_psql('postgres', 'CREATE DATABASE other');
ok(wait_for_worker($node, 'postgres', 60), 'worker is up');

# the worker's TCP connection to the hung TLS port is established: the
# kernel accepted it, the stopped redis-server never answers the ClientHello
sub in_handshake
{
	my $out = `ss -Htn state established "( dport = :$hung->{tls_port} )"`;
	return $out =~ /\S/;
}

ok(wait_for(\&in_handshake, 60), 'the worker waits in a TLS handshake with the hung peer');
my $pid = worker_pid_activity($node);
ok(defined $pid, 'worker pid known');

# ---- DROP DATABASE waits for every process to absorb its barrier ----------------

my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE other', timeout => 60);
is($ret, 0, 'DROP DATABASE finished during the handshake') or diag $err;
ok(in_handshake(), 'the handshake is still hanging: the barrier was served inside it');
is(worker_pid_activity($node), $pid, 'by the same worker');

# ---- a reload is served: the attempt is given up, the new URL used --------------

my $offset = log_offset($node);
$node->safe_psql('postgres', "ALTER SYSTEM SET cachekit.redis_url = '" . tls_url($good) . "'");
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
ok(wait_for_redis_connected($node, 'postgres', 60), 'the reload moved the worker to the working Redis');
like(log_since($node, $offset), qr/connected to Redis at 127\.0\.0\.1:$good->{tls_port}\/0 over TLS/,
	'and it says so');
redis_cmd($good, 'SET', 'probe:1', 'x');
$node->safe_psql('postgres', q{SELECT cachekit_delete('probe:1')});
ok(wait_for(sub { !redis_exists($good, 'probe:1') }, 60), 'delivery works');

# ---- SIGTERM during the handshake -------------------------------------------------

$node->safe_psql('postgres', "ALTER SYSTEM SET cachekit.redis_url = '" . tls_url($hung) . "'");
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
ok(wait_for(\&in_handshake, 60), 'the worker is in a handshake with the hung peer again');
$pid = worker_pid_activity($node);
my $t0 = Time::HiRes::time();
kill 'TERM', $pid;
ok(wait_for(sub { !kill(0, $pid) }, 60), 'SIGTERM ended the worker during the handshake');
note sprintf('the worker exited %.2fs after SIGTERM', Time::HiRes::time() - $t0);
like(slurp_file($node->logfile), qr/terminating background worker "cachekit worker" due to administrator command/,
	'it was terminated by the signal');

$node->stop('fast');
$hung->resume;
done_testing();
