/*-------------------------------------------------------------------------
 *
 * preview.c
 *	  cachekit_preview: what a cachekit trigger would enqueue for one row
 *	  change, rendered by the trigger's own code, enqueueing nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/pg_trigger.h"
#include "commands/trigger.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/reltrigger.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(cachekit_preview);

/* the result set being built */
typedef struct CkPreview
{
	Tuplestorestate *store;
	TupleDesc	desc;
} CkPreview;

/* Add one (action, name, value, ttl) row. */
static void
ck_preview_row(CkPreview *preview, const char *action, const char *name,
			   const char *value, int ttl)
{
	Datum		values[4];
	bool		nulls[4] = {false, false, value == NULL, value == NULL};

	values[0] = CStringGetTextDatum(action);
	values[1] = CStringGetTextDatum(name);
	values[2] = value ? CStringGetTextDatum(value) : (Datum) 0;
	values[3] = Int32GetDatum(ttl);
	tuplestore_putvalues(preview->store, preview->desc, values, nulls);
}

/* Add a row per string of a list. */
static void
ck_preview_list(CkPreview *preview, const char *action, List *names)
{
	ListCell   *lc;

	foreach(lc, names)
		ck_preview_row(preview, action, (char *) lfirst(lc), NULL, 0);
}

/*
 * A sink that turns a queue entry into rows: an invalidation deletes keys
 * and flushes tags; a write-through write sets its key and adds it to and
 * removes it from tag sets; a drop deletes its key and removes it from
 * tag sets.
 */
static void
ck_emit_preview(void *arg, char kind, List *keys, List *tags, List *untags,
				const char *value, int ttl)
{
	CkPreview  *preview = (CkPreview *) arg;

	if (kind == CK_KIND_WRITE)
	{
		ck_preview_row(preview, "write", linitial(keys), value, ttl);
		ck_preview_list(preview, "tag_add", tags);
	}
	else
	{
		ck_preview_list(preview, "delete", keys);
		ck_preview_list(preview, "flush_tag", tags);
	}
	ck_preview_list(preview, "tag_remove", untags);
}

/* The trigger of rel called name, which must be a cachekit trigger. */
static Trigger *
ck_preview_trigger(Relation rel, const char *name, CkTriggerKind *kind)
{
	for (int i = 0; rel->trigdesc && i < rel->trigdesc->numtriggers; i++)
	{
		Trigger    *tg = &rel->trigdesc->triggers[i];

		if (strcmp(tg->tgname, name) != 0)
			continue;
		*kind = ck_trigger_kind(tg->tgfoid);
		if (*kind == CK_TRIGGER_NONE)
			ereport(ERROR,
					(errcode(ERRCODE_WRONG_OBJECT_TYPE),
					 errmsg("trigger \"%s\" on table \"%s\" is not a cachekit trigger",
							name, RelationGetRelationName(rel))));
		return tg;
	}
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("trigger \"%s\" for table \"%s\" does not exist",
					name, RelationGetRelationName(rel))));
	return NULL;				/* keep the compiler quiet */
}

/* A slot holding argument argno, a row of rel's type, or NULL for none. */
static TupleTableSlot *
ck_preview_slot(FunctionCallInfo fcinfo, int argno, Relation rel, HeapTupleData *tuple)
{
	HeapTupleHeader row;
	TupleTableSlot *slot;

	if (PG_ARGISNULL(argno))
		return NULL;
	row = PG_GETARG_HEAPTUPLEHEADER(argno);
	tuple->t_len = HeapTupleHeaderGetDatumLength(row);
	ItemPointerSetInvalid(&tuple->t_self);
	tuple->t_tableOid = RelationGetRelid(rel);
	tuple->t_data = row;
	slot = MakeSingleTupleTableSlot(RelationGetDescr(rel), &TTSOpsHeapTuple);
	ExecStoreHeapTuple(tuple, slot, false);
	return slot;
}

/* Does the trigger fire for this change (both rows NULL: a TRUNCATE)? */
static bool
ck_preview_fires(Trigger *tg, bool has_old, bool has_new)
{
	if (has_old && has_new)
		return TRIGGER_FOR_UPDATE(tg->tgtype);
	if (has_new)
		return TRIGGER_FOR_INSERT(tg->tgtype);
	if (has_old)
		return TRIGGER_FOR_DELETE(tg->tgtype);
	return TRIGGER_FOR_TRUNCATE(tg->tgtype);
}

/*
 * cachekit_preview(tbl, trigger_name, old_row, new_row): the rows (action,
 * name, value, ttl) the trigger would enqueue for the change from old_row
 * to new_row (NULL old_row: an INSERT; NULL new_row: a DELETE; both NULL:
 * a TRUNCATE). Nothing is enqueued. A trigger that does not fire for the
 * change gives no rows; its WHEN condition is not evaluated.
 */
Datum
cachekit_preview(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Relation	rel;
	Trigger    *tg;
	CkTriggerKind kind;
	HeapTupleData oldtuple;
	HeapTupleData newtuple;
	TupleTableSlot *oldslot;
	TupleTableSlot *newslot;
	CkPreview	preview;
	CkSink		sink;
	Oid			rowtype = get_fn_expr_argtype(fcinfo->flinfo, 2);

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the table and the trigger name of cachekit_preview must not be NULL")));
	InitMaterializedSRF(fcinfo, 0);
	rel = table_open(PG_GETARG_OID(0), AccessShareLock);
	if (rowtype != rel->rd_rel->reltype)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("the rows given to cachekit_preview must be of type %s, not %s",
						format_type_be(rel->rd_rel->reltype), format_type_be(rowtype)),
				 errhint("Pass rows of the table, e.g. ROW(1, 'x')::%s or NULL::%s.",
						 format_type_be(rel->rd_rel->reltype), format_type_be(rel->rd_rel->reltype))));
	tg = ck_preview_trigger(rel, NameStr(*PG_GETARG_NAME(1)), &kind);
	oldslot = ck_preview_slot(fcinfo, 2, rel, &oldtuple);
	newslot = ck_preview_slot(fcinfo, 3, rel, &newtuple);

	preview.store = rsinfo->setResult;
	preview.desc = rsinfo->setDesc;
	sink.emit = ck_emit_preview;
	sink.arg = &preview;
	if (ck_preview_fires(tg, oldslot != NULL, newslot != NULL))
		ck_trigger_render_change(rel, tg, kind, oldslot, newslot, &sink);

	if (oldslot)
		ExecDropSingleTupleTableSlot(oldslot);
	if (newslot)
		ExecDropSingleTupleTableSlot(newslot);
	table_close(rel, AccessShareLock);
	return (Datum) 0;
}
