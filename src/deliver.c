/*-------------------------------------------------------------------------
 *
 * deliver.c
 *	  Turning one batch of queue entries into pipelined Redis commands and
 *	  the replies back into a verdict per entry.
 *
 * The same key or tag named by several entries of a batch is sent once; a
 * command remembers every entry that depends on it, so that a refusal marks
 * all of them. Keys are deleted with UNLINK in chunks. A tag is flushed
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
ck_append_flush_step(CkFlush *f)
{
	const char *argv[6];
	size_t		lens[6];

	if (f->phase == CK_FLUSH_BEGIN)
	{
		argv[0] = "EVAL";
		argv[1] = flush_begin_script;
		argv[2] = "2";
		argv[3] = f->set;
		argv[4] = f->private_set;
		for (int i = 0; i < 5; i++)
			lens[i] = strlen(argv[i]);
		ck_redis_append(5, argv, lens);
	}
	else
	{
		argv[0] = "EVAL";
		argv[1] = flush_drain_script;
		argv[2] = "1";
		argv[3] = f->private_set;
		argv[4] = CppAsString2(CK_CHUNK);
		for (int i = 0; i < 5; i++)
			lens[i] = strlen(argv[i]);
		ck_redis_append(5, argv, lens);
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

/*
 * Deliver a batch. Every entry ends up either delivered (failed = false)
 * or refused (failed, with error and transient set). Returns false when the
 * connection failed (*errmsg set): then nothing may be taken as delivered.
 */
bool
ck_deliver(CkEntry *entries, int n, CkDeliveryStats *stats, char **errmsg)
{
	CkItem	   *keyitems;
	CkItem	   *tagitems;
	int			nkeyitems = 0;
	int			ntagitems = 0;
	CkGroup    *keys;
	CkGroup    *tags;
	int			nkeys;
	int			ntags;
	CkFlush    *flushes;
	int			nchunks;
	int			active;

	memset(stats, 0, sizeof(CkDeliveryStats));

	/* collect and collapse the keys and tags of all entries */
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
		for (int k = 0; k < entries[i].nkeys; k++)
			keyitems[nkeyitems++] = (CkItem) {entries[i].keys[k], i};
		for (int t = 0; t < entries[i].ntags; t++)
			tagitems[ntagitems++] = (CkItem) {entries[i].tags[t], i};
	}
	nkeys = ck_group_items(keyitems, nkeyitems, &keys);
	ntags = ck_group_items(tagitems, ntagitems, &tags);

	/* round one: every key deletion and the first step of every flush */
	nchunks = (nkeys + CK_CHUNK - 1) / CK_CHUNK;
	for (int c = 0; c < nchunks; c++)
	{
		int			first = c * CK_CHUNK;
		int			count = Min(CK_CHUNK, nkeys - first);
		const char **argv = palloc(sizeof(char *) * (count + 1));
		size_t	   *lens = palloc(sizeof(size_t) * (count + 1));

		argv[0] = "UNLINK";
		lens[0] = 6;
		for (int k = 0; k < count; k++)
		{
			argv[k + 1] = keys[first + k].str;
			lens[k + 1] = strlen(keys[first + k].str);
		}
		ck_redis_append(count + 1, argv, lens);
	}
	flushes = palloc0(sizeof(CkFlush) * (ntags + 1));
	for (int t = 0; t < ntags; t++)
	{
		flushes[t].group = &tags[t];
		flushes[t].set = psprintf("%s%s", ck_tag_prefix, tags[t].str);
		flushes[t].private_set = psprintf("cachekit:flushing:%s", flushes[t].set);
		flushes[t].phase = CK_FLUSH_BEGIN;
		ck_append_flush_step(&flushes[t]);
	}

	for (int c = 0; c < nchunks; c++)
	{
		CkReply		reply;
		int			first = c * CK_CHUNK;
		int			count = Min(CK_CHUNK, nkeys - first);

		if (!ck_redis_read(&reply, errmsg))
			return false;
		for (int k = 0; k < count; k++)
		{
			if (reply.status != CK_REPLY_OK)
				ck_fail_group(entries, &keys[first + k], &reply);
		}
		if (reply.status == CK_REPLY_OK)
			stats->keys_deleted += count;
	}

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
			if (!ck_redis_read(&reply, errmsg))
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
			ck_append_flush_step(f);
			active++;
		}
		CHECK_FOR_INTERRUPTS();
	}
	return true;
}
