/*-------------------------------------------------------------------------
 *
 * pending.c
 *	  A transaction's queue entries, gathered in memory and written to the
 *	  queue table just before it commits or prepares.
 *
 * Every enqueue of a transaction (row and statement triggers, the manual
 * functions) comes here, in the order it happens. Consecutive
 * invalidations of one subtransaction become one entry, each key and tag
 * in it once: a transaction of ten single-row UPDATEs writes one entry, not
 * ten, and the worker delivers one. Entries of other kinds (write-through
 * values and drops) stay entries of their own, in their place, so the
 * order of a key's work is kept. Nothing is written for a transaction or
 * subtransaction that rolls back, as before; entries are written at
 * XACT_EVENT_PRE_COMMIT and PRE_PREPARE, so a prepared transaction holds
 * its entries in the queue (WAL-logged) like any other work it did.
 *
 * Memory stays bounded: an entry that reaches the size of a statement
 * trigger's entry is full, and the entries gathered so far are then
 * written at once. When that happens in a subtransaction, entries that an
 * enclosing (sub)transaction made are written with it and would vanish
 * with it if it rolled back: those are kept in memory, and put back in
 * front of the pending entries when that happens.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "access/xact.h"
#include "common/hashfn.h"
#include "utils/datum.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

/* the bounds of one merged entry: those of a statement trigger's entries (trigger.c) */
#define CK_PENDING_MAX_STRINGS 1000
#define CK_PENDING_MAX_BYTES 7168
/* an invalidation this large (a statement's chunk) is written at once */
#define CK_PENDING_LARGE 100
/* slots of an entry's hash of its strings (power of two, > 2 * max strings) */
#define CK_PENDING_SLOTS 2048
/* strings an entry holds before it hashes them */
#define CK_PENDING_LINEAR 16

/* one invalidation entry not written yet */
typedef struct CkPending
{
	Oid			queue;			/* the queue table it goes into */
	Datum		targets;		/* the targets it is for (queue.c), 0: default */
	List	   *keys;
	List	   *tags;
	SubTransactionId owner;		/* the subtransaction that made it */
	SubTransactionId writer;	/* written by this one (0: not written) */
	int			nstrings;
	Size		bytes;
	char	  **slots;			/* hash of keys and tags, once large */
} CkPending;

/* the entries of this transaction: pending ones, and written ones kept */
static List *pending = NIL;
static List *written_for_parent = NIL;
static MemoryContext pending_cxt = NULL;
static bool callbacks_registered = false;

static void ck_pending_write_all(void);

/* Forget everything (the transaction ended; its memory goes with it). */
static void
ck_pending_reset(void)
{
	pending = NIL;
	written_for_parent = NIL;
	pending_cxt = NULL;
}

/* Was string s (of a key if is_key, else of a tag) already in entry p? */
static bool
ck_pending_has(CkPending *p, const char *s, bool is_key, uint32 hash)
{
	ListCell   *lc;

	if (p->slots != NULL)
	{
		for (uint32 i = hash & (CK_PENDING_SLOTS - 1); p->slots[i] != NULL;
			 i = (i + 1) & (CK_PENDING_SLOTS - 1))
			if (p->slots[i][0] == (is_key ? 'k' : 't') && strcmp(p->slots[i] + 1, s) == 0)
				return true;
		return false;
	}
	foreach(lc, is_key ? p->keys : p->tags)
		if (strcmp((char *) lfirst(lc), s) == 0)
			return true;
	return false;
}

/* Put a string of entry p into its hash: 'k' or 't' then the string. */
static void
ck_pending_slot(CkPending *p, const char *s, bool is_key)
{
	uint32		i = hash_bytes((const unsigned char *) s, strlen(s)) & (CK_PENDING_SLOTS - 1);
	char	   *copy = palloc(strlen(s) + 2);

	copy[0] = is_key ? 'k' : 't';
	strcpy(copy + 1, s);
	while (p->slots[i] != NULL)
		i = (i + 1) & (CK_PENDING_SLOTS - 1);
	p->slots[i] = copy;
}

/* Add a key or tag to entry p unless it has it. */
static void
ck_pending_add_string(CkPending *p, const char *s, bool is_key)
{
	uint32		hash = 0;
	char	   *copy;

	if (p->slots != NULL)
		hash = hash_bytes((const unsigned char *) s, strlen(s));
	if (ck_pending_has(p, s, is_key, hash))
		return;
	copy = pstrdup(s);
	if (is_key)
		p->keys = lappend(p->keys, copy);
	else
		p->tags = lappend(p->tags, copy);
	p->nstrings++;
	p->bytes += INTALIGN(VARHDRSZ + strlen(s));
	if (p->slots != NULL)
		ck_pending_slot(p, s, is_key);
	else if (p->nstrings > CK_PENDING_LINEAR)
	{
		ListCell   *lc;

		p->slots = palloc0(sizeof(char *) * CK_PENDING_SLOTS);
		foreach(lc, p->keys)
			ck_pending_slot(p, lfirst(lc), true);
		foreach(lc, p->tags)
			ck_pending_slot(p, lfirst(lc), false);
	}
}

/* The number of strings and their bytes as array elements. */
static void
ck_count_strings(List *list, int *n, Size *bytes)
{
	ListCell   *lc;

	foreach(lc, list)
	{
		(*n)++;
		*bytes += INTALIGN(VARHDRSZ + strlen(lfirst(lc)));
	}
}

/* Are two entries' targets (0, or text[] datums) the same? */
static bool
ck_same_targets(Datum a, Datum b)
{
	if (a == (Datum) 0 || b == (Datum) 0)
		return a == b;
	return datumIsEqual(a, b, false, -1);
}

/* Would an invalidation of n strings of these bytes fit into entry p? */
static bool
ck_pending_fits(CkPending *p, Oid queue, Datum targets, int n, Size bytes)
{
	return p->queue == queue && ck_same_targets(p->targets, targets) &&
		p->owner == GetCurrentSubTransactionId() &&
		p->nstrings + n <= CK_PENDING_MAX_STRINGS &&
		p->bytes + bytes <= CK_PENDING_MAX_BYTES;
}

/*
 * The current subtransaction's pending entry for this queue and these
 * targets, or NULL. Pending entries are all invalidations, whose order
 * among themselves does not matter, so an invalidation for other targets
 * in between does not start a new entry.
 */
static CkPending *
ck_pending_find(Oid queue, Datum targets)
{
	SubTransactionId current = GetCurrentSubTransactionId();

	for (int i = list_length(pending) - 1; i >= 0; i--)
	{
		CkPending  *p = list_nth(pending, i);

		if (p->owner != current)
			break;
		if (p->queue == queue && ck_same_targets(p->targets, targets))
			return p;
	}
	return NULL;
}

/* Gather an invalidation into its pending entry, or a new one. */
static void
ck_pending_gather(Oid queue, Datum targets, List *keys, List *tags, int n, Size bytes)
{
	CkPending  *p = ck_pending_find(queue, targets);
	MemoryContext old = MemoryContextSwitchTo(pending_cxt);
	ListCell   *lc;

	if (p == NULL || !ck_pending_fits(p, queue, targets, n, bytes))
	{
		p = palloc0(sizeof(CkPending));
		p->queue = queue;
		p->targets = targets == (Datum) 0 ? (Datum) 0 : datumCopy(targets, false, -1);
		p->owner = GetCurrentSubTransactionId();
		pending = lappend(pending, p);
	}
	foreach(lc, keys)
		ck_pending_add_string(p, lfirst(lc), true);
	foreach(lc, tags)
		ck_pending_add_string(p, lfirst(lc), false);
	MemoryContextSwitchTo(old);
}

/*
 * Enqueue one entry in the current transaction (see the file header).
 * keys, tags and untags are Lists of C strings, value may be NULL.
 *
 * A small invalidation is gathered, to be written at pre-commit; any other
 * entry (write-through, or a statement's large chunk, which gains nothing
 * from waiting) is written now, after what is pending, in that order.
 */
void
ck_enqueue(Oid nspid, char kind, List *keys, List *tags, List *untags,
		   const char *value, int ttl, Datum targets)
{
	Oid			queue = ck_queue_relid(nspid);
	int			n = 0;
	Size		bytes = 0;
	CkPending  *p;

	ck_pending_init();
	ck_count_strings(keys, &n, &bytes);
	ck_count_strings(tags, &n, &bytes);
	if (kind != CK_KIND_INVALIDATE || untags != NIL || value != NULL || n >= CK_PENDING_LARGE)
	{
		ck_pending_write_all();
		ck_queue_write_entry(queue, kind, keys, tags, untags, value, ttl, targets);
		return;
	}
	if (pending_cxt == NULL)
		pending_cxt = AllocSetContextCreate(TopTransactionContext, "cachekit pending entries",
											ALLOCSET_DEFAULT_SIZES);
	/* its entry is full when this does not fit: write what is gathered */
	p = ck_pending_find(queue, targets);
	if (p != NULL && !ck_pending_fits(p, queue, targets, n, bytes))
		ck_pending_write_all();
	ck_pending_gather(queue, targets, keys, tags, n, bytes);
}

/*
 * Write entry p into its queue table, unless the table was dropped since
 * (DROP EXTENSION in this transaction: its entries would have gone with it).
 */
static void
ck_pending_write(CkPending *p)
{
	if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(p->queue)))
		return;
	ck_queue_write_entry(p->queue, CK_KIND_INVALIDATE, p->keys, p->tags, NIL, NULL, 0,
						 p->targets);
}

/* Free what entry p holds besides its lists' strings, once written. */
static void
ck_pending_free(CkPending *p, bool keep)
{
	if (p->slots != NULL)
	{
		for (int i = 0; i < CK_PENDING_SLOTS; i++)
			if (p->slots[i] != NULL)
				pfree(p->slots[i]);
		pfree(p->slots);
		p->slots = NULL;
	}
	if (keep)
		return;
	list_free_deep(p->keys);
	list_free_deep(p->tags);
	pfree(p);
}

/*
 * Write every pending entry, in order. An entry that an enclosing
 * (sub)transaction made is kept (written_for_parent): if the current
 * subtransaction rolls back, its row goes, and it is pending again.
 */
static void
ck_pending_write_all(void)
{
	SubTransactionId current = GetCurrentSubTransactionId();

	/*
	 * Each entry leaves the pending list before it is written, and one made
	 * by an enclosing (sub)transaction is kept first: an error while
	 * writing, caught by a savepoint, neither loses nor doubles it.
	 */
	while (pending != NIL)
	{
		CkPending  *p = linitial(pending);
		bool		keep = p->owner != current;

		pending = list_delete_first(pending);
		if (keep)
		{
			MemoryContext old = MemoryContextSwitchTo(pending_cxt);

			p->writer = current;
			written_for_parent = lappend(written_for_parent, p);
			MemoryContextSwitchTo(old);
		}
		ck_pending_write(p);
		ck_pending_free(p, keep);
	}
}

/*
 * A subtransaction rolled back: what it made is gone, and what it wrote for
 * its parents is pending again, in front (it came first).
 */
static void
ck_pending_subabort(SubTransactionId sub)
{
	List	   *again = NIL;
	List	   *kept = NIL;
	ListCell   *lc;
	MemoryContext old = MemoryContextSwitchTo(pending_cxt);

	foreach(lc, written_for_parent)
	{
		CkPending  *p = lfirst(lc);

		if (p->writer < sub)
			kept = lappend(kept, p);
		else if (p->owner < sub)
		{
			p->writer = 0;
			again = lappend(again, p);
		}
	}
	written_for_parent = kept;
	foreach(lc, pending)
	{
		CkPending  *p = lfirst(lc);

		if (p->owner < sub)
			again = lappend(again, p);
	}
	pending = again;
	MemoryContextSwitchTo(old);
}

/*
 * Merge neighbouring pending entries of one owner that fit together (after
 * a subtransaction committed, its first entry may join its parent's last).
 */
static void
ck_pending_coalesce(void)
{
	List	   *merged = NIL;
	CkPending  *prev = NULL;
	ListCell   *lc;

	foreach(lc, pending)
	{
		CkPending  *p = lfirst(lc);
		ListCell   *s;

		if (prev == NULL || prev->queue != p->queue || prev->owner != p->owner ||
			!ck_same_targets(prev->targets, p->targets) ||
			prev->nstrings + p->nstrings > CK_PENDING_MAX_STRINGS ||
			prev->bytes + p->bytes > CK_PENDING_MAX_BYTES)
		{
			merged = lappend(merged, p);
			prev = p;
			continue;
		}
		foreach(s, p->keys)
			ck_pending_add_string(prev, lfirst(s), true);
		foreach(s, p->tags)
			ck_pending_add_string(prev, lfirst(s), false);
		ck_pending_free(p, false);
	}
	list_free(pending);
	pending = merged;
}

/* A subtransaction committed: its entries are now its parent's. */
static void
ck_pending_subcommit(SubTransactionId sub, SubTransactionId parent)
{
	List	   *kept = NIL;
	ListCell   *lc;
	MemoryContext old = MemoryContextSwitchTo(pending_cxt);

	foreach(lc, pending)
	{
		CkPending  *p = lfirst(lc);

		if (p->owner >= sub)
			p->owner = parent;
	}
	ck_pending_coalesce();
	/* rows written by it now belong to the parent: safe once that owns them */
	foreach(lc, written_for_parent)
	{
		CkPending  *p = lfirst(lc);

		if (p->writer >= sub)
			p->writer = parent;
		if (p->writer != p->owner)
			kept = lappend(kept, p);
	}
	written_for_parent = kept;
	MemoryContextSwitchTo(old);
}

/* Subtransaction callback: keep the pending entries in step. */
static void
ck_pending_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
							SubTransactionId parentSubid, void *arg)
{
	if (pending_cxt == NULL)
		return;
	if (event == SUBXACT_EVENT_ABORT_SUB)
		ck_pending_subabort(mySubid);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		ck_pending_subcommit(mySubid, parentSubid);
}

/* Transaction callback: write the entries before commit or prepare. */
static void
ck_pending_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			ck_pending_write_all();
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			ck_pending_reset();
			break;
		default:
			break;
	}
}

/* Install the callbacks (from ck_queue_init, or at the first enqueue). */
void
ck_pending_init(void)
{
	if (callbacks_registered)
		return;
	RegisterXactCallback(ck_pending_xact_callback, NULL);
	RegisterSubXactCallback(ck_pending_subxact_callback, NULL);
	callbacks_registered = true;
}
