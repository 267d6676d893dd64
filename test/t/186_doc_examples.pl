# test/t/186_doc_examples.pl -- every ```sql example in README.md and
# docs/*.md runs against a server with cachekit preloaded and a real Redis.
#
# How the examples are run (docs/README.md says the same for writers):
#  - each file gets a fresh public schema holding the prelude below (tables
#    users, products, orders with a few rows; roles app_owner, app,
#    monitoring, deployer, prometheus), then its ```sql blocks run in order,
#    each as one psql script that stops at the first error;
#  - the extension exists before a block runs, unless the block creates it
#    itself (then it is dropped first, so "CREATE EXTENSION cachekit" and
#    "CREATE EXTENSION cachekit VERSION '0.1.0'" examples work);
#  - a block preceded by the line <!-- example: skip (reason) --> is not run;
#    the reason is required;
#  - cachekit_* metric names in the expr: lines of ```yaml blocks (alert
#    rules) must be metrics of packaging/prometheus/queries.yaml.

use strict;
use warnings;

use File::Basename qw(basename);

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

my $PRELUDE = <<'SQL';
DROP SCHEMA IF EXISTS public CASCADE;
CREATE SCHEMA public;
GRANT ALL ON SCHEMA public TO PUBLIC;
DO $$
DECLARE r text;
BEGIN
	FOREACH r IN ARRAY ARRAY['app_owner', 'app', 'monitoring', 'deployer', 'prometheus'] LOOP
		IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
			EXECUTE pg_catalog.format('CREATE ROLE %I LOGIN', r);
		END IF;
	END LOOP;
END
$$;
CREATE TABLE public.users (id int PRIMARY KEY, email text, name text, team_id int);
CREATE TABLE public.products (id int PRIMARY KEY, sku text UNIQUE, name text, price numeric(10,2),
	active boolean DEFAULT true, meta jsonb, team_id int);
CREATE TABLE public.orders (id int PRIMARY KEY, user_id int, total numeric(10,2), status text);
INSERT INTO public.users SELECT g, 'user' || g || '@example.com', 'User ' || g, g % 10
	FROM pg_catalog.generate_series(1, 100) g;
INSERT INTO public.products SELECT g, 'SKU' || g, 'Product ' || g, g * 1.5, true, '{"color": "red"}', g % 10
	FROM pg_catalog.generate_series(1, 100) g;
INSERT INTO public.orders SELECT g, g % 100 + 1, g * 2.25, 'new'
	FROM pg_catalog.generate_series(1, 100) g;
SQL

# ---- the examples ---------------------------------------------------------------

# [ file, line, kind ('sql'/'yaml'), text, skip reason or undef ]
sub examples_of
{
	my ($file) = @_;
	my @lines = split /\n/, slurp_file($file), -1;
	my (@found, $in, $start, @body, $skip, $pending_skip, $bad_skip);
	for my $i (0 .. $#lines)
	{
		my $line = $lines[$i];
		if (defined $in)
		{
			if ($line =~ /^\s*```\s*$/)
			{
				push @found, [ $file, $start, $in, join("\n", @body) . "\n", $skip ];
				undef $in;
			}
			else
			{
				push @body, $line;
			}
			next;
		}
		if ($line =~ /^\s*```\s*(sql|yaml)\s*$/i)
		{
			($in, $start, $skip) = (lc $1, $i + 1, $pending_skip);
			@body = ();
			undef $pending_skip;
			next;
		}
		if ($line =~ /<!--\s*example:\s*skip\b(.*?)-->/)
		{
			my $reason = $1;
			$reason =~ s/^\s*\(?\s*|\s*\)?\s*$//g;
			$pending_skip = $reason;
			push @found, [ $file, $i + 1, 'bad-skip', $line, undef ] if $reason eq '';
			next;
		}
		undef $pending_skip if $line =~ /\S/;
	}
	return @found;
}

my @files = ('README.md', sort glob('docs/*.md'));
my @examples = map { examples_of($_) } @files;
my @sql = grep { $_->[2] eq 'sql' } @examples;
cmp_ok(scalar(@sql), '>=', 4, scalar(@sql) . ' sql examples in ' . join(', ', @files));

for my $bad (grep { $_->[2] eq 'bad-skip' } @examples)
{
	fail("$bad->[0]:$bad->[1]: a skipped example must say why: <!-- example: skip (reason) -->");
}

# ---- alert rules name real metrics ------------------------------------------------------

my %metric;
$metric{"cachekit_$_"} = 1
  for slurp_file('packaging/prometheus/queries.yaml') =~ /^ *- (\w+):\n *usage: "(?:GAUGE|COUNTER)"/mg;
ok(scalar(keys %metric) >= 5, 'queries.yaml defines metrics: ' . join(' ', sort keys %metric));
for my $ex (grep { $_->[2] eq 'yaml' } @examples)
{
	my @exprs = $ex->[3] =~ /^\s*expr:(.*)$/mg;
	my %used = map { $_ => 1 } map { /\b(cachekit_[a-z_]+)\b/g } @exprs;
	ok($metric{$_}, "$ex->[0]:$ex->[1]: alert rules use $_, a metric of queries.yaml")
	  for sort keys %used;
}

# ---- run them --------------------------------------------------------------------------

my $redis = start_redis();
my $node  = new_cachekit_node('docs', $redis);
my $skipped = 0;

for my $file (@files)
{
	my @blocks = grep { $_->[0] eq $file && $_->[2] eq 'sql' } @sql;
	next unless @blocks;
	$node->safe_psql('postgres', "SET client_min_messages = warning;\n$PRELUDE");
	for my $b (@blocks)
	{
		my (undef, $line, undef, $text, $skip) = @$b;
		if (defined $skip)
		{
			note "$file:$line skipped: $skip";
			$skipped++;
			next;
		}
		my $creates = $text =~ /\bCREATE\s+EXTENSION\s+(IF\s+NOT\s+EXISTS\s+)?"?cachekit\b/i;
		my $setup = $creates
		  ? 'DROP EXTENSION IF EXISTS cachekit CASCADE;'
		  : 'CREATE EXTENSION IF NOT EXISTS cachekit;';
		$node->safe_psql('postgres', "SET client_min_messages = error;\n$setup");
		my ($rc, $out, $err) = $node->psql('postgres', $text,
			extra_params => [ '-v', 'ON_ERROR_STOP=1' ]);
		is($rc, 0, "$file:$line runs")
		  or diag "--- example ---\n$text--- error ---\n$err";
	}
}
cmp_ok($skipped, '<=', 5, "few examples skipped ($skipped)");

$node->stop;
done_testing();
