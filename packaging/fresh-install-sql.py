#!/usr/bin/python3
# packaging/fresh-install-sql.py ROOT: build sql/cachekit--0.2.0.sql (the fresh-install
# script) from 0.1.0 as released (its DO block made safe) + the 0.1.0--0.2.0 update.
# Run it after every change to sql/cachekit--0.1.0--0.2.0.sql; test 180 checks the result.
import re, sys
root = sys.argv[1]
old = open(f'{root}/sql/cachekit--0.1.0.sql').read()
upd = open(f'{root}/sql/cachekit--0.1.0--0.2.0.sql').read()
body_old = old.split('\\quit\n', 1)[1]
do_start = body_old.index('-- Say so at once when nothing would deliver')
body_old = body_old[:do_start]
body_upd = upd.split('\\quit\n', 1)[1]
# drop the update script's own preamble comment (up to the first section)
body_upd = body_upd[body_upd.index('-- ----'):]
head = '''/* sql/cachekit--0.2.0.sql: objects of cachekit 0.2.0, for a fresh installation */

\\echo Use "CREATE EXTENSION cachekit" to load this file. \\quit

-- The objects of 0.1.0 (sql/cachekit--0.1.0.sql, frozen as released) with
-- every change of sql/cachekit--0.1.0--0.2.0.sql applied, in that order:
-- test/t/180_upgrade.pl checks that an updated installation and a fresh
-- one hold the same objects. Unlike 0.1.0's, its closing check qualifies
-- every function it calls: a look-alike planted in the target schema by a
-- database owner (format(text, name, text), say, a closer match than
-- pg_catalog's variadic format) would otherwise run as the superuser who
-- creates the extension.
'''
do_block = '''-- Say so at once when nothing would deliver this database's queue.
DO $$
BEGIN
	IF pg_catalog.current_setting('cachekit.database', true) IS NULL THEN
		RAISE WARNING 'cachekit is not loaded through shared_preload_libraries'
			USING DETAIL = 'Work queued by cachekit''s triggers and functions is delivered by its background worker, which runs only when the library is preloaded.',
				  HINT = 'Add cachekit to shared_preload_libraries and restart the server.';
	ELSIF pg_catalog.current_setting('cachekit.database') OPERATOR(pg_catalog.<>) \'\'
		  AND pg_catalog.current_setting('cachekit.database') OPERATOR(pg_catalog.<>) pg_catalog.current_database()::pg_catalog.text THEN
		RAISE WARNING 'cachekit''s worker serves database "%" only, not "%"',
			pg_catalog.current_setting('cachekit.database'), pg_catalog.current_database()
			USING DETAIL = 'Work queued in this database stays in its queue until a worker serves it.',
				  HINT = 'Set cachekit.database = \'\'\'\' (every database with the extension is served) and restart the server.';
	END IF;
END
$$;
'''
out = head + '\n-- ==== 0.1.0 ====\n' + body_old.rstrip('\n') + '\n\n' + do_block + '\n-- ==== changes of 0.2.0 ====\n\n' + body_upd
open(f'{root}/sql/cachekit--0.2.0.sql', 'w').write(out)
