/*-------------------------------------------------------------------------
 *
 * replica.c
 *	  What a logical replication subscriber does with the rows of the
 *	  publisher's cachekit tables.
 *
 * A publication FOR ALL TABLES (blue/green upgrades use them) publishes
 * cachekit_queue and cachekit_dead_letter like any table. Applied as they
 * come, the publisher's queue ids would collide with the subscriber's own,
 * the publisher's worker's deletes would remove the subscriber's own
 * entries, and its write-through values would reach the subscriber's Redis
 * in no defined order with the publisher's own delivery. The trigger
 * cachekit_replica_guard fires only in the apply worker (ENABLE REPLICA):
 *
 *	- a queue row inserted by the publisher becomes a new entry of the
 *	  subscriber's queue, under an id of its own; a write-through entry
 *	  becomes a delete of its key (an old value never overwrites a newer
 *	  one), an invalidation stays as it is. Without the library preloaded
 *	  (no worker would ever deliver it) it is dropped.
 *	- the publisher's updates and deletes of queue rows are skipped: the
 *	  subscriber's queue belongs to its own worker.
 *	- the publisher's dead letters are its own: skipped too.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "parser/parse_relation.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

PG_FUNCTION_INFO_V1(cachekit_replica_guard);

/* The attribute number of a column of rel, or an error naming it. */
static AttrNumber
ck_column(Relation rel, const char *name)
{
	AttrNumber	attnum = attnameAttNum(rel, name, false);

	if (attnum == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("cachekit queue table has no column \"%s\"", name),
				 errhint("Recreate the extension with DROP EXTENSION cachekit; CREATE EXTENSION cachekit;")));
	return attnum;
}

/* tags || untags of a queue row, as one text[] datum. */
static Datum
ck_all_tags(HeapTuple tuple, TupleDesc desc, AttrNumber tags_att, AttrNumber untags_att)
{
	bool		isnull;
	Datum		tags = heap_getattr(tuple, tags_att, desc, &isnull);
	Datum		untags;

	if (isnull)
		tags = PointerGetDatum(construct_empty_array(TEXTOID));
	untags = heap_getattr(tuple, untags_att, desc, &isnull);
	if (isnull)
		return tags;
	return DirectFunctionCall2(array_cat, tags, untags);
}

/*
 * The subscriber's version of a queue row the publisher inserted: a new id,
 * no attempts, and a write-through entry turned into a delete.
 */
static HeapTuple
ck_localize_entry(Relation rel, HeapTuple tuple)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Datum	   *values = palloc0(sizeof(Datum) * desc->natts);
	bool	   *nulls = palloc0(sizeof(bool) * desc->natts);
	bool	   *replace = palloc0(sizeof(bool) * desc->natts);
	AttrNumber	kind_att = ck_column(rel, "kind");
	Oid			seqid = get_relname_relid(CK_QUEUE_TABLE "_id_seq",
										  RelationGetNamespace(rel));
	bool		isnull;
	char		kind;

	if (!OidIsValid(seqid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("cachekit queue sequence \"%s_id_seq\" does not exist", CK_QUEUE_TABLE)));
#define REPLACE(name, datum, isnull_) \
	do { AttrNumber a_ = ck_column(rel, name); \
		 values[a_ - 1] = (datum); nulls[a_ - 1] = (isnull_); replace[a_ - 1] = true; } while (0)
	REPLACE("id", Int64GetDatum(nextval_internal(seqid, false)), false);
	REPLACE("attempts", Int32GetDatum(0), false);
	REPLACE("last_error", (Datum) 0, true);
	if (attnameAttNum(rel, "first_refused_at", false) != InvalidAttrNumber)
		REPLACE("first_refused_at", (Datum) 0, true);
	kind = DatumGetChar(heap_getattr(tuple, kind_att, desc, &isnull));
	if (!isnull && kind == CK_KIND_WRITE)
	{
		Datum		leave = ck_all_tags(tuple, desc, ck_column(rel, "tags"),
										ck_column(rel, "untags"));

		REPLACE("kind", CharGetDatum(CK_KIND_DROP), false);
		REPLACE("tags", PointerGetDatum(construct_empty_array(TEXTOID)), false);
		REPLACE("untags", leave, false);
		REPLACE("value", (Datum) 0, true);
		REPLACE("ttl", Int32GetDatum(0), false);
	}
#undef REPLACE
	return heap_modify_tuple(tuple, desc, values, nulls, replace);
}

/*
 * cachekit_replica_guard(): BEFORE INSERT OR UPDATE OR DELETE row trigger
 * on the queue and dead-letter tables, enabled for replication only.
 */
Datum
cachekit_replica_guard(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("cachekit_replica_guard must be a BEFORE ROW trigger")));

	/* only new queue rows are kept, and only where a worker delivers them */
	if (!TRIGGER_FIRED_BY_INSERT(td->tg_event) || ck_slots == NULL ||
		strcmp(RelationGetRelationName(td->tg_relation), CK_QUEUE_TABLE) != 0)
		return PointerGetDatum(NULL);

	ck_note_enqueued();
	return PointerGetDatum(ck_localize_entry(td->tg_relation, td->tg_trigtuple));
}
