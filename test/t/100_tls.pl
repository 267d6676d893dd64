# test/t/100_tls.pl -- delivery over TLS (rediss://) to a real redis-server
# with a TLS port, with and without client certificates, and every way a
# TLS connection can fail: each gives one log line and a clear last_error,
# the worker keeps retrying (it never hangs past cachekit.connect_timeout),
# and delivery resumes once the cause is gone. Certificates are made here
# with the openssl command.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;

my $pki   = make_pki("$PostgreSQL::Test::Utils::tmp_check/pki_100");
my $redis = start_tls_redis($pki);
my $mtls  = start_tls_redis($pki, auth_clients => 1);

my $node = new_cachekit_node('tls', tls_url($redis),
	'cachekit.redis_tls_ca_file' => $pki->{ca}{crt},
	'cachekit.retry_max_delay'   => '200ms',
	'cachekit.connect_timeout'   => '2s');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 60), 'worker is up');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Set these settings (undef: reset) and reload.
sub configure
{
	my (%set) = @_;
	for my $name (sort keys %set)
	{
		if (defined $set{$name})
		{
			(my $v = $set{$name}) =~ s/'/''/g;
			sql("ALTER SYSTEM SET $name = '$v'");
		}
		else
		{
			sql("ALTER SYSTEM RESET $name");
		}
	}
	sql('SELECT pg_reload_conf()');
}

my $probe = 0;

# A key deleted through the worker proves delivery to $r.
sub delivers_to
{
	my ($r, $label) = @_;
	$probe++;
	redis_cmd($r, 'SET', "probe:$probe", 'x');
	sql("SELECT cachekit_delete('probe:$probe')");
	ok(wait_for(sub { !redis_exists($r, "probe:$probe") }, 60), "$label: delivered");
}

# The worker fails with $re in last_error, logs it once, and keeps retrying.
sub fails_with
{
	my ($label, $re, %set) = @_;
	my $st = expect_outage($node, $label, $re,
		sub {
			configure(%set);
			$probe++;
			sql("SELECT cachekit_delete('probe:$probe')");
		});
	is(sql('SELECT queue_depth FROM cachekit_stats') > 0 ? 1 : 0, 1,
		"$label: the entry waits in the queue");
	return $st;
}

# Back to the working settings; the waiting entries go out.
sub recovers
{
	my ($label, $r, %set) = @_;
	configure(%set);
	ok(wait_for_redis_connected($node, 'postgres', 60), "$label: connected again");
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "$label: the queue drained");
	delivers_to($r, "$label: after recovery");
}

# ---- delivery -----------------------------------------------------------------

delivers_to($redis, 'TLS, full verification against the CA file');
like(slurp_file($node->logfile), qr/connected to Redis at 127\.0\.0\.1:$redis->{tls_port}\/0 over TLS/,
	'the log tells the connection is TLS');

# Redis sees a TLS client: its plain port has not been used by the worker
my $clients = redis_cmd($redis, 'CLIENT', 'LIST');
like($clients, qr/lib-name=|laddr=127\.0\.0\.1:$redis->{tls_port}/, 'the worker is a client of the TLS port');

sql(q{CREATE TABLE t (id int PRIMARY KEY, v text);
	CREATE TRIGGER t_cache AFTER INSERT OR UPDATE OR DELETE ON t
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=t:{id}', 'tag=all')});
sql(q{INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 2000) g});
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'a batch of 2000 rows went over TLS');
is(redis_cmd($redis, 'GET', 't:1999'), '{"id":1999,"v":"v1999"}', 'a value written over TLS');
is(redis_cmd($redis, 'SCARD', 'tag:all'), '2000', 'its tag set is complete');
sql(q{UPDATE t SET v = v || 'x'});
sql(q{SELECT cachekit_flush_tag('all')});
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'updates and a tag flush over TLS');
my @left = redis_keys($redis, 't:*');
is(scalar @left, 0, 'the flush deleted every key of the tag');

# the host name is checked: localhost and 127.0.0.1 are both in the certificate
recovers('host name localhost', $redis, 'cachekit.redis_url' => tls_url($redis, 'localhost'));
recovers('cachekit.redis_tls_server_name', $redis,
	'cachekit.redis_url'             => tls_url($redis),
	'cachekit.redis_tls_server_name' => 'redis.test');

# ---- failures -------------------------------------------------------------------

fails_with('host name mismatch', qr/certificate was refused: .*mismatch/,
	'cachekit.redis_tls_server_name' => 'other.example');
recovers('verify=ca skips the host name', $redis, 'cachekit.redis_tls_verify' => 'ca');
recovers('verify=full again', $redis,
	'cachekit.redis_tls_verify' => undef, 'cachekit.redis_tls_server_name' => undef);

fails_with('wrong CA', qr/certificate was refused: (unable to get local issuer certificate|self-signed certificate)/,
	'cachekit.redis_tls_ca_file' => $pki->{other_ca}{crt});
recovers('verify=none accepts any certificate', $redis, 'cachekit.redis_tls_verify' => 'none');
recovers('verify=full with the right CA', $redis,
	'cachekit.redis_tls_verify' => undef, 'cachekit.redis_tls_ca_file' => $pki->{ca}{crt});

fails_with('no CA file: the system trust store does not know the test CA',
	qr/certificate was refused: (unable to get local issuer certificate|self-signed certificate)/,
	'cachekit.redis_tls_ca_file' => '');
recovers('CA file back', $redis, 'cachekit.redis_tls_ca_file' => $pki->{ca}{crt});

fails_with('unreadable CA file', qr/could not read cachekit\.redis_tls_ca_file ".*nonexistent\.crt": No such file/,
	'cachekit.redis_tls_ca_file' => "$pki->{dir}/nonexistent.crt");
recovers('CA file back', $redis, 'cachekit.redis_tls_ca_file' => $pki->{ca}{crt});

my $not_pem = "$pki->{dir}/not_pem.crt";
append_to_file($not_pem, "this is not a certificate\n");
fails_with('CA file without a certificate', qr/could not load cachekit\.redis_tls_ca_file/,
	'cachekit.redis_tls_ca_file' => $not_pem);
recovers('CA file back', $redis, 'cachekit.redis_tls_ca_file' => $pki->{ca}{crt});

my $t0 = time;
fails_with('TLS to a plain port', qr/TLS handshake.*(plain-text Redis port|a TLS port\?|closed the connection)/,
	'cachekit.redis_url' => 'rediss://127.0.0.1:' . $redis->port . '/0');
recovers('TLS port again', $redis, 'cachekit.redis_url' => tls_url($redis));

fails_with('plain text to a TLS port', qr/lost the connection|timed out after cachekit\.connect_timeout/,
	'cachekit.redis_url' => "redis://127.0.0.1:$redis->{tls_port}/0");
recovers('TLS port again', $redis, 'cachekit.redis_url' => tls_url($redis));

# ---- mutual TLS --------------------------------------------------------------------

fails_with('mTLS without a client certificate',
	qr/TLS handshake failed|lost the connection/,
	'cachekit.redis_url' => tls_url($mtls));
like(slurp_file($mtls->{log}), qr/certificate/i, 'Redis refused the client for its missing certificate');
recovers('mTLS with the client certificate', $mtls,
	'cachekit.redis_tls_cert_file' => $pki->{client}{crt},
	'cachekit.redis_tls_key_file'  => $pki->{client}{key});

fails_with('a certificate without its key', qr/must be set together/,
	'cachekit.redis_tls_key_file' => undef);
recovers('key back', $mtls, 'cachekit.redis_tls_key_file' => $pki->{client}{key});

# a key others can read is refused, as PostgreSQL refuses its own
my $open_key = "$pki->{dir}/open_client.key";
PostgreSQL::Test::Utils::append_to_file($open_key, slurp_file($pki->{client}{key}));
chmod 0644, $open_key;
fails_with('a key file readable by others', qr/cachekit\.redis_tls_key_file ".*open_client\.key" has group or world access/,
	'cachekit.redis_tls_key_file' => $open_key);
chmod 0600, $open_key;
recovers('the same key made private', $mtls);

fails_with('a client certificate the server does not trust',
	qr/TLS handshake failed|lost the connection/,
	'cachekit.redis_tls_cert_file' => $pki->{other_ca}{crt},
	'cachekit.redis_tls_key_file'  => $pki->{other_ca}{key});

# ---- certificate rotation: new files at the same paths, a reload ------------------

my $rot = "$PostgreSQL::Test::Utils::tmp_check/pki_100_rotated";
my $new = make_pki($rot);
my $ca_path = "$pki->{dir}/current_ca.crt";
PostgreSQL::Test::Utils::append_to_file($ca_path, slurp_file($pki->{ca}{crt}));
recovers('before rotation', $mtls,
	'cachekit.redis_tls_ca_file'   => $ca_path,
	'cachekit.redis_tls_cert_file' => $pki->{client}{crt},
	'cachekit.redis_tls_key_file'  => $pki->{client}{key});

# Redis moves to certificates of a new CA, and wants client certificates of it
redis_cmd($mtls, 'CONFIG', 'SET', 'tls-cert-file', $new->{server}{crt},
	'tls-key-file', $new->{server}{key}, 'tls-ca-cert-file', $new->{ca}{crt});
redis_cmd($mtls, 'CLIENT', 'KILL', 'TYPE', 'normal');
fails_with('Redis rotated, cachekit not yet', qr/certificate was refused|TLS handshake failed/);

# new files at the same paths; the reload makes the worker reconnect with them
unlink $ca_path;
PostgreSQL::Test::Utils::append_to_file($ca_path, slurp_file($new->{ca}{crt}));
recovers('rotated: new CA file content and a new client certificate', $mtls,
	'cachekit.redis_tls_cert_file' => $new->{client}{crt},
	'cachekit.redis_tls_key_file'  => $new->{client}{key});

# ---- nothing secret in the log -----------------------------------------------------

unlike(slurp_file($node->logfile), qr/BEGIN .*PRIVATE KEY/, 'no key material in the log');

$node->stop;
done_testing();
