/*-------------------------------------------------------------------------
 *
 * deliver.c
 *	  Turning one batch of queue entries into pipelined Redis commands and
 *	  the replies back into a verdict per entry.
 *
 * The same key or tag named by several entries of a batch is sent once; a
 * command remembers every entry that depends on it, so that a refusal marks
 * all of them. For a key, the last entry of the batch decides what is sent
 * (write-through: the newest value, or a delete), so writes of one key are
 * never reordered. Plain deletes go out as UNLINK in chunks; a key that is
 * written, or leaves or joins tag sets, is handled by one script that does
 * all of it atomically. A tag is flushed
 * without losing a concurrent SADD: its set is first renamed to a private
 * name (new members then go to a fresh set, which stays listed), and the
 * private set is drained in chunks by a script that pops members and
 * unlinks them in one step, so no member is ever popped but not deleted.
 * A flush interrupted by a failure resumes from the private set.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "miscadmin.h"

/* how many keys one UNLINK, or one drain step of a tag, handles */
#define CK_CHUNK 500

/*
 * Begin a flush: KEYS[1] is the tag's set, KEYS[2] the private set.
 * Returns 2 when an interrupted flush left a private set to drain first,
 * 1 when the set was renamed, 0 when there is nothing to flush.
 */
static const char *flush_begin_script =
"local t = redis.call('TYPE', KEYS[2]).ok\n"
"if t == 'set' then return 2 end\n"
"if t ~= 'none' then return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is not a set') end\n"
"t = redis.call('TYPE', KEYS[1]).ok\n"
"if t == 'none' then return 0 end\n"
"if t ~= 'set' then return redis.error_reply('WRONGTYPE tag set ' .. KEYS[1] .. ' holds a ' .. t .. ', not a set') end\n"
"redis.call('RENAME', KEYS[1], KEYS[2])\n"
"return 1\n";

/* Drain step: pop up to ARGV[1] members of KEYS[1] and unlink them; returns how many. */
static const char *flush_drain_script =
"local m = redis.call('SPOP', KEYS[1], ARGV[1])\n"
"if #m > 0 then redis.call('UNLINK', unpack(m)) end\n"
"return #m\n";

/*
 * Apply the final state of a key: KEYS[1] is the key, the next ARGV[4]
 * keys are sets it joins, the rest are sets it leaves. ARGV[1] is 'set' or
 * 'del', ARGV[2] the value, ARGV[3] the ttl in seconds (0: none). With a
 * ttl, a set it joins keeps an expiry of at least twice the ttl.
 */
static const char *apply_script =
"local key = KEYS[1]\n"
"local ttl = tonumber(ARGV[3])\n"
"local njoin = tonumber(ARGV[4])\n"
"if ARGV[1] == 'set' then\n"
"  if ttl > 0 then redis.call('SET', key, ARGV[2], 'EX', ttl)\n"
"  else redis.call('SET', key, ARGV[2]) end\n"
"else\n"
"  redis.call('UNLINK', key)\n"
"end\n"
"for i = 2, njoin + 1 do\n"
"  redis.call('SADD', KEYS[i], key)\n"
"  if ttl > 0 and redis.call('TTL', KEYS[i]) < 2 * ttl then\n"
"    redis.call('EXPIRE', KEYS[i], 2 * ttl)\n"
"  end\n"
"end\n"
"for i = njoin + 2, #KEYS do redis.call('SREM', KEYS[i], key) end\n"
"return 1\n";

/* the scripts, and their SHA1 as loaded on the current connection */
enum
{
	CK_SCRIPT_FLUSH_BEGIN,
	CK_SCRIPT_FLUSH_DRAIN,
	CK_SCRIPT_APPLY,
	CK_NSCRIPTS
};

static const char **const scripts[CK_NSCRIPTS] = {
	&flush_begin_script, &flush_drain_script, &apply_script
};
static char script_sha[CK_NSCRIPTS][41];

/* a string named by entries of the batch, and which entries */
typedef struct CkItem
{
	const char *str;
	int			entry;
} CkItem;

/* one distinct string with the entries that named it */
typedef struct CkGroup
{
	const char *str;
	int			nentries;
	int		   *entries;
} CkGroup;

/* where a tag's flush stands */
typedef enum CkFlushPhase
{
	CK_FLUSH_BEGIN,
	CK_FLUSH_DRAIN,
	CK_FLUSH_DONE
} CkFlushPhase;

typedef struct CkFlush
{
	CkGroup    *group;
	char	   *set;			/* <tag_prefix><tag> */
	char	   *private_set;	/* where the set is drained from */
	CkFlushPhase phase;
	bool		begin_again;	/* drained a leftover: rename the set next */
	bool		failed;
} CkFlush;

/* what one key ends up as after all entries of the batch */
typedef struct CkKeyPlan
{
	CkGroup    *group;
	bool		simple;			/* only plain deletes: goes into an UNLINK */
	CkEntry    *final_write;	/* the write that wins, or NULL for a delete */
	List	   *leaves;			/* sets the key leaves */
} CkKeyPlan;

/* Load the scripts on a fresh connection (called after each connect). */
bool
ck_deliver_prepare(CkConn *conn, char **errmsg)
{
	for (int i = 0; i < CK_NSCRIPTS; i++)
		if (!ck_redis_script_load(conn, *scripts[i], script_sha[i], errmsg))
			return false;
	return true;
}

/* Order items by string, then entry. */
static int
ck_item_cmp(const void *a, const void *b)
{
	const CkItem *x = a;
	const CkItem *y = b;
	int			c = strcmp(x->str, y->str);

	if (c != 0)
		return c;
	return x->entry - y->entry;
}

/* Collapse items into groups of equal strings; returns the group count. */
static int
ck_group_items(CkItem *items, int nitems, CkGroup **groups_out)
{
	CkGroup    *groups = palloc(sizeof(CkGroup) * (nitems > 0 ? nitems : 1));
	int			ngroups = 0;

	qsort(items, nitems, sizeof(CkItem), ck_item_cmp);
	for (int i = 0; i < nitems;)
	{
		int			j = i;
		CkGroup    *g = &groups[ngroups++];

		while (j < nitems && strcmp(items[j].str, items[i].str) == 0)
			j++;
		g->str = items[i].str;
		g->entries = palloc(sizeof(int) * (j - i));
		g->nentries = 0;
		for (int k = i; k < j; k++)
			if (g->nentries == 0 || g->entries[g->nentries - 1] != items[k].entry)
				g->entries[g->nentries++] = items[k].entry;
		i = j;
	}
	*groups_out = groups;
	return ngroups;
}

/* Mark every entry of a group as refused by Redis. */
static void
ck_fail_group(CkEntry *entries, CkGroup *g, const CkReply *reply)
{
	for (int i = 0; i < g->nentries; i++)
	{
		CkEntry    *e = &entries[g->entries[i]];

		if (!e->failed)
			e->error = reply->error;
		e->failed = true;
		if (reply->status == CK_REPLY_TRANSIENT)
			e->transient = true;
	}
}

/* Queue one step of a tag's flush. */
static void
ck_append_flush_step(CkConn *conn, CkFlush *f)
{
	const char *argv[6];
	size_t		lens[6];

	if (f->phase == CK_FLUSH_BEGIN)
	{
		argv[0] = "EVALSHA";
		argv[1] = script_sha[CK_SCRIPT_FLUSH_BEGIN];
		argv[2] = "2";
		argv[3] = f->set;
		argv[4] = f->private_set;
		for (int i = 0; i < 5; i++)
			lens[i] = strlen(argv[i]);
		ck_redis_append(conn, 5, argv, lens);
	}
	else
	{
		argv[0] = "EVALSHA";
		argv[1] = script_sha[CK_SCRIPT_FLUSH_DRAIN];
		argv[2] = "1";
		argv[3] = f->private_set;
		argv[4] = CppAsString2(CK_CHUNK);
		for (int i = 0; i < 5; i++)
			lens[i] = strlen(argv[i]);
		ck_redis_append(conn, 5, argv, lens);
	}
}

/* Move a tag's flush on by one reply. */
static void
ck_advance_flush(CkFlush *f, const CkReply *reply, CkDeliveryStats *stats)
{
	if (f->phase == CK_FLUSH_BEGIN)
	{
		if (reply->integer == 0)
			f->phase = CK_FLUSH_DONE;
		else
		{
			f->begin_again = (reply->integer == 2);
			f->phase = CK_FLUSH_DRAIN;
		}
	}
	else
	{
		stats->tag_keys_deleted += reply->integer;
		if (reply->integer < CK_CHUNK)
			f->phase = f->begin_again ? CK_FLUSH_BEGIN : CK_FLUSH_DONE;
		f->begin_again = f->begin_again && reply->integer == CK_CHUNK;
	}
	if (f->phase == CK_FLUSH_DONE)
		stats->tags_flushed++;
}

/* Add the strings of arr to list, skipping those it has. */
static List *
ck_union(List *list, char **arr, int n)
{
	for (int i = 0; i < n; i++)
	{
		ListCell   *lc;
		bool		found = false;

		foreach(lc, list)
			if (strcmp((char *) lfirst(lc), arr[i]) == 0)
				found = true;
		if (!found)
			list = lappend(list, arr[i]);
	}
	return list;
}

/* Work out what a key ends up as, from its entries in queue order. */
static void
ck_plan_key(CkEntry *entries, CkGroup *g, CkKeyPlan *plan)
{
	List	   *leaves = NIL;

	plan->group = g;
	plan->simple = true;
	plan->final_write = NULL;
	for (int i = 0; i < g->nentries; i++)
	{
		CkEntry    *e = &entries[g->entries[i]];

		if (e->kind == CK_KIND_INVALIDATE)
		{
			plan->final_write = NULL;
			continue;
		}
		plan->simple = false;
		plan->final_write = (e->kind == CK_KIND_WRITE) ? e : NULL;
		leaves = ck_union(leaves, e->untags, e->nuntags);
	}
	/* a set the final write joins is not one the key leaves */
	plan->leaves = NIL;
	if (plan->final_write)
	{
		ListCell   *lc;

		foreach(lc, leaves)
		{
			bool		joins = false;

			for (int t = 0; t < plan->final_write->ntags; t++)
				if (strcmp(plan->final_write->tags[t], (char *) lfirst(lc)) == 0)
					joins = true;
			if (!joins)
				plan->leaves = lappend(plan->leaves, lfirst(lc));
		}
	}
	else
		plan->leaves = leaves;
}

/* Queue the script that applies a key's final state. */
static void
ck_append_apply(CkConn *conn, CkKeyPlan *plan)
{
	CkEntry    *w = plan->final_write;
	int			njoin = w ? w->ntags : 0;
	int			nleave = list_length(plan->leaves);
	int			argc = 0;
	const char **argv = palloc(sizeof(char *) * (njoin + nleave + 8));
	size_t	   *lens = palloc(sizeof(size_t) * (njoin + nleave + 8));
	ListCell   *lc;

	argv[argc++] = "EVALSHA";
	argv[argc++] = script_sha[CK_SCRIPT_APPLY];
	argv[argc++] = psprintf("%d", 1 + njoin + nleave);
	argv[argc++] = plan->group->str;
	for (int t = 0; t < njoin; t++)
		argv[argc++] = psprintf("%s%s", ck_tag_prefix, w->tags[t]);
	foreach(lc, plan->leaves)
		argv[argc++] = psprintf("%s%s", ck_tag_prefix, (char *) lfirst(lc));
	argv[argc++] = w ? "set" : "del";
	argv[argc++] = w && w->value ? w->value : "";
	argv[argc++] = psprintf("%d", w ? w->ttl : 0);
	argv[argc++] = psprintf("%d", njoin);
	for (int i = 0; i < argc; i++)
		lens[i] = strlen(argv[i]);
	ck_redis_append(conn, argc, argv, lens);
}

/*
 * Deliver entries[0..n) as one pipeline: key deletes and key scripts first,
 * then tag flushes. The caller makes sure no write follows a flush here.
 */
static bool
ck_deliver_segment(CkConn *conn, CkEntry *entries, int n, CkDeliveryStats *stats, char **errmsg)
{
	CkItem	   *keyitems;
	CkItem	   *tagitems;
	int			nkeyitems = 0;
	int			ntagitems = 0;
	CkGroup    *keys;
	CkGroup    *tags;
	int			nkeys;
	int			ntags;
	CkKeyPlan  *plans;
	CkKeyPlan **simple;
	int			nsimple = 0;
	int			nchunks;
	CkFlush    *flushes;
	int			active;

	/* collect and collapse the keys and flushed tags of all entries */
	for (int i = 0; i < n; i++)
	{
		nkeyitems += entries[i].nkeys;
		ntagitems += entries[i].ntags;
	}
	keyitems = palloc(sizeof(CkItem) * (nkeyitems + 1));
	tagitems = palloc(sizeof(CkItem) * (ntagitems + 1));
	nkeyitems = ntagitems = 0;
	for (int i = 0; i < n; i++)
	{
		CkEntry    *e = &entries[i];

		if (e->kind == CK_KIND_INVALIDATE)
		{
			for (int k = 0; k < e->nkeys; k++)
				keyitems[nkeyitems++] = (CkItem) {e->keys[k], i};
			for (int t = 0; t < e->ntags; t++)
				tagitems[ntagitems++] = (CkItem) {e->tags[t], i};
		}
		else if (e->nkeys > 0)
			keyitems[nkeyitems++] = (CkItem) {e->keys[0], i};
	}
	nkeys = ck_group_items(keyitems, nkeyitems, &keys);
	ntags = ck_group_items(tagitems, ntagitems, &tags);

	plans = palloc(sizeof(CkKeyPlan) * (nkeys + 1));
	simple = palloc(sizeof(CkKeyPlan *) * (nkeys + 1));
	for (int k = 0; k < nkeys; k++)
	{
		ck_plan_key(entries, &keys[k], &plans[k]);
		if (plans[k].simple)
			simple[nsimple++] = &plans[k];
	}

	/* round one: plain deletes, key scripts, first step of every flush */
	nchunks = (nsimple + CK_CHUNK - 1) / CK_CHUNK;
	for (int c = 0; c < nchunks; c++)
	{
		int			first = c * CK_CHUNK;
		int			count = Min(CK_CHUNK, nsimple - first);
		const char **argv = palloc(sizeof(char *) * (count + 1));
		size_t	   *lens = palloc(sizeof(size_t) * (count + 1));

		argv[0] = "UNLINK";
		lens[0] = 6;
		for (int k = 0; k < count; k++)
		{
			argv[k + 1] = simple[first + k]->group->str;
			lens[k + 1] = strlen(argv[k + 1]);
		}
		ck_redis_append(conn, count + 1, argv, lens);
	}
	for (int k = 0; k < nkeys; k++)
		if (!plans[k].simple)
			ck_append_apply(conn, &plans[k]);
	flushes = palloc0(sizeof(CkFlush) * (ntags + 1));
	for (int t = 0; t < ntags; t++)
	{
		flushes[t].group = &tags[t];
		flushes[t].set = psprintf("%s%s", ck_tag_prefix, tags[t].str);
		flushes[t].private_set = psprintf("cachekit:flushing:%s", flushes[t].set);
		flushes[t].phase = CK_FLUSH_BEGIN;
		ck_append_flush_step(conn, &flushes[t]);
	}

	/* replies, in the same order */
	for (int c = 0; c < nchunks; c++)
	{
		CkReply		reply;
		int			first = c * CK_CHUNK;
		int			count = Min(CK_CHUNK, nsimple - first);

		if (!ck_redis_read(conn, &reply, errmsg))
			return false;
		if (reply.status != CK_REPLY_OK)
			for (int k = 0; k < count; k++)
				ck_fail_group(entries, simple[first + k]->group, &reply);
		else
			stats->keys_deleted += count;
	}
	for (int k = 0; k < nkeys; k++)
	{
		CkReply		reply;

		if (plans[k].simple)
			continue;
		if (!ck_redis_read(conn, &reply, errmsg))
			return false;
		if (reply.status != CK_REPLY_OK)
			ck_fail_group(entries, plans[k].group, &reply);
		else if (plans[k].final_write)
			stats->keys_written++;
		else
			stats->keys_deleted++;
	}

	for (int i = 0; i < n; i++)
		if (!entries[i].failed && entries[i].kind == CK_KIND_DROP &&
			entries[i].ttl == CK_TTL_TOO_LARGE)
			stats->values_too_large++;

	/* further rounds: one step of every unfinished flush at a time */
	active = ntags;
	while (active > 0)
	{
		for (int t = 0; t < ntags; t++)
		{
			CkFlush    *f = &flushes[t];
			CkReply		reply;

			if (f->phase == CK_FLUSH_DONE || f->failed)
				continue;
			if (!ck_redis_read(conn, &reply, errmsg))
				return false;
			if (reply.status != CK_REPLY_OK)
			{
				ck_fail_group(entries, f->group, &reply);
				f->failed = true;
				continue;
			}
			ck_advance_flush(f, &reply, stats);
		}
		active = 0;
		for (int t = 0; t < ntags; t++)
		{
			CkFlush    *f = &flushes[t];

			if (f->phase == CK_FLUSH_DONE || f->failed)
				continue;
			ck_append_flush_step(conn, f);
			active++;
		}
		CHECK_FOR_INTERRUPTS();
	}
	return true;
}

/*
 * Deliver a batch. Every entry ends up either delivered (failed = false)
 * or refused (failed, with error and transient set). Returns false when the
 * connection failed (*errmsg set): then nothing may be taken as delivered.
 *
 * Within one pipeline flushes go after writes, so a write that was queued
 * after a flush starts a new pipeline: otherwise the flush could delete the
 * value just written. Deletes may move across flushes freely.
 */
bool
ck_deliver(CkConn *conn, CkEntry *entries, int n, CkDeliveryStats *stats, char **errmsg)
{
	int			start = 0;

	memset(stats, 0, sizeof(CkDeliveryStats));
	while (start < n)
	{
		int			end = start;
		bool		flushed = false;

		while (end < n)
		{
			if (entries[end].kind == CK_KIND_WRITE && flushed)
				break;
			if (entries[end].kind == CK_KIND_INVALIDATE && entries[end].ntags > 0)
				flushed = true;
			end++;
		}
		if (!ck_deliver_segment(conn, entries + start, end - start, stats, errmsg))
			return false;
		start = end;
	}
	return true;
}
