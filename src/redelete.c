/*-------------------------------------------------------------------------
 *
 * redelete.c
 *	  The delayed second delete (cachekit.redelete_after): every key an
 *	  invalidation deleted, and every tag it flushed, is deleted and flushed
 *	  once more that long after the first delivery.
 *
 * A cache-aside reader that read the old row before a commit and writes it
 * to Redis after cachekit's delete leaves a stale value behind; when its
 * read-to-fill time is shorter than the delay, the second delete removes
 * that value. No client change is needed.
 *
 * Pending second deletes live in the worker's memory only, as a FIFO of
 * delivered batches (their keys and tags copied), so a crash or restart of
 * the worker loses those not yet due. Their memory is bounded by
 * CK_REDELETE_MAX_BYTES: while they hold more, the oldest pending batches
 * are sent at once, earlier than due, to make room (an
 * early second delete still removes what was filled before it; nothing is
 * dropped). Invalidation entries (key deletes and tag flushes) and
 * write-through deletes are repeated as they are. A key that write-through
 * wrote is deleted a second time only if it no longer holds the value
 * written (compared in a script), so the reads write-through serves stay
 * hits while a stale value a reader put back over it goes; of several
 * writes of one key in a batch only the last one is kept.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "lib/ilist.h"
#include "utils/memutils.h"

/* the most memory pending second deletes may hold */
#define CK_REDELETE_MAX_BYTES (32 * 1024 * 1024)

/*
 * A second delete waits up to this much longer than the delay, so that
 * the batches of that span go out together: a key or tag they share is
 * deleted or flushed once, not once per pass of the worker.
 */
#define CK_REDELETE_GATHER_MS 50

/* one delivered batch's keys and tags, due again at "due" */
typedef struct CkPending
{
	dlist_node	node;
	TimestampTz due;
	Size		bytes;			/* charged against CK_REDELETE_MAX_BYTES */
	int			nkeys;
	char	  **keys;
	int			ntags;
	char	  **tags;
	int			nwrites;		/* write-through keys and their values */
	char	  **wkeys;
	char	  **wvalues;
} CkPending;

/*
 * KEYS[1] a key write-through wrote, ARGV[1] the value: delete the key
 * unless it still holds that value.
 */
static const char *unless_written_script =
"if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end\n"
"return redis.call('UNLINK', KEYS[1])\n";

/*
 * Each target of the worker has its own pending second deletes, sent on its
 * own connection: pending and pending_bytes are the selected target's.
 */
static dlist_head pendings[CK_MAX_TARGETS];
static Size pendings_bytes[CK_MAX_TARGETS];
static dlist_head *pending = NULL;
static Size pending_bytes = 0;
static int	selected = 0;

/* Make target number i (0 to CK_MAX_TARGETS - 1) the selected one. */
void
ck_redelete_select(int i)
{
	Assert(i >= 0 && i < CK_MAX_TARGETS);
	if (pending == NULL)
		for (int t = 0; t < CK_MAX_TARGETS; t++)
			dlist_init(&pendings[t]);
	pendings_bytes[selected] = pending_bytes;
	selected = i;
	pending = &pendings[i];
	pending_bytes = pendings_bytes[i];
}
static MemoryContext redelete_cxt = NULL;	/* the pending batches */
static MemoryContext send_cxt = NULL;	/* one sending, reset after it */

/* Copy n strings into the redelete context; adds their size to *bytes. */
static void
ck_copy_strings(char **dst, int *ndst, char **src, int n, Size *bytes)
{
	for (int i = 0; i < n; i++)
	{
		dst[(*ndst)++] = pstrdup(src[i]);
		*bytes += strlen(src[i]) + 1 + sizeof(char *);
	}
}

/*
 * The batch's write-through entries, the last one per key only (the value
 * the key was left with): returns how many keys, each with its entries in
 * queue order in *groups (palloc'd; ck_group_items of deliver.c).
 */
static int
ck_last_writes(CkEntry *entries, int n, CkGroup **groups)
{
	CkItem	   *items = palloc(sizeof(CkItem) * Max(n, 1));
	int			nitems = 0;
	int			ngroups;

	for (int i = 0; i < n; i++)
		if (!entries[i].failed && entries[i].kind == CK_KIND_WRITE &&
			entries[i].nkeys > 0 && entries[i].value != NULL)
			items[nitems++] = (CkItem) {entries[i].keys[0], i};
	ngroups = ck_group_items(items, nitems, groups);
	pfree(items);
	return ngroups;
}

/* Free what ck_last_writes returned. */
static void
ck_free_writes(CkGroup *groups, int n)
{
	for (int i = 0; i < n; i++)
		pfree(groups[i].entries);
	pfree(groups);
}

/* Remember the deletes and flushes of a delivered batch for a second time. */
void
ck_redelete_remember(CkEntry *entries, int n)
{
	MemoryContext old;
	CkPending  *p;
	CkGroup    *writes;
	int			nwrites;
	int			nkeys = 0;
	int			ntags = 0;

	if (ck_redelete_after <= 0)
		return;
	if (pending == NULL)
		ck_redelete_select(0);
	for (int i = 0; i < n; i++)
	{
		if (entries[i].failed || entries[i].kind == CK_KIND_WRITE)
			continue;
		nkeys += entries[i].nkeys;
		if (entries[i].kind == CK_KIND_INVALIDATE)
			ntags += entries[i].ntags;
	}
	nwrites = ck_last_writes(entries, n, &writes);
	if (nkeys + ntags + nwrites == 0)
	{
		ck_free_writes(writes, nwrites);
		return;
	}

	if (redelete_cxt == NULL)
		redelete_cxt = AllocSetContextCreate(TopMemoryContext, "cachekit redelete",
											 ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(redelete_cxt);
	p = palloc0(sizeof(CkPending));
	p->keys = palloc(sizeof(char *) * Max(nkeys, 1));
	p->tags = palloc(sizeof(char *) * Max(ntags, 1));
	p->wkeys = palloc(sizeof(char *) * Max(nwrites, 1));
	p->wvalues = palloc(sizeof(char *) * Max(nwrites, 1));
	p->bytes = sizeof(CkPending);
	for (int i = 0; i < nwrites; i++)
	{
		int			nvalues = p->nwrites;
		CkGroup    *g = &writes[i];

		ck_copy_strings(p->wkeys, &p->nwrites, (char **) &g->str, 1, &p->bytes);
		ck_copy_strings(p->wvalues, &nvalues,
						&entries[g->entries[g->nentries - 1]].value, 1, &p->bytes);
	}
	for (int i = 0; i < n; i++)
	{
		if (entries[i].failed || entries[i].kind == CK_KIND_WRITE)
			continue;
		ck_copy_strings(p->keys, &p->nkeys, entries[i].keys, entries[i].nkeys, &p->bytes);
		if (entries[i].kind == CK_KIND_INVALIDATE)
			ck_copy_strings(p->tags, &p->ntags, entries[i].tags, entries[i].ntags, &p->bytes);
	}
	MemoryContextSwitchTo(old);
	ck_free_writes(writes, nwrites);
	p->due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ck_redelete_after);
	dlist_push_tail(pending, &p->node);
	pending_bytes += p->bytes;
}

/* Milliseconds until the next second delete is due (-1: none pending). */
long
ck_redelete_next_ms(void)
{
	CkPending  *p;
	long		secs;
	int			usecs;

	if (pending == NULL || dlist_is_empty(pending))
		return -1;
	if (pending_bytes > CK_REDELETE_MAX_BYTES)
		return 0;
	p = dlist_head_element(CkPending, node, pending);
	TimestampDifference(GetCurrentTimestamp(),
						TimestampTzPlusMilliseconds(p->due, CK_REDELETE_GATHER_MS),
						&secs, &usecs);
	return secs * 1000 + (usecs + 999) / 1000;
}

/* Forget a pending batch. */
static void
ck_pending_free(CkPending *p)
{
	dlist_delete(&p->node);
	pending_bytes -= p->bytes;
	for (int i = 0; i < p->nkeys; i++)
		pfree(p->keys[i]);
	for (int i = 0; i < p->ntags; i++)
		pfree(p->tags[i]);
	for (int i = 0; i < p->nwrites; i++)
	{
		pfree(p->wkeys[i]);
		pfree(p->wvalues[i]);
	}
	pfree(p->keys);
	pfree(p->tags);
	pfree(p->wkeys);
	pfree(p->wvalues);
	pfree(p);
}

/*
 * The second delete of the keys write-through wrote in the first n pending
 * batches: each is deleted unless it still holds the value written. Only a
 * lost connection counts as failure.
 */
static bool
ck_redelete_writes(CkTopology *topo, int n, char **errmsg)
{
	dlist_iter	it;
	List	   *sent = NIL;
	ListCell   *lc;
	int			done = 0;

	dlist_foreach(it, pending)
	{
		CkPending  *p = dlist_container(CkPending, node, it.cur);

		if (done++ == n)
			break;
		for (int i = 0; i < p->nwrites; i++)
		{
			const char *argv[5] = {"EVAL", unless_written_script, "1", p->wkeys[i], p->wvalues[i]};
			size_t		lens[5] = {4, strlen(unless_written_script), 1,
			strlen(p->wkeys[i]), strlen(p->wvalues[i])};

			sent = lappend(sent, ck_send(topo, p->wkeys[i], 5, argv, lens));
		}
	}
	foreach(lc, sent)
	{
		CkReply		reply;

		if (!ck_recv(topo, lfirst(lc), &reply, errmsg))
			return false;
	}
	return true;
}

/*
 * Send the second deletes that are due (and, over the memory bound, the
 * oldest ones early). Needs a live Redis connection; returns false when
 * Redis failed, with the pending batches kept for the next try. Refusals
 * (a tag's set holding a string, say) are not retried: the first delivery
 * already dealt with them.
 */
bool
ck_redelete_run_due(CkTopology *topo, char **errmsg)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		over = pending_bytes > CK_REDELETE_MAX_BYTES;
	CkEntry    *entries;
	dlist_iter	it;
	int			n = 0;
	int			seen = 0;
	int			max = 0;
	CkDeliveryStats stats;
	MemoryContext old;
	bool		ok;

	if (pending == NULL || dlist_is_empty(pending) ||
		(!over && TimestampTzPlusMilliseconds(dlist_head_element(CkPending, node, pending)->due,
											  CK_REDELETE_GATHER_MS) > now))
		return true;
	/* every due batch; over the bound, at least the oldest one, early */
	dlist_foreach(it, pending)
	{
		if (dlist_container(CkPending, node, it.cur)->due > now && !(over && max == 0))
			break;
		max++;
	}

	/* what delivery allocates goes with the sending */
	if (send_cxt == NULL)
		send_cxt = AllocSetContextCreate(TopMemoryContext, "cachekit redelete send",
										 ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(send_cxt);
	entries = palloc0(sizeof(CkEntry) * max);
	dlist_foreach(it, pending)
	{
		CkPending  *p = dlist_container(CkPending, node, it.cur);

		if (seen++ == max)
			break;
		if (p->nkeys + p->ntags == 0)
			continue;
		entries[n].id = n;
		entries[n].kind = CK_KIND_INVALIDATE;
		entries[n].nkeys = p->nkeys;
		entries[n].keys = p->keys;
		entries[n].ntags = p->ntags;
		entries[n].tags = p->tags;
		n++;
	}
	ok = (n == 0 || ck_deliver(topo, entries, n, &stats, errmsg)) &&
		ck_route_begin(topo, errmsg) && ck_redelete_writes(topo, max, errmsg);
	MemoryContextSwitchTo(old);
	if (!ok)
	{
		/* the message outlives the sending */
		*errmsg = pstrdup(*errmsg ? *errmsg : "Redis failed during second deletes");
		MemoryContextReset(send_cxt);
		return false;
	}
	MemoryContextReset(send_cxt);
	for (int i = 0; i < max; i++)
		ck_pending_free(dlist_head_element(CkPending, node, pending));
	/* over the bound still: the next loop runs at once */
	return true;
}
