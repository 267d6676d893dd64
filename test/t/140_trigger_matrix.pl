# test/t/140_trigger_matrix.pl -- no trigger definition crashes the server
# (issue 9, item 2).
#
# Every combination of: trigger function (cachekit_invalidate,
# cachekit_write_through), events (INSERT, UPDATE, DELETE, TRUNCATE and
# several at once), level (ROW, STATEMENT), transition tables (none, OLD,
# NEW, both), a WHEN clause or UPDATE OF a column, the table (plain,
# partitioned, a partition, an inheritance parent, an inheritance child)
# and templates with or without placeholders. Each CREATE TRIGGER either
# fails with a clear error (an errcode outside class XX) or the trigger
# works: every statement of a workload on its table succeeds (INSERT,
# UPDATE, UPDATE OF the key, DELETE, two UPDATEs in one query, an INSERT in
# a rolled-back savepoint followed by TRUNCATE in the same transaction,
# TRUNCATE). Then a trigger defined before CREATE TRIGGER checked anything
# (INSERT OR TRUNCATE with a placeholder, made by editing pg_trigger) gets
# a clear error at TRUNCATE where 0.1.0 crashed the backend. The postmaster
# must never have restarted.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $node = new_cachekit_node('matrix', undef);
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
my $started = $node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()');

$node->safe_psql('postgres', <<'EOF');
CREATE TABLE plain (id int, v text);
CREATE TABLE parted (id int, v text) PARTITION BY LIST (v);
CREATE TABLE parted_a PARTITION OF parted FOR VALUES IN ('a');
CREATE TABLE parted_b PARTITION OF parted FOR VALUES IN ('b');
CREATE TABLE inh_parent (id int, v text);
CREATE TABLE inh_child () INHERITS (inh_parent);

CREATE TABLE matrix_result (fn text, events text, level text, trans text, variant text,
							tbl text, tpl text, step text, state text, msg text);

-- one trigger definition and its workload; each step's outcome is recorded
CREATE FUNCTION run_combo(fn text, events text, level text, trans text, variant text,
						  tbl text, tpl text) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
	refs text := CASE trans WHEN 'none' THEN '' WHEN 'old' THEN 'REFERENCING OLD TABLE AS o'
				 WHEN 'new' THEN 'REFERENCING NEW TABLE AS n'
				 ELSE 'REFERENCING OLD TABLE AS o NEW TABLE AS n' END;
	ev text := CASE WHEN variant = 'update_of' THEN replace(events, 'UPDATE', 'UPDATE OF id') ELSE events END;
	cond text := CASE WHEN variant = 'when' THEN 'WHEN (pg_trigger_depth() < 5)' ELSE '' END;
	args text := CASE
		WHEN fn = 'cachekit_write_through' AND tpl = 'placeholders' THEN '''key=k:{id}:{v}'', ''tag=t:{v}'', ''columns=id,v'''
		WHEN fn = 'cachekit_write_through' THEN '''key=k'', ''tag=all'''
		WHEN tpl = 'placeholders' THEN '''k:{id}:{v}'', ''tag=t:{v}'''
		ELSE '''k:all'', ''tag=all''' END;
	steps text[] := ARRAY[
		format('INSERT INTO %s VALUES (1, ''a''), (2, ''a'')', tbl),
		format('UPDATE %s SET v = v', tbl),
		format('UPDATE %s SET id = id + 10', tbl),
		format('WITH x AS (UPDATE %1$s SET v = v WHERE id = 11 RETURNING 1) UPDATE %1$s SET id = id + 1 WHERE id = 12', tbl),
		format('DELETE FROM %s WHERE id = 11', tbl),
		format('TRUNCATE %s', tbl)];
	step text;
	st text;
	m text;
BEGIN
	BEGIN
		EXECUTE format('CREATE TRIGGER ck AFTER %s ON %s %s FOR EACH %s %s EXECUTE FUNCTION %s(%s)',
					   ev, tbl, refs, level, cond, fn, args);
	EXCEPTION WHEN OTHERS THEN
		GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, m = MESSAGE_TEXT;
		INSERT INTO matrix_result VALUES (fn, events, level, trans, variant, tbl, tpl, 'create', st, m);
		RETURN 0;
	END;
	INSERT INTO matrix_result VALUES (fn, events, level, trans, variant, tbl, tpl, 'create', 'ok', NULL);
	FOREACH step IN ARRAY steps LOOP
		BEGIN
			EXECUTE step;
			st := 'ok';
			m := NULL;
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, m = MESSAGE_TEXT;
		END;
		INSERT INTO matrix_result VALUES (fn, events, level, trans, variant, tbl, tpl, step, st, m);
	END LOOP;
	-- issue 9's crash: an INSERT rolled back in a savepoint, then TRUNCATE
	BEGIN
		BEGIN
			EXECUTE format('INSERT INTO %s VALUES (3, ''a'')', tbl);
			RAISE EXCEPTION 'roll back' USING ERRCODE = 'P0001';
		EXCEPTION WHEN raise_exception THEN
			NULL;
		END;
		EXECUTE format('TRUNCATE %s', tbl);
		st := 'ok';
		m := NULL;
	EXCEPTION WHEN OTHERS THEN
		GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, m = MESSAGE_TEXT;
	END;
	INSERT INTO matrix_result VALUES (fn, events, level, trans, variant, tbl, tpl, 'savepoint, then TRUNCATE', st, m);
	EXECUTE format('DROP TRIGGER ck ON %s', tbl);
	RETURN 1;
END $$;
EOF

my @events = ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'INSERT OR TRUNCATE',
	'INSERT OR UPDATE OR DELETE', 'INSERT OR UPDATE OR DELETE OR TRUNCATE', 'UPDATE OR DELETE');
my $values = sub { join ', ', map { "('$_')" } @_ };

# one transaction per function and table, so that a failure stays readable
for my $fn ('cachekit_invalidate', 'cachekit_write_through')
{
	for my $tbl ('plain', 'parted', 'parted_a', 'inh_parent', 'inh_child')
	{
		my ($rc, $out, $err) = $node->psql('postgres', <<"EOF");
SELECT sum(run_combo('$fn', e, l, t, w, '$tbl', p))
FROM (VALUES @{[ $values->(@events) ]}) AS ev(e),
	 (VALUES ('ROW'), ('STATEMENT')) AS lv(l),
	 (VALUES ('none'), ('old'), ('new'), ('both')) AS tr(t),
	 (VALUES ('plain'), ('when'), ('update_of')) AS va(w),
	 (VALUES ('placeholders'), ('literal')) AS tp(p)
WHERE w <> 'update_of' OR e LIKE '%UPDATE%';
EOF
		is($rc, 0, "$fn on $tbl: every definition ran ($out)") or diag($err);
	}
}

my $total = $node->safe_psql('postgres', q{SELECT count(*) FROM matrix_result WHERE step = 'create'});
my $created = $node->safe_psql('postgres',
	q{SELECT count(*) FROM matrix_result WHERE step = 'create' AND state = 'ok'});
note("$total trigger definitions, $created created");
ok($total >= 2000, "the matrix holds $total definitions");
ok($created >= 200, "$created of them are valid triggers");

is($node->safe_psql('postgres', q{
	SELECT string_agg(format('%s %s %s %s %s %s %s: %s', fn, events, level, trans, variant, tbl, tpl, msg), E'\n')
	FROM matrix_result WHERE step = 'create' AND state <> 'ok' AND (state LIKE 'XX%' OR state = '')}),
	'', 'every refused definition has a clear errcode');

is($node->safe_psql('postgres', q{
	SELECT string_agg(format('%s %s %s %s %s %s %s [%s]: %s %s', r.fn, r.events, r.level, r.trans,
							 r.variant, r.tbl, r.tpl, r.step, r.state, r.msg), E'\n')
	FROM matrix_result r
	WHERE r.step <> 'create' AND r.state <> 'ok'}),
	'', 'every created trigger works: no statement on its table fails');

# the cachekit refusals name the trigger
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM matrix_result
	WHERE step = 'create' AND msg LIKE '%trigger "ck"%' AND state NOT IN ('22023', '39P01', '0A000', '42703')}),
	'0', 'cachekit refusals carry their errcodes');
ok($node->safe_psql('postgres', q{
	SELECT count(*) FROM matrix_result WHERE step = 'create'
	AND events LIKE '%TRUNCATE%' AND tpl = 'placeholders' AND state = 'ok'}) eq '0',
	'no trigger firing on TRUNCATE with placeholders was created');

# a definition from before CREATE TRIGGER checked anything: 0.1.0 parsed
# it for the INSERT and crashed the backend at the TRUNCATE
$node->safe_psql('postgres', q{
	CREATE TABLE legacy (id int);
	CREATE TRIGGER ck AFTER INSERT ON legacy REFERENCING NEW TABLE AS n
		FOR EACH STATEMENT EXECUTE FUNCTION cachekit_invalidate('t:{id}');
	UPDATE pg_trigger SET tgtype = tgtype | 32 WHERE tgname = 'ck' AND tgrelid = 'legacy'::regclass;
});
my ($rc, $out, $err) = $node->psql('postgres', q{
	BEGIN;
	SAVEPOINT s;
	INSERT INTO legacy VALUES (1);
	ROLLBACK TO SAVEPOINT s;
	TRUNCATE legacy;
	COMMIT;
});
like($err, qr/a TRUNCATE trigger has no rows, so its templates cannot have \{column\} placeholders/,
	'a legacy INSERT OR TRUNCATE trigger with a placeholder: a clear error at TRUNCATE');
($rc, $out, $err) = $node->psql('postgres', q{
	BEGIN;
	INSERT INTO legacy VALUES (1);
	TRUNCATE legacy;
	COMMIT;
}, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  22023:/, '... with its errcode, also right after a successful INSERT');
# and preview renders the same refusal instead of crashing
($rc, $out, $err) = $node->psql('postgres',
	q{SELECT * FROM cachekit_preview('legacy', 'ck', NULL::legacy, NULL::legacy)});
like($err, qr/a TRUNCATE trigger has no rows/, 'cachekit_preview of that TRUNCATE: the same error');

is($node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()'), $started,
	'the postmaster never restarted');
my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|server process .* was terminated/,
	'no backend died');

done_testing();
