# test/t/142_pg_upgrade.pl -- pg_upgrade keeps cachekit triggers whole
# (issue 9, item 3).
#
# pg_upgrade recreates every trigger with CREATE TRIGGER in binary-upgrade
# mode, where PostgreSQL records no dependencies but its own. cachekit,
# preloaded in the new cluster, records the triggers' dependencies on the
# columns they name there too, without refusing any trigger (one that
# 0.1.0 accepted and 0.2.0 would refuse must not fail the upgrade).
# Afterwards DROP COLUMN of a used column is still refused, and the
# triggers and the dead letters work as before.

use strict;
use warnings;

use Cwd qw(getcwd);
use File::Temp ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $old = new_cachekit_node('upold', undef);
$old->safe_psql('postgres', 'CREATE EXTENSION cachekit');
$old->safe_psql('postgres', <<'EOF');
CREATE TABLE users (id int PRIMARY KEY, email text, team_id int, note text);
CREATE TRIGGER users_cache AFTER INSERT OR UPDATE OR DELETE ON users
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('user:{id}', 'key=user:email:{email}', 'tag=team:{team_id}');
CREATE TABLE products (id int PRIMARY KEY, sku text, price numeric);
CREATE TRIGGER products_cache AFTER INSERT OR UPDATE OR DELETE ON products
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=product:{sku}', 'columns=id,sku');
CREATE TABLE orders (id int, region text) PARTITION BY LIST (region);
CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
CREATE TRIGGER orders_cache AFTER INSERT ON orders
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('order:{id}');
-- issue 9's trigger, which 0.1.0 accepted and CREATE TRIGGER refuses
-- since 0.2.0: AFTER INSERT OR TRUNCATE FOR EACH STATEMENT with a placeholder
CREATE TABLE legacy (id int);
CREATE TRIGGER legacy_cache AFTER TRUNCATE ON legacy
	FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('legacy');
UPDATE pg_trigger SET tgtype = tgtype | 4, tgargs = convert_to('legacy:{id}', 'UTF8') || '\x00'::bytea
WHERE tgname = 'legacy_cache';
INSERT INTO cachekit_dead_letter (id, kind, keys, ttl, attempts, error, enqueued_at)
VALUES (nextval('cachekit_queue_id_seq'), 'i', '{dead:1}', 0, 5, 'WRONGTYPE', now());
EOF

# the dependencies a query finds, as "trigger.column" lines
my $deps_sql = q{
	SELECT string_agg(t.tgname || '.' || a.attname, ' ' ORDER BY t.tgname, a.attname)
	FROM pg_depend d JOIN pg_trigger t ON t.oid = d.objid
		JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
	WHERE d.classid = 'pg_trigger'::regclass AND d.refclassid = 'pg_class'::regclass
};
my $deps = $old->safe_psql('postgres', $deps_sql);
like($deps, qr/users_cache\.team_id/, "before: the triggers depend on their columns ($deps)");
$old->stop;

my $new = new_cachekit_node('upnew', undef, -start => 0);
my $bindir = $old->config_data('--bindir');
my $dir = File::Temp::tempdir(CLEANUP => 1);
my $cwd = getcwd();
chdir $dir or die "cannot chdir to $dir: $!";
command_ok(
	[
		'pg_upgrade', '--no-sync',
		'-d', $old->data_dir, '-D', $new->data_dir,
		'-b', $bindir, '-B', $bindir,
		'-s', $new->host, '-p', $old->port, '-P', $new->port
	],
	'pg_upgrade to a cluster that preloads cachekit');
chdir $cwd;
$new->start;

is($new->safe_psql('postgres', $deps_sql), "legacy_cache.id $deps",
	'after: the same dependencies, and those of the trigger that had none');
my ($rc, $out, $err) = $new->psql('postgres', 'ALTER TABLE users DROP COLUMN team_id');
like($err, qr/trigger users_cache on table users depends on column team_id/,
	'DROP COLUMN of a used column is still refused');
$new->safe_psql('postgres', 'ALTER TABLE users DROP COLUMN note');
$new->safe_psql('postgres', q{
	INSERT INTO users VALUES (1, 'a@x', 7);
	INSERT INTO products VALUES (1, 'p-1', 2);
	INSERT INTO orders VALUES (5, 'eu');
});
is($new->safe_psql('postgres',
		q{SELECT string_agg(kind::text || ':' || array_to_string(keys || tags, ','), ' ' ORDER BY id) FROM cachekit_queue}),
	'i:user:1,user:email:a@x,team:7 w:product:p-1 i:order:5',
	'the triggers enqueue as before');
is($new->safe_psql('postgres', q{SELECT count(*) FROM pg_trigger WHERE tgname = 'legacy_cache'}),
	'1', 'the trigger 0.2.0 would refuse came along');
is($new->safe_psql('postgres', 'SELECT array_to_string(keys, \',\') FROM cachekit_dead_letter'),
	'dead:1', 'the dead letter is still there');
unlike(slurp_file($new->logfile), qr/terminated by signal/, 'no backend died');

done_testing();
