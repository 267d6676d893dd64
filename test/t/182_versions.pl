# test/t/182_versions.pl -- versions and upgrade paths:
#  - the version lives in cachekit.control; META.json (PGXN meta spec 1.0.0,
#    checked here) and debian/changelog agree with it;
#  - sql/cachekit--0.1.0.sql is byte for byte the released file (git, when
#    the checkout is reachable, and a checksum kept here, which also works
#    on a copy of the tree without .git);
#  - every released version has an upgrade path to default_version, found
#    by walking the sql/cachekit--A--B.sql files and by the server, and each
#    version with an install script really gets there by ALTER EXTENSION
#    UPDATE;
#  - the installed scripts are the tree's.

use strict;
use warnings;

use Digest::SHA qw(sha256_hex);
use File::Basename qw(basename);
use IPC::Run ();
use JSON::PP ();

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;

# sql/cachekit--0.1.0.sql as released at commit 65f80a1
my $RELEASED_COMMIT = '65f80a1';
my %FROZEN = ('sql/cachekit--0.1.0.sql' =>
	  'ee590a5b127b1ed2b5665d20790e94ba3d68b7f51456c49c3fdd21ba9d30e5bc');

sub slurp_bytes
{
	my ($file) = @_;
	open my $fh, '<:raw', $file or die "cannot read $file: $!";
	local $/;
	my $data = <$fh>;
	close $fh;
	return $data;
}

# ---- one version, everywhere -------------------------------------------------

my $control = slurp_file('cachekit.control');
my ($version) = $control =~ /^default_version\s*=\s*'([^']+)'/m;
like($version, qr/^\d+\.\d+\.\d+$/, "cachekit.control: default_version = $version");

my ($deb_version) = slurp_file('debian/changelog') =~ /\Acachekit \(([^)]+)\)/;
like($deb_version // '', qr/^\Q$version\E-\d+$/,
	"debian/changelog's latest entry ($deb_version) is $version");

my $meta = eval { JSON::PP->new->decode(slurp_bytes('META.json')) };
ok($meta, 'META.json is valid JSON') or diag $@;
$meta //= {};

# PGXN Meta Spec 1.0.0: the required keys, and what we promise besides
for my $key (qw(name abstract version maintainer license provides meta-spec))
{
	ok(defined $meta->{$key}, "META.json has $key");
}
for my $key (qw(description prereqs resources tags))
{
	ok(defined $meta->{$key}, "META.json has $key");
}
is($meta->{name}, 'cachekit', 'META.json: name');
is($meta->{version}, $version, 'META.json: version agrees with cachekit.control');
is($meta->{'meta-spec'}{version}, '1.0.0', 'META.json: meta-spec 1.0.0');
like($meta->{'meta-spec'}{url} // '', qr{^https://pgxn\.org/meta/spec\.txt$}, 'META.json: meta-spec url');
my $provides = $meta->{provides}{cachekit} // {};
is($provides->{version}, $version, 'META.json: provides cachekit at the same version');
ok(defined $provides->{file} && -f $provides->{file}, "META.json: provided file $provides->{file} exists");
ok(defined $provides->{abstract}, 'META.json: provides has an abstract');
my $license = $meta->{license};
ok(!ref $license ? $license =~ /^\w+$/ : ref $license eq 'HASH', 'META.json: license is a name or a hash');
my $maint = $meta->{maintainer};
ok((!ref $maint && $maint =~ /\S/) || (ref $maint eq 'ARRAY' && @$maint), 'META.json: maintainer');
my $runtime = $meta->{prereqs}{runtime}{requires} // {};
like($runtime->{PostgreSQL} // '', qr/^>= 15\.0\.0, < 16\.0\.0$/, 'META.json: requires PostgreSQL 15');
ok(exists $runtime->{hiredis}, 'META.json: requires hiredis');
ok(ref $meta->{tags} eq 'ARRAY' && @{ $meta->{tags} }, 'META.json: tags');
ok(ref $meta->{resources} eq 'HASH', 'META.json: resources');
for my $r (sort keys %{ $meta->{resources} // {} })
{
	my $v = $meta->{resources}{$r};
	my @urls = ref $v eq 'HASH' ? grep { defined } @{$v}{qw(url web)} : ($v);
	like($_, qr{^(https|git)://}, "META.json: resources.$r is a URL") for @urls;
}
like($meta->{'release_status'} // 'stable', qr/^(stable|testing|unstable)$/, 'META.json: release_status');
is($meta->{abstract}, $provides->{abstract}, 'META.json: one abstract for the distribution and the extension');

# ---- frozen install scripts ---------------------------------------------------

for my $file (sort keys %FROZEN)
{
	is(sha256_hex(slurp_bytes($file)), $FROZEN{$file}, "$file has the released checksum");
}

SKIP:
{
	my $src = $ENV{CACHEKIT_SRC_DIR};
	skip 'no checkout (CACHEKIT_SRC_DIR) to ask git', scalar(keys %FROZEN)
	  unless defined $src && -e "$src/.git";
	my @git = ('git', '-c', 'safe.directory=*', '-C', $src);
	for my $file (sort keys %FROZEN)
	{
		my ($out, $err) = ('', '');
		my $ok = IPC::Run::run([ @git, 'show', "$RELEASED_COMMIT:$file" ], '>', \$out, '2>', \$err);
		skip "git cannot show $RELEASED_COMMIT:$file: $err", 1 unless $ok;
		is(sha256_hex($out), $FROZEN{$file}, "$file equals git show $RELEASED_COMMIT:$file");
	}
}

# ---- upgrade paths, from the file names -------------------------------------------

my (%install, %edge, %seen);
for my $f (map { basename($_) } glob('sql/cachekit--*.sql'))
{
	if ($f =~ /^cachekit--(.+?)--(.+)\.sql$/)
	{
		push @{ $edge{$1} }, $2;
		$seen{$1} = $seen{$2} = 1;
	}
	elsif ($f =~ /^cachekit--(.+)\.sql$/)
	{
		$install{$1} = $seen{$1} = 1;
	}
}
ok($install{'0.1.0'}, 'the 0.1.0 install script is there');
ok($seen{$version}, "some script leads to $version");

sub reaches
{
	my ($from, $to) = @_;
	my @todo = ($from);
	my %visited;
	while (defined(my $v = shift @todo))
	{
		return 1 if $v eq $to;
		next if $visited{$v}++;
		push @todo, @{ $edge{$v} // [] };
	}
	return 0;
}
for my $v (sort grep { $_ ne $version } keys %seen)
{
	ok(reaches($v, $version), "sql/: an upgrade path leads from $v to $version");
}

# ---- the server agrees, and the paths work ----------------------------------------

my $node = new_cachekit_node('versions', undef);
sub sql { return $node->safe_psql($_[1] // 'postgres', $_[0]); }

my $sharedir = sql(q{SELECT setting FROM pg_catalog.pg_config WHERE name = 'SHAREDIR'});
for my $f (sort glob('sql/cachekit--*.sql'), 'cachekit.control')
{
	my $installed = "$sharedir/extension/" . basename($f);
	ok(-f $installed && slurp_bytes($installed) eq slurp_bytes($f), "installed " . basename($f) . " is the tree's");
}
is(sql(q{SELECT default_version FROM pg_catalog.pg_available_extensions WHERE name = 'cachekit'}),
	$version, 'the server sees default_version');

my @versions = split /\n/, sql(q{SELECT version FROM pg_catalog.pg_available_extension_versions
                                 WHERE name = 'cachekit' AND version <> (SELECT default_version
                                   FROM pg_catalog.pg_available_extensions WHERE name = 'cachekit')
                                 ORDER BY 1});
ok(scalar(@versions), "released versions: @versions");
for my $v (@versions)
{
	isnt(sql(qq{SELECT path FROM pg_catalog.pg_extension_update_paths('cachekit')
	            WHERE source = '$v' AND target = '$version'}), '',
		"the server has a path from $v to $version");
}

my $n = 0;
for my $v (sort keys %install)
{
	next if $v eq $version;
	my $db = 'from_' . ++$n;
	sql("CREATE DATABASE $db");
	sql("SET client_min_messages = error; CREATE EXTENSION cachekit VERSION '$v'", $db);
	sql('SET client_min_messages = error; ALTER EXTENSION cachekit UPDATE', $db);
	is(sql(q{SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'cachekit'}, $db),
		$version, "CREATE EXTENSION VERSION '$v' then ALTER EXTENSION UPDATE gives $version");
}

$node->stop;
done_testing();
