# test/t/185_prometheus.pl -- packaging/prometheus/queries.yaml with the real
# prometheus-postgres-exporter: started against the test server as a role
# set up the way Debian's README recommends (its own search_path), it
# exposes cachekit_stats as gauges and counters with help texts, one series
# per database (auto-discovered), and only once the role was granted SELECT
# on cachekit_stats.

use strict;
use warnings;

use HTTP::Tiny;
use IPC::Run ();

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $exporter_bin = '/usr/bin/prometheus-postgres-exporter';
plan skip_all => "$exporter_bin is not installed (test/setup.sh installs it)"
  unless -x $exporter_bin;

my $queries = 'packaging/prometheus/queries.yaml';
ok(-f $queries, "$queries is there");

my $redis = start_redis();
my $node  = new_cachekit_node('prom', $redis, 'cachekit.retry_max_delay' => '200ms');

sub sql { return $node->safe_psql($_[1] // 'postgres', $_[0]); }

sql(q{
	CREATE EXTENSION cachekit;
	CREATE ROLE prometheus LOGIN;
	CREATE SCHEMA prometheus AUTHORIZATION prometheus;
	ALTER ROLE prometheus SET search_path TO prometheus, pg_catalog;
	CREATE TABLE users (id int PRIMARY KEY, email text);
	CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	  FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}');
});
sql('CREATE DATABASE other');
sql('SET client_min_messages = error; CREATE EXTENSION cachekit', 'other');
ok(wait_for_redis_connected($node), 'the worker is connected');

# ---- the exporter ---------------------------------------------------------------

my $port = PostgreSQL::Test::Cluster::get_free_port();
my $log  = "$PostgreSQL::Test::Utils::log_path/185_prometheus_exporter.log";
my $dsn  = sprintf('postgresql://prometheus@:%d/postgres?host=%s&sslmode=disable',
	$node->port, $node->host);
my $exporter = IPC::Run::start(
	[
		$exporter_bin,                 "--extend.query-path=$queries",
		"--web.listen-address=127.0.0.1:$port", '--disable-default-metrics',
		'--disable-settings-metrics',  '--auto-discover-databases',
		'--exclude-databases=template0,template1'
	],
	'<', '/dev/null', '>>', $log, '2>>', $log,
	init => sub { $ENV{DATA_SOURCE_NAME} = $dsn; });
END { $exporter->kill_kill if $exporter && $exporter->pumpable; }

my $http = HTTP::Tiny->new(timeout => 30);
my $text = '';

sub scrape
{
	my $res = $http->get("http://127.0.0.1:$port/metrics");
	die "GET /metrics: $res->{status} $res->{reason}\n" unless $res->{success};
	$text = $res->{content};
	return $text;
}

# value of a series of $name with datname="$db" (undef: no such series)
sub metric
{
	my ($name, $db) = @_;
	$db //= 'postgres';
	for my $line (split /\n/, $text)
	{
		next unless $line =~ /^\Q$name\E\{([^}]*)\} (\S+)$/;
		my ($labels, $value) = ($1, $2);
		return $value + 0 if $labels =~ /(^|,)datname="\Q$db\E"(,|$)/;
	}
	return undef;
}

ok(wait_for(sub { scrape() =~ /^pg_up /m }, 60), 'the exporter answers on /metrics')
  or diag slurp_file($log);

# ---- without the grant: nothing, and the log says why -----------------------------

scrape();
ok(!defined metric('cachekit_queue_depth'), 'no cachekit metrics before the role is granted');
ok(wait_for(sub { slurp_file($log) =~ /permission denied for view cachekit_stats/ }, 60),
	'the exporter logs the missing grant');

# ---- with the grant ------------------------------------------------------------------

sql('GRANT pg_monitor TO prometheus');
ok(wait_for(sub { scrape(); defined metric('cachekit_queue_depth') }, 60),
	'cachekit metrics appear once the role may read cachekit_stats');

my %type = (
	queue_depth                     => 'gauge',
	oldest_entry_age_seconds        => 'gauge',
	dead_letters                    => 'gauge',
	redis_connected                 => 'gauge',
	worker_running                  => 'gauge',
	last_delivery_timestamp_seconds => 'gauge',
	entries_delivered_total         => 'counter',
	failed_attempts_total           => 'counter',
	dead_lettered_total             => 'counter',
	keys_deleted_total              => 'counter',
	tags_flushed_total              => 'counter',
	tag_keys_deleted_total          => 'counter',
	keys_written_total              => 'counter',
	values_too_large_total          => 'counter',
);
for my $m (sort keys %type)
{
	like($text, qr/^# TYPE cachekit_$m $type{$m}$/m, "cachekit_$m is a $type{$m}");
	like($text, qr/^# HELP cachekit_$m \S.{15,}$/m, "cachekit_$m has a help text");
	ok(defined metric("cachekit_$m") && defined metric("cachekit_$m", 'other'),
		"cachekit_$m: one series per database");
}
is(metric('cachekit_redis_connected'), 1, 'connected: 1');
is(metric('cachekit_worker_running'),  1, 'worker running: 1');
is(metric('cachekit_queue_depth'),     0, 'queue empty');

# ---- a backlog, dead letters, Redis down --------------------------------------------

stop_redis($redis);
# three transactions, three entries (one transaction's are gathered into one)
sql(qq{INSERT INTO users VALUES ($_, 'x')}) for 1 .. 3;
sql(q{INSERT INTO cachekit_dead_letter (id, kind, keys, ttl, attempts, error, enqueued_at)
      VALUES (-1, 'i', '{k}', 0, 5, 'ERR refused', now())});
ok( wait_for(
		sub {
			scrape();
			metric('cachekit_redis_connected') == 0
			  && metric('cachekit_oldest_entry_age_seconds') >= 1
			  && metric('cachekit_failed_attempts_total') > 0;
		},
		60),
	'Redis down: disconnected, the oldest entry ages, failed attempts count');
is(metric('cachekit_queue_depth'), 3, 'queue depth 3');
is(metric('cachekit_dead_letters'), 1, 'one dead letter');
is(metric('cachekit_queue_depth', 'other'), 0, 'the other database has its own series');
my $delivered_before = metric('cachekit_entries_delivered_total');

$redis = restart_redis($redis);
ok( wait_for(
		sub {
			scrape();
			metric('cachekit_queue_depth') == 0 && metric('cachekit_redis_connected') == 1;
		},
		60),
	'Redis back: the backlog drains');
is(metric('cachekit_oldest_entry_age_seconds'), 0, 'no backlog age once drained');
cmp_ok(metric('cachekit_entries_delivered_total'), '>=', $delivered_before + 3,
	'entries_delivered_total counts the delivered backlog');
cmp_ok(metric('cachekit_last_delivery_timestamp_seconds'), '>', time() - 600,
	'last delivery time is recent');

$exporter->kill_kill;
$node->stop;
done_testing();
