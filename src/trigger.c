/*-------------------------------------------------------------------------
 *
 * trigger.c
 *	  The trigger functions cachekit_invalidate and cachekit_write_through.
 *
 * A trigger's arguments are checked when it is created (ddl.c calls
 * ck_trigger_validate), then parsed and bound to its table once per
 * backend, at its first row, and kept in a hash table keyed by trigger OID.
 * A relcache invalidation of the table (ALTER TABLE, CREATE OR REPLACE
 * TRIGGER, DROP TRIGGER) throws the parsed form away. The parsed form does
 * not depend on the event that parsed it. Each fired row renders its keys
 * and tags and enqueues one entry; the trigger never talks to Redis. The
 * same rendering serves cachekit_preview (preview.c) through a sink that
 * collects rows instead of enqueueing.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/htup_details.h"
#include "catalog/pg_index.h"
#include "catalog/pg_language.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgrprotos.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/tuplestore.h"
#include "executor/tuptable.h"

/* one trigger's parsed arguments, bound to its table */
typedef struct CkTriggerConfig
{
	Oid			tgoid;			/* hash key */
	Oid			relid;
	bool		valid;
	int			column_arg;		/* first argument with a {column}, or -1 */
	MemoryContext cxt;			/* holds everything below */
	int			nkeys;
	CkTemplate *keys;
	int			ntags;
	CkTemplate *tags;
	int			ttl;			/* write-through: seconds, 0 for none */
	int			ncolumns;		/* write-through: columns of the value */
	AttrNumber *columns;
	bool		columns_listed; /* write-through: columns= given */
	TupleDesc	value_desc;		/* write-through: blessed row type of the value */
	CkJsonPlan *json_plan;		/* write-through: its rendering, NULL: row_to_json */
	List	   *target_names;	/* target= names, each once (NIL: default) */
	Datum		targets;		/* as the queue's targets column: 0 for default */
} CkTriggerConfig;

/* where a firing enqueues: the extension's schema, the trigger's targets */
typedef struct CkQueueArg
{
	Oid			nspid;
	Datum		targets;
} CkQueueArg;

static HTAB *trigger_configs = NULL;

PG_FUNCTION_INFO_V1(cachekit_invalidate);
PG_FUNCTION_INFO_V1(cachekit_write_through);

/* Relcache callback: forget the parsed triggers of a changed table. */
static void
ck_relcache_callback(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS status;
	CkTriggerConfig *cfg;

	hash_seq_init(&status, trigger_configs);
	while ((cfg = hash_seq_search(&status)) != NULL)
	{
		if (relid == InvalidOid || cfg->relid == relid)
			cfg->valid = false;
	}
}

/* The SQL name of a trigger function. */
static const char *
ck_function_name(CkTriggerKind kind)
{
	return kind == CK_TRIGGER_INVALIDATE ? "cachekit_invalidate" : "cachekit_write_through";
}

/* Report a bad trigger argument, naming the trigger, table and argument. */
static void
ck_bad_argument(Relation rel, Trigger *tg, int argno, int sqlstate, const char *problem)
{
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("invalid argument %d of trigger \"%s\" on table \"%s\": %s",
					argno + 1, tg->tgname, RelationGetRelationName(rel), problem),
			 errdetail("The argument is \"%s\".", tg->tgargs[argno])));
}

/* The TRUNCATE error: its templates render without a row. */
static void
ck_truncate_placeholders(Relation rel, Trigger *tg, int argno)
{
	ck_bad_argument(rel, tg, argno, ERRCODE_INVALID_PARAMETER_VALUE,
					"a TRUNCATE trigger has no rows, so its templates cannot have {column} placeholders");
}

/* Parse and bind one template argument; errors name the argument. */
static void
ck_parse_template(Relation rel, Trigger *tg, int argno, const char *source, CkTemplate *tpl)
{
	char	   *problem;
	int			sqlstate;

	problem = ck_template_parse(source, tpl);
	if (problem)
		ck_bad_argument(rel, tg, argno, ERRCODE_INVALID_PARAMETER_VALUE, problem);
	problem = ck_template_bind(tpl, RelationGetDescr(rel), &sqlstate);
	if (problem)
		ck_bad_argument(rel, tg, argno, sqlstate, problem);
}

/*
 * The next name of a "columns=" list at *p, without its surrounding
 * spaces, as [*start, *end); *p moves past it and its comma. False when
 * the list is done.
 */
static bool
ck_list_next(const char **p, const char **start, const char **end)
{
	const char *comma;

	if (*p == NULL)
		return false;
	comma = strchr(*p, ',');
	*start = *p;
	*end = comma ? comma : *p + strlen(*p);
	while (*start < *end && **start == ' ')
		(*start)++;
	while (*end > *start && (*end)[-1] == ' ')
		(*end)--;
	*p = comma ? comma + 1 : NULL;
	return true;
}

/* Parse "columns=a,b,c" of a write-through trigger into attribute numbers. */
static void
ck_parse_columns(Relation rel, Trigger *tg, int argno, const char *list, CkTriggerConfig *cfg)
{
	TupleDesc	tupdesc = RelationGetDescr(rel);
	const char *p = list;
	const char *start;
	const char *end;

	cfg->columns = palloc(sizeof(AttrNumber) * (tupdesc->natts + 1));
	cfg->ncolumns = 0;
	cfg->columns_listed = true;
	if (*list == '\0')
		ck_bad_argument(rel, tg, argno, ERRCODE_INVALID_PARAMETER_VALUE, "no columns listed");
	while (ck_list_next(&p, &start, &end))
	{
		char	   *name;
		AttrNumber	attnum;

		if (end == start)
			ck_bad_argument(rel, tg, argno, ERRCODE_INVALID_PARAMETER_VALUE, "empty column name");
		name = pnstrdup(start, end - start);
		attnum = ck_column_attnum(tupdesc, name);
		if (attnum == InvalidAttrNumber)
			ck_bad_argument(rel, tg, argno, ERRCODE_UNDEFINED_COLUMN,
							psprintf("column \"%s\" does not exist", name));
		for (int c = 0; c < cfg->ncolumns; c++)
			if (cfg->columns[c] == attnum)
				ck_bad_argument(rel, tg, argno, ERRCODE_DUPLICATE_COLUMN,
								psprintf("column \"%s\" is listed twice", name));
		cfg->columns[cfg->ncolumns++] = attnum;
	}
}

/*
 * Write-through: the row type of the value, the selected columns (all by
 * default) in their order, blessed so that row_to_json can render it.
 */
static void
ck_build_value_desc(Relation rel, CkTriggerConfig *cfg)
{
	TupleDesc	tupdesc = RelationGetDescr(rel);
	TupleDesc	desc;

	if (cfg->columns == NULL)
	{
		cfg->columns = palloc(sizeof(AttrNumber) * (tupdesc->natts + 1));
		for (int a = 0; a < tupdesc->natts; a++)
			if (!TupleDescAttr(tupdesc, a)->attisdropped)
				cfg->columns[cfg->ncolumns++] = a + 1;
	}
	desc = CreateTemplateTupleDesc(cfg->ncolumns);
	for (int c = 0; c < cfg->ncolumns; c++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, cfg->columns[c] - 1);

		TupleDescInitEntry(desc, c + 1, NameStr(att->attname), att->atttypid,
						   att->atttypmod, att->attndims);
		TupleDescInitEntryCollation(desc, c + 1, att->attcollation);
	}
	cfg->value_desc = BlessTupleDesc(desc);
	cfg->json_plan = ck_json_plan(cfg->value_desc);
}

/* Split "name=rest" where name is a lowercase word; NULL if no option. */
static char *
ck_option_name(const char *arg, const char **rest)
{
	const char *p = arg;

	while (*p >= 'a' && *p <= 'z')
		p++;
	if (p == arg || *p != '=')
		return NULL;
	*rest = p + 1;
	return pnstrdup(arg, p - arg);
}

/* The trigger's targets as the queue stores them (built once per trigger). */
static void
ck_config_targets(CkTriggerConfig *cfg)
{
	List	   *names = NIL;
	ListCell   *lc;

	foreach(lc, cfg->target_names)
		names = lappend(names, strVal(lfirst(lc)));
	cfg->targets = ck_targets_array(names);
}

/* Parse a trigger's arguments into a new configuration. */
static void
ck_build_config(Relation rel, Trigger *tg, CkTriggerKind kind, CkTriggerConfig *cfg)
{
	const char *fname = ck_function_name(kind);
	bool		ttl_seen = false;

	cfg->keys = palloc0(sizeof(CkTemplate) * (tg->tgnargs + 1));
	cfg->tags = palloc0(sizeof(CkTemplate) * (tg->tgnargs + 1));
	cfg->nkeys = cfg->ntags = 0;
	cfg->column_arg = -1;
	cfg->ttl = 0;
	cfg->ncolumns = 0;
	cfg->columns = NULL;

	for (int i = 0; i < tg->tgnargs; i++)
	{
		const char *arg = tg->tgargs[i];
		const char *rest = arg;
		char	   *opt = ck_option_name(arg, &rest);

		if (opt == NULL || strcmp(opt, "key") == 0 || strcmp(opt, "tag") == 0)
		{
			CkTemplate *tpl = opt == NULL || strcmp(opt, "key") == 0 ?
			&cfg->keys[cfg->nkeys++] : &cfg->tags[cfg->ntags++];

			ck_parse_template(rel, tg, i, rest, tpl);
			if (tpl->has_columns && cfg->column_arg < 0)
				cfg->column_arg = i;
		}
		else if (strcmp(opt, "target") == 0)
		{
			if (!ck_target_name_valid(rest))
				ck_bad_argument(rel, tg, i, ERRCODE_INVALID_PARAMETER_VALUE,
								"a target name is a lowercase identifier (a-z, 0-9, _)");
			if (!list_member(cfg->target_names, makeString((char *) rest)))
				cfg->target_names = lappend(cfg->target_names, makeString(pstrdup(rest)));
		}
		else if (kind == CK_TRIGGER_WRITE_THROUGH && strcmp(opt, "ttl") == 0)
		{
			char	   *end;
			long		ttl;

			errno = 0;
			ttl = strtol(rest, &end, 10);
			if (ttl_seen)
				ck_bad_argument(rel, tg, i, ERRCODE_INVALID_PARAMETER_VALUE, "ttl is given twice");
			if (*rest == '\0' || *end != '\0' || errno != 0 || ttl < 0 || ttl > INT_MAX)
				ck_bad_argument(rel, tg, i, ERRCODE_INVALID_PARAMETER_VALUE,
								"ttl must be a whole number of seconds, 0 for no expiry");
			cfg->ttl = (int) ttl;
			ttl_seen = true;
		}
		else if (kind == CK_TRIGGER_WRITE_THROUGH && strcmp(opt, "columns") == 0)
		{
			if (cfg->columns)
				ck_bad_argument(rel, tg, i, ERRCODE_INVALID_PARAMETER_VALUE, "columns is given twice");
			ck_parse_columns(rel, tg, i, rest, cfg);
		}
		else
			ck_bad_argument(rel, tg, i, ERRCODE_INVALID_PARAMETER_VALUE,
							psprintf(kind == CK_TRIGGER_INVALIDATE ?
									 "unknown option \"%s=\" (%s takes key=, tag=, target= or a bare key template)" :
									 "unknown option \"%s=\" (%s takes key=, tag=, ttl=, columns= and target=)",
									 opt, fname));
	}

	if (kind == CK_TRIGGER_INVALIDATE && cfg->nkeys + cfg->ntags == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("trigger \"%s\" on table \"%s\" has no key or tag template",
						tg->tgname, RelationGetRelationName(rel)),
				 errhint("Pass templates as arguments, e.g. %s('user:{id}', 'tag=team:{team_id}').", fname)));
	if (kind == CK_TRIGGER_WRITE_THROUGH && cfg->nkeys != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("trigger \"%s\" on table \"%s\" must have exactly one key template, not %d",
						tg->tgname, RelationGetRelationName(rel), cfg->nkeys),
				 errhint("Pass it as key=<template>, e.g. %s('key=product:{sku}', 'ttl=300').", fname)));
	if (kind == CK_TRIGGER_WRITE_THROUGH)
		ck_build_value_desc(rel, cfg);
	ck_config_targets(cfg);
}

/*
 * Check that a trigger fires the way its function supports: when it fires
 * (at creation) or how it fired (at run time).
 */
static void
ck_check_timing(Relation rel, Trigger *tg, CkTriggerKind kind, bool after, bool row, bool truncate)
{
	const char *fname = ck_function_name(kind);

	if (!after)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" on table \"%s\" must be an AFTER trigger",
						tg->tgname, RelationGetRelationName(rel)),
				 errdetail("%s only sees committed row versions from AFTER triggers.", fname)));
	if (kind == CK_TRIGGER_WRITE_THROUGH && truncate)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" on table \"%s\" cannot be fired by TRUNCATE",
						tg->tgname, RelationGetRelationName(rel)),
				 errhint("Use cachekit_invalidate with templates without placeholders for TRUNCATE.")));
	if (kind == CK_TRIGGER_WRITE_THROUGH && !row)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("trigger \"%s\" on table \"%s\" must be FOR EACH ROW",
						tg->tgname, RelationGetRelationName(rel))));
}

/* Check that a statement-level trigger has the transition tables it needs. */
static void
ck_check_transition(Relation rel, Trigger *tg, bool need_old, bool need_new,
					bool has_old, bool has_new)
{
	if ((need_old && !has_old) || (need_new && !has_new))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("statement-level trigger \"%s\" on table \"%s\" needs its transition tables",
						tg->tgname, RelationGetRelationName(rel)),
				 errhint("Declare it with REFERENCING %s FOR EACH STATEMENT, or make it FOR EACH ROW.",
						 need_old && need_new ? "OLD TABLE AS old_rows NEW TABLE AS new_rows" :
						 need_old ? "OLD TABLE AS old_rows" : "NEW TABLE AS new_rows")));
}

/* Check that the function is called as a trigger, fired as it supports. */
static void
ck_check_firing(FunctionCallInfo fcinfo, CkTriggerKind kind)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("%s can only be called as a trigger", ck_function_name(kind))));
	ck_check_timing(td->tg_relation, td->tg_trigger, kind, TRIGGER_FIRED_AFTER(td->tg_event),
					TRIGGER_FIRED_FOR_ROW(td->tg_event), TRIGGER_FIRED_BY_TRUNCATE(td->tg_event));
}

/* The parsed configuration of a trigger of rel, parsing it if needed. */
static CkTriggerConfig *
ck_get_config(Relation rel, Trigger *tg, CkTriggerKind kind)
{
	Oid			tgoid = tg->tgoid;
	CkTriggerConfig *cfg;
	bool		found;
	MemoryContext cxt;
	MemoryContext old;
	CkTriggerConfig tmp;

	if (trigger_configs == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(CkTriggerConfig);
		trigger_configs = hash_create("cachekit triggers", 64, &ctl, HASH_ELEM | HASH_BLOBS);
		CacheRegisterRelcacheCallback(ck_relcache_callback, (Datum) 0);
	}

	cfg = hash_search(trigger_configs, &tgoid, HASH_FIND, NULL);
	if (cfg && cfg->valid)
		return cfg;

	/* parse into a fresh context; an error leaves the table unchanged */
	cxt = AllocSetContextCreate(CacheMemoryContext, "cachekit trigger",
								ALLOCSET_SMALL_SIZES);
	memset(&tmp, 0, sizeof(tmp));
	old = MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		ck_build_config(rel, tg, kind, &tmp);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(old);
		MemoryContextDelete(cxt);
		PG_RE_THROW();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);

	cfg = hash_search(trigger_configs, &tgoid, HASH_ENTER, &found);
	if (found && cfg->cxt)
		MemoryContextDelete(cfg->cxt);
	tmp.tgoid = tgoid;
	tmp.relid = RelationGetRelid(rel);
	tmp.cxt = cxt;
	tmp.valid = true;
	*cfg = tmp;
	return cfg;
}

/* Add s to a list of strings unless it is already there. */
static List *
ck_add_unique(List *list, const char *s)
{
	ListCell   *lc;

	foreach(lc, list)
		if (strcmp((char *) lfirst(lc), s) == 0)
			return list;
	return lappend(list, pstrdup(s));
}

/*
 * Would a template render the same for two row versions? True when every
 * column it uses holds the same bytes (or is NULL) in both: then the
 * output is the same, whichever rows they are.
 */
static bool
ck_template_same(CkTemplate *tpl, TupleTableSlot *a, TupleTableSlot *b)
{
	for (int i = 0; i < tpl->nparts; i++)
	{
		CkTemplatePart *part = &tpl->parts[i];
		Form_pg_attribute att;
		Datum		va,
					vb;
		bool		na,
					nb;

		if (part->column == NULL)
			continue;
		va = slot_getattr(a, part->attnum, &na);
		vb = slot_getattr(b, part->attnum, &nb);
		if (na != nb)
			return false;
		if (na)
			continue;
		att = TupleDescAttr(a->tts_tupleDescriptor, part->attnum - 1);
		if (!datumIsEqual(va, vb, att->attbyval, att->attlen))
			return false;
	}
	return true;
}

/*
 * Render templates for one row version (NULL for TRUNCATE, whose templates
 * are plain text), adding to a list of distinct strings. With "rendered",
 * the other version of an UPDATE already rendered: a template whose
 * columns hold the same values in both is not rendered again.
 */
static List *
ck_render_all(List *list, CkTemplate *tpls, int n, TupleTableSlot *slot,
			  TupleTableSlot *rendered, StringInfo buf)
{
	for (int i = 0; i < n; i++)
	{
		if (rendered && ck_template_same(&tpls[i], rendered, slot))
			continue;
		if (ck_template_render(&tpls[i], slot, buf))
			list = ck_add_unique(list, buf->data);
		/* else a NULL column: no key for this row */
	}
	return list;
}

/* The row versions a row trigger event renders from: NEW, OLD, or both. */
static void
ck_event_slots(TriggerData *td, TupleTableSlot **oldslot, TupleTableSlot **newslot)
{
	*oldslot = NULL;
	*newslot = NULL;
	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
		*newslot = td->tg_trigslot;
	else if (TRIGGER_FIRED_BY_DELETE(td->tg_event))
		*oldslot = td->tg_trigslot;
	else if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		*oldslot = td->tg_trigslot;
		*newslot = td->tg_newslot;
	}
}

/*
 * A set of distinct strings, for a statement's many rows: open addressing
 * on a power-of-two table, so that the 100,000 identical tags of a bulk
 * UPDATE cost one hash probe each and are stored once.
 */
typedef struct CkSetSlot
{
	char	   *str;			/* NULL when empty */
	uint32		hash;
} CkSetSlot;

typedef struct CkStringSet
{
	CkSetSlot  *slots;			/* string and hash side by side */
	uint32		mask;
	int			n;
	bool		distinct;		/* the caller knows its strings are distinct:
								 * slots is a plain array of n, no hashing */
	char	   *arena;			/* where the next string is copied */
	Size		arena_left;
} CkStringSet;

/* strings are copied into blocks of this size, not palloc'd one by one */
#define CK_SET_ARENA_BLOCK 65536

/*
 * An empty set with room for about "expected" strings before it grows;
 * "distinct" when every string added is known to differ from the others.
 */
static void
ck_set_init(CkStringSet *set, int64 expected, bool distinct)
{
	set->distinct = distinct;
	set->n = 0;
	set->arena = NULL;
	set->arena_left = 0;
	set->mask = 1023;
	if (distinct)
	{
		/* a plain array: room for the expected strings, no spare slots */
		while ((int64) set->mask + 1 < expected && set->mask < (1U << 22) - 1)
			set->mask = set->mask * 2 + 1;
		set->slots = palloc_extended(sizeof(CkSetSlot) * (set->mask + 1), MCXT_ALLOC_HUGE);
		return;
	}
	/* a hash table at most half full */
	while ((int64) set->mask + 1 < expected * 2 && set->mask < (1U << 22) - 1)
		set->mask = set->mask * 2 + 1;
	set->slots = palloc_extended(sizeof(CkSetSlot) * (set->mask + 1), MCXT_ALLOC_HUGE | MCXT_ALLOC_ZERO);
}

/* A copy of str[0..len), NUL-terminated, in the set's arena. */
static char *
ck_set_copy(CkStringSet *set, const char *str, int len)
{
	char	   *copy;

	if ((Size) len + 1 > set->arena_left)
	{
		if ((Size) len + 1 > CK_SET_ARENA_BLOCK / 4)
			return pnstrdup(str, len);
		set->arena = palloc(CK_SET_ARENA_BLOCK);
		set->arena_left = CK_SET_ARENA_BLOCK;
	}
	copy = set->arena;
	memcpy(copy, str, len);
	copy[len] = '\0';
	set->arena += len + 1;
	set->arena_left -= len + 1;
	return copy;
}

/* Put a string in its slot (no growth, no duplicate check). */
static void
ck_set_place(CkStringSet *set, char *str, uint32 hash)
{
	uint32		i = hash & set->mask;

	while (set->slots[i].str != NULL)
		i = (i + 1) & set->mask;
	set->slots[i].str = str;
	set->slots[i].hash = hash;
}

/* Add a copy of str[0..len) unless the set has it. */
static void
ck_set_add(CkStringSet *set, const char *str, int len)
{
	uint32		hash;
	uint32		i;

	if (set->distinct)
	{
		if ((uint32) set->n > set->mask)
		{
			set->mask = set->mask * 2 + 1;
			set->slots = repalloc_huge(set->slots, sizeof(CkSetSlot) * (set->mask + 1));
		}
		set->slots[set->n++].str = ck_set_copy(set, str, len);
		return;
	}
	hash = hash_bytes((const unsigned char *) str, len);
	i = hash & set->mask;

	for (; set->slots[i].str != NULL; i = (i + 1) & set->mask)
		if (set->slots[i].hash == hash && strcmp(set->slots[i].str, str) == 0)
			return;

	if ((uint32) (set->n + 1) * 2 > set->mask + 1)
	{
		CkSetSlot  *old_slots = set->slots;
		uint32		old_size = set->mask + 1;

		set->mask = set->mask * 2 + 1;
		set->slots = palloc_extended(sizeof(CkSetSlot) * (set->mask + 1), MCXT_ALLOC_HUGE | MCXT_ALLOC_ZERO);
		for (uint32 k = 0; k < old_size; k++)
			if (old_slots[k].str != NULL)
				ck_set_place(set, old_slots[k].str, old_slots[k].hash);
		pfree(old_slots);
	}
	ck_set_place(set, ck_set_copy(set, str, len), hash);
	set->n++;
}


/*
 * What a statement's rows already rendered, for a template whose one
 * placeholder is a pass-by-value column (an integer id, a team number):
 * a small direct-mapped table of the values seen. A value found there
 * renders a string the set already holds, so it is skipped without
 * printing or hashing a string; the 100,000 rows of a bulk UPDATE that
 * share 100 tag values then cost one lookup each. A miss only costs the
 * lookup.
 */
#define CK_SEEN_SLOTS 1024

typedef struct CkSeen
{
	AttrNumber	attnum;			/* the column, or 0 when not usable */
	bool		used[CK_SEEN_SLOTS];
	Datum		values[CK_SEEN_SLOTS];
} CkSeen;

/* Seen-value tables for n templates (unused for those that do not qualify). */
static CkSeen *
ck_seen_init(CkTemplate *tpls, int n, TupleDesc tupdesc)
{
	CkSeen	   *seen = palloc0(sizeof(CkSeen) * (n > 0 ? n : 1));

	for (int i = 0; i < n; i++)
	{
		CkTemplatePart *column = NULL;
		int			ncolumns = 0;

		for (int p = 0; p < tpls[i].nparts; p++)
			if (tpls[i].parts[p].column != NULL)
			{
				column = &tpls[i].parts[p];
				ncolumns++;
			}
		if (ncolumns == 1 && TupleDescAttr(tupdesc, column->attnum - 1)->attbyval)
			seen[i].attnum = column->attnum;
	}
	return seen;
}

/*
 * Render templates for one row version into a set, skipping those whose
 * value was seen before in this statement: the same datum of a
 * pass-by-value column prints the same string.
 */
static void
ck_render_row(TupleTableSlot *slot, CkTemplate *tpls, CkSeen *seen, int ntpls,
			  CkStringSet *out, StringInfo buf)
{
	for (int i = 0; i < ntpls; i++)
	{
		if (seen[i].attnum != InvalidAttrNumber)
		{
			bool		isnull;
			Datum		value = slot_getattr(slot, seen[i].attnum, &isnull);
			uint32		slotno;

			if (isnull)
				continue;		/* a NULL column: no key for this row */
			slotno = murmurhash32((uint32) value ^ (uint32) ((uint64) value >> 32)) &
				(CK_SEEN_SLOTS - 1);
			if (seen[i].used[slotno] && seen[i].values[slotno] == value)
				continue;
			seen[i].used[slotno] = true;
			seen[i].values[slotno] = value;
		}
		if (ck_template_render(&tpls[i], slot, buf))
			ck_set_add(out, buf->data, buf->len);
	}
}

/*
 * Render the templates for every row of one or two transition tables into
 * sets. With two (an UPDATE), rows are taken side by side and a template
 * whose columns hold the same values in both is rendered once: the common
 * bulk UPDATE of other columns then renders each key once, not twice. This
 * needs no pairing of old and new rows to be right: equal values render
 * equal strings, whichever rows they come from.
 */
static void
ck_render_tables(Tuplestorestate *oldtable, Tuplestorestate *newtable, TupleDesc tupdesc,
				 CkTriggerConfig *cfg, CkStringSet *keys, CkStringSet *tags, StringInfo buf)
{
	TupleTableSlot *oldslot = MakeSingleTupleTableSlot(tupdesc, &TTSOpsMinimalTuple);
	TupleTableSlot *newslot = MakeSingleTupleTableSlot(tupdesc, &TTSOpsMinimalTuple);
	CkSeen	   *seen_keys = ck_seen_init(cfg->keys, cfg->nkeys, tupdesc);
	CkSeen	   *seen_tags = ck_seen_init(cfg->tags, cfg->ntags, tupdesc);

	if (oldtable)
		tuplestore_rescan(oldtable);
	if (newtable)
		tuplestore_rescan(newtable);
	for (;;)
	{
		bool		has_old = oldtable && tuplestore_gettupleslot(oldtable, true, false, oldslot);
		bool		has_new = newtable && tuplestore_gettupleslot(newtable, true, false, newslot);

		if (!has_old && !has_new)
			break;
		if (has_old)
		{
			ck_render_row(oldslot, cfg->keys, seen_keys, cfg->nkeys, keys, buf);
			ck_render_row(oldslot, cfg->tags, seen_tags, cfg->ntags, tags, buf);
		}
		if (!has_new)
			continue;
		for (int i = 0; i < cfg->nkeys; i++)
			if (!has_old || !ck_template_same(&cfg->keys[i], oldslot, newslot))
				ck_render_row(newslot, &cfg->keys[i], &seen_keys[i], 1, keys, buf);
		for (int i = 0; i < cfg->ntags; i++)
			if (!has_old || !ck_template_same(&cfg->tags[i], oldslot, newslot))
				ck_render_row(newslot, &cfg->tags[i], &seen_tags[i], 1, tags, buf);
	}
	ExecDropSingleTupleTableSlot(oldslot);
	ExecDropSingleTupleTableSlot(newslot);
	pfree(seen_keys);
	pfree(seen_tags);
}

/*
 * Can an UPDATE's new rows be left unread? Only when they render exactly
 * what the old rows do: no column any template uses was assigned by the
 * statement (tg_updatedcols, which includes generated columns computed
 * from assigned ones), and nothing else can change a new row behind the
 * statement's back: no BEFORE ROW UPDATE trigger on the table, no
 * partitions or inheritance children, whose own triggers would not show
 * here, and no other UPDATE of the table in the same query.
 */
static bool
ck_new_rows_same(TriggerData *td, CkTriggerConfig *cfg)
{
	Relation	rel = td->tg_relation;

	if (!TRIGGER_FIRED_BY_UPDATE(td->tg_event) || td->tg_updatedcols == NULL)
		return false;
	/*
	 * Several UPDATEs of the table in one query (data-modifying WITH) share
	 * one pair of transition tables, but tg_updatedcols describes only the
	 * UPDATE that fired the trigger.
	 */
	if (ck_query_has_modifying_cte())
		return false;
	if (rel->rd_rel->relhassubclass || rel->rd_rel->relkind != RELKIND_RELATION)
		return false;
	if (rel->trigdesc != NULL && rel->trigdesc->trig_update_before_row)
		return false;
	for (int t = 0; t < cfg->nkeys + cfg->ntags; t++)
	{
		CkTemplate *tpl = t < cfg->nkeys ? &cfg->keys[t] : &cfg->tags[t - cfg->nkeys];

		for (int i = 0; i < tpl->nparts; i++)
			if (tpl->parts[i].column != NULL &&
				bms_is_member(tpl->parts[i].attnum - FirstLowInvalidHeapAttributeNumber,
							  td->tg_updatedcols))
				return false;
	}
	return true;
}

/*
 * Does the one key template render a different string for every row of
 * one transition table? It does when its only placeholder is a column of
 * an integer or text type under a valid, immediately checked unique index
 * on that column alone (a primary key, typically): the rows of one table
 * hold distinct values there (or NULL, which renders no key), and those
 * types print distinct values differently. The statement's keys then need
 * no duplicate check.
 */
static bool
ck_keys_distinct(Relation rel, CkTriggerConfig *cfg)
{
	CkTemplatePart *column = NULL;
	List	   *indexes;
	ListCell   *lc;
	bool		found = false;

	if (cfg->nkeys != 1)
		return false;
	for (int i = 0; i < cfg->keys[0].nparts; i++)
		if (cfg->keys[0].parts[i].column != NULL)
		{
			if (column != NULL)
				return false;
			column = &cfg->keys[0].parts[i];
		}
	if (column == NULL ||
		(column->format != CK_FORMAT_INT2 && column->format != CK_FORMAT_INT4 &&
		 column->format != CK_FORMAT_INT8 && column->format != CK_FORMAT_TEXT))
		return false;

	indexes = RelationGetIndexList(rel);
	foreach(lc, indexes)
	{
		HeapTuple	tuple = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(lfirst_oid(lc)));
		Form_pg_index index;

		if (!HeapTupleIsValid(tuple))
			continue;
		index = (Form_pg_index) GETSTRUCT(tuple);
		found = index->indisunique && index->indimmediate && index->indisvalid &&
			index->indnkeyatts == 1 && index->indkey.values[0] == column->attnum &&
			heap_attisnull(tuple, Anum_pg_index_indexprs, NULL) &&
			heap_attisnull(tuple, Anum_pg_index_indpred, NULL);
		ReleaseSysCache(tuple);
		if (found)
			break;
	}
	list_free(indexes);
	return found;
}

/* Move the strings of a set into a List, in no particular order. */
static List *
ck_set_list(CkStringSet *set)
{
	List	   *list = NIL;

	if (set->distinct)
	{
		for (int i = 0; i < set->n; i++)
			list = lappend(list, set->slots[i].str);
		return list;
	}
	for (uint32 i = 0; i <= set->mask; i++)
		if (set->slots[i].str != NULL)
			list = lappend(list, set->slots[i].str);
	return list;
}

/*
 * A statement-level trigger's queue entries: at most this many keys plus
 * tags, and at most this many bytes of them as array elements, so that an
 * entry fits in one heap page (the queue's toast_tuple_target) rather than
 * going out of line to the toast table.
 */
#define CK_STATEMENT_CHUNK 1000
#define CK_STATEMENT_CHUNK_BYTES 7168

/*
 * Statement-level invalidation from the transition tables: every key and
 * tag of the statement, each once, in queue entries of bounded size.
 */
static void
ck_invalidate_statement(TriggerData *td, CkTriggerConfig *cfg, CkSink *sink)
{
	TupleDesc	tupdesc = RelationGetDescr(td->tg_relation);
	bool		need_old = !TRIGGER_FIRED_BY_INSERT(td->tg_event);
	bool		need_new = !TRIGGER_FIRED_BY_DELETE(td->tg_event);
	CkStringSet keys;
	CkStringSet tags;
	StringInfoData buf;
	List	   *keylist;
	List	   *taglist;
	ListCell   *k;
	ListCell   *t;
	MemoryContext chunk_cxt;
	MemoryContext old_cxt;

	ck_check_transition(td->tg_relation, td->tg_trigger, need_old, need_new,
						td->tg_oldtable != NULL, td->tg_newtable != NULL);

	if (need_old && need_new && ck_new_rows_same(td, cfg))
		need_new = false;
	/* a bulk UPDATE's keys are mostly distinct: one per row and template */
	ck_set_init(&keys, cfg->nkeys * tuplestore_tuple_count(need_old ? td->tg_oldtable : td->tg_newtable),
				!(need_old && need_new) && ck_keys_distinct(td->tg_relation, cfg));
	ck_set_init(&tags, 0, false);
	initStringInfo(&buf);
	ck_render_tables(need_old ? td->tg_oldtable : NULL, need_new ? td->tg_newtable : NULL,
					 tupdesc, cfg, &keys, &tags, &buf);
	keylist = ck_set_list(&keys);
	taglist = ck_set_list(&tags);

	/* each entry is built in memory used again for the next one */
	chunk_cxt = AllocSetContextCreate(CurrentMemoryContext, "cachekit statement entry",
									  ALLOCSET_DEFAULT_SIZES);
	old_cxt = MemoryContextSwitchTo(chunk_cxt);
	k = list_head(keylist);
	t = list_head(taglist);
	while (k != NULL || t != NULL)
	{
		List	   *chunk_keys = NIL;
		List	   *chunk_tags = NIL;
		int			room = CK_STATEMENT_CHUNK;
		Size		bytes = 0;

		/* always at least one string, however long */
		for (; k != NULL && room > 0; k = lnext(keylist, k), room--)
		{
			bytes += INTALIGN(VARHDRSZ + strlen(lfirst(k)));
			if (bytes > CK_STATEMENT_CHUNK_BYTES && chunk_keys != NIL)
				break;
			chunk_keys = lappend(chunk_keys, lfirst(k));
		}
		for (; t != NULL && room > 0; t = lnext(taglist, t), room--)
		{
			bytes += INTALIGN(VARHDRSZ + strlen(lfirst(t)));
			if (bytes > CK_STATEMENT_CHUNK_BYTES && (chunk_keys != NIL || chunk_tags != NIL))
				break;
			chunk_tags = lappend(chunk_tags, lfirst(t));
		}
		sink->emit(sink->arg, CK_KIND_INVALIDATE, chunk_keys, chunk_tags, NIL, NULL, 0);
		MemoryContextReset(chunk_cxt);
	}
	MemoryContextSwitchTo(old_cxt);
	MemoryContextDelete(chunk_cxt);
}

/* A sink that enqueues, in the schema and for the targets of *(CkQueueArg *) arg. */
static void
ck_emit_queue(void *arg, char kind, List *keys, List *tags, List *untags,
			  const char *value, int ttl)
{
	CkQueueArg *q = arg;

	ck_enqueue(q->nspid, kind, keys, tags, untags, value, ttl, q->targets);
}

/*
 * A row-level invalidation (or a TRUNCATE, with both versions NULL): the
 * keys and tags of the old and new row versions, each once, in one entry.
 */
static void
ck_invalidate_row(CkTriggerConfig *cfg, TupleTableSlot *oldslot,
				  TupleTableSlot *newslot, CkSink *sink)
{
	List	   *keys = NIL;
	List	   *tags = NIL;
	StringInfoData buf;

	initStringInfo(&buf);
	if (oldslot || newslot == NULL)
	{
		keys = ck_render_all(keys, cfg->keys, cfg->nkeys, oldslot, NULL, &buf);
		tags = ck_render_all(tags, cfg->tags, cfg->ntags, oldslot, NULL, &buf);
	}
	if (newslot)
	{
		keys = ck_render_all(keys, cfg->keys, cfg->nkeys, newslot, oldslot, &buf);
		tags = ck_render_all(tags, cfg->tags, cfg->ntags, newslot, oldslot, &buf);
	}
	if (keys != NIL || tags != NIL)
		sink->emit(sink->arg, CK_KIND_INVALIDATE, keys, tags, NIL, NULL, 0);
}

/*
 * The start of a firing: the checks, the parsed configuration, and a sink
 * that enqueues in the extension's schema, for the trigger's targets (in
 * the caller's *qarg).
 */
static CkTriggerConfig *
ck_fire_start(FunctionCallInfo fcinfo, CkTriggerKind kind, CkQueueArg *qarg, CkSink *sink)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	CkTriggerConfig *cfg;

	ck_check_firing(fcinfo, kind);
	qarg->nspid = ck_extension_schema(fcinfo->flinfo);
	cfg = ck_get_config(td->tg_relation, td->tg_trigger, kind);
	qarg->targets = cfg->targets;
	sink->emit = ck_emit_queue;
	sink->arg = qarg;
	return cfg;
}

/*
 * cachekit_invalidate(templates...): trigger that deletes the rendered keys
 * and flushes the rendered tags once the transaction commits. AFTER INSERT
 * OR UPDATE OR DELETE, FOR EACH ROW or FOR EACH STATEMENT with transition
 * tables; or AFTER TRUNCATE with templates without placeholders.
 */
Datum
cachekit_invalidate(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	CkTriggerConfig *cfg;
	TupleTableSlot *oldslot;
	TupleTableSlot *newslot;
	CkQueueArg	qarg;
	CkSink		sink;

	cfg = ck_fire_start(fcinfo, CK_TRIGGER_INVALIDATE, &qarg, &sink);

	/*
	 * The configuration does not depend on the event that parsed it: a
	 * trigger on INSERT OR TRUNCATE may have been parsed for an INSERT, and
	 * a TRUNCATE has no row for its placeholders. Creating such a trigger
	 * is refused; this catches those created before that check.
	 */
	if (TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
	{
		if (cfg->column_arg >= 0)
			ck_truncate_placeholders(td->tg_relation, td->tg_trigger, cfg->column_arg);
		ck_invalidate_row(cfg, NULL, NULL, &sink);
		return PointerGetDatum(NULL);
	}
	if (!TRIGGER_FIRED_FOR_ROW(td->tg_event))
	{
		ck_invalidate_statement(td, cfg, &sink);
		return PointerGetDatum(NULL);
	}
	ck_event_slots(td, &oldslot, &newslot);
	ck_invalidate_row(cfg, oldslot, newslot, &sink);
	return PointerGetDatum(NULL);
}

/* The selected columns of a row version as JSON text. */
static char *
ck_row_json(CkTriggerConfig *cfg, TupleTableSlot *slot)
{
	Datum	   *values;
	bool	   *nulls;
	HeapTuple	row;
	Datum		json;

	if (cfg->json_plan)
		return ck_json_render(cfg->json_plan, slot, cfg->columns);
	values = palloc(sizeof(Datum) * (cfg->ncolumns + 1));
	nulls = palloc(sizeof(bool) * (cfg->ncolumns + 1));
	for (int c = 0; c < cfg->ncolumns; c++)
		values[c] = slot_getattr(slot, cfg->columns[c], &nulls[c]);
	row = heap_form_tuple(cfg->value_desc, values, nulls);
	json = DirectFunctionCall1(row_to_json, HeapTupleGetDatum(row));
	return text_to_cstring(DatumGetTextPP(json));
}

/* Tags in list "a" that are not in list "b". */
static List *
ck_list_minus(List *a, List *b)
{
	List	   *result = NIL;
	ListCell   *lc;

	foreach(lc, a)
	{
		ListCell   *lc2;
		bool		found = false;

		foreach(lc2, b)
			if (strcmp((char *) lfirst(lc), (char *) lfirst(lc2)) == 0)
				found = true;
		if (!found)
			result = lappend(result, lfirst(lc));
	}
	return result;
}

/*
 * A write-through row change: the old key dropped when the row is deleted
 * or its key changed, the new row written to its key.
 */
static void
ck_write_through_row(CkTriggerConfig *cfg, TupleTableSlot *oldslot,
					 TupleTableSlot *newslot, CkSink *sink)
{
	StringInfoData buf;
	char	   *oldkey = NULL;
	char	   *newkey = NULL;
	List	   *oldtags = NIL;
	List	   *newtags = NIL;

	initStringInfo(&buf);
	if (oldslot)
	{
		if (ck_template_render(&cfg->keys[0], oldslot, &buf))
			oldkey = pstrdup(buf.data);
		oldtags = ck_render_all(NIL, cfg->tags, cfg->ntags, oldslot, NULL, &buf);
	}
	if (newslot)
	{
		if (ck_template_render(&cfg->keys[0], newslot, &buf))
			newkey = pstrdup(buf.data);
		newtags = ck_render_all(NIL, cfg->tags, cfg->ntags, newslot, NULL, &buf);
	}

	/* the old key goes when the row is deleted or its key changed */
	if (oldkey && (newkey == NULL || strcmp(oldkey, newkey) != 0))
		sink->emit(sink->arg, CK_KIND_DROP, list_make1(oldkey), NIL, oldtags, NULL, 0);

	if (newkey)
	{
		char	   *value = ck_row_json(cfg, newslot);
		List	   *leaving = NIL;

		/* the same key leaves the sets of tags it no longer has */
		if (oldkey && strcmp(oldkey, newkey) == 0)
			leaving = ck_list_minus(oldtags, newtags);

		if (strlen(value) > (size_t) ck_max_value_bytes)
		{
			/*
			 * Too large to cache: make sure no stale value stays. The ttl
			 * of -1 tells the worker to count it once delivered.
			 */
			sink->emit(sink->arg, CK_KIND_DROP, list_make1(newkey), NIL,
					   list_concat(leaving, newtags), NULL, CK_TTL_TOO_LARGE);
		}
		else
			sink->emit(sink->arg, CK_KIND_WRITE, list_make1(newkey), newtags, leaving,
					   value, cfg->ttl);
	}
}

/*
 * cachekit_write_through(key=..., ttl=..., columns=..., tag=...): AFTER
 * INSERT OR UPDATE OR DELETE FOR EACH ROW trigger that writes the row as
 * JSON to its key (and lists the key in its tags' sets), or deletes it.
 */
Datum
cachekit_write_through(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	CkTriggerConfig *cfg;
	TupleTableSlot *oldslot;
	TupleTableSlot *newslot;
	CkQueueArg	qarg;
	CkSink		sink;

	cfg = ck_fire_start(fcinfo, CK_TRIGGER_WRITE_THROUGH, &qarg, &sink);
	ck_event_slots(td, &oldslot, &newslot);
	ck_write_through_row(cfg, oldslot, newslot, &sink);
	return PointerGetDatum(NULL);
}

/*
 * What a cachekit trigger of rel renders for one row change (both versions
 * NULL for a TRUNCATE), through the code its firing uses, into a sink:
 * cachekit_preview's. A statement-level trigger renders one row the way
 * its statement renders each.
 */
void
ck_trigger_render_change(Relation rel, Trigger *tg, CkTriggerKind kind,
						 TupleTableSlot *oldslot, TupleTableSlot *newslot, CkSink *sink)
{
	CkTriggerConfig *cfg = ck_get_config(rel, tg, kind);

	if (oldslot == NULL && newslot == NULL && cfg->column_arg >= 0)
		ck_truncate_placeholders(rel, tg, cfg->column_arg);
	if (kind == CK_TRIGGER_WRITE_THROUGH)
		ck_write_through_row(cfg, oldslot, newslot, sink);
	else
		ck_invalidate_row(cfg, oldslot, newslot, sink);
}

/*
 * Check a new cachekit trigger: how it fires, and its arguments against its
 * table, with the errors its first row would raise. Returns the attribute
 * numbers of the columns its arguments name (in the current memory
 * context).
 */
Bitmapset *
ck_trigger_validate(Relation rel, Trigger *tg, CkTriggerKind kind)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "cachekit check",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	CkTriggerConfig cfg;
	List	   *attnums = NIL;
	Bitmapset  *columns = NULL;
	ListCell   *lc;

	ck_check_timing(rel, tg, kind, TRIGGER_FOR_AFTER(tg->tgtype), TRIGGER_FOR_ROW(tg->tgtype),
					TRIGGER_FOR_TRUNCATE(tg->tgtype));
	if (!TRIGGER_FOR_ROW(tg->tgtype))
		ck_check_transition(rel, tg, TRIGGER_FOR_UPDATE(tg->tgtype) || TRIGGER_FOR_DELETE(tg->tgtype),
							TRIGGER_FOR_UPDATE(tg->tgtype) || TRIGGER_FOR_INSERT(tg->tgtype),
							tg->tgoldtable != NULL, tg->tgnewtable != NULL);
	memset(&cfg, 0, sizeof(cfg));
	ck_build_config(rel, tg, kind, &cfg);
	/* a target not configured now: a warning (its entries wait for it) */
	foreach(lc, cfg.target_names)
		ck_target_check_name(strVal(lfirst(lc)),
							 psprintf("trigger \"%s\" on table \"%s\"", tg->tgname,
									  RelationGetRelationName(rel)));
	if (TRIGGER_FOR_TRUNCATE(tg->tgtype) && cfg.column_arg >= 0)
		ck_truncate_placeholders(rel, tg, cfg.column_arg);
	for (int t = 0; t < cfg.nkeys + cfg.ntags; t++)
	{
		CkTemplate *tpl = t < cfg.nkeys ? &cfg.keys[t] : &cfg.tags[t - cfg.nkeys];

		for (int i = 0; i < tpl->nparts; i++)
			if (tpl->parts[i].column != NULL)
				attnums = lappend_int(attnums, tpl->parts[i].attnum);
	}
	/* an explicit columns= list; without one the value follows the table */
	for (int c = 0; c < cfg.ncolumns && cfg.columns_listed; c++)
		attnums = lappend_int(attnums, cfg.columns[c]);
	MemoryContextSwitchTo(old);
	foreach(lc, attnums)
		columns = bms_add_member(columns, lfirst_int(lc));
	MemoryContextDelete(cxt);
	return columns;
}

/* Is probin (a C function's library) cachekit's? */
static bool
ck_is_our_library(const char *probin)
{
	const char *base = strrchr(probin, '/');

	base = base ? base + 1 : probin;
	return strcmp(base, "cachekit") == 0 || strcmp(base, "cachekit" DLSUFFIX) == 0;
}

/* Which cachekit trigger function, if any, funcoid is. */
CkTriggerKind
ck_trigger_kind(Oid funcoid)
{
	HeapTuple	tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(funcoid));
	CkTriggerKind kind = CK_TRIGGER_NONE;
	bool		isnull;
	Datum		probin;
	char	   *prosrc;

	if (!HeapTupleIsValid(tuple))
		return CK_TRIGGER_NONE;
	probin = SysCacheGetAttr(PROCOID, tuple, Anum_pg_proc_probin, &isnull);
	if (((Form_pg_proc) GETSTRUCT(tuple))->prolang == ClanguageId && !isnull &&
		ck_is_our_library(TextDatumGetCString(probin)))
	{
		prosrc = TextDatumGetCString(SysCacheGetAttr(PROCOID, tuple, Anum_pg_proc_prosrc, &isnull));
		if (strcmp(prosrc, "cachekit_invalidate") == 0)
			kind = CK_TRIGGER_INVALIDATE;
		else if (strcmp(prosrc, "cachekit_write_through") == 0)
			kind = CK_TRIGGER_WRITE_THROUGH;
	}
	ReleaseSysCache(tuple);
	return kind;
}

/* Refuse a column rename the trigger's arguments cannot express. */
static void
ck_rename_refused(Relation rel, Trigger *tg, int argno, const char *newname, const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("cannot rename a column used by trigger \"%s\" on table \"%s\" to \"%s\"",
					tg->tgname, RelationGetRelationName(rel), newname),
			 errdetail("Argument %d of the trigger (\"%s\") names the column, and %s.",
					   argno + 1, tg->tgargs[argno], why),
			 errhint("Choose another name, or drop the trigger, rename the column and create the trigger again.")));
}

/* "columns=a,b" with oldname written newname; NULL when it is not listed. */
static char *
ck_columns_rename(const char *list, const char *oldname, const char *newname)
{
	StringInfoData out;
	const char *p = list;
	const char *start;
	const char *end;
	bool		changed = false;

	initStringInfo(&out);
	appendStringInfoString(&out, "columns=");
	while (ck_list_next(&p, &start, &end))
	{
		if ((size_t) (end - start) == strlen(oldname) && strncmp(start, oldname, end - start) == 0)
		{
			appendStringInfoString(&out, newname);
			changed = true;
		}
		else
			appendBinaryStringInfo(&out, start, end - start);
		if (p != NULL)
			appendStringInfoChar(&out, ',');
	}
	return changed ? out.data : NULL;
}

/*
 * Argument argno of a cachekit trigger of rel after its column oldname was
 * renamed newname: the new text, or NULL when it does not name the column.
 * A name the argument cannot hold is refused with an error.
 */
char *
ck_trigger_arg_rename(Relation rel, Trigger *tg, CkTriggerKind kind, int argno,
					  const char *oldname, const char *newname)
{
	const char *arg = tg->tgargs[argno];
	const char *rest = arg;
	char	   *opt = ck_option_name(arg, &rest);
	char	   *renamed;

	if (opt == NULL || strcmp(opt, "key") == 0 || strcmp(opt, "tag") == 0)
	{
		renamed = ck_template_rename(rest, oldname, newname);
		if (renamed && strpbrk(newname, "{}") != NULL)
			ck_rename_refused(rel, tg, argno, newname, "a placeholder cannot hold a brace");
		return renamed ? psprintf("%.*s%s", (int) (rest - arg), arg, renamed) : NULL;
	}
	if (kind == CK_TRIGGER_WRITE_THROUGH && strcmp(opt, "columns") == 0)
	{
		renamed = ck_columns_rename(rest, oldname, newname);
		if (renamed && (strchr(newname, ',') != NULL || newname[0] == ' ' ||
						newname[strlen(newname) - 1] == ' '))
			ck_rename_refused(rel, tg, argno, newname,
							  "a columns= list cannot hold a comma or a leading or trailing space in a name");
		return renamed;
	}
	return NULL;
}

/*
 * The columns that a cachekit trigger's arguments name and that exist in
 * rel, with no check and no error: pg_upgrade recreates whatever triggers
 * the old cluster held, and records their dependencies through this.
 */
Bitmapset *
ck_trigger_named_columns(Relation rel, Trigger *tg, CkTriggerKind kind)
{
	TupleDesc	tupdesc = RelationGetDescr(rel);
	Bitmapset  *columns = NULL;

	for (int i = 0; i < tg->tgnargs; i++)
	{
		const char *rest = tg->tgargs[i];
		char	   *opt = ck_option_name(tg->tgargs[i], &rest);
		const char *start;
		const char *end;
		CkTemplate	tpl;

		if ((opt == NULL || strcmp(opt, "key") == 0 || strcmp(opt, "tag") == 0) &&
			ck_template_parse(rest, &tpl) == NULL)
		{
			for (int p = 0; p < tpl.nparts; p++)
				if (tpl.parts[p].column != NULL)
					columns = bms_add_member(columns, ck_column_attnum(tupdesc, tpl.parts[p].column));
		}
		else if (kind == CK_TRIGGER_WRITE_THROUGH && opt != NULL && strcmp(opt, "columns") == 0)
		{
			while (ck_list_next(&rest, &start, &end))
				columns = bms_add_member(columns,
										 ck_column_attnum(tupdesc, pnstrdup(start, end - start)));
		}
	}
	/* InvalidAttrNumber (0) stands for the names that are not columns */
	return bms_del_member(columns, InvalidAttrNumber);
}
