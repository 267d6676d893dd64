# test/t/220_launcher.pl -- every database with the extension is served
# (cachekit.database = ''): the launcher's life cycle of database workers.
#
# 1. CREATE EXTENSION in a new database delivers soon (no restart), also
#    when done in a transaction that commits (or is prepared, then
#    committed); a rolled-back one starts nothing. Template databases and databases refusing connections are
#    skipped; cachekit_databases says why.
# 2. Each database delivers to its own cachekit.redis_url (ALTER DATABASE
#    ... SET, superuser only: a database owner cannot set it), and a reload
#    after a change reconnects to the new one.
# 3. CREATE DATABASE ... TEMPLATE of a served database succeeds while its
#    worker runs, and the copy is served.
# 4. DROP EXTENSION stops the database's worker.
# 5. cachekit.max_databases exceeded: a log line, the view says so, and the
#    database is served once a slot frees up.
# 6. After a restart, the databases with the extension are found again.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use CachekitTest;

my $r0 = start_redis();    # the server-wide cachekit.redis_url
my $r1 = start_redis();
my $r2 = start_redis();
my $r2b = start_redis();

my $node = new_cachekit_node('launcher', $r0,
	'cachekit.database'        => '',
	'cachekit.max_databases'   => '3',
	'cachekit.retry_max_delay' => '200ms',
	'max_worker_processes'     => '16',
	'max_prepared_transactions' => '2');

sub sql { $node->safe_psql(@_) }

sub workers
{
	return sql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cachekit worker'});
}

# the row of cachekit_databases for $db, read in database $in
sub status_of
{
	my ($in, $db) = @_;
	return sql($in, qq{SELECT served || '|' || status FROM cachekit_databases WHERE datname = '$db'});
}

# delete $key through cachekit in $db; true once it is gone from $redis
sub delivers
{
	my ($db, $redis, $key, $timeout) = @_;
	redis_cmd($redis, 'SET', $key, 'x');
	sql($db, qq{SELECT cachekit_delete('$key')});
	return wait_for(sub { !redis_exists($redis, $key) }, $timeout // 30);
}

# ---- 1. CREATE EXTENSION: committed, in a transaction, rolled back ------------

is(workers(), '0', 'no database has the extension: no worker');

sql('postgres', 'CREATE DATABASE app1');
sql('postgres', qq{ALTER DATABASE app1 SET cachekit.redis_url = '} . redis_url($r1) . q{'});
my $t0 = time();
sql('app1', 'CREATE EXTENSION cachekit');
ok(delivers('app1', $r1, 'app1:first'), 'app1 delivers after CREATE EXTENSION, without a restart');
note sprintf('app1: first delivery %.2f s after CREATE EXTENSION (goal: within 1 s)', time() - $t0);

# in a transaction that commits
sql('postgres', 'CREATE DATABASE app2');
sql('postgres', qq{ALTER DATABASE app2 SET cachekit.redis_url = '} . redis_url($r2) . q{'});
redis_cmd($r2, 'SET', 'app2:in_tx', 'x');
sql('app2', q{BEGIN; CREATE EXTENSION cachekit; SELECT cachekit_delete('app2:in_tx'); COMMIT;});
ok(wait_for(sub { !redis_exists($r2, 'app2:in_tx') }, 30),
	'CREATE EXTENSION inside a committed transaction: served, its own work delivered');

# in a prepared transaction, committed later
sql('postgres', 'CREATE DATABASE prep');
sql('prep', q{BEGIN; CREATE EXTENSION cachekit; PREPARE TRANSACTION 'ext';});
sleep(2);
sql('prep', q{COMMIT PREPARED 'ext'});
ok(delivers('prep', $r0, 'prep:served'), 'CREATE EXTENSION in a prepared transaction: served once committed');
sql('prep', 'DROP EXTENSION cachekit');
ok(wait_for(sub { status_of('app1', 'prep') eq 'false|no cachekit extension' }, 30),
	'and no longer once the extension is dropped');

# rolled back, and rolled back to a savepoint
sql('postgres', 'CREATE DATABASE rolled');
sql('rolled', q{BEGIN; CREATE EXTENSION cachekit; ROLLBACK;});
sql('rolled', q{BEGIN; SAVEPOINT s; CREATE EXTENSION cachekit; ROLLBACK TO s; COMMIT;});
sleep(3);
is(sql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cachekit worker' AND datname = 'rolled'}),
	'0', 'a rolled-back CREATE EXTENSION starts no worker');
is(status_of('app1', 'rolled'), 'false|no cachekit extension', 'cachekit_databases: rolled has no extension');

# skipped databases
sql('postgres', 'CREATE DATABASE closed');
sql('closed', 'CREATE EXTENSION cachekit');
sql('postgres', 'ALTER DATABASE closed ALLOW_CONNECTIONS false');
sql('postgres', 'CREATE DATABASE tmpl IS_TEMPLATE true');
sql('tmpl', 'CREATE EXTENSION cachekit');
ok(wait_for(sub { status_of('app1', 'closed') eq 'false|does not allow connections' }, 30),
	'a database refusing connections is skipped, and listed so');
ok(wait_for(sub { status_of('app1', 'tmpl') eq 'false|template database' }, 30),
	'a template database is skipped, and listed so');
is(status_of('app1', 'app1'), 'true|served', 'app1 is listed as served');
is(workers(), '2', 'two workers: app1 and app2');

# who may read the view
sql('postgres', 'CREATE ROLE plain LOGIN');
my ($rc, $out, $err) = $node->psql('app1', 'SELECT * FROM cachekit_databases',
	extra_params => [ '-U', 'plain' ]);
isnt($rc, 0, 'an ordinary role cannot read cachekit_databases');

# ---- 2. per-database URL: superuser only; a reload reconnects -----------------

ok(!redis_exists($r0, 'never') && delivers('app1', $r1, 'app1:own'), 'app1 delivers to its own Redis');
redis_cmd($r0, 'SET', 'app2:elsewhere', 'x');
ok(delivers('app2', $r2, 'app2:elsewhere'), 'app2 delivers to its own Redis');
ok(redis_exists($r0, 'app2:elsewhere'), '...and not to the server-wide one');

sql('postgres', 'CREATE ROLE owner LOGIN');
sql('postgres', 'ALTER DATABASE app2 OWNER TO owner');
($rc, $out, $err) = $node->psql('app2',
	q{ALTER DATABASE app2 SET cachekit.redis_url = 'redis://127.0.0.1:1/0'},
	extra_params => [ '-U', 'owner' ]);
isnt($rc, 0, 'the owner of a database cannot set its cachekit.redis_url');
like($err, qr/permission denied/, '...permission denied');
is(sql('postgres',
		q{SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
		  WHERE d.datname = 'app2' AND array_to_string(s.setconfig, ',') LIKE '%127.0.0.1:1/%'}),
	'0', 'nothing was stored');

my $pid2 = sql('app2', 'SELECT worker_pid FROM cachekit_stats');
sql('postgres', qq{ALTER DATABASE app2 SET cachekit.redis_url = '} . redis_url($r2b) . q{'});
sql('postgres', 'SELECT pg_reload_conf()');
ok(wait_for(sub { my $p = sql('app2', 'SELECT worker_pid FROM cachekit_stats'); $p ne '' && $p ne $pid2 }, 30),
	'after ALTER DATABASE ... SET and a reload, app2 has a new worker');
redis_cmd($r2, 'SET', 'app2:moved', 'x');
ok(delivers('app2', $r2b, 'app2:moved'), 'app2 now delivers to its new Redis');
ok(redis_exists($r2, 'app2:moved'), '...and no longer to the old one');
my $pid1 = sql('app1', 'SELECT worker_pid FROM cachekit_stats');
sql('postgres', 'SELECT pg_reload_conf()');
sleep(2);
is(sql('app1', 'SELECT worker_pid FROM cachekit_stats'), $pid1,
	'a reload with no change to its database setting keeps app1\'s worker');

# ---- 3. CREATE DATABASE ... TEMPLATE of a served database ---------------------

($rc, $out, $err) = $node->psql('postgres', 'CREATE DATABASE app1copy TEMPLATE app1');
is($rc, 0, 'CREATE DATABASE ... TEMPLATE of a served database succeeds') or diag $err;
ok(delivers('app1', $r1, 'app1:after_copy'), 'app1 is served again after the copy');
# settings of the template are not copied: the copy uses the server-wide URL
ok(delivers('app1copy', $r0, 'app1copy:served'), 'the copy is served (it has the extension)');

# ---- 4. DROP EXTENSION stops the worker --------------------------------------

sql('app1copy', 'DROP EXTENSION cachekit');
ok(wait_for(sub { status_of('app1', 'app1copy') eq 'false|no cachekit extension' }, 30),
	'DROP EXTENSION: the database is no longer served');
is(workers(), '2', 'its worker is gone');

# ---- 5. cachekit.max_databases -------------------------------------------------

sql('postgres', 'CREATE DATABASE app3');
sql('app3', 'CREATE EXTENSION cachekit');
ok(delivers('app3', $r0, 'app3:served'), 'app3 is served: three databases');
sql('postgres', 'CREATE DATABASE app4');
sql('app4', 'CREATE EXTENSION cachekit');
ok(wait_for(sub { slurp_file($node->logfile) =~ /cachekit cannot serve database "app4": 3 databases are served already/ }, 30),
	'a fourth database is over the cap: logged');
is(status_of('app1', 'app4'), 'false|not served: cachekit.max_databases reached',
	'cachekit_databases says so');
redis_cmd($r0, 'SET', 'app4:waits', 'x');
sql('app4', q{SELECT cachekit_delete('app4:waits')});
sql('app3', 'DROP EXTENSION cachekit');
ok(wait_for(sub { !redis_exists($r0, 'app4:waits') }, 30),
	'once a slot frees up, the fourth database is served and its queue delivered');
like(slurp_file($node->logfile), qr/cachekit serves database "app4" now that a worker slot is free/,
	'...and the log says so');

# ---- 6. a restart finds them again -------------------------------------------

$node->restart;
ok(wait_for(sub { workers() eq '3' }, 60), 'after a restart: three workers again');
ok(delivers('app1', $r1, 'app1:restarted'), 'app1 is served');
ok(delivers('app2', $r2b, 'app2:restarted'), 'app2 is served, with its own URL');
ok(delivers('app4', $r0, 'app4:restarted'), 'app4 is served');
is(status_of('app1', 'app3'), 'false|no cachekit extension', 'app3 (extension dropped) is not');

$node->stop;
done_testing();
