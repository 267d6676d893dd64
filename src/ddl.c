/*-------------------------------------------------------------------------
 *
 * ddl.c
 *	  Hooks that keep cachekit triggers working through DDL, and the
 *	  executor's note of queries that modify tables in WITH.
 *
 * - CREATE TRIGGER (also a trigger cloned to a partition by CREATE TABLE
 *   ... PARTITION OF or ATTACH PARTITION) checks a cachekit trigger's
 *   arguments at once, with the errors its first row would raise, and
 *   records that the trigger depends on the columns its arguments name, as
 *   PostgreSQL does for UPDATE OF columns: DROP COLUMN is then refused
 *   unless CASCADE, and a column type change is refused. Under pg_upgrade
 *   (binary-upgrade mode) only the dependencies are recorded: it must
 *   recreate whatever triggers the old cluster held.
 * - RENAME COLUMN rewrites the arguments of the cachekit triggers of the
 *   table (and of its partitions and inheritance children) that name the
 *   column, or is refused when the new name cannot be written there.
 * - Statement-level triggers must know whether their query holds several
 *   UPDATEs of one table (ck_query_has_modifying_cte).
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/genam.h"
#include "access/relation.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_trigger.h"
#include "executor/executor.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/rel.h"
#include "utils/reltrigger.h"
#include "utils/snapmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"

static object_access_hook_type prev_object_access = NULL;
static ProcessUtility_hook_type prev_utility = NULL;
static ExecutorStart_hook_type prev_executor_start = NULL;
static ExecutorEnd_hook_type prev_executor_end = NULL;

/* queries with a data-modifying WITH between their start and end */
static int	modifying_cte_queries = 0;

/* Fill a Trigger from its pg_trigger row (the fields cachekit reads). */
static void
ck_trigger_from_tuple(HeapTuple tuple, TupleDesc desc, Trigger *tg)
{
	Form_pg_trigger form = (Form_pg_trigger) GETSTRUCT(tuple);
	bool		isnull;
	Datum		d;

	memset(tg, 0, sizeof(Trigger));
	tg->tgoid = form->oid;
	tg->tgname = pstrdup(NameStr(form->tgname));
	tg->tgfoid = form->tgfoid;
	tg->tgtype = form->tgtype;
	tg->tgnargs = form->tgnargs;
	tg->tgargs = palloc(sizeof(char *) * (form->tgnargs + 1));
	if (form->tgnargs > 0)
	{
		bytea	   *args = DatumGetByteaPP(heap_getattr(tuple, Anum_pg_trigger_tgargs, desc, &isnull));
		char	   *p = VARDATA_ANY(args);

		for (int i = 0; i < form->tgnargs; i++)
		{
			tg->tgargs[i] = pstrdup(p);
			p += strlen(p) + 1;
		}
	}
	d = heap_getattr(tuple, Anum_pg_trigger_tgoldtable, desc, &isnull);
	tg->tgoldtable = isnull ? NULL : pstrdup(NameStr(*DatumGetName(d)));
	d = heap_getattr(tuple, Anum_pg_trigger_tgnewtable, desc, &isnull);
	tg->tgnewtable = isnull ? NULL : pstrdup(NameStr(*DatumGetName(d)));
}

/*
 * A trigger was created (or replaced): if it calls a cachekit function,
 * check it against its table (unless "check" is false) and record its
 * dependencies on the columns its arguments name. Its row is not visible
 * to the command's snapshot yet, so it is read with SnapshotSelf.
 */
static void
ck_trigger_created(Oid tgoid, bool check)
{
	Relation	tgrel = table_open(TriggerRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	Trigger		tg;
	Oid			relid;
	CkTriggerKind kind;

	ScanKeyInit(&key, Anum_pg_trigger_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(tgoid));
	scan = systable_beginscan(tgrel, TriggerOidIndexId, true, SnapshotSelf, 1, &key);
	tuple = systable_getnext(scan);
	kind = HeapTupleIsValid(tuple) ?
		ck_trigger_kind(((Form_pg_trigger) GETSTRUCT(tuple))->tgfoid) : CK_TRIGGER_NONE;
	if (kind != CK_TRIGGER_NONE)
	{
		ck_trigger_from_tuple(tuple, RelationGetDescr(tgrel), &tg);
		relid = ((Form_pg_trigger) GETSTRUCT(tuple))->tgrelid;
	}
	systable_endscan(scan);
	table_close(tgrel, AccessShareLock);

	if (kind != CK_TRIGGER_NONE)
	{
		/* CREATE TRIGGER holds a lock on the table */
		Relation	rel = relation_open(relid, AccessShareLock);
		Bitmapset  *columns = check ? ck_trigger_validate(rel, &tg, kind) :
			ck_trigger_named_columns(rel, &tg, kind);
		ObjectAddress myself;
		ObjectAddress column;
		int			attnum = -1;

		ObjectAddressSet(myself, TriggerRelationId, tgoid);
		while ((attnum = bms_next_member(columns, attnum)) >= 0)
		{
			ObjectAddressSubSet(column, RelationRelationId, relid, attnum);
			recordDependencyOn(&myself, &column, DEPENDENCY_NORMAL);
		}
		relation_close(rel, AccessShareLock);
	}
}

/*
 * The same for a trigger created before cachekit 0.2.0: one that does not
 * pass the checks is reported with a warning and left as it is, rather
 * than failing the upgrade. Returns whether it passed. The caller must
 * have made its earlier catalog changes visible (a subtransaction cannot
 * start with invalidations of the current command pending).
 */
static bool
ck_trigger_created_quietly(Oid tgoid)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool passed = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		ck_trigger_created(tgoid, true);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("%s", edata->message),
				 edata->detail ? errdetail("%s", edata->detail) : 0,
				 errhint("Writes to the table fail until the trigger is dropped or created again with valid arguments.")));
		FreeErrorData(edata);
		passed = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return passed;
}

/* Object access hook: new triggers are checked at once. */
static void
ck_object_access(ObjectAccessType access, Oid classId, Oid objectId, int subId, void *arg)
{
	if (prev_object_access)
		prev_object_access(access, classId, objectId, subId, arg);
	if (access != OAT_POST_CREATE || classId != TriggerRelationId || subId != 0)
		return;
	/*
	 * pg_upgrade must recreate every trigger the old cluster held, valid or
	 * not: it gets its dependencies, unchecked.
	 */
	ck_trigger_created(objectId, !IsBinaryUpgrade);
}

/*
 * cachekit_check_triggers(): check every cachekit trigger of this
 * database and record its column dependencies, as CREATE TRIGGER does
 * since 0.2.0. Run once by the upgrade from 0.1.0; returns the number of
 * triggers that failed the checks (each reported with a warning).
 */
PG_FUNCTION_INFO_V1(cachekit_check_triggers);

Datum
cachekit_check_triggers(PG_FUNCTION_ARGS)
{
	Relation	tgrel = table_open(TriggerRelationId, AccessShareLock);
	SysScanDesc scan = systable_beginscan(tgrel, InvalidOid, false, NULL, 0, NULL);
	HeapTuple	tuple;
	List	   *triggers = NIL;
	List	   *relids = NIL;
	ListCell   *lc;
	ListCell   *lc2;
	int64		failed = 0;

	while (HeapTupleIsValid(tuple = systable_getnext(scan)))
	{
		Form_pg_trigger form = (Form_pg_trigger) GETSTRUCT(tuple);

		if (ck_trigger_kind(form->tgfoid) == CK_TRIGGER_NONE)
			continue;
		triggers = lappend_oid(triggers, form->oid);
		relids = lappend_oid(relids, form->tgrelid);
	}
	systable_endscan(scan);
	table_close(tgrel, AccessShareLock);

	forboth(lc, triggers, lc2, relids)
	{
		/* the lock CREATE TRIGGER would take */
		LockRelationOid(lfirst_oid(lc2), ShareRowExclusiveLock);
		if (!ck_trigger_created_quietly(lfirst_oid(lc)))
			failed++;
		CommandCounterIncrement();
	}
	PG_RETURN_INT64(failed);
}

/* Store new arguments of a trigger in its pg_trigger row. */
static void
ck_store_trigger_args(Relation tgrel, HeapTuple tuple, Trigger *tg)
{
	StringInfoData args;
	Datum		values[Natts_pg_trigger] = {0};
	bool		nulls[Natts_pg_trigger] = {0};
	bool		replace[Natts_pg_trigger] = {0};
	HeapTuple	newtuple;

	initStringInfo(&args);
	for (int i = 0; i < tg->tgnargs; i++)
		appendBinaryStringInfo(&args, tg->tgargs[i], strlen(tg->tgargs[i]) + 1);
	values[Anum_pg_trigger_tgargs - 1] =
		PointerGetDatum(cstring_to_text_with_len(args.data, args.len));
	replace[Anum_pg_trigger_tgargs - 1] = true;
	newtuple = heap_modify_tuple(tuple, RelationGetDescr(tgrel), values, nulls, replace);
	CatalogTupleUpdate(tgrel, &newtuple->t_self, newtuple);
	heap_freetuple(newtuple);
}

/*
 * Column oldname of relid was renamed newname: rewrite the arguments of
 * the table's cachekit triggers that name it.
 */
static void
ck_follow_rename(Oid relid, const char *oldname, const char *newname)
{
	Relation	rel = relation_open(relid, NoLock);
	Relation	tgrel = table_open(TriggerRelationId, RowExclusiveLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	bool		changed_any = false;

	ScanKeyInit(&key, Anum_pg_trigger_tgrelid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(relid));
	scan = systable_beginscan(tgrel, TriggerRelidNameIndexId, true, NULL, 1, &key);
	while (HeapTupleIsValid(tuple = systable_getnext(scan)))
	{
		CkTriggerKind kind = ck_trigger_kind(((Form_pg_trigger) GETSTRUCT(tuple))->tgfoid);
		Trigger		tg;
		bool		changed = false;

		if (kind == CK_TRIGGER_NONE)
			continue;
		ck_trigger_from_tuple(tuple, RelationGetDescr(tgrel), &tg);
		for (int i = 0; i < tg.tgnargs; i++)
		{
			char	   *renamed = ck_trigger_arg_rename(rel, &tg, kind, i, oldname, newname);

			if (renamed)
			{
				tg.tgargs[i] = renamed;
				changed = true;
			}
		}
		if (changed)
			ck_store_trigger_args(tgrel, tuple, &tg);
		changed_any |= changed;
	}
	systable_endscan(scan);
	table_close(tgrel, RowExclusiveLock);
	if (changed_any)
		CacheInvalidateRelcache(rel);
	relation_close(rel, NoLock);
}

/*
 * ALTER TABLE ... RENAME COLUMN: once done, the cachekit triggers of the
 * table, and of every partition and inheritance child the rename reached,
 * follow the new name.
 */
static void
ck_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
		   ProcessUtilityContext context, ParamListInfo params,
		   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	RenameStmt *rename = NULL;
	Oid			relid = InvalidOid;

	if (IsA(pstmt->utilityStmt, RenameStmt) &&
		((RenameStmt *) pstmt->utilityStmt)->renameType == OBJECT_COLUMN &&
		((RenameStmt *) pstmt->utilityStmt)->relation != NULL)
	{
		rename = (RenameStmt *) pstmt->utilityStmt;
		relid = RangeVarGetRelid(rename->relation, NoLock, true);
	}

	if (prev_utility)
		prev_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);

	if (OidIsValid(relid))
	{
		List	   *rels = rename->relation->inh ?
			find_all_inheritors(relid, NoLock, NULL) : list_make1_oid(relid);
		ListCell   *lc;

		CommandCounterIncrement();
		foreach(lc, rels)
			ck_follow_rename(lfirst_oid(lc), rename->subname, rename->newname);
		CommandCounterIncrement();
	}
}

/* Executor start: note a query with a data-modifying WITH. */
static void
ck_executor_start(QueryDesc *queryDesc, int eflags)
{
	if (prev_executor_start)
		prev_executor_start(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
	if (queryDesc->plannedstmt->hasModifyingCTE)
		modifying_cte_queries++;
}

/* Executor end: the query noted at its start is over. */
static void
ck_executor_end(QueryDesc *queryDesc)
{
	if (queryDesc->plannedstmt->hasModifyingCTE && modifying_cte_queries > 0)
		modifying_cte_queries--;
	if (prev_executor_end)
		prev_executor_end(queryDesc);
	else
		standard_ExecutorEnd(queryDesc);
}

/*
 * Transaction end: a query that failed never reached its executor end.
 * Until then the count is only too high, which is safe.
 */
static void
ck_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_COMMIT ||
		event == XACT_EVENT_PREPARE || event == XACT_EVENT_PARALLEL_ABORT)
		modifying_cte_queries = 0;
}

/*
 * Is a query with a data-modifying WITH running in this backend? Its
 * statement-level triggers fire before its executor ends.
 */
bool
ck_query_has_modifying_cte(void)
{
	return modifying_cte_queries > 0;
}

/* Install the hooks (from _PG_init, when preloaded). */
void
ck_ddl_init(void)
{
	prev_object_access = object_access_hook;
	object_access_hook = ck_object_access;
	prev_utility = ProcessUtility_hook;
	ProcessUtility_hook = ck_utility;
	prev_executor_start = ExecutorStart_hook;
	ExecutorStart_hook = ck_executor_start;
	prev_executor_end = ExecutorEnd_hook;
	ExecutorEnd_hook = ck_executor_end;
	RegisterXactCallback(ck_xact_callback, NULL);
}
