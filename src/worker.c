/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background worker: reads committed queue entries in id order,
 *	  delivers them to Redis, and deletes them once Redis answered.
 *
 * One pass is: a short transaction that reads a batch, the Redis round trips
 * with no transaction open, and a short transaction that deletes what was
 * delivered (or counts the attempt, or moves an entry Redis refused too
 * often to cachekit_dead_letter). The worker sleeps on its latch, which
 * committing writers set; while Redis fails it waits out a capped
 * exponential backoff and ignores those wake-ups, so it never spins.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/vacuum.h"
#include "nodes/makefuncs.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/procarray.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "catalog/pg_class.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "tcop/utility.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/wait_event.h"

/* how long an idle worker sleeps before looking at the queue anyway */
#define CK_IDLE_TIMEOUT_MS 5000
/* the first retry delay after a failure */
#define CK_FIRST_RETRY_MS 20
/*
 * Under load (a pass found at least CK_LINGER_MIN_ENTRIES entries) the
 * worker waits a little before the next pass instead of being woken by
 * every commit: commits then cost no signal, batches grow, and the fixed
 * cost of a pass (two short transactions, a Redis round trip) and of
 * flushing a popular tag is shared by more entries. The wait grows with
 * the load, one millisecond per CK_LINGER_ENTRIES_PER_MS entries of the
 * last pass, up to CK_LINGER_MAX_MS. A lightly loaded worker is still woken
 * at once by each commit.
 */
#define CK_LINGER_MIN_ENTRIES 4
#define CK_LINGER_ENTRIES_PER_MS 16
#define CK_LINGER_MAX_MS 5

/* the outcome of one pass */
typedef enum CkPass
{
	CK_PASS_IDLE,				/* nothing more to do now */
	CK_PASS_MORE,				/* a full batch went out: go on at once */
	CK_PASS_FAILED				/* Redis failed: back off */
} CkPass;

static bool redis_down = false;	/* logged the loss, not yet the return */
static int	last_pass_entries = 0;	/* entries the last pass read */

/*
 * The worker vacuums its queue itself once it has deleted this many entries
 * (and at most every CK_VACUUM_MIN_MS): at tens of thousands of entries a
 * second, autovacuum's one-minute nap lets the queue swell by millions of
 * dead rows between its visits. These vacuums leave emptied pages in place
 * for the next entries: giving them back to the file system takes a lock
 * that every writer of a watched table would queue behind. Once the worker
 * has been idle for CK_IDLE_TIMEOUT_MS after that many deletions (a backlog
 * drained, a busy hour over), one more vacuum gives them back.
 */
#define CK_VACUUM_ENTRIES 100000
#define CK_VACUUM_MIN_MS 2000
static int64 deleted_since_vacuum = 0;
static int64 deleted_since_shrink = 0;
static TimestampTz last_vacuum = 0;

static char *current_host = NULL;	/* for messages, without the password */

/* Register the worker with the postmaster (from _PG_init). */
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
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "cachekit_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "cachekit worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "cachekit worker");
	RegisterBackgroundWorker(&worker);
}

/* Exit callback: stop advertising our latch. */
static void
ck_worker_exit(int code, Datum arg)
{
	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->worker_latch = NULL;
	ck_shared->worker_pid = 0;
	ck_shared->connected = false;
	SpinLockRelease(&ck_shared->mutex);
	ck_redis_disconnect();
}

/* Publish whether we hold a Redis connection. */
static void
ck_set_connected(bool connected)
{
	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->connected = connected;
	SpinLockRelease(&ck_shared->mutex);
}

/* Record a delivery failure: counters, last error, and one log line per outage. */
static void
ck_report_failure(const char *msg, bool connection)
{
	pg_atomic_fetch_add_u64(&ck_shared->failed_attempts, 1);
	ck_set_last_error(msg);
	if (connection)
	{
		ck_set_connected(false);
		if (!redis_down)
			ereport(LOG,
					(errmsg("cachekit worker cannot reach Redis, retrying with backoff: %s", msg)));
		redis_down = true;
	}
}

/* Make sure there is a Redis connection; false (reported) when there is none. */
static bool
ck_ensure_connection(void)
{
	CkRedisUrl	url;
	char	   *err = NULL;

	if (ck_redis_connected())
		return true;
	if (!ck_parse_redis_url(ck_redis_url, &url, &err))
	{
		ck_report_failure(psprintf("invalid cachekit.redis_url: %s", err), true);
		return false;
	}
	if (!ck_redis_connect(&url, &err) || !ck_deliver_prepare(&err))
	{
		ck_report_failure(err, true);
		return false;
	}
	if (current_host)
		pfree(current_host);
	current_host = MemoryContextStrdup(TopMemoryContext,
									   psprintf("%s:%d/%d", url.host, url.port, url.db));
	ereport(LOG,
			(errmsg(redis_down ? "cachekit worker reconnected to Redis at %s" :
					"cachekit worker connected to Redis at %s", current_host)));
	redis_down = false;
	ck_set_connected(true);
	return true;
}

/* what becomes of a queue entry after a delivery attempt */
typedef enum CkFate
{
	CK_FATE_DELIVERED,			/* Redis took it: delete it */
	CK_FATE_WAIT,				/* a transient error: retry, attempts unchanged */
	CK_FATE_RETRY,				/* refused: count the attempt, retry */
	CK_FATE_DEAD				/* refused cachekit.max_attempts times: dead letter */
} CkFate;

/* The fate of an entry after its delivery attempt. */
static CkFate
ck_fate(const CkEntry *e)
{
	if (!e->failed)
		return CK_FATE_DELIVERED;
	if (e->transient)
		return CK_FATE_WAIT;
	if (e->attempts + 1 >= ck_max_attempts)
		return CK_FATE_DEAD;
	return CK_FATE_RETRY;
}

/*
 * Where reading starts. Entries leave the queue from its low end, so the
 * low end of the id index fills with dead entries until vacuum removes
 * them; reading ORDER BY id from the very start would step over all of
 * them on every pass. The floor skips them, and moves up only when that is
 * safe: an entry below it can only appear by the commit of a transaction
 * that was running when the entries above it were read, so the floor waits
 * until every transaction running at that read has ended.
 */
static int64 read_floor = 0;

/* a proposed floor: entries up to last_id were read, under running vxids */
static struct
{
	bool		valid;
	bool		mature;			/* all those transactions have ended */
	int64		last_id;
	int			nvxids;
	VirtualTransactionId *vxids;
} floor_candidate;

/* Forget the floor: read from the start of the queue again. */
static void
ck_reset_floor(void)
{
	read_floor = 0;
	floor_candidate.valid = false;
	ck_publish_floor(InvalidOid, 0);
}

/* Have all transactions of the floor candidate ended? (No snapshot yet.) */
static void
ck_check_candidate(void)
{
	if (!floor_candidate.valid || floor_candidate.mature)
		return;
	for (int i = 0; i < floor_candidate.nvxids; i++)
		if (!VirtualXactLock(floor_candidate.vxids[i], false))
			return;
	floor_candidate.mature = true;
}

/* After a read: propose its last id as the next floor, under today's transactions. */
static void
ck_propose_floor(int64 last_id)
{
	VirtualTransactionId *vxids;
	int			n;

	if (floor_candidate.valid)
		return;
	vxids = GetCurrentVirtualXIDs(InvalidTransactionId, false, false, PROC_IN_VACUUM, &n);
	if (floor_candidate.vxids)
		pfree(floor_candidate.vxids);
	floor_candidate.vxids = MemoryContextAlloc(TopMemoryContext,
											   sizeof(VirtualTransactionId) * (n + 1));
	memcpy(floor_candidate.vxids, vxids, sizeof(VirtualTransactionId) * n);
	floor_candidate.nvxids = n;
	floor_candidate.last_id = last_id;
	floor_candidate.mature = false;
	floor_candidate.valid = true;
}

/*
 * After a settled batch: if the candidate had matured before the batch was
 * read and the batch covered every entry up to it, the floor moves past it,
 * but not past an entry of the batch that stays in the queue.
 */
static void
ck_advance_floor(Oid queue, CkEntry *entries, int n, bool covered)
{
	int64		floor;

	if (!floor_candidate.valid || !floor_candidate.mature || !covered)
		return;
	floor = floor_candidate.last_id + 1;
	for (int i = 0; i < n; i++)
	{
		CkFate		fate = ck_fate(&entries[i]);
		bool		stays = (fate == CK_FATE_WAIT || fate == CK_FATE_RETRY);

		if (stays && entries[i].id < floor)
			floor = entries[i].id;
	}
	read_floor = Max(read_floor, floor);
	floor_candidate.valid = false;
	ck_publish_floor(queue, read_floor);
}

/* Start a transaction with SPI and a snapshot, as each unit of work needs. */
static void
ck_begin(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	/* before the snapshot: what ended now is visible to it */
	ck_check_candidate();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

/* Finish what ck_begin started. */
static void
ck_commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* The quoted schema of the extension and its OID; NULL when not installed. */
static char *
ck_find_schema(Oid *nspid)
{
	int			rc;
	bool		isnull;

	rc = SPI_execute("SELECT quote_ident(n.nspname), n.oid FROM pg_catalog.pg_extension e "
					 "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
					 "WHERE e.extname = 'cachekit'", true, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "cachekit worker could not look up its extension: %s",
			 SPI_result_code_string(rc));
	if (SPI_processed == 0)
		return NULL;
	*nspid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
}

/* the worker's statements, prepared once per installed extension */
enum
{
	CK_PLAN_READ,
	CK_PLAN_DELETE,
	CK_PLAN_DELETE_IDS,
	CK_PLAN_RETRY,
	CK_PLAN_DEAD,
	CK_NPLANS
};

static SPIPlanPtr plans[CK_NPLANS];
static Oid	plans_ext = InvalidOid;	/* the extension they were made for */
static Oid	plans_queue = InvalidOid;	/* and its queue table */

/* Forget the kept plans (extension dropped, or an error). */
static void
ck_free_plans(void)
{
	for (int i = 0; i < CK_NPLANS; i++)
	{
		if (plans[i])
			SPI_freeplan(plans[i]);
		plans[i] = NULL;
	}
	plans_ext = InvalidOid;
	plans_queue = InvalidOid;
	ck_reset_floor();
}

/* Prepare and keep one statement. */
static SPIPlanPtr
ck_keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "cachekit worker could not prepare \"%s\": %s", sql,
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	return plan;
}

/*
 * Make sure the kept plans belong to the extension installed now, and lock
 * its queue so that it cannot be dropped (and recreated) until the current
 * transaction ends. Returns false when the extension is not installed.
 */
static bool
ck_prepare_plans(void)
{
	Oid			ext;
	char	   *schema;
	Oid			nspid = InvalidOid;
	Oid			read_types[1] = {INT8OID};
	Oid			ids_types[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Oid			tid_types[2] = {TIDARRAYOID, INT8OID};

	/* the usual case: lock the known queue, then check it is still ours */
	if (OidIsValid(plans_ext))
	{
		LockRelationOid(plans_queue, RowExclusiveLock);
		if (get_extension_oid("cachekit", true) == plans_ext &&
			SearchSysCacheExists1(RELOID, ObjectIdGetDatum(plans_queue)))
			return true;
		ck_free_plans();
	}

	ext = get_extension_oid("cachekit", true);
	{
		ck_free_plans();
		if (!OidIsValid(ext))
			return false;
		schema = ck_find_schema(&nspid);
		if (schema == NULL)
			return false;

		plans[CK_PLAN_READ] = ck_keep_plan(
			psprintf("SELECT id, kind, keys, tags, untags, value, ttl, attempts, ctid FROM %s.%s "
					 "WHERE id >= $1 ORDER BY id LIMIT %d",
					 schema, CK_QUEUE_TABLE, ck_batch_size), 1, read_types);
		/*
		 * Delivered entries go by ctid, without an index lookup each. The
		 * ids bound the delete: a row that took the place of a vanished
		 * entry since the read (after a manual delete and a vacuum) was
		 * queued later and has a higher id. A rewrite of the table (VACUUM
		 * FULL, CLUSTER, TRUNCATE) moves rows: then ids are used instead.
		 */
		plans[CK_PLAN_DELETE] = ck_keep_plan(
			psprintf("DELETE FROM %s.%s WHERE ctid = ANY ($1) AND id <= $2",
					 schema, CK_QUEUE_TABLE), 2, tid_types);
		plans[CK_PLAN_DELETE_IDS] = ck_keep_plan(
			psprintf("DELETE FROM %s.%s WHERE id = ANY ($1)", schema, CK_QUEUE_TABLE),
			1, ids_types);
		plans[CK_PLAN_RETRY] = ck_keep_plan(
			psprintf("UPDATE %s.%s q SET attempts = q.attempts + 1, last_error = u.err "
					 "FROM unnest($1, $2) AS u(id, err) WHERE q.id = u.id",
					 schema, CK_QUEUE_TABLE), 2, ids_types);
		plans[CK_PLAN_DEAD] = ck_keep_plan(
			psprintf("WITH moved AS (DELETE FROM %s.%s q USING unnest($1, $2) AS u(id, err) "
					 "WHERE q.id = u.id RETURNING q.*, u.err) "
					 "INSERT INTO %s.%s (id, kind, keys, tags, untags, value, ttl, attempts, error, enqueued_at) "
					 "SELECT id, kind, keys, tags, untags, value, ttl, attempts + 1, err, enqueued_at FROM moved",
					 schema, CK_QUEUE_TABLE, schema, CK_DEAD_TABLE), 2, ids_types);
		plans_ext = ext;
		plans_queue = get_relname_relid(CK_QUEUE_TABLE, nspid);
	}

	/* lock first, then make sure it is still the same extension */
	LockRelationOid(plans_queue, RowExclusiveLock);
	if (get_extension_oid("cachekit", true) != plans_ext ||
		!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(plans_queue)))
	{
		ck_free_plans();
		return false;
	}
	return true;
}

/* Copy a text[] datum into an array of C strings in the current context. */
static int
ck_copy_text_array(Datum d, char ***out)
{
	ArrayType  *arr = DatumGetArrayTypeP(d);
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	*out = palloc(sizeof(char *) * (n + 1));
	for (int i = 0; i < n; i++)
		(*out)[i] = nulls[i] ? pstrdup("") : TextDatumGetCString(elems[i]);
	return n;
}

/* Read up to batch_size entries in id order into batch_cxt. */
static int
ck_read_batch(MemoryContext batch_cxt, CkEntry **entries_out)
{
	Datum		args[1];
	int			rc;
	CkEntry    *entries;
	int			n;

	args[0] = Int64GetDatum(read_floor);
	rc = SPI_execute_plan(plans[CK_PLAN_READ], args, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "cachekit worker could not read its queue: %s", SPI_result_code_string(rc));

	n = (int) SPI_processed;
	entries = MemoryContextAllocZero(batch_cxt, sizeof(CkEntry) * (n + 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		CkEntry    *e = &entries[i];
		bool		isnull;
		Datum		d;
		MemoryContext old;

		old = MemoryContextSwitchTo(batch_cxt);
		e->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		e->kind = DatumGetChar(SPI_getbinval(tup, desc, 2, &isnull));
		e->nkeys = ck_copy_text_array(SPI_getbinval(tup, desc, 3, &isnull), &e->keys);
		e->ntags = ck_copy_text_array(SPI_getbinval(tup, desc, 4, &isnull), &e->tags);
		e->nuntags = ck_copy_text_array(SPI_getbinval(tup, desc, 5, &isnull), &e->untags);
		d = SPI_getbinval(tup, desc, 6, &isnull);
		e->value = isnull ? NULL : TextDatumGetCString(d);
		e->ttl = DatumGetInt32(SPI_getbinval(tup, desc, 7, &isnull));
		e->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
		ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(tup, desc, 9, &isnull)), &e->ctid);
		MemoryContextSwitchTo(old);
	}
	*entries_out = entries;
	return n;
}

/* Build a bigint[] of the ids of the entries with a given fate. */
static Datum
ck_id_array(CkEntry *entries, int n, CkFate fate, int *count)
{
	Datum	   *ids = palloc(sizeof(Datum) * (n + 1));
	int			k = 0;

	for (int i = 0; i < n; i++)
		if (ck_fate(&entries[i]) == fate)
			ids[k++] = Int64GetDatum(entries[i].id);
	*count = k;
	return PointerGetDatum(construct_array(ids, k, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/* Build a text[] of the errors of the entries with a given fate, in id order. */
static Datum
ck_error_array(CkEntry *entries, int n, CkFate fate)
{
	Datum	   *errs = palloc(sizeof(Datum) * (n + 1));
	int			k = 0;

	for (int i = 0; i < n; i++)
		if (ck_fate(&entries[i]) == fate)
			errs[k++] = CStringGetTextDatum(entries[i].error ? entries[i].error : "refused");
	return PointerGetDatum(construct_array(errs, k, TEXTOID, -1, false, TYPALIGN_INT));
}

/* Run one kept statement with an id array and optionally an error array. */
static void
ck_exec_ids(int plan, Datum ids, Datum errs, int expected)
{
	Datum		args[2] = {ids, errs};
	int			rc;

	rc = SPI_execute_plan(plans[plan], args, NULL, false, 0);
	if (rc != expected)
		elog(ERROR, "cachekit worker could not update its queue: %s", SPI_result_code_string(rc));
}

/* The queue's current storage: it changes when the table is rewritten. */
static Oid
ck_queue_filenode(void)
{
	HeapTuple	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(plans_queue));
	Oid			filenode;

	if (!HeapTupleIsValid(tup))
		return InvalidOid;
	filenode = ((Form_pg_class) GETSTRUCT(tup))->relfilenode;
	ReleaseSysCache(tup);
	return filenode;
}

/* Delete the delivered entries, by ctid while the table was not rewritten. */
static void
ck_delete_delivered(CkEntry *entries, int n, Datum ids, Oid read_filenode)
{
	Datum	   *tids = palloc(sizeof(Datum) * (n + 1));
	int64		max_id = 0;
	int			k = 0;
	Datum		args[2];
	int			rc;

	if (read_filenode != ck_queue_filenode())
	{
		ck_exec_ids(CK_PLAN_DELETE_IDS, ids, (Datum) 0, SPI_OK_DELETE);
		return;
	}
	for (int i = 0; i < n; i++)
	{
		if (ck_fate(&entries[i]) != CK_FATE_DELIVERED)
			continue;
		tids[k++] = PointerGetDatum(&entries[i].ctid);
		max_id = Max(max_id, entries[i].id);
	}
	if (k == 0)
		return;
	args[0] = PointerGetDatum(construct_array(tids, k, TIDOID, sizeof(ItemPointerData),
											  false, TYPALIGN_SHORT));
	args[1] = Int64GetDatum(max_id);
	rc = SPI_execute_plan(plans[CK_PLAN_DELETE], args, NULL, false, 0);
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "cachekit worker could not update its queue: %s", SPI_result_code_string(rc));
}

/* Record the outcome of a delivered batch in the queue. */
static void
ck_settle_batch(CkEntry *entries, int n, Oid read_filenode)
{
	Datum		ids;
	int			count;

	ids = ck_id_array(entries, n, CK_FATE_DELIVERED, &count);
	if (count > 0)
		ck_delete_delivered(entries, n, ids, read_filenode);
	deleted_since_vacuum += count;
	deleted_since_shrink += count;
	pg_atomic_fetch_add_u64(&ck_shared->entries_delivered, count);

	ids = ck_id_array(entries, n, CK_FATE_RETRY, &count);
	if (count > 0)
		ck_exec_ids(CK_PLAN_RETRY, ids, ck_error_array(entries, n, CK_FATE_RETRY), SPI_OK_UPDATE);

	ids = ck_id_array(entries, n, CK_FATE_DEAD, &count);
	if (count > 0)
	{
		ck_exec_ids(CK_PLAN_DEAD, ids, ck_error_array(entries, n, CK_FATE_DEAD), SPI_OK_INSERT);
		pg_atomic_fetch_add_u64(&ck_shared->dead_lettered, count);
		for (int i = 0; i < n; i++)
			if (ck_fate(&entries[i]) == CK_FATE_DEAD)
				ereport(WARNING,
						(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						 errmsg("cachekit moved queue entry %lld to %s after %d refusals",
								(long long) entries[i].id, CK_DEAD_TABLE, entries[i].attempts + 1),
						 errdetail("Redis answered: %s", entries[i].error)));
	}
}

/* One pass: read a batch, deliver it, settle it. */
static CkPass
ck_pass(MemoryContext batch_cxt)
{
	CkEntry    *entries = NULL;
	int			n = 0;
	Oid			batch_ext;
	Oid			read_filenode;
	bool		covered;
	CkDeliveryStats stats;
	char	   *err = NULL;
	bool		refused = false;
	bool		transient = false;
	bool		ok;
	MemoryContext old;

	/* commits from now on must wake us again: their work may miss this read */
	pg_atomic_write_u32(&ck_shared->wake_requested, 0);
	pg_memory_barrier();

	ck_begin("reading queue");
	if (ck_prepare_plans())
		n = ck_read_batch(batch_cxt, &entries);
	batch_ext = plans_ext;
	last_pass_entries = n;
	read_filenode = OidIsValid(plans_queue) ? ck_queue_filenode() : InvalidOid;
	/* did this read see every entry up to a matured floor candidate? */
	covered = floor_candidate.valid && floor_candidate.mature &&
		(n < ck_batch_size || entries[n - 1].id >= floor_candidate.last_id);
	if (n > 0)
		ck_propose_floor(entries[n - 1].id);
	ck_commit();

	if (n == 0)
	{
		/* connect while idle too, so cachekit_stats tells whether Redis is up */
		if (OidIsValid(batch_ext) && !ck_redis_connected())
			(void) ck_ensure_connection();
		return CK_PASS_IDLE;
	}

	/* Redis round trips, with no transaction open */
	old = MemoryContextSwitchTo(batch_cxt);
	if (!ck_ensure_connection())
	{
		MemoryContextSwitchTo(old);
		return CK_PASS_FAILED;
	}
	pgstat_report_activity(STATE_RUNNING, "delivering to Redis");
	ok = ck_deliver(entries, n, &stats, &err);
	if (!ok)
	{
		MemoryContextSwitchTo(old);
		ck_report_failure(err, true);
		pgstat_report_activity(STATE_IDLE, NULL);
		return CK_PASS_FAILED;
	}
	MemoryContextSwitchTo(old);

	for (int i = 0; i < n; i++)
	{
		if (entries[i].failed && entries[i].transient)
			transient = true;
		else if (entries[i].failed)
			refused = true;
		if (entries[i].failed && !err)
			err = entries[i].error;
	}

	/*
	 * Settle in the queue the batch was read from. If the extension was
	 * dropped meanwhile, that queue is gone with its entries; a new queue's
	 * ids may repeat the old ones, so nothing of it may be touched.
	 */
	ck_begin("settling batch");
	if (ck_prepare_plans() && plans_ext == batch_ext)
	{
		ck_settle_batch(entries, n, read_filenode);
		ck_advance_floor(plans_queue, entries, n, covered);
	}
	ck_commit();
	ck_redelete_remember(entries, n);	/* cachekit.redelete_after */

	pg_atomic_fetch_add_u64(&ck_shared->keys_deleted, stats.keys_deleted);
	pg_atomic_fetch_add_u64(&ck_shared->tags_flushed, stats.tags_flushed);
	pg_atomic_fetch_add_u64(&ck_shared->tag_keys_deleted, stats.tag_keys_deleted);
	pg_atomic_fetch_add_u64(&ck_shared->keys_written, stats.keys_written);
	pg_atomic_fetch_add_u64(&ck_shared->values_too_large, stats.values_too_large);
	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->last_delivery_at = GetCurrentTimestamp();
	SpinLockRelease(&ck_shared->mutex);
	ConditionVariableBroadcast(&ck_shared->delivered_cv);

	if (transient)
	{
		/* e.g. NOSCRIPT or LOADING: start afresh on a new connection */
		ck_redis_disconnect();
		ck_set_connected(false);
	}
	if (refused || transient)
	{
		ck_report_failure(psprintf("Redis refused a queue entry%s: %s",
								   transient ? " (will retry)" : "", err), false);
		return CK_PASS_FAILED;
	}
	return n >= ck_batch_size ? CK_PASS_MORE : CK_PASS_IDLE;
}

/* Vacuum the queue; "shrink" lets it give emptied pages at its end back. */
static void
ck_vacuum_queue(Oid queue, bool shrink)
{
	MemoryContext cxt = CurrentMemoryContext;
	MemoryContext portal;
	VacuumParams params;

	memset(&params, 0, sizeof(params));
	params.options = VACOPT_VACUUM | VACOPT_SKIP_LOCKED | VACOPT_PROCESS_TOAST;
	params.freeze_min_age = -1;
	params.freeze_table_age = -1;
	params.multixact_freeze_min_age = -1;
	params.multixact_freeze_table_age = -1;
	params.log_min_duration = -1;
	params.index_cleanup = VACOPTVALUE_UNSPECIFIED;
	params.truncate = shrink ? VACOPTVALUE_ENABLED : VACOPTVALUE_DISABLED;
	params.nworkers = -1;

	/* vacuum() runs its own transactions and wants a portal context */
	portal = AllocSetContextCreate(TopMemoryContext, "cachekit vacuum", ALLOCSET_DEFAULT_SIZES);
	PortalContext = portal;
	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		pgstat_report_activity(STATE_RUNNING, shrink ? "vacuuming queue (truncate)" : "vacuuming queue");
		vacuum(list_make1(makeVacuumRelation(NULL, queue, NIL)), &params, NULL, true);
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(LOG,
				(errcode(edata->sqlerrcode),
				 errmsg("cachekit worker could not vacuum its queue: %s", edata->message)));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	PortalContext = NULL;
	MemoryContextSwitchTo(cxt);
	MemoryContextDelete(portal);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* Vacuum the queue when enough entries were deleted since the last time. */
static void
ck_maybe_vacuum(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (deleted_since_vacuum < CK_VACUUM_ENTRIES || !OidIsValid(plans_queue) ||
		!TimestampDifferenceExceeds(last_vacuum, now, CK_VACUUM_MIN_MS))
		return;
	deleted_since_vacuum = 0;
	last_vacuum = now;
	ck_vacuum_queue(plans_queue, false);
}

/* Idle after much work: vacuum once more, giving emptied pages back. */
static void
ck_maybe_shrink(void)
{
	if (deleted_since_shrink < CK_VACUUM_ENTRIES || !OidIsValid(plans_queue))
		return;
	deleted_since_shrink = 0;
	deleted_since_vacuum = 0;
	last_vacuum = GetCurrentTimestamp();
	ck_vacuum_queue(plans_queue, true);
}

/*
 * A pass that survives its own errors (the queue table dropped under it,
 * say): the error is logged, the transaction rolled back, and the pass
 * counts as failed, so the worker backs off instead of exiting and being
 * restarted over and over.
 */
static CkPass
ck_pass_guarded(MemoryContext batch_cxt)
{
	MemoryContext cxt = CurrentMemoryContext;
	CkPass		result;

	PG_TRY();
	{
		char	   *err = NULL;

		result = ck_pass(batch_cxt);
		/* second deletes that are due (redelete.c), on the pass's connection */
		if (result != CK_PASS_FAILED && ck_redis_connected() &&
			!ck_redelete_run_due(&err))
		{
			ck_report_failure(err, true);
			ck_redis_disconnect();
			result = CK_PASS_FAILED;
		}
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		/* the error report itself goes to the log */
		ereport(LOG,
				(errcode(edata->sqlerrcode),
				 errmsg("cachekit worker pass failed: %s", edata->message),
				 edata->detail ? errdetail_internal("%s", edata->detail) : 0));
		ck_set_last_error(edata->message);
		pg_atomic_fetch_add_u64(&ck_shared->failed_attempts, 1);
		FreeErrorData(edata);
		AbortCurrentTransaction();
		ck_free_plans();
		/* the pipeline may be half read: start on a fresh connection */
		ck_redis_disconnect();
		ck_set_connected(false);
		pgstat_report_activity(STATE_IDLE, NULL);
		result = CK_PASS_FAILED;
	}
	PG_END_TRY();
	return result;
}

/* Entry point of the background worker. */
void
cachekit_worker_main(Datum arg)
{
	MemoryContext batch_cxt;
	int			backoff_ms = 0;
	TimestampTz retry_at = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(ck_database, NULL, 0);

	/*
	 * The worker's own commits only remove delivered entries or count
	 * attempts: losing one in a crash means delivering it again, which
	 * at-least-once allows. Not waiting for the WAL flush keeps a pass fast.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("application_name", "cachekit worker", PGC_USERSET, PGC_S_OVERRIDE);
	/*
	 * The kept statements are simple: plan them once. The queue's statistics
	 * say little (it may have been empty at the last ANALYZE and hold a
	 * million entries now), so a plan must not depend on them: reading and
	 * deleting go by index or ctid, never by scanning and sorting it all.
	 */
	SetConfigOption("plan_cache_mode", "force_generic_plan", PGC_USERSET, PGC_S_OVERRIDE);
	SetConfigOption("enable_seqscan", "off", PGC_USERSET, PGC_S_OVERRIDE);
	SetConfigOption("enable_sort", "off", PGC_USERSET, PGC_S_OVERRIDE);
	SetConfigOption("enable_bitmapscan", "off", PGC_USERSET, PGC_S_OVERRIDE);

	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->worker_latch = MyLatch;
	ck_shared->worker_pid = MyProcPid;
	ck_shared->connected = false;
	SpinLockRelease(&ck_shared->mutex);
	before_shmem_exit(ck_worker_exit, (Datum) 0);

	ereport(LOG,
			(errmsg("cachekit worker started for database \"%s\"", ck_database)));

	/* a kept first block of 1MB spares the kernel a page fault storm per batch */
	batch_cxt = AllocSetContextCreate(TopMemoryContext, "cachekit batch",
									  1024 * 1024, 1024 * 1024, ALLOCSET_DEFAULT_MAXSIZE);

	for (;;)
	{
		CkPass		result = CK_PASS_IDLE;
		long		wait_ms;
		int			rc;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			/* settings may have changed the URL or timeouts: reconnect now */
			ck_redis_disconnect();
			/* and the batch size, which the read statement holds */
			ck_free_plans();
			ck_set_connected(false);
			retry_at = 0;
			backoff_ms = 0;
		}

		if (retry_at == 0 || GetCurrentTimestamp() >= retry_at)
		{
			result = ck_pass_guarded(batch_cxt);
			MemoryContextReset(batch_cxt);
			ck_maybe_vacuum();
			if (result == CK_PASS_FAILED)
			{
				backoff_ms = backoff_ms == 0 ? CK_FIRST_RETRY_MS :
					Min(backoff_ms * 2, ck_retry_max_delay);
				backoff_ms = Min(backoff_ms, ck_retry_max_delay);
				retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), backoff_ms);
			}
			else
			{
				backoff_ms = 0;
				retry_at = 0;
			}
		}
		/* a wake-up that came while we waited for Redis is not lost */
		if (ck_redis_took_wakeup())
			SetLatch(MyLatch);
		if (result == CK_PASS_MORE)
			continue;

		if (retry_at == 0 && result == CK_PASS_IDLE &&
			last_pass_entries >= CK_LINGER_MIN_ENTRIES)
		{
			/*
			 * Busy: let commits gather for a moment rather than each waking
			 * us. A wake-up that came during the pass is covered by the pass
			 * after the wait, so it is dropped here.
			 */
			pg_atomic_write_u32(&ck_shared->wake_requested, 1);
			ResetLatch(MyLatch);
			wait_ms = Min(1 + last_pass_entries / CK_LINGER_ENTRIES_PER_MS, CK_LINGER_MAX_MS);
		}
		else if (retry_at != 0)
		{
			long		secs;
			int			usecs;

			TimestampDifference(GetCurrentTimestamp(), retry_at, &secs, &usecs);
			wait_ms = secs * 1000 + usecs / 1000 + 1;
		}
		else
			wait_ms = CK_IDLE_TIMEOUT_MS;
		/* wake for the next second delete that is due (redelete.c) */
		if (retry_at == 0 && ck_redelete_next_ms() >= 0)
			wait_ms = Min(wait_ms, ck_redelete_next_ms() + 1);

		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   wait_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		/*
		 * Idle for long: read from the very start once, whatever the floor
		 * says, and give back what a burst of work left in the queue table.
		 */
		if ((rc & WL_TIMEOUT) && wait_ms == CK_IDLE_TIMEOUT_MS)
		{
			ck_reset_floor();
			ck_maybe_shrink();
		}
	}
}
