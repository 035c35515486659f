=pod

=head1 NAME

BillingMirror - compare the Redis mirror with the database as the worker does

=head1 SYNOPSIS

  use BillingMirror;
  my $redis_text = BillingMirror::settle_ended_periods($db_text, $redis_text [, $now_ms]);
  my $same = $db_text eq $redis_text;

=head1 DESCRIPTION

Both texts hold one line per hash, C<key field=value field=value ...> (the
form of BillingTest::mirror_equals and test/lib/mirror.sh).  A day's or
month's counters (and an API key's budget period) reset when the period
ends: the database's snapshot then shows the new period (its counters 0, a
later reset time), while Redis keeps the hash pushed before, whose reset time
tells a gateway to count those fields as 0 (lua/README.md).  The worker does
not push a hash again for that alone (src/mirror.c, period_ended()): it is
not drift.  settle_ended_periods() returns the Redis text with every such
group of fields taken from the database's line, so that a test comparing the
two across a midnight (UTC, or a tenant's time zone) or the end of an API
key's budget period judges as the worker does.  A group is settled only when
Redis' reset time has passed (by NOW_MS, default the current time: take it
after reading Redis), the database's reset time is later, and every counter
of the group is 0 in the database; anything else that differs still differs.
Line i of one text must be the hash of line i of the other (both sides list
the database's keys in its order); texts of different lengths are returned
unchanged.

No dependencies: test/lib/mirror.sh (the benchmark) loads it with perl -I.

=cut

package BillingMirror;

use strict;
use warnings;
use Time::HiRes ();

# as src/mirror.c's period_groups: the reset time first, then its counters
my @PERIOD_GROUPS = (
	[qw(day_resets_at_ms day_requests day_spend)],
	[qw(month_resets_at_ms month_requests month_spend)],
	[qw(resets_at_ms spent)],
);

# KEY, {field => value}, [the line's tokens], {field => its token's index}
sub _fields
{
	my ($line) = @_;
	my @tokens = split / /, $line, -1;
	my (%f, %at);
	for my $i (1 .. $#tokens)
	{
		my ($name, $value) = split /=/, $tokens[$i], 2;
		next unless defined $value;
		$f{$name} = $value;
		$at{$name} = $i;
	}
	return ($tokens[0], \%f, \@tokens, \%at);
}

sub settle_ended_periods
{
	my ($db_text, $redis_text, $now_ms) = @_;
	$now_ms //= int(Time::HiRes::time() * 1000);
	# line i of each side is the same key: the Redis side is read key by key
	# in the order of the database's lines
	my @db = split /\n/, $db_text // '', -1;
	my @redis = split /\n/, $redis_text // '', -1;
	return $redis_text // '' unless @db == @redis;
	for my $i (0 .. $#redis)
	{
		my ($key, $f, $tokens, $index) = _fields($redis[$i]);
		my ($db_key, $want) = _fields($db[$i]);
		next unless defined $key && defined $db_key && $key eq $db_key;
		my $changed = 0;
		for my $g (@PERIOD_GROUPS)
		{
			my ($at, @counters) = @$g;
			next unless defined $f->{$at} && defined $want->{$at};
			next unless $f->{$at} =~ /^-?\d+$/ && $want->{$at} =~ /^-?\d+$/;
			# the period Redis holds has ended (src/mirror.c period_ended) and
			# the database is in a later one in which nothing was counted yet
			next unless $f->{$at} <= $now_ms && $want->{$at} > $f->{$at};
			next if grep { ($want->{$_} // '0') ne '0' } @counters;
			for my $name ($at, @counters)
			{
				next unless exists $want->{$name} && exists $f->{$name};
				$tokens->[ $index->{$name} ] = "$name=$want->{$name}";
				$changed = 1;
			}
		}
		$redis[$i] = join(' ', @$tokens) if $changed;
	}
	return join("\n", @redis);
}

1;
