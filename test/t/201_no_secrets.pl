# test/t/201_no_secrets.pl -- no password reaches the server log.
#
# With every statement logged (log_statement = all) and failed statements
# logged too (log_min_error_statement), Redis passwords holding quotes,
# spaces, '@' and '/' go through ALTER SYSTEM (accepted and refused), SET,
# set_config(), a setting name in odd letter case and a misspelt one. None of
# them may appear in the log: the lines about cachekit settings are masked
# and their STATEMENT lines left out.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis = start_redis();
my $port  = $redis->{port};
my $node  = new_cachekit_node('secrets', $redis,
	'log_statement'            => 'all',
	'log_min_error_statement'  => 'error',
	'log_min_messages'         => 'info',
	'cachekit.retry_max_delay' => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
$node->safe_psql('postgres', 'CREATE ROLE plain LOGIN');

# each password is unique, so that a leak can be told apart
my @secrets;
sub secret
{
	my $n = scalar(@secrets) + 1;
	my $s = "Zq${n}k" . $_[0] . "Xv${n}w";
	push @secrets, $s;
	return $s;
}

sub attempt
{
	my ($what, $sql, %opts) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', $sql, %opts);
	note "$what: rc $rc" . ($err ? ", $err" : '');
	return $rc;
}

sub sqlq { my $s = shift; $s =~ s/'/''/g; return "'$s'"; }

# accepted, with a quote, a double quote and a space in the password
my $pw1 = secret(q{pa'ss wo"rd});
is(attempt('accepted', 'ALTER SYSTEM SET cachekit.redis_url = '
		. sqlq("redis://:$pw1\@127.0.0.1:$port/0")), 0, 'a URL with an odd password is accepted');
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');

# refused by the check (bad port), with '@' and '/' in the password
my $pw2 = secret('p@ss/w0rd');
isnt(attempt('refused', 'ALTER SYSTEM SET cachekit.redis_url = '
		. sqlq("redis://user:$pw2\@127.0.0.1:99999/0")), 0, 'a bad URL is refused');

# the setting's name in another letter case
my $pw3 = secret('case');
attempt('odd case', 'ALTER SYSTEM SET "CACHEKIT.Redis_URL" = '
	. sqlq("redis://:$pw3\@127.0.0.1:$port/0"));

# a misspelt name in the reserved prefix
my $pw4 = secret('misspelt');
isnt(attempt('misspelt', 'ALTER SYSTEM SET cachekit.redis_ulr = '
		. sqlq("redis://:$pw4\@127.0.0.1:$port/0")), 0, 'a misspelt setting is refused');

# not settable in a session, by a superuser or anyone else
my $pw5 = secret('session');
isnt(attempt('SET', 'SET cachekit.redis_url = ' . sqlq("redis://:$pw5\@127.0.0.1/0")),
	0, 'SET is refused');
my $pw6 = secret('plain role');
isnt(attempt('plain role',
		'ALTER SYSTEM SET cachekit.redis_url = ' . sqlq("redis://:$pw6\@127.0.0.1/0"),
		extra_params => [ '-U', 'plain' ]),
	0, 'ALTER SYSTEM by a plain role is refused');
my $pw7 = secret('set_config');
isnt(attempt('set_config', 'SELECT set_config(' . sqlq('cachekit.redis_url') . ', '
		. sqlq("redis://:$pw7\@127.0.0.1/0") . ', false)'),
	0, 'set_config is refused');

# the last accepted URL is the one with the odd password: put a good one back
$node->safe_psql('postgres', "ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:$port/0'");
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
redis_cmd($redis, 'SET', 'after', 'x');
$node->safe_psql('postgres', q{SELECT cachekit_delete('after')});
ok(wait_for(sub { !redis_exists($redis, 'after') }, 60), 'the worker delivers with the final URL');

my $log = slurp_file($node->logfile);
like($log, qr/cachekit\.redis_url/i, 'the log does mention the setting');
like($log, qr/\*\*\*/, 'with masked credentials');
for my $s (@secrets)
{
	# neither the whole nor its start or end
	my ($head, $tail) = ($s =~ /^(Zq\d+k)/, $s =~ /(Xv\d+w)$/);
	ok(index($log, $s) < 0 && index($log, $head) < 0 && index($log, $tail) < 0,
		"password '$s' is not in the log");
}
my @statements = grep { /\bSTATEMENT:.*(?i:cachekit\.redis)/ } split /\n/, $log;
is(join("\n", @statements), '', 'no STATEMENT line about the setting');

$node->stop;
done_testing();
