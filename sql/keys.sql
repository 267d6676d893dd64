-- Keys do not depend on session settings: one canonical text per type
CREATE EXTENSION cachekit;
\set SHOW_CONTEXT never
SET client_min_messages = warning;

CREATE DOMAIN stamp AS timestamptz;
CREATE TABLE ev (
	id int PRIMARY KEY,
	tz timestamptz,
	ts timestamp,
	d date,
	t time,
	ttz timetz,
	iv interval,
	f4 real,
	f8 double precision,
	b bytea,
	m money,
	n numeric,
	s stamp,
	ints int[]
);
CREATE TRIGGER ev_cache AFTER INSERT OR UPDATE OR DELETE ON ev
	FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate(
		'tz:{tz}', 'ts:{ts}', 'd:{d}', 't:{t}', 'ttz:{ttz}', 'iv:{iv}', 'f4:{f4}',
		'f8:{f8}', 'b:{b}', 'm:{m}', 'n:{n}', 's:{s}', 'ints:{ints}');

-- the same row written under very different settings
CREATE FUNCTION write_as(tz text, ds text, ist text, efd int, bo text, lcm text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM set_config('TimeZone', tz, true);
	PERFORM set_config('DateStyle', ds, true);
	PERFORM set_config('IntervalStyle', ist, true);
	PERFORM set_config('extra_float_digits', efd::text, true);
	PERFORM set_config('bytea_output', bo, true);
	PERFORM set_config('lc_monetary', lcm, true);
	DELETE FROM ev;
	INSERT INTO ev VALUES (1, '2024-02-29 23:30:00.25+00', '2024-02-29 23:30:00.25', '2024-02-29',
						   '23:30:00.25', '23:30:00+05:30', '1 year 2 mons 3 days 04:05:06.5',
						   0.1, 0.1, '\x00ff41', 1234.56, 1.50, '2024-02-29 23:30:00+00', '{1,2}');
	INSERT INTO ev VALUES (2, '-infinity', 'infinity', '-infinity', NULL, NULL, '-1 days -00:00:01',
						   'NaN', '-Infinity', '', -0.01, NULL, '1999-12-31 19:00:00-05', NULL);
	INSERT INTO ev VALUES (3, '0044-03-15 12:00:00+00 BC', NULL, '0044-03-15 BC', NULL, NULL, NULL,
						   1e30, 1.0000000000000002, NULL, NULL, NULL, NULL, NULL);
END $$;

BEGIN;
SELECT write_as('UTC', 'ISO, MDY', 'postgres', 1, 'hex', 'C');
COMMIT;
BEGIN;
SELECT write_as('Asia/Kolkata', 'SQL, DMY', 'sql_standard', -15, 'escape', 'C.UTF-8');
COMMIT;
BEGIN;
SELECT write_as('America/St_Johns', 'German', 'postgres_verbose', 3, 'escape', 'C');
COMMIT;
BEGIN;
SELECT write_as('Pacific/Chatham', 'Postgres, YMD', 'iso_8601', 0, 'hex', 'C');
COMMIT;

-- each of the four writers queued the same keys (its rows' keys gathered
-- into one entry): one distinct set
SELECT count(DISTINCT keys) AS distinct_key_sets, count(*) AS entries
FROM cachekit_queue WHERE keys[1] LIKE 'tz:%';
-- and these are they (the canonical forms, README "Keys and session settings")
SELECT DISTINCT unnest(keys) AS key FROM cachekit_queue ORDER BY 1;
TRUNCATE cachekit_queue;

-- containers of such types, and types that print by search_path or by
-- extra_float_digits, are refused when the trigger is created
CREATE TYPE pair AS (a int, b double precision);
CREATE TABLE odd (id int, tzs timestamptz[], p pair, r tstzrange, dr daterange,
				  rc regclass, pt point, ok_ints int[], ok_range int4range, ok_json jsonb);
\set VERBOSITY sqlstate
CREATE TRIGGER odd_tzs AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('k:{tzs}');
\set VERBOSITY default
CREATE TRIGGER odd_tzs AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('k:{tzs}');
CREATE TRIGGER odd_p AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('k:{p}');
CREATE TRIGGER odd_r AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('k:{r}');
CREATE TRIGGER odd_dr AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('k:{dr}');
CREATE TRIGGER odd_rc AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('k:{rc}');
CREATE TRIGGER odd_pt AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_invalidate('k:{pt}');
CREATE TRIGGER odd_wt AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION cachekit_write_through('key=k:{id}:{tzs}');
-- and these print the same everywhere
CREATE TRIGGER odd_ok AFTER INSERT ON odd FOR EACH ROW
	EXECUTE FUNCTION cachekit_invalidate('k:{ok_ints}:{ok_range}:{ok_json}');
INSERT INTO odd (id, ok_ints, ok_range, ok_json) VALUES (1, '{1,2}', '[1,5)', '{"b": 1.50, "a": [true]}');
SELECT keys FROM cachekit_queue;
TRUNCATE cachekit_queue;

DROP TABLE ev, odd;
DROP TYPE pair;
DROP DOMAIN stamp;
DROP FUNCTION write_as(text, text, text, int, text, text);
DROP EXTENSION cachekit;
