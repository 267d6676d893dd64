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
 * A flush interrupted by a failure resumes from the private set. On one
 * node, the flushes of a pipeline begin in one script call (a tag named in
 * most batches costs Redis one script call per tag otherwise), which
 * answers for each tag apart; a call refused as a whole is split.
 *
 * Redis Cluster (the topology routes each command by the key it names):
 * a multi-key command or script must stay in one slot, so plain deletes
 * are chunked by slot, and a key's script sets or deletes the key alone
 * while each tag set it joins or leaves is changed in the set's own slot
 * (a set refusing the change makes the key a miss). A tag's private set
 * is named with a {hash tag} of the tag set's slot, so the rename stays
 * in one slot; its members live anywhere, so it is drained in steps: pick
 * a chunk of members (SRANDMEMBER), unlink them on their own nodes, and
 * only when every delete is acknowledged remove them from the private set
 * (SREM). A flush cut short leaves the rest in the private set.
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
 * Begin flushes: KEYS holds pairs, a tag's set and its private set. For
 * each pair one string in the reply: "2" when an interrupted flush left a
 * private set to drain first, "1" when the set was renamed, "0" when there
 * is nothing to flush, or the error that refuses that tag (one tag's wrong
 * type does not stop the others). On one node a segment's tags begin in
 * one call (CK_CHUNK pairs at most); in a cluster each tag in its own.
 *
 * A tag flushed again and again is mostly empty: one EXISTS over all the
 * call's names answers "0" for every tag when none exists, and while fewer
 * names exist than half the tags, one EXISTS per pair skips the TYPE checks
 * of an empty tag (a script call from Lua costs Redis about a microsecond,
 * most of a begin's work; where most tags have a set, the TYPE checks
 * alone are cheaper). The EXISTS calls are an optimisation only: where the
 * ACL refuses EXISTS (a user set up before it was used), every tag takes
 * the TYPE checks.
 */
static const char *flush_begin_script =
"local function begin(set, private)\n"
"  local t = redis.call('TYPE', private).ok\n"
"  if t == 'set' then return '2' end\n"
"  if t ~= 'none' then return 'WRONGTYPE ' .. private .. ' is not a set' end\n"
"  t = redis.call('TYPE', set).ok\n"
"  if t == 'none' then return '0' end\n"
"  if t ~= 'set' then return 'WRONGTYPE tag set ' .. set .. ' holds a ' .. t .. ', not a set' end\n"
"  redis.call('RENAME', set, private)\n"
"  return '1'\n"
"end\n"
"local r = {}\n"
"local n = redis.pcall('EXISTS', unpack(KEYS))\n"
"local probe = type(n) == 'number' and n * 4 < #KEYS\n"
"for i = 1, #KEYS, 2 do\n"
"  if n == 0 or (probe and redis.call('EXISTS', KEYS[i], KEYS[i + 1]) == 0) then\n"
"    r[#r + 1] = '0'\n"
"  else\n"
"    r[#r + 1] = begin(KEYS[i], KEYS[i + 1])\n"
"  end\n"
"end\n"
"return r\n";

/* Drain step: pop up to ARGV[1] members of KEYS[1] and unlink them; returns how many. */
static const char *flush_drain_script =
"local m = redis.call('SPOP', KEYS[1], ARGV[1])\n"
"if #m > 0 then redis.call('UNLINK', unpack(m)) end\n"
"return #m\n";

/*
 * Apply the final state of keys, one or several in a call. Each key has
 * five ARGV: 'set' or 'del', the value, the ttl in seconds (0: none), how
 * many sets it joins and how many it leaves; its KEYS are the key, then
 * the sets it joins, then those it leaves. The reply has one element per
 * key: '1', or the text of the error that refused it (the other keys of the
 * call go on); a call of one key answers 1 or that error, as a key's own
 * call did before. The body is one loop without functions: closures and
 * tables made at every call, and a table reply, made a call of one key (a
 * cluster's) dearer for Redis than the one-key script before it.
 *
 * A key first joins its sets, then its value is written (or deleted), then
 * it leaves its other sets, each step allowed to fail (redis.pcall): a
 * script that failed after its SET would leave a value whose entry counts
 * as refused (Lua scripts do not roll back). When a set refuses (it holds
 * another type, or Redis is out of memory), or the SET does, the key is
 * deleted (a miss, never a stale value) and its element is that error. The
 * sets it leaves are rare (a row's tag changed, or the row went) and
 * checked by TYPE before the SET, so that a refusal there sends no value
 * either. The changes of the sets before a refusal stay: a set the key
 * joined lists a key without a value (as a reader's may). (Checking the
 * type of every set a key joins first cost a script call per set and
 * write.)
 *
 * Out of memory, Redis refuses a script's writes only until the script
 * changed something, then lets every write through. So the commands that
 * may be refused for memory (SADD, SET) come first: a key's joins and
 * value before the SREM of its leaves, and the call's writes before its
 * deletes (ck_deliver_segment); once a key met OOM, the later writes of
 * the call are refused the same way without trying.
 *
 * Tag set expiry: a set never gets an expiry it did not have (a reader may
 * have added a key without a TTL, and a set that expires before one of its
 * keys misses that key's flush). A set that has one (a reader's) is kept
 * alive at least as long as the key joining it: extended to a second past
 * the key's ttl, or made persistent for a key without ttl. A set already
 * seen in the call for the same ttl is not looked at again: nothing in
 * between changed its expiry. Without expiry the sets still do not grow
 * without bound from cachekit's side: a key joins a set once however often
 * it is written, and leaves it when its row's key or tag changes or the
 * row is deleted, so a set lists at most the keys of the rows that have
 * its tag (and what readers add), until a flush empties it. Members whose
 * keys merely do not exist are not pruned: a reader may add a key to the
 * set before it sets the key.
 */
static const char *apply_script =
"local out, seen, oom = {}, nil, nil\n"
"local k = 1\n"
"for a = 1, #ARGV, 5 do\n"
"  local key, ttl = KEYS[k], tonumber(ARGV[a + 2])\n"
"  local last_join = k + tonumber(ARGV[a + 3])\n"
"  local last_leave = last_join + tonumber(ARGV[a + 4])\n"
"  local err = nil\n"
"  if oom and ARGV[a] == 'set' then err = oom end\n"
"  local i = k + 1\n"
"  while not err and i <= last_join do\n"
"    local r = redis.pcall('SADD', KEYS[i], key)\n"
"    if type(r) == 'table' and r.err then\n"
"      err = r.err\n"
"      if string.sub(err, 1, 10) == 'WRONGTYPE ' then\n"
"        err = 'WRONGTYPE tag set ' .. KEYS[i] .. ' holds a ' .. redis.call('TYPE', KEYS[i]).ok .. ', not a set'\n"
"      end\n"
"    end\n"
"    i = i + 1\n"
"  end\n"
"  while not err and i <= last_leave do\n"
"    local t = redis.call('TYPE', KEYS[i]).ok\n"
"    if t ~= 'set' and t ~= 'none' then\n"
"      err = 'WRONGTYPE tag set ' .. KEYS[i] .. ' holds a ' .. t .. ', not a set'\n"
"    end\n"
"    i = i + 1\n"
"  end\n"
"  if not err and ARGV[a] == 'set' then\n"
"    local r\n"
"    if ttl > 0 then r = redis.pcall('SET', key, ARGV[a + 1], 'EX', ARGV[a + 2])\n"
"    else r = redis.pcall('SET', key, ARGV[a + 1]) end\n"
"    if type(r) == 'table' and r.err then err = r.err end\n"
"  elseif not err then\n"
"    redis.call('UNLINK', key)\n"
"  end\n"
"  i = last_join + 1\n"
"  while not err and i <= last_leave do\n"
"    local r = redis.pcall('SREM', KEYS[i], key)\n"
"    if type(r) == 'table' and r.err then err = r.err end\n"
"    i = i + 1\n"
"  end\n"
"  if err then\n"
"    redis.pcall('UNLINK', key)\n"
"    if string.sub(err, 1, 4) == 'OOM ' then oom = err end\n"
"    out[#out + 1] = err\n"
"  else\n"
"    for j = k + 1, last_join do\n"
"      local set = KEYS[j]\n"
"      if seen == nil then seen = {} end\n"
"      if seen[set] ~= ttl then\n"
"        seen[set] = ttl\n"
"        local left = redis.call('PTTL', set)\n"
"        if left >= 0 then\n"
"          if ttl == 0 then redis.call('PERSIST', set)\n"
"          elseif left < ttl * 1000 + 1000 then redis.call('PEXPIRE', set, ttl * 1000 + 1000) end\n"
"        end\n"
"      end\n"
"    end\n"
"    out[#out + 1] = '1'\n"
"  end\n"
"  k = last_leave + 1\n"
"end\n"
"if #out > 1 then return out end\n"
"if out[1] == '1' then return 1 end\n"
"return redis.error_reply(out[1])\n";

/*
 * In a cluster, a key joins a tag set in the set's slot: KEYS[1] is the
 * set, ARGV[1] the key, ARGV[2] its ttl; expiry as in apply_script.
 */
static const char *join_script =
"local t = redis.call('TYPE', KEYS[1]).ok\n"
"if t ~= 'set' and t ~= 'none' then\n"
"  return redis.error_reply('WRONGTYPE tag set ' .. KEYS[1] .. ' holds a ' .. t .. ', not a set')\n"
"end\n"
"local ttl = tonumber(ARGV[2])\n"
"redis.call('SADD', KEYS[1], ARGV[1])\n"
"local left = redis.call('PTTL', KEYS[1])\n"
"if left >= 0 then\n"
"  if ttl == 0 then redis.call('PERSIST', KEYS[1])\n"
"  elseif left < ttl * 1000 + 1000 then redis.call('PEXPIRE', KEYS[1], ttl * 1000 + 1000) end\n"
"end\n"
"return 1\n";

/* the scripts, and their SHA1 (the same on every node) */
enum
{
	CK_SCRIPT_FLUSH_BEGIN,
	CK_SCRIPT_FLUSH_DRAIN,
	CK_SCRIPT_APPLY,
	CK_SCRIPT_JOIN,
	CK_NSCRIPTS
};

static const char *const *const scripts[CK_NSCRIPTS] = {
	&flush_begin_script, &flush_drain_script, &apply_script, &join_script
};
static char script_sha[CK_NSCRIPTS][41];

/* where a tag's flush stands */
typedef enum CkFlushPhase
{
	CK_FLUSH_BEGIN,
	CK_FLUSH_DRAIN,				/* one node: pop and unlink a chunk */
	CK_FLUSH_PICK,				/* cluster: read a chunk of members */
	CK_FLUSH_DELETE,			/* cluster: unlink them where they live */
	CK_FLUSH_REMOVE,			/* cluster: then take them out of the set */
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
	int			ncmds;			/* the commands of the current step */
	CkCmd	  **cmds;
	int			nmembers;		/* cluster: the chunk being deleted */
	char	  **members;
	int		   *cmd_first;		/* ...sorted by slot: each UNLINK's first */
	CkCmd	   *begin_cmd;		/* one node: the begin shared with other tags */
	int			begin_elem;		/* ...this tag's place in its reply */
	int			begin_count;	/* ...and how many tags it began */
} CkFlush;

/* what one key ends up as after all entries of the batch */
typedef struct CkKeyPlan
{
	CkGroup    *group;
	int			segment;		/* the pipeline it goes out in; -1: all held */
	int			slot;			/* its cluster slot (0 on one node) */
	bool		simple;			/* only plain deletes: goes into an UNLINK */
	CkEntry    *final_write;	/* the write that wins, or NULL for a delete */
	List	   *leaves;			/* sets the key leaves */
	CkCmd	   *cmd;			/* its script call, maybe shared with other keys */
	int			apply_elem;		/* ...its place in the call's reply */
	int			apply_count;	/* ...and how many keys the call applied */
	List	   *setcmds;		/* cluster: its joins and leaves, one per set */
} CkKeyPlan;

/* one UNLINK of plain deletes (all in one slot in a cluster) */
typedef struct CkChunk
{
	int			first;			/* in the segment's simple plans */
	int			count;
	CkCmd	   *cmd;
	bool		split;			/* refused as a whole: retried key by key */
	CkCmd	  **singles;		/* ...those retries */
} CkChunk;

/* the whole batch, as ck_deliver splits it up */
typedef struct CkBatch
{
	CkTopology *topo;			/* where its commands go */
	bool		cluster;		/* Redis Cluster: one slot per command */
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

/* The scripts' texts, to load on a node that answered NOSCRIPT. */
const char *const *
ck_deliver_scripts(int *n)
{
	static const char *bodies[CK_NSCRIPTS];

	for (int i = 0; i < CK_NSCRIPTS; i++)
		bodies[i] = *scripts[i];
	*n = CK_NSCRIPTS;
	return bodies;
}

/* Send a command routed by a key; the lengths are the strings'. */
static CkCmd *
ck_send_strings(CkBatch *b, const char *key, int argc, const char **argv)
{
	size_t	   *lens = palloc(sizeof(size_t) * argc);
	CkCmd	   *cmd;

	for (int i = 0; i < argc; i++)
		lens[i] = strlen(argv[i]);
	cmd = ck_send(b->topo, key, argc, argv, lens);
	pfree(lens);
	return cmd;
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
int
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

/* Order strings by their cluster slot (qsort_arg). */
static int
ck_slot_cmp(const void *a, const void *b, void *arg)
{
	const char *x = *(const char *const *) a;
	const char *y = *(const char *const *) b;

	return ck_key_slot(x, strlen(x)) - ck_key_slot(y, strlen(y));
}

/* Cluster: UNLINK a flush's chunk of members, one command per slot. */
static void
ck_append_member_unlinks(CkBatch *b, CkFlush *f)
{
	const char **argv = palloc(sizeof(char *) * (f->nmembers + 1));

	qsort_arg(f->members, f->nmembers, sizeof(char *), ck_slot_cmp, NULL);
	f->cmds = palloc(sizeof(CkCmd *) * f->nmembers);
	f->cmd_first = palloc(sizeof(int) * (f->nmembers + 1));
	f->ncmds = 0;
	for (int i = 0; i < f->nmembers;)
	{
		int			slot = ck_key_slot(f->members[i], strlen(f->members[i]));
		int			argc = 1;

		f->cmd_first[f->ncmds] = i;
		argv[0] = "UNLINK";
		while (i < f->nmembers && ck_key_slot(f->members[i], strlen(f->members[i])) == slot)
			argv[argc++] = f->members[i++];
		f->cmds[f->ncmds++] = ck_send_strings(b, argv[1], argc, argv);
	}
	f->cmd_first[f->ncmds] = f->nmembers;
	pfree(argv);
}


/* Send the commands of a tag flush's next step. */
static void
ck_append_flush_step(CkBatch *b, CkFlush *f)
{
	const char *argv[5] = {"EVALSHA", NULL, "1", f->private_set, CppAsString2(CK_CHUNK)};

	f->ncmds = 1;
	f->cmds = palloc(sizeof(CkCmd *));
	switch (f->phase)
	{
		case CK_FLUSH_BEGIN:
			argv[1] = script_sha[CK_SCRIPT_FLUSH_BEGIN];
			argv[2] = "2";
			argv[3] = f->set;
			argv[4] = f->private_set;
			f->cmds[0] = ck_send_strings(b, f->set, 5, argv);
			break;
		case CK_FLUSH_DRAIN:
			argv[1] = script_sha[CK_SCRIPT_FLUSH_DRAIN];
			f->cmds[0] = ck_send_strings(b, f->private_set, 5, argv);
			break;
		case CK_FLUSH_PICK:
			argv[0] = "SRANDMEMBER";
			argv[1] = f->private_set;
			argv[2] = CppAsString2(CK_CHUNK);
			f->cmds[0] = ck_send_strings(b, f->private_set, 3, argv);
			break;
		case CK_FLUSH_DELETE:
			ck_append_member_unlinks(b, f);
			break;
		case CK_FLUSH_REMOVE:
			{
				const char **srem = palloc(sizeof(char *) * (f->nmembers + 2));

				srem[0] = "SREM";
				srem[1] = f->private_set;
				memcpy(srem + 2, f->members, sizeof(char *) * f->nmembers);
				f->cmds[0] = ck_send_strings(b, f->private_set, f->nmembers + 2, srem);
				pfree(srem);
				break;
			}
		case CK_FLUSH_DONE:
			f->ncmds = 0;
			break;
	}
}

/*
 * Cluster: some of a chunk's UNLINKs were refused. The members whose
 * delete was acknowledged leave the private set now; the others stay for
 * the flush's retry. False on a lost connection.
 */
static bool
ck_remove_deleted(CkBatch *b, CkFlush *f, const bool *deleted, char **errmsg)
{
	int			n = 0;
	CkReply		reply;

	for (int c = 0; c < f->ncmds; c++)
		for (int m = f->cmd_first[c]; deleted[c] && m < f->cmd_first[c + 1]; m++)
			f->members[n++] = f->members[m];
	if (n == 0)
		return true;
	f->nmembers = n;
	f->phase = CK_FLUSH_REMOVE;
	ck_append_flush_step(b, f);
	b->stats->tag_keys_deleted += n;
	return ck_recv(b->topo, f->cmds[0], &reply, errmsg);
}

/* A chunk emptied the private set: rename the tag's set next, or done. */
static void
ck_flush_drained(CkFlush *f)
{
	f->phase = f->begin_again ? CK_FLUSH_BEGIN : CK_FLUSH_DONE;
	f->begin_again = false;
}

/* Move a tag's flush on by the replies of its step (all of them OK). */
static void
ck_advance_flush(CkBatch *b, CkFlush *f, const CkReply *reply)
{
	switch (f->phase)
	{
		case CK_FLUSH_BEGIN:
			f->begin_again = (reply->integer == 2);
			f->phase = reply->integer == 0 ? CK_FLUSH_DONE :
				b->cluster ? CK_FLUSH_PICK : CK_FLUSH_DRAIN;
			break;
		case CK_FLUSH_DRAIN:
			b->stats->tag_keys_deleted += reply->integer;
			if (reply->integer < CK_CHUNK)
				ck_flush_drained(f);
			break;
		case CK_FLUSH_PICK:
			f->members = palloc(sizeof(char *) * (reply->nelems + 1));
			f->nmembers = 0;
			for (int i = 0; i < reply->nelems; i++)
				if (reply->elems[i])
					f->members[f->nmembers++] = reply->elems[i];
			if (f->nmembers == 0)
				ck_flush_drained(f);
			else
				f->phase = CK_FLUSH_DELETE;
			break;
		case CK_FLUSH_DELETE:
			b->stats->tag_keys_deleted += f->nmembers;
			f->phase = CK_FLUSH_REMOVE;
			break;
		case CK_FLUSH_REMOVE:
			if (f->nmembers < CK_CHUNK)
				ck_flush_drained(f);
			else
				f->phase = CK_FLUSH_PICK;
			break;
		case CK_FLUSH_DONE:
			break;
	}
	if (f->phase == CK_FLUSH_DONE)
		b->stats->tags_flushed++;
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
	plan->slot = ck_topology_slot(b->topo, g->str);
	plan->cmd = NULL;
	plan->setcmds = NIL;
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

/*
 * One element of a script's array reply, for one tag or key: a one-digit
 * answer among "digits" as an integer reply, anything else as the error
 * that refused it.
 */
static void
ck_reply_element(const CkReply *arr, int i, const char *digits, CkReply *out)
{
	const char *v = (i < arr->nelems) ? arr->elems[i] : NULL;

	memset(out, 0, sizeof(CkReply));
	if (v != NULL && v[0] != '\0' && v[1] == '\0' && strchr(digits, v[0]) != NULL)
	{
		out->status = CK_REPLY_OK;
		out->integer = v[0] - '0';
	}
	else
	{
		out->status = CK_REPLY_ERROR;
		out->error = pstrdup(v ? v : "ERR unexpected reply from a cachekit script");
	}
}

/* keys in one call of the apply script at most, and bytes of their values */
#define CK_APPLY_KEYS 100
#define CK_APPLY_BYTES (256 * 1024)

/* What a key's plan adds to an apply call: KEYS, ARGV and value bytes. */
static void
ck_apply_size(CkBatch *b, CkKeyPlan *plan, int *nkeys, Size *bytes)
{
	CkEntry    *w = plan->final_write;
	ListCell   *lc;

	*nkeys = 1;
	*bytes = strlen(plan->group->str) + 64;
	if (w != NULL && w->value != NULL)
		*bytes += strlen(w->value);
	if (b->cluster)
		return;
	*nkeys += (w ? w->ntags : 0) + list_length(plan->leaves);
	for (int t = 0; w != NULL && t < w->ntags; t++)
		*bytes += strlen(w->tags[t]);
	foreach(lc, plan->leaves)
		*bytes += strlen((char *) lfirst(lc));
}

/*
 * Add a key's KEYS and ARGV for the apply script (its sets only on one
 * node: in a cluster each set is changed in its own slot).
 */
static void
ck_apply_args(CkBatch *b, CkKeyPlan *plan, const char **keys, int *nkeys,
			  const char **args, int *nargs)
{
	CkEntry    *w = plan->final_write;
	int			njoin = (w != NULL && !b->cluster) ? w->ntags : 0;
	int			nleave = b->cluster ? 0 : list_length(plan->leaves);

	keys[(*nkeys)++] = plan->group->str;
	for (int t = 0; t < njoin; t++)
		keys[(*nkeys)++] = psprintf("%s%s", ck_tag_prefix, w->tags[t]);
	for (int t = 0; t < nleave; t++)
		keys[(*nkeys)++] = psprintf("%s%s", ck_tag_prefix, (char *) list_nth(plan->leaves, t));
	args[(*nargs)++] = w ? "set" : "del";
	args[(*nargs)++] = w && w->value ? w->value : "";
	args[(*nargs)++] = psprintf("%d", w ? w->ttl : 0);
	args[(*nargs)++] = psprintf("%d", njoin);
	args[(*nargs)++] = psprintf("%d", nleave);
}

/* Cluster: send a key's joins and leaves of sets, each in the set's slot. */
static void
ck_append_set_changes(CkBatch *b, CkKeyPlan *plan)
{
	CkEntry    *w = plan->final_write;
	char	   *ttl = psprintf("%d", w ? w->ttl : 0);
	ListCell   *lc;

	for (int t = 0; w != NULL && t < w->ntags; t++)
	{
		char	   *set = psprintf("%s%s", ck_tag_prefix, w->tags[t]);
		const char *join[6] = {"EVALSHA", script_sha[CK_SCRIPT_JOIN], "1", set,
		plan->group->str, ttl};

		plan->setcmds = lappend(plan->setcmds, ck_send_strings(b, set, 6, join));
	}
	foreach(lc, plan->leaves)
	{
		char	   *set = psprintf("%s%s", ck_tag_prefix, (char *) lfirst(lc));
		const char *leave[3] = {"SREM", set, plan->group->str};

		plan->setcmds = lappend(plan->setcmds, ck_send_strings(b, set, 3, leave));
	}
}

/*
 * Send the apply script for plans[first..first+count): one call with all
 * their KEYS and ARGV, each plan told its place in the reply.
 */
static void
ck_append_apply_call(CkBatch *b, CkKeyPlan **plans, int first, int count, int nkeys)
{
	const char **argv = palloc(sizeof(char *) * (3 + nkeys + 5 * count));
	const char **args = palloc(sizeof(char *) * (5 * count));
	int			nk = 0;
	int			na = 0;
	CkCmd	   *cmd;

	argv[0] = "EVALSHA";
	argv[1] = script_sha[CK_SCRIPT_APPLY];
	argv[2] = psprintf("%d", nkeys);
	for (int p = first; p < first + count; p++)
		ck_apply_args(b, plans[p], argv + 3, &nk, args, &na);
	memcpy(argv + 3 + nk, args, sizeof(char *) * na);
	cmd = ck_send_strings(b, plans[first]->group->str, 3 + nk + na, argv);
	for (int p = first; p < first + count; p++)
	{
		plans[p]->cmd = cmd;
		plans[p]->apply_elem = p - first;
		plans[p]->apply_count = count;
		if (b->cluster)
			ck_append_set_changes(b, plans[p]);
	}
	pfree(args);
	pfree(argv);
}

/*
 * Send what applies the keys' final states, in the order of plans: on one
 * node, calls of up to CK_APPLY_KEYS keys and CK_APPLY_BYTES (one key alone
 * if "alone"); in a cluster each key alone in its slot, its sets after it.
 */
static void
ck_append_applies(CkBatch *b, CkKeyPlan **plans, int nplans, bool alone)
{
	int			max = (alone || b->cluster) ? 1 : CK_APPLY_KEYS;

	for (int first = 0; first < nplans;)
	{
		int			count = 0;
		int			nkeys = 0;
		Size		bytes = 0;

		while (first + count < nplans && count < max)
		{
			int			k;
			Size		sz;

			ck_apply_size(b, plans[first + count], &k, &sz);
			if (count > 0 && bytes + sz > CK_APPLY_BYTES)
				break;
			nkeys += k;
			bytes += sz;
			count++;
		}
		ck_append_apply_call(b, plans, first, count, nkeys);
		first += count;
	}
}

/*
 * A key's outcome (its element of the apply reply): a refusal, of the
 * script or (cluster) of a set, fails its entries; a value written while a
 * set refused is deleted (a miss, never a value its tags do not know).
 * False on a lost connection.
 */
static bool
ck_apply_outcome(CkBatch *b, CkKeyPlan *plan, const CkReply *reply, char **errmsg)
{
	CkReply		sreply;
	ListCell   *lc;
	bool		sets_ok = true;

	if (reply->status != CK_REPLY_OK)
		ck_fail_group(b->entries, plan->group, reply);
	foreach(lc, plan->setcmds)
	{
		if (!ck_recv(b->topo, lfirst(lc), &sreply, errmsg))
			return false;
		if (sreply.status != CK_REPLY_OK)
		{
			ck_fail_group(b->entries, plan->group, &sreply);
			sets_ok = false;
		}
	}
	if (reply->status == CK_REPLY_OK && !sets_ok && plan->final_write)
	{
		const char *argv[2] = {"UNLINK", plan->group->str};

		return ck_recv(b->topo, ck_send_strings(b, plan->group->str, 2, argv), &sreply, errmsg);
	}
	if (reply->status == CK_REPLY_OK && sets_ok)
	{
		if (plan->final_write)
			b->stats->keys_written++;
		else
			b->stats->keys_deleted++;
	}
	return true;
}

/*
 * Read what ck_append_applies sent for plans, in order. A call of several
 * keys refused as a whole for a reason that may concern one key only (an
 * ACL key pattern) is sent again key by key, and read, before anything
 * else goes out: a tag flush after them must come after their writes.
 * False on a lost connection.
 */
static bool
ck_read_applies(CkBatch *b, CkKeyPlan **plans, int nplans, char **errmsg)
{
	CkKeyPlan **again = palloc(sizeof(CkKeyPlan *) * (nplans + 1));
	int			nagain = 0;
	CkCmd	   *read = NULL;
	CkReply		reply;

	for (int p = 0; p < nplans; p++)
	{
		CkReply		one;

		if (plans[p]->cmd != read)
		{
			if (!ck_recv(b->topo, plans[p]->cmd, &reply, errmsg))
				return false;
			read = plans[p]->cmd;
		}
		if (reply.status != CK_REPLY_OK && plans[p]->apply_count > 1 &&
			ck_error_class(reply.error) == CK_ERRCLASS_ENTRY)
		{
			again[nagain++] = plans[p];
			continue;
		}
		if (reply.status == CK_REPLY_OK && plans[p]->apply_count > 1)
			ck_reply_element(&reply, plans[p]->apply_elem, "1", &one);
		else
			one = reply;		/* a call of one key answers for it alone */
		if (!ck_apply_outcome(b, plans[p], &one, errmsg))
			return false;
	}
	if (nagain == 0)
		return true;
	ck_append_applies(b, again, nagain, true);
	return ck_read_applies(b, again, nagain, errmsg);
}

/* Send one UNLINK of plans[0..count). */
static CkCmd *
ck_append_unlink(CkBatch *b, CkKeyPlan **plans, int count)
{
	const char **argv = palloc(sizeof(char *) * (count + 1));
	CkCmd	   *cmd;

	argv[0] = "UNLINK";
	for (int k = 0; k < count; k++)
		argv[k + 1] = plans[k]->group->str;
	cmd = ck_send_strings(b, argv[1], count + 1, argv);
	pfree(argv);
	return cmd;
}

/* Order key plans by slot. */
static int
ck_plan_slot_cmp(const void *a, const void *b)
{
	return (*(CkKeyPlan *const *) a)->slot - (*(CkKeyPlan *const *) b)->slot;
}

/*
 * Cut the plain deletes into UNLINK chunks of CK_CHUNK keys at most, each
 * in one slot (in a cluster, the plans are sorted by slot first).
 */
static int
ck_chunk_unlinks(CkBatch *b, CkKeyPlan **simple, int nsimple, CkChunk **chunks_out)
{
	CkChunk    *chunks = palloc0(sizeof(CkChunk) * (nsimple + 1));
	int			nchunks = 0;

	if (b->cluster)
		qsort(simple, nsimple, sizeof(CkKeyPlan *), ck_plan_slot_cmp);
	for (int k = 0; k < nsimple; k++)
	{
		CkChunk    *c = nchunks > 0 ? &chunks[nchunks - 1] : NULL;

		if (c == NULL || c->count == CK_CHUNK || simple[c->first]->slot != simple[k]->slot)
		{
			c = &chunks[nchunks++];
			c->first = k;
		}
		c->count++;
	}
	*chunks_out = chunks;
	return nchunks;
}

/*
 * Read the replies of the UNLINK chunks. A chunk refused as a whole for a
 * reason that may concern one key only (an ACL key pattern) is marked
 * split, to be retried key by key; otherwise its keys' entries fail.
 */
static bool
ck_read_unlinks(CkBatch *b, CkKeyPlan **simple, CkChunk *chunks, int nchunks, char **errmsg)
{
	for (int c = 0; c < nchunks; c++)
	{
		CkReply		reply;
		CkChunk    *ch = &chunks[c];

		if (!ck_recv(b->topo, ch->cmd, &reply, errmsg))
			return false;
		if (reply.status == CK_REPLY_OK)
			b->stats->keys_deleted += ch->count;
		else if (ch->count > 1 && ck_error_class(reply.error) == CK_ERRCLASS_ENTRY)
			ch->split = true;
		else
			for (int k = 0; k < ch->count; k++)
				ck_fail_group(b->entries, simple[ch->first + k]->group, &reply);
	}
	return true;
}

/* Retry the keys of the refused UNLINK chunks one by one. */
static bool
ck_split_unlinks(CkBatch *b, CkKeyPlan **simple, CkChunk *chunks, int nchunks, char **errmsg)
{
	for (int c = 0; c < nchunks; c++)
	{
		if (!chunks[c].split)
			continue;
		chunks[c].singles = palloc(sizeof(CkCmd *) * chunks[c].count);
		for (int k = 0; k < chunks[c].count; k++)
			chunks[c].singles[k] = ck_append_unlink(b, &simple[chunks[c].first + k], 1);
	}
	for (int c = 0; c < nchunks; c++)
	{
		if (!chunks[c].split)
			continue;
		for (int k = 0; k < chunks[c].count; k++)
		{
			CkReply		reply;

			if (!ck_recv(b->topo, chunks[c].singles[k], &reply, errmsg))
				return false;
			if (reply.status == CK_REPLY_OK)
				b->stats->keys_deleted++;
			else
				ck_fail_group(b->entries, simple[chunks[c].first + k]->group, &reply);
		}
	}
	return true;
}

/*
 * The private name a tag's set is drained from. On one node it is the
 * set's name behind a prefix; in a cluster a {hash tag} of the set's slot
 * comes first, so that the set and its private name share a slot.
 */
static char *
ck_private_set(CkBatch *b, const char *set)
{
	if (!b->cluster)
		return psprintf("cachekit:flushing:%s", set);
	return psprintf("cachekit:flushing:{%s}%s", ck_slot_tag(ck_key_slot(set, strlen(set))), set);
}

/* One node: begin the flushes in calls of CK_CHUNK tags at most. */
static void
ck_append_begins(CkBatch *b, CkFlush *flushes, int ntags)
{
	const char **argv = palloc(sizeof(char *) * (2 * Min(ntags, CK_CHUNK) + 3));

	for (int first = 0; first < ntags; first += CK_CHUNK)
	{
		int			count = Min(ntags - first, CK_CHUNK);
		int			argc = 0;
		CkCmd	   *cmd;

		argv[argc++] = "EVALSHA";
		argv[argc++] = script_sha[CK_SCRIPT_FLUSH_BEGIN];
		argv[argc++] = psprintf("%d", 2 * count);
		for (int t = first; t < first + count; t++)
		{
			argv[argc++] = flushes[t].set;
			argv[argc++] = flushes[t].private_set;
		}
		cmd = ck_send_strings(b, flushes[first].set, argc, argv);
		for (int t = first; t < first + count; t++)
		{
			flushes[t].begin_cmd = cmd;
			flushes[t].begin_elem = t - first;
			flushes[t].begin_count = count;
		}
	}
	pfree(argv);
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
		flushes[t].private_set = ck_private_set(b, flushes[t].set);
		flushes[t].phase = CK_FLUSH_BEGIN;
		if (b->cluster)
			ck_append_flush_step(b, &flushes[t]);
	}
	if (!b->cluster)
		ck_append_begins(b, flushes, ntags);
	*nflushes = ntags;
	return flushes;
}

/* A step's outcome for a flush: a refusal fails it (its entries too), else it moves on. */
static void
ck_flush_outcome(CkBatch *b, CkFlush *f, const CkReply *reply)
{
	if (reply->status != CK_REPLY_OK)
	{
		ck_fail_group(b->entries, f->group, reply);
		f->failed = true;
	}
	else
		ck_advance_flush(b, f, reply);
}

/*
 * One node: read the shared begins. A call refused as a whole for a reason
 * that may concern one tag only (an ACL key pattern) leaves its tags in
 * the begin phase, to be sent alone next; otherwise its tags fail with it.
 */
static bool
ck_read_begins(CkBatch *b, CkFlush *flushes, int ntags, char **errmsg)
{
	CkReply		reply;
	CkCmd	   *read = NULL;

	for (int t = 0; t < ntags; t++)
	{
		CkFlush    *f = &flushes[t];
		CkReply		one;

		if (f->begin_cmd != read)
		{
			if (!ck_recv(b->topo, f->begin_cmd, &reply, errmsg))
				return false;
			read = f->begin_cmd;
		}
		f->begin_cmd = NULL;
		if (reply.status != CK_REPLY_OK && f->begin_count > 1 &&
			ck_error_class(reply.error) == CK_ERRCLASS_ENTRY)
			continue;
		if (reply.status == CK_REPLY_OK)
			ck_reply_element(&reply, f->begin_elem, "012", &one);
		else
			one = reply;
		ck_flush_outcome(b, f, &one);
	}
	return true;
}

/*
 * Read the replies of a flush's step; any refusal fails the flush (what is
 * left stays in the private set). Then move it on.
 */
static bool
ck_read_flush_step(CkBatch *b, CkFlush *f, char **errmsg)
{
	CkReply		reply;
	CkReply		first;
	bool	   *ok = palloc(sizeof(bool) * (f->ncmds + 1));

	memset(&first, 0, sizeof(first));
	for (int i = 0; i < f->ncmds; i++)
	{
		if (!ck_recv(b->topo, f->cmds[i], &reply, errmsg))
			return false;
		ok[i] = (reply.status == CK_REPLY_OK);
		if (i == 0 || (!ok[i] && first.status == CK_REPLY_OK))
			first = reply;
	}
	if (f->phase == CK_FLUSH_BEGIN && first.status == CK_REPLY_OK)
		ck_reply_element(&reply, 0, "012", &first);
	ck_flush_outcome(b, f, &first);
	if (f->failed && f->phase == CK_FLUSH_DELETE)
		return ck_remove_deleted(b, f, ok, errmsg);
	return true;
}

/*
 * Read flush replies and send next steps until every flush is done or
 * failed (in a cluster, the first steps were sent by ck_start_flushes; on
 * one node, the shared begins are read first).
 */
static bool
ck_run_flushes(CkBatch *b, CkFlush *flushes, int ntags, char **errmsg)
{
	bool		sent = b->cluster;

	if (!b->cluster && !ck_read_begins(b, flushes, ntags, errmsg))
		return false;
	for (;;)
	{
		int			active = 0;

		for (int t = 0; t < ntags; t++)
		{
			if (flushes[t].phase == CK_FLUSH_DONE || flushes[t].failed)
				continue;
			if (!sent)
				ck_append_flush_step(b, &flushes[t]);
			active++;
		}
		if (active == 0)
			return true;
		for (int t = 0; t < ntags; t++)
		{
			if (flushes[t].phase == CK_FLUSH_DONE || flushes[t].failed)
				continue;
			if (!ck_read_flush_step(b, &flushes[t], errmsg))
				return false;
		}
		sent = false;
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * Deliver pipeline s: plain deletes and key scripts of the keys planned
 * for it first, then the tag flushes of its entries, then refused UNLINK
 * chunks again key by key. Where there are key scripts, their replies are
 * read before the flushes go out (a call refused as a whole is sent again
 * key by key, and must still come before them).
 */
static bool
ck_deliver_segment(CkBatch *b, int s, char **errmsg)
{
	CkKeyPlan **simple = palloc(sizeof(CkKeyPlan *) * (b->nkeys + 1));
	CkKeyPlan **applied = palloc(sizeof(CkKeyPlan *) * (b->nkeys + 1));
	int			nsimple = 0;
	int			napplied = 0;
	CkChunk    *chunks;
	int			nchunks;
	CkFlush    *flushes = NULL;
	int			ntags = 0;

	/* plain deletes; key scripts, writes before deletes (apply_script on OOM) */
	for (int k = 0; k < b->nkeys; k++)
		if (b->plans[k].segment == s && b->plans[k].simple)
			simple[nsimple++] = &b->plans[k];
		else if (b->plans[k].segment == s && b->plans[k].final_write)
			applied[napplied++] = &b->plans[k];
	for (int k = 0; k < b->nkeys; k++)
		if (b->plans[k].segment == s && !b->plans[k].simple && !b->plans[k].final_write)
			applied[napplied++] = &b->plans[k];
	nchunks = ck_chunk_unlinks(b, simple, nsimple, &chunks);

	/* round one: plain deletes, key scripts, first step of every flush */
	for (int c = 0; c < nchunks; c++)
		chunks[c].cmd = ck_append_unlink(b, &simple[chunks[c].first], chunks[c].count);
	ck_append_applies(b, applied, napplied, false);
	if (napplied == 0)
		flushes = ck_start_flushes(b, s, &ntags);

	/* replies, in the same order */
	if (!ck_read_unlinks(b, simple, chunks, nchunks, errmsg) ||
		!ck_read_applies(b, applied, napplied, errmsg))
		return false;
	if (napplied > 0)
		flushes = ck_start_flushes(b, s, &ntags);

	/* further rounds: one step of every unfinished flush at a time */
	if (!ck_run_flushes(b, flushes, ntags, errmsg))
		return false;
	return ck_split_unlinks(b, simple, chunks, nchunks, errmsg);
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
ck_deliver(CkTopology *topo, CkEntry *entries, int n, CkDeliveryStats *stats, char **errmsg)
{
	CkBatch		b;
	CkGroup    *keys;
	int			nsegments;

	memset(stats, 0, sizeof(CkDeliveryStats));
	if (!ck_route_begin(topo, errmsg))
		return false;
	b.topo = topo;
	b.cluster = (topo->mode == CK_MODE_CLUSTER);
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
