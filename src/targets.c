/*-------------------------------------------------------------------------
 *
 * targets.c
 *	  Named Redis targets: the setting cachekit.targets, the list of targets
 *	  a worker delivers to, and their state in shared memory (behind the
 *	  view cachekit_target_stats).
 *
 * cachekit.targets = 'eu=rediss://eu-cache:6380/0, us=redis://us:6379/0'
 * names targets besides "default", which is cachekit.redis_url. A queue
 * entry names the targets it is owed to in its column targets (NULL: the
 * default target alone); the worker delivers it to each of them on its own
 * connection and removes each target from the entry once that target
 * acknowledged it (worker.c).
 *
 * Shared state is one fixed array of CK_TARGET_SLOTS slots, each keyed by
 * database OID and target name, in a shared memory area of its own.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include <ctype.h>

#include "access/htup_details.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/tuplestore.h"

char	   *ck_targets = NULL;

/* slots for all databases together */
#define CK_TARGET_SLOTS 64

typedef struct CkTargetSlot
{
	Oid			dbid;			/* InvalidOid: free */
	char		name[NAMEDATALEN];
	bool		connected;
	char		last_error[CK_ERROR_LEN];
	TimestampTz last_error_at;
	TimestampTz last_delivery_at;
	uint64		counters[CK_TARGET_NCOUNTERS];
} CkTargetSlot;

typedef struct CkTargetsShared
{
	slock_t		mutex;
	CkTargetSlot slots[CK_TARGET_SLOTS];
} CkTargetsShared;

static CkTargetsShared *targets_shared = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

PG_FUNCTION_INFO_V1(cachekit_target_state);

/* Is name a valid target name: a lowercase identifier? */
static bool
ck_target_name_ok(const char *name, int len)
{
	if (len == 0 || len >= NAMEDATALEN || !(islower((unsigned char) name[0]) || name[0] == '_'))
		return false;
	for (int i = 0; i < len; i++)
		if (!(islower((unsigned char) name[i]) || isdigit((unsigned char) name[i]) || name[i] == '_'))
			return false;
	return true;
}

/* Is name a valid target name (for a trigger's target= or a function's targets)? */
bool
ck_target_name_valid(const char *name)
{
	return ck_target_name_ok(name, strlen(name));
}

/*
 * Parse a cachekit.targets value into names and URLs (palloc'd). On a
 * problem, false with *errmsg (never containing a URL, so no password).
 */
bool
ck_targets_parse(const char *value, List **names, List **urls, char **errmsg)
{
	const char *p = value;

	*names = NIL;
	*urls = NIL;
	if (p && p[strspn(p, " \t\n\r")] == '\0')
		return true;			/* no named target */
	while (p && *p)
	{
		const char *end = strchr(p, ',');
		const char *eq;
		char	   *name;
		char	   *url;
		CkRedisUrl	parsed;
		char	   *err = NULL;
		ListCell   *lc;

		if (end == NULL)
			end = p + strlen(p);
		while (p < end && isspace((unsigned char) *p))
			p++;
		eq = memchr(p, '=', end - p);
		if (p == end)
		{
			*errmsg = "an entry of the list is empty";
			return false;
		}
		if (eq == NULL)
		{
			*errmsg = "each entry must be name=url";
			return false;
		}
		name = pnstrdup(p, eq - p);
		while (strlen(name) > 0 && isspace((unsigned char) name[strlen(name) - 1]))
			name[strlen(name) - 1] = '\0';
		if (!ck_target_name_ok(name, strlen(name)))
		{
			/* not echoed: a missing name= could make it part of a URL */
			*errmsg = psprintf("entry %d does not start with a target name (a lowercase identifier: a-z, 0-9, _, up to %d characters) and =",
							   list_length(*names) + 1, NAMEDATALEN - 1);
			return false;
		}
		if (strcmp(name, CK_DEFAULT_TARGET) == 0)
		{
			*errmsg = "target name \"default\" is reserved for cachekit.redis_url";
			return false;
		}
		foreach(lc, *names)
			if (strcmp(lfirst(lc), name) == 0)
			{
				*errmsg = psprintf("target \"%s\" is named twice", name);
				return false;
			}
		url = pnstrdup(eq + 1, end - eq - 1);
		url = pstrdup(url + strspn(url, " \t\n\r"));
		while (strlen(url) > 0 && isspace((unsigned char) url[strlen(url) - 1]))
			url[strlen(url) - 1] = '\0';
		if (!ck_parse_redis_url(url, &parsed, &err))
		{
			*errmsg = psprintf("the URL of target \"%s\" is invalid: %s", name, err);
			return false;
		}
		*names = lappend(*names, name);
		*urls = lappend(*urls, url);
		if (list_length(*names) >= CK_MAX_TARGETS)
		{
			*errmsg = psprintf("at most %d targets may be named", CK_MAX_TARGETS - 1);
			return false;
		}
		if (*end == ',' && end[1 + strspn(end + 1, " \t\n\r")] == '\0')
		{
			*errmsg = "an entry of the list is empty";
			return false;
		}
		p = *end ? end + 1 : end;
	}
	return true;
}

/* Reject a malformed cachekit.targets, without echoing a URL. */
static bool
check_targets(char **newval, void **extra, GucSource source)
{
	List	   *names;
	List	   *urls;
	char	   *err = NULL;

	if (*newval == NULL || ck_targets_parse(*newval, &names, &urls, &err))
		return true;
	GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
	GUC_check_errmsg("invalid cachekit.targets: %s", err);
	GUC_check_errhint("Write name=url entries separated by commas, e.g. 'eu=rediss://eu-cache:6380/0, us=rediss://us-cache:6380/0'.");
	return false;
}

/* Is a target of this name configured now (the default target always is)? */
bool
ck_target_configured(const char *name)
{
	List	   *names;
	List	   *urls;
	char	   *err;
	ListCell   *lc;

	if (strcmp(name, CK_DEFAULT_TARGET) == 0)
		return true;
	if (!ck_targets_parse(ck_targets, &names, &urls, &err))
		return false;
	foreach(lc, names)
		if (strcmp(lfirst(lc), name) == 0)
			return true;
	return false;
}

/*
 * Check a target name given to a trigger or a manual function: an error
 * for a malformed one, a warning for one not configured now (the setting is
 * reloadable: its entries wait for it, see cachekit_target_stats).
 */
void
ck_target_check_name(const char *name, const char *where)
{
	if (!ck_target_name_ok(name, strlen(name)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid target name \"%s\" in %s", name, where),
				 errdetail("A target name is a lowercase identifier (a-z, 0-9, _)."),
				 errhint("Name \"default\" or a target of cachekit.targets.")));
	if (!ck_target_configured(name))
		ereport(WARNING,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("target \"%s\" named in %s is not configured", name, where),
				 errdetail("Its entries wait in the queue until the target is added to the targets setting, or are dead-lettered after the dead-letter delay."),
				 errhint("Add the target to the targets setting and reload.")));
}

/* Define cachekit.targets and ask for the shared state: from _PG_init. */
void
ck_targets_init(void)
{
	DefineCustomStringVariable("cachekit.targets",
							   "Named Redis targets besides the default one (cachekit.redis_url).",
							   "name=url entries separated by commas. Only superusers can see it, as it may hold passwords.",
							   &ck_targets,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   check_targets, NULL, NULL);
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = ck_targets_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = ck_targets_shmem_startup;
}

/* Ask for the targets' shared state. */
void
ck_targets_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(CkTargetsShared)));
}

/* Create or attach to the targets' shared state. */
void
ck_targets_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	targets_shared = ShmemInitStruct("cachekit targets", sizeof(CkTargetsShared), &found);
	if (!found)
	{
		memset(targets_shared, 0, sizeof(CkTargetsShared));
		SpinLockInit(&targets_shared->mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * The slot of this database's target name, claimed (and cleared) if there
 * is none; -1 when all slots are taken (the target is then not reported).
 */
int
ck_target_slot(const char *name)
{
	int			free_slot = -1;

	SpinLockAcquire(&targets_shared->mutex);
	for (int i = 0; i < CK_TARGET_SLOTS; i++)
	{
		CkTargetSlot *s = &targets_shared->slots[i];

		if (s->dbid == MyDatabaseId && strcmp(s->name, name) == 0)
		{
			SpinLockRelease(&targets_shared->mutex);
			return i;
		}
		if (s->dbid == InvalidOid && free_slot < 0)
			free_slot = i;
	}
	if (free_slot >= 0)
	{
		CkTargetSlot *s = &targets_shared->slots[free_slot];

		memset(s, 0, sizeof(CkTargetSlot));
		s->dbid = MyDatabaseId;
		strlcpy(s->name, name, NAMEDATALEN);
	}
	SpinLockRelease(&targets_shared->mutex);
	return free_slot;
}

/* Give back this database's slots of targets no longer configured. */
void
ck_target_release_others(List *names)
{
	SpinLockAcquire(&targets_shared->mutex);
	for (int i = 0; i < CK_TARGET_SLOTS; i++)
	{
		CkTargetSlot *s = &targets_shared->slots[i];
		bool		keep = false;
		ListCell   *lc;

		if (s->dbid != MyDatabaseId)
			continue;
		foreach(lc, names)
			if (strcmp(lfirst(lc), s->name) == 0)
				keep = true;
		if (!keep)
			s->dbid = InvalidOid;
	}
	SpinLockRelease(&targets_shared->mutex);
}

/* Record a target's connection state. */
void
ck_target_set_connected(int slot, bool connected)
{
	if (slot < 0)
		return;
	SpinLockAcquire(&targets_shared->mutex);
	targets_shared->slots[slot].connected = connected;
	SpinLockRelease(&targets_shared->mutex);
}

/* Record a target's latest error. */
void
ck_target_set_error(int slot, const char *msg)
{
	if (slot < 0)
		return;
	SpinLockAcquire(&targets_shared->mutex);
	strlcpy(targets_shared->slots[slot].last_error, msg, CK_ERROR_LEN);
	targets_shared->slots[slot].last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&targets_shared->mutex);
}

/* Add to a target's counters; a delivery also sets last_delivery_at. */
void
ck_target_count(int slot, const uint64 *add, bool delivered)
{
	if (slot < 0)
		return;
	SpinLockAcquire(&targets_shared->mutex);
	for (int i = 0; i < CK_TARGET_NCOUNTERS; i++)
		targets_shared->slots[slot].counters[i] += add[i];
	if (delivered)
		targets_shared->slots[slot].last_delivery_at = GetCurrentTimestamp();
	SpinLockRelease(&targets_shared->mutex);
}

/* Put one slot's values into a row of cachekit_target_state(). */
static void
ck_target_row(const CkTargetSlot *s, Datum *values, bool *nulls)
{
	int			i = 0;

	values[i++] = CStringGetTextDatum(s->name);
	values[i++] = BoolGetDatum(s->connected);
	nulls[i] = s->last_error[0] == '\0';
	if (!nulls[i])
		values[i] = CStringGetTextDatum(s->last_error);
	i++;
	nulls[i] = s->last_error_at == 0;
	values[i] = TimestampTzGetDatum(s->last_error_at);
	i++;
	nulls[i] = s->last_delivery_at == 0;
	values[i] = TimestampTzGetDatum(s->last_delivery_at);
	i++;
	for (int c = 0; c < CK_TARGET_NCOUNTERS; c++)
		values[i++] = Int64GetDatum((int64) s->counters[c]);
}

/*
 * cachekit_target_state(): one row per target configured now, "default"
 * first, with what this database's worker published about it (behind the
 * view cachekit_target_stats).
 */
Datum
cachekit_target_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	CkTargetSlot *copy = palloc(sizeof(CkTargetSlot) * CK_TARGET_SLOTS);
	int			n = 0;
	List	   *names;
	List	   *urls;
	char	   *err;
	ListCell   *lc;

	if (targets_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cachekit is not loaded"),
				 errhint("Add cachekit to shared_preload_libraries and restart the server.")));
	InitMaterializedSRF(fcinfo, 0);
	if (!ck_targets_parse(ck_targets, &names, &urls, &err))
		names = NIL;
	names = lcons(CK_DEFAULT_TARGET, names);
	SpinLockAcquire(&targets_shared->mutex);
	for (int i = 0; i < CK_TARGET_SLOTS; i++)
		if (targets_shared->slots[i].dbid == MyDatabaseId)
			copy[n++] = targets_shared->slots[i];
	SpinLockRelease(&targets_shared->mutex);
	foreach(lc, names)
	{
		Datum		values[5 + CK_TARGET_NCOUNTERS];
		bool		nulls[5 + CK_TARGET_NCOUNTERS];
		CkTargetSlot none;
		CkTargetSlot *s = NULL;

		for (int i = 0; i < n && s == NULL; i++)
			if (strcmp(copy[i].name, lfirst(lc)) == 0)
				s = &copy[i];
		if (s == NULL)
		{
			/* no worker has served it yet */
			memset(&none, 0, sizeof(none));
			strlcpy(none.name, lfirst(lc), NAMEDATALEN);
			s = &none;
		}
		memset(nulls, 0, sizeof(nulls));
		ck_target_row(s, values, nulls);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
