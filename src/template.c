/*-------------------------------------------------------------------------
 *
 * template.c
 *	  Key and tag templates: "user:{id}" parsed once, rendered per row.
 *
 * A template is literal text with {column} placeholders; "{{" and "}}"
 * stand for literal braces. Parsing and binding report problems as
 * messages so that the caller can name its trigger and argument; rendering
 * is pure and never touches anything but the row it is given.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/htup_details.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"

/* Append one part to the template being built. */
static void
add_part(CkTemplate *tpl, int *cap, char *literal, char *column)
{
	CkTemplatePart *part;

	if (tpl->nparts == *cap)
	{
		*cap *= 2;
		tpl->parts = repalloc(tpl->parts, sizeof(CkTemplatePart) * *cap);
	}
	part = &tpl->parts[tpl->nparts++];
	memset(part, 0, sizeof(CkTemplatePart));
	part->literal = literal;
	part->column = column;
	if (column)
		tpl->has_columns = true;
}

/*
 * Parse source into tpl (allocated in the current memory context).
 * Returns NULL on success, or a message saying what is wrong.
 */
char *
ck_template_parse(const char *source, CkTemplate *tpl)
{
	StringInfoData lit;
	int			cap = 4;
	const char *p = source;

	memset(tpl, 0, sizeof(CkTemplate));
	tpl->source = pstrdup(source);
	tpl->parts = palloc(sizeof(CkTemplatePart) * cap);

	if (*source == '\0')
		return pstrdup("the template is empty");

	initStringInfo(&lit);
	while (*p)
	{
		if (p[0] == '{' && p[1] == '{')
		{
			appendStringInfoChar(&lit, '{');
			p += 2;
		}
		else if (p[0] == '}' && p[1] == '}')
		{
			appendStringInfoChar(&lit, '}');
			p += 2;
		}
		else if (p[0] == '}')
			return psprintf("unbalanced \"}\" at offset %d (write \"}}\" for a literal brace)",
							(int) (p - source));
		else if (p[0] == '{')
		{
			const char *start = p + 1;
			const char *end = start;

			while (*end && *end != '}' && *end != '{')
				end++;
			if (*end != '}')
				return psprintf("unbalanced \"{\" at offset %d (write \"{{\" for a literal brace)",
								(int) (p - source));
			if (end == start)
				return psprintf("empty placeholder \"{}\" at offset %d",
								(int) (p - source));
			if (lit.len > 0)
			{
				add_part(tpl, &cap, pstrdup(lit.data), NULL);
				resetStringInfo(&lit);
			}
			add_part(tpl, &cap, NULL, pnstrdup(start, end - start));
			p = end + 1;
		}
		else
			appendStringInfoChar(&lit, *p++);
	}
	if (lit.len > 0)
		add_part(tpl, &cap, pstrdup(lit.data), NULL);
	pfree(lit.data);
	return NULL;
}

/*
 * The common column types print the same as their output function would
 * without a function call and a palloc per row: integers through
 * pg_ltoa/pg_lltoa (what int2out, int4out and int8out use), and text,
 * varchar and char as their bytes (what textout, varcharout and bpcharout
 * return). Domains over them have the same output function, so the same
 * format.
 */
static char
ck_format_for(Oid outfunc)
{
	switch (outfunc)
	{
		case F_INT2OUT:
			return CK_FORMAT_INT2;
		case F_INT4OUT:
			return CK_FORMAT_INT4;
		case F_INT8OUT:
			return CK_FORMAT_INT8;
		case F_TEXTOUT:
		case F_VARCHAROUT:
		case F_BPCHAROUT:
			return CK_FORMAT_TEXT;
		default:
			return CK_FORMAT_OUTFUNC;
	}
}

/* Append one non-NULL column value, printed as its type prints it. */
static void
ck_append_value(CkTemplatePart *part, Datum value, StringInfo out)
{
	char	   *printed;

	switch (part->format)
	{
		case CK_FORMAT_INT2:
		case CK_FORMAT_INT4:
			enlargeStringInfo(out, 12);
			out->len += pg_ltoa(part->format == CK_FORMAT_INT2 ?
								(int32) DatumGetInt16(value) : DatumGetInt32(value),
								out->data + out->len);
			return;
		case CK_FORMAT_INT8:
			enlargeStringInfo(out, MAXINT8LEN + 1);
			out->len += pg_lltoa(DatumGetInt64(value), out->data + out->len);
			return;
		case CK_FORMAT_TEXT:
			{
				text	   *t = DatumGetTextPP(value);

				appendBinaryStringInfo(out, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
				if ((Pointer) t != DatumGetPointer(value))
					pfree(t);
				return;
			}
		default:
			printed = OutputFunctionCall(&part->outfunc, value);
			appendStringInfoString(out, printed);
			pfree(printed);
	}
}

/*
 * Resolve the template's columns against a table's row type.
 * Returns NULL on success, or a message naming the unknown column.
 */
char *
ck_template_bind(CkTemplate *tpl, TupleDesc tupdesc)
{
	for (int i = 0; i < tpl->nparts; i++)
	{
		CkTemplatePart *part = &tpl->parts[i];
		AttrNumber	attnum = InvalidAttrNumber;
		Oid			outfunc;
		bool		varlena;

		if (part->column == NULL)
			continue;
		for (int a = 0; a < tupdesc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(tupdesc, a);

			if (!att->attisdropped && strcmp(NameStr(att->attname), part->column) == 0)
			{
				attnum = a + 1;
				break;
			}
		}
		if (attnum == InvalidAttrNumber)
			return psprintf("column \"%s\" does not exist", part->column);
		part->attnum = attnum;
		getTypeOutputInfo(TupleDescAttr(tupdesc, attnum - 1)->atttypid,
						  &outfunc, &varlena);
		fmgr_info_cxt(outfunc, &part->outfunc, CurrentMemoryContext);
		part->format = ck_format_for(outfunc);
	}
	return NULL;
}

/*
 * Render the template for one row version into out (which is reset first).
 * Returns false when a referenced column is NULL: no key for this row.
 */
bool
ck_template_render(CkTemplate *tpl, TupleTableSlot *slot, StringInfo out)
{
	resetStringInfo(out);
	for (int i = 0; i < tpl->nparts; i++)
	{
		CkTemplatePart *part = &tpl->parts[i];
		Datum		value;
		bool		isnull;

		if (part->column == NULL)
		{
			appendStringInfoString(out, part->literal);
			continue;
		}
		value = slot_getattr(slot, part->attnum, &isnull);
		if (isnull)
			return false;
		ck_append_value(part, value, out);
	}
	return true;
}
