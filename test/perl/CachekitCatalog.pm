# test/perl/CachekitCatalog.pm -- what an installed extension consists of,
# read from the catalogs, for comparing two installations
#
#   use CachekitCatalog;
#   my @lines = extension_snapshot($node, 'db1');         # sorted lines
#   my @diff  = snapshot_diff(\@lines, [extension_snapshot($node, 'db2')]);
#
# The snapshot starts from the extension's members (pg_depend, deptype 'e'),
# so that objects added by later upgrade scripts are covered without naming
# them, and describes each member without OIDs: functions by their full
# definition (pg_get_functiondef), relations by kind, options (also of their
# toast table), columns (type, default, NOT NULL, storage, compression,
# options), constraints, indexes, triggers, rules, policies; views by their
# query; sequences by their parameters and owning column; types; every ACL
# (NULL spelled out as the default it stands for) and the initial privileges
# pg_dump uses (pg_init_privs); comments; and the extension's own row
# (version, configuration tables for pg_dump).
#
# Column options named pg_* are left out: they are reserved for the server's
# own use (PostgreSQL 15's recent minor releases store an attribute version
# as pg_attver, ATTRIBUTE_VERSION_ATTOPTION in catalog/pg_attribute.h, and
# pg_dump skips it), and their values differ between any two databases.

package CachekitCatalog;

use strict;
use warnings;

use Exporter qw(import);

our @EXPORT = qw(extension_snapshot snapshot_diff snapshot_sql);

# one line per fact: "<section>|<object identity>|<fact>"
my $SNAPSHOT_SQL = <<'SQL';
WITH ext AS (
	SELECT e.oid, e.extname FROM pg_catalog.pg_extension e WHERE e.extname = 'cachekit'
), member AS (
	SELECT d.classid, d.objid, d.objsubid, i.type, i.identity
	FROM pg_catalog.pg_depend d
	JOIN ext ON d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
	        AND d.refobjid = ext.oid AND d.deptype = 'e'
	CROSS JOIN LATERAL pg_catalog.pg_identify_object(d.classid, d.objid, d.objsubid) i
), rel AS (
	-- member relations, their indexes and their toast tables
	SELECT c.oid, m.identity FROM member m
	JOIN pg_catalog.pg_class c ON m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND c.oid = m.objid
	UNION
	SELECT x.indexrelid, (pg_catalog.pg_identify_object('pg_catalog.pg_class'::pg_catalog.regclass, x.indexrelid, 0)).identity
	FROM member m JOIN pg_catalog.pg_index x ON m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND x.indrelid = m.objid
), facts(section, ident, fact) AS (
	SELECT 'member', m.type, m.identity FROM member m
	UNION ALL
	SELECT 'extension', x.extname,
	       pg_catalog.concat_ws(' ', 'version=' || x.extversion, 'relocatable=' || x.extrelocatable,
	                            'schema=' || n.nspname, 'owner=' || pg_catalog.pg_get_userbyid(x.extowner),
	                            'config=' || (SELECT pg_catalog.string_agg(t.relid::pg_catalog.regclass::text || ':' || coalesce(t.cond, ''), ',' ORDER BY t.relid::pg_catalog.regclass::text)
	                                          FROM ROWS FROM (pg_catalog.unnest(x.extconfig), pg_catalog.unnest(x.extcondition)) AS t(relid, cond)))
	FROM pg_catalog.pg_extension x JOIN ext ON x.oid = ext.oid
	JOIN pg_catalog.pg_namespace n ON n.oid = x.extnamespace
	UNION ALL
	-- functions, procedures, aggregates
	SELECT 'function', m.identity,
	       pg_catalog.concat_ws(' ', 'kind=' || p.prokind::text, 'owner=' || pg_catalog.pg_get_userbyid(p.proowner),
	                            'leakproof=' || p.proleakproof,
	                            'def=' || CASE WHEN p.prokind IN ('f', 'p') THEN pg_catalog.pg_get_functiondef(p.oid)
	                                           ELSE pg_catalog.pg_get_function_arguments(p.oid) || ' ' || coalesce(pg_catalog.pg_get_function_result(p.oid), '') END)
	FROM member m JOIN pg_catalog.pg_proc p ON m.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = m.objid
	UNION ALL
	SELECT 'function acl', m.identity, a.a
	FROM member m JOIN pg_catalog.pg_proc p ON m.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = m.objid
	CROSS JOIN LATERAL (
		SELECT coalesce(pg_catalog.pg_get_userbyid(e.grantee), 'PUBLIC') || ':' || e.privilege_type || ':' || e.is_grantable
		       || ' by ' || pg_catalog.pg_get_userbyid(e.grantor)
		FROM pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f'::"char", p.proowner))) e
		UNION ALL SELECT '(none)' WHERE pg_catalog.cardinality(coalesce(p.proacl, pg_catalog.acldefault('f'::"char", p.proowner))) = 0
	) a(a)
	UNION ALL
	-- relations
	SELECT 'relation', r.identity,
	       pg_catalog.concat_ws(' ', 'kind=' || c.relkind::text, 'persistence=' || c.relpersistence::text,
	                            'owner=' || pg_catalog.pg_get_userbyid(c.relowner),
	                            'am=' || coalesce((SELECT amname FROM pg_catalog.pg_am WHERE oid = c.relam), '-'),
	                            'replident=' || c.relreplident::text, 'rls=' || c.relrowsecurity || '/' || c.relforcerowsecurity,
	                            'options=' || coalesce(pg_catalog.array_to_string(c.reloptions, ','), ''),
	                            'toast_options=' || coalesce((SELECT pg_catalog.array_to_string(t.reloptions, ',') FROM pg_catalog.pg_class t WHERE t.oid = c.reltoastrelid), ''),
	                            'has_toast=' || (c.reltoastrelid <> 0),
	                            'view=' || CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END,
	                            'index=' || CASE WHEN c.relkind = 'i' THEN pg_catalog.pg_get_indexdef(c.oid) END)
	FROM rel r JOIN pg_catalog.pg_class c ON c.oid = r.oid
	UNION ALL
	SELECT 'relation acl', r.identity, a.a
	FROM rel r JOIN pg_catalog.pg_class c ON c.oid = r.oid AND c.relkind <> 'i'
	CROSS JOIN LATERAL (
		SELECT coalesce(pg_catalog.pg_get_userbyid(e.grantee), 'PUBLIC') || ':' || e.privilege_type || ':' || e.is_grantable
		       || ' by ' || pg_catalog.pg_get_userbyid(e.grantor)
		FROM pg_catalog.aclexplode(coalesce(c.relacl, pg_catalog.acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) e
		UNION ALL SELECT '(none)'
		WHERE pg_catalog.cardinality(coalesce(c.relacl, pg_catalog.acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) = 0
	) a(a)
	UNION ALL
	SELECT 'column', r.identity || '.' || a.attname,
	       pg_catalog.concat_ws(' ', 'num=' || a.attnum, 'type=' || pg_catalog.format_type(a.atttypid, a.atttypmod),
	                            'notnull=' || a.attnotnull, 'storage=' || a.attstorage::text,
	                            'compression=' || a.attcompression::text, 'identity=' || a.attidentity::text,
	                            'generated=' || a.attgenerated::text, 'stattarget=' || a.attstattarget,
	                            'collation=' || coalesce((SELECT collname FROM pg_catalog.pg_collation WHERE oid = a.attcollation), '-'),
	                            'options=' || pg_catalog.array_to_string(ARRAY(SELECT o FROM pg_catalog.unnest(a.attoptions) o
	                                                              WHERE o NOT LIKE 'pg\_%'), ','),
	                            'acl=' || coalesce(a.attacl::text, ''),
	                            'default=' || coalesce(pg_catalog.pg_get_expr(d.adbin, d.adrelid), ''))
	FROM rel r JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
	LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
	UNION ALL
	SELECT 'constraint', r.identity || ' ' || k.conname,
	       k.contype::text || ' deferrable=' || k.condeferrable || '/' || k.condeferred || ' ' || pg_catalog.pg_get_constraintdef(k.oid)
	FROM rel r JOIN pg_catalog.pg_constraint k ON k.conrelid = r.oid
	UNION ALL
	SELECT 'trigger', r.identity || ' ' || t.tgname, t.tgenabled::text || ' ' || pg_catalog.pg_get_triggerdef(t.oid)
	FROM rel r JOIN pg_catalog.pg_trigger t ON t.tgrelid = r.oid AND NOT t.tgisinternal
	UNION ALL
	SELECT 'rule', r.identity || ' ' || w.rulename, w.ev_enabled::text || ' ' || pg_catalog.pg_get_ruledef(w.oid)
	FROM rel r JOIN pg_catalog.pg_rewrite w ON w.ev_class = r.oid
	UNION ALL
	SELECT 'policy', r.identity || ' ' || p.polname,
	       pg_catalog.concat_ws(' ', p.polcmd, p.polpermissive, p.polroles::text,
	                            pg_catalog.pg_get_expr(p.polqual, p.polrelid), pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid))
	FROM rel r JOIN pg_catalog.pg_policy p ON p.polrelid = r.oid
	UNION ALL
	SELECT 'sequence', r.identity,
	       pg_catalog.concat_ws(' ', pg_catalog.format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax,
	                            s.seqmin, s.seqcache, s.seqcycle,
	                            'owned_by=' || (SELECT pg_catalog.string_agg((pg_catalog.pg_identify_object(d.refclassid, d.refobjid, d.refobjsubid)).identity, ',')
	                                            FROM pg_catalog.pg_depend d
	                                            WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
	                                              AND d.objid = s.seqrelid AND d.deptype IN ('a', 'i')))
	FROM rel r JOIN pg_catalog.pg_sequence s ON s.seqrelid = r.oid
	UNION ALL
	-- types (not the row types of relations, described above)
	SELECT 'type', m.identity,
	       pg_catalog.concat_ws(' ', 'type=' || t.typtype::text, 'notnull=' || t.typnotnull,
	                            'base=' || CASE WHEN t.typbasetype <> 0 THEN pg_catalog.format_type(t.typbasetype, t.typtypmod) END,
	                            'default=' || t.typdefault, 'acl=' || coalesce(t.typacl::text, ''),
	                            'labels=' || (SELECT pg_catalog.string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
	                                          FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid),
	                            'checks=' || (SELECT pg_catalog.string_agg(pg_catalog.pg_get_constraintdef(k.oid), ',' ORDER BY k.conname)
	                                          FROM pg_catalog.pg_constraint k WHERE k.contypid = t.oid))
	FROM member m JOIN pg_catalog.pg_type t ON m.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND t.oid = m.objid
	UNION ALL
	-- privileges pg_dump takes as the extension's own
	SELECT 'init_privs', (pg_catalog.pg_identify_object(i.classoid, i.objoid, i.objsubid)).identity,
	       i.privtype::text || ' ' || coalesce((SELECT pg_catalog.string_agg(coalesce(pg_catalog.pg_get_userbyid(e.grantee), 'PUBLIC') || ':' || e.privilege_type, ',' ORDER BY 1)
	                                     FROM pg_catalog.aclexplode(i.initprivs) e), '(none)')
	FROM pg_catalog.pg_init_privs i
	WHERE EXISTS (SELECT FROM member m WHERE m.classid = i.classoid AND m.objid = i.objoid)
	   OR EXISTS (SELECT FROM rel r WHERE i.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass AND r.oid = i.objoid)
	UNION ALL
	-- comments on members and their columns
	SELECT 'comment', (pg_catalog.pg_identify_object(d.classoid, d.objoid, d.objsubid)).identity, d.description
	FROM pg_catalog.pg_description d
	WHERE EXISTS (SELECT FROM member m WHERE m.classid = d.classoid AND m.objid = d.objoid)
)
SELECT pg_catalog.replace(section || '|' || ident || '|' || coalesce(fact, '(null)'), E'\n', '\n')
FROM facts ORDER BY 1
SQL

=pod

=item snapshot_sql()

The query: one text column, one sorted line per fact.

=item extension_snapshot($node, $dbname)

The lines of the snapshot of cachekit in $dbname (dies if it fails).

=item snapshot_diff(\@a, \@b)

The lines in only one of the two, prefixed with "- " (only in @a) or "+ "
(only in @b); empty when they are equal.

=cut

sub snapshot_sql { return $SNAPSHOT_SQL; }

sub extension_snapshot
{
	my ($node, $dbname) = @_;
	my $out = $node->safe_psql($dbname, $SNAPSHOT_SQL);
	return split /\n/, $out;
}

sub snapshot_diff
{
	my ($a, $b) = @_;
	my (%ca, %cb);
	$ca{$_}++ for @$a;
	$cb{$_}++ for @$b;
	my @diff;
	for my $line (sort keys %{ { %ca, %cb } })
	{
		my $n = ($ca{$line} // 0) - ($cb{$line} // 0);
		push @diff, ("- $line") x $n  if $n > 0;
		push @diff, ("+ $line") x -$n if $n < 0;
	}
	return @diff;
}

1;
