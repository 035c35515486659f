#!/usr/bin/perl
# test/tools/fake_redis.pl -- a hostile Redis for the worker's tests.
#
#   perl test/tools/fake_redis.pl --port PORT --mode MODE [--log FILE]
#                                 [--delay SECONDS]
#
# A TCP server on 127.0.0.1 that speaks just enough RESP to let the billing
# worker connect (PING, AUTH, SELECT, SCRIPT LOAD, INFO, EXISTS, GET, SET,
# DBSIZE answer as a real server would) and then misbehaves as MODE says:
#
#   scan_int      the marker names another ledger, so the worker wipes the
#                 old mirror: SCAN's key list holds an integer element (the
#                 crash of issue 12, C1)
#   wrong_types   every reply after AUTH has, one time in two, a type (or a
#                 shape) the command never returns: integers, nils, errors,
#                 nested and empty arrays, RESP3 types
#   trickle       every reply but those of PING/AUTH/SELECT/SCRIPT LOAD is
#                 sent one byte every 0.5 s
#   huge          the reply to INFO is a string of 512 MiB, streamed (never
#                 held in memory) in 64 KiB chunks, --delay apart; "MIB" is
#                 logged for every MiB sent
#   huge_array    the reply to INFO is an array of 100,000,000 integers,
#                 streamed
#   deep          the reply to INFO is an array nested 100,000 levels deep
#   scan_forever  the marker names another ledger; SCAN's cursor never
#                 comes back to 0 (each SCAN answered after --delay)
#   scan_foreign  the marker names another ledger; SCAN ignores MATCH and
#                 lists keys that are not billing's besides billing:{a}
#                 (UNLINK is logged with its keys)
#   marker_gone   answers as ok, but the worker's marker key never exists
#                 (EXISTS <prefix>:__sync__ is 0 after every SET of it)
#   flap          answers as ok, but closes each connection 2 s after it
#                 was accepted ("CLOSE" is logged): a Redis that fails
#                 again soon after every reconnect
#   silent        accepts connections and reads, never answers
#   ok            answers everything plausibly (EVALSHA 1, HGETALL empty,
#                 GET what this connection SET, XADD the id it was given;
#                 WATCH, MULTI and EXEC as a real server, nothing ever
#                 touching a watched key)
#
# Each connection is served by a child process; --log FILE gets one line
# per command received ("<pid> <COMMAND>"), for the tests to wait on.
# --delay (default 0) slows huge and scan_forever down, so that a test can
# find the worker in the middle of that reply or of that wipe.
# Only core Perl modules.  SIGTERM stops the server and its children.
use strict;
use warnings;

use Digest::SHA qw(sha1_hex);
use Getopt::Long;
use IO::Handle;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(sleep);

my ($port, $mode, $logfile, $delay) = (0, 'ok', undef, 0);
GetOptions('port=i' => \$port, 'mode=s' => \$mode, 'log=s' => \$logfile, 'delay=f' => \$delay)
  or die "usage: $0 --port PORT --mode MODE [--log FILE] [--delay SECONDS]\n";
my %modes = map { $_ => 1 }
  qw(scan_int wrong_types trickle huge huge_array deep scan_forever scan_foreign marker_gone flap silent ok);
die "unknown mode $mode\n" unless $modes{$mode};

my $server = IO::Socket::INET->new(
	LocalAddr => '127.0.0.1',
	LocalPort => $port,
	Proto => 'tcp',
	Listen => 64,
	ReuseAddr => 1) or die "listen on $port: $!\n";
$SIG{PIPE} = 'IGNORE';

my %children;
my $parent = $$;
$SIG{TERM} = $SIG{INT} = sub {
	if ($$ == $parent)
	{
		kill 'KILL', keys %children;
	}
	POSIX::_exit(0);
};
$SIG{CHLD} = sub {
	while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0)
	{
		delete $children{$pid};
	}
};

my $run_id = sha1_hex("fake-redis-$$-" . time);

sub logline
{
	my ($line) = @_;
	return unless defined $logfile;
	open(my $fh, '>>', $logfile) or return;
	print $fh "$$ $line\n";
	close $fh;
}

# --- RESP writing ---
sub bulk { my ($s) = @_; return '$' . length($s) . "\r\n$s\r\n"; }
sub int_ { return ':' . $_[0] . "\r\n"; }
sub arr  { return '*' . scalar(@_) . "\r\n" . join('', @_); }
my $NIL = "\$-1\r\n";
my $OK = "+OK\r\n";

# a connection's state (each is served by a process of its own): the
# strings it SET, and its transaction (MULTI: the commands queued)
my %strings;
my $queued;

# the answer of a plausible server
sub normal_reply
{
	my (@cmd) = @_;
	my $c = uc($cmd[0] // '');
	my $sub = uc($cmd[1] // '');
	if ($c eq 'MULTI')
	{
		return "-ERR MULTI calls can not be nested\r\n" if $queued;
		$queued = [];
		return $OK;
	}
	if ($c eq 'EXEC')
	{
		return "-ERR EXEC without MULTI\r\n" unless $queued;
		my @q = @$queued;
		undef $queued;
		return arr(map { normal_reply(@$_) } @q);
	}
	if ($c eq 'DISCARD')
	{
		return "-ERR DISCARD without MULTI\r\n" unless $queued;
		undef $queued;
		return $OK;
	}
	return "-ERR WATCH inside MULTI is not allowed\r\n" if $queued && $c eq 'WATCH';
	if ($queued)
	{
		push @$queued, [@cmd];
		return "+QUEUED\r\n";
	}
	return "+PONG\r\n" if $c eq 'PING';
	if ($c eq 'SET')
	{
		$strings{ $cmd[1] // '' } = $cmd[2] // '';
		return $OK;
	}
	return $OK if $c eq 'AUTH' || $c eq 'SELECT' || $c eq 'WATCH' || $c eq 'UNWATCH';
	if ($c eq 'XADD')
	{
		# XADD key [MAXLEN [~] n] id field value ...: the id given, or a new one
		my $i = 2;
		$i += (($cmd[3] // '') eq '~' ? 3 : 2) if uc($cmd[2] // '') eq 'MAXLEN';
		my $id = $cmd[$i] // '*';
		return bulk($id eq '*' ? int(Time::HiRes::time() * 1000) . '-0' : $id);
	}
	return exists $strings{ $cmd[1] // '' } ? bulk($strings{ $cmd[1] }) : $NIL if $c eq 'GET';
	return bulk(sha1_hex($cmd[2] // '')) if $c eq 'SCRIPT' && $sub eq 'LOAD';
	return bulk("# Server\r\nredis_version:7.0.0\r\nrun_id:$run_id\r\n") if $c eq 'INFO';
	return int_(1) if $c eq 'EXISTS' || $c eq 'EVALSHA';
	return int_(10) if $c eq 'DBSIZE';
	return arr() if $c eq 'HGETALL';
	return int_(0) if $c eq 'UNLINK' || $c eq 'DEL';
	return arr(bulk('0'), arr()) if $c eq 'SCAN';
	return $OK;
}

my @wrong = (
	int_(7), $NIL, "-ERR fake\r\n", "*-1\r\n", arr(), arr(int_(1)),
	arr(bulk('a'), arr(arr(int_(1))), $NIL), "+OK\r\n", bulk(''),
	arr(int_(1), int_(2)), arr($NIL, $NIL), arr(bulk('0'), int_(5)),
	arr(bulk('0'), arr(int_(1), $NIL)), arr(bulk('x'), arr(bulk('k'))),
	"%1\r\n+a\r\n:1\r\n", "#t\r\n", ",1.5\r\n", "_\r\n", ">1\r\n+p\r\n",
	bulk('not-a-sha'), bulk('0' x 40), int_(-1));

sub send_all
{
	my ($sock, $data) = @_;
	while (length $data)
	{
		my $n = syswrite($sock, $data);
		return 0 unless defined $n && $n > 0;
		substr($data, 0, $n) = '';
	}
	return 1;
}

# the reply to one command, as this mode sends it; 0: the client is gone
sub answer
{
	my ($sock, $n, @cmd) = @_;
	my $c = uc($cmd[0] // '');
	my $sub = uc($cmd[1] // '');
	my $setup = $c eq 'PING' || $c eq 'AUTH' || $c eq 'SELECT' || ($c eq 'SCRIPT' && $sub eq 'LOAD');

	return 1 if $mode eq 'silent';
	return send_all($sock, int_(0)) if $mode eq 'marker_gone' && $c eq 'EXISTS' && ($cmd[1] // '') =~ /__sync__/;
	if ($mode eq 'scan_int' || $mode eq 'scan_forever' || $mode eq 'scan_foreign')
	{
		return send_all($sock, bulk('1:2:3')) if $c eq 'GET';
		if ($c eq 'SCAN')
		{
			return send_all($sock, arr(bulk('0'), arr(map { bulk($_) }
				'billing:{a}', 'other-app:session:1', 'billing:events:watermark', 'billing:{b', 'billingx:{c}')))
			  if $mode eq 'scan_foreign';
			return send_all($sock, arr(bulk('0'), arr(bulk('billing:{a}'), int_(42))))
			  if $mode eq 'scan_int';
			sleep $delay if $delay > 0;
			return send_all($sock, arr(bulk('17'), arr()));
		}
	}
	if ($mode eq 'wrong_types' && !$setup && $c ne 'AUTH' && rand() < 0.5)
	{
		return send_all($sock, $wrong[ int(rand(@wrong)) ]);
	}
	if ($mode eq 'trickle' && !$setup)
	{
		for my $byte (split //, normal_reply(@cmd))
		{
			return 0 unless send_all($sock, $byte);
			sleep 0.5;
		}
		return 1;
	}
	if ($mode eq 'huge' && $c eq 'INFO')
	{
		my $size = 512 * 1024 * 1024;
		my $chunk = 'x' x 65536;
		return 0 unless send_all($sock, '$' . $size . "\r\n");
		for (my $sent = 0; $sent < $size; $sent += length $chunk)
		{
			return 0 unless send_all($sock, $chunk);
			logline('MIB') if ($sent + length $chunk) % (1024 * 1024) == 0;
			sleep $delay if $delay > 0;
		}
		return send_all($sock, "\r\n");
	}
	if ($mode eq 'huge_array' && $c eq 'INFO')
	{
		my $count = 100_000_000;
		my $chunk = ":1\r\n" x 16384;
		return 0 unless send_all($sock, "*$count\r\n");
		for (my $sent = 0; $sent < $count; $sent += 16384)
		{
			return 0 unless send_all($sock, $chunk);
		}
		return 1;
	}
	if ($mode eq 'deep' && $c eq 'INFO')
	{
		return send_all($sock, ("*1\r\n" x 100_000) . int_(1));
	}
	return send_all($sock, normal_reply(@cmd));
}

# parse one command from $$buf: (args...) or () if incomplete
sub parse_command
{
	my ($buf) = @_;
	return () unless length $$buf;
	if (substr($$buf, 0, 1) ne '*')
	{
		my $eol = index($$buf, "\n");
		return () if $eol < 0;
		my $line = substr($$buf, 0, $eol + 1, '');
		$line =~ s/\r?\n$//;
		return (split ' ', $line);
	}
	my $pos = 0;
	my $eol = index($$buf, "\r\n", $pos);
	return () if $eol < 0;
	my $count = substr($$buf, 1, $eol - 1);
	$pos = $eol + 2;
	my @args;
	for (1 .. $count)
	{
		$eol = index($$buf, "\r\n", $pos);
		return () if $eol < 0;
		my $len = substr($$buf, $pos + 1, $eol - $pos - 1);
		$pos = $eol + 2;
		return () if length($$buf) < $pos + $len + 2;
		push @args, substr($$buf, $pos, $len);
		$pos += $len + 2;
	}
	substr($$buf, 0, $pos, '');
	return @args;
}

sub serve
{
	my ($sock) = @_;
	my $buf = '';
	my $n = 0;
	while (1)
	{
		my $got = sysread($sock, my $data, 65536);
		return unless $got;
		$buf .= $data;
		while (my @cmd = parse_command(\$buf))
		{
			$n++;
			my $name = uc($cmd[0]);
			$name .= ' ' . uc($cmd[1]) if $name eq 'SCRIPT' || $name eq 'INFO';
			$name = join(' ', $name, @cmd[ 1 .. $#cmd ]) if $name eq 'UNLINK';
			logline($name);
			return unless answer($sock, $n, @cmd);
		}
	}
}

STDOUT->autoflush(1);
print "listening on 127.0.0.1:", $server->sockport, " mode $mode\n";
while (1)
{
	my $client = $server->accept or next;
	my $pid = fork();
	if (!defined $pid)
	{
		close $client;
		next;
	}
	if ($pid == 0)
	{
		$SIG{TERM} = 'DEFAULT';
		close $server;
		if ($mode eq 'flap')
		{
			$SIG{ALRM} = sub { logline('CLOSE'); POSIX::_exit(0); };
			Time::HiRes::alarm(2.0);
		}
		serve($client);
		POSIX::_exit(0);
	}
	$children{$pid} = 1;
	close $client;
}
