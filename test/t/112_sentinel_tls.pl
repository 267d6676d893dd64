# test/t/112_sentinel_tls.pl -- rediss-sentinel://: TLS to the Sentinels and
# to the master they name (a master, a replica and three Sentinels, all on
# TLS ports with a CA made here), and delivery through them.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;

my $pki   = make_pki("$PostgreSQL::Test::Utils::tmp_check/pki_112");
my $group = start_sentinel_group(tls => $pki);
my $url   = sentinel_url($group);
like($url, qr{^rediss-sentinel://127\.0\.0\.1:\d+,}, 'a rediss-sentinel:// URL');

my $node = new_cachekit_node('sentinel_tls', $url,
	'cachekit.redis_tls_ca_file' => $pki->{ca}{crt});
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_redis_connected($node, 'postgres', 60), 'connected through the Sentinels over TLS');
like(slurp_file($node->logfile),
	qr/connected to Redis at 127\.0\.0\.1:$group->{master}{tls_port}\/0 over TLS \(master "mymaster" named by Sentinel\)/,
	'to the master\'s TLS port');

redis_cmd($group->{master}, 'SET', 'st:1', 'x');
$node->safe_psql('postgres', q{SELECT cachekit_delete('st:1')});
ok(wait_for(sub { !redis_exists($group->{master}, 'st:1') }, 60), 'delivered over TLS through Sentinel');

# the Sentinels' certificates are checked too: with another CA nothing connects
$node->safe_psql('postgres', "ALTER SYSTEM SET cachekit.redis_tls_ca_file = '$pki->{other_ca}{crt}'");
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
ok( wait_for(
		sub {
			(cachekit_stats($node)->{last_error} // '') =~
			  /no Sentinel reachable \(3 tried\), last error: Sentinel at .*certificate was refused/;
		},
		60),
	'a wrong CA: no Sentinel reachable, because of the certificate');

$node->stop;
done_testing();
