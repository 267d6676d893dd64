# test/perl/CachekitTest.pm -- helpers for cachekit's TAP tests
#
# Loaded by the tests in test/t through "prove -I test/perl" (PROVE_FLAGS in
# the Makefile). It starts throwaway redis-server processes on free loopback
# ports and PostgreSQL nodes with cachekit preloaded and pointed at them.
#
#   use PostgreSQL::Test::Cluster;
#   use PostgreSQL::Test::Utils;
#   use Test::More;
#   use CachekitTest;
#
#   my $redis = start_redis();
#   my $node  = new_cachekit_node('main', $redis, 'cachekit.batch_size' => 10);
#   $node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
#   ok(wait_for_worker($node), 'worker is up');
#   redis_cmd($redis, 'SET', 'user:1', 'x');
#   ...
#   stop_redis($redis);            # and start_redis/restart_redis again later
#
# Every redis-server started here is stopped when the test script exits,
# also when it dies.

package CachekitTest;

use strict;
use warnings;

use Carp qw(croak);
use Exporter qw(import);
use File::Basename qw(basename);
use File::Path qw(mkpath);
use IPC::Run ();
use POSIX qw(WNOHANG);
use Time::HiRes ();

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT = qw(
  start_redis stop_redis restart_redis kill_redis pause_redis resume_redis
  redis_running redis_url
  redis_cmd redis_cmd_stdin redis_try_cmd redis_keys redis_exists
  new_cachekit_node cachekit_conf acl_cachekit_node
  wait_for wait_for_worker wait_for_redis_connected cachekit_stats
);

# redis-server processes we started and have not stopped yet: pid => object
my %live_redis;
my $redis_seq = 0;

# seconds to wait for a redis-server to answer or to exit
our $REDIS_START_TIMEOUT = 30;
our $REDIS_STOP_TIMEOUT  = 30;
# seconds one redis-cli call may take (a paused server never answers)
our $REDIS_CMD_TIMEOUT = 10;

sub _timeout_default
{
	return $PostgreSQL::Test::Utils::timeout_default || 180;
}

sub _test_name
{
	my $name = basename($0);
	$name =~ s/\.[^.]+$//;
	return $name;
}

sub _slurp_tail
{
	my ($file, $lines) = @_;
	open my $fh, '<', $file or return "(no $file)";
	my @all = <$fh>;
	close $fh;
	splice @all, 0, @all - $lines if @all > $lines;
	return join '', @all;
}

##########################################################################
# redis-server
##########################################################################

=pod

=head1 Redis

=over

=item start_redis(%opts)

Starts a redis-server on 127.0.0.1 and waits until it answers PING (and is
the process we started: a server already listening on the port would answer
too). Returns a CachekitTest::Redis object, a hash with at least C<port>,
C<pid>, C<dir>, C<host>, C<log>, C<pidfile>.

Options:

  port     => N         use this port (default: a free one, reserved through
                        PostgreSQL::Test::Cluster::get_free_port)
  dir      => PATH      working folder (default tmp_check/redis_<test>_<n>)
  password => STR       start with --requirepass; redis_cmd then authenticates
  args     => [ ... ]   more redis-server arguments, e.g. [ '--maxmemory', '1mb' ]
  conf     => FILE      a config file redis-server reads before the arguments
  sentinel => 1         run as a Sentinel (with conf, which it rewrites)
  timeout  => SECONDS   how long to wait for it to answer
  conf     => PATH      a configuration file, given first (e.g. a Sentinel's,
                        with args => [ '--sentinel' ])

Snapshots and the append-only file are off. Dies if the server does not come
up (the tail of its log is in the message).

=cut

sub start_redis
{
	my (%opts) = @_;

	my $self = bless {
		host     => '127.0.0.1',
		port     => $opts{port} // PostgreSQL::Test::Cluster::get_free_port(),
		password => $opts{password},
		args     => $opts{args} // [],
		dir      => $opts{dir},
		conf     => $opts{conf},        # a config file read first (Sentinel's)
		sentinel => $opts{sentinel},    # run as a Sentinel
		pid      => undef,
		paused   => 0,
	}, 'CachekitTest::Redis';

	if (!defined $self->{dir})
	{
		$redis_seq++;
		$self->{dir} =
		  "$PostgreSQL::Test::Utils::tmp_check/redis_" . _test_name() . "_$redis_seq";
	}
	$self->{log}     = "$self->{dir}/redis.log";
	$self->{pidfile} = "$self->{dir}/redis.pid";

	_spawn_redis($self, $opts{timeout});
	return $self;
}

sub _spawn_redis
{
	my ($self, $timeout) = @_;
	$timeout //= $REDIS_START_TIMEOUT;

	croak "redis-server on port $self->{port} is already running (pid $self->{pid})"
	  if defined $self->{pid};

	mkpath($self->{dir}) unless -d $self->{dir};
	unlink $self->{pidfile};

	my @cmd = (
		'redis-server',
		(defined $self->{conf} ? ($self->{conf}) : ()),
		($self->{sentinel} ? ('--sentinel') : ()),
		'--port'          => $self->{port},
		'--bind'          => $self->{host},
		'--dir'           => $self->{dir},
		'--pidfile'       => $self->{pidfile},
		'--logfile'       => $self->{log},
		'--daemonize'     => 'no',
		'--save'          => '',
		'--appendonly'    => 'no',
		'--protected-mode' => 'no',
		(defined $self->{password} ? ('--requirepass' => $self->{password}) : ()),
		@{ $self->{args} });

	note "starting redis: " . join(' ', map { $_ eq '' ? "''" : $_ } @cmd);

	my $pid = fork();
	croak "fork failed: $!" unless defined $pid;
	if ($pid == 0)
	{
		# child: keep the TAP stream clean, then become redis-server
		open(STDIN,  '<',  '/dev/null');
		open(STDOUT, '>>', "$self->{dir}/redis.stdout");
		open(STDERR, '>&', \*STDOUT);
		{ no warnings 'exec'; exec { $cmd[0] } @cmd; }
		print STDERR "exec redis-server failed: $!\n";
		POSIX::_exit(127);
	}

	$self->{pid}    = $pid;
	$self->{paused} = 0;
	$live_redis{$pid} = $self;

	my $deadline = Time::HiRes::time() + $timeout;
	while (1)
	{
		if (waitpid($pid, WNOHANG) == $pid)
		{
			my $status = $?;
			delete $live_redis{$pid};
			$self->{pid} = undef;
			croak sprintf(
				"redis-server on port %d exited during startup (wait status %d):\n%s%s",
				$self->{port}, $status,
				_slurp_tail("$self->{dir}/redis.stdout", 10),
				_slurp_tail($self->{log}, 20));
		}

		# answers, and is the process we started?
		my ($rc, $out) = redis_try_cmd($self, 'INFO', 'server');
		if ($rc == 0 && $out =~ /^process_id:(\d+)/m)
		{
			last if $1 == $pid;
			# someone else serves this port; ours will fail to bind and exit
		}

		if (Time::HiRes::time() > $deadline)
		{
			_terminate($self, 'KILL', 5);
			croak sprintf("redis-server on port %d did not answer within %ds:\n%s",
				$self->{port}, $timeout, _slurp_tail($self->{log}, 20));
		}
		Time::HiRes::sleep(0.05);
	}

	note "redis-server pid $pid is ready on $self->{host}:$self->{port}";
	return $self;
}

# signal the server and wait (bounded) for it to exit; returns wait status
sub _terminate
{
	my ($self, $signal, $timeout) = @_;
	my $pid = $self->{pid};
	return undef unless defined $pid;

	kill 'CONT', $pid;    # a paused server cannot act on SIGTERM
	kill $signal, $pid;

	my $deadline = Time::HiRes::time() + $timeout;
	my $status;
	while (1)
	{
		my $r = waitpid($pid, WNOHANG);
		if ($r == $pid || $r == -1)    # -1: not our child (any more)
		{
			$status = $r == $pid ? $? : undef;
			last;
		}
		if (Time::HiRes::time() > $deadline)
		{
			if ($signal ne 'KILL')
			{
				diag "redis-server pid $pid ignored SIG$signal for ${timeout}s, sending SIGKILL";
				kill 'KILL', $pid;
				waitpid($pid, 0);
				$status = $?;
				last;
			}
			croak "redis-server pid $pid did not exit after SIGKILL";
		}
		Time::HiRes::sleep(0.02);
	}

	delete $live_redis{$pid};
	$self->{pid}    = undef;
	$self->{paused} = 0;
	return $status;
}

=pod

=item stop_redis($r)

Stops the server with SIGTERM (resuming it first if it is paused) and waits
until the process has exited; falls back to SIGKILL after
$REDIS_STOP_TIMEOUT seconds. Does nothing if it is not running. Returns the
wait status.

=item kill_redis($r)

Kills the server with SIGKILL (a crash) and waits for it to be gone.

=item restart_redis($r, %opts)

Stops the server if it runs and starts it again on the same port with the
same folder and options. Returns $r, whose pid has changed.

=item pause_redis($r), resume_redis($r)

SIGSTOP / SIGCONT: the port stays open and connections are accepted by the
kernel, but nothing is answered until resumed.

=item redis_running($r)

True while the process we started is alive (paused or not).

=item redis_url($r [, $db])

redis://[:password@]127.0.0.1:PORT/DB, default database 0.

=cut

sub stop_redis
{
	my ($self) = @_;
	return _terminate($self, 'TERM', $REDIS_STOP_TIMEOUT);
}

sub kill_redis
{
	my ($self) = @_;
	return _terminate($self, 'KILL', $REDIS_STOP_TIMEOUT);
}

sub restart_redis
{
	my ($self, %opts) = @_;
	stop_redis($self);
	return _spawn_redis($self, $opts{timeout});
}

sub pause_redis
{
	my ($self) = @_;
	croak "redis-server on port $self->{port} is not running" unless defined $self->{pid};
	kill 'STOP', $self->{pid} or croak "SIGSTOP to $self->{pid} failed: $!";
	$self->{paused} = 1;
	return;
}

sub resume_redis
{
	my ($self) = @_;
	croak "redis-server on port $self->{port} is not running" unless defined $self->{pid};
	kill 'CONT', $self->{pid} or croak "SIGCONT to $self->{pid} failed: $!";
	$self->{paused} = 0;
	return;
}

sub redis_running
{
	my ($self) = @_;
	return 0 unless defined $self->{pid};
	return 0 if waitpid($self->{pid}, WNOHANG) == $self->{pid};
	return kill(0, $self->{pid}) ? 1 : 0;
}

sub redis_url
{
	my ($self, $db) = @_;
	$db //= 0;
	my $auth = defined $self->{password} ? ":$self->{password}@" : '';
	return "redis://$auth$self->{host}:$self->{port}/$db";
}

##########################################################################
# redis-cli
##########################################################################

=pod

=item redis_cmd($r, @args)

Runs one command through C<redis-cli --raw> (every argument is its own argv
element, so spaces and quotes need no escaping; NUL bytes cannot be passed
this way, see redis_cmd_stdin). Returns the output with the final newline
removed: a value for GET, one line per element for KEYS/SMEMBERS (see
redis_keys), "" for a nil. Error replies come back as text ("ERR ...",
"WRONGTYPE ..."), since redis-cli reports them that way. Dies if redis-cli
fails (e.g. connection refused) or takes longer than $REDIS_CMD_TIMEOUT.

=item redis_cmd_stdin($r, $data, @args)

Like redis_cmd, but $data (any bytes) is sent as the last argument (redis-cli
-x), e.g. redis_cmd_stdin($r, "a\0b", 'SET', 'k').

=item redis_try_cmd($r, @args)

Never dies: returns ($exit_code, $stdout, $stderr); the exit code is -1 on a
timeout. Use it while the server is stopped or paused.

=item redis_keys($r [, $pattern])

Sorted list of the keys matching $pattern (default '*').

=item redis_exists($r, $key)

True if the key exists.

=cut

sub _redis_cli
{
	my ($self, $stdin, $timeout, @args) = @_;
	my @cmd = ('redis-cli', '-h', $self->{host}, '-p', $self->{port},
		'--no-auth-warning', '--raw');
	push @cmd, '-a', $self->{password} if defined $self->{password};
	push @cmd, '-x' if defined $stdin;
	push @cmd, @args;

	my ($out, $err) = ('', '');
	my $in = $stdin // '';
	my $rc;
	my $ok = eval {
		IPC::Run::run(\@cmd, '<', \$in, '>', \$out, '2>', \$err,
			IPC::Run::timeout($timeout));
		$rc = $? >> 8;
		1;
	};
	if (!$ok)
	{
		$err .= "redis-cli timed out after ${timeout}s" if $@ =~ /timeout/i;
		$err .= $@ unless $@ =~ /timeout/i;
		$rc = -1;
	}
	$out =~ s/\n\z//;
	return ($rc, $out, $err, \@cmd);
}

sub redis_try_cmd
{
	my ($self, @args) = @_;
	my ($rc, $out, $err) = _redis_cli($self, undef, 2, @args);
	return ($rc, $out, $err);
}

sub redis_cmd
{
	my ($self, @args) = @_;
	my ($rc, $out, $err, $cmd) = _redis_cli($self, undef, $REDIS_CMD_TIMEOUT, @args);
	croak "redis command failed (exit $rc): @$cmd\n$err$out" if $rc != 0;
	return $out;
}

sub redis_cmd_stdin
{
	my ($self, $data, @args) = @_;
	my ($rc, $out, $err, $cmd) = _redis_cli($self, $data, $REDIS_CMD_TIMEOUT, @args);
	croak "redis command failed (exit $rc): @$cmd\n$err$out" if $rc != 0;
	return $out;
}

sub redis_keys
{
	my ($self, $pattern) = @_;
	my $out = redis_cmd($self, 'KEYS', $pattern // '*');
	return sort grep { $_ ne '' } split /\n/, $out;
}

sub redis_exists
{
	my ($self, $key) = @_;
	return redis_cmd($self, 'EXISTS', $key) eq '1';
}

##########################################################################
# PostgreSQL nodes
##########################################################################

=pod

=back

=head1 PostgreSQL

=over

=item new_cachekit_node($name, $redis, %extra_conf)

A new, initialised and started PostgreSQL::Test::Cluster node with

  shared_preload_libraries = 'cachekit'
  cachekit.redis_url = '<redis_url($redis)>'
  cachekit.database = 'postgres'

plus %extra_conf (setting => value; these come last, so they override the
above). $redis may be a CachekitTest::Redis object, a port number, a full
redis:// URL, or undef (port 1: nothing listens). The extension is not
created: run "CREATE EXTENSION cachekit" in postgres.

Keys starting with '-' are options, not settings:

  -start => 0          do not start the node
  -init  => { ... }    arguments for $node->init

=item cachekit_conf($redis, %extra_conf)

The postgresql.conf text new_cachekit_node appends.

=item acl_cachekit_node($name, $redis, $password, \@key_patterns [, %extra_conf])

Sets up the Redis ACL user ck (every command, only the key patterns
given, such as '~user:*') and a started node whose worker logs in as it,
retrying after 500 ms at most and never dead-lettering by time
(cachekit.dead_letter_after 3600s); creates the extension in postgres and
checks (one test) that the worker runs. Returns the node.

=cut

sub _conf_quote
{
	my ($value) = @_;
	$value =~ s/'/''/g;
	return "'$value'";
}

sub _url_for
{
	my ($redis) = @_;
	return 'redis://127.0.0.1:1/0' unless defined $redis;
	return redis_url($redis) if ref $redis;
	return "redis://127.0.0.1:$redis/0" if $redis =~ /^\d+$/;
	return $redis;
}

sub cachekit_conf
{
	my ($redis, %extra) = @_;
	my @lines = (
		"shared_preload_libraries = 'cachekit'",
		'cachekit.redis_url = ' . _conf_quote(_url_for($redis)),
		"cachekit.database = 'postgres'",
	);
	push @lines, "$_ = " . _conf_quote($extra{$_})
	  for sort grep { !/^-/ } keys %extra;
	return join("\n", '', '# added by CachekitTest', @lines, '');
}

sub acl_cachekit_node
{
	my ($name, $redis, $password, $patterns, %extra) = @_;
	redis_cmd($redis, 'ACL', 'SETUSER', 'ck', 'on', ">$password", @$patterns, '+@all');
	my $node = new_cachekit_node($name,
		'redis://ck:' . $password . '@127.0.0.1:' . $redis->{port} . '/0',
		'cachekit.retry_max_delay'   => '500ms',
		'cachekit.dead_letter_after' => '3600s',
		%extra);
	$node->safe_psql('postgres', 'CREATE EXTENSION cachekit');
	Test::More::ok(wait_for_worker($node, 'postgres', 30), 'worker is running');
	return $node;
}

sub new_cachekit_node
{
	my ($name, $redis, %extra) = @_;
	my $start = exists $extra{-start} ? $extra{-start} : 1;
	my %init = %{ $extra{-init} // {} };

	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%init);
	$node->append_conf('postgresql.conf', cachekit_conf($redis, %extra));
	$node->start if $start;
	return $node;
}

=pod

=item wait_for(\&cond [, $timeout_s])

Calls cond every 50 ms until it returns true (then returns 1) or the timeout
passes (then returns 0). An exception in cond counts as false; the last one
is reported with diag on a timeout. The default timeout is
$PostgreSQL::Test::Utils::timeout_default (180 s, PG_TEST_TIMEOUT_DEFAULT).

=item wait_for_worker($node [, $dbname [, $timeout_s]])

Waits until cachekit_stats.worker_pid is set in $dbname (default postgres).

=item wait_for_redis_connected($node [, $dbname [, $timeout_s]])

Waits until cachekit_stats.redis_connected is true.

=item cachekit_stats($node [, $dbname])

The cachekit_stats row as a hash reference: column => value as JSON text
(row_to_json), so booleans are 'true'/'false' (not 't'/'f'), numbers and
timestamps are text, NULL is undef.

=back

=cut

sub wait_for
{
	my ($cond, $timeout) = @_;
	$timeout //= _timeout_default();
	my $deadline = Time::HiRes::time() + $timeout;
	my $last_error;

	while (1)
	{
		my $result = eval { $cond->() };
		if ($@)
		{
			$last_error = $@;
		}
		elsif ($result)
		{
			return 1;
		}
		last if Time::HiRes::time() > $deadline;
		Time::HiRes::sleep(0.05);
	}
	diag "wait_for: still false after ${timeout}s"
	  . (defined $last_error ? "; last error: $last_error" : '');
	return 0;
}

sub wait_for_worker
{
	my ($node, $dbname, $timeout) = @_;
	$dbname //= 'postgres';
	return wait_for(
		sub {
			$node->safe_psql($dbname,
				'SELECT worker_pid IS NOT NULL FROM cachekit_stats') eq 't';
		},
		$timeout);
}

sub wait_for_redis_connected
{
	my ($node, $dbname, $timeout) = @_;
	$dbname //= 'postgres';
	return wait_for(
		sub {
			$node->safe_psql($dbname,
				'SELECT redis_connected FROM cachekit_stats') eq 't';
		},
		$timeout);
}

sub cachekit_stats
{
	my ($node, $dbname) = @_;
	$dbname //= 'postgres';
	# one "column|value" line per column; NULL shows as \N
	my $out = $node->safe_psql(
		$dbname, q{
		SELECT key || '|' || coalesce(value, '\N')
		FROM cachekit_stats s, json_each_text(row_to_json(s))
	});
	my %stats;
	for my $line (split /\n/, $out)
	{
		my ($k, $v) = split /\|/, $line, 2;
		$stats{$k} = $v eq '\N' ? undef : $v;
	}
	return \%stats;
}

##########################################################################
# cleanup
##########################################################################

# Stop every redis-server still running, however the test ends. A TERM or
# INT signal becomes a normal exit so that this and PostgreSQL::Test::
# Cluster's END blocks (which stop the nodes) still run.
for my $sig (qw(TERM INT HUP))
{
	$SIG{$sig} = sub {
		$SIG{$sig} = 'DEFAULT';
		print STDERR "caught SIG$sig, cleaning up\n";
		exit 128 + ($sig eq 'HUP' ? 1 : $sig eq 'INT' ? 2 : 15);
	  }
	  if !defined $SIG{$sig} || $SIG{$sig} eq '' || $SIG{$sig} eq 'DEFAULT';
}

END
{
	my $exit_code = $?;
	for my $pid (keys %live_redis)
	{
		my $r = $live_redis{$pid};
		next unless $r && defined $r->{pid};
		eval { _terminate($r, 'TERM', $REDIS_STOP_TIMEOUT); 1 }
		  or print STDERR "could not stop redis-server $pid: $@";
	}
	$? = $exit_code;
}

##########################################################################
# method-call sugar: $r->cmd(...), $r->stop, $r->restart, $r->crash, ...
##########################################################################

package CachekitTest::Redis;

sub port    { $_[0]{port} }
sub pid     { $_[0]{pid} }
sub dir     { $_[0]{dir} }
sub url     { CachekitTest::redis_url(@_) }
sub cmd     { CachekitTest::redis_cmd(@_) }
sub try_cmd { CachekitTest::redis_try_cmd(@_) }
sub stop    { CachekitTest::stop_redis(@_) }
sub crash   { CachekitTest::kill_redis(@_) }
sub restart { CachekitTest::restart_redis(@_) }
sub pause   { CachekitTest::pause_redis(@_) }
sub resume  { CachekitTest::resume_redis(@_) }
sub running { CachekitTest::redis_running(@_) }

1;
