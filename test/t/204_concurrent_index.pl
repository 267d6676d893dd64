# test/t/204_concurrent_index.pl -- index builds on the queue never fail
# writers, and the queue's indexes stay complete.
#
# Writers update watched tables without pause (pgbench) while an
# administrator runs CREATE INDEX CONCURRENTLY (an expression index, a
# partial index, a unique one) and REINDEX ... CONCURRENTLY on the queue.
# cachekit inserts queue rows straight into the heap and the indexes: it
# must leave an index that is not yet ready for inserts to its build, fill
# expression and partial indexes as the executor would, and never fail a
# writer. Afterwards amcheck verifies that every queue row is in every
# index.

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(sleep);

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('cic', $redis, 'cachekit.retry_max_delay' => '100ms');
$node->safe_psql('postgres', q{
	CREATE EXTENSION cachekit;
	CREATE EXTENSION amcheck;
	CREATE TABLE users(id int PRIMARY KEY, email text, team int, v int DEFAULT 0);
	INSERT INTO users SELECT g, 'u' || g, g % 10 FROM generate_series(1, 500) g;
	CREATE TRIGGER users_inval AFTER UPDATE ON users
		FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'tag=team:{team}');
	CREATE TRIGGER users_wt AFTER UPDATE ON users
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{id}', 'columns=id,v');
});
sub sql { return $node->safe_psql('postgres', $_[0]); }

# entries stay in the queue, so that the indexes have rows to check
sql(q{ALTER SYSTEM SET cachekit.redis_url = 'redis://127.0.0.1:1/0'});
sql(q{SELECT pg_reload_conf()});

my $script = "${PostgreSQL::Test::Utils::tmp_check}/cic.pgbench";
open my $fh, '>', $script or die "cannot write $script: $!";
print $fh "\\set id random(1, 500)\nUPDATE users SET v = v + 1 WHERE id = :id;\n";
close $fh;
my ($out, $err) = ('', '');
my $bench = IPC::Run::start(
	[ 'pgbench', '--no-vacuum', '-h', $node->host, '-p', $node->port,
	  '-c', '2', '-j', '2', '-T', '25', '-f', $script, 'postgres' ],
	'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(300));
ok(wait_for(sub { sql(q{SELECT count(*) FROM cachekit_queue}) > 1000 }, 60), 'writers are writing');

my @ddl = (
	q{CREATE INDEX CONCURRENTLY ck_expr ON cachekit_queue ((keys[1]))},
	q{CREATE INDEX CONCURRENTLY ck_partial ON cachekit_queue (enqueued_at) WHERE kind = 'w'},
	q{CREATE UNIQUE INDEX CONCURRENTLY ck_unique ON cachekit_queue (id, kind)},
	q{REINDEX INDEX CONCURRENTLY cachekit_queue_pkey},
	q{REINDEX TABLE CONCURRENTLY cachekit_queue},
	q{REINDEX INDEX CONCURRENTLY ck_expr});
for my $ddl (@ddl)
{
	my ($rc, $o, $e) = $node->psql('postgres', $ddl);
	is($rc, 0, "under write load: $ddl") or diag $e;
	sleep(0.5);
}
$bench->finish;
is($?, 0, 'pgbench finished without a failed transaction') or diag "$out\n$err";
unlike("$out\n$err", qr/ERROR|aborted/i, 'no writer saw an error');
like($out, qr/number of transactions actually processed: [1-9]/, 'the writers did write') or diag $out;

my @indexes = split /\n/, sql(q{SELECT indexrelid::regclass FROM pg_index
								WHERE indrelid = 'cachekit_queue'::regclass ORDER BY 1});
is(scalar(@indexes), 4, 'the queue has its key and three more indexes: ' . join(', ', @indexes));
for my $index (@indexes)
{
	my ($rc, $o, $e) = $node->psql('postgres', qq{SELECT bt_index_check('$index'::regclass, true)});
	is($rc, 0, "amcheck: every queue row is in $index") or diag $e;
}
is(sql(q{SET enable_seqscan = off; SELECT count(*) FROM cachekit_queue WHERE keys[1] = 'wt:7'}),
	sql(q{SET enable_indexscan = off; SET enable_bitmapscan = off;
		  SELECT count(*) FROM cachekit_queue WHERE keys[1] = 'wt:7'}),
	'the expression index finds what a scan of the table does');

# delivery resumes and empties the queue through all those indexes
sql(q{ALTER SYSTEM RESET cachekit.redis_url});
sql(q{SELECT pg_reload_conf()});
ok(wait_for(sub { sql(q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 120), 'the queue drained');
is(sql(q{SELECT count(*) FROM cachekit_dead_letter}), '0', 'no dead letters');
like(redis_cmd($redis, 'GET', 'wt:7'), qr/^\{"id":7,"v":\d+\}$/, 'write-through values arrived');

$node->stop;
done_testing();
