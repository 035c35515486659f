=pod

=head1 NAME

BillingMirror - compare the Redis mirror with the database as the worker does

=head1 SYNOPSIS

  use BillingMirror;
  my $redis_text = BillingMirror::settle_ended_periods($db_text, $redis_text);
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
two across a midnight (UTC, or a tenant's time zone) sees what the worker
sees.  A group is settled only when the database's reset time is later than
Redis' and every counter of the group is 0 in the database; anything else
that differs still differs.

No dependencies: test/lib/mirror.sh (the benchmark) loads it with perl -I.

=cut

package BillingMirror;

use strict;
use warnings;

# as src/mirror.c's period_groups: the reset time first, then its counters
my @PERIOD_GROUPS = (
	[qw(day_resets_at_ms day_requests day_spend)],
	[qw(month_resets_at_ms month_requests month_spend)],
	[qw(resets_at_ms spent)],
);

sub _fields
{
	my ($line) = @_;
	my ($key, @pairs) = split / /, $line;
	my (%f, @order);
	for my $p (@pairs)
	{
		my ($name, $value) = split /=/, $p, 2;
		push @order, $name;
		$f{$name} = $value;
	}
	return ($key, \%f, \@order);
}

sub settle_ended_periods
{
	my ($db_text, $redis_text) = @_;
	my %db;
	for my $line (split /\n/, $db_text // '')
	{
		my ($key, $f) = _fields($line);
		$db{$key} = $f;
	}
	my @out;
	for my $line (split /\n/, $redis_text // '', -1)
	{
		my ($key, $f, $order) = _fields($line);
		my $want = defined $key ? $db{$key} : undef;
		if ($want)
		{
			my $changed = 0;
			for my $g (@PERIOD_GROUPS)
			{
				my ($at, @counters) = @$g;
				next unless defined $f->{$at} && defined $want->{$at};
				next unless $f->{$at} =~ /^-?\d+$/ && $want->{$at} =~ /^-?\d+$/;
				next unless $want->{$at} > $f->{$at};
				next if grep { ($want->{$_} // '0') ne '0' } @counters;
				for my $name ($at, @counters)
				{
					next unless exists $want->{$name} && exists $f->{$name};
					$f->{$name} = $want->{$name};
					$changed = 1;
				}
			}
			$line = join(' ', $key, map { "$_=$f->{$_}" } @$order) if $changed;
		}
		push @out, $line;
	}
	return join("\n", @out);
}

1;
