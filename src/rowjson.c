/*-------------------------------------------------------------------------
 *
 * rowjson.c
 *	  A write-through value: a row's selected columns as JSON text.
 *
 * row_to_json looks up each column's type category and output function
 * in the catalog caches for every row it renders. A write-through trigger
 * renders the same columns row after row, so when every column is of a
 * built-in type whose JSON form is known (numbers, booleans, dates and
 * timestamps, text, uuid, json and jsonb) the trigger plans the rendering
 * once: each column's "name": prefix already escaped, its category, its
 * output function looked up. The text is the one row_to_json gives, byte
 * for byte; a column of any other type (a domain, an array, a composite,
 * an enum, an extension's type, which row_to_json may render through a
 * cast to json) leaves the whole row to row_to_json.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "catalog/pg_type.h"
#include "common/jsonapi.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/lsyscache.h"

/* how one column renders */
typedef enum CkJsonKind
{
	CK_JSON_BOOL,				/* true / false */
	CK_JSON_NUMBER,				/* output text, quoted unless a JSON number */
	CK_JSON_DATETIME,			/* ISO 8601, quoted */
	CK_JSON_RAW,				/* json, jsonb: output text as it is */
	CK_JSON_STRING				/* output text, escaped and quoted */
} CkJsonKind;

typedef struct CkJsonColumn
{
	char	   *prefix;			/* '{' or ',' then the escaped name and ':' */
	CkJsonKind	kind;
	Oid			typid;
	FmgrInfo	out;			/* output function (not for bool, datetime) */
} CkJsonColumn;

struct CkJsonPlan
{
	int			ncolumns;
	CkJsonColumn columns[FLEXIBLE_ARRAY_MEMBER];
};

/* How a built-in type renders; false for a type left to row_to_json. */
static bool
ck_json_kind(Oid typid, CkJsonKind *kind)
{
	switch (typid)
	{
		case BOOLOID:
			*kind = CK_JSON_BOOL;
			return true;
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case FLOAT4OID:
		case FLOAT8OID:
		case NUMERICOID:
			*kind = CK_JSON_NUMBER;
			return true;
		case DATEOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
			*kind = CK_JSON_DATETIME;
			return true;
		case JSONOID:
		case JSONBOID:
			*kind = CK_JSON_RAW;
			return true;
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
		case UUIDOID:
			*kind = CK_JSON_STRING;
			return true;
		default:
			return false;
	}
}

/*
 * The rendering of rows of desc (a value's row type), in the current
 * memory context; NULL when a column needs row_to_json.
 */
CkJsonPlan *
ck_json_plan(TupleDesc desc)
{
	CkJsonPlan *plan = palloc0(offsetof(CkJsonPlan, columns) +
							   sizeof(CkJsonColumn) * Max(desc->natts, 1));

	for (int a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		CkJsonColumn *col = &plan->columns[a];
		StringInfoData prefix;

		if (!ck_json_kind(att->atttypid, &col->kind))
		{
			pfree(plan);
			return NULL;
		}
		col->typid = att->atttypid;
		if (col->kind != CK_JSON_BOOL && col->kind != CK_JSON_DATETIME)
		{
			Oid			outfunc;
			bool		varlena;

			getTypeOutputInfo(att->atttypid, &outfunc, &varlena);
			fmgr_info_cxt(outfunc, &col->out, CurrentMemoryContext);
		}
		initStringInfo(&prefix);
		appendStringInfoChar(&prefix, a == 0 ? '{' : ',');
		escape_json(&prefix, NameStr(att->attname));
		appendStringInfoChar(&prefix, ':');
		col->prefix = prefix.data;
	}
	plan->ncolumns = desc->natts;
	return plan;
}

/* Append one non-null column value as JSON. */
static void
ck_json_value(CkJsonColumn *col, Datum value, StringInfo out)
{
	char	   *text;

	switch (col->kind)
	{
		case CK_JSON_BOOL:
			appendStringInfoString(out, DatumGetBool(value) ? "true" : "false");
			return;
		case CK_JSON_DATETIME:
			{
				char		buf[MAXDATELEN + 1];

				JsonEncodeDateTime(buf, value, col->typid, NULL);
				appendStringInfoChar(out, '"');
				appendStringInfoString(out, buf);
				appendStringInfoChar(out, '"');
				return;
			}
		default:
			break;
	}
	text = OutputFunctionCall(&col->out, value);
	if (col->kind == CK_JSON_RAW ||
		(col->kind == CK_JSON_NUMBER && IsValidJsonNumber(text, strlen(text))))
		appendStringInfoString(out, text);
	else
		escape_json(out, text);
	pfree(text);
}

/*
 * The columns (attribute numbers of slot's row, one per column of the
 * plan's row type) of a row version as JSON text, as row_to_json gives it.
 */
char *
ck_json_render(CkJsonPlan *plan, TupleTableSlot *slot, const AttrNumber *columns)
{
	StringInfoData out;

	initStringInfo(&out);
	if (plan->ncolumns == 0)
		appendStringInfoChar(&out, '{');
	for (int c = 0; c < plan->ncolumns; c++)
	{
		CkJsonColumn *col = &plan->columns[c];
		bool		isnull;
		Datum		value = slot_getattr(slot, columns[c], &isnull);

		appendStringInfoString(&out, col->prefix);
		if (isnull)
			appendStringInfoString(&out, "null");
		else
			ck_json_value(col, value, &out);
	}
	appendStringInfoChar(&out, '}');
	return out.data;
}
