# test/t/090_bad_input.pl -- awkward input:
#
#  - keys and tags with spaces, quotes, CR LF, braces, tabs, backslashes,
#    glob characters, non-ASCII characters and 10 kB of text reach Redis
#    byte for byte: through a trigger (key and tag), cachekit_delete, and
#    write-through (the key written, its JSON value, its delete). Exactly
#    those keys go; near misses (the same text without the CR, with a
#    different encoding, one byte shorter...) stay. Keys are created and
#    checked over a binary-safe RESP connection, never through redis-cli.
#  - NULL columns skip the keys and tags that use them.
#  - a malformed cachekit.redis_url in postgresql.conf is refused at reload
#    with a log line naming the setting (and no password); the worker keeps
#    running, same pid, and delivering with the old URL; a good URL then
#    takes effect.

use strict;
use warnings;

use Encode qw(decode_utf8 encode_utf8);
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitFault;

my $redis = start_redis();
my $node  = new_cachekit_node('badinput', $redis,
	-init                      => { extra => [ '--encoding=UTF8', '--locale=C' ] },
	'cachekit.retry_max_delay' => '200ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_worker($node, 'postgres', 30), 'worker is running');
is($node->safe_psql('postgres', 'SHOW server_encoding'), 'UTF8', 'server encoding UTF8');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub delivered { return sql(q{SELECT cachekit_wait('20 seconds')}) eq 't'; }

# an SQL literal of exactly these bytes (E'' with \x escapes)
sub lit
{
	my ($bytes) = @_;
	my $s = join '', map {
		my $o = ord $_;
		$_ eq "'" ? "\\'"
		  : $_ eq '\\' ? '\\\\'
		  : ($o >= 0x20 && $o < 0x7f) ? $_
		  : sprintf('\\x%02x', $o)
	} split //, $bytes;
	return "E'$s'";
}

sub show { my $s = $_[0]; $s = substr($s, 0, 40) . '...' if length $s > 43; $s =~ s/([^\x20-\x7e])/sprintf('\\x%02x', ord $1)/ge; return $s; }

# values (byte strings) and near misses of each
my $TENK = 'x' x 10240;
my @cases = (
	[ 'spaces',      'a b  c',                         [ 'a b c', 'ab  c', 'a b  c ' ] ],
	[ 'quotes',      q{it's "quoted" `x`},             [ q{it''s "quoted" `x`}, q{it\'s "quoted" `x`}, q{its "quoted" `x`} ] ],
	[ 'CR LF',       "line1\r\nline2",                 [ "line1\nline2", "line1\rline2", "line1\r\nline2\r\n", 'line1 line2' ] ],
	[ 'braces',      '{id}{{x}}}',                     [ '{id}{x}}', '{id}{{x}}', 'id{x}' ] ],
	[ 'tab',         "a\tb",                           [ 'a b', 'a\\tb', "a\t\tb" ] ],
	[ 'backslash',   'back\\slash\\n',                 [ 'back\\\\slash\\\\n', 'backslash', "back\\slash\n" ] ],
	[ 'glob',        'g*?[ab]$%^',                     [ 'gx?[ab]$%^', 'g*?a$%^', 'g*?[ab]' ] ],
	[ 'unicode',     encode_utf8("caf\x{e9} \x{2603} \x{1F600} \x{4e2d}"),
		[ "caf\xe9 " . encode_utf8("\x{2603} \x{1F600} \x{4e2d}"), encode_utf8("cafe\x{301} \x{2603} \x{1F600} \x{4e2d}"), 'caf? ? ? ?' ] ],
	[ 'padding',     '  pad  ',                        [ 'pad', ' pad ', '  pad' ] ],
	[ '10 kB',       $TENK . 'END',                    [ substr($TENK, 1) . 'END', $TENK . 'EN', $TENK . 'END ' ] ],
);

my %values = map { ($_->[1] => 1) } @cases;
for my $c (@cases)
{
	for my $nm (@{ $c->[2] })
	{
		die "near miss of $c->[0] equals a value" if $values{$nm} || $nm eq $c->[1];
	}
}

# check Redis: every key in @gone absent, every key in @stay present, and
# nothing else but @stay in Redis
sub check_exact
{
	my ($what, $gone, $stay) = @_;
	my @present_gone = grep { resp_exists($redis, $_) } @$gone;
	is(scalar @present_gone, 0, "$what: exactly those keys are gone")
	  or diag('still there: ' . join(', ', map { show($_) } @present_gone));
	my %want = map { ($_ => 1) } @$stay;
	my @all  = resp_all_keys($redis);
	my @missing = grep { !$want{$_} } @all;
	my %have = map { ($_ => 1) } @all;
	my @lost = grep { !$have{$_} } @$stay;
	is(scalar @lost, 0, "$what: every near miss survives (" . scalar(@$stay) . ' keys)')
	  or diag('deleted by mistake: ' . join(', ', map { show($_) } @lost));
	is(scalar @missing, 0, "$what: no other key in Redis")
	  or diag('unexpected: ' . join(', ', map { show($_) } @missing));
	return;
}

# ---- a trigger: key and tag from a column value ----------------------------

sql(q{
	CREATE TABLE odd(id serial PRIMARY KEY, name text);
	CREATE TRIGGER odd_cache AFTER INSERT OR UPDATE OR DELETE ON odd
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('obj:{name}', 'tag=grp:{name}');
});

my (@gone, @stay, @cmds);
for my $i (0 .. $#cases)
{
	my ($label, $v, $near) = @{ $cases[$i] };
	push @cmds, [ 'SET', "obj:$v", 'cached' ], [ 'SADD', "tag:grp:$v", "member:$i" ],
	  [ 'SET', "member:$i", 'cached' ];
	push @gone, "obj:$v", "tag:grp:$v", "member:$i";
	for my $j (0 .. $#$near)
	{
		my $nm = $near->[$j];
		push @cmds, [ 'SET', "obj:$nm", 'cached' ], [ 'SADD', "tag:grp:$nm", "near:$i:$j" ],
		  [ 'SET', "near:$i:$j", 'cached' ];
		push @stay, "obj:$nm", "tag:grp:$nm", "near:$i:$j";
	}
}
push @cmds, [ 'SET', 'keep', 'x' ];
push @stay, 'keep';
resp_pipeline($redis, @cmds);
my @before = resp_all_keys($redis);
is(scalar @before, scalar(@gone) + scalar(@stay), 'Redis holds every key and near miss');

sql('INSERT INTO odd(name) VALUES ' . join(', ', map { '(' . lit($_->[1]) . ')' } @cases));
is(sql(q{SELECT count(*) FROM odd}), scalar @cases, 'rows inserted');
is( sql(q{SELECT count(*) FROM odd WHERE name = } . lit($cases[2][1]) . q{ AND position(E'\r' IN name) > 0}),
	'1', 'the CR LF value is stored with its CR');
ok(delivered(), 'delivered');
check_exact('trigger', \@gone, \@stay);

# ---- cachekit_delete with the same strings -------------------------------

@gone = ();
my @raw_stay;
@cmds = ();
for my $c (@cases)
{
	push @cmds, [ 'SET', "raw:$c->[1]", 'x' ];
	push @gone, "raw:$c->[1]";
	for my $nm (@{ $c->[2] })
	{
		push @cmds, [ 'SET', "raw:$nm", 'x' ];
		push @raw_stay, "raw:$nm";
	}
}
resp_pipeline($redis, @cmds);
sql('SELECT cachekit_delete(' . join(', ', map { lit("raw:$_->[1]") } @cases) . ')');
ok(delivered(), 'delivered');
check_exact('cachekit_delete', \@gone, [ @stay, @raw_stay ]);

# ---- write-through: the key written is exact, and so is the value ----------

sql(q{
	CREATE TABLE wt(id int PRIMARY KEY, name text);
	CREATE TRIGGER wt_cache AFTER INSERT OR UPDATE OR DELETE ON wt
	FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=wt:{name}', 'columns=id,name');
});
sql('INSERT INTO wt VALUES ' . join(', ', map { "($_, " . lit($cases[$_][1]) . ')' } 0 .. $#cases));
ok(delivered(), 'delivered');
my $json = JSON::PP->new;
for my $i (0 .. $#cases)
{
	my ($label, $v) = @{ $cases[$i] };
	my $got = resp_try($redis, 'GET', "wt:$v");
	my $doc = defined $got && !ref $got ? eval { $json->decode(decode_utf8($got)) } : undef;
	ok( $doc && $doc->{id} == $i && encode_utf8($doc->{name}) eq $v,
		"write-through $label: the exact key holds the row with the exact value")
	  or diag('GET: ' . show($got // '(nil)'));
}
my @wt_keys = map { "wt:$_->[1]" } @cases;
check_exact('write-through', [], [ @stay, @raw_stay, @wt_keys ]);
sql('DELETE FROM wt');
ok(delivered(), 'delivered');
check_exact('write-through delete', \@wt_keys, [ @stay, @raw_stay ]);

# ---- NULL columns skip keys and tags -----------------------------------------

sql(q{
	CREATE TABLE people(id int PRIMARY KEY, email text, team text);
	CREATE TRIGGER people_cache AFTER INSERT OR UPDATE OR DELETE ON people
	FOR EACH ROW EXECUTE FUNCTION
	cachekit_invalidate('person:{id}', 'key=email:{email}', 'tag=team:{team}', 'key=pair:{email}:{team}');
});
my @null_near = ('email:', 'email:NULL', 'email:null', 'email:\\N', 'pair::', 'pair:a@x:',
	'pair::t1', 'tag:team:', 'tm:null');
resp_pipeline($redis,
	(map { [ 'SET', $_, 'x' ] } grep { !/^tag:/ } @null_near),
	[ 'SADD', 'tag:team:', 'tm:null' ],
	[ 'SADD', 'tag:team:t1', 'tm:1' ],
	[ 'MSET', 'person:1', 'x', 'person:2', 'x', 'email:a@x', 'x', 'tm:1', 'x' ]);
sql(q{INSERT INTO people VALUES (1, NULL, NULL)});
ok(delivered(), 'delivered');
ok(!resp_exists($redis, 'person:1'), 'NULLs: the key without NULL placeholders is deleted');
sql(q{UPDATE people SET email = 'a@x' WHERE id = 1});
ok(delivered(), 'delivered');
ok(!resp_exists($redis, 'email:a@x'), 'NULLs: the key of the new non-NULL e-mail is deleted');
ok(resp_exists($redis, 'tag:team:t1'), 'NULLs: no tag flushed for a NULL team');
sql(q{INSERT INTO people VALUES (2, NULL, 't1')});
ok(delivered(), 'delivered');
ok(!resp_exists($redis, 'person:2') && !resp_exists($redis, 'tag:team:t1') && !resp_exists($redis, 'tm:1'),
	'NULLs: the non-NULL tag of a row with a NULL e-mail is flushed');
my @null_lost = grep { !resp_exists($redis, $_) } @null_near;
is(scalar @null_lost, 0, 'NULLs: no key rendered from a NULL (email:, pair::, tag:team: ... all survive)')
  or diag('deleted: ' . join(', ', @null_lost));

# ---- a malformed cachekit.redis_url at reload --------------------------------

my $redis2 = start_redis();
my $pid    = worker_pid_activity($node);
my $old    = sql('SHOW cachekit.redis_url');
my $n      = 0;
for my $bad (
	[ 'http://127.0.0.1:6379/0',                          qr/must start with redis:\/\// ],
	[ 'redis://:hunter2-Secret@127.0.0.1:99999/0',        qr/port must be a number/ ],
	[ 'redis://127.0.0.1:6379/zero',                      qr/database must be a number/ ],
	[ 'redis://127.0.0.1:6379/0 trailing',                qr/port must be a number|unexpected text|database must be a number/ ])
{
	my ($url, $why) = @$bad;
	$n++;
	my $off = log_offset($node);
	conf_set_and_reload($node, 'cachekit.redis_url', $url);
	ok(wait_for(sub { log_since($node, $off) =~ /invalid cachekit\.redis_url/ }, 20),
		"bad URL $n: refused at reload");
	my $seg = log_since($node, $off);
	my ($line) = $seg =~ /^(.*invalid cachekit\.redis_url.*)$/m;
	diag("bad URL $n: log: $line");
	like($line, $why, "bad URL $n: the log line says what is wrong");
	unlike($seg, qr/hunter2-Secret/, "bad URL $n: no password in the log");
	is(sql('SHOW cachekit.redis_url'), $old, "bad URL $n: the old URL stays in force");
	is(worker_pid_activity($node), $pid, "bad URL $n: the worker runs on (same pid)");
	redis_cmd($redis, 'SET', "after:bad$n", 'x');
	sql(qq{SELECT cachekit_delete('after:bad$n')});
	ok(wait_for(sub { !redis_exists($redis, "after:bad$n") }, 20),
		"bad URL $n: the worker delivers with the old URL");
}

# fixing it: a good URL (another server) takes effect
my $good = redis_url($redis2);
conf_set_and_reload($node, 'cachekit.redis_url', $good);
ok(wait_for(sub { sql('SHOW cachekit.redis_url') eq $good }, 20), 'the fixed URL is accepted');
redis_cmd($_, 'SET', 'moved', 'x') for $redis, $redis2;
sql(q{SELECT cachekit_delete('moved')});
ok(wait_for(sub { !redis_exists($redis2, 'moved') }, 20), 'delivered to the server of the fixed URL');
ok(redis_exists($redis, 'moved'), 'the old server is no longer used');
is(worker_pid_activity($node), $pid, 'still the same worker');
is(cachekit_stats($node)->{dead_letters}, '0', 'no dead letters');
unlike(slurp_file($node->logfile), qr/hunter2-Secret/, 'the password never reached the log');

$node->stop;
stop_redis($redis2);
stop_redis($redis);
done_testing();
