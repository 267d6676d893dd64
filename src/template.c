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

#include <math.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "common/shortest_dec.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

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
 * How a column is printed, by its output function. The common types print
 * the same as their output function would, without a function call and a
 * palloc per row: integers through pg_ltoa/pg_lltoa (what int2out, int4out
 * and int8out use), and text, varchar and char as their bytes. The types
 * whose output depends on session settings (TimeZone, DateStyle,
 * IntervalStyle, extra_float_digits, bytea_output, lc_monetary) print one
 * canonical form whatever the session: see ck_append_canonical. Domains
 * have their base type's output function, so its format.
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
		case F_TIMESTAMPTZ_OUT:
			return CK_FORMAT_TIMESTAMPTZ;
		case F_TIMESTAMP_OUT:
			return CK_FORMAT_TIMESTAMP;
		case F_DATE_OUT:
			return CK_FORMAT_DATE;
		case F_INTERVAL_OUT:
			return CK_FORMAT_INTERVAL;
		case F_FLOAT4OUT:
			return CK_FORMAT_FLOAT4;
		case F_FLOAT8OUT:
			return CK_FORMAT_FLOAT8;
		case F_BYTEAOUT:
			return CK_FORMAT_BYTEA;
		case F_CASH_OUT:
			return CK_FORMAT_MONEY;
		default:
			return CK_FORMAT_OUTFUNC;
	}
}

/*
 * Output functions whose text depends on a session setting and that have
 * no canonical form here: search_path (the reg* types) and
 * extra_float_digits (the geometric types).
 */
static bool
ck_outfunc_session_dependent(Oid outfunc)
{
	switch (outfunc)
	{
		case F_REGCLASSOUT:
		case F_REGPROCOUT:
		case F_REGPROCEDUREOUT:
		case F_REGOPEROUT:
		case F_REGOPERATOROUT:
		case F_REGTYPEOUT:
		case F_REGCONFIGOUT:
		case F_REGDICTIONARYOUT:
		case F_REGNAMESPACEOUT:
		case F_REGROLEOUT:
		case F_REGCOLLATIONOUT:
		case F_POINT_OUT:
		case F_LSEG_OUT:
		case F_LINE_OUT:
		case F_BOX_OUT:
		case F_PATH_OUT:
		case F_POLY_OUT:
		case F_CIRCLE_OUT:
			return true;
		default:
			return false;
	}
}

/*
 * Would a value of this type print differently in another session? True
 * for the types above, for those ck_format_for prints canonically (their
 * output function does depend on the session), and for arrays, composites,
 * ranges and multiranges holding any of them, which print through their
 * elements' output functions.
 */
static bool
ck_type_session_dependent(Oid typid)
{
	Oid			outfunc;
	bool		varlena;
	Oid			elem;
	char		format;

	typid = getBaseType(typid);
	getTypeOutputInfo(typid, &outfunc, &varlena);
	format = ck_format_for(outfunc);
	if (format != CK_FORMAT_OUTFUNC)
		return format != CK_FORMAT_INT2 && format != CK_FORMAT_INT4 &&
			format != CK_FORMAT_INT8 && format != CK_FORMAT_TEXT;
	if (ck_outfunc_session_dependent(outfunc))
		return true;
	if (OidIsValid(elem = get_element_type(typid)))
		return ck_type_session_dependent(elem);
	if (type_is_rowtype(typid))
	{
		TupleDesc	desc = lookup_rowtype_tupdesc(typid, -1);
		bool		dependent = false;

		for (int a = 0; a < desc->natts && !dependent; a++)
			if (!TupleDescAttr(desc, a)->attisdropped)
				dependent = ck_type_session_dependent(TupleDescAttr(desc, a)->atttypid);
		ReleaseTupleDesc(desc);
		return dependent;
	}
	if (type_is_multirange(typid))
		typid = get_multirange_range(typid);
	if (type_is_range(typid))
		return ck_type_session_dependent(get_range_subtype(typid));
	return false;
}

/* Append a money value as a number with two decimals (its cents as stored). */
static void
ck_append_money(int64 cents, StringInfo out)
{
	uint64		magnitude = cents < 0 ? -(uint64) cents : (uint64) cents;

	appendStringInfo(out, "%s" UINT64_FORMAT ".%02d", cents < 0 ? "-" : "",
					 magnitude / 100, (int) (magnitude % 100));
}

/* Append a float as the shortest text that reads back exactly. */
static void
ck_append_float(double value, bool single, StringInfo out)
{
	char		buf[DOUBLE_SHORTEST_DECIMAL_LEN + 1];

	if (isnan(value))
		appendStringInfoString(out, "NaN");
	else if (isinf(value))
		appendStringInfoString(out, value > 0 ? "Infinity" : "-Infinity");
	else
	{
		if (single)
			float_to_shortest_decimal_buf((float) value, buf);
		else
			double_to_shortest_decimal_buf(value, buf);
		appendStringInfoString(out, buf);
	}
}

/* Append a timestamp (in UTC for a timestamptz) in PostgreSQL's ISO style. */
static void
ck_append_timestamp(Timestamp ts, bool with_zone, StringInfo out)
{
	char		buf[MAXDATELEN + 1];
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(ts))
		EncodeSpecialTimestamp(ts, buf);
	else if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) == 0)
	{
		tm.tm_isdst = 0;		/* UTC: the zone is printed as +00 */
		EncodeDateTime(&tm, fsec, with_zone, 0, NULL, USE_ISO_DATES, buf);
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	appendStringInfoString(out, buf);
}

/*
 * Append a value of a type whose output function depends on the session,
 * in the one form cachekit gives it (README, "Keys and session settings").
 */
static void
ck_append_canonical(char format, Datum value, StringInfo out)
{
	char		buf[MAXDATELEN + 1];

	switch (format)
	{
		case CK_FORMAT_TIMESTAMPTZ:
		case CK_FORMAT_TIMESTAMP:
			ck_append_timestamp(DatumGetTimestamp(value),
								format == CK_FORMAT_TIMESTAMPTZ, out);
			return;
		case CK_FORMAT_DATE:
			{
				DateADT		date = DatumGetDateADT(value);
				struct pg_tm tm;

				if (DATE_NOT_FINITE(date))
					EncodeSpecialDate(date, buf);
				else
				{
					j2date(date + POSTGRES_EPOCH_JDATE, &tm.tm_year, &tm.tm_mon, &tm.tm_mday);
					EncodeDateOnly(&tm, USE_ISO_DATES, buf);
				}
				appendStringInfoString(out, buf);
				return;
			}
		case CK_FORMAT_INTERVAL:
			{
				struct pg_itm itm;

				interval2itm(*DatumGetIntervalP(value), &itm);
				EncodeInterval(&itm, INTSTYLE_ISO_8601, buf);
				appendStringInfoString(out, buf);
				return;
			}
		case CK_FORMAT_FLOAT4:
			ck_append_float(DatumGetFloat4(value), true, out);
			return;
		case CK_FORMAT_FLOAT8:
			ck_append_float(DatumGetFloat8(value), false, out);
			return;
		case CK_FORMAT_MONEY:
			ck_append_money(DatumGetInt64(value), out);
			return;
		case CK_FORMAT_BYTEA:
			{
				bytea	   *b = DatumGetByteaPP(value);
				int			len = VARSIZE_ANY_EXHDR(b);

				enlargeStringInfo(out, 2 + 2 * len + 1);
				appendStringInfoString(out, "\\x");
				out->len += hex_encode(VARDATA_ANY(b), len, out->data + out->len);
				out->data[out->len] = '\0';
				return;
			}
	}
	elog(ERROR, "unknown cachekit format '%c'", format);
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
		case CK_FORMAT_OUTFUNC:
			printed = OutputFunctionCall(&part->outfunc, value);
			appendStringInfoString(out, printed);
			pfree(printed);
			return;
		default:
			ck_append_canonical(part->format, value, out);
	}
}

/* The attribute number of column "name" of a row type, or InvalidAttrNumber. */
AttrNumber
ck_column_attnum(TupleDesc tupdesc, const char *name)
{
	for (int a = 0; a < tupdesc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, a);

		if (!att->attisdropped && strcmp(NameStr(att->attname), name) == 0)
			return a + 1;
	}
	return InvalidAttrNumber;
}

/*
 * Resolve the template's columns against a table's row type.
 * Returns NULL on success, or a message naming the unknown column (or the
 * column whose type prints differently per session) with its errcode in
 * *sqlstate.
 */
char *
ck_template_bind(CkTemplate *tpl, TupleDesc tupdesc, int *sqlstate)
{
	for (int i = 0; i < tpl->nparts; i++)
	{
		CkTemplatePart *part = &tpl->parts[i];
		AttrNumber	attnum;
		Oid			typid;
		Oid			outfunc;
		bool		varlena;

		if (part->column == NULL)
			continue;
		attnum = ck_column_attnum(tupdesc, part->column);
		*sqlstate = ERRCODE_UNDEFINED_COLUMN;
		if (attnum == InvalidAttrNumber)
			return psprintf("column \"%s\" does not exist", part->column);
		part->attnum = attnum;
		typid = TupleDescAttr(tupdesc, attnum - 1)->atttypid;
		getTypeOutputInfo(typid, &outfunc, &varlena);
		fmgr_info_cxt(outfunc, &part->outfunc, CurrentMemoryContext);
		part->format = ck_format_for(outfunc);
		*sqlstate = ERRCODE_FEATURE_NOT_SUPPORTED;
		if (part->format == CK_FORMAT_OUTFUNC && ck_type_session_dependent(typid))
			return psprintf("column \"%s\" of type %s prints differently in different sessions, so it cannot be part of a key or tag",
							part->column, format_type_be(typid));
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
		if (slot == NULL)
			elog(ERROR, "template \"%s\" has a placeholder but no row to render", tpl->source);
		value = slot_getattr(slot, part->attnum, &isnull);
		if (isnull)
			return false;
		ck_append_value(part, value, out);
	}
	return true;
}

/*
 * The template with every {oldname} placeholder written {newname}, for a
 * renamed column; NULL when it has none. The caller has checked that
 * newname can be a placeholder (no braces); an unparsable template has
 * been refused when its trigger was created, and is returned unchanged.
 */
char *
ck_template_rename(const char *source, const char *oldname, const char *newname)
{
	StringInfoData out;
	const char *p = source;
	bool		changed = false;

	initStringInfo(&out);
	while (*p)
	{
		const char *end;

		if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}'))
		{
			appendBinaryStringInfo(&out, p, 2);
			p += 2;
			continue;
		}
		if (p[0] != '{')
		{
			appendStringInfoChar(&out, *p++);
			continue;
		}
		end = p + 1;
		while (*end && *end != '}' && *end != '{')
			end++;
		if (*end != '}')
		{
			appendStringInfoString(&out, p);
			break;
		}
		if ((size_t) (end - p - 1) == strlen(oldname) &&
			strncmp(p + 1, oldname, end - p - 1) == 0)
		{
			appendStringInfo(&out, "{%s}", newname);
			changed = true;
		}
		else
			appendBinaryStringInfo(&out, p, end + 1 - p);
		p = end + 1;
	}
	if (!changed)
	{
		pfree(out.data);
		return NULL;
	}
	return out.data;
}
