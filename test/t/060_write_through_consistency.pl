# test/t/060_write_through_consistency.pl -- write-through ordering: for one
# key the last committed write wins, across batches, concurrent writers, a
# Redis outage and a worker restart. After the writers stop and the queue
# is drained, every key in Redis must equal its row, no key of an old row
# version may linger, and every tag set must list exactly the current keys.

use strict;
use warnings;

use IPC::Run ();
use Time::HiRes ();

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $NROWS = 50;
my $NTEAMS = 5;

my $redis = start_redis();
# small batches, so that the writes of one key spread over many of them, and
# quick retries, so that the outage ends fast
my $node = new_cachekit_node(
	'consistency', $redis,
	'cachekit.batch_size' => 50,
	'cachekit.retry_max_delay' => '200ms',
	'max_connections' => 40);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 60), 'worker is up');

# ---- helpers ---------------------------------------------------------------

sub sql
{
	my ($query) = @_;
	return $node->safe_psql('postgres', $query);
}

sub lit
{
	my ($s) = @_;
	die "cannot pass a NUL byte in a SQL literal" if $s =~ /\0/;
	$s =~ s/'/''/g;
	return "'$s'";
}

sub drained
{
	return sql("SELECT cachekit_wait('90 s')") eq 't';
}

sub sql_list
{
	my ($query) = @_;
	return [ grep { $_ ne '' } split /\n/, sql($query) ];
}

# Compare Redis with the table. Returns lists of problems:
#   mismatched  keys whose value is not the JSON of their row
#   stale       item keys in Redis that are no row's key
#   missing     rows without their key ($required_sql selects which rows must
#               have one: all by default)
#   bad_member  tag set members that are not a current key of that tag
#   unlisted    present keys missing from their row's tag set
sub compare_with_table
{
	my ($required_sql) = @_;
	$required_sql //= 'true';

	my @keys = redis_keys($redis, 'item:*');
	my @values;
	if (@keys)
	{
		@values = split /\n/, redis_cmd($redis, 'MGET', @keys), -1;
		die "MGET returned " . scalar(@values) . " values for " . scalar(@keys) . " keys"
		  unless @values == @keys;
	}
	my @pairs = map { '(' . lit($keys[$_]) . ', ' . lit($values[$_]) . ')' } 0 .. $#keys;
	push @pairs, '(NULL, NULL)' unless @pairs;

	my @members;
	for my $team (0 .. $NTEAMS - 1)
	{
		push @members, map { "($team, " . lit($_) . ')' }
		  grep { $_ ne '' } split /\n/, redis_cmd($redis, 'SMEMBERS', "tag:team:$team");
	}
	push @members, '(NULL, NULL)' unless @members;

	my $cte = 'WITH r(key, val) AS (VALUES ' . join(', ', @pairs) . '), '
	  . 'm(team, key) AS (VALUES ' . join(', ', @members) . '), '
	  . 'rows AS (SELECT s.*, \'item:\' || s.sku AS key, to_jsonb(s) AS j '
	  . '         FROM (SELECT id, sku, price, team, version, touched_at FROM items) s) ';

	my %problems;
	$problems{mismatched} = sql_list($cte
		  . 'SELECT r.key FROM r JOIN rows USING (key) '
		  . 'WHERE r.val::jsonb IS DISTINCT FROM rows.j ORDER BY 1');
	$problems{stale} = sql_list($cte
		  . 'SELECT r.key FROM r WHERE r.key IS NOT NULL '
		  . 'AND NOT EXISTS (SELECT FROM rows WHERE rows.key = r.key) ORDER BY 1');
	$problems{missing} = sql_list($cte
		  . 'SELECT rows.key FROM rows WHERE (' . $required_sql . ') '
		  . 'AND NOT EXISTS (SELECT FROM r WHERE r.key = rows.key) ORDER BY 1');
	$problems{bad_member} = sql_list($cte
		  . 'SELECT m.team || \' \' || m.key FROM m WHERE m.key IS NOT NULL '
		  . 'AND NOT EXISTS (SELECT FROM rows WHERE rows.key = m.key AND rows.team = m.team) ORDER BY 1');
	$problems{unlisted} = sql_list($cte
		  . 'SELECT rows.team || \' \' || rows.key FROM rows JOIN r USING (key) '
		  . 'WHERE NOT EXISTS (SELECT FROM m WHERE m.key = rows.key AND m.team = rows.team) ORDER BY 1');
	$problems{present} = scalar @keys;

	for my $kind (qw(mismatched stale missing bad_member unlisted))
	{
		next unless @{ $problems{$kind} };
		my @some = @{ $problems{$kind} }[ 0 .. ($#{ $problems{$kind} } < 4 ? $#{ $problems{$kind} } : 4) ];
		for my $item (@some)
		{
			my ($key) = $item =~ /(item:\S+)/;
			my $val = redis_cmd($redis, 'GET', $key);
			my $row = sql('SELECT to_jsonb(s) FROM (SELECT id, sku, price, team, version, touched_at '
				  . 'FROM items WHERE ' . lit($key) . " = 'item:' || sku) s");
			diag "$kind: $item; redis: " . ($val eq '' ? '(none)' : $val) . "; row: " . ($row eq '' ? '(none)' : $row);
		}
	}
	return \%problems;
}

sub check_consistent
{
	my ($label, $required_sql) = @_;
	my $p = compare_with_table($required_sql);
	is_deeply($p->{mismatched}, [], "$label: every key in Redis equals its row");
	is_deeply($p->{stale}, [], "$label: no key of an old row version is left");
	is_deeply($p->{missing}, [], "$label: every row that must have a key has it");
	is_deeply($p->{bad_member}, [], "$label: tag sets list only current keys of their tag");
	is_deeply($p->{unlisted}, [], "$label: every key is in its tag set");
	return $p;
}

# the pgbench scripts of the writers: random single-row updates (price, and
# now and then the key or the tag), and two-row transactions in id order
my $update_one = <<'EOF';
\set id random(1, 50)
\set price random(1, 1000000)
\set r random(1, 10)
\set suffix random(0, 2)
\set team random(0, 4)
UPDATE items SET price = :price, version = version + 1, touched_at = clock_timestamp(),
  sku = CASE WHEN :r = 1 THEN 'S' || id || '-' || :suffix ELSE sku END,
  team = CASE WHEN :r = 2 THEN :team ELSE team END
WHERE id = :id;
EOF
my $update_two = <<'EOF';
\set a random(1, 25)
\set b random(26, 50)
\set price random(1, 1000000)
BEGIN;
UPDATE items SET price = :price, version = version + 1, touched_at = clock_timestamp() WHERE id = :a;
UPDATE items SET price = :price + 1, version = version + 1, touched_at = clock_timestamp(),
  team = (team + 1) % 5 WHERE id = :b;
COMMIT;
EOF

my $script_seq = 0;

sub write_script
{
	my ($text) = @_;
	$script_seq++;
	my $file = $node->basedir . "/writer_$script_seq.sql";
	PostgreSQL::Test::Utils::append_to_file($file, $text);
	return $file;
}

# pgbench in the background for $secs seconds
sub start_writers
{
	my ($clients, $secs, $rate) = @_;
	my $one = write_script($update_one);
	my $two = write_script($update_two);
	my @cmd = (
		'pgbench', '--no-vacuum',
		'-h', $node->host, '-p', $node->port,
		'-c', $clients, '-j', $clients, '-T', $secs, '-R', $rate,
		'-f', "$one\@3", '-f', "$two\@1", 'postgres');
	note "starting writers: @cmd";
	my %w = (out => '', err => '');
	$w{h} = IPC::Run::start(\@cmd, '<', \undef, '>', \$w{out}, '2>', \$w{err},
		IPC::Run::timeout($secs + 120));
	return \%w;
}

sub finish_writers
{
	my ($w, $label) = @_;
	$w->{h}->finish;
	my $status = $?;
	is($status, 0, "$label: pgbench exited normally") or diag "pgbench stderr: $w->{err}";
	my ($n) = $w->{out} =~ /number of transactions actually processed: (\d+)/;
	ok(($n // 0) > 0, "$label: writers committed transactions (" . ($n // 'none') . ')');
	like($w->{out}, qr/number of failed transactions: 0\b/, "$label: no writer transaction failed")
	  if $w->{out} =~ /number of failed transactions/;
	return $n;
}

# ---- the table ---------------------------------------------------------------

sql(<<"SQL");
CREATE TABLE items (
	id integer PRIMARY KEY,
	sku text NOT NULL UNIQUE,
	price integer NOT NULL,
	team integer NOT NULL,
	version bigint NOT NULL DEFAULT 0,
	touched_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TRIGGER items_cache AFTER INSERT OR UPDATE OR DELETE ON items
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through(
		'key=item:{sku}', 'ttl=3600', 'columns=id,sku,price,team,version,touched_at',
		'tag=team:{team}');
CREATE TABLE marks (name text PRIMARY KEY, at timestamptz NOT NULL);
INSERT INTO items (id, sku, price, team)
	SELECT i, 'S' || i || '-0', i, i % $NTEAMS FROM generate_series(1, $NROWS) i;
SQL
ok(drained(), 'initial rows delivered');
my $p = check_consistent('initial rows');
is($p->{present}, $NROWS, "all $NROWS keys are written");

# ---- 500 sequential updates of one row -------------------------------------------

my $written0 = cachekit_stats($node)->{keys_written};
my $script = '';
for my $i (1 .. 500)
{
	# the key changes every 100 updates, between two names
	my $sku = int(($i - 1) / 100) % 2 ? 'S1-b' : 'S1-a';
	$script .= "UPDATE items SET price = $i, sku = '$sku', version = version + 1, "
	  . "touched_at = clock_timestamp() WHERE id = 1;\n";
}
my $t0 = Time::HiRes::time();
sql($script);
note sprintf('500 updates took %.2fs', Time::HiRes::time() - $t0);
ok(drained(), '500 sequential updates delivered');
is(sql(q{SELECT price || ' ' || sku || ' ' || version FROM items WHERE id = 1}),
	'500 S1-a 500', 'the row holds the last update');
like(redis_cmd($redis, 'GET', 'item:S1-a'), qr/"price":500,/, 'Redis holds the price of the last update');
ok(!redis_exists($redis, 'item:S1-b'), 'the key of the earlier name is gone');
ok(!redis_exists($redis, 'item:S1-0'), 'the original key is gone');
cmp_ok(cachekit_stats($node)->{keys_written} - $written0, '>', 1,
	'the updates reached Redis in more than one write');
check_consistent('after 500 sequential updates');

# ---- concurrent writers ------------------------------------------------------

$node->pgbench(
	'--no-vacuum --client=6 --jobs=6 --time=4 --rate=1000',
	0,
	[qr{number of transactions actually processed: [1-9]}],
	[qr{^$}],
	'concurrent writers',
	{ '060_update_one@3' => $update_one, '060_update_two@1' => $update_two });
ok(drained(), 'cachekit_wait returns true after the concurrent writers');
is(sql('SELECT count(*) FROM items WHERE version > 0'), $NROWS, 'every row was updated');
$p = check_consistent('concurrent writers');
is($p->{present}, $NROWS, "concurrent writers: $NROWS keys present");

# ---- a Redis outage in the middle of the updates ----------------------------------------

my $failed0 = cachekit_stats($node)->{failed_attempts};
my $w = start_writers(4, 8, 800);
Time::HiRes::sleep(1.5);
stop_redis($redis);
# every update from now on can only reach the restarted (empty) Redis
sql(q{INSERT INTO marks VALUES ('outage', clock_timestamp())});
Time::HiRes::sleep(2);
cmp_ok(sql(q{SELECT count(*) FROM items WHERE touched_at > (SELECT at FROM marks WHERE name = 'outage')}),
	'>', 0, 'outage: rows are updated while Redis is down');
cmp_ok(cachekit_stats($node)->{queue_depth}, '>', 0, 'outage: the queue holds entries while Redis is down');
restart_redis($redis);
finish_writers($w, 'outage');
ok(drained(), 'outage: cachekit_wait returns true after the writers stop');
cmp_ok(cachekit_stats($node)->{failed_attempts}, '>', $failed0, 'outage: the worker saw failed attempts');
$p = check_consistent('outage',
	q{touched_at >= (SELECT at FROM marks WHERE name = 'outage')});
cmp_ok($p->{present}, '>', 0, "outage: $p->{present} keys written to the restarted Redis");

# ---- a worker restart in the middle of the updates ---------------------------------------

# every row gets its key again first, so that all must be there at the end
sql(q{UPDATE items SET version = version + 1, touched_at = clock_timestamp()});
ok(drained(), 'worker restart: all rows written again');
$p = check_consistent('before the worker restart');
is($p->{present}, $NROWS, "before the worker restart: $NROWS keys present");

$w = start_writers(4, 13, 800);
Time::HiRes::sleep(1.5);

# first while the worker most likely waits for work; then while it waits
# for the replies of a batch from a paused (hung) Redis, which is resumed
# only once the new worker is there: Redis then runs the pipeline of the
# old worker and the new worker delivers the same entries again, and more
for my $round (1, 2)
{
	my $old_pid = sql('SELECT worker_pid FROM cachekit_stats');
	like($old_pid, qr/^\d+$/, "worker restart $round: the worker runs");
	if ($round == 2)
	{
		pause_redis($redis);
		ok( wait_for(
				sub {
					sql(q{SELECT count(*) FROM pg_stat_activity WHERE pid = (SELECT worker_pid FROM cachekit_stats)
						  AND state = 'active' AND query = 'delivering to Redis'}) eq '1';
				},
				30),
			'worker restart 2: the worker waits for a paused Redis in the middle of a delivery');
	}
	note "worker restart $round: queue depth "
	  . sql('SELECT queue_depth FROM cachekit_stats') . ' when the worker is terminated';
	is(sql('SELECT pg_terminate_backend(worker_pid) FROM cachekit_stats'), 't',
		"worker restart $round: the worker is terminated");
	my $t_kill = Time::HiRes::time();
	ok( wait_for(
			sub {
				my $pid = sql('SELECT worker_pid FROM cachekit_stats');
				return $pid =~ /^\d+$/ && $pid != $old_pid;
			},
			60),
		"worker restart $round: a new worker comes back");
	note sprintf('worker restart %d: the worker came back after %.1fs',
		$round, Time::HiRes::time() - $t_kill);
	if ($round == 2)
	{
		# let the new worker connect to the paused Redis and wait too
		Time::HiRes::sleep(1);
		resume_redis($redis);
	}
}
finish_writers($w, 'worker restart');
ok(drained(), 'worker restart: cachekit_wait returns true after the writers stop');
$p = check_consistent('worker restart');
is($p->{present}, $NROWS, "worker restart: $NROWS keys present");

my $stats = cachekit_stats($node);
is($stats->{dead_letters}, '0', 'no dead letters');
is($stats->{queue_depth}, '0', 'the queue is empty');

$node->stop;
stop_redis($redis);
done_testing();
