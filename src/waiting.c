/*-------------------------------------------------------------------------
 *
 * waiting.c
 *	  Queue entries Redis refused, waiting in the worker for their own
 *	  retry, and the entries they hold back.
 *
 * A refused entry is retried on its own capped exponential backoff (from
 * CK_FIRST_RETRY_MS to cachekit.retry_max_delay) instead of making the
 * whole worker back off, so the queue behind it keeps flowing. Until its
 * retry is due it is not sent, and every later entry naming one of its
 * keys is held too (so none of them overtakes it); held entries are not
 * counted as attempts.
 *
 * Waiting and held entries stay in the queue. So that they do not fill
 * every batch (a hot key whose write is refused collects thousands of
 * later writes), the read skips them: their ids are remembered, and their
 * keys, so that an entry read later that names such a key is held behind
 * it. Once any retry is due, the read skips nothing for one pass: waiting
 * entries are read again in id order, with the later entries of their keys,
 * and what still waits is remembered afresh. All of it lives in the
 * worker's memory, bounded (CK_MAX_SKIPPED ids, CK_MAX_BLOCKED_BYTES of
 * keys: beyond that an entry is not skipped and takes its batch slot); a
 * restarted worker simply retries at once.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "utils/memutils.h"

#define CK_MAX_SKIPPED 100000
#define CK_MAX_BLOCKED_BYTES (8 * 1024 * 1024)

/* a refused entry and when it may go out again */
typedef struct CkRetry
{
	int64		id;
	TimestampTz retry_at;
	int			delay_ms;
} CkRetry;

/* a key an entry that waits (or is held) names: later entries of it wait too */
typedef struct CkBlocked
{
	const char *key;
	int64		holder;			/* the lowest such entry */
} CkBlocked;

static MemoryContext waiting_cxt = NULL;
static CkRetry *retries = NULL;		/* sorted by id */
static int	nretries = 0;
static int64 *skipped = NULL;		/* sorted */
static int	nskipped = 0;
static CkBlocked *blocked = NULL;	/* sorted by key */
static int	nblocked = 0;
static Size blocked_bytes = 0;
static TimestampTz next_retry = 0;	/* earliest retry_at, or 0 */

/*
 * Each target of the worker (targets.c) has its own refused entries: the
 * variables above are those of the selected target; the others wait here.
 */
typedef struct CkWaitingState
{
	MemoryContext cxt;
	CkRetry    *retries;
	int			nretries;
	int64	   *skipped;
	int			nskipped;
	CkBlocked  *blocked;
	int			nblocked;
	Size		blocked_bytes;
	TimestampTz next_retry;
} CkWaitingState;

static CkWaitingState saved[CK_MAX_TARGETS];
static int	selected = 0;

/* Make target number i (0 to CK_MAX_TARGETS - 1) the selected one. */
void
ck_waiting_select(int i)
{
	CkWaitingState *s;

	Assert(i >= 0 && i < CK_MAX_TARGETS);
	if (i == selected)
		return;
	s = &saved[selected];
	s->cxt = waiting_cxt;
	s->retries = retries;
	s->nretries = nretries;
	s->skipped = skipped;
	s->nskipped = nskipped;
	s->blocked = blocked;
	s->nblocked = nblocked;
	s->blocked_bytes = blocked_bytes;
	s->next_retry = next_retry;
	s = &saved[i];
	waiting_cxt = s->cxt;
	retries = s->retries;
	nretries = s->nretries;
	skipped = s->skipped;
	nskipped = s->nskipped;
	blocked = s->blocked;
	nblocked = s->nblocked;
	blocked_bytes = s->blocked_bytes;
	next_retry = s->next_retry;
	selected = i;
}

/* Order retries by id. */
static int
ck_retry_cmp(const void *a, const void *b)
{
	int64		x = ((const CkRetry *) a)->id;
	int64		y = ((const CkRetry *) b)->id;

	return x < y ? -1 : x > y;
}

/* Order ids. */
static int
ck_id_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : x > y;
}

/* Order blocked keys by key, then holder. */
static int
ck_blocked_cmp(const void *a, const void *b)
{
	const CkBlocked *x = a;
	const CkBlocked *y = b;
	int			c = strcmp(x->key, y->key);

	if (c != 0)
		return c;
	return x->holder < y->holder ? -1 : x->holder > y->holder;
}

/* The retry record of an entry, or NULL. */
static CkRetry *
ck_retry_find(int64 id)
{
	CkRetry		probe = {id, 0, 0};

	if (nretries == 0)
		return NULL;
	return bsearch(&probe, retries, nretries, sizeof(CkRetry), ck_retry_cmp);
}

/* The lowest entry that waits and names key, or -1. */
static int64
ck_blocked_holder(const char *key)
{
	int			lo = 0,
				hi = nblocked - 1;

	/* the first element with this key has the lowest holder */
	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;
		int			c = strcmp(blocked[mid].key, key);

		if (c < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	if (lo < nblocked && strcmp(blocked[lo].key, key) == 0)
		return blocked[lo].holder;
	return -1;
}

/* Forget what the reads skip (the retry records stay). */
static void
ck_waiting_clear_skips(void)
{
	MemoryContext old;
	CkRetry    *keep = NULL;

	if (waiting_cxt == NULL)
		waiting_cxt = AllocSetContextCreate(TopMemoryContext, "cachekit waiting",
											ALLOCSET_DEFAULT_SIZES);
	/* the retry records live in the same context: carry them over */
	if (nretries > 0)
	{
		keep = MemoryContextAlloc(TopMemoryContext, sizeof(CkRetry) * nretries);
		memcpy(keep, retries, sizeof(CkRetry) * nretries);
	}
	MemoryContextReset(waiting_cxt);
	old = MemoryContextSwitchTo(waiting_cxt);
	retries = palloc(sizeof(CkRetry) * (nretries + 1));
	if (keep)
	{
		memcpy(retries, keep, sizeof(CkRetry) * nretries);
		pfree(keep);
	}
	skipped = palloc(sizeof(int64));
	nskipped = 0;
	blocked = palloc(sizeof(CkBlocked));
	nblocked = 0;
	blocked_bytes = 0;
	MemoryContextSwitchTo(old);
}

/* Forget everything (a new queue, a reload). */
void
ck_waiting_forget(void)
{
	nretries = 0;
	next_retry = 0;
	ck_waiting_clear_skips();
}

/* At the start of a pass: once a retry is due, this read skips nothing. */
void
ck_waiting_start_pass(void)
{
	if (waiting_cxt == NULL || (next_retry != 0 && GetCurrentTimestamp() >= next_retry))
		ck_waiting_clear_skips();
}

/* How many entries the read skips. */
int
ck_waiting_nskipped(void)
{
	return nskipped;
}

/* Does no refused entry wait for its retry, and does the read skip none? */
bool
ck_waiting_idle(void)
{
	return nretries == 0 && nskipped == 0;
}

/* The lowest entry id the read skips, or 0 when none. */
int64
ck_waiting_min_skipped(void)
{
	return nskipped > 0 ? skipped[0] : 0;
}

/* Does the read skip this entry? */
bool
ck_waiting_skips(int64 id)
{
	return nskipped > 0 && bsearch(&id, skipped, nskipped, sizeof(int64), ck_id_cmp) != NULL;
}

/* When the next refused entry is due, or 0. */
TimestampTz
ck_waiting_next_retry(void)
{
	return next_retry;
}

/* Is id one of the batch's entries (read in id order)? */
static bool
ck_batch_has(CkEntry *entries, int n, int64 id)
{
	int			lo = 0,
				hi = n - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;

		if (entries[mid].id == id)
			return true;
		if (entries[mid].id < id)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return false;
}

/* Hold an entry: not sent this time, and not counted. */
static void
ck_hold(CkEntry *e, const char *why)
{
	e->failed = true;
	e->errclass = CK_ERRCLASS_HELD;
	e->error = (char *) why;
}

/*
 * Before delivery: hold the entries whose retry is not due, and those
 * naming a key of a skipped entry queued before them. (ck_deliver holds
 * the later entries of the batch behind a held one.)
 */
void
ck_waiting_hold(CkEntry *entries, int n)
{
	TimestampTz now = GetCurrentTimestamp();

	for (int i = 0; i < n; i++)
	{
		CkEntry    *e = &entries[i];
		CkRetry    *r = ck_retry_find(e->id);
		int			nkeys = e->kind == CK_KIND_INVALIDATE ? e->nkeys : Min(e->nkeys, 1);

		if (r && r->retry_at > now)
		{
			ck_hold(e, "waiting to be retried");
			continue;
		}
		for (int k = 0; k < nkeys; k++)
		{
			int64		holder = ck_blocked_holder(e->keys[k]);

			if (holder >= 0 && holder < e->id)
			{
				ck_hold(e, psprintf("waits behind queue entry %lld of key %s",
									(long long) holder, e->keys[k]));
				break;
			}
		}
	}
}

/* Remember that the reads skip an entry, and its keys; false when full. */
static bool
ck_waiting_skip(CkEntry *e, int64 **ids, int *nids, CkBlocked **keys, int *nkeys)
{
	int			nk = e->kind == CK_KIND_INVALIDATE ? e->nkeys : Min(e->nkeys, 1);
	Size		bytes = 0;

	for (int k = 0; k < nk; k++)
		bytes += strlen(e->keys[k]) + 1 + sizeof(CkBlocked);
	if (*nids >= CK_MAX_SKIPPED || blocked_bytes + bytes > CK_MAX_BLOCKED_BYTES)
		return false;
	(*ids)[(*nids)++] = e->id;
	for (int k = 0; k < nk; k++)
		(*keys)[(*nkeys)++] = (CkBlocked) {MemoryContextStrdup(waiting_cxt, e->keys[k]), e->id};
	blocked_bytes += bytes;
	return true;
}

/*
 * After settling a batch: entries refused now (refused[i]) get a retry
 * time, the next doubling of their last delay; entries still waiting or
 * held are skipped by the next reads. Retry records of entries the batch
 * did not hold stay while they are not due (they are skipped).
 */
void
ck_waiting_update(CkEntry *entries, int n, const bool *refused)
{
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext old;
	CkRetry    *next;
	int64	   *ids;
	CkBlocked  *keys;
	int			nnext = 0,
				nids = nskipped,
				nkeys = nblocked,
				room = nblocked;
	bool		any = false;

	for (int i = 0; i < n; i++)
		if (refused[i] || (entries[i].failed && entries[i].errclass == CK_ERRCLASS_HELD))
		{
			room += entries[i].kind == CK_KIND_INVALIDATE ? entries[i].nkeys : 1;
			any = true;
		}
	/* the usual case: nothing waits */
	if (!any && nretries == 0)
		return;
	old = MemoryContextSwitchTo(waiting_cxt);
	next = palloc(sizeof(CkRetry) * (nretries + n + 1));
	ids = palloc(sizeof(int64) * (nskipped + n + 1));
	keys = palloc(sizeof(CkBlocked) * (room + 1));
	memcpy(ids, skipped, sizeof(int64) * nskipped);
	memcpy(keys, blocked, sizeof(CkBlocked) * nblocked);

	/* the old records of entries this batch did not read, while not due */
	for (int r = 0; r < nretries; r++)
		if (retries[r].retry_at > now && !ck_batch_has(entries, n, retries[r].id))
			next[nnext++] = retries[r];
	for (int i = 0; i < n; i++)
	{
		CkEntry    *e = &entries[i];
		CkRetry    *r = ck_retry_find(e->id);
		bool		held = e->failed && e->errclass == CK_ERRCLASS_HELD;

		if (refused[i])
		{
			int			delay = r ? r->delay_ms * 2 : CK_FIRST_RETRY_MS;

			delay = Min(delay, ck_retry_max_delay);
			next[nnext++] = (CkRetry) {e->id, TimestampTzPlusMilliseconds(now, delay), delay};
		}
		else if (held && r)
			next[nnext++] = *r;
		if ((refused[i] || held) && !ck_waiting_skips(e->id))
			(void) ck_waiting_skip(e, &ids, &nids, &keys, &nkeys);
	}

	qsort(next, nnext, sizeof(CkRetry), ck_retry_cmp);
	qsort(ids, nids, sizeof(int64), ck_id_cmp);
	qsort(keys, nkeys, sizeof(CkBlocked), ck_blocked_cmp);
	pfree(retries);
	pfree(skipped);
	pfree(blocked);
	retries = next;
	nretries = nnext;
	skipped = ids;
	nskipped = nids;
	blocked = keys;
	nblocked = nkeys;
	next_retry = 0;
	for (int r = 0; r < nretries; r++)
		if (next_retry == 0 || retries[r].retry_at < next_retry)
			next_retry = retries[r].retry_at;
	MemoryContextSwitchTo(old);
	/* nothing waits: nothing to skip (and the keys' memory goes) */
	if (nretries == 0 && nskipped > 0)
		ck_waiting_clear_skips();
}
