/*-------------------------------------------------------------------------
 *
 * databases.c
 *	  The databases cachekit knows of: what the launcher learnt of each
 *	  (shared, see CkLauncherShared), what backends tell it, and the
 *	  cachekit_databases view.
 *
 * Backends tell the launcher two things. A committed CREATE EXTENSION or
 * DROP EXTENSION of cachekit (the state at commit counts, so a rolled-back
 * CREATE EXTENSION, or one undone by ROLLBACK TO SAVEPOINT, tells nothing)
 * marks the database as having the extension or not and wakes the
 * launcher. And before DROP DATABASE, ALTER DATABASE ... RENAME, ALTER
 * DATABASE ... SET TABLESPACE or CREATE DATABASE ... TEMPLATE of a database,
 * the backend pauses that database's worker: stops it, waits (a bounded
 * time) until it is gone, and keeps the launcher from starting another one
 * until the command is over. PostgreSQL refuses these commands while any
 * other session is connected to the database, and only autovacuum's are
 * asked to leave.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include <signal.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/indexing.h"
#include "catalog/pg_db_role_setting.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "commands/extension.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "tcop/utility.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/rel.h"
#include "utils/wait_event.h"

/* how long a paused database gets no worker, at most (the command may hang) */
#define CK_PAUSE_MS 60000
/* how long the pausing backend waits for the worker to leave */
#define CK_PAUSE_WAIT_MS 10000

static ProcessUtility_hook_type prev_process_utility = NULL;

/* did this transaction create, drop, rename or alter a database? */
static bool db_ddl_in_xact = false;
/* did this transaction create or drop an extension? */
static bool ext_ddl_in_xact = false;
/* then, at pre-commit: is cachekit installed, and in which database */
static bool ext_present_at_commit = false;
static NameData ext_datname;

PG_FUNCTION_INFO_V1(cachekit_databases);

/* Every database with the extension is served (cachekit.database is empty). */
bool
ck_serve_all(void)
{
	return ck_database == NULL || ck_database[0] == '\0';
}

/*
 * The entry of database dboid; with create, a new one if there is none
 * (NULL when all CK_MAX_KNOWN_DATABASES are taken). The caller holds
 * CkLauncherLock, exclusively to create.
 */
CkDatabase *
ck_database_entry(Oid dboid, bool create)
{
	CkDatabase *free_entry = NULL;

	for (int i = 0; i < ck_launcher->ndatabases; i++)
	{
		CkDatabase *e = &ck_launcher->databases[i];

		if (e->dboid == dboid)
			return e;
		if (!OidIsValid(e->dboid) && free_entry == NULL)
			free_entry = e;
	}
	if (!create)
		return NULL;
	if (free_entry == NULL)
	{
		if (ck_launcher->ndatabases >= CK_MAX_KNOWN_DATABASES)
			return NULL;
		free_entry = &ck_launcher->databases[ck_launcher->ndatabases++];
	}
	memset(free_entry, 0, sizeof(CkDatabase));
	free_entry->dboid = dboid;
	free_entry->slot = -1;
	free_entry->state = CK_DB_UNKNOWN;
	return free_entry;
}

/* Wake the launcher, if it runs. */
void
ck_wake_launcher(void)
{
	Latch	   *latch;

	if (ck_launcher == NULL)
		return;
	LWLockAcquire(CkLauncherLock, LW_SHARED);
	latch = ck_launcher->launcher_latch;
	LWLockRelease(CkLauncherLock);
	if (latch)
		SetLatch(latch);
}

/*
 * Tell the launcher whether the current database has the extension now:
 * a committed CREATE or DROP EXTENSION (looked_at = 0), or what a worker
 * or a probe found looking from looked_at on. A look that began before the
 * last committed CREATE or DROP EXTENSION was reported may predate it: it
 * is ignored.
 */
void
ck_report_extension(bool present, const char *datname, TimestampTz looked_at)
{
	CkDatabase *e;

	if (ck_launcher == NULL || !ck_serve_all())
		return;
	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	e = ck_database_entry(MyDatabaseId, true);
	if (e != NULL && looked_at != 0 && looked_at < e->reported_at)
		e = NULL;
	else if (e != NULL && looked_at == 0)
		e->reported_at = GetCurrentTimestamp();
	if (e != NULL)
	{
		if (NameStr(e->name)[0] == '\0' && datname != NULL)
			namestrcpy(&e->name, datname);
		/* a template's or a closed database's stays skipped (launcher.c) */
		if (e->state == CK_DB_UNKNOWN || e->state == CK_DB_NO_EXTENSION ||
			e->state == CK_DB_EXTENSION)
			e->state = present ? CK_DB_EXTENSION : CK_DB_NO_EXTENSION;
		e->restart_at = 0;
	}
	/* is it a template, or closed? the launcher reads pg_database first */
	ck_launcher->scan_requested = true;
	LWLockRelease(CkLauncherLock);
	ck_wake_launcher();
}

/* Ask the launcher to read pg_database now. */
static void
ck_request_scan(void)
{
	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	ck_launcher->scan_requested = true;
	LWLockRelease(CkLauncherLock);
	ck_wake_launcher();
}

/* Have the launcher look into the current database again (a probe). */
static void
ck_reprobe_database(void)
{
	CkDatabase *e;

	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	e = ck_database_entry(MyDatabaseId, false);
	if (e != NULL && e->state == CK_DB_NO_EXTENSION)
	{
		e->state = CK_DB_UNKNOWN;
		e->restart_at = 0;
	}
	LWLockRelease(CkLauncherLock);
	ck_wake_launcher();
}

/* A worker leaves to be restarted at once (its database's settings changed). */
void
ck_request_restart(void)
{
	CkDatabase *e;

	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	e = ck_database_entry(MyDatabaseId, false);
	if (e != NULL)
		e->restart_now = true;
	LWLockRelease(CkLauncherLock);
}

/*
 * Stop the worker of database dboid and keep the launcher from starting
 * another until ck_resume_database (or CK_PAUSE_MS). Waits until the worker
 * has left, or CK_PAUSE_WAIT_MS.
 */
static void
ck_pause_database(Oid dboid)
{
	CkDatabase *e;
	int			pid = 0;
	TimestampTz deadline;

	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	e = ck_database_entry(dboid, true);
	if (e != NULL)
	{
		e->paused_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), CK_PAUSE_MS);
		pid = e->worker_pid;
	}
	LWLockRelease(CkLauncherLock);
	/* the launcher stops one it is starting right now */
	ck_wake_launcher();
	if (pid == 0)
		return;
	(void) kill(pid, SIGTERM);
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), CK_PAUSE_WAIT_MS);
	while (BackendPidGetProc(pid) != NULL && GetCurrentTimestamp() < deadline)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * The command on a paused database is over: its worker may start again,
 * and the launcher reads pg_database (a new name, a new copy).
 */
static void
ck_resume_database(Oid dboid)
{
	CkDatabase *e;

	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	e = ck_database_entry(dboid, false);
	if (e != NULL)
	{
		e->paused_until = 0;
		e->restart_at = 0;
	}
	ck_launcher->scan_requested = true;
	LWLockRelease(CkLauncherLock);
	ck_wake_launcher();
}

/* The value of option "name" of a CREATE/ALTER DATABASE, or NULL. */
static char *
ck_db_option(List *options, const char *name)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *opt = lfirst_node(DefElem, lc);

		if (strcmp(opt->defname, name) == 0)
			return opt->arg ? defGetString(opt) : NULL;
	}
	return NULL;
}

/*
 * The database a command needs alone (no other session connected), or
 * InvalidOid; *dropping when the command drops it.
 */
static Oid
ck_command_database(Node *stmt, bool *dropping)
{
	const char *name = NULL;

	*dropping = false;
	if (IsA(stmt, DropdbStmt))
	{
		name = ((DropdbStmt *) stmt)->dbname;
		*dropping = true;
	}
	else if (IsA(stmt, RenameStmt) &&
			 ((RenameStmt *) stmt)->renameType == OBJECT_DATABASE)
		name = ((RenameStmt *) stmt)->subname;
	else if (IsA(stmt, AlterDatabaseStmt) &&
			 ck_db_option(((AlterDatabaseStmt *) stmt)->options, "tablespace") != NULL)
		name = ((AlterDatabaseStmt *) stmt)->dbname;
	else if (IsA(stmt, CreatedbStmt))
	{
		name = ck_db_option(((CreatedbStmt *) stmt)->options, "template");
		if (name == NULL)
			name = "template1";
	}
	return name ? get_database_oid(name, true) : InvalidOid;
}

/*
 * ProcessUtility hook: pause the worker of a database that a command needs
 * alone, and note CREATE and DROP EXTENSION for the commit.
 */
static void
ck_databases_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					 ProcessUtilityContext context, ParamListInfo params,
					 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;
	bool		drop = false;
	volatile Oid paused = InvalidOid;
	volatile bool dropping;

	if (ck_launcher != NULL)
		paused = ck_command_database(stmt, &drop);
	dropping = drop;
	if (OidIsValid(paused))
		ck_pause_database(paused);

	PG_TRY();
	{
		if (prev_process_utility)
			prev_process_utility(pstmt, queryString, readOnlyTree, context, params,
								 queryEnv, dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
									queryEnv, dest, qc);
	}
	PG_CATCH();
	{
		if (OidIsValid(paused))
			ck_resume_database(paused);
		PG_RE_THROW();
	}
	PG_END_TRY();

	/* a dropped database stays paused until the launcher sees it gone */
	if (OidIsValid(paused) && !dropping)
		ck_resume_database(paused);
	/*
	 * and the launcher reads pg_database again once this commits: a new
	 * copy, a new name, a database gone, ALLOW_CONNECTIONS, IS_TEMPLATE
	 */
	if (OidIsValid(paused) || IsA(stmt, AlterDatabaseStmt))
		db_ddl_in_xact = true;

	/*
	 * A prepared transaction may have created or dropped the extension
	 * (its database is this one): have the launcher look again.
	 */
	if (ck_launcher != NULL && IsA(stmt, TransactionStmt) &&
		((TransactionStmt *) stmt)->kind == TRANS_STMT_COMMIT_PREPARED)
		ck_reprobe_database();

	if ((IsA(stmt, CreateExtensionStmt) &&
		 strcmp(((CreateExtensionStmt *) stmt)->extname, "cachekit") == 0) ||
		(IsA(stmt, DropStmt) && ((DropStmt *) stmt)->removeType == OBJECT_EXTENSION))
		ext_ddl_in_xact = true;
}

/*
 * Transaction callback: after a committed CREATE or DROP EXTENSION, tell the
 * launcher whether cachekit is installed now (looked up before the commit,
 * while the catalogs can still be read).
 */
static void
ck_databases_xact(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			if (ext_ddl_in_xact)
			{
				char	   *name = get_database_name(MyDatabaseId);

				ext_present_at_commit = OidIsValid(get_extension_oid("cachekit", true));
				namestrcpy(&ext_datname, name ? name : "");
			}
			break;
		case XACT_EVENT_COMMIT:
			if (ext_ddl_in_xact)
				ck_report_extension(ext_present_at_commit, NameStr(ext_datname), 0);
			if (db_ddl_in_xact && ck_launcher != NULL)
				ck_request_scan();
			ext_ddl_in_xact = false;
			db_ddl_in_xact = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			ext_ddl_in_xact = false;
			db_ddl_in_xact = false;
			break;
		default:
			break;
	}
}

/* Called from _PG_init: the hook and the callback, in every backend. */
void
ck_databases_init(void)
{
	RegisterXactCallback(ck_databases_xact, NULL);
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = ck_databases_utility;
}

/*
 * The cachekit.redis_url that ALTER DATABASE ... SET stored for the current
 * database and every role (setrole = 0), or NULL. Only superusers (and
 * roles a superuser granted SET on it) can store it: the setting is
 * PGC_SUSET and the library is always loaded. Needs a transaction.
 */
char *
ck_database_url_setting(void)
{
	Relation	rel;
	ScanKeyData keys[2];
	SysScanDesc scan;
	HeapTuple	tup;
	char	   *url = NULL;

	rel = table_open(DbRoleSettingRelationId, AccessShareLock);
	ScanKeyInit(&keys[0], Anum_pg_db_role_setting_setdatabase,
				BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(MyDatabaseId));
	ScanKeyInit(&keys[1], Anum_pg_db_role_setting_setrole,
				BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(InvalidOid));
	scan = systable_beginscan(rel, DbRoleSettingDatidRolidIndexId, true, NULL, 2, keys);
	while ((tup = systable_getnext(scan)) != NULL)
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, Anum_pg_db_role_setting_setconfig,
									 RelationGetDescr(rel), &isnull);
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		if (isnull)
			continue;
		deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &nulls, &n);
		for (int i = 0; i < n; i++)
		{
			char	   *item = nulls[i] ? NULL : TextDatumGetCString(elems[i]);

			if (item && pg_strncasecmp(item, "cachekit.redis_url=", 19) == 0)
				url = pstrdup(item + 19);
		}
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return url;
}

/* Why a known database is or is not served, in words. */
static const char *
ck_database_why(const CkDatabase *e, bool served)
{
	if (served)
		return e->probing ? "looking for the extension" : "served";
	if (e->paused_until != 0)
		return "paused while a command needs the database alone";
	switch (e->state)
	{
		case CK_DB_UNKNOWN:
			return "not looked into yet";
		case CK_DB_NO_EXTENSION:
			return "no cachekit extension";
		case CK_DB_EXTENSION:
			return e->over_cap ? "not served: cachekit.max_databases reached" :
				"worker starting";
		case CK_DB_TEMPLATE:
			return "template database";
		case CK_DB_NO_CONNECTIONS:
			return "does not allow connections";
		case CK_DB_NOT_SELECTED:
			return "not served: cachekit.database names another database";
	}
	return "unknown";
}

/*
 * cachekit_databases(): every database the launcher knows of, whether it
 * is served and why not, behind the cachekit_databases view.
 */
Datum
cachekit_databases(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	if (ck_launcher == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cachekit is not loaded"),
				 errhint("Add cachekit to shared_preload_libraries and restart the server.")));
	InitMaterializedSRF(fcinfo, 0);

	LWLockAcquire(CkLauncherLock, LW_SHARED);
	for (int i = 0; i < ck_launcher->ndatabases; i++)
	{
		CkDatabase *e = &ck_launcher->databases[i];
		Datum		values[5];
		bool		nulls[5] = {0};
		bool		served;

		if (!OidIsValid(e->dboid))
			continue;
		served = e->worker_pid != 0;
		values[0] = ObjectIdGetDatum(e->dboid);
		values[1] = CStringGetTextDatum(NameStr(e->name));
		values[2] = BoolGetDatum(served && !e->probing);
		values[3] = Int32GetDatum(e->worker_pid);
		nulls[3] = !served || e->probing;
		values[4] = CStringGetTextDatum(ck_database_why(e, served));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(CkLauncherLock);
	return (Datum) 0;
}
