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

#include <math.h>

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/nbtree.h"
#include "access/relscan.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_am.h"
#include "catalog/pg_class.h"
#include "catalog/pg_opfamily.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "commands/vacuum.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/bufmgr.h"
#include "storage/ipc.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/sinval.h"
#include "tcop/utility.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/wait_event.h"

/*
 * How long an idle worker sleeps before looking at the queue anyway; while
 * it finds nothing and holds a Redis connection, each such sleep doubles up
 * to CK_IDLE_MAX_MS (committers wake it at once anyway; the long sleep
 * spares the CPU of many idle databases' workers).
 */
#define CK_IDLE_TIMEOUT_MS 5000
#define CK_IDLE_MAX_MS 60000
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
/*
 * An entry that gathered many keys and tags (a transaction of many rows,
 * pending.c) counts as one entry per two of them: ten UPDATEs in one
 * transaction load the worker as ten single-row transactions would.
 */
#define CK_LINGER_MIN_ENTRIES 4
#define CK_LINGER_ENTRIES_PER_MS 16
#define CK_LINGER_MAX_MS 5
/*
 * Small passes that come quickly after one another are load too: at one
 * and a half entries per millisecond or more, each commit would otherwise
 * wake the worker for a pass of one or two entries, and the writers pay a
 * signal each. The rate is measured over about CK_RATE_WINDOW_MS (each
 * pass's entries, decayed with that time constant), not from one gap
 * between passes: under a light load (a few hundred commits a second) two
 * commits often come a fraction of a millisecond apart by chance, and a
 * linger begun on that would hold the next commit's delivery back by a
 * millisecond. A light load stays below and is woken at once.
 */
#define CK_LINGER_MIN_RATE 1.5
#define CK_RATE_WINDOW_MS 20.0

/* the outcome of one pass */
typedef enum CkPass
{
	CK_PASS_IDLE,				/* nothing more to do now */
	CK_PASS_MORE,				/* a full batch went out: go on at once */
	CK_PASS_FAILED				/* Redis failed: back off */
} CkPass;

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

/* a proposed read floor: entries up to last_id were read, under running vxids */
typedef struct CkFloorCandidate
{
	bool		valid;
	bool		mature;			/* all those transactions have ended */
	int64		last_id;
	int			nvxids;
	VirtualTransactionId *vxids;
} CkFloorCandidate;

static char *my_datname = NULL;	/* the database served, for messages */
static char *my_url_setting = NULL; /* its cachekit.redis_url, or NULL */

static void ck_extension_gone(TimestampTz looked_at);
static long ck_idle_ms(void);

/*
 * One Redis target the worker delivers to (targets.c): "default", which is
 * cachekit.redis_url, and those of cachekit.targets. Each has its own
 * topology and connection, its own backoff, its own read floor, and (in
 * waiting.c and redelete.c, selected with it) its own refused entries and
 * second deletes, so that a target that fails holds back only itself.
 */
typedef struct CkTarget
{
	char	   *name;
	char	   *url;
	int			slot;			/* its shared state (targets.c), or -1 */
	CkTopology *topology;		/* made from url, remade after a reload */
	char	   *current_host;	/* for messages, without the password */
	bool		redis_down;		/* logged the loss, not yet the return */
	int			backoff_ms;
	TimestampTz retry_at;		/* backing off until then, or 0 */
	int			last_pass_entries;	/* load its last pass read (ck_batch_load) */
	double		entry_rate;		/* entries per ms over its last passes */
	TimestampTz last_pass_end;
	int64		read_floor;		/* see ck_propose_floor */
	CkFloorCandidate cand;
} CkTarget;

static CkTarget targets[CK_MAX_TARGETS];
static int	ntargets = 0;
static long idle_ms = CK_IDLE_TIMEOUT_MS;	/* the next idle sleep */
static TimestampTz round_began = 0; /* when the current round began */
static CkTarget *cur = NULL;	/* the target being served */
static int	cur_index = 0;

/* Serve target i from now on. */
static void
ck_select_target(int i)
{
	cur = &targets[i];
	cur_index = i;
	ck_waiting_select(i);
	ck_redelete_select(i);
}

/*
 * The longest wait between reconnection attempts through Sentinel or to a
 * Redis Cluster (when cachekit.retry_max_delay is longer): after a
 * failover, delivery resumes soon after the new primary is named.
 */
#define CK_SENTINEL_RETRY_MS 400

/* Close the current target's Redis connection(s), if any. */
static void
ck_drop_connection(void)
{
	ck_topology_disconnect(cur->topology);
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
	for (int i = 0; i < ntargets; i++)
		ck_topology_disconnect(targets[i].topology);
	/* give the targets' shared slots back: a dropped database keeps none */
	ck_target_release_others(NIL);
}

/*
 * Publish whether the current target has a Redis connection; cachekit_stats
 * says connected only while every target is.
 */
static void
ck_set_connected(bool connected)
{
	bool		all = true;

	ck_target_set_connected(cur->slot, connected);
	for (int i = 0; i < ntargets; i++)
		if (&targets[i] != cur && !ck_topology_usable(targets[i].topology))
			all = false;
	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->connected = connected && all;
	SpinLockRelease(&ck_shared->mutex);
}

/* Record the current target's error, named when there are several. */
static void
ck_set_target_error(const char *msg)
{
	ck_target_set_error(cur->slot, msg);
	ck_set_last_error(ntargets > 1 ? psprintf("target \"%s\": %s", cur->name, msg) : msg);
}

/* Record a delivery failure: counters, last error, and one log line per outage. */
static void
ck_report_failure(const char *msg, bool connection)
{
	uint64		add[CK_TARGET_NCOUNTERS] = {0};

	add[CK_TC_FAILED_ATTEMPTS] = 1;
	ck_target_count(cur->slot, add, false);
	pg_atomic_fetch_add_u64(&ck_shared->failed_attempts, 1);
	ck_set_target_error(msg);
	if (connection)
	{
		ck_set_connected(false);
		if (!cur->redis_down && strcmp(cur->name, CK_DEFAULT_TARGET) == 0)
			ereport(LOG,
					(errmsg("cachekit worker cannot reach Redis, retrying with backoff: %s", msg)));
		else if (!cur->redis_down)
			ereport(LOG,
					(errmsg("cachekit worker cannot reach Redis target \"%s\", retrying with backoff: %s",
							cur->name, msg)));
		cur->redis_down = true;
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
	if (cur->topology == NULL)
		cur->topology = ck_topology_create(cur->url, &err);
	if (cur->topology == NULL)
	{
		ck_report_failure(cur == &targets[0] ?
						  psprintf("invalid cachekit.redis_url: %s", err) :
						  psprintf("invalid URL of target \"%s\" in cachekit.targets: %s", cur->name, err),
						  true);
		return false;
	}
	if (!ck_topology_connect(cur->topology, &where, &err) ||
		!ck_topology_replay(cur->topology, &err))
	{
		ck_drop_connection();
		/* an attempt a reload cut short is no failure: it starts over now */
		if (!ConfigReloadPending)
			ck_report_failure(err, true);
		return false;
	}
	if (cur->current_host)
		pfree(cur->current_host);
	cur->current_host = MemoryContextStrdup(TopMemoryContext, where);
	if (cur == &targets[0])
		ereport(LOG,
				(errmsg(cur->redis_down ? "cachekit worker reconnected to Redis at %s" :
						"cachekit worker connected to Redis at %s", cur->current_host)));
	else
		ereport(LOG,
				(errmsg(cur->redis_down ? "cachekit worker reconnected to Redis target \"%s\" at %s" :
						"cachekit worker connected to Redis target \"%s\" at %s",
						cur->name, cur->current_host)));
	cur->redis_down = false;
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

	if (ck_topology_usable(cur->topology))
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
 * until every transaction running at that read has ended. Each target
 * has its own floor (CkTarget.read_floor): entries other targets owe do not
 * hold it back.
 */

/*
 * Tell cachekit_wait where no target owes anything below: the lowest floor
 * of the targets.
 */
static void
ck_publish_min_floor(Oid queue)
{
	int64		floor = cur->read_floor;

	for (int i = 0; i < ntargets; i++)
		floor = Min(floor, targets[i].read_floor);
	ck_publish_floor(queue, floor);
}

/* Forget the floor of every target: read from the start of the queue again. */
static void
ck_reset_floor(void)
{
	for (int i = 0; i < ntargets; i++)
	{
		targets[i].read_floor = 0;
		targets[i].cand.valid = false;
	}
	ck_publish_floor(InvalidOid, 0);
}

/* Have all transactions of the floor candidate ended? (No snapshot yet.) */
static void
ck_check_candidate(void)
{
	if (!cur->cand.valid || cur->cand.mature)
		return;
	for (int i = 0; i < cur->cand.nvxids; i++)
		if (!VirtualXactLock(cur->cand.vxids[i], false))
			return;
	cur->cand.mature = true;
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

	if (cur->cand.valid)
		return;
	SET_LOCKTAG_RELATION(tag, MyDatabaseId, queue);
	vxids = GetLockConflicts(&tag, ShareLock, &n);
	if (cur->cand.vxids)
		pfree(cur->cand.vxids);
	cur->cand.vxids = MemoryContextAlloc(TopMemoryContext,
											   sizeof(VirtualTransactionId) * (n + 1));
	memcpy(cur->cand.vxids, vxids, sizeof(VirtualTransactionId) * n);
	cur->cand.nvxids = n;
	cur->cand.last_id = last_id;
	cur->cand.mature = false;
	cur->cand.valid = true;
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

	if (!cur->cand.valid || !cur->cand.mature || !covered)
		return;
	floor = cur->cand.last_id + 1;
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
	cur->read_floor = Max(cur->read_floor, floor);
	cur->cand.valid = false;
	ck_publish_min_floor(queue);
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
	CK_PLAN_DELETE_IDS,
	CK_PLAN_RETRY,
	CK_PLAN_DEAD,
	CK_PLAN_UNOWE,
	CK_PLAN_DEAD_COPY,
	CK_PLAN_SWEEP,
	CK_NPLANS
};

static SPIPlanPtr plans[CK_NPLANS];
static TimestampTz last_sweep = 0;	/* see ck_sweep_unconfigured */
static Oid	plans_ext = InvalidOid;	/* the extension they were made for */
static Oid	plans_queue = InvalidOid;	/* and its queue table */
static uint64 plans_checked_at = 0; /* SharedInvalidMessageCounter then */

/* the queue's columns the worker reads, and where they are in it */
enum
{
	CK_COL_ID,
	CK_COL_KIND,
	CK_COL_KEYS,
	CK_COL_TAGS,
	CK_COL_UNTAGS,
	CK_COL_VALUE,
	CK_COL_TTL,
	CK_COL_ATTEMPTS,
	CK_COL_FIRST_REFUSED,		/* optional: not in a queue of 0.1.0 */
	CK_COL_TARGETS,				/* optional: not in a queue of 0.1.0 */
	CK_NCOLS
};
static const char *const read_columns[CK_NCOLS] = {
	"id", "kind", "keys", "tags", "untags", "value", "ttl", "attempts",
	"first_refused_at", "targets"
};
static AttrNumber queue_cols[CK_NCOLS];	/* see ck_queue_columns */

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
	/* new plans: the sweep runs (and plans itself) in the first round */
	last_sweep = 0;
	ck_reset_floor();
	for (int i = 0; i < ntargets; i++)
	{
		ck_waiting_select(i);
		ck_waiting_forget();
	}
	ck_waiting_select(cur_index);
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
 * The statements for an entry owed to several targets: one of them is done
 * with it (delivered, or dead-lettered for that target alone), the others
 * still owe it.
 */
static void
ck_make_target_plans(const char *schema)
{
	Oid			unowe_types[2] = {INT8ARRAYOID, TEXTOID};
	Oid			dead_types[3] = {INT8ARRAYOID, TEXTARRAYOID, TEXTOID};
	Oid			sweep_types[2] = {TEXTARRAYOID, FLOAT8OID};

	plans[CK_PLAN_UNOWE] = ck_keep_plan(
		psprintf("UPDATE %s.%s q SET targets = pg_catalog.array_remove("
				 "coalesce(q.targets, ARRAY['" CK_DEFAULT_TARGET "'::pg_catalog.text]), $2) "
				 "WHERE q.id OPERATOR(pg_catalog.=) ANY ($1)",
				 schema, CK_QUEUE_TABLE), 2, unowe_types);
	plans[CK_PLAN_DEAD_COPY] = ck_keep_plan(
		psprintf("INSERT INTO %s.%s (id, kind, keys, tags, untags, value, ttl, attempts, error, "
				 "enqueued_at, first_refused_at, target) "
				 "SELECT q.id, q.kind, q.keys, q.tags, q.untags, q.value, q.ttl, "
				 "q.attempts OPERATOR(pg_catalog.+) 1, u.err, q.enqueued_at, "
				 "coalesce(q.first_refused_at, pg_catalog.now()), $3 "
				 "FROM %s.%s q, ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2)) AS u(id, err) "
				 "WHERE q.id OPERATOR(pg_catalog.=) u.id",
				 schema, CK_DEAD_TABLE, schema, CK_QUEUE_TABLE), 3, dead_types);
	plans[CK_PLAN_SWEEP] = ck_keep_plan(
		psprintf("WITH victims AS ("
				 " SELECT q.id, pg_catalog.array_agg(t.name) AS names"
				 " FROM %s.%s q, pg_catalog.unnest(q.targets) AS t(name)"
				 " WHERE q.targets IS NOT NULL"
				 " AND q.enqueued_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $2))"
				 " AND t.name OPERATOR(pg_catalog.<>) ALL ($1)"
				 " GROUP BY q.id LIMIT 10000"
				 "), dead AS ("
				 " INSERT INTO %s.%s (id, kind, keys, tags, untags, value, ttl, attempts, error,"
				 " enqueued_at, first_refused_at, target)"
				 " SELECT q.id, q.kind, q.keys, q.tags, q.untags, q.value, q.ttl, q.attempts,"
				 " pg_catalog.format('target \"%%s\" is not configured in cachekit.targets', n.name),"
				 " q.enqueued_at, pg_catalog.now(), n.name"
				 " FROM victims v JOIN %s.%s q ON q.id OPERATOR(pg_catalog.=) v.id,"
				 " pg_catalog.unnest(v.names) AS n(name)"
				 " ON CONFLICT DO NOTHING"
				 ") UPDATE %s.%s q SET targets = COALESCE((SELECT pg_catalog.array_agg(x)"
				 " FROM pg_catalog.unnest(q.targets) AS x WHERE x OPERATOR(pg_catalog.<>) ALL (v.names)),"
				 " '{}'::pg_catalog.text[])"
				 " FROM victims v WHERE q.id OPERATOR(pg_catalog.=) v.id"
				 " RETURNING q.id, pg_catalog.cardinality(q.targets)",
				 schema, CK_QUEUE_TABLE, schema, CK_DEAD_TABLE, schema, CK_QUEUE_TABLE,
				 schema, CK_QUEUE_TABLE), 2, sweep_types);
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
	Oid			ids_types[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Oid			dead_types[3] = {INT8ARRAYOID, TEXTARRAYOID, TEXTOID};
	bool		has_first = OidIsValid(queue) &&
		get_attnum(queue, "first_refused_at") != InvalidAttrNumber;
	bool		has_targets = OidIsValid(queue) &&
		get_attnum(queue, "targets") != InvalidAttrNumber;

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
				 "enqueued_at%s%s) "
				 "SELECT id, kind, keys, tags, untags, value, ttl, "
				 "attempts OPERATOR(pg_catalog.+) 1, err, enqueued_at%s%s FROM moved",
				 schema, CK_QUEUE_TABLE, schema, CK_DEAD_TABLE,
				 has_first ? ", first_refused_at" : "", has_targets ? ", target" : "",
				 has_first ? ", coalesce(first_refused_at, pg_catalog.now())" : "",
				 has_targets ? ", $3" : ""),
		has_targets ? 3 : 2, dead_types);
	if (has_targets)
		ck_make_target_plans(schema);
}

/*
 * Make sure the kept plans belong to the extension installed now, and lock
 * its queue so that it cannot be dropped (and recreated) until the current
 * transaction ends. Returns false when the extension is not installed.
 *
 * Taking the lock processes the catalog invalidations that came before it.
 * If there were none since the last check (SharedInvalidMessageCounter has
 * not moved, as in RangeVarGetRelidExtended), the check (an index scan of
 * pg_extension: 12% of the worker's CPU under light load) is not repeated:
 * the extension cannot have been dropped and created again meanwhile, as
 * that drops and creates the queue, whose pg_class rows send invalidations.
 * Test 040 fails without this guard.
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
		if (plans_checked_at == SharedInvalidMessageCounter)
			return true;
		if (get_extension_oid("cachekit", true) == plans_ext &&
			SearchSysCacheExists1(RELOID, ObjectIdGetDatum(plans_queue)))
		{
			plans_checked_at = SharedInvalidMessageCounter;
			return true;
		}
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
	plans_checked_at = SharedInvalidMessageCounter;
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

/*
 * Find the queue's columns in its descriptor, as it is now (under the
 * worker's lock: an ALTER EXTENSION UPDATE between passes may have added
 * some). An error if a column every version has is missing.
 */
static void
ck_queue_columns(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);

	for (int c = 0; c < CK_NCOLS; c++)
	{
		queue_cols[c] = InvalidAttrNumber;
		for (int a = 0; a < desc->natts; a++)
			if (!TupleDescAttr(desc, a)->attisdropped &&
				strcmp(NameStr(TupleDescAttr(desc, a)->attname), read_columns[c]) == 0)
				queue_cols[c] = a + 1;
		if (queue_cols[c] == InvalidAttrNumber && c < CK_COL_FIRST_REFUSED)
			elog(ERROR, "cachekit queue table has no column \"%s\"", read_columns[c]);
	}
	if (TupleDescAttr(desc, queue_cols[CK_COL_ID] - 1)->atttypid != INT8OID)
		elog(ERROR, "cachekit queue column \"id\" is not a bigint");
}

/* Column c of the read row in slot (null when the queue has no such column). */
static Datum
ck_col(TupleTableSlot *slot, int c, bool *isnull)
{
	if (queue_cols[c] == InvalidAttrNumber)
	{
		*isnull = true;
		return (Datum) 0;
	}
	*isnull = slot->tts_isnull[queue_cols[c] - 1];
	return slot->tts_values[queue_cols[c] - 1];
}

/* Copy the queue row in slot (all its columns deformed) into an entry; returns its size. */
static Size
ck_copy_entry(TupleTableSlot *slot, CkEntry *e)
{
	Size		bytes = sizeof(CkEntry);
	bool		isnull;
	Datum		d;

	e->id = DatumGetInt64(ck_col(slot, CK_COL_ID, &isnull));
	e->kind = DatumGetChar(ck_col(slot, CK_COL_KIND, &isnull));
	e->nkeys = ck_copy_text_array(ck_col(slot, CK_COL_KEYS, &isnull), &e->keys, &bytes);
	e->ntags = ck_copy_text_array(ck_col(slot, CK_COL_TAGS, &isnull), &e->tags, &bytes);
	e->nuntags = ck_copy_text_array(ck_col(slot, CK_COL_UNTAGS, &isnull), &e->untags, &bytes);
	d = ck_col(slot, CK_COL_VALUE, &isnull);
	e->value = isnull ? NULL : ck_copy_text(d, &bytes);
	e->ttl = DatumGetInt32(ck_col(slot, CK_COL_TTL, &isnull));
	e->attempts = DatumGetInt32(ck_col(slot, CK_COL_ATTEMPTS, &isnull));
	ItemPointerCopy(&slot->tts_tid, &e->ctid);
	d = ck_col(slot, CK_COL_FIRST_REFUSED, &isnull);
	e->first_refused_at = isnull ? 0 : DatumGetTimestampTz(d);
	d = ck_col(slot, CK_COL_TARGETS, &isnull);
	e->ntargets = isnull ? 0 : ck_copy_text_array(d, &e->targets, &bytes);
	return bytes;
}

/*
 * Is the entry in this row of the read owed to the current target? A NULL
 * targets column is the default target alone.
 */
static bool
ck_owed_here(Datum targets_col, bool isnull)
{
	ArrayType  *arr;
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	bool		owed = false;

	if (isnull)
		return cur == &targets[0];
	arr = DatumGetArrayTypeP(targets_col);
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	for (int i = 0; i < n && !owed; i++)
		owed = !nulls[i] && strcmp(TextDatumGetCString(elems[i]), cur->name) == 0;
	return owed;
}

/*
 * Open the queue's primary key, the btree on id the worker reads by; an
 * error if it is not (there, or on something else than id alone).
 */
static Relation
ck_open_id_index(Relation rel)
{
	Oid			pk = RelationGetPrimaryKeyIndex(rel);
	Relation	idx;

	if (!OidIsValid(pk))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cachekit queue table has no primary key"),
				 errhint("Recreate the extension with DROP EXTENSION cachekit; CREATE EXTENSION cachekit;")));
	idx = index_open(pk, AccessShareLock);
	if (idx->rd_rel->relam != BTREE_AM_OID || idx->rd_index->indnatts != 1 ||
		idx->rd_index->indkey.values[0] != queue_cols[CK_COL_ID] ||
		idx->rd_opfamily[0] != INTEGER_BTREE_FAM_OID)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cachekit queue table's primary key is not a btree on \"id\""),
				 errhint("Recreate the extension with DROP EXTENSION cachekit; CREATE EXTENSION cachekit;")));
	return idx;
}

/*
 * Read entries in id order into batch_cxt, skipping those waiting for
 * their retry: up to cachekit.batch_size of them, and no more once
 * cachekit.batch_bytes are read (at least one). The read walks the id
 * index straight (no SQL: no plan that could turn into a sort of the whole
 * queue, no copy of each row for a result set), with the pass's snapshot;
 * each value is detoasted only when copied, so that a batch of large
 * write-through values costs its byte budget, not the sum of its values.
 * *full says whether the read stopped at a limit (there may be more).
 */
static int
ck_read_batch(MemoryContext batch_cxt, CkEntry **entries_out, bool *full, int64 *last_read)
{
	int64		fetched = 0;
	int64		limit = (int64) ck_batch_size + ck_waiting_nskipped();
	Relation	rel = table_open(plans_queue, AccessShareLock);
	Relation	idx;
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	IndexScanDesc scan;
	ScanKeyData key;
	CkEntry    *entries;
	int			n = 0;
	Size		bytes = 0;

	ck_queue_columns(rel);
	idx = ck_open_id_index(rel);
	/* entries waiting for their retry are skipped (waiting.c) */
	ScanKeyInit(&key, 1, BTGreaterEqualStrategyNumber, F_INT8GE,
				Int64GetDatum(cur->read_floor));
	scan = index_beginscan(rel, idx, GetActiveSnapshot(), 1, 0);
	index_rescan(scan, &key, 1, NULL, 0);
	*last_read = 0;
	entries = MemoryContextAllocZero(batch_cxt, sizeof(CkEntry) * (ck_batch_size + 1));
	*full = false;
	while (n < ck_batch_size && fetched < limit &&
		   index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		MemoryContext old;
		bool		isnull;
		Datum		targets_col;
		int64		id;

		slot_getallattrs(slot);
		id = DatumGetInt64(ck_col(slot, CK_COL_ID, &isnull));
		fetched++;
		*last_read = id;
		/* entries this target does not owe, or that wait for their retry */
		targets_col = ck_col(slot, CK_COL_TARGETS, &isnull);
		if (!ck_owed_here(targets_col, isnull) || ck_waiting_skips(id))
			continue;
		old = MemoryContextSwitchTo(batch_cxt);
		bytes += ck_copy_entry(slot, &entries[n++]);
		MemoryContextSwitchTo(old);
		if (bytes >= (Size) ck_batch_bytes && n < ck_batch_size)
		{
			/* over the budget: the rest waits for the next batch */
			*full = true;
			break;
		}
		CHECK_FOR_INTERRUPTS();
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(idx, NoLock);
	table_close(rel, NoLock);
	if (n >= ck_batch_size || fetched >= limit)
		*full = true;
	*entries_out = entries;
	return n;
}

/* Does no other target than the current one still owe this entry? */
static bool
ck_owed_here_only(const CkEntry *e)
{
	return e->ntargets <= 1;
}

/*
 * Does the entry have this fate, and is the current target the last one
 * to owe it (last 1), or are there others (last 0), or either (last -1)?
 */
static bool
ck_fate_is(const CkEntry *e, CkFate fate, int last)
{
	return ck_fate(e) == fate && (last < 0 || ck_owed_here_only(e) == (last == 1));
}

/* Build a bigint[] of the ids of the entries with a given fate (see ck_fate_is). */
static Datum
ck_id_array(CkEntry *entries, int n, CkFate fate, int last, int *count)
{
	Datum	   *ids = palloc(sizeof(Datum) * (n + 1));
	int			k = 0;

	for (int i = 0; i < n; i++)
		if (ck_fate_is(&entries[i], fate, last))
			ids[k++] = Int64GetDatum(entries[i].id);
	*count = k;
	return PointerGetDatum(construct_array(ids, k, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/* Build a text[] of the errors of the entries with a given fate, in id order. */
static Datum
ck_error_array(CkEntry *entries, int n, CkFate fate, int last)
{
	Datum	   *errs = palloc(sizeof(Datum) * (n + 1));
	int			k = 0;

	for (int i = 0; i < n; i++)
		if (ck_fate_is(&entries[i], fate, last))
			errs[k++] = CStringGetTextDatum(entries[i].error ? entries[i].error : "refused");
	return PointerGetDatum(construct_array(errs, k, TEXTOID, -1, false, TYPALIGN_INT));
}

/* Run one kept statement with an id array and optionally an error array (or a target name). */
static void
ck_exec_ids(int plan, Datum ids, Datum errs, int expected)
{
	/* the dead-letter statements take the target as $3 */
	Datum		args[3] = {ids, errs, CStringGetTextDatum(cur->name)};
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

/*
 * Delete one delivered entry where the worker read it, if the row there is
 * still that entry (same id): after a manual delete and a vacuum, a later
 * entry may have taken its place. A row deleted or updated meanwhile by
 * someone else is left alone (an updated one is read and sent again).
 */
static void
ck_delete_at(Relation rel, Snapshot snap, const CkEntry *e)
{
	HeapTupleData tuple;
	Buffer		buffer;
	bool		isnull;
	int64		id;
	TM_FailureData tmfd;

	tuple.t_self = e->ctid;
	if (!heap_fetch(rel, snap, &tuple, &buffer, false))
		return;
	id = DatumGetInt64(heap_getattr(&tuple, queue_cols[CK_COL_ID], RelationGetDescr(rel), &isnull));
	ReleaseBuffer(buffer);
	if (isnull || id != e->id)
		return;
	(void) heap_delete(rel, &tuple.t_self, GetCurrentCommandId(true), InvalidSnapshot,
					   true, &tmfd, false);
}

/*
 * Delete the delivered entries. While the table was not rewritten, each
 * goes by the ctid it was read at, straight from the heap: no index lookup,
 * and no executor, which would lock every row first for the queue's only
 * row trigger (cachekit_replica_guard, which fires only in logical
 * replication's apply worker). It is a plain WAL-logged heap delete, so
 * replication, statistics and vacuum see what a DELETE would leave. After
 * a rewrite (VACUUM FULL, CLUSTER) rows moved: then the ids are used.
 */
static void
ck_delete_delivered(CkEntry *entries, int n, Datum ids, Oid read_filenode)
{
	Relation	rel;
	Snapshot	snap = GetActiveSnapshot();

	if (read_filenode != ck_queue_filenode())
	{
		ck_exec_ids(CK_PLAN_DELETE_IDS, ids, (Datum) 0, SPI_OK_DELETE);
		return;
	}
	rel = table_open(plans_queue, RowExclusiveLock);
	ck_queue_columns(rel);
	for (int i = 0; i < n; i++)
		if (ck_fate_is(&entries[i], CK_FATE_DELIVERED, 1))
			ck_delete_at(rel, snap, &entries[i]);
	table_close(rel, NoLock);
	CommandCounterIncrement();
}

/* Record the outcome of a delivered batch in the queue. */
static void
ck_settle_batch(CkEntry *entries, int n, Oid read_filenode)
{
	Datum		ids;
	int			count;
	int			others;
	uint64		add[CK_TARGET_NCOUNTERS] = {0};

	ids = ck_id_array(entries, n, CK_FATE_DELIVERED, 1, &count);
	if (count > 0)
		ck_delete_delivered(entries, n, ids, read_filenode);
	/* other targets still owe these: only this one is done with them */
	ids = ck_id_array(entries, n, CK_FATE_DELIVERED, 0, &others);
	if (others > 0)
		ck_exec_ids(CK_PLAN_UNOWE, ids, CStringGetTextDatum(cur->name), SPI_OK_UPDATE);
	count += others;
	deleted_since_vacuum += count;
	deleted_since_shrink += count;
	pg_atomic_fetch_add_u64(&ck_shared->entries_delivered, count);
	add[CK_TC_ENTRIES_DELIVERED] = count;

	ids = ck_id_array(entries, n, CK_FATE_RETRY, -1, &count);
	if (count > 0)
		ck_exec_ids(CK_PLAN_RETRY, ids, ck_error_array(entries, n, CK_FATE_RETRY, -1), SPI_OK_UPDATE);

	ids = ck_id_array(entries, n, CK_FATE_DEAD, 1, &count);
	if (count > 0)
		ck_exec_ids(CK_PLAN_DEAD, ids, ck_error_array(entries, n, CK_FATE_DEAD, 1), SPI_OK_INSERT);
	ids = ck_id_array(entries, n, CK_FATE_DEAD, 0, &others);
	if (others > 0)
	{
		ck_exec_ids(CK_PLAN_DEAD_COPY, ids, ck_error_array(entries, n, CK_FATE_DEAD, 0), SPI_OK_INSERT);
		ck_exec_ids(CK_PLAN_UNOWE, ids, CStringGetTextDatum(cur->name), SPI_OK_UPDATE);
	}
	count += others;
	add[CK_TC_DEAD_LETTERED] = count;
	ck_target_count(cur->slot, add, false);
	if (count > 0)
	{
		pg_atomic_fetch_add_u64(&ck_shared->dead_lettered, count);
		for (int i = 0; i < n; i++)
			if (ck_fate(&entries[i]) == CK_FATE_DEAD)
				ereport(WARNING,
						(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						 errmsg("cachekit moved queue entry %lld to %s after %d refusals",
								(long long) entries[i].id, CK_DEAD_TABLE, entries[i].attempts + 1),
						 errdetail("Redis answered: %s", entries[i].error),
						 ntargets > 1 ? errcontext("Redis target \"%s\"", cur->name) : 0));
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
	{
		uint64		add[CK_TARGET_NCOUNTERS] = {0};

		add[CK_TC_KEYS_DELETED] = stats->keys_deleted;
		add[CK_TC_TAGS_FLUSHED] = stats->tags_flushed;
		add[CK_TC_TAG_KEYS_DELETED] = stats->tag_keys_deleted;
		add[CK_TC_KEYS_WRITTEN] = stats->keys_written;
		ck_target_count(cur->slot, add, true);
	}
	ConditionVariableBroadcast(&ck_shared->delivered_cv);
}

/* The load of a batch for the linger: entries, an entry of many keys as many. */
static int
ck_batch_load(CkEntry *entries, int n)
{
	int			load = 0;

	for (int i = 0; i < n; i++)
		load += Max(1, (entries[i].nkeys + entries[i].ntags + entries[i].nuntags + 1) / 2);
	return load;
}

/*
 * After a round: the current target's entry rate in entries per ms, for
 * the linger: the passes' entries, each decayed with the time constant
 * CK_RATE_WINDOW_MS since it was read.
 */
static void
ck_note_rate(TimestampTz now)
{
	double		ms = (double) (now - cur->last_pass_end) / 1000.0;

	if (cur->last_pass_end == 0 || ms > 100)
		cur->entry_rate = 0;	/* idle in between: start over */
	else
		cur->entry_rate *= exp(-ms / CK_RATE_WINDOW_MS);
	cur->entry_rate += cur->last_pass_entries / CK_RATE_WINDOW_MS;
	cur->last_pass_end = now;
}

/*
 * The end of a pass that read nothing the current target owes (installed:
 * the extension is).
 */
static CkPass
ck_pass_nothing(bool installed, bool full, int64 floor_before, bool *drained)
{
	/* nothing committed before this pass's snapshot waits */
	*drained = installed && ck_waiting_idle() && !full;
	/*
	 * connect while idle too, so cachekit_stats tells whether Redis is up;
	 * with several targets, one that is down backs off, so that its
	 * attempts do not cost the others' rounds
	 */
	if (installed && !ck_topology_usable(cur->topology) && !ck_ensure_connection() &&
		ntargets > 1)
		return CK_PASS_FAILED;
	/* a full read of others' entries moved the floor: read on at once */
	return full && cur->read_floor > floor_before ? CK_PASS_MORE : CK_PASS_IDLE;
}

/*
 * One pass for the current target: read a batch of the entries it owes,
 * deliver it, settle it. *drained says whether it left nothing committed
 * before the pass's snapshot undelivered to this target.
 */
static CkPass
ck_pass(MemoryContext batch_cxt, bool *drained)
{
	int64		last_read = 0;
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
	bool		batch_settled;
	int64		floor_before = cur->read_floor;

	*drained = false;
	ck_begin("reading queue");
	ck_waiting_start_pass();
	skipped = ck_waiting_nskipped();
	if (ck_prepare_plans())
		n = ck_read_batch(batch_cxt, &entries, &full, &last_read);
	batch_ext = plans_ext;
	cur->last_pass_entries = ck_batch_load(entries, n);
	read_filenode = OidIsValid(plans_queue) ? ck_queue_filenode() : InvalidOid;
	/* did this read see every entry up to a matured floor candidate? */
	covered = cur->cand.valid && cur->cand.mature &&
		(!full || last_read >= cur->cand.last_id);
	if (n == 0 && last_read > 0)
	{
		/* it read only entries other targets owe: step over them */
		ck_advance_floor(plans_queue, NULL, 0, covered);
		ck_propose_floor(plans_queue, last_read);
	}
	else if (n > 0)
		ck_propose_floor(plans_queue, last_read);
	ck_commit();
	/* what is left of this pass is made in batch_cxt, reset after each pass */
	MemoryContextSwitchTo(batch_cxt);

	if (!OidIsValid(batch_ext))
		ck_extension_gone(round_began);
	if (n == 0)
		return ck_pass_nothing(OidIsValid(batch_ext), full, floor_before, drained);

	/* Redis round trips, with no transaction open */
	old = MemoryContextSwitchTo(batch_cxt);
	if (!ck_ensure_connection())
	{
		MemoryContextSwitchTo(old);
		return CK_PASS_FAILED;
	}
	pgstat_report_activity(STATE_RUNNING, "delivering to Redis");
	ck_waiting_hold(entries, n);
	ok = ck_deliver(cur->topology, entries, n, &stats, &err);
	/* through Sentinel: the replicas have it too, or a failover could lose it */
	if (ok)
		ok = ck_topology_sync(cur->topology, &err);
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
		ck_topology_note_delivered(cur->topology, entries, n);
		ck_advance_floor(plans_queue, entries, n, covered);
		/*
		 * Propose the next floor at once (the lockers looked at now came
		 * after this pass's read, as a proposal needs), so that the floor
		 * can move on every pass: each read then steps over one batch of
		 * delivered entries at most, which matters while a session's
		 * snapshot (one in cachekit_wait, say) keeps them from being
		 * pruned.
		 */
		ck_propose_floor(plans_queue, last_read);
		ck_update_waiting(entries, n);
	}
	ck_commit();
	MemoryContextSwitchTo(batch_cxt);
	/* a short batch with nothing left behind: the queue is drained up to it */
	*drained = batch_settled && !full && !refused && !transient && ck_waiting_idle();
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
	if (settled < n)
		cur->last_pass_entries = settled;
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
 * How often entries owed to targets that are not configured are looked
 * for: the look reads the whole queue (no index serves it), so while the
 * worker drains a backlog (its passes read full batches) it looks less
 * often. Those entries wait for cachekit.dead_letter_after anyway.
 */
#define CK_SWEEP_MS 10000
#define CK_SWEEP_BACKLOG_MS 60000

/*
 * Entries owed to a target that is not configured (named by a trigger or a
 * call before cachekit.targets had it, or after it was removed) wait for
 * it, as the setting is reloadable, and cachekit_target_stats shows them.
 * Once cachekit.dead_letter_after old, such an entry moves to the dead
 * letters for that target, with the reason; the other targets it names
 * keep it. Looked for every CK_SWEEP_MS.
 */
static void
ck_sweep_unconfigured(bool backlog)
{
	TimestampTz now = GetCurrentTimestamp();
	Datum	   *names;
	Datum		args[2];
	int			rc;

	if (last_sweep == 0)
		last_sweep = now - CK_SWEEP_MS * INT64CONST(1000);	/* due now, or later in a backlog */
	if (!TimestampDifferenceExceeds(last_sweep, now, backlog ? CK_SWEEP_BACKLOG_MS : CK_SWEEP_MS))
		return;
	last_sweep = now;
	names = palloc(sizeof(Datum) * ntargets);
	for (int i = 0; i < ntargets; i++)
		names[i] = CStringGetTextDatum(targets[i].name);
	args[0] = PointerGetDatum(construct_array(names, ntargets, TEXTOID, -1, false, TYPALIGN_INT));
	args[1] = Float8GetDatum((double) ck_dead_letter_after);
	ck_begin("dead-lettering entries of targets not configured");
	if (ck_prepare_plans() && plans[CK_PLAN_SWEEP] != NULL)
	{
		Datum	   *gone;
		int			ngone = 0;

		rc = SPI_execute_plan(plans[CK_PLAN_SWEEP], args, NULL, false, 0);
		if (rc != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "cachekit worker could not update its queue: %s", SPI_result_code_string(rc));
		gone = palloc(sizeof(Datum) * (SPI_processed + 1));
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		isnull;

			if (DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull)) == 0)
				gone[ngone++] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
		}
		if (SPI_processed > 0)
			ereport(WARNING,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("cachekit moved %llu queue entries to %s for targets that are not configured",
							(unsigned long long) SPI_processed, CK_DEAD_TABLE),
					 errhint("Add the targets to cachekit.targets, reload, and replay them with cachekit_replay_dead_letters().")));
		if (ngone > 0)
			ck_exec_ids(CK_PLAN_DELETE_IDS,
						PointerGetDatum(construct_array(gone, ngone, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE)),
						(Datum) 0, SPI_OK_DELETE);
	}
	ck_commit();
}

/*
 * A pass that survives its own errors (the queue table dropped under it,
 * say): the error is logged, the transaction rolled back, and the pass
 * counts as failed, so the worker backs off instead of exiting and being
 * restarted over and over.
 */
static CkPass
ck_pass_guarded(MemoryContext batch_cxt, bool *drained)
{
	MemoryContext cxt = CurrentMemoryContext;
	CkPass		result;

	*drained = false;
	PG_TRY();
	{
		char	   *err = NULL;

		result = ck_pass(batch_cxt, drained);
		/* once per round: entries of targets that are not configured */
		if (cur_index == 0)
			ck_sweep_unconfigured(result == CK_PASS_MORE);
		/* second deletes that are due (redelete.c), on the pass's connection */
		if (result != CK_PASS_FAILED && ck_topology_usable(cur->topology) &&
			!ck_redelete_run_due(cur->topology, &err))
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

/*
 * The targets as the settings say now: "default" (cachekit.redis_url) and
 * those of cachekit.targets, each with no connection yet and no backoff.
 * Their shared state slots (targets.c) are claimed; those of targets no
 * longer named are given back.
 */
static void
ck_load_targets(void)
{
	List	   *names = NIL;
	List	   *urls = NIL;
	char	   *err = NULL;
	List	   *all;
	ListCell   *ln,
			   *lu;
	int			i = 0;
	char	   *was_down[CK_MAX_TARGETS];	/* targets whose loss was logged */
	int			nwas_down = 0;

	for (int t = 0; t < ntargets; t++)
	{
		ck_topology_free(targets[t].topology);
		if (targets[t].cand.vxids)
			pfree(targets[t].cand.vxids);
		if (targets[t].redis_down)
			was_down[nwas_down++] = targets[t].name;
	}
	memset(targets, 0, sizeof(targets));
	/* the check hook accepted it; parse in the worker's long-lived memory */
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		if (!ck_targets_parse(ck_targets, &names, &urls, &err))
			names = urls = NIL;
		all = lcons(pstrdup(CK_DEFAULT_TARGET), list_copy(names));
		targets[i].name = linitial(all);
		targets[i].url = pstrdup(ck_redis_url);
		i++;
		forboth(ln, names, lu, urls)
		{
			targets[i].name = lfirst(ln);
			targets[i].url = lfirst(lu);
			i++;
		}
		MemoryContextSwitchTo(old);
	}
	ntargets = i;
	for (int t = 0; t < ntargets; t++)
	{
		targets[t].slot = ck_target_slot(targets[t].name);
		/* an outage logged before the reload ends with one "reconnected" line */
		for (int d = 0; d < nwas_down; d++)
			if (strcmp(was_down[d], targets[t].name) == 0)
				targets[t].redis_down = true;
	}
	ck_target_release_others(all);
	ck_select_target(0);
	for (int t = 0; t < ntargets; t++)
	{
		ck_select_target(t);
		ck_set_connected(false);
	}
	ck_select_target(0);
}

/* Back the current target off after a failed pass: capped, doubling. */
static void
ck_back_off(void)
{
	cur->backoff_ms = cur->backoff_ms == 0 ? CK_FIRST_RETRY_MS :
		Min(cur->backoff_ms * 2, ck_retry_max_delay);
	cur->backoff_ms = Min(cur->backoff_ms, ck_retry_max_delay);
	if (!ck_topology_usable(cur->topology) && cur->topology != NULL &&
		(cur->topology->url.kind == CK_REDIS_SENTINEL ||
		 cur->topology->mode == CK_MODE_CLUSTER))
		cur->backoff_ms = Min(cur->backoff_ms, CK_SENTINEL_RETRY_MS);
	cur->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), cur->backoff_ms);
}

/*
 * One round: a pass for each target that is not backing off, each on its
 * own connection, so that a target that fails or refuses holds back only
 * itself. This is the one place that runs delivery per target. The round
 * counts as one pass for cachekit_wait: drained when every target was.
 */
static CkPass
ck_round(MemoryContext batch_cxt)
{
	uint64		pass_no;
	bool		all_drained = true;
	CkPass		round = CK_PASS_IDLE;
	bool		any_due = false;
	TimestampTz now = GetCurrentTimestamp();
	bool		was_down[CK_MAX_TARGETS];

	/* every target backing off: nothing to do, and commits need not wake us */
	for (int i = 0; i < ntargets; i++)
		if (targets[i].retry_at == 0 || now >= targets[i].retry_at)
			any_due = true;
	if (!any_due)
		return CK_PASS_IDLE;

	/* commits from now on must wake us again: their work may miss this read */
	round_began = GetCurrentTimestamp();
	pg_atomic_write_u32(&ck_shared->wake_requested, 0);
	/* and this pass's snapshots are taken after the count says it began */
	pass_no = pg_atomic_add_fetch_u64(&ck_shared->passes, 1);
	/*
	 * Targets that are up first, then those whose loss was logged: an
	 * attempt on a target that hangs (it costs up to connect_timeout) then
	 * comes after the others delivered what this round found.
	 */
	for (int i = 0; i < ntargets; i++)
		was_down[i] = targets[i].redis_down;
	for (int k = 0; k < 2 * ntargets; k++)
	{
		int			i = k % ntargets;
		bool		drained = false;
		CkPass		result;

		if (was_down[i] != (k >= ntargets))
			continue;
		ck_select_target(i);
		if (cur->retry_at != 0 && now < cur->retry_at)
		{
			all_drained = false;
			continue;
		}
		result = ck_pass_guarded(batch_cxt, &drained);
		MemoryContextReset(batch_cxt);
		if (result == CK_PASS_FAILED)
			ck_back_off();
		else
			cur->backoff_ms = cur->retry_at = 0;
		if (result == CK_PASS_MORE)
			round = CK_PASS_MORE;
		all_drained &= drained;
	}
	if (all_drained && OidIsValid(plans_queue))
		ck_publish_drained(plans_queue, pass_no);
	ck_select_target(0);
	return round;
}

/* Milliseconds until delivery, a retry or a second delete, across the targets. */
static long
ck_wait_ms(void)
{
	long		wait_ms = ck_idle_ms();
	TimestampTz now = GetCurrentTimestamp();

	for (int i = 0; i < ntargets; i++)
	{
		long		secs;
		int			usecs;

		ck_select_target(i);
		if (cur->retry_at != 0)
		{
			TimestampDifference(now, cur->retry_at, &secs, &usecs);
			wait_ms = Min(wait_ms, secs * 1000 + usecs / 1000 + 1);
			continue;
		}
		ck_note_rate(now);
		if (cur->last_pass_entries >= CK_LINGER_MIN_ENTRIES ||
			(cur->last_pass_entries > 0 && cur->entry_rate >= CK_LINGER_MIN_RATE))
		{
			/*
			 * Busy: let commits gather for a moment rather than each waking
			 * us. A wake-up that came during the round is covered by the
			 * round after the wait, so it is dropped here.
			 */
			pg_atomic_write_u32(&ck_shared->wake_requested, 1);
			ResetLatch(MyLatch);
			wait_ms = Min(wait_ms, Min(1 + cur->last_pass_entries / CK_LINGER_ENTRIES_PER_MS,
									   CK_LINGER_MAX_MS));
		}
		/* an entry refused earlier is due for its retry */
		if (ck_waiting_next_retry() != 0)
		{
			TimestampDifference(now, ck_waiting_next_retry(), &secs, &usecs);
			wait_ms = Min(wait_ms, secs * 1000 + usecs / 1000 + 1);
		}
		/* wake for the next second delete that is due (redelete.c) */
		if (ck_redelete_next_ms() >= 0)
			wait_ms = Min(wait_ms, ck_redelete_next_ms() + 1);
	}
	ck_select_target(0);
	return wait_ms;
}

/*
 * Look into the database: its name, whether the extension is there, and
 * its own cachekit.redis_url (ALTER DATABASE ... SET). A probe, or a worker
 * of a database without the extension (every database served), tells the
 * launcher and leaves.
 */
static void
ck_worker_look(bool probe)
{
	bool		present;
	TimestampTz looked_at = GetCurrentTimestamp();

	StartTransactionCommand();
	my_datname = MemoryContextStrdup(TopMemoryContext, get_database_name(MyDatabaseId));
	present = OidIsValid(get_extension_oid("cachekit", true));
	my_url_setting = ck_database_url_setting();
	if (my_url_setting)
		my_url_setting = MemoryContextStrdup(TopMemoryContext, my_url_setting);
	CommitTransactionCommand();
	pgstat_report_stat(false);

	if (probe || (!present && ck_serve_all()))
	{
		ck_report_extension(present, my_datname, looked_at);
		proc_exit(0);
	}
}

/*
 * After a reload: has ALTER DATABASE ... SET cachekit.redis_url changed
 * since the worker connected? Then it leaves and the launcher starts it
 * again at once: a new connection applies the database's settings, the
 * reload alone does not.
 */
static void
ck_check_url_setting(void)
{
	char	   *now;
	bool		same;

	StartTransactionCommand();
	now = ck_database_url_setting();
	same = (now == NULL && my_url_setting == NULL) ||
		(now != NULL && my_url_setting != NULL && strcmp(now, my_url_setting) == 0);
	CommitTransactionCommand();
	if (same)
		return;
	ereport(LOG,
			(errmsg("cachekit worker for database \"%s\" restarts: the database's cachekit.redis_url changed",
					my_datname)));
	ck_request_restart();
	proc_exit(0);
}

/*
 * The extension is gone (a pass that began at looked_at did not find it):
 * with every database served, the worker leaves.
 */
static void
ck_extension_gone(TimestampTz looked_at)
{
	if (!ck_serve_all())
		return;
	ereport(LOG,
			(errmsg("cachekit worker for database \"%s\" stops: the extension is not installed",
					my_datname)));
	ck_report_extension(false, my_datname, looked_at);
	proc_exit(0);
}

/*
 * The idle sleep: CK_IDLE_TIMEOUT_MS after a pass that found work or
 * without a Redis connection (an idle worker connects, so that
 * cachekit_stats tells whether Redis is up), else what it grew to.
 */
static long
ck_idle_ms(void)
{
	for (int i = 0; i < ntargets; i++)
		if (targets[i].last_pass_entries > 0 || !ck_topology_usable(targets[i].topology))
			idle_ms = CK_IDLE_TIMEOUT_MS;
	return idle_ms;
}

/* Entry point of the background worker. */
void
cachekit_worker_main(Datum arg)
{
	MemoryContext batch_cxt;
	CkWorkerArgs args;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* the launcher gave us a slot of our own, bound to this database */
	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	ck_shared = &ck_slots[args.slot];
	BackgroundWorkerInitializeConnectionByOid(DatumGetObjectId(arg), InvalidOid, 0);

	ck_pin_settings();
	ck_worker_look(args.probe);

	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->worker_latch = MyLatch;
	ck_shared->worker_pid = MyProcPid;
	ck_shared->connected = false;
	SpinLockRelease(&ck_shared->mutex);
	ck_load_targets();
	before_shmem_exit(ck_worker_exit, (Datum) 0);

	ereport(LOG,
			(errmsg("cachekit worker started for database \"%s\"", my_datname)));

	/* a kept first block of 1MB spares the kernel a page fault storm per batch */
	batch_cxt = AllocSetContextCreate(TopMemoryContext, "cachekit batch",
									  1024 * 1024, 1024 * 1024, ALLOCSET_DEFAULT_MAXSIZE);

	for (;;)
	{
		CkPass		result;
		long		wait_ms;
		int			rc;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			ck_check_url_setting();
			/*
			 * settings may have changed the URLs, the targets, the TLS files
			 * or the timeouts: reconnect now, to the URLs as they are now,
			 * and start the targets' bookkeeping afresh
			 */
			ck_free_plans();
			ck_load_targets();
		}

		result = ck_round(batch_cxt);
		ck_maybe_vacuum();
		/* a wake-up that came while we waited for Redis is not lost */
		if (ck_redis_took_wakeup())
			SetLatch(MyLatch);
		if (result == CK_PASS_MORE)
			continue;

		wait_ms = ck_wait_ms();
		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   wait_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		/*
		 * Idle for long: read from the very start once, whatever the floor
		 * says, and give back what a burst of work left in the queue table.
		 */
		if ((rc & WL_TIMEOUT) && wait_ms == idle_ms)
		{
			ck_reset_floor();
			ck_maybe_shrink();
			idle_ms = Min(idle_ms * 2, CK_IDLE_MAX_MS);
		}
	}
}
