#!/usr/bin/perl
# test/tools/redis_proxy.pl -- a TCP proxy in front of a real redis-server
# that can run one command on the server at a chosen instant: a fault
# injector for the worker's tests.
#
#   perl test/tools/redis_proxy.pl --port PORT --upstream PORT
#                                  --trigger FILE --log FILE
#
# Every connection to 127.0.0.1:PORT is forwarded, byte for byte both
# ways, to the redis-server on 127.0.0.1:UPSTREAM.  While FILE exists (one
# line: "WORD COMMAND [ARG ...]", e.g. "XADD FLUSHALL"), the first chunk a
# client sends that holds the command WORD (as a RESP bulk string) is held
# back (WORD may be "A+B": a command A without arguments right before a
# command B, e.g. "MULTI+SET" for a transaction whose first command is SET,
# which a MULTI, XADD, ..., SET, EXEC does not match): the proxy first runs
# COMMAND on a connection of its own, waits for its reply, deletes FILE,
# and only then forwards the chunk.  So the command lands between the client's
# earlier commands and that one, whatever the timing: what a FLUSHALL by
# someone else in that instant would do.  COMMAND DROP-REPLY instead
# forwards the chunk, waits until Redis has answered it (its first bytes,
# then 0.5 s for the rest), and closes both connections without passing
# the answer on: a connection that breaks after Redis applied the
# commands, before the client learnt it.
#
# --log FILE gets a line per event: "listen", "accept", "close", "inject
# <command> before <word>: <reply>",
# for the tests to wait on.  Each connection is served by a child process;
# SIGTERM stops the server and its children.  Only core Perl modules.
use strict;
use warnings;

use Getopt::Long;
use IO::Select;
use IO::Socket::INET;
use POSIX ();

my ($port, $upstream, $trigger, $logfile) = (0, 0, undef, undef);
GetOptions('port=i' => \$port, 'upstream=i' => \$upstream, 'trigger=s' => \$trigger, 'log=s' => \$logfile)
  or die "usage: $0 --port PORT --upstream PORT --trigger FILE --log FILE\n";
die "--port, --upstream, --trigger and --log are required\n"
  unless $port && $upstream && defined $trigger && defined $logfile;

sub logline
{
	my ($line) = @_;
	open(my $fh, '>>', $logfile) or return;
	print $fh "$line\n";
	close $fh;
}

my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
	Listen => 16, ReuseAddr => 1) or die "listen on $port: $!\n";
logline('listen');
my %children;
$SIG{TERM} = $SIG{INT} = sub {
	kill 'TERM', keys %children;
	exit 0;
};
$SIG{CHLD} = sub {
	while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0) { delete $children{$pid} }
};

sub upstream
{
	return IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $upstream, Timeout => 30);
}

# the trigger: (a regex for WORD in RESP, WORD, the command's words), or ()
# when there is none.  "A+B": a command A without arguments (its bulk
# string ends it), then the next command ("*N") begins with the word B.
sub trigger
{
	open(my $fh, '<', $trigger) or return ();
	my $line = <$fh> // '';
	close $fh;
	my ($before, @words) = split ' ', $line;
	return () unless @words;
	my @parts = split /\+/, $before;
	my $re = join('\*\d+\r\n', map { quotemeta('$' . length($_) . "\r\n" . uc($_) . "\r\n") } @parts);
	$re = '\*1\r\n' . $re if @parts > 1;    # A alone in its command
	return (qr/$re/, $before, @words);
}

# run the trigger's command on a connection of our own
sub inject
{
	my ($before, @words) = @_;
	my $c = upstream() or die "inject: connect: $!\n";
	print $c '*' . scalar(@words) . "\r\n" . join('', map { '$' . length($_) . "\r\n$_\r\n" } @words);
	my $reply = <$c>;    # the first line is enough: a status or an error
	close $c;
	unlink $trigger;
	$reply //= '(no reply)';
	$reply =~ s/\r?\n$//;
	logline("inject @words before $before: $reply");
}

sub write_all
{
	my ($fh, $buf) = @_;
	while (length $buf)
	{
		my $n = syswrite($fh, $buf) or exit 0;
		substr($buf, 0, $n) = '';
	}
}

# forward buf, swallow the answer, close (the child exits)
sub drop_reply
{
	my ($server, $before, $buf) = @_;
	write_all($server, $buf);
	my $sel = IO::Select->new($server);
	my $got = 0;
	if ($sel->can_read(60))
	{
		my $reply;
		$got += sysread($server, $reply, 1 << 20) // 0;
		select(undef, undef, undef, 0.5);
		while ($sel->can_read(0))
		{
			my $n = sysread($server, $reply, 1 << 20);
			last unless $n;
			$got += $n;
		}
	}
	unlink $trigger;
	logline("inject DROP-REPLY before $before: dropped $got bytes");
	logline('close');
	exit 0;
}

sub serve
{
	my ($client) = @_;
	my $server = upstream() or exit 1;
	my $sel = IO::Select->new($client, $server);
	for (;;)
	{
		for my $fh ($sel->can_read)
		{
			my $buf;
			my $n = sysread($fh, $buf, 65536);
			if (!$n)
			{
				logline('close');
				exit 0;
			}
			if ($fh == $client)
			{
				if (-e $trigger)
				{
					my ($word, $before, @what) = trigger();
					if (defined $word && uc($buf) =~ $word)
					{
						drop_reply($server, $before, $buf) if $what[0] eq 'DROP-REPLY';
						inject($before, @what);
					}
				}
				write_all($server, $buf);
			}
			else
			{
				write_all($client, $buf);
			}
		}
	}
}

for (;;)
{
	my $client = $listen->accept or next;
	my $pid = fork;
	if (!defined $pid) { close $client; next }
	if ($pid == 0)
	{
		$SIG{TERM} = 'DEFAULT';
		close $listen;
		logline('accept');
		serve($client);
		exit 0;
	}
	$children{$pid} = 1;
	close $client;
}
