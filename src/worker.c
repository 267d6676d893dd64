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

/*
 * Where Redis is (made from cachekit.redis_url, remade after a reload),
 * holding the connection(s) to it.
 */
static CkTopology *topology = NULL;

/*
 * The longest wait between reconnection attempts through Sentinel or to a
 * Redis Cluster (when cachekit.retry_max_delay is longer): after a
 * failover, delivery resumes soon after the new primary is named.
 */
#define CK_SENTINEL_RETRY_MS 400

/* Close the Redis connection(s), if any. */
static void
ck_drop_connection(void)
{
	ck_topology_disconnect(topology);
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
	ck_drop_connection();
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

/*
 * Connect; false (reported) on failure. Every new connection resolves the
 * topology afresh (through the Sentinels, when there are), so a failover
 * is followed.
 */
static bool
ck_connect(void)
{
	char	   *err = NULL;
	char	   *where = NULL;

	ck_drop_connection();
	if (topology == NULL)
		topology = ck_topology_create(ck_redis_url, &err);
	if (topology == NULL)
	{
		ck_report_failure(psprintf("invalid cachekit.redis_url: %s", err), true);
		return false;
	}
	if (!ck_topology_connect(topology, &where, &err) ||
		!ck_topology_replay(topology, &err))
	{
		ck_drop_connection();
		/* an attempt a reload cut short is no failure: it starts over now */
		if (!ConfigReloadPending)
			ck_report_failure(err, true);
		return false;
	}
	if (current_host)
		pfree(current_host);
	current_host = MemoryContextStrdup(TopMemoryContext, where);
	ereport(LOG,
			(errmsg(redis_down ? "cachekit worker reconnected to Redis at %s" :
					"cachekit worker connected to Redis at %s", current_host)));
	redis_down = false;
	ck_set_connected(true);
	return true;
}

/*
 * Make sure there is a Redis connection; false (reported) when there is
 * none. What an attempt allocates (messages, replies) is freed after it:
 * while Redis is down the worker tries again and again.
 */
static bool
ck_ensure_connection(void)
{
	static MemoryContext connect_cxt = NULL;
	MemoryContext old;
	bool		ok;

	if (ck_topology_usable(topology))
		return true;
	if (connect_cxt == NULL)
		connect_cxt = AllocSetContextCreate(TopMemoryContext, "cachekit connect",
											ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(connect_cxt);
	ok = ck_connect();
	MemoryContextSwitchTo(old);
	MemoryContextReset(connect_cxt);
	return ok;
}

/* what becomes of a queue entry after a delivery attempt */
typedef enum CkFate
{
	CK_FATE_DELIVERED,			/* Redis took it: delete it */
	CK_FATE_WAIT,				/* held, transient or server error: retry, attempts unchanged */
	CK_FATE_RETRY,				/* refused: count the attempt, retry */
	CK_FATE_DEAD				/* refused max_attempts times over dead_letter_after: dead letter */
} CkFate;

/* when the current batch is settled: dead_letter_after is measured to it */
static TimestampTz settle_time = 0;

/*
 * The fate of an entry after its delivery attempt. An entry moves to the
 * dead letters only when it was refused cachekit.max_attempts times AND its
 * first refusal is cachekit.dead_letter_after old: the attempts alone come
 * within a second, before anyone could fix the cause.
 */
static CkFate
ck_fate(const CkEntry *e)
{
	TimestampTz first;

	if (!e->failed)
		return CK_FATE_DELIVERED;
	if (e->errclass != CK_ERRCLASS_ENTRY)
		return CK_FATE_WAIT;
	if (e->attempts + 1 < ck_max_attempts)
		return CK_FATE_RETRY;
	first = e->first_refused_at != 0 ? e->first_refused_at : settle_time;
	if (settle_time - first >= (int64) ck_dead_letter_after * USECS_PER_SEC)
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

/*
 * After a read: propose its last id as the next floor, under the
 * transactions that may still commit an entry below it. An entry's id is
 * drawn after its transaction locked the queue (RowExclusiveLock, held to
 * its end), so those are the transactions holding a lock on the queue that
 * conflicts with ShareLock; whatever committed before this call is visible
 * to the read that finally moves the floor. Transactions that never wrote
 * the queue (a session in cachekit_wait, a long report) do not hold the
 * floor back.
 */
static void
ck_propose_floor(Oid queue, int64 last_id)
{
	VirtualTransactionId *vxids;
	LOCKTAG		tag;
	int			n;

	if (floor_candidate.valid)
		return;
	SET_LOCKTAG_RELATION(tag, MyDatabaseId, queue);
	vxids = GetLockConflicts(&tag, ShareLock, &n);
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
	/* nor past an entry the read skipped (it waits for its retry) */
	if (ck_waiting_nskipped() > 0)
		floor = Min(floor, ck_waiting_min_skipped());
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

	rc = SPI_execute("SELECT pg_catalog.quote_ident(n.nspname), n.oid "
					 "FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n "
					 "ON n.oid OPERATOR(pg_catalog.=) e.extnamespace "
					 "WHERE e.extname OPERATOR(pg_catalog.=) 'cachekit'::pg_catalog.name",
					 true, 1);
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
	ck_waiting_forget();
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
 * Prepare the worker's statements for the queue of the extension in the
 * (quoted) schema. A queue still of 0.1.0 (the library updated, ALTER
 * EXTENSION UPDATE not run yet) has no first_refused_at: the statements do
 * without it, and a refused entry keeps being retried, never dead-lettered
 * (unless cachekit.dead_letter_after is 0), until the update.
 */
static void
ck_make_plans(const char *schema, Oid queue)
{
	Oid			read_types[2] = {INT8OID, INT8OID};
	Oid			ids_types[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Oid			tid_types[2] = {TIDARRAYOID, INT8OID};
	bool		has_first = OidIsValid(queue) &&
		get_attnum(queue, "first_refused_at") != InvalidAttrNumber;

	plans[CK_PLAN_READ] = ck_keep_plan(
		psprintf("SELECT id, kind, keys, tags, untags, value, ttl, attempts, ctid, %s "
				 "FROM %s.%s WHERE id OPERATOR(pg_catalog.>=) $1 "
				 "ORDER BY id USING OPERATOR(pg_catalog.<) LIMIT $2",
				 has_first ? "first_refused_at" : "NULL::pg_catalog.timestamptz",
				 schema, CK_QUEUE_TABLE), 2, read_types);
	/*
	 * Delivered entries go by ctid, without an index lookup each. The ids
	 * bound the delete: a row that took the place of a vanished entry since
	 * the read (after a manual delete and a vacuum) was queued later and has
	 * a higher id. A rewrite of the table (VACUUM FULL, CLUSTER, TRUNCATE)
	 * moves rows: then ids are used instead.
	 */
	plans[CK_PLAN_DELETE] = ck_keep_plan(
		psprintf("DELETE FROM %s.%s WHERE ctid OPERATOR(pg_catalog.=) ANY ($1) "
				 "AND id OPERATOR(pg_catalog.<=) $2",
				 schema, CK_QUEUE_TABLE), 2, tid_types);
	plans[CK_PLAN_DELETE_IDS] = ck_keep_plan(
		psprintf("DELETE FROM %s.%s WHERE id OPERATOR(pg_catalog.=) ANY ($1)",
				 schema, CK_QUEUE_TABLE), 1, ids_types);
	plans[CK_PLAN_RETRY] = ck_keep_plan(
		psprintf("UPDATE %s.%s q SET attempts = q.attempts OPERATOR(pg_catalog.+) 1, "
				 "last_error = u.err%s "
				 "FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2)) AS u(id, err) "
				 "WHERE q.id OPERATOR(pg_catalog.=) u.id",
				 schema, CK_QUEUE_TABLE,
				 has_first ? ", first_refused_at = coalesce(q.first_refused_at, pg_catalog.now())" : ""),
		2, ids_types);
	plans[CK_PLAN_DEAD] = ck_keep_plan(
		psprintf("WITH moved AS (DELETE FROM %s.%s q "
				 "USING ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2)) AS u(id, err) "
				 "WHERE q.id OPERATOR(pg_catalog.=) u.id RETURNING q.*, u.err) "
				 "INSERT INTO %s.%s (id, kind, keys, tags, untags, value, ttl, attempts, error, "
				 "enqueued_at%s) "
				 "SELECT id, kind, keys, tags, untags, value, ttl, "
				 "attempts OPERATOR(pg_catalog.+) 1, err, enqueued_at%s FROM moved",
				 schema, CK_QUEUE_TABLE, schema, CK_DEAD_TABLE,
				 has_first ? ", first_refused_at" : "",
				 has_first ? ", coalesce(first_refused_at, pg_catalog.now())" : ""),
		2, ids_types);
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

		ck_make_plans(schema, get_relname_relid(CK_QUEUE_TABLE, nspid));
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

/* Copy a text[] datum into an array of C strings; returns the count, adds their bytes. */
static int
ck_copy_text_array(Datum d, char ***out, Size *bytes)
{
	ArrayType  *arr = DatumGetArrayTypeP(d);
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	*out = palloc(sizeof(char *) * (n + 1));
	for (int i = 0; i < n; i++)
	{
		(*out)[i] = nulls[i] ? pstrdup("") : TextDatumGetCString(elems[i]);
		*bytes += strlen((*out)[i]) + sizeof(char *) + 1;
	}
	pfree(elems);
	pfree(nulls);
	if ((Pointer) arr != DatumGetPointer(d))
		pfree(arr);
	return n;
}

/* Copy a text datum into a C string without keeping a detoasted copy. */
static char *
ck_copy_text(Datum d, Size *bytes)
{
	text	   *t = DatumGetTextPP(d);
	char	   *s = text_to_cstring(t);

	if ((Pointer) t != DatumGetPointer(d))
		pfree(t);
	*bytes += strlen(s) + 1;
	return s;
}

/* Copy one row of the read into an entry; returns its size in bytes. */
static Size
ck_copy_entry(HeapTuple tup, TupleDesc desc, CkEntry *e)
{
	Size		bytes = sizeof(CkEntry);
	bool		isnull;
	Datum		d;

	e->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	e->kind = DatumGetChar(SPI_getbinval(tup, desc, 2, &isnull));
	e->nkeys = ck_copy_text_array(SPI_getbinval(tup, desc, 3, &isnull), &e->keys, &bytes);
	e->ntags = ck_copy_text_array(SPI_getbinval(tup, desc, 4, &isnull), &e->tags, &bytes);
	e->nuntags = ck_copy_text_array(SPI_getbinval(tup, desc, 5, &isnull), &e->untags, &bytes);
	d = SPI_getbinval(tup, desc, 6, &isnull);
	e->value = isnull ? NULL : ck_copy_text(d, &bytes);
	e->ttl = DatumGetInt32(SPI_getbinval(tup, desc, 7, &isnull));
	e->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
	ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(tup, desc, 9, &isnull)), &e->ctid);
	d = SPI_getbinval(tup, desc, 10, &isnull);
	e->first_refused_at = isnull ? 0 : DatumGetTimestampTz(d);
	return bytes;
}

/* rows fetched from the read cursor at a time (values stay toasted until copied) */
#define CK_FETCH_ROWS 64

/*
 * Read entries in id order into batch_cxt, skipping those waiting for
 * their retry: up to cachekit.batch_size of
 * them, and no more once cachekit.batch_bytes are read (at least one). The
 * rows come through a cursor a few at a time and each value is detoasted
 * only when copied, so that a batch of large write-through values costs
 * its byte budget, not the sum of its values. *full says whether the read
 * stopped at a limit (there may be more).
 */
static int
ck_read_batch(MemoryContext batch_cxt, CkEntry **entries_out, bool *full)
{
	Datum		args[2];
	Portal		portal;
	CkEntry    *entries;
	int			n = 0;
	Size		bytes = 0;

	args[0] = Int64GetDatum(read_floor);
	/* entries waiting for their retry are skipped (waiting.c) */
	args[1] = Int64GetDatum((int64) ck_batch_size + ck_waiting_nskipped());
	portal = SPI_cursor_open(NULL, plans[CK_PLAN_READ], args, NULL, true);
	entries = MemoryContextAllocZero(batch_cxt, sizeof(CkEntry) * (ck_batch_size + 1));
	*full = false;
	while (n < ck_batch_size && !*full)
	{
		SPI_cursor_fetch(portal, true, CK_FETCH_ROWS);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed && n < ck_batch_size; i++)
		{
			MemoryContext old;
			bool		isnull;

			if (ck_waiting_skips(DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
															 SPI_tuptable->tupdesc, 1, &isnull))))
				continue;
			old = MemoryContextSwitchTo(batch_cxt);
			bytes += ck_copy_entry(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, &entries[n++]);
			MemoryContextSwitchTo(old);
			if (bytes >= (Size) ck_batch_bytes && n < ck_batch_size)
			{
				/* over the budget: the rest of this fetch waits for the next batch */
				*full = true;
				break;
			}
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
	if (n >= ck_batch_size)
		*full = true;
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

/*
 * Sum up a delivered batch: did Redis fail transiently or refuse entries,
 * the first error, and how many entries leave the queue (delivered or
 * dead-lettered).
 */
static int
ck_tally(CkEntry *entries, int n, bool *transient, bool *refused, char **err)
{
	int			settled = 0;

	for (int i = 0; i < n; i++)
	{
		CkErrorClass cls = entries[i].failed ? entries[i].errclass : CK_ERRCLASS_NONE;
		CkFate		fate = ck_fate(&entries[i]);

		if (cls == CK_ERRCLASS_TRANSIENT || cls == CK_ERRCLASS_SERVER)
			*transient = true;
		else if (cls == CK_ERRCLASS_ENTRY)
			*refused = true;
		if (fate == CK_FATE_DELIVERED || fate == CK_FATE_DEAD)
			settled++;
		if (cls != CK_ERRCLASS_NONE && cls != CK_ERRCLASS_HELD && *err == NULL)
			*err = entries[i].error;
	}
	return settled;
}

/* After settling: tell waiting.c which entries were refused now. */
static void
ck_update_waiting(CkEntry *entries, int n)
{
	bool	   *refused = palloc(sizeof(bool) * (n + 1));

	for (int i = 0; i < n; i++)
		refused[i] = (ck_fate(&entries[i]) == CK_FATE_RETRY);
	ck_waiting_update(entries, n, refused);
	pfree(refused);
}

/* Add a delivered batch to the worker's counters and wake cachekit_wait. */
static void
ck_publish_stats(const CkDeliveryStats *stats)
{
	pg_atomic_fetch_add_u64(&ck_shared->keys_deleted, stats->keys_deleted);
	pg_atomic_fetch_add_u64(&ck_shared->tags_flushed, stats->tags_flushed);
	pg_atomic_fetch_add_u64(&ck_shared->tag_keys_deleted, stats->tag_keys_deleted);
	pg_atomic_fetch_add_u64(&ck_shared->keys_written, stats->keys_written);
	pg_atomic_fetch_add_u64(&ck_shared->values_too_large, stats->values_too_large);
	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->last_delivery_at = GetCurrentTimestamp();
	SpinLockRelease(&ck_shared->mutex);
	ConditionVariableBroadcast(&ck_shared->delivered_cv);
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
	bool		full = false;
	int			settled = 0;
	int			skipped = 0;
	bool		ok;
	MemoryContext old;
	uint64		pass_no;
	bool		batch_settled;

	/* commits from now on must wake us again: their work may miss this read */
	pg_atomic_write_u32(&ck_shared->wake_requested, 0);
	/* and this pass's snapshot is taken after the count says it began */
	pass_no = pg_atomic_add_fetch_u64(&ck_shared->passes, 1);

	ck_begin("reading queue");
	ck_waiting_start_pass();
	skipped = ck_waiting_nskipped();
	if (ck_prepare_plans())
		n = ck_read_batch(batch_cxt, &entries, &full);
	batch_ext = plans_ext;
	last_pass_entries = n;
	read_filenode = OidIsValid(plans_queue) ? ck_queue_filenode() : InvalidOid;
	/* did this read see every entry up to a matured floor candidate? */
	covered = floor_candidate.valid && floor_candidate.mature &&
		(!full || entries[n - 1].id >= floor_candidate.last_id);
	if (n > 0)
		ck_propose_floor(plans_queue, entries[n - 1].id);
	ck_commit();
	/* what is left of this pass is made in batch_cxt, reset after each pass */
	MemoryContextSwitchTo(batch_cxt);

	if (n == 0)
	{
		/* nothing committed before this pass's snapshot waits */
		if (OidIsValid(batch_ext) && ck_waiting_idle())
			ck_publish_drained(plans_queue, pass_no);
		/* connect while idle too, so cachekit_stats tells whether Redis is up */
		if (OidIsValid(batch_ext) && !ck_topology_usable(topology))
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
	ck_waiting_hold(entries, n);
	ok = ck_deliver(topology, entries, n, &stats, &err);
	/* with replicas: they have it too, or a failover could lose it */
	if (ok)
		ok = ck_topology_sync(topology, &err);
	if (!ok)
	{
		MemoryContextSwitchTo(old);
		ck_drop_connection();
		ck_report_failure(err, true);
		pgstat_report_activity(STATE_IDLE, NULL);
		return CK_PASS_FAILED;
	}
	MemoryContextSwitchTo(old);

	settle_time = GetCurrentTimestamp();
	settled = ck_tally(entries, n, &transient, &refused, &err);

	/*
	 * Settle in the queue the batch was read from. If the extension was
	 * dropped meanwhile, that queue is gone with its entries; a new queue's
	 * ids may repeat the old ones, so nothing of it may be touched.
	 */
	ck_begin("settling batch");
	batch_settled = ck_prepare_plans() && plans_ext == batch_ext;
	if (batch_settled)
	{
		ck_settle_batch(entries, n, read_filenode);
		/* through Sentinel, a failover may lose them: remember them a while */
		ck_topology_note_delivered(topology, entries, n);
		ck_advance_floor(plans_queue, entries, n, covered);
		/*
		 * Propose the next floor at once (the lockers looked at now came
		 * after this pass's read, as a proposal needs), so that the floor
		 * can move on every pass: each read then steps over one batch of
		 * delivered entries at most, which matters while a session's
		 * snapshot (one in cachekit_wait, say) keeps them from being
		 * pruned.
		 */
		ck_propose_floor(plans_queue, entries[n - 1].id);
		ck_update_waiting(entries, n);
	}
	ck_commit();
	MemoryContextSwitchTo(batch_cxt);
	/* a short batch with nothing left behind: the queue is drained up to it */
	if (batch_settled && !full && !refused && !transient && ck_waiting_idle())
		ck_publish_drained(plans_queue, pass_no);
	ck_redelete_remember(entries, n);	/* cachekit.redelete_after */

	ck_publish_stats(&stats);

	if (transient)
	{
		/*
		 * e.g. NOSCRIPT, LOADING, or READONLY from a master demoted by a
		 * failover: start afresh on a new connection, resolved anew
		 */
		ck_drop_connection();
		ck_set_connected(false);
	}
	if (refused || transient)
		ck_report_failure(psprintf("Redis refused a queue entry%s: %s",
								   transient ? " (will retry)" : "", err), false);
	/* Redis itself is not taking work: back off */
	if (transient)
		return CK_PASS_FAILED;
	/*
	 * Refused entries wait for their own retry; the rest goes on. A full
	 * batch is followed at once by the next if this one settled entries or
	 * found more to skip (both bounded), never just to hold the same ones.
	 */
	last_pass_entries = settled;
	return full && (settled > 0 || ck_waiting_nskipped() > skipped) ? CK_PASS_MORE : CK_PASS_IDLE;
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
		if (result != CK_PASS_FAILED && ck_topology_usable(topology) &&
			!ck_redelete_run_due(topology, &err))
		{
			ck_report_failure(err, true);
			ck_drop_connection();
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
		ck_drop_connection();
		ck_set_connected(false);
		pgstat_report_activity(STATE_IDLE, NULL);
		result = CK_PASS_FAILED;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	return result;
}

/*
 * The settings the worker runs under, whatever the database or a role says.
 * The worker is a superuser: a database owner can ALTER DATABASE ... SET
 * search_path (to a schema of functions and operators named like the
 * built-ins the worker calls), a read-only default, timeouts that make every
 * pass fail, or exit_on_error, and all of these would reach the worker at
 * connection. Overriding them here makes the worker's behaviour a matter of
 * this list and postgresql.conf's cachekit.* settings only.
 */
static const struct
{
	const char *name;
	const char *value;
}			pinned_settings[] = {
	/* names resolve in pg_catalog only (the worker's queries qualify all others) */
	{"search_path", "pg_catalog, pg_temp"},
	{"role", "none"},
	{"session_replication_role", "origin"},
	{"default_transaction_read_only", "off"},
	{"default_transaction_isolation", "read committed"},
	{"default_transaction_deferrable", "off"},
	{"statement_timeout", "0"},
	{"lock_timeout", "0"},
	{"idle_in_transaction_session_timeout", "0"},
	{"idle_session_timeout", "0"},
	{"exit_on_error", "off"},
	{"row_security", "on"},
	{"vacuum_cost_delay", "0"},
	{"force_parallel_mode", "off"},
	{"max_parallel_workers_per_gather", "0"},
	{"jit", "off"},
	{"transform_null_equals", "off"},
	{"standard_conforming_strings", "on"},
	{"array_nulls", "on"},
	{"enable_indexscan", "on"},
	{"enable_tidscan", "on"},
	/*
	 * The worker's own commits only remove delivered entries or count
	 * attempts: losing one in a crash means delivering it again, which
	 * at-least-once allows. Not waiting for the WAL flush keeps a pass fast.
	 */
	{"synchronous_commit", "off"},
	{"application_name", "cachekit worker"},
	/*
	 * The kept statements are simple: plan them once. The queue's
	 * statistics say little (it may have been empty at the last ANALYZE and
	 * hold a million entries now), so a plan must not depend on them:
	 * reading and deleting go by index or ctid, never by scanning and
	 * sorting it all.
	 */
	{"plan_cache_mode", "force_generic_plan"},
	{"enable_seqscan", "off"},
	{"enable_sort", "off"},
	{"enable_bitmapscan", "off"},
};

/* Override every setting of pinned_settings, as the highest-priority source. */
static void
ck_pin_settings(void)
{
	for (int i = 0; i < (int) lengthof(pinned_settings); i++)
		SetConfigOption(pinned_settings[i].name, pinned_settings[i].value,
						PGC_SUSET, PGC_S_OVERRIDE);
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

	/* the launcher found cachekit.database under this OID */
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(arg), InvalidOid, 0);

	ck_pin_settings();

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
			/*
			 * settings may have changed the URL, the TLS files or the
			 * timeouts: reconnect now, to the URL as it is now
			 */
			ck_drop_connection();
			ck_topology_free(topology);
			topology = NULL;
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
				if (!ck_topology_usable(topology) && topology != NULL &&
					(topology->url.kind == CK_REDIS_SENTINEL ||
					 topology->mode == CK_MODE_CLUSTER))
					backoff_ms = Min(backoff_ms, CK_SENTINEL_RETRY_MS);
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
		/* an entry refused earlier is due for its retry */
		if (retry_at == 0 && ck_waiting_next_retry() != 0)
		{
			long		secs;
			int			usecs;

			TimestampDifference(GetCurrentTimestamp(), ck_waiting_next_retry(), &secs, &usecs);
			wait_ms = Min(wait_ms, secs * 1000 + usecs / 1000 + 1);
		}
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
