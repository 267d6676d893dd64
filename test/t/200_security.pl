# test/t/200_security.pl -- the worker runs no code a non-superuser can plant.
#
# The worker is a superuser connected to the served database. Its owner, an
# ordinary role, plants look-alikes of what the worker's queries call
# (quote_ident, unnest, the comparison and arithmetic operators) in public
# and in a schema named after the worker's user, points the database's
# search_path at them, and sets what would break a pass (a read-only
# default, tiny timeouts, serializable, exit_on_error). After a reload, a
# worker restart and DROP/CREATE EXTENSION the owner is still no superuser,
# none of the planted functions ever ran, and delivery goes on.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $redis = start_redis();
my $node  = new_cachekit_node('security', $redis,
	'cachekit.retry_max_delay' => '200ms', 'cachekit.max_attempts' => 100000);
my $super = $node->safe_psql('postgres', 'SELECT current_user');

# The test's own sessions run as another superuser whose role settings
# (which win over the database's) undo what the owner sets below; the
# worker connects as the bootstrap superuser and gets the database's.
$node->safe_psql('postgres', q{
	CREATE ROLE tester SUPERUSER LOGIN;
	ALTER ROLE tester SET search_path = public, pg_catalog;
	ALTER ROLE tester SET default_transaction_read_only = off;
	ALTER ROLE tester SET statement_timeout = 0;
	ALTER ROLE tester SET lock_timeout = 0;
	ALTER ROLE tester SET idle_in_transaction_session_timeout = 0;
	ALTER ROLE tester SET default_transaction_isolation = 'read committed';
	ALTER ROLE tester SET default_transaction_deferrable = off;
	ALTER ROLE tester SET exit_on_error = off;
	ALTER ROLE tester SET transform_null_equals = off;
});

sub sql
{
	return $node->safe_psql('postgres', $_[0], extra_params => [ '-U', 'tester' ]);
}

sub as_owner
{
	my ($query, $db) = @_;
	return $node->safe_psql($db // 'postgres', $query, extra_params => [ '-U', 'mallory' ]);
}

sql(q{CREATE ROLE mallory LOGIN});
# the owner's own sessions must outlive the timeouts it sets its database
sql(q{ALTER ROLE mallory SET statement_timeout = 0});
sql(q{ALTER ROLE mallory SET lock_timeout = 0});
sql(q{ALTER ROLE mallory SET idle_in_transaction_session_timeout = 0});
sql(q{ALTER DATABASE postgres OWNER TO mallory});
sql(q{CREATE EXTENSION cachekit});
ok(wait_for_worker($node, 'postgres', 60), 'worker is running');

# the owner may create in public (PostgreSQL 15: public belongs to the
# database owner) and any schema, and record every call of its functions
as_owner(q{CREATE TABLE public.planted_calls (fn text, by_role text, at timestamptz DEFAULT now())});
as_owner(q{GRANT INSERT ON public.planted_calls TO PUBLIC});
as_owner(qq{CREATE SCHEMA "$super"});

# a planted function records its call and tries to make its owner superuser
sub plant
{
	my ($schema, $name, $args, $returns, $result, $db) = @_;
	as_owner(sprintf(q{
		CREATE FUNCTION %s.%s(%s) RETURNS %s LANGUAGE plpgsql AS $f$
		BEGIN
			INSERT INTO public.planted_calls (fn, by_role) VALUES ('%s', current_user);
			BEGIN
				EXECUTE 'ALTER ROLE mallory SUPERUSER';
			EXCEPTION WHEN OTHERS THEN NULL;
			END;
			%s;
		END $f$}, $schema, $name, $args, $returns, $name, $result), $db);
}

for my $schema ('public', qq{"$super"})
{
	plant($schema, 'quote_ident', 'name', 'text', 'RETURN pg_catalog.quote_ident($1::text)');
	plant($schema, 'unnest', 'bigint[]', 'SETOF bigint',
		'RETURN QUERY SELECT pg_catalog.unnest($1)');
	plant($schema, 'unnest', 'text[]', 'SETOF text',
		'RETURN QUERY SELECT pg_catalog.unnest($1)');
	plant($schema, 'planted_eq', 'bigint, bigint', 'boolean',
		'RETURN $1 OPERATOR(pg_catalog.=) $2');
	plant($schema, 'planted_ge', 'bigint, bigint', 'boolean',
		'RETURN $1 OPERATOR(pg_catalog.>=) $2');
	plant($schema, 'planted_plus', 'integer, integer', 'integer',
		'RETURN $1 OPERATOR(pg_catalog.+) $2');
	as_owner(qq{CREATE OPERATOR $schema.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = $schema.planted_eq)});
	as_owner(qq{CREATE OPERATOR $schema.>= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = $schema.planted_ge)});
	as_owner(qq{CREATE OPERATOR $schema.+ (LEFTARG = integer, RIGHTARG = integer, FUNCTION = $schema.planted_plus)});
}

# the planted objects work, so the test would notice if the worker used them
as_owner(q{SELECT public.quote_ident('x'::name)});
as_owner(q{ALTER ROLE mallory IN DATABASE postgres SET search_path = public});
is(sql(q{SELECT count(*) FROM public.planted_calls}), '1', 'a planted function records its calls');
sql(q{DELETE FROM public.planted_calls});

# settings the owner may give its database, and its own role
as_owner(qq{ALTER DATABASE postgres SET search_path = "$super", public, pg_catalog});
for my $setting (
	q{statement_timeout = '1ms'},
	q{lock_timeout = '1ms'},
	q{idle_in_transaction_session_timeout = '1ms'},
	q{default_transaction_isolation = 'serializable'},
	q{default_transaction_deferrable = on},
	q{exit_on_error = on},
	q{vacuum_cost_delay = '100ms'},
	q{force_parallel_mode = on},
	q{enable_indexscan = off},
	q{transform_null_equals = on},
	q{default_transaction_read_only = on})    # last: it applies to the owner too
{
	as_owner(qq{ALTER DATABASE postgres SET $setting});
}

# the worker restarts from time to time: each must stay clean
my $n = 0;
sub check_clean
{
	my ($when) = @_;
	$n++;
	my @keys = map { "sec:$n:$_" } 1 .. 20;
	redis_cmd($redis, 'SET', $_, 'x') for @keys;
	# entries refused once go through the retry statement (attempts + 1)
	redis_cmd($redis, 'SET', "tag:sec:$n", 'not a set');
	sql("SELECT cachekit_delete(" . join(',', map { "'$_'" } @keys) . ")");
	sql("SELECT cachekit_flush_tag('sec:$n')");
	ok(wait_for(sub { !grep { redis_exists($redis, $_) } @keys }, 60),
		"$when: the worker still delivers");
	ok(wait_for(sub { sql(q{SELECT count(*) FROM cachekit_queue WHERE attempts > 0}) > 0 }, 60),
		"$when: a refused entry was counted");
	redis_cmd($redis, 'DEL', "tag:sec:$n");
	ok(wait_for(sub { sql(q{SELECT count(*) FROM cachekit_queue}) eq '0' }, 60),
		"$when: the refused entry was delivered on retry");
	is(sql(q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}), 'f',
		"$when: the database owner is no superuser");
	is(sql(q{SELECT coalesce(string_agg(DISTINCT fn || ' as ' || by_role, ', '), '') FROM public.planted_calls}),
		'', "$when: no planted function or operator was run");
}

sub worker_pid { return sql(q{SELECT worker_pid FROM cachekit_stats}); }

check_clean('at first');

sql(q{SELECT pg_reload_conf()});
check_clean('after a reload');

my $old = worker_pid();
sql(q{SELECT pg_terminate_backend(worker_pid) FROM cachekit_stats});
ok(wait_for(sub { my $p = worker_pid(); $p ne '' && $p ne $old }, 60),
	'a new worker started after the old one was terminated');
check_clean('after a worker restart');

sql(q{DROP EXTENSION cachekit});
sql(q{CREATE EXTENSION cachekit});
check_clean('after DROP and CREATE EXTENSION');

# CREATE EXTENSION in another database of the owner's, one the worker does
# not serve: the install script's closing check (which warns about that)
# must not call a look-alike such as format(text, name, text), a closer
# match for its arguments than pg_catalog's variadic format
sql(q{CREATE DATABASE mallorys OWNER mallory});
as_owner(q{CREATE TABLE public.planted_calls (fn text, by_role text, at timestamptz DEFAULT now());
		   GRANT INSERT ON public.planted_calls TO PUBLIC}, 'mallorys');
plant('public', 'format', 'text, name, text', 'text', 'RETURN $1', 'mallorys');
plant('public', 'current_setting', 'name, boolean', 'text', 'RETURN NULL', 'mallorys');
plant('public', 'current_database', '', 'name', q{RETURN 'x'}, 'mallorys');
$node->safe_psql('mallorys', 'CREATE EXTENSION cachekit', extra_params => [ '-U', 'tester' ]);
is(sql(q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}), 'f',
	'CREATE EXTENSION in the owner\'s other database: the owner is no superuser');
is($node->safe_psql('mallorys', q{SELECT count(*) FROM public.planted_calls}), '0',
	'and the install script ran none of its functions');

# the worker's log shows no failed pass: the settings did not reach it
my $log = slurp_file($node->logfile);
unlike($log, qr/cachekit worker pass failed/, 'no pass failed');
unlike($log, qr/read-only transaction|canceling statement due to/,
	'the read-only default and timeouts did not reach the worker');

$node->stop;
done_testing();
