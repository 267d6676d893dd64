/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The cachekit launcher: starts the delivery worker once the database
 *	  it serves (cachekit.database) exists, and again whenever it stopped.
 *
 * The launcher is the background worker registered at server start. It
 * connects to no database (only the shared catalogs, to look for
 * cachekit.database in pg_database), so it never blocks CREATE DATABASE or
 * DROP DATABASE. While the database does not exist it says so once and
 * waits; a delivery worker connecting to a missing database would fail and
 * be restarted every few seconds, with an error each time.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "utils/snapmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/wait_event.h"

/* how long the launcher waits between two looks at pg_database or its worker */
#define CK_LAUNCHER_NAP_MS 1000
/* how long after a delivery worker stopped the next one starts */
#define CK_WORKER_RESTART_MS 5000

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

/*
 * The OID of cachekit.database, or InvalidOid while it does not exist. With
 * no database selected only the shared catalogs can be read, and only by
 * a plain scan (as the autovacuum launcher reads pg_database).
 */
static Oid
ck_served_database(void)
{
	Oid			dboid = InvalidOid;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), ck_database) == 0)
		{
			dboid = db->oid;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	pgstat_report_stat(false);
	return dboid;
}

/* Start a delivery worker for database dboid; NULL if no slot was free. */
static BackgroundWorkerHandle *
ck_start_delivery(Oid dboid)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	pid_t		pid;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "cachekit");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "cachekit_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "cachekit worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "cachekit worker");
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		ereport(LOG,
				(errmsg("cachekit launcher could not start a worker for database \"%s\"",
						ck_database),
				 errhint("Raise max_worker_processes.")));
		return NULL;
	}
	(void) WaitForBackgroundWorkerStartup(handle, &pid);
	return handle;
}

/* Entry point of the launcher. */
void
cachekit_launcher_main(Datum arg)
{
	BackgroundWorkerHandle *handle = NULL;
	TimestampTz next_start = 0;
	bool		said_missing = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	/* the shared catalogs only: no database is held open */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	for (;;)
	{
		pid_t		pid;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (handle != NULL && GetBackgroundWorkerPid(handle, &pid) == BGWH_STOPPED)
		{
			pfree(handle);
			handle = NULL;
			next_start = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													 CK_WORKER_RESTART_MS);
		}
		if (handle == NULL && GetCurrentTimestamp() >= next_start)
		{
			Oid			dboid = ck_served_database();

			if (!OidIsValid(dboid))
			{
				if (!said_missing)
					ereport(LOG,
							(errmsg("cachekit is waiting for database \"%s\" to be created",
									ck_database),
							 errdetail("cachekit.database names the database whose queue cachekit delivers.")));
				said_missing = true;
			}
			else
			{
				said_missing = false;
				handle = ck_start_delivery(dboid);
				if (handle == NULL)
					next_start = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
															 CK_WORKER_RESTART_MS);
			}
		}
		/* the postmaster sets our latch when the worker starts or stops */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 CK_LAUNCHER_NAP_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
