# Released extension scripts never change.
#
# A release X is the tag vX; its install script is frozen in
# releases/billing--X.sql and every upgrade path in updates/.  This test
# fails when
#  - a file of releases/ or updates/ differs from the same file in any tag
#    that has it, or a tag's file is missing from the work tree;
#  - releases/SHA256SUMS (append-only: one line per released file) does not
#    match the files, or lost a line a tag had;
#  - the current version is released and the install script built from
#    schema/ differs from its frozen copy (schema/ changed without a new
#    version and an upgrade script);
#  - an upgrade script's name does not lead from a release towards the
#    current version.
# Without git (a copy of the tree) or without tags (a shallow clone) the tag
# comparisons are skipped with a note; the checksums still hold.
use strict;
use warnings FATAL => 'all';
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $repo    = $ENV{BILLING_REPO} // $BillingTest::REPO;
my $current = BillingTest::extversion();

# git as the test user, on a work tree another user may own; its output,
# chomped; a git that fails stops the test (it must not look like a clone
# without tags)
sub git
{
	my @cmd = ('git', '-c', 'safe.directory=*', '-C', $repo, @_);
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '>', \$out, '2>', \$err) or die "git @_ failed: $err";
	chomp $out;    # as run_command does
	return $out;
}

my %sums;
my $sums_file = "$repo/releases/SHA256SUMS";
ok(-f $sums_file, 'releases/SHA256SUMS exists');
for my $line (split /\n/, slurp_file($sums_file))
{
	next if $line =~ /^\s*(#|$)/;
	my ($sum, $file) = $line =~ /^([0-9a-f]{64})  (\S+)$/
	  or fail("malformed line in SHA256SUMS: $line"), next;
	$sums{$file} = $sum;
}
for my $file (sort keys %sums)
{
	my ($out) = run_command([ 'sha256sum', "$repo/$file" ]);
	my ($sum) = $out =~ /^([0-9a-f]{64})/;
	is($sum // 'missing', $sums{$file}, "released $file matches its checksum");
}
my @frozen = map { "releases/" . (split m{/}, $_)[-1] } glob("$repo/releases/billing--*.sql");
for my $file (@frozen)
{
	ok(exists $sums{$file}, "$file is listed in SHA256SUMS");
}

# the current version: released or in development
my $built = "$repo/billing--$current.sql";
ok(-f $built, "the install script of $current was built");
if (exists $sums{"releases/billing--$current.sql"})
{
	is(slurp_file($built), slurp_file("$repo/releases/billing--$current.sql"),
		"$current is released: schema/ builds exactly its frozen script (change schema/ only with a new version)");
}
else
{
	note("$current is not released yet");
}

# the upgrade scripts form paths from every release to the current version
my %next;
for my $f (glob("$repo/updates/billing--*--*.sql"))
{
	my ($from, $to) = $f =~ /billing--([^-]+)--([^-]+)\.sql$/;
	ok(defined $from, "$f is named billing--FROM--TO.sql") or next;
	push @{ $next{$from} }, $to;
}
for my $file (@frozen)
{
	my ($v) = $file =~ /billing--([^-]+)\.sql$/;
	next if $v eq $current;
	my %seen;
	my @todo = ($v);
	while (my $x = shift @todo)
	{
		next if $seen{$x}++;
		push @todo, @{ $next{$x} // [] };
	}
	ok($seen{$current}, "an upgrade path leads from release $v to $current");
}

# every tag's released files, unchanged
my $tags = -d "$repo/.git" ? git('tag', '-l', 'v*') : '';
my @tags = grep { length } split /\n/, $tags // '';
SKIP:
{
	skip('no git repository or no release tags in this clone (git fetch --tags): tag comparisons skipped', 1)
	  unless @tags;
	for my $tag (@tags)
	{
		my ($v) = $tag =~ /^v(.+)$/;
		my @files = grep { m{^(releases|updates)/} } split /\n/,
		  git('ls-tree', '-r', '--name-only', $tag);
		ok((grep { $_ eq "releases/billing--$v.sql" } @files),
			"tag $tag has its frozen install script");
		for my $f (@files)
		{
			my $theirs = git('show', "$tag:$f");
			my $ours = -f "$repo/$f" ? slurp_file("$repo/$f") : undef;
			if ($f eq 'releases/SHA256SUMS')
			{
				my %have = map { $_ => 1 } split /\n/, $ours // '';
				my @lost = grep { /\S/ && !$have{$_} } split /\n/, $theirs;
				is(join("\n", @lost), '', "SHA256SUMS keeps every line of $tag");
				next;
			}
			# git() chomps; compare the same way
			chomp(my $o = $ours // 'MISSING');
			is($o, $theirs, "$f is as released in $tag");
		}
	}
}

done_testing();
