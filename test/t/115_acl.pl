# test/t/115_acl.pl -- least privilege: the worker delivers everything
# (deletes, write-through with a ttl, tags joined and left, tag flushes)
# as a Redis ACL user with exactly the commands the README lists, and each
# of those commands is needed: without any one of them delivery stops with
# a NOPERM naming it (EXISTS, which only makes tag flushes cheaper, is
# shown to be optional instead). Through Sentinel, ROLE and WAIT are needed
# as well.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CachekitTest;
use CachekitNet;
use CachekitFault;

# the README's list (section "Connecting to Redis", least privilege)
my @COMMANDS = qw(ping select script|load evalsha unlink
  type rename spop set sadd srem pttl pexpire persist exists);
# persist runs only when a key without a ttl joins a set a reader gave an
# expiry: the scenario has no such write, so it is not shown to be needed
my %NOT_EXERCISED = (persist => 1);
# exists only makes tag flushes cheaper: without it they take the TYPE
# checks, and everything is delivered all the same
my %OPTIONAL = (exists => 1);
my @SENTINEL_COMMANDS = qw(role wait);
my $PW = 'acl-User-pw';

sub setuser
{
	my ($r, @commands) = @_;
	redis_cmd($r, 'ACL', 'DELUSER', 'cachekit');
	redis_cmd($r, 'ACL', 'SETUSER', 'cachekit', 'on', ">$PW", 'resetkeys', '~*',
		'resetchannels', '-@all', map { "+$_" } @commands);
}

my $redis = start_redis();
setuser($redis, @COMMANDS);
my $url = "redis://cachekit:$PW\@127.0.0.1:${\ $redis->port}/1";
my $node = new_cachekit_node('acl', $url, 'cachekit.retry_max_delay' => '100ms');
$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_redis_connected($node, 'postgres', 60), 'connected as the ACL user');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
	CREATE TABLE items (id int PRIMARY KEY, team int NOT NULL, v text);
	CREATE TRIGGER items_wt AFTER INSERT OR UPDATE OR DELETE ON items
		FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=item:{id}', 'ttl=600', 'tag=team:{team}');
	CREATE TABLE pages (id int PRIMARY KEY, team int NOT NULL);
	CREATE TRIGGER pages_inv AFTER INSERT OR UPDATE OR DELETE ON pages
		FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('page:{id}', 'tag=team:{team}');
});

my $round = 0;

# One round of everything the worker sends: returns true when it all
# reached Redis db 1.
sub scenario
{
	my ($wait) = @_;
	$round++;
	my $base = $round * 10;
	redis_cmd($redis, '-n', '1', 'SET', "page:$base", 'cached');
	redis_cmd($redis, '-n', '1', 'SET', "list:$base", 'cached');
	redis_cmd($redis, '-n', '1', 'SADD', "tag:team:$base", "list:$base");
	# a reader's set with a short expiry, which a written key's ttl extends
	redis_cmd($redis, '-n', '1', 'SADD', 'tag:team:' . ($base + 1), "reader:$base");
	redis_cmd($redis, '-n', '1', 'EXPIRE', 'tag:team:' . ($base + 1), '30');
	sql(qq{
		INSERT INTO items VALUES ($base + 1, $base, 'a'), ($base + 2, $base, 'b');
		UPDATE items SET team = $base + 1 WHERE id = $base + 2;
		DELETE FROM items WHERE id = $base + 1;
		INSERT INTO pages VALUES ($base, $base);
		UPDATE pages SET team = $base WHERE id = $base;
	});
	return 0 if sql("SELECT cachekit_wait('$wait s')") ne 't';
	my $r = sub { redis_cmd($redis, '-n', '1', @_) };
	return $r->('EXISTS', "page:$base") eq '0'
	  && $r->('EXISTS', "list:$base") eq '0'
	  && $r->('EXISTS', 'item:' . ($base + 1)) eq '0'
	  && $r->('GET', 'item:' . ($base + 2)) =~ /"v":"b"/
	  && $r->('TTL', 'item:' . ($base + 2)) > 0
	  && $r->('SISMEMBER', 'tag:team:' . ($base + 1), 'item:' . ($base + 2)) eq '1'
	  # raised from the reader's 30 s to past the key's 600 s; a busy machine
	  # may take a few seconds between the write and this look
	  && $r->('TTL', 'tag:team:' . ($base + 1)) > 580;
}

ok(scenario(60), 'everything is delivered with exactly the listed commands');
is(sql('SELECT count(*) FROM cachekit_dead_letter'), '0', 'no dead letter');

# each command is needed: without it Redis refuses the worker (a NOPERM, or
# the error of a script that may not run it), and the worker retries
for my $missing (@COMMANDS)
{
	next if $missing eq 'select' || $missing eq 'ping';    # tested below
	next if $NOT_EXERCISED{$missing};
	setuser($redis, grep { $_ ne $missing } @COMMANDS);
	redis_cmd($redis, 'CLIENT', 'KILL', 'USER', 'cachekit');
	if ($OPTIONAL{$missing})
	{
		ok(scenario(60), "without +$missing everything is delivered all the same");
		setuser($redis, @COMMANDS);
		next;
	}
	my $f0 = cachekit_stats($node)->{failed_attempts};
	scenario(3);
	my $err;
	ok( wait_for(
			sub {
				my $st = cachekit_stats($node);
				$err = $st->{last_error} // '';
				$st->{failed_attempts} > $f0
				  && $err =~ /NOPERM|can't run this command/;
			},
			30),
		"without +$missing Redis refuses the worker")
	  or diag "last_error: $err";
	setuser($redis, @COMMANDS);
	redis_cmd($redis, 'CLIENT', 'KILL', 'USER', 'cachekit');
	ok(sql("SELECT cachekit_wait('60 s')") eq 't', "with +$missing back the queue drains");
}
sql(q{DELETE FROM cachekit_dead_letter});
ok(scenario(60), 'everything is delivered again');

# PING is what the worker sends on connecting to database 0
setuser($redis, grep { $_ ne 'ping' } @COMMANDS);
conf_set_and_reload($node, 'cachekit.redis_url', "redis://cachekit:$PW\@127.0.0.1:${\ $redis->port}/0");
ok(wait_for(sub { (cachekit_stats($node)->{last_error} // '') =~ /PING failed: NOPERM/ }, 30),
	'without +ping a connection to database 0 is refused');
setuser($redis, @COMMANDS);
ok(wait_for_redis_connected($node, 'postgres', 60), 'with +ping back it connects');
conf_set_and_reload($node, 'cachekit.redis_url', $url);
ok(wait_for_redis_connected($node, 'postgres', 60), 'and back to database 1');
setuser($redis, grep { $_ ne 'select' } @COMMANDS);
redis_cmd($redis, 'CLIENT', 'KILL', 'USER', 'cachekit');
sql(q{SELECT cachekit_delete('x')});
ok(wait_for(sub { (cachekit_stats($node)->{last_error} // '') =~ /SELECT failed: NOPERM/ }, 30),
	'without +select a URL with a database is refused');
setuser($redis, @COMMANDS);
ok(sql("SELECT cachekit_wait('60 s')") eq 't', 'with +select back the queue drains');
$node->stop;

# ---- through Sentinel: ROLE and WAIT too ------------------------------------------

my $group = start_sentinel_group();
setuser($_, @COMMANDS, @SENTINEL_COMMANDS) for $group->{master}, @{ $group->{replicas} };
my $snode = new_cachekit_node('acl_sentinel',
	sentinel_url($group, password => $PW) =~ s{://:}{://cachekit:}r,
	'cachekit.retry_max_delay' => '100ms');
$snode->safe_psql('postgres', 'CREATE EXTENSION cachekit');
ok(wait_for_redis_connected($snode, 'postgres', 60), 'Sentinel: connected as the ACL user');
redis_cmd($group->{master}, 'SET', 'sp:1', 'x');
$snode->safe_psql('postgres', q{SELECT cachekit_delete('sp:1')});
ok(wait_for(sub { !redis_exists($group->{master}, 'sp:1') }, 60), 'Sentinel: delivered as the ACL user');
for my $missing (@SENTINEL_COMMANDS)
{
	setuser($group->{master}, grep { $_ ne $missing } @COMMANDS, @SENTINEL_COMMANDS);
	redis_cmd($group->{master}, 'CLIENT', 'KILL', 'USER', 'cachekit');
	$snode->safe_psql('postgres', "SELECT cachekit_delete('sp:$missing')");
	ok( wait_for(sub { (cachekit_stats($snode)->{last_error} // '') =~ /\U$missing\E failed: NOPERM/ }, 30),
		"Sentinel: without +$missing the worker cannot deliver");
	setuser($group->{master}, @COMMANDS, @SENTINEL_COMMANDS);
	redis_cmd($group->{master}, 'CLIENT', 'KILL', 'USER', 'cachekit');
	ok($snode->safe_psql('postgres', "SELECT cachekit_wait('60 s')") eq 't',
		"Sentinel: with +$missing back the queue drains");
}
$snode->stop;
done_testing();
