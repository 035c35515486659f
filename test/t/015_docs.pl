# The documentation covers the code: every public function, view, result
# type, setting and SQLSTATE is documented exactly once, in its designated
# file, in the form that file's header describes; and the markdown renders
# (every code fence closes, every relative link and anchor resolves).
#
#   what                         where                one entry is
#   billing_* function           docs/sql-api.md      a heading "### billing_x" followed by a
#                                                     ```sql block with the signature: argument
#                                                     names, types and DEFAULTs (their values
#                                                     too) as in the catalog,
#                                                     and RETURNS with the result type
#   result type (billing.*_result, ...)  docs/sql-api.md  a row "| billing.x | col, col, ... |"
#   view of schema billing       docs/views.md        a row "| billing.x | col, col, ... |": the
#                                                     columns in catalog order (a column may be
#                                                     followed by a remark in parentheses)
#   billing.* setting            docs/operations.md   a row "| billing.x | default | set by | ... |":
#                                                     the default as pg_settings' boot value (units
#                                                     allowed), "set by" from its context
#   SQLSTATE                     docs/errors.md       a row "| ZB004 | meaning | DETAIL |"
#
# An entry of that form on any other page (README.md, docs/*.md, lua/README.md,
# bench/README.md, CHANGELOG.md) is a duplicate: the test fails naming both
# places.  The catalog comes from a preloaded node (functions of the extension
# schema, views and composite types of schema billing, pg_settings); the
# SQLSTATEs from the code: src/billing.h, every ereport(ERROR, ...) of
# src/*.c, every ERRCODE and 'ZBnnn' literal of schema/*.sql.  An entry for
# something that no longer exists fails too (stale documentation), except
# PostgreSQL's own SQLSTATEs, which the server may raise without the code
# naming them; so does a ZB code named on any page without its row.
#
# Alone: BILLING_SKIP="regress isolation" BILLING_TESTS=015_docs make check
use strict;
use warnings FATAL => 'all';
use utf8;
use Encode qw(decode);
use File::Basename qw(dirname basename);
use File::Spec;
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $repo = $BillingTest::REPO;
my %designated = (
	function => 'docs/sql-api.md',
	type => 'docs/sql-api.md',
	view => 'docs/views.md',
	setting => 'docs/operations.md',
	sqlstate => 'docs/errors.md');

# the markdown files checked: the README, docs/, and the other READMEs (for
# duplicates, fences and links)
my @md = ('README.md', map { "docs/" . basename($_) } sort glob("$repo/docs/*.md"));
push @md, grep { -f "$repo/$_" } qw(lua/README.md bench/README.md CHANGELOG.md);
my %text;
for my $f (@md)
{
	$text{$f} = decode('UTF-8', slurp_file("$repo/$f"));
}
my %pages = map { $_ => 1 } values %designated;
ok(-f "$repo/$_", "$_ exists") for sort keys %pages;

############################################################################
# markdown: fences and links
############################################################################

# lines outside fenced code blocks, and the fence problems of a file
sub scan_fences
{
	my ($text) = @_;
	my (@problems, @prose, $open);
	my $n = 0;
	for my $line (split /\n/, $text, -1)
	{
		$n++;
		if (!$open)
		{
			if ($line =~ /^\s*(`{3,}|~{3,})(.*)$/)
			{
				my ($fence, $info) = ($1, $2);
				# a backtick fence's info string cannot contain a backtick
				if (!($fence =~ /^`/ && $info =~ /`/))
				{
					$open = { char => substr($fence, 0, 1), len => length $fence, line => $n };
					next;
				}
			}
			push @prose, [ $n, $line ];
			next;
		}
		next unless $line =~ /^\s*(`{3,}|~{3,})(.*)$/;
		my ($fence, $rest) = ($1, $2);
		next unless substr($fence, 0, 1) eq $open->{char} && length($fence) >= $open->{len};
		if ($rest =~ /^\s*$/)
		{
			undef $open;
			next;
		}
		# "``` some text" or "```sql" inside an open fence: the fence above
		# was meant to end here, and does not
		push @problems,
		  "line $n: a fence with text after it inside the block opened at line $open->{line} "
		  . "(a closing fence takes nothing after it)";
	}
	push @problems, "the code block opened at line $open->{line} never closes" if $open;
	return (\@problems, \@prose);
}

# GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-',
# repeats numbered -1, -2, ...
sub anchors
{
	my ($text) = @_;
	my (%seen, %anchors);
	my (undef, $prose) = scan_fences($text);
	for (@$prose)
	{
		my $line = $_->[1];
		next unless $line =~ /^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$/;
		my $slug = lc $1;
		$slug =~ s/\[([^\]]*)\]\([^)]*\)/$1/g;    # a link: its text
		$slug =~ s/[^\p{L}\p{M}\p{N}\p{Pc} -]//g;
		$slug =~ s/ /-/g;
		my $a = $seen{$slug}++ ? "$slug-" . ($seen{$slug} - 1) : $slug;
		$anchors{$a} = 1;
	}
	return \%anchors;
}

my %anchor_cache;
for my $f (@md)
{
	my ($problems, $prose) = scan_fences($text{$f});
	is(join("\n", @$problems), '', "$f: every code fence closes");

	my @bad;
	for (@$prose)
	{
		my ($n, $line) = @$_;
		$line =~ s/`[^`]*`//g;    # code spans hold no links
		while ($line =~ /\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g)
		{
			my $target = $1;
			next if $target =~ m{^[a-z][a-z0-9+.-]*:}i;    # https:, mailto:
			my ($path, $frag) = split /#/, $target, 2;
			my $file = $f;
			if (length $path)
			{
				$file = File::Spec->abs2rel(
					File::Spec->rel2abs($path, dirname("$repo/$f")), $repo);
				if (!-e "$repo/$file")
				{
					push @bad, "line $n: $target: no such file";
					next;
				}
			}
			next unless defined $frag && length $frag && $file =~ /\.md$/ && -f "$repo/$file";
			$anchor_cache{$file} //= anchors(
				$text{$file} // decode('UTF-8', slurp_file("$repo/$file")));
			push @bad, "line $n: $target: no heading with that anchor in $file"
			  unless $anchor_cache{$file}{ lc $frag };
		}
	}
	is(join("\n", @bad), '', "$f: every relative link resolves");
}

############################################################################
# what the documents define: entries by kind, with where they are
############################################################################

# $defs{kind}{name} = [ { file, line, ... }, ... ]
my %defs;
for my $f (@md)
{
	my (undef, $prose) = scan_fences($text{$f});
	my @lines = split /\n/, $text{$f}, -1;
	for (@$prose)
	{
		my ($n, $line) = @$_;
		if ($line =~ /^#{1,6}\s+`?(billing_\w+)`?\s*$/)
		{
			push @{ $defs{function}{$1} }, { file => $f, line => $n, lines => \@lines };
		}
		elsif ($line =~ /^\|\s*`?(ZB[0-9A-Z]{3}|[0-9][0-9A-Z]{4})`?\s*\|(.*)$/)
		{
			my @cells = grep { /\S/ } split /\|/, $2;
			push @{ $defs{sqlstate}{$1} }, { file => $f, line => $n, cells => scalar @cells };
		}
		elsif ($line =~ /^\|\s*`?(billing\.\w+)`?\s*\|(.*)$/)
		{
			my ($name, $rest) = ($1, $2);
			my @cells = map { s/^\s+|\s+$//gr } split /\|/, $rest;
			push @{ $defs{row}{$name} }, { file => $f, line => $n, cells => \@cells };
		}
	}
}

# each NAME of KIND is defined exactly once, in FILE; returns the definition
sub defined_once
{
	my ($kind, $name, $file, $defs) = @_;
	my @d = @{ $defs // [] };
	my @where = map { "$_->{file}:$_->{line}" } @d;
	if (!@d)
	{
		fail("$kind $name is documented in $file");
		diag("$kind $name is not documented: add it to $file (see the top of that file for the form)");
		return undef;
	}
	if (@d > 1)
	{
		fail("$kind $name is documented once");
		diag("$kind $name is documented " . scalar(@d) . " times: @where; keep the one in $file and link to it");
		return undef;
	}
	if ($d[0]{file} ne $file)
	{
		fail("$kind $name is documented in $file");
		diag("$kind $name is documented in $where[0]; it belongs in $file");
		return undef;
	}
	pass("$kind $name is documented once, in $file");
	return $d[0];
}

############################################################################
# the catalog
############################################################################

my $node = BillingTest::node('docs', database => 'docs');
my $q = sub { $node->safe_psql('docs', shift) };

# functions of the extension schema: name | arg no | arg name | type | mode
# | nargs | ndefaults | result | the arguments with their defaults
my %func;
for (split /\n/, $q->(q{
	SELECT f.proname, coalesce(a.ord, 0), coalesce(f.proargnames[a.ord], ''),
	       coalesce(pg_catalog.format_type(a.t, NULL), ''),
	       coalesce(f.proargmodes[a.ord]::text, 'i'), f.pronargs, f.pronargdefaults,
	       pg_catalog.pg_get_function_result(f.oid),
	       pg_catalog.replace(pg_catalog.pg_get_function_arguments(f.oid), E'\n', ' ')
	  FROM pg_catalog.pg_extension e
	  JOIN pg_catalog.pg_depend d ON d.refclassid = 'pg_catalog.pg_extension'::regclass
	       AND d.refobjid = e.oid AND d.classid = 'pg_catalog.pg_proc'::regclass AND d.deptype = 'e'
	  JOIN pg_catalog.pg_proc f ON f.oid = d.objid AND f.pronamespace = e.extnamespace
	  LEFT JOIN LATERAL unnest(coalesce(f.proallargtypes, f.proargtypes::oid[]))
	       WITH ORDINALITY AS a(t, ord) ON true
	 WHERE e.extname = 'billing'
	 ORDER BY f.oid, a.ord}))
{
	my ($name, $ord, $arg, $type, $mode, $nargs, $ndefaults, $result, $argtext) = split /\|/, $_, -1;
	my $f = $func{$name} //= { args => [], nargs => $nargs, ndefaults => $ndefaults, result => $result,
		argtext => $argtext };
	push @{ $f->{args} }, { name => $arg, type => $type }
	  if $ord > 0 && ($mode eq 'i' || $mode eq 'b' || $mode eq 'v');
}
ok(keys(%func) >= 30, 'the catalog lists the billing_* functions (' . scalar(keys %func) . ')');

# views and composite types of schema billing: kind | name | columns
my (%view, %type);
for (split /\n/, $q->(q{
	SELECT c.relkind, 'billing.' || c.relname,
	       string_agg(a.attname, ',' ORDER BY a.attnum)
	  FROM pg_catalog.pg_class c
	  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
	 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('v', 'c')
	 GROUP BY c.relkind, c.relname}))
{
	my ($kind, $name, $cols) = split /\|/;
	($kind eq 'v' ? \%view : \%type)->{$name} = [ split /,/, $cols ];
}
ok(keys(%view) >= 10, 'the catalog lists the views of schema billing (' . scalar(keys %view) . ')');

# settings: name | boot value | unit | context | type
my %setting;
for (split /\n/, $q->(q{
	SELECT name, boot_val, coalesce(unit, ''), context, vartype
	  FROM pg_catalog.pg_settings WHERE name LIKE 'billing.%'}))
{
	my ($name, $boot, $unit, $context, $vartype) = split /\|/, $_, -1;
	$setting{$name} = { boot => $boot, unit => $unit, context => $context, vartype => $vartype };
}
ok(exists $setting{'billing.database'}, 'the preloaded node shows the worker settings too');
# billing.redis_password is not listed in pg_settings (GUC_NO_SHOW_ALL: its
# reset_val would show it, 072_redis_auth_tls); it exists, as a reload-time
# string, empty by default
is($q->(q{SELECT current_setting('billing.redis_password', true) IS NOT NULL}), 't',
	'billing.redis_password exists (not listed in pg_settings)');
$setting{'billing.redis_password'} = { boot => '', unit => '', context => 'sighup', vartype => 'string' };

############################################################################
# functions: a heading and a signature each
############################################################################

my %type_alias = (
	timestamptz => 'timestamp with time zone',
	timestamp => 'timestamp without time zone',
	int => 'integer',
	int4 => 'integer',
	int8 => 'bigint',
	int2 => 'smallint',
	bool => 'boolean',
	varchar => 'character varying',
	'double' => 'double precision',
	float8 => 'double precision');

sub norm_type
{
	my $t = lc shift;
	$t =~ s/\s+/ /g;
	$t =~ s/^\s+|\s+$//g;
	my $array = $t =~ s/(\[\])+$// ? '[]' : '';
	$t = $type_alias{$t} // $t;
	return $t . $array;
}

sub norm_result
{
	my ($r) = @_;
	return $r =~ /^\s*setof\s+(.*)$/is ? 'SETOF ' . norm_type($1) : norm_type($r);
}

# split on top-level commas (not inside quotes, parentheses or brackets)
sub split_args
{
	my ($s) = @_;
	my @out;
	my ($cur, $depth, $quote) = ('', 0, 0);
	for my $c (split //, $s)
	{
		if ($quote) { $quote = 0 if $c eq "'"; }
		elsif ($c eq "'") { $quote = 1; }
		elsif ($c =~ /[(\[]/) { $depth++; }
		elsif ($c =~ /[)\]]/) { $depth--; }
		elsif ($c eq ',' && $depth == 0) { push @out, $cur; $cur = ''; next; }
		$cur .= $c;
	}
	push @out, $cur if $cur =~ /\S/;
	return map { s/^\s+|\s+$//gr } @out;
}

for my $name (sort keys %func)
{
	my $d = defined_once('function', $name, $designated{function}, $defs{function}{$name})
	  or next;
	my $f = $func{$name};
	# the first ```sql block after the heading, before the next heading
	my @lines = @{ $d->{lines} };
	my ($sig, $in);
	for my $i ($d->{line} .. $#lines)
	{
		my $l = $lines[$i];
		last if !$in && $l =~ /^#{1,6}\s/;
		if (!$in && $l =~ /^\s*```sql\s*$/) { $in = 1; $sig = ''; next; }
		last if $in && $l =~ /^\s*```\s*$/;
		$sig .= "$l " if $in;
	}
	if (!defined $sig)
	{
		fail("$name: a signature follows its heading");
		diag("$designated{function}:$d->{line}: no ```sql block with the signature of $name after its heading");
		next;
	}
	$sig =~ s/--[^\n]*//g;
	if ($sig !~ /^\s*\Q$name\E\s*\((.*)\)\s*RETURNS\s+(.+?)\s*;?\s*$/is)
	{
		fail("$name: its signature reads NAME(ARGS) RETURNS TYPE");
		diag("$designated{function}:$d->{line}: cannot read the signature: $sig");
		next;
	}
	my ($argtext, $result) = ($1, $2);
	my @doc = map {
		/^(\w+)\s+(.+?)(?:\s+DEFAULT\s+(.+))?$/is
		  ? { name => $1, type => norm_type($2), default => defined $3, value => $3 }
		  : { name => $_, type => '?', default => 0 }
	} split_args($argtext);
	my $nin = @{ $f->{args} };
	my @cat = map {
		{
			name => $f->{args}[$_]{name},
			type => norm_type($f->{args}[$_]{type}),
			default => $_ >= $nin - $f->{ndefaults}
		}
	} 0 .. $nin - 1;
	my $show = sub {
		join(', ', map { "$_->{name} $_->{type}" . ($_->{default} ? ' DEFAULT' : '') } @_);
	};
	is(norm_result($result), norm_result($f->{result}),
		"$name: the documented result is the catalog's");
	is($show->(@doc), $show->(@cat), "$name: the documented arguments are the catalog's")
	  or next;
	# the documented defaults have the catalog's values (compared by the
	# server, as values of the argument's type: '15 minutes' is '00:15:00')
	my %catalog_default = map { /^(\w+)\s+.+?\s+DEFAULT\s+(.+)$/is ? ($1 => $2) : () } split_args($f->{argtext});
	my @compare = map {
		my $i = $_;
		$doc[$i]{default}
		  ? sprintf('CASE WHEN (%s)::%s IS DISTINCT FROM (%s) THEN %s END', $doc[$i]{value},
			$f->{args}[$i]{type}, $catalog_default{ $doc[$i]{name} } // 'NULL',
			"'" . ("$doc[$i]{name}: documented $doc[$i]{value}, defined " . ($catalog_default{ $doc[$i]{name} } // '?')) =~ s/'/''/gr . "'")
		  : ()
	} 0 .. $#doc;
	my $differ = @compare ? $node->psql('docs', 'SELECT concat_ws(\'; \', ' . join(', ', @compare) . ')', stdout => \my $out, stderr => \my $err) : 0;
	is($differ ? "cannot compare: $err" : ($out // ''), '', "$name: the documented DEFAULTs are the catalog's") if @compare;
}
for my $name (sort keys %{ $defs{function} })
{
	next if $func{$name};
	fail("documented function $name exists");
	diag("$name is documented (" . join(', ', map { "$_->{file}:$_->{line}" } @{ $defs{function}{$name} })
		  . ") but the extension has no such function: remove or rename the entry");
}

############################################################################
# views and result types: a row each, the columns in order
############################################################################

# the column names of a row's cell: "a, b (remark, more), c" -> a b c
sub cell_columns
{
	my ($cell) = @_;
	$cell =~ s/`//g;
	1 while $cell =~ s/\([^()]*\)//g;
	return map { /^\s*(\w+)/ ? $1 : '?' } split /,/, $cell;
}

for my $kind (qw(view type))
{
	my $cat = $kind eq 'view' ? \%view : \%type;
	for my $name (sort keys %$cat)
	{
		my $d = defined_once($kind, $name, $designated{$kind}, $defs{row}{$name}) or next;
		is(join(', ', cell_columns($d->{cells}[0] // '')), join(', ', @{ $cat->{$name} }),
			"$name: the documented columns are the catalog's, in order");
	}
}

############################################################################
# settings: a row each, with the default and who can set it
############################################################################

my %set_by = (
	postmaster => 'restart',
	sighup => 'reload',
	superuser => 'superuser',
	user => 'any user',
	backend => 'connection start',
	'superuser-backend' => 'connection start');
# units of pg_settings and of the documented defaults: [kind, size in the base unit]
my %unit = (
	ms => [ 'time', 1 ],
	s => [ 'time', 1000 ],
	min => [ 'time', 60_000 ],
	h => [ 'time', 3_600_000 ],
	d => [ 'time', 86_400_000 ],
	B => [ 'memory', 1 ],
	kB => [ 'memory', 1024 ],
	MB => [ 'memory', 1024**2 ],
	GB => [ 'memory', 1024**3 ],
	TB => [ 'memory', 1024**4 ]);

# pg_settings' unit ('ms', 'kB', '8kB', ...) as [kind, size], or undef
sub setting_unit
{
	my ($u) = @_;
	return undef unless $u =~ /^(\d*)(\w+)$/ && $unit{$2};
	return [ $unit{$2}[0], ($1 || 1) * $unit{$2}[1] ];
}

for my $name (sort keys %setting)
{
	my $d = defined_once('setting', $name, $designated{setting}, $defs{row}{$name}) or next;
	my $s = $setting{$name};
	my ($default, $by) = map { s/`//gr } @{ $d->{cells} }[ 0, 1 ];
	$default //= '';
	my ($value) = $default =~ /^\s*(\S+)/;
	$value //= '';
	my $ok;
	if ($s->{vartype} eq 'string') { $ok = $s->{boot} eq '' ? $value eq 'empty' : $value eq $s->{boot}; }
	elsif ($s->{vartype} eq 'bool') { $ok = $value eq $s->{boot}; }
	elsif ((my $su = setting_unit($s->{unit})) && $value =~ /^(-?[\d,]+)([a-zA-Z]+)?$/)
	{
		my ($n, $u) = ($1 =~ s/,//gr, $2);
		my $du = defined $u ? $unit{$u} : $su;
		$ok = $du && $du->[0] eq $su->[0] && $n * $du->[1] == $s->{boot} * $su->[1];
	}
	else { $ok = ($value =~ s/,//gr) eq $s->{boot}; }
	ok($ok, "$name: documented default '$value' is the boot value $s->{boot}$s->{unit}")
	  or diag("$designated{setting}:$d->{line}: the default cell must start with the boot value (strings: empty or the value)");
	is($by // '', $set_by{ $s->{context} } // $s->{context},
		"$name: documented as set by " . ($set_by{ $s->{context} } // $s->{context}) . " ($s->{context})");
}

############################################################################
# SQLSTATEs: what the code raises
############################################################################

my %raised;    # code => where
{
	my $h = slurp_file("$repo/src/billing.h");
	while ($h =~ /MAKE_SQLSTATE\('(.)',\s*'(.)',\s*'(.)',\s*'(.)',\s*'(.)'\)/g)
	{
		$raised{"$1$2$3$4$5"} //= 'src/billing.h';
	}
	my $pg_config = $ENV{PG_CONFIG} // 'pg_config';
	my $inc = `$pg_config --includedir-server`;
	chomp $inc;
	my %errcode;
	my $e = slurp_file("$inc/utils/errcodes.h");
	while ($e =~ /#define (ERRCODE_\w+) MAKE_SQLSTATE\('(.)','(.)','(.)','(.)','(.)'\)/g)
	{
		$errcode{$1} = "$2$3$4$5$6";
	}
	for my $c (sort glob("$repo/src/*.c"))
	{
		my $src = slurp_file($c);
		my $rel = 'src/' . basename($c);
		while ($src =~ /ereport\s*\(\s*ERROR\b(.*?);/gs)
		{
			for my $code ($1 =~ /errcode\((ERRCODE_\w+)\)/g)
			{
				next if $code =~ /^ERRCODE_BILLING_/;    # billing.h's
				if ($errcode{$code}) { $raised{ $errcode{$code} } //= $rel; }
				else { fail("$rel: errcode $code is known"); }
			}
		}
		$raised{'25006'} //= $rel if $src =~ /PreventCommandIfReadOnly/;
	}
	for my $sql (sort glob("$repo/schema/*.sql"))
	{
		my $src = slurp_file($sql);
		my $rel = 'schema/' . basename($sql);
		$raised{$1} //= $rel while $src =~ /ERRCODE\s*=\s*'([0-9A-Z]{5})'/g;
		$raised{$1} //= $rel while $src =~ /'(ZB[0-9A-Z]{3})'/g;
	}
}
ok(keys(%raised) >= 30, 'the code raises ' . scalar(keys %raised) . ' SQLSTATEs');
for my $code (sort keys %raised)
{
	my $d = defined_once('SQLSTATE', $code, $designated{sqlstate}, $defs{sqlstate}{$code})
	  or next;
	ok($d->{cells} >= 2, "$code: its row has a meaning and a DETAIL column");
}
for my $code (sort keys %{ $defs{sqlstate} })
{
	next if $raised{$code} || $code !~ /^ZB/;
	fail("documented SQLSTATE $code is raised by the code");
	diag("$code is documented but nothing in src/ or schema/ raises it: remove the row");
}

# every ZBnnn named anywhere in the documents is a documented one
for my $f (@md)
{
	my @unknown;
	my $n = 0;
	for my $line (split /\n/, $text{$f})
	{
		$n++;
		for my $code ($line =~ /\b(ZB[0-9A-Z]{3})\b/g)
		{
			push @unknown, "line $n: $code" unless $defs{sqlstate}{$code};
		}
	}
	is(join('; ', @unknown), '', "$f names only documented ZB SQLSTATEs");
}

# stale rows: a billing.* row that is neither a view, a type nor a setting
for my $name (sort keys %{ $defs{row} })
{
	next if $view{$name} || $type{$name} || $setting{$name};
	fail("documented $name exists");
	diag("$name has a row ("
		  . join(', ', map { "$_->{file}:$_->{line}" } @{ $defs{row}{$name} })
		  . ") but is no view, result type or setting: remove or rename it");
}

BillingTest::no_crashes($node);
$node->stop;
done_testing();
