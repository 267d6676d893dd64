/*-------------------------------------------------------------------------
 *
 * queue.c
 *	  Enqueueing work inside the writing transaction, waking the worker at
 *	  commit, and the SQL functions cachekit_delete, cachekit_flush_tag and
 *	  cachekit_wait.
 *
 * Entries are rows of cachekit_queue, inserted directly into its heap and
 * index: roles that write watched tables need no grant on the queue.
 * Nothing here touches the network.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/genam.h"
#include "access/stratnum.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "executor/executor.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "nodes/value.h"
#include "tcop/utility.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/relcache.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/wait_event.h"

/* did this transaction enqueue anything? then wake the worker at commit */
static bool enqueued_in_xact = false;

static ProcessUtility_hook_type prev_process_utility = NULL;

static bool ck_index_values(Relation rel, IndexInfo *info, HeapTuple tuple, EState **estate,
							Datum *values, bool *isnull);


PG_FUNCTION_INFO_V1(cachekit_delete);
PG_FUNCTION_INFO_V1(cachekit_flush_tag);
PG_FUNCTION_INFO_V1(cachekit_delete_in);
PG_FUNCTION_INFO_V1(cachekit_flush_tag_in);
PG_FUNCTION_INFO_V1(cachekit_wait);

/* Transaction callback: wake the worker when enqueued work commits. */
static void
ck_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (enqueued_in_xact)
				ck_wake_worker_once();
			enqueued_in_xact = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* COMMIT PREPARED wakes the worker (ck_process_utility) */
			enqueued_in_xact = false;
			break;
		default:
			break;
	}
}

/*
 * ProcessUtility hook: COMMIT PREPARED wakes the worker. The transaction
 * that enqueued was prepared, perhaps by another session, so no commit
 * callback of its own can; the committing session does not know whether it
 * enqueued anything, and a needless wake-up costs one empty pass.
 */
static void
ck_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				   ProcessUtilityContext context, ParamListInfo params,
				   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;

	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context, params,
							 queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);

	if (IsA(stmt, TransactionStmt) &&
		((TransactionStmt *) stmt)->kind == TRANS_STMT_COMMIT_PREPARED)
		ck_wake_worker();
}

/* Called from _PG_init: install the commit callback and hook in every backend. */
void
ck_queue_init(void)
{
	RegisterXactCallback(ck_xact_callback, NULL);
	ck_pending_init();
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = ck_process_utility;
}

/* Remember that the current transaction has work for the worker. */
void
ck_note_enqueued(void)
{
	enqueued_in_xact = true;
}

/* Fail clearly when the library was not preloaded: nothing would deliver. */
static void
ck_require_preload(void)
{
	if (ck_slots == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cachekit is not loaded through shared_preload_libraries"),
				 errdetail("Without its background worker nothing would reach Redis."),
				 errhint("Add cachekit to shared_preload_libraries and restart the server.")));
}

/*
 * The schema the extension lives in: that of one of its functions, looked
 * up once per call site (a trigger's, for all the rows of its statement).
 */
Oid
ck_extension_schema(FmgrInfo *flinfo)
{
	ck_require_preload();
	if (flinfo->fn_extra == NULL)
	{
		Oid		   *nspid = MemoryContextAlloc(flinfo->fn_mcxt, sizeof(Oid));

		*nspid = get_func_namespace(flinfo->fn_oid);
		flinfo->fn_extra = nspid;
	}
	return *(Oid *) flinfo->fn_extra;
}

/* The queue table of the extension in schema nspid. */
Oid
ck_queue_relid(Oid nspid)
{
	Oid			relid = get_relname_relid(CK_QUEUE_TABLE, nspid);

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("cachekit queue table \"%s.%s\" does not exist",
						get_namespace_name(nspid), CK_QUEUE_TABLE),
				 errhint("Recreate the extension with DROP EXTENSION cachekit; CREATE EXTENSION cachekit;")));
	return relid;
}

/* Build a text[] from a List of C strings. */
static Datum
ck_text_array(List *items)
{
	int			n = list_length(items);
	Datum	   *elems = palloc(sizeof(Datum) * (n > 0 ? n : 1));
	Size		total = 0;
	char	   *space;
	ListCell   *lc;
	int			i = 0;

	/* the texts side by side in one allocation: one palloc, not one per item */
	foreach(lc, items)
		total += INTALIGN(VARHDRSZ + strlen((char *) lfirst(lc)));
	space = palloc(total > 0 ? total : 1);
	foreach(lc, items)
	{
		const char *s = lfirst(lc);
		int			len = strlen(s);

		SET_VARSIZE(space, VARHDRSZ + len);
		memcpy(VARDATA(space), s, len);
		elems[i++] = PointerGetDatum(space);
		space += INTALIGN(VARHDRSZ + len);
	}
	return PointerGetDatum(construct_array(elems, n, TEXTOID, -1, false, TYPALIGN_INT));
}

/*
 * The targets an entry is owed to, as the queue's targets column holds
 * them: NULL (0) for the default target alone, else a text[] of names.
 */
Datum
ck_targets_array(List *names)
{
	if (names == NIL ||
		(list_length(names) == 1 && strcmp(linitial(names), CK_DEFAULT_TARGET) == 0))
		return (Datum) 0;
	return ck_text_array(names);
}

/* the queue's columns, by name, as the direct insert fills them */
static const char *const queue_columns[] = {
	"id", "kind", "keys", "tags", "untags", "value", "ttl", "attempts",
	"last_error", "enqueued_at", "targets"
};
#define CK_QUEUE_NCOLS lengthof(queue_columns)
#define CK_QUEUE_OPTIONAL 10	/* from here on, a queue of 0.1.0 lacks them */

/* where those columns are in the table, found once per queue table */
static struct
{
	Oid			relid;
	Oid			seqid;			/* the id column's sequence */
	AttrNumber	attnum[CK_QUEUE_NCOLS];
} queue_layout;

/* Find the queue's column numbers and id sequence (once per table). */
static void
ck_queue_layout(Relation rel, Oid nspid)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Oid			seqid;

	if (queue_layout.relid == RelationGetRelid(rel))
		return;
	queue_layout.relid = InvalidOid;
	for (int c = 0; c < (int) CK_QUEUE_NCOLS; c++)
	{
		AttrNumber	found = InvalidAttrNumber;

		for (int a = 0; a < desc->natts; a++)
			if (!TupleDescAttr(desc, a)->attisdropped &&
				strcmp(NameStr(TupleDescAttr(desc, a)->attname), queue_columns[c]) == 0)
				found = a + 1;
		if (found == InvalidAttrNumber && c >= CK_QUEUE_OPTIONAL)
		{
			queue_layout.attnum[c] = InvalidAttrNumber;
			continue;
		}
		if (found == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("cachekit queue table has no column \"%s\"", queue_columns[c]),
					 errhint("Recreate the extension with DROP EXTENSION cachekit; CREATE EXTENSION cachekit;")));
		queue_layout.attnum[c] = found;
	}
	seqid = get_relname_relid(CK_QUEUE_TABLE "_id_seq", nspid);
	if (!OidIsValid(seqid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("cachekit queue sequence \"%s_id_seq\" does not exist", CK_QUEUE_TABLE),
				 errhint("Recreate the extension with DROP EXTENSION cachekit; CREATE EXTENSION cachekit;")));
	queue_layout.seqid = seqid;
	queue_layout.relid = RelationGetRelid(rel);
}

/*
 * Insert a new queue row's entry into one index, as the executor would: an
 * index that CREATE INDEX CONCURRENTLY or REINDEX CONCURRENTLY has not made
 * ready for inserts yet gets nothing (its build will see the row), a
 * partial index only rows its predicate accepts, and expressions are
 * computed. The executor state for that is made on first need (*estate).
 */
static void
ck_index_insert(Relation rel, Oid indexoid, HeapTuple tuple, EState **estate)
{
	Relation	index = index_open(indexoid, RowExclusiveLock);
	IndexInfo  *info;
	Datum		values[INDEX_MAX_KEYS];
	bool		isnull[INDEX_MAX_KEYS];

	if (!index->rd_index->indisready)
	{
		index_close(index, NoLock);
		return;
	}
	info = BuildIndexInfo(index);
	if (info->ii_ExclusionOps != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("index \"%s\" on the cachekit queue enforces an exclusion constraint",
						RelationGetRelationName(index)),
				 errhint("Drop that constraint: the queue's entries are only ever inserted by cachekit.")));
	if (info->ii_Expressions == NIL && info->ii_Predicate == NIL)
	{
		TupleDesc	desc = RelationGetDescr(rel);

		for (int k = 0; k < info->ii_NumIndexAttrs; k++)
			values[k] = heap_getattr(tuple, info->ii_IndexAttrNumbers[k], desc, &isnull[k]);
	}
	else if (!ck_index_values(rel, info, tuple, estate, values, isnull))
	{
		index_close(index, NoLock);
		return;					/* outside a partial index */
	}
	index_insert(index, values, isnull, &tuple->t_self, rel,
				 index->rd_index->indisunique ? UNIQUE_CHECK_YES : UNIQUE_CHECK_NO,
				 false, info);
	index_close(index, NoLock);
}

/*
 * The entry of an index with expressions or a predicate for a new queue
 * row; false when the predicate rejects the row.
 */
static bool
ck_index_values(Relation rel, IndexInfo *info, HeapTuple tuple, EState **estate,
				Datum *values, bool *isnull)
{
	ExprContext *econtext;
	TupleTableSlot *slot;
	bool		keep = true;
	bool		pushed = false;

	/* at pre-commit (pending.c) no snapshot is active; functions may want one */
	if (!ActiveSnapshotSet())
	{
		PushActiveSnapshot(GetTransactionSnapshot());
		pushed = true;
	}
	if (*estate == NULL)
		*estate = CreateExecutorState();
	econtext = GetPerTupleExprContext(*estate);
	slot = ExecStoreHeapTuple(tuple,
							  MakeSingleTupleTableSlot(RelationGetDescr(rel), &TTSOpsHeapTuple),
							  false);
	econtext->ecxt_scantuple = slot;
	if (info->ii_Predicate != NIL)
		keep = ExecQual(ExecPrepareQual(info->ii_Predicate, *estate), econtext);
	if (keep)
		FormIndexDatum(info, slot, *estate, values, isnull);
	ExecDropSingleTupleTableSlot(slot);
	if (pushed)
		PopActiveSnapshot();
	return keep;
}

/*
 * Insert one queue entry into queue table "queue" now, in the current
 * (sub)transaction. keys and tags are Lists of C strings; value may be
 * NULL. ck_enqueue (pending.c) decides when.
 *
 * This runs for every changed row of a watched table, so it inserts
 * directly into the heap and the indexes rather than through a SQL
 * statement: no parsing, planning or executor start-up per row, and no
 * permission check (writers need no grant on the queue). It is a plain
 * WAL-logged heap insert, so crash safety, replication and statistics are
 * those of any other insert.
 */
void
ck_queue_write_entry(Oid queue, char kind, List *keys, List *tags, List *untags,
					 const char *value, int ttl, Datum targets)
{
	Relation	rel = table_open(queue, RowExclusiveLock);
	TupleDesc	desc = RelationGetDescr(rel);
	Datum	   *values = palloc0(sizeof(Datum) * desc->natts);
	bool	   *nulls = palloc(sizeof(bool) * desc->natts);
	HeapTuple	tuple;
	List	   *indexes;
	ListCell   *lc;
	EState	   *estate = NULL;

	ck_queue_layout(rel, RelationGetNamespace(rel));
	memset(nulls, true, sizeof(bool) * desc->natts);
#define SET_COLUMN(c, v) \
	(values[queue_layout.attnum[c] - 1] = (v), nulls[queue_layout.attnum[c] - 1] = false)
	SET_COLUMN(0, Int64GetDatum(nextval_internal(queue_layout.seqid, false)));
	SET_COLUMN(1, CharGetDatum(kind));
	SET_COLUMN(2, ck_text_array(keys));
	SET_COLUMN(3, ck_text_array(tags));
	SET_COLUMN(4, ck_text_array(untags));
	if (value)
		SET_COLUMN(5, CStringGetTextDatum(value));
	SET_COLUMN(6, Int32GetDatum(ttl));
	SET_COLUMN(7, Int32GetDatum(0));
	/* 8: last_error stays NULL */
	SET_COLUMN(9, TimestampTzGetDatum(GetCurrentTransactionStartTimestamp()));
	/* 10: targets, NULL for the default target alone */
	if (targets != (Datum) 0)
	{
		if (queue_layout.attnum[10] == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("cachekit queue table has no column \"targets\""),
					 errdetail("Named targets need the extension's version 0.2.0."),
					 errhint("Run ALTER EXTENSION cachekit UPDATE.")));
		SET_COLUMN(10, targets);
	}
#undef SET_COLUMN

	tuple = heap_form_tuple(desc, values, nulls);
	simple_heap_insert(rel, tuple);

	/* the indexes: the primary key on id, and any an administrator added */
	indexes = RelationGetIndexList(rel);
	foreach(lc, indexes)
		ck_index_insert(rel, lfirst_oid(lc), tuple, &estate);
	if (estate)
		FreeExecutorState(estate);
	list_free(indexes);
	heap_freetuple(tuple);
	table_close(rel, NoLock);
	ck_note_enqueued();
}

/* Turn a text[] argument into a List of C strings, refusing NULL elements. */
static List *
ck_array_to_list(ArrayType *arr, const char *what)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	List	   *result = NIL;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", what)));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain NULL", what),
					 errdetail("Element %d is NULL.", i + 1)));
		result = lappend(result, TextDatumGetCString(elems[i]));
	}
	return result;
}

/* cachekit_delete(VARIADIC keys text[]): delete keys when this transaction commits. */
Datum
cachekit_delete(PG_FUNCTION_ARGS)
{
	List	   *keys = ck_array_to_list(PG_GETARG_ARRAYTYPE_P(0), "keys");
	Oid			nspid = ck_extension_schema(fcinfo->flinfo);

	if (keys != NIL)
		ck_enqueue(nspid, CK_KIND_INVALIDATE, keys, NIL, NIL, NULL, 0, (Datum) 0);
	PG_RETURN_VOID();
}

/* cachekit_flush_tag(VARIADIC tags text[]): flush tags when this transaction commits. */
Datum
cachekit_flush_tag(PG_FUNCTION_ARGS)
{
	List	   *tags = ck_array_to_list(PG_GETARG_ARRAYTYPE_P(0), "tags");
	Oid			nspid = ck_extension_schema(fcinfo->flinfo);

	if (tags != NIL)
		ck_enqueue(nspid, CK_KIND_INVALIDATE, NIL, tags, NIL, NULL, 0, (Datum) 0);
	PG_RETURN_VOID();
}

/*
 * The targets argument of cachekit_delete_in and cachekit_flush_tag_in:
 * checked names, each once; NULL or empty means the default target.
 */
static Datum
ck_targets_arg(FunctionCallInfo fcinfo, int argno)
{
	List	   *names = NIL;
	ListCell   *lc;

	if (PG_ARGISNULL(argno))
		return (Datum) 0;
	foreach(lc, ck_array_to_list(PG_GETARG_ARRAYTYPE_P(argno), "targets"))
	{
		if (list_member(names, makeString(lfirst(lc))))
			continue;
		ck_target_check_name(lfirst(lc), "targets");
		names = lappend(names, makeString(lfirst(lc)));
	}
	foreach(lc, names)
		lfirst(lc) = strVal(lfirst(lc));
	return ck_targets_array(names);
}

/* Queue the keys (or tags) of argument 1 for the targets of argument 0. */
static void
ck_enqueue_in(FunctionCallInfo fcinfo, bool tags)
{
	Datum		targets = ck_targets_arg(fcinfo, 0);
	Oid			nspid = ck_extension_schema(fcinfo->flinfo);
	List	   *items;

	if (PG_ARGISNULL(1))
		return;
	items = ck_array_to_list(PG_GETARG_ARRAYTYPE_P(1), tags ? "tags" : "keys");
	if (items != NIL)
		ck_enqueue(nspid, CK_KIND_INVALIDATE, tags ? NIL : items, tags ? items : NIL,
				   NIL, NULL, 0, targets);
}

/* cachekit_delete_in(targets text[], VARIADIC keys text[]): cachekit_delete for those targets. */
Datum
cachekit_delete_in(PG_FUNCTION_ARGS)
{
	ck_enqueue_in(fcinfo, false);
	PG_RETURN_VOID();
}

/* cachekit_flush_tag_in(targets text[], VARIADIC tags text[]): cachekit_flush_tag for those targets. */
Datum
cachekit_flush_tag_in(PG_FUNCTION_ARGS)
{
	ck_enqueue_in(fcinfo, true);
	PG_RETURN_VOID();
}

/*
 * Does the queue still hold an entry that had committed when snapshot
 * "start" was taken? Entries of this transaction, and of transactions that
 * were still running at "start", do not count. The scan follows the id
 * index from the worker's published floor (below it everything is
 * delivered), so a long-delivered past costs nothing.
 */
static bool
ck_work_pending(CachekitShared *slot, Oid relid, Snapshot start)
{
	Relation	rel;
	Oid			index;
	Snapshot	snap;
	SysScanDesc scan;
	ScanKeyData key;
	HeapTuple	tuple;
	int64		floor = 0;
	bool		found = false;

	rel = try_relation_open(relid, AccessShareLock);
	if (rel == NULL)
		return false;			/* the extension was dropped meanwhile */
	index = RelationGetPrimaryKeyIndex(rel);

	if (slot != NULL)
	{
		SpinLockAcquire(&slot->mutex);
		if (slot->floor_database == MyDatabaseId && slot->floor_queue == relid)
			floor = slot->delivered_floor;
		SpinLockRelease(&slot->mutex);
	}

	ScanKeyInit(&key, 1, BTGreaterEqualStrategyNumber, F_INT8GE, Int64GetDatum(floor));
	snap = RegisterSnapshot(GetLatestSnapshot());
	scan = systable_beginscan(rel, index, OidIsValid(index), snap, 1, &key);
	while ((tuple = systable_getnext(scan)) != NULL)
	{
		TransactionId xmin = HeapTupleHeaderGetXmin(tuple->t_data);

		if (TransactionIdIsCurrentTransactionId(xmin))
			continue;
		if (XidInMVCCSnapshot(xmin, start))
			continue;
		found = true;
		break;
	}
	systable_endscan(scan);
	UnregisterSnapshot(snap);
	/* release the lock at once: waiting must not block DROP EXTENSION */
	relation_close(rel, AccessShareLock);
	return found;
}

/*
 * Has the worker finished a pass, begun after "pass" was counted, that left
 * nothing undelivered that had committed before its snapshot? That
 * snapshot was taken after the caller's, so the caller's work is delivered.
 */
static bool
ck_drained_since(CachekitShared *slot, Oid relid, uint64 pass)
{
	bool		drained;

	if (slot == NULL)
		return false;
	SpinLockAcquire(&slot->mutex);
	drained = slot->floor_database == MyDatabaseId &&
		slot->floor_queue == relid && slot->drained_pass > pass;
	SpinLockRelease(&slot->mutex);
	return drained;
}

/* the first and the longest wait between two scans of the queue in cachekit_wait */
#define CK_WAIT_SCAN_FIRST_MS 20
#define CK_WAIT_SCAN_MAX_MS 1000

/*
 * cachekit_wait(timeout interval): wait until work committed before the
 * call is delivered.
 *
 * Waiting costs the worker nothing: the worker says after each pass that
 * drained its queue which pass that was, and a waiter is done once a pass
 * that began after its call has. Only when that does not come (a backlog
 * larger than a batch, an entry Redis keeps refusing) does the waiter look
 * at the queue itself, less and less often.
 */
Datum
cachekit_wait(PG_FUNCTION_ARGS)
{
	Interval   *timeout = PG_GETARG_INTERVAL_P(0);
	Oid			nspid = ck_extension_schema(fcinfo->flinfo);
	Oid			relid = ck_queue_relid(nspid);
	int64		timeout_us;
	TimestampTz deadline;
	TimestampTz next_scan;
	int			scan_delay = CK_WAIT_SCAN_FIRST_MS;
	Snapshot	start;
	uint64		pass;
	bool		done;
	CachekitShared *slot;

	timeout_us = ((int64) timeout->month * DAYS_PER_MONTH + timeout->day) * USECS_PER_DAY
		+ timeout->time;
	if (timeout_us < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cachekit_wait timeout must not be negative")));
	deadline = GetCurrentTimestamp() + timeout_us;

	start = RegisterSnapshot(GetLatestSnapshot());
	/* this database's worker; if none yet, any pass of one started later counts */
	slot = ck_my_slot();
	pass = slot ? pg_atomic_read_u64(&slot->passes) : 0;
	ck_wake_worker();
	done = !ck_work_pending(slot, relid, start);
	next_scan = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), scan_delay);
	while (!done)
	{
		TimestampTz now = GetCurrentTimestamp();
		long		sleep_ms;

		if (slot == NULL && (slot = ck_my_slot()) != NULL)
			pass = 0;
		if (ck_drained_since(slot, relid, pass))
		{
			done = true;
			break;
		}
		if (now >= next_scan)
		{
			if (!ck_work_pending(slot, relid, start))
			{
				done = true;
				break;
			}
			scan_delay = Min(scan_delay * 2, CK_WAIT_SCAN_MAX_MS);
			next_scan = TimestampTzPlusMilliseconds(now, scan_delay);
		}
		if (now >= deadline)
			break;
		sleep_ms = (long) ((Min(deadline, next_scan) - now + 999) / 1000);
		/* the worker broadcasts after every batch and every drained pass */
		if (slot != NULL)
			ConditionVariableTimedSleep(&slot->delivered_cv, Max(sleep_ms, 1),
										PG_WAIT_EXTENSION);
		else
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 Min(Max(sleep_ms, 1), 100), PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
	}
	ConditionVariableCancelSleep();
	UnregisterSnapshot(start);
	PG_RETURN_BOOL(done);
}
