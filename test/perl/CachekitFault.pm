# test/perl/CachekitFault.pm -- extra helpers for the fault-injection tests
# (test/t/070-099): a binary-safe RESP client, a misbehaving fake Redis,
# the cachekit worker's process, its memory, and the server log.
#
#   use CachekitTest;
#   use CachekitFault;
#
#   resp_cmd($redis, 'SET', "a\r\nb", 'x');        # any bytes, no redis-cli
#   my $fake = start_fake_redis(error => 'LOADING Redis is loading the dataset in memory');
#   ... cachekit.redis_url = $fake->url ...
#   fake_commands($fake);                          # what it was sent
#   stop_fake_redis($fake);
#
# Every fake server started here is killed when the test script exits.

package CachekitFault;

use strict;
use warnings;

use Carp qw(croak);
use Digest::SHA qw(sha1_hex);
use Exporter qw(import);
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes ();

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT = qw(
  resp_cmd resp_try resp_pipeline resp_exists resp_all_keys resp_fill resp_calls
  start_fake_redis stop_fake_redis fake_commands
  start_fault_proxy fault_proxy_rules fault_proxy_log start_monitor monitor_lines
  worker_pid_activity worker_activity wait_worker_busy wait_new_worker
  proc_status log_offset log_since count_matches conf_set_and_reload
  dead_url
);

our $RESP_TIMEOUT = 15;

##########################################################################
# a RESP client over a plain socket: arguments and replies are bytes
##########################################################################

# A Redis error reply, returned by resp_try and resp_pipeline.
package CachekitFault::Error {
	sub new { my ($c, $m) = @_; return bless { message => $m }, $c; }
	sub message { return $_[0]{message}; }
}

sub _resp_encode
{
	my @args = @_;
	my $out = '*' . scalar(@args) . "\r\n";
	for my $a (@args)
	{
		my $b = $a;
		utf8::encode($b) if utf8::is_utf8($b);
		$out .= '$' . length($b) . "\r\n" . $b . "\r\n";
	}
	return $out;
}

sub _resp_connect
{
	my ($r) = @_;
	my $sock = IO::Socket::INET->new(
		PeerAddr => $r->{host} // '127.0.0.1',
		PeerPort => $r->{port},
		Proto    => 'tcp',
		Timeout  => 5) or croak "cannot connect to redis port $r->{port}: $!";
	binmode $sock;
	my $c = { sock => $sock, buf => '' };
	if (defined $r->{password})
	{
		_send($c, _resp_encode('AUTH', $r->{password}));
		my $reply = _read_reply($c);
		croak 'AUTH failed: ' . $reply->message if ref $reply eq 'CachekitFault::Error';
	}
	return $c;
}

sub _send
{
	my ($c, $data) = @_;
	my $off = 0;
	while ($off < length $data)
	{
		my $n = syswrite($c->{sock}, $data, length($data) - $off, $off);
		croak "write to redis failed: $!" unless defined $n;
		$off += $n;
	}
	return;
}

sub _fill
{
	my ($c) = @_;
	my $sel = IO::Select->new($c->{sock});
	croak "redis did not answer within ${RESP_TIMEOUT}s" unless $sel->can_read($RESP_TIMEOUT);
	my $n = sysread($c->{sock}, my $chunk, 1 << 20);
	croak "read from redis failed: $!" unless defined $n;
	croak 'redis closed the connection' if $n == 0;
	$c->{buf} .= $chunk;
	return;
}

sub _read_line
{
	my ($c) = @_;
	my $i;
	_fill($c) while ($i = index($c->{buf}, "\r\n")) < 0;
	my $line = substr($c->{buf}, 0, $i);
	substr($c->{buf}, 0, $i + 2, '');
	return $line;
}

sub _read_reply
{
	my ($c) = @_;
	my $line = _read_line($c);
	my ($t, $rest) = (substr($line, 0, 1), substr($line, 1));
	return $rest if $t eq '+';
	return CachekitFault::Error->new($rest) if $t eq '-';
	return $rest + 0 if $t eq ':';
	if ($t eq '$')
	{
		return undef if $rest < 0;
		_fill($c) while length($c->{buf}) < $rest + 2;
		my $s = substr($c->{buf}, 0, $rest);
		substr($c->{buf}, 0, $rest + 2, '');
		return $s;
	}
	if ($t eq '*')
	{
		return undef if $rest < 0;
		return [ map { _read_reply($c) } 1 .. $rest ];
	}
	croak "unexpected RESP line from redis: $line";
}

=pod

=over

=item resp_try($redis, @args)

Sends one command (each argument as the exact bytes given; a character
string is sent UTF-8 encoded) and returns the reply: a string, a number,
undef for nil, an array reference, or a CachekitFault::Error object.

=item resp_cmd($redis, @args)

Like resp_try, but dies on an error reply.

=item resp_pipeline($redis, [@cmd1], [@cmd2], ...)

Sends all commands at once on one connection; returns the list of replies.

=item resp_exists($redis, $key), resp_all_keys($redis)

EXISTS of exactly these bytes; every key (KEYS *), sorted, as byte strings.

=item resp_calls($redis, $command [, $field])

A counter of a command in INFO commandstats since the last CONFIG
RESETSTAT: calls (or $field, such as failed_calls); 0 when it never ran.

=item resp_fill($redis, $value, @keys)

SET every key to $value, pipelined.

=back

=cut

sub resp_try
{
	my ($r, @args) = @_;
	my $c = _resp_connect($r);
	_send($c, _resp_encode(@args));
	my $reply = _read_reply($c);
	close $c->{sock};
	return $reply;
}

sub resp_cmd
{
	my ($r, @args) = @_;
	my $reply = resp_try($r, @args);
	croak "redis refused $args[0]: " . $reply->message if ref $reply eq 'CachekitFault::Error';
	return $reply;
}

sub resp_calls
{
	my ($r, $cmd, $field) = @_;
	$field //= 'calls';
	my $info = resp_cmd($r, 'INFO', 'commandstats');
	return $info =~ /^cmdstat_$cmd:.*\b$field=(\d+)/m ? $1 : 0;
}

sub resp_pipeline
{
	my ($r, @cmds) = @_;
	my $c = _resp_connect($r);
	my @replies;
	# in slices, so that neither side's socket buffer fills up
	while (my @slice = splice(@cmds, 0, 1000))
	{
		_send($c, join('', map { _resp_encode(@$_) } @slice));
		push @replies, _read_reply($c) for @slice;
	}
	close $c->{sock};
	return @replies;
}

sub resp_exists
{
	my ($r, $key) = @_;
	return resp_cmd($r, 'EXISTS', $key) == 1;
}

sub resp_all_keys
{
	my ($r) = @_;
	return sort @{ resp_cmd($r, 'KEYS', '*') };
}

sub resp_fill
{
	my ($r, $value, @keys) = @_;
	my @cmds;
	while (my @chunk = splice(@keys, 0, 200))
	{
		push @cmds, [ 'MSET', map { ($_ => $value) } @chunk ];
	}
	for my $reply (resp_pipeline($r, @cmds))
	{
		croak 'MSET refused: ' . $reply->message if ref $reply eq 'CachekitFault::Error';
	}
	return;
}

##########################################################################
# a fake Redis that refuses everything
##########################################################################

my %fake_pids;

=pod

=over

=item start_fake_redis(error => TEXT [, setup_ok => 1])

Forks a tiny RESP server on a free loopback port. It answers every command
with the error reply -TEXT. With setup_ok, the commands a client runs while
connecting are answered as Redis would (PING, AUTH, SELECT, CLIENT, SCRIPT
LOAD with the script's SHA1), and only the rest (UNLINK, EVALSHA, ...) get
the error. Every command's name is appended to a log file, one a line.
Returns a hash with port, pid, log and url.

=item stop_fake_redis($fake), fake_commands($fake)

Kill it; the list of command names it has received so far.

=back

=cut

sub start_fake_redis
{
	my (%opts) = @_;
	croak 'start_fake_redis needs error => TEXT' unless defined $opts{error};
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $log  = "$PostgreSQL::Test::Utils::tmp_check/fake_redis_$port.log";
	unlink $log;
	my $pid = _serve_in_child($port, sub { _fake_loop($_[0], $log, \%opts) });
	note "fake redis (answers -$opts{error}) pid $pid on port $port";
	return {
		host => '127.0.0.1',
		port => $port,
		pid  => $pid,
		log  => $log,
		url  => "redis://127.0.0.1:$port/0",
	};
}

sub _fake_parse
{
	my ($bufref) = @_;
	return undef unless $$bufref =~ /\A\*(\d+)\r\n/;
	my $n   = $1;
	my $pos = length("*$n\r\n");
	my @args;
	for (1 .. $n)
	{
		my $nl = index($$bufref, "\r\n", $pos);
		return undef if $nl < 0;
		my $hdr = substr($$bufref, $pos, $nl - $pos);
		die "bad bulk header '$hdr'" unless $hdr =~ /\A\$(\d+)\z/;
		my $len = $1;
		return undef if length($$bufref) < $nl + 2 + $len + 2;
		push @args, substr($$bufref, $nl + 2, $len);
		$pos = $nl + 2 + $len + 2;
	}
	substr($$bufref, 0, $pos, '');
	return \@args;
}

sub _fake_answer
{
	my ($args, $opts) = @_;
	my $name = uc($args->[0] // '');
	if ($opts->{setup_ok})
	{
		return "+PONG\r\n" if $name eq 'PING';
		return "+OK\r\n" if $name =~ /\A(AUTH|SELECT|CLIENT|QUIT)\z/;
		if ($name eq 'SCRIPT' && uc($args->[1] // '') eq 'LOAD')
		{
			return '$40' . "\r\n" . sha1_hex($args->[2] // '') . "\r\n";
		}
	}
	return "-$opts->{error}\r\n";
}

# Serve RESP clients on $listen until killed: $answer->($fd, \@args, $logfh)
# returns the reply bytes of one command; $opened/$closed (optional) are
# called with a client's fd.
sub _serve_loop
{
	my ($listen, $log, $answer, $opened, $closed) = @_;
	open my $lfh, '>>', $log or die "cannot write $log: $!";
	$lfh->autoflush(1);
	my $sel = IO::Select->new($listen);
	my %buf;
	while (1)
	{
		for my $fh ($sel->can_read(1))
		{
			if ($fh == $listen)
			{
				my $client = $listen->accept or next;
				binmode $client;
				$sel->add($client);
				$buf{ fileno $client } = '';
				$opened->(fileno $client) if $opened;
				next;
			}
			my $fd = fileno $fh;
			my $n  = sysread($fh, my $chunk, 65536);
			if (!$n)
			{
				$sel->remove($fh);
				$closed->($fd) if $closed;
				delete $buf{$fd};
				close $fh;
				next;
			}
			$buf{$fd} .= $chunk;
			my $out = '';
			while (my $args = _fake_parse(\$buf{$fd}))
			{
				$out .= $answer->($fd, $args, $lfh);
			}
			_write_all($fh, $out);
		}
	}
}

sub _fake_loop
{
	my ($listen, $log, $opts) = @_;
	_serve_loop(
		$listen, $log,
		sub {
			my (undef, $args, $lfh) = @_;
			print $lfh uc($args->[0] // '?'), "\n";
			return _fake_answer($args, $opts);
		});
	return;
}

# Listen on a loopback port and run $loop->($listen) in a child process;
# returns the child's pid (killed when the test script exits).
sub _serve_in_child
{
	my ($port, $loop) = @_;
	my $listen = IO::Socket::INET->new(
		LocalAddr => '127.0.0.1',
		LocalPort => $port,
		Listen    => 128,
		ReuseAddr => 1,
		Proto     => 'tcp') or croak "cannot listen on $port: $!";
	my $pid = _child(sub { $loop->($listen) });
	close $listen;
	return $pid;
}

# Run $code in a child process that never runs the parent's END blocks
# (they stop nodes and servers); returns its pid.
sub _child
{
	my ($code) = @_;
	my $pid = fork();
	croak "fork failed: $!" unless defined $pid;
	if ($pid == 0)
	{
		$SIG{$_} = sub { POSIX::_exit(0) } for qw(TERM INT HUP);
		eval { $code->(); };
		POSIX::_exit(0);
	}
	$fake_pids{$pid} = 1;
	return $pid;
}

# Write all of $out to a client socket (a client gone is not an error).
sub _write_all
{
	my ($fh, $out) = @_;
	my $off = 0;
	while ($off < length $out)
	{
		my $w = syswrite($fh, $out, length($out) - $off, $off);
		last unless defined $w;
		$off += $w;
	}
	return;
}

sub stop_fake_redis
{
	my ($fake) = @_;
	return unless $fake && $fake_pids{ $fake->{pid} };
	kill 'KILL', $fake->{pid};
	waitpid($fake->{pid}, 0);
	delete $fake_pids{ $fake->{pid} };
	return;
}

sub fake_commands
{
	my ($fake) = @_;
	open my $fh, '<', $fake->{log} or return ();
	chomp(my @lines = <$fh>);
	close $fh;
	return @lines;
}

END
{
	my $code = $?;
	for my $pid (keys %fake_pids)
	{
		kill 'KILL', $pid;
		waitpid($pid, 0);
	}
	$? = $code;
}

##########################################################################
# a proxy in front of a real Redis that injects errors, and MONITOR
##########################################################################

=pod

=over

=item start_fault_proxy($redis [, @rules])

Forks a RESP proxy on a free loopback port in front of the real Redis
$redis (AUTH forwarded as the client sends it). Each command is matched
(its arguments joined by spaces) against the rules in order; the first rule
that matches and has injections left answers with its error instead of
passing the command on. A rule is { match => qr/.../, error => 'TEXT',
times => N } (N < 0: for ever). Commands go upstream one at a time, so
replies keep their order. Returns a hash with port, pid, url, log.

=item fault_proxy_rules($proxy, @rules)

Replaces the rules (the proxy reads them before each command).

=item fault_proxy_log($proxy)

"NAME injected" or "NAME passed" per command, in order.

=item start_monitor($redis), monitor_lines($mon)

Records MONITOR of $redis (also the commands scripts run) in a file; its
lines so far.

=back

=cut

sub _rules_write
{
	my ($file, @rules) = @_;
	open my $fh, '>', "$file.tmp" or croak "cannot write $file: $!";
	for my $r (@rules)
	{
		my $re = "$r->{match}";
		croak 'a rule has no tabs or newlines' if "$re$r->{error}" =~ /[\t\n]/;
		print $fh join("\t", $r->{times} // 1, $re, $r->{error}), "\n";
	}
	close $fh;
	rename "$file.tmp", $file or croak "cannot rename $file: $!";
	return;
}

sub _raw_reply
{
	my ($c) = @_;
	my $line = _read_line($c);
	my $t = substr($line, 0, 1);
	my $out = "$line\r\n";
	if ($t eq '$' && substr($line, 1) >= 0)
	{
		my $len = substr($line, 1);
		_fill($c) while length($c->{buf}) < $len + 2;
		$out .= substr($c->{buf}, 0, $len + 2, '');
	}
	elsif ($t eq '*' && substr($line, 1) > 0)
	{
		$out .= _raw_reply($c) for 1 .. substr($line, 1);
	}
	return $out;
}

sub _proxy_loop
{
	my ($listen, $upstream, $rules_file, $log) = @_;
	my %up;
	my ($rules_mtime, @rules) = (-1);
	my $answer = sub {
		my ($fd, $args, $lfh) = @_;
		my $mtime = (stat $rules_file)[9] // 0;
		if ($mtime != $rules_mtime || !@rules)
		{
			$rules_mtime = $mtime;
			open my $rf, '<', $rules_file or die "no $rules_file";
			@rules = map { chomp; [ split /\t/, $_, 3 ] } <$rf>;
			close $rf;
		}
		my $text = join ' ', @$args;
		my $name = uc($args->[0] // '?');
		for my $r (@rules)
		{
			next unless $r->[0] != 0 && $text =~ /$r->[1]/;
			$r->[0]-- if $r->[0] > 0;
			print $lfh "$name injected\n";
			return "-$r->[2]\r\n";
		}
		_send($up{$fd}, _resp_encode(@$args));
		my $out = _raw_reply($up{$fd});
		print $lfh "$name passed\n";
		return $out;
	};
	_serve_loop(
		$listen, $log, $answer,
		sub { $up{ $_[0] } = _resp_connect({ port => $upstream->{port} }); },
		sub { close $up{ $_[0] }{sock}; delete $up{ $_[0] }; });
	return;
}

sub start_fault_proxy
{
	my ($upstream, @rules) = @_;
	my $port  = PostgreSQL::Test::Cluster::get_free_port();
	my $log   = "$PostgreSQL::Test::Utils::tmp_check/fault_proxy_$port.log";
	my $rules = "$PostgreSQL::Test::Utils::tmp_check/fault_proxy_$port.rules";
	unlink $log;
	_rules_write($rules, @rules);
	my $pid = _serve_in_child($port, sub { _proxy_loop($_[0], $upstream, $rules, $log) });
	note "fault proxy pid $pid on port $port in front of redis port $upstream->{port}";
	return {
		host  => '127.0.0.1',
		port  => $port,
		pid   => $pid,
		log   => $log,
		rules => $rules,
		url   => "redis://127.0.0.1:$port/0",
	};
}

sub fault_proxy_rules
{
	my ($proxy, @rules) = @_;
	# a new mtime second is not guaranteed: the proxy also rereads when it has no rules
	_rules_write($proxy->{rules}, @rules);
	utime(undef, time + 1 + int(rand(1000)), $proxy->{rules});
	return;
}

sub fault_proxy_log
{
	my ($proxy) = @_;
	return fake_commands($proxy);
}

sub start_monitor
{
	my ($redis) = @_;
	my $log = "$PostgreSQL::Test::Utils::tmp_check/monitor_$redis->{port}_" . time . '.log';
	unlink $log;
	my $c = _resp_connect($redis);
	_send($c, _resp_encode('MONITOR'));
	my $ok = _read_line($c);
	croak "MONITOR refused: $ok" unless $ok eq '+OK';
	my $pid = _child(
		sub {
			open my $fh, '>>', $log or die "cannot write $log: $!";
			$fh->autoflush(1);
			while (1) { print $fh substr(_read_line($c), 1), "\n"; }
		});
	close $c->{sock};
	return { pid => $pid, log => $log };
}

sub monitor_lines
{
	my ($mon) = @_;
	return fake_commands($mon);
}

##########################################################################
# the worker process
##########################################################################

=pod

=over

=item worker_activity($node [, $db])

"pid|state|query" of the cachekit worker from pg_stat_activity (any
database's view shows it), or "" when there is none.

=item worker_pid_activity($node)

The worker's pid from pg_stat_activity, or undef.

=item wait_worker_busy($node [, $timeout])

Waits until the worker is inside a Redis round trip ("delivering to Redis").

=item wait_new_worker($node, $old_pid [, $timeout])

Waits until a worker with another pid than $old_pid runs; returns its pid
or undef.

=item proc_status($pid)

/proc/PID/status as a hash of the "kB" lines (VmRSS, VmHWM, RssAnon, ...),
numbers in kB; undef once the process is gone.

=back

=cut

sub worker_activity
{
	my ($node, $db) = @_;
	return $node->safe_psql($db // 'postgres',
		q{SELECT pid || '|' || coalesce(state, '') || '|' || coalesce(query, '')
		  FROM pg_stat_activity WHERE backend_type = 'cachekit worker'});
}

sub worker_pid_activity
{
	my ($node) = @_;
	my ($pid) = split /\|/, worker_activity($node);
	return (defined $pid && $pid =~ /^\d+$/) ? $pid : undef;
}

sub wait_worker_busy
{
	my ($node, $timeout) = @_;
	return CachekitTest::wait_for(
		sub {
			my (undef, $state, $query) = split /\|/, worker_activity($node), 3;
			defined $query && $state eq 'active' && $query eq 'delivering to Redis';
		},
		$timeout // 20);
}

sub wait_new_worker
{
	my ($node, $old, $timeout) = @_;
	my $new;
	CachekitTest::wait_for(
		sub {
			$new = worker_pid_activity($node);
			defined $new && $new != $old;
		},
		$timeout // 60);
	return (defined $new && $new != $old) ? $new : undef;
}

sub proc_status
{
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/status" or return undef;
	my %s;
	while (<$fh>)
	{
		$s{$1} = $2 if /^(\w+):\s+(\d+) kB/;
	}
	close $fh;
	return \%s;
}

##########################################################################
# logs and settings
##########################################################################

=pod

=over

=item log_offset($node), log_since($node, $offset)

The size of the server log now; its text from $offset on.

=item count_matches($text, $regex)

How many times $regex matches in $text.

=item conf_set_and_reload($node, $name, $value)

Appends "name = 'value'" to postgresql.conf and reloads (never through SQL,
so a value holding a password does not reach the statement log).

=item dead_url()

A redis:// URL of a free loopback port where nothing listens.

=back

=cut

sub log_offset
{
	my ($node) = @_;
	return -s $node->logfile;
}

sub log_since
{
	my ($node, $offset) = @_;
	return PostgreSQL::Test::Utils::slurp_file($node->logfile, $offset);
}

sub count_matches
{
	my ($text, $re) = @_;
	my $n = () = $text =~ /$re/g;
	return $n;
}

sub conf_set_and_reload
{
	my ($node, $name, $value) = @_;
	$value =~ s/'/''/g;
	$node->append_conf('postgresql.conf', "$name = '$value'");
	$node->reload;
	return;
}

sub dead_url
{
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	return "redis://127.0.0.1:$port/0";
}

1;
