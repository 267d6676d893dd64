/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The cachekit launcher: one delivery worker per database that has the
 *	  extension, started when it appears and stopped when it goes.
 *
 * The launcher is the background worker registered at server start. It
 * connects to no database (only the shared catalogs: it reads pg_database),
 * so it never blocks CREATE DATABASE or DROP DATABASE. It cannot read
 * another database's pg_extension, so it learns who has the extension
 * three ways: a committed CREATE or DROP EXTENSION says so (databases.c);
 * a database it has not looked into yet (all of them after a start, a
 * copy made by CREATE DATABASE) gets a probe, a short-lived worker that
 * connects, looks and leaves, one at a time, in a slot of its own; and a
 * worker that finds the extension gone says so and leaves.
 *
 * Workers take one slot each out of cachekit.max_databases; a database
 * beyond that is logged once and listed as such in cachekit_databases, and
 * served as soon as a slot frees up. Template databases and those that
 * refuse connections are skipped. With cachekit.database set, only that
 * database is served (with or without the extension, as in 0.1.0); while
 * it does not exist the launcher says so once and waits.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "storage/lwlock.h"
#include "utils/snapmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/wait_event.h"

/* how long the launcher sleeps when a timer of its own is running */
#define CK_LAUNCHER_NAP_MS 1000
/* how often it reads pg_database when nobody asks it to */
#define CK_LAUNCHER_SCAN_MS 10000
/* how long after a delivery worker stopped the next one starts */
#define CK_WORKER_RESTART_MS 5000

/* the launcher's handles of its workers, by index of ck_launcher->databases */
static BackgroundWorkerHandle *handles[CK_MAX_KNOWN_DATABASES];
static bool said_missing = false;
static bool said_full = false;

/* Register the launcher with the postmaster (from _PG_init). */
void
ck_register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* never on a standby: it starts once the server is promoted */
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "cachekit");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "cachekit_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "cachekit launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "cachekit launcher");
	RegisterBackgroundWorker(&worker);
}

/* What a database's pg_database row says about serving it. */
static CkDbState
ck_row_state(CkDatabase *e, Form_pg_database db)
{
	if (!ck_serve_all())
	{
		if (strcmp(NameStr(db->datname), ck_database) != 0)
			return CK_DB_NOT_SELECTED;
		return db->datallowconn ? CK_DB_EXTENSION : CK_DB_NO_CONNECTIONS;
	}
	if (db->datistemplate)
		return CK_DB_TEMPLATE;
	if (!db->datallowconn)
		return CK_DB_NO_CONNECTIONS;
	/* once skipped, now to be looked into */
	if (e->state == CK_DB_TEMPLATE || e->state == CK_DB_NO_CONNECTIONS ||
		e->state == CK_DB_NOT_SELECTED)
		return CK_DB_UNKNOWN;
	return e->state;
}

/* Forget a database that is gone: stop its worker, free its slot. */
static void
ck_forget_database(int i)
{
	CkDatabase *e = &ck_launcher->databases[i];

	if (handles[i] != NULL)
	{
		TerminateBackgroundWorker(handles[i]);
		pfree(handles[i]);
		handles[i] = NULL;
	}
	if (e->slot >= 0)
		ck_slot_reset(&ck_slots[e->slot], InvalidOid);
	memset(e, 0, sizeof(CkDatabase));
	e->slot = -1;
}

/*
 * Read pg_database and bring the entries up to date. With no database
 * selected only the shared catalogs can be read, and only by a plain scan
 * (as the autovacuum launcher reads pg_database).
 */
static void
ck_scan_databases(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	bool		found_selected = false;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	ck_launcher->scan_requested = false;
	for (int i = 0; i < ck_launcher->ndatabases; i++)
		ck_launcher->databases[i].seen = false;
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);
		CkDatabase *e = ck_database_entry(db->oid, true);

		if (e == NULL)
		{
			if (!said_full)
				ereport(LOG,
						(errmsg("cachekit cannot keep track of more than %d databases",
								CK_MAX_KNOWN_DATABASES),
						 errdetail("Database \"%s\" and later ones are not served.",
								   NameStr(db->datname))));
			said_full = true;
			continue;
		}
		namestrcpy(&e->name, NameStr(db->datname));
		e->seen = true;
		e->state = ck_row_state(e, db);
		if (!ck_serve_all() && strcmp(NameStr(db->datname), ck_database) == 0)
			found_selected = true;
	}
	for (int i = 0; i < ck_launcher->ndatabases; i++)
		if (OidIsValid(ck_launcher->databases[i].dboid) && !ck_launcher->databases[i].seen)
			ck_forget_database(i);
	LWLockRelease(CkLauncherLock);
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	pgstat_report_stat(false);

	if (!ck_serve_all() && !found_selected && !said_missing)
		ereport(LOG,
				(errmsg("cachekit is waiting for database \"%s\" to be created",
						ck_database),
				 errdetail("cachekit.database names the only database cachekit serves.")));
	said_missing = !ck_serve_all() && !found_selected;
}

/* Start a worker (or a probe) for entry i in slot; false if none could start. */
static bool
ck_start_worker(int i, int slot, bool probe)
{
	CkDatabase *e = &ck_launcher->databases[i];
	BackgroundWorker worker;
	CkWorkerArgs args;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "cachekit");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "cachekit_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "cachekit worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "cachekit worker");
	worker.bgw_main_arg = ObjectIdGetDatum(e->dboid);
	worker.bgw_notify_pid = MyProcPid;
	args.slot = slot;
	args.probe = probe;
	memcpy(worker.bgw_extra, &args, sizeof(args));

	if (!RegisterDynamicBackgroundWorker(&worker, &handles[i]))
	{
		handles[i] = NULL;
		ereport(LOG,
				(errmsg("cachekit launcher could not start a worker for database \"%s\"",
						NameStr(e->name)),
				 errhint("Raise max_worker_processes.")));
		e->restart_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													CK_WORKER_RESTART_MS);
		return false;
	}
	e->probing = probe;
	e->restart_now = false;
	return true;
}

/* Note the workers that started (their pid) and those that stopped. */
static void
ck_reap_workers(TimestampTz now)
{
	for (int i = 0; i < ck_launcher->ndatabases; i++)
	{
		CkDatabase *e = &ck_launcher->databases[i];
		pid_t		pid;

		if (handles[i] == NULL)
			continue;
		if (GetBackgroundWorkerPid(handles[i], &pid) != BGWH_STOPPED)
		{
			e->worker_pid = pid > 0 ? pid : e->worker_pid;
			continue;
		}
		pfree(handles[i]);
		handles[i] = NULL;
		e->worker_pid = 0;
		if (e->probing)
			e->probing = false;
		else if (e->paused_until > now)
			e->restart_at = 0;	/* stopped by a pause: back once it ends */
		else if (!e->restart_now && e->restart_at <= now)
			e->restart_at = TimestampTzPlusMilliseconds(now, CK_WORKER_RESTART_MS);
		/* a probe that left without an answer is tried again later */
		if (e->state == CK_DB_UNKNOWN)
			e->restart_at = TimestampTzPlusMilliseconds(now, CK_WORKER_RESTART_MS);
	}
}

/* A free slot for a worker, or -1 (the last slot is the probes'). */
static int
ck_free_slot(void)
{
	bool		used[1024 + 1] = {0};

	for (int i = 0; i < ck_launcher->ndatabases; i++)
		if (OidIsValid(ck_launcher->databases[i].dboid) && ck_launcher->databases[i].slot >= 0)
			used[ck_launcher->databases[i].slot] = true;
	for (int s = 0; s < ck_max_databases; s++)
		if (!used[s])
			return s;
	return -1;
}

/* Serve entry i, which has the extension: take a slot and start its worker. */
static void
ck_serve(int i)
{
	CkDatabase *e = &ck_launcher->databases[i];

	if (e->slot < 0)
	{
		int			slot = ck_free_slot();

		if (slot < 0)
		{
			if (!e->over_cap)
				ereport(LOG,
						(errmsg("cachekit cannot serve database \"%s\": %d databases are served already",
								NameStr(e->name), ck_max_databases),
						 errdetail("Work queued in it stays in its queue until a worker serves it."),
						 errhint("Raise cachekit.max_databases (and max_worker_processes) and restart the server.")));
			e->over_cap = true;
			return;
		}
		ck_slot_reset(&ck_slots[slot], e->dboid);
		e->slot = slot;
	}
	if (e->over_cap)
		ereport(LOG,
				(errmsg("cachekit serves database \"%s\" now that a worker slot is free",
						NameStr(e->name))));
	e->over_cap = false;
	(void) ck_start_worker(i, e->slot, false);
}

/*
 * Stop what should not run, free the slots of databases no longer served,
 * then start workers for the databases to serve and one probe.
 */
static void
ck_balance(TimestampTz now)
{
	bool		probe_running = false;

	for (int i = 0; i < ck_launcher->ndatabases; i++)
	{
		CkDatabase *e = &ck_launcher->databases[i];
		bool		paused = e->paused_until > now;

		if (handles[i] != NULL)
		{
			probe_running |= e->probing;
			if (paused || (!e->probing && e->state != CK_DB_EXTENSION))
				TerminateBackgroundWorker(handles[i]);
		}
		else if (e->slot >= 0 && e->state != CK_DB_EXTENSION)
		{
			ck_slot_reset(&ck_slots[e->slot], InvalidOid);
			e->slot = -1;
		}
		if (!paused)
			e->paused_until = 0;
	}
	for (int i = 0; i < ck_launcher->ndatabases; i++)
	{
		CkDatabase *e = &ck_launcher->databases[i];

		if (!OidIsValid(e->dboid) || handles[i] != NULL || e->paused_until != 0 ||
			(e->restart_at > now && !e->restart_now))
			continue;
		if (e->state == CK_DB_EXTENSION)
			ck_serve(i);
		else if (e->state == CK_DB_UNKNOWN && !probe_running)
		{
			ck_slot_reset(&ck_slots[ck_max_databases], e->dboid);
			probe_running = ck_start_worker(i, ck_max_databases, true);
		}
	}
}

/*
 * At start: workers of a launcher that died are still running, without
 * anyone holding their handles. Stop them; they are started again.
 */
static void
ck_adopt_orphans(void)
{
	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	ck_launcher->launcher_latch = MyLatch;
	ck_launcher->launcher_pid = MyProcPid;
	for (int i = 0; i < ck_launcher->ndatabases; i++)
	{
		CkDatabase *e = &ck_launcher->databases[i];

		if (e->worker_pid != 0)
			(void) kill(e->worker_pid, SIGTERM);
		e->worker_pid = 0;
		e->probing = false;
		e->restart_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													CK_WORKER_RESTART_MS);
	}
	LWLockRelease(CkLauncherLock);
}

/* Exit callback: nobody is to wake a launcher that is gone. */
static void
ck_launcher_exit(int code, Datum arg)
{
	LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
	ck_launcher->launcher_latch = NULL;
	ck_launcher->launcher_pid = 0;
	LWLockRelease(CkLauncherLock);
}

/*
 * How long to sleep: until the next scan of pg_database, or
 * CK_LAUNCHER_NAP_MS while a worker waits for its restart, a pause runs or
 * a database waits for its probe. Everything else wakes the launcher: the
 * postmaster when a worker starts or stops, backends after CREATE/DROP
 * EXTENSION and database commands.
 */
static long
ck_launcher_nap(TimestampTz now, TimestampTz next_scan)
{
	long		secs;
	int			usecs;

	for (int i = 0; i < ck_launcher->ndatabases; i++)
	{
		CkDatabase *e = &ck_launcher->databases[i];

		if (OidIsValid(e->dboid) &&
			(e->restart_at > now || e->paused_until != 0 || e->state == CK_DB_UNKNOWN))
			return CK_LAUNCHER_NAP_MS;
	}
	TimestampDifference(now, next_scan, &secs, &usecs);
	return Max(secs * 1000 + usecs / 1000 + 1, CK_LAUNCHER_NAP_MS);
}

/* Entry point of the launcher. */
void
cachekit_launcher_main(Datum arg)
{
	TimestampTz next_scan = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	/* the shared catalogs only: no database is held open */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	ck_adopt_orphans();
	before_shmem_exit(ck_launcher_exit, (Datum) 0);

	for (;;)
	{
		TimestampTz now;
		bool		scan;
		long		nap;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		now = GetCurrentTimestamp();
		LWLockAcquire(CkLauncherLock, LW_SHARED);
		scan = ck_launcher->scan_requested || now >= next_scan;
		LWLockRelease(CkLauncherLock);
		if (scan)
		{
			ck_scan_databases();
			next_scan = TimestampTzPlusMilliseconds(now, CK_LAUNCHER_SCAN_MS);
		}
		LWLockAcquire(CkLauncherLock, LW_EXCLUSIVE);
		ck_reap_workers(now);
		ck_balance(now);
		nap = ck_launcher_nap(now, next_scan);
		LWLockRelease(CkLauncherLock);

		/* the postmaster sets our latch when a worker starts or stops */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 nap, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
