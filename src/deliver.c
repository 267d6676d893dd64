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
 *
 * Order per key: a key's entries are collapsed over the whole batch, not
 * per pipeline, so that one command (sent in the pipeline of the key's last
 * entry) decides the key and shares its fate with every entry that named
 * it; an entry that waits for a retry (held by the worker) holds the later
 * entries of its keys. A refused UNLINK of many keys is retried key by key,
 * so that one refused key does not fail the other keys' entries.
 *
 * Error classes (ck_error_class) decide what a failure means for an entry;
 * README.md has them in a table.
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
 * 'del', ARGV[2] the value, ARGV[3] the ttl in seconds (0: none).
 *
 * Every set is checked before anything is written: a script that failed
 * after its SET would leave a value whose entry counts as refused (Lua
 * scripts do not roll back). When a set holds another type, the key is
 * deleted (a miss, never a stale value) and the script fails.
 *
 * Tag set expiry: a set never gets an expiry it did not have (a reader may
 * have added a key without a TTL, and a set that expires before one of its
 * keys misses that key's flush). A set that has one (a reader's) is kept
 * alive at least as long as the key joining it: extended to a second past
 * the key's ttl,
 * or made persistent for a key without ttl. Without expiry the sets still
 * do not grow without bound from cachekit's side: a key joins a set once
 * however often it is written, and leaves it when its row's key or tag
 * changes or the row is deleted, so a set lists at most the keys of the
 * rows that have its tag (and what readers add), until a flush empties it.
 * Members whose keys merely do not exist are not pruned: a reader may add a
 * key to the set before it sets the key.
 */
static const char *apply_script =
"local key = KEYS[1]\n"
"local ttl = tonumber(ARGV[3])\n"
"local njoin = tonumber(ARGV[4])\n"
"for i = 2, #KEYS do\n"
"  local t = redis.call('TYPE', KEYS[i]).ok\n"
"  if t ~= 'set' and t ~= 'none' then\n"
"    redis.call('UNLINK', key)\n"
"    return redis.error_reply('WRONGTYPE tag set ' .. KEYS[i] .. ' holds a ' .. t .. ', not a set')\n"
"  end\n"
"end\n"
"if ARGV[1] == 'set' then\n"
"  if ttl > 0 then redis.call('SET', key, ARGV[2], 'EX', ttl)\n"
"  else redis.call('SET', key, ARGV[2]) end\n"
"else\n"
"  redis.call('UNLINK', key)\n"
"end\n"
"for i = 2, njoin + 1 do\n"
"  local s = KEYS[i]\n"
"  redis.call('SADD', s, key)\n"
"  local left = redis.call('PTTL', s)\n"
"  if left >= 0 then\n"
"    if ttl == 0 then redis.call('PERSIST', s)\n"
"    elseif left < ttl * 1000 + 1000 then redis.call('PEXPIRE', s, ttl * 1000 + 1000) end\n"
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

/* one distinct string with the entries that named it, in queue order */
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
	int			segment;		/* the pipeline it goes out in; -1: all held */
	bool		simple;			/* only plain deletes: goes into an UNLINK */
	CkEntry    *final_write;	/* the write that wins, or NULL for a delete */
	List	   *leaves;			/* sets the key leaves */
} CkKeyPlan;

/* the whole batch, as ck_deliver splits it up */
typedef struct CkBatch
{
	CkConn	   *conn;			/* the Redis connection it goes out on */
	CkEntry    *entries;
	int			n;
	int		   *segment;		/* pipeline of each entry */
	int			nkeys;
	CkKeyPlan  *plans;
	CkDeliveryStats *stats;
} CkBatch;

/* Redis error codes (the first word of an error reply), by class */
static const char *const transient_codes[] = {
	"LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "NOREPLICAS",
	"NOSCRIPT", "MOVED", "ASK", NULL
};
static const char *const server_codes[] = {
	"OOM", "READONLY", "MISCONF", "NOAUTH", "WRONGPASS", "NOPROTO", NULL
};

/* Does msg start with one of the codes, as a whole word? */
static bool
ck_error_code_in(const char *msg, const char *const *codes)
{
	for (int i = 0; codes[i]; i++)
	{
		size_t		len = strlen(codes[i]);

		if (strncmp(msg, codes[i], len) == 0 && (msg[len] == ' ' || msg[len] == '\0'))
			return true;
	}
	return false;
}

/*
 * The class of a Redis error reply. A NOPERM for a command (the user may
 * not run UNLINK or EVALSHA) refuses everything alike, so it is a server
 * condition; a NOPERM for a key (an ACL key pattern) refuses that entry.
 * Anything not known to pass is the entry's own refusal, so that it cannot
 * be retried for ever without being counted.
 */
CkErrorClass
ck_error_class(const char *msg)
{
	if (msg == NULL)
		return CK_ERRCLASS_ENTRY;
	if (ck_error_code_in(msg, transient_codes))
		return CK_ERRCLASS_TRANSIENT;
	if (ck_error_code_in(msg, server_codes))
		return CK_ERRCLASS_SERVER;
	if (strncmp(msg, "NOPERM ", 7) == 0 && strstr(msg, "permissions to run") != NULL)
		return CK_ERRCLASS_SERVER;
	/* the same, met inside one of cachekit's scripts */
	if (strncmp(msg, "ERR ", 4) == 0 && strstr(msg, "can't run this command") != NULL)
		return CK_ERRCLASS_SERVER;
	return CK_ERRCLASS_ENTRY;
}

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

/*
 * Mark an entry as failed with an error of a class. An entry that failed
 * several ways is counted only if every failure was its own refusal: one
 * that met a transient or server condition waits without counting.
 */
static void
ck_fail_entry(CkEntry *e, CkErrorClass cls, char *error)
{
	if (!e->failed)
	{
		e->failed = true;
		e->errclass = cls;
		e->error = error;
	}
	else if (e->errclass == CK_ERRCLASS_ENTRY && cls != CK_ERRCLASS_ENTRY)
		e->errclass = cls;
}

/* Mark every entry of a group as refused by Redis (held ones stay held). */
static void
ck_fail_group(CkEntry *entries, CkGroup *g, const CkReply *reply)
{
	CkErrorClass cls = ck_error_class(reply->error);

	for (int i = 0; i < g->nentries; i++)
	{
		CkEntry    *e = &entries[g->entries[i]];

		if (!(e->failed && e->errclass == CK_ERRCLASS_HELD))
			ck_fail_entry(e, cls, reply->error);
	}
}

/* Is the entry held back (not to be sent in this batch)? */
static inline bool
ck_held(const CkEntry *e)
{
	return e->failed && e->errclass == CK_ERRCLASS_HELD;
}

/* Queue one step of a tag's flush. */
static void
ck_append_flush_step(CkConn *conn, CkFlush *f)
{
	const char *argv[6];
	size_t		lens[6];

	argv[0] = "EVALSHA";
	argv[2] = "1";
	if (f->phase == CK_FLUSH_BEGIN)
	{
		argv[1] = script_sha[CK_SCRIPT_FLUSH_BEGIN];
		argv[2] = "2";
		argv[3] = f->set;
		argv[4] = f->private_set;
	}
	else
	{
		argv[1] = script_sha[CK_SCRIPT_FLUSH_DRAIN];
		argv[3] = f->private_set;
		argv[4] = CppAsString2(CK_CHUNK);
	}
	for (int i = 0; i < 5; i++)
		lens[i] = strlen(argv[i]);
	ck_redis_append(conn, 5, argv, lens);
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

/*
 * Work out what a key ends up as, from its entries in queue order (held
 * entries left out: they go out in a later batch), and in which pipeline:
 * that of its last entry, which comes after every flush queued before it.
 */
static void
ck_plan_key(CkBatch *b, CkGroup *g, CkKeyPlan *plan)
{
	List	   *leaves = NIL;

	plan->group = g;
	plan->segment = -1;
	plan->simple = true;
	plan->final_write = NULL;
	for (int i = 0; i < g->nentries; i++)
	{
		CkEntry    *e = &b->entries[g->entries[i]];

		if (ck_held(e))
			continue;
		plan->segment = b->segment[g->entries[i]];
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
	pfree(argv);
	pfree(lens);
}

/* Queue one UNLINK of plans[0..count). */
static void
ck_append_unlink(CkConn *conn, CkKeyPlan **plans, int count)
{
	const char **argv = palloc(sizeof(char *) * (count + 1));
	size_t	   *lens = palloc(sizeof(size_t) * (count + 1));

	argv[0] = "UNLINK";
	lens[0] = 6;
	for (int k = 0; k < count; k++)
	{
		argv[k + 1] = plans[k]->group->str;
		lens[k + 1] = strlen(argv[k + 1]);
	}
	ck_redis_append(conn, count + 1, argv, lens);
	pfree(argv);
	pfree(lens);
}

/*
 * Read the replies of the UNLINK chunks. A chunk refused as a whole for a
 * reason that may concern one key only (an ACL key pattern) is marked in
 * split[] to be retried key by key; otherwise its keys' entries fail.
 */
static bool
ck_read_unlinks(CkBatch *b, CkKeyPlan **simple, int nsimple, bool *split, char **errmsg)
{
	int			nchunks = (nsimple + CK_CHUNK - 1) / CK_CHUNK;

	for (int c = 0; c < nchunks; c++)
	{
		CkReply		reply;
		int			first = c * CK_CHUNK;
		int			count = Min(CK_CHUNK, nsimple - first);

		split[c] = false;
		if (!ck_redis_read(b->conn, &reply, errmsg))
			return false;
		if (reply.status == CK_REPLY_OK)
			b->stats->keys_deleted += count;
		else if (count > 1 && ck_error_class(reply.error) == CK_ERRCLASS_ENTRY)
			split[c] = true;
		else
			for (int k = 0; k < count; k++)
				ck_fail_group(b->entries, simple[first + k]->group, &reply);
	}
	return true;
}

/* Retry the keys of the refused UNLINK chunks one by one. */
static bool
ck_split_unlinks(CkBatch *b, CkKeyPlan **simple, int nsimple, bool *split, char **errmsg)
{
	int			nchunks = (nsimple + CK_CHUNK - 1) / CK_CHUNK;

	for (int c = 0; c < nchunks; c++)
		if (split[c])
			for (int k = c * CK_CHUNK; k < Min((c + 1) * CK_CHUNK, nsimple); k++)
				ck_append_unlink(b->conn, &simple[k], 1);
	for (int c = 0; c < nchunks; c++)
	{
		if (!split[c])
			continue;
		for (int k = c * CK_CHUNK; k < Min((c + 1) * CK_CHUNK, nsimple); k++)
		{
			CkReply		reply;

			if (!ck_redis_read(b->conn, &reply, errmsg))
				return false;
			if (reply.status == CK_REPLY_OK)
				b->stats->keys_deleted++;
			else
				ck_fail_group(b->entries, simple[k]->group, &reply);
		}
	}
	return true;
}

/* Start the flushes of the tags of segment s (none of a held entry). */
static CkFlush *
ck_start_flushes(CkBatch *b, int s, int *nflushes)
{
	CkItem	   *items;
	int			nitems = 0;
	CkGroup    *tags;
	int			ntags;
	CkFlush    *flushes;

	for (int i = 0; i < b->n; i++)
		if (b->segment[i] == s && b->entries[i].kind == CK_KIND_INVALIDATE)
			nitems += b->entries[i].ntags;
	items = palloc(sizeof(CkItem) * (nitems + 1));
	nitems = 0;
	for (int i = 0; i < b->n; i++)
	{
		CkEntry    *e = &b->entries[i];

		if (b->segment[i] != s || e->kind != CK_KIND_INVALIDATE || ck_held(e))
			continue;
		for (int t = 0; t < e->ntags; t++)
			items[nitems++] = (CkItem) {e->tags[t], i};
	}
	ntags = ck_group_items(items, nitems, &tags);
	flushes = palloc0(sizeof(CkFlush) * (ntags + 1));
	for (int t = 0; t < ntags; t++)
	{
		flushes[t].group = &tags[t];
		flushes[t].set = psprintf("%s%s", ck_tag_prefix, tags[t].str);
		flushes[t].private_set = psprintf("cachekit:flushing:%s", flushes[t].set);
		flushes[t].phase = CK_FLUSH_BEGIN;
		ck_append_flush_step(b->conn, &flushes[t]);
	}
	*nflushes = ntags;
	return flushes;
}

/* Read flush replies and send next steps until every flush is done or failed. */
static bool
ck_run_flushes(CkBatch *b, CkFlush *flushes, int ntags, char **errmsg)
{
	int			active = ntags;

	while (active > 0)
	{
		for (int t = 0; t < ntags; t++)
		{
			CkFlush    *f = &flushes[t];
			CkReply		reply;

			if (f->phase == CK_FLUSH_DONE || f->failed)
				continue;
			if (!ck_redis_read(b->conn, &reply, errmsg))
				return false;
			if (reply.status != CK_REPLY_OK)
			{
				ck_fail_group(b->entries, f->group, &reply);
				f->failed = true;
				continue;
			}
			ck_advance_flush(f, &reply, b->stats);
		}
		active = 0;
		for (int t = 0; t < ntags; t++)
		{
			CkFlush    *f = &flushes[t];

			if (f->phase == CK_FLUSH_DONE || f->failed)
				continue;
			ck_append_flush_step(b->conn, f);
			active++;
		}
		CHECK_FOR_INTERRUPTS();
	}
	return true;
}

/*
 * Deliver pipeline s: plain deletes and key scripts of the keys planned
 * for it first, then the tag flushes of its entries, then refused UNLINK
 * chunks again key by key.
 */
static bool
ck_deliver_segment(CkBatch *b, int s, char **errmsg)
{
	CkKeyPlan **simple = palloc(sizeof(CkKeyPlan *) * (b->nkeys + 1));
	int			nsimple = 0;
	bool	   *split;
	CkFlush    *flushes;
	int			ntags;

	for (int k = 0; k < b->nkeys; k++)
		if (b->plans[k].segment == s && b->plans[k].simple)
			simple[nsimple++] = &b->plans[k];
	split = palloc(sizeof(bool) * (nsimple / CK_CHUNK + 1));

	/* round one: plain deletes, key scripts, first step of every flush */
	for (int first = 0; first < nsimple; first += CK_CHUNK)
		ck_append_unlink(b->conn, &simple[first], Min(CK_CHUNK, nsimple - first));
	for (int k = 0; k < b->nkeys; k++)
		if (b->plans[k].segment == s && !b->plans[k].simple)
			ck_append_apply(b->conn, &b->plans[k]);
	flushes = ck_start_flushes(b, s, &ntags);

	/* replies, in the same order */
	if (!ck_read_unlinks(b, simple, nsimple, split, errmsg))
		return false;
	for (int k = 0; k < b->nkeys; k++)
	{
		CkReply		reply;

		if (b->plans[k].segment != s || b->plans[k].simple)
			continue;
		if (!ck_redis_read(b->conn, &reply, errmsg))
			return false;
		if (reply.status != CK_REPLY_OK)
			ck_fail_group(b->entries, b->plans[k].group, &reply);
		else if (b->plans[k].final_write)
			b->stats->keys_written++;
		else
			b->stats->keys_deleted++;
	}

	/* further rounds: one step of every unfinished flush at a time */
	if (!ck_run_flushes(b, flushes, ntags, errmsg))
		return false;
	return ck_split_unlinks(b, simple, nsimple, split, errmsg);
}

/*
 * Split the batch into pipelines: within one, flushes go after writes, so
 * a write that was queued after a flush starts a new one (otherwise the
 * flush could delete the value just written). Returns how many.
 */
static int
ck_segments(CkEntry *entries, int n, int *segment)
{
	int			s = 0;
	bool		flushed = false;

	for (int i = 0; i < n; i++)
	{
		if (entries[i].kind == CK_KIND_WRITE && flushed)
		{
			s++;
			flushed = false;
		}
		if (entries[i].kind == CK_KIND_INVALIDATE && entries[i].ntags > 0 && !ck_held(&entries[i]))
			flushed = true;
		segment[i] = s;
	}
	return n > 0 ? s + 1 : 0;
}

/*
 * An entry held by the worker (waiting for its retry) holds the later
 * entries of each of its keys, so that none of them overtakes it. Not
 * further: a held delete overtaken by a later write of another of its keys
 * only deletes that value when it goes out (a miss, never a stale value).
 */
static void
ck_hold_followers(CkEntry *entries, CkGroup *keys, int nkeys)
{
	for (int k = 0; k < nkeys; k++)
	{
		int64		holder = -1;

		for (int i = 0; i < keys[k].nentries; i++)
		{
			CkEntry    *e = &entries[keys[k].entries[i]];

			if (ck_held(e))
			{
				if (holder < 0)
					holder = e->id;
			}
			else if (holder >= 0)
				ck_fail_entry(e, CK_ERRCLASS_HELD,
							  psprintf("waits behind queue entry %lld of key %s",
									   (long long) holder, keys[k].str));
		}
	}
}

/* Collapse the keys of every entry of the batch. */
static int
ck_key_groups(CkEntry *entries, int n, CkGroup **keys)
{
	CkItem	   *items;
	int			nitems = 0;

	for (int i = 0; i < n; i++)
		nitems += entries[i].kind == CK_KIND_INVALIDATE ? entries[i].nkeys : Min(entries[i].nkeys, 1);
	items = palloc(sizeof(CkItem) * (nitems + 1));
	nitems = 0;
	for (int i = 0; i < n; i++)
	{
		CkEntry    *e = &entries[i];

		if (e->kind == CK_KIND_INVALIDATE)
			for (int k = 0; k < e->nkeys; k++)
				items[nitems++] = (CkItem) {e->keys[k], i};
		else if (e->nkeys > 0)
			items[nitems++] = (CkItem) {e->keys[0], i};
	}
	return ck_group_items(items, nitems, keys);
}

/*
 * Deliver a batch. Entries the caller marked held (failed, class HELD) are
 * not sent, nor are the later entries of their keys. Every other entry ends
 * up either delivered (failed = false) or failed with an error and its
 * class. Returns false when the connection failed (*errmsg set): then
 * nothing may be taken as delivered.
 *
 * Each key is planned once for the whole batch and sent in the pipeline of
 * its last entry, so its entries share one fate: a refusal or a transient
 * error in one pipeline can never let a later write of the key through in
 * the next one. Deletes may move across flushes freely.
 */
bool
ck_deliver(CkConn *conn, CkEntry *entries, int n, CkDeliveryStats *stats, char **errmsg)
{
	CkBatch		b;
	CkGroup    *keys;
	int			nsegments;

	memset(stats, 0, sizeof(CkDeliveryStats));
	b.conn = conn;
	b.entries = entries;
	b.n = n;
	b.stats = stats;
	b.nkeys = ck_key_groups(entries, n, &keys);
	ck_hold_followers(entries, keys, b.nkeys);
	b.segment = palloc(sizeof(int) * (n + 1));
	nsegments = ck_segments(entries, n, b.segment);
	b.plans = palloc(sizeof(CkKeyPlan) * (b.nkeys + 1));
	for (int k = 0; k < b.nkeys; k++)
		ck_plan_key(&b, &keys[k], &b.plans[k]);

	for (int s = 0; s < nsegments; s++)
		if (!ck_deliver_segment(&b, s, errmsg))
			return false;

	for (int i = 0; i < n; i++)
		if (!entries[i].failed && entries[i].kind == CK_KIND_DROP &&
			entries[i].ttl == CK_TTL_TOO_LARGE)
			stats->values_too_large++;
	return true;
}
