/*-------------------------------------------------------------------------
 *
 * cachekit.c
 *	  Module start-up: settings, shared memory, and the worker's counters.
 *
 * The shared state is one CachekitShared struct. Counters are atomics that
 * only the worker increments; the other fields are guarded by its spinlock.
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
#include "utils/elog.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

/*---- GUC variables ----*/

char	   *ck_redis_url = NULL;
char	   *ck_database = NULL;
int			ck_max_databases = 16;
char	   *ck_tag_prefix = NULL;
int			ck_batch_size = 1000;
int			ck_retry_max_delay = 2000;
int			ck_connect_timeout = 2000;
int			ck_command_timeout = 5000;
int			ck_max_attempts = 5;
int			ck_dead_letter_after = 600;
int			ck_batch_bytes = 16 * 1024 * 1024;
int			ck_max_value_bytes = 512 * 1024;
int			ck_redelete_after = 0;

/* TLS and Sentinel (issue 10) */
char	   *ck_redis_tls_ca_file = NULL;
char	   *ck_redis_tls_cert_file = NULL;
char	   *ck_redis_tls_key_file = NULL;
int			ck_redis_tls_verify = CK_TLS_VERIFY_FULL;
char	   *ck_redis_tls_server_name = NULL;
char	   *ck_redis_sentinel_password = NULL;

static const struct config_enum_entry ck_tls_verify_options[] = {
	{"full", CK_TLS_VERIFY_FULL, false},
	{"ca", CK_TLS_VERIFY_CA, false},
	{"none", CK_TLS_VERIFY_NONE, false},
	{NULL, 0, false}
};

int			ck_redis_mode = CK_MODE_AUTO;

static const struct config_enum_entry ck_redis_mode_options[] = {
	{"auto", CK_MODE_AUTO, false},
	{"standalone", CK_MODE_STANDALONE, false},
	{"cluster", CK_MODE_CLUSTER, false},
	{NULL, 0, false}
};

/*---- shared state ----*/

CachekitShared *ck_shared = NULL;
CachekitShared *ck_slots = NULL;
CkLauncherShared *ck_launcher = NULL;
LWLock	   *CkLauncherLock = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static emit_log_hook_type prev_emit_log_hook = NULL;

void		_PG_init(void);
static void ck_shmem_request(void);
static void ck_shmem_startup(void);
static bool check_redis_url(char **newval, void **extra, GucSource source);
static bool check_tag_prefix(char **newval, void **extra, GucSource source);
static void ck_emit_log(ErrorData *edata);
static void ck_define_connection_settings(void);

PG_FUNCTION_INFO_V1(cachekit_worker_state);
PG_FUNCTION_INFO_V1(cachekit_topology_state);
PG_FUNCTION_INFO_V1(cachekit_key_slot);

/* Module load: define settings, ask for shared memory, register the worker. */
void
_PG_init(void)
{
	if (IsBinaryUpgrade)
	{
		/* pg_upgrade recreates triggers: record their column dependencies */
		if (process_shared_preload_libraries_in_progress)
			ck_ddl_init();
		return;
	}

	if (!process_shared_preload_libraries_in_progress)
	{
		/*
		 * Loaded into one backend by CREATE EXTENSION or a function call:
		 * the functions refuse to work without the shared state, with a hint.
		 */
		return;
	}

	DefineCustomStringVariable("cachekit.redis_url",
							   "Redis server the worker delivers to.",
							   "redis://[[user]:password@]host[:port][/db], rediss://..., unix:///path[?db=N], "
							   "redis-sentinel://[[user]:password@]host[:port][,host[:port]...][/db]#master, rediss-sentinel://... "
							   "Only superusers can see it, as it may hold a password.",
							   &ck_redis_url,
							   "redis://127.0.0.1:6379/0",
							   /* SUSET: ALTER DATABASE ... SET by superusers (databases.c) */
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY,
							   check_redis_url, NULL, NULL);

	DefineCustomStringVariable("cachekit.database",
							   "The only database served, when set; empty: every database with the extension.",
							   NULL,
							   &ck_database,
							   "",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.max_databases",
							"Most databases served at once, each by its own worker.",
							"Each takes one of max_worker_processes while served.",
							&ck_max_databases,
							16, 1, 1024,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomStringVariable("cachekit.tag_prefix",
							   "Prefix of the Redis sets that list a tag's keys.",
							   NULL,
							   &ck_tag_prefix,
							   "tag:",
							   PGC_SIGHUP,
							   0,
							   check_tag_prefix, NULL, NULL);

	DefineCustomIntVariable("cachekit.batch_size",
							"Queue entries the worker delivers in one pipelined batch.",
							NULL,
							&ck_batch_size,
							1000, 1, 100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.retry_max_delay",
							"Longest wait between two delivery attempts while Redis fails.",
							NULL,
							&ck_retry_max_delay,
							2000, 10, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.connect_timeout",
							"Time allowed to connect to Redis.",
							NULL,
							&ck_connect_timeout,
							2000, 10, 600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.command_timeout",
							"Time allowed for Redis to answer a batch.",
							NULL,
							&ck_command_timeout,
							5000, 10, 600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.max_attempts",
							"Attempts Redis may refuse an entry before it moves to cachekit_dead_letter.",
							NULL,
							&ck_max_attempts,
							5, 1, 1000000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.max_value_bytes",
							"Largest value write-through sends; larger rows delete their key instead.",
							NULL,
							&ck_max_value_bytes,
							512 * 1024, 1, 512 * 1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.dead_letter_after",
							"Time an entry must have been refused for before it moves to cachekit_dead_letter.",
							"Both this and cachekit.max_attempts must be reached; 0 dead-letters after max_attempts alone.",
							&ck_dead_letter_after,
							600, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("cachekit.batch_bytes",
							"Largest size of the queue entries the worker reads into one batch.",
							"A batch ends at cachekit.batch_size entries or at this many bytes of keys, tags and values, whichever comes first; it holds at least one entry.",
							&ck_batch_bytes,
							16 * 1024 * 1024, 64 * 1024, 1024 * 1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);
	ck_define_connection_settings();

	DefineCustomIntVariable("cachekit.redelete_after",
							"Delay after which the worker deletes invalidated keys and flushes tags a second time.",
							"0 turns the second delete off.",
							&ck_redelete_after,
							0, 0, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	ck_targets_init();			/* cachekit.targets, and its shared state */

	MarkGUCPrefixReserved("cachekit");

	/* PostgreSQL logs changed settings with their values: hide the password */
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = ck_emit_log;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = ck_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = ck_shmem_startup;

	ck_queue_init();
	ck_databases_init();
	ck_ddl_init();
	ck_register_worker();
}

/* Define the TLS and Sentinel settings: superuser-only, reloadable. */
static void
ck_define_connection_settings(void)
{
	static const struct
	{
		const char *name;
		const char *desc;
		char	  **var;
	}			files[] = {
		{"cachekit.redis_tls_ca_file",
		"Certificates of the authorities that sign Redis's certificate (PEM); empty: the system's.",
		&ck_redis_tls_ca_file},
		{"cachekit.redis_tls_cert_file",
		"Client certificate (PEM) the worker shows Redis over TLS, for mutual TLS.",
		&ck_redis_tls_cert_file},
		{"cachekit.redis_tls_key_file",
		"Private key (PEM) of cachekit.redis_tls_cert_file; must not be readable by others.",
		&ck_redis_tls_key_file},
		{"cachekit.redis_tls_server_name",
		"Name sent as SNI and verified in Redis's certificate, when it differs from the URL's host.",
		&ck_redis_tls_server_name},
		{"cachekit.redis_sentinel_password",
		"Password of the Sentinels, when they need one (the URL's holds the master's).",
		&ck_redis_sentinel_password},
	};

	for (int i = 0; i < (int) lengthof(files); i++)
		DefineCustomStringVariable(files[i].name, files[i].desc, NULL, files[i].var, "",
								   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomEnumVariable("cachekit.redis_tls_verify",
							 "How Redis's TLS certificate is checked: full (chain and host name), ca (chain only), none.",
							 NULL,
							 &ck_redis_tls_verify,
							 CK_TLS_VERIFY_FULL,
							 ck_tls_verify_options,
							 PGC_SIGHUP,
							 GUC_SUPERUSER_ONLY,
							 NULL, NULL, NULL);

	DefineCustomEnumVariable("cachekit.redis_mode",
							 "What cachekit.redis_url's hosts are: auto (a cluster if the first one reached says so), standalone, cluster.",
							 NULL,
							 &ck_redis_mode,
							 CK_MODE_AUTO,
							 ck_redis_mode_options,
							 PGC_SIGHUP,
							 GUC_SUPERUSER_ONLY,
							 NULL, NULL, NULL);
}

/* Bytes of the slots: cachekit.max_databases, and one for probes. */
static Size
ck_slots_size(void)
{
	return mul_size(MAXALIGN(sizeof(CachekitShared)), ck_max_databases + 1);
}

/* Bytes of the launcher's shared part. */
static Size
ck_launcher_size(void)
{
	return add_size(offsetof(CkLauncherShared, databases),
					mul_size(sizeof(CkDatabase), CK_MAX_KNOWN_DATABASES));
}

/* Ask for the shared state. */
static void
ck_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(add_size(ck_slots_size(), MAXALIGN(ck_launcher_size())));
	RequestNamedLWLockTranche("cachekit", 1);
}

/* Empty a slot for database dboid (or none), keeping its pass count. */
void
ck_slot_reset(CachekitShared *slot, Oid dboid)
{
	SpinLockAcquire(&slot->mutex);
	slot->dboid = dboid;
	slot->worker_latch = NULL;
	slot->worker_pid = 0;
	slot->connected = false;
	slot->last_error[0] = '\0';
	slot->last_error_at = 0;
	slot->last_delivery_at = 0;
	slot->floor_database = InvalidOid;
	slot->floor_queue = InvalidOid;
	slot->delivered_floor = 0;
	slot->drained_pass = 0;
	slot->redis_mode = 0;
	slot->redis_nodes = 0;
	slot->topology_refreshed_at = 0;
	SpinLockRelease(&slot->mutex);
	pg_atomic_write_u64(&slot->redirects_followed, 0);
	pg_atomic_write_u64(&slot->keys_deleted, 0);
	pg_atomic_write_u64(&slot->tags_flushed, 0);
	pg_atomic_write_u64(&slot->tag_keys_deleted, 0);
	pg_atomic_write_u64(&slot->keys_written, 0);
	pg_atomic_write_u64(&slot->values_too_large, 0);
	pg_atomic_write_u64(&slot->entries_delivered, 0);
	pg_atomic_write_u64(&slot->failed_attempts, 0);
	pg_atomic_write_u64(&slot->dead_lettered, 0);
	pg_atomic_write_u32(&slot->wake_requested, 0);
}

/* Create or attach to the shared state. */
static void
ck_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	ck_slots = ShmemInitStruct("cachekit", ck_slots_size(), &found);
	if (!found)
	{
		memset(ck_slots, 0, ck_slots_size());
		for (int i = 0; i <= ck_max_databases; i++)
		{
			CachekitShared *slot = &ck_slots[i];

			SpinLockInit(&slot->mutex);
			ConditionVariableInit(&slot->delivered_cv);
			pg_atomic_init_u64(&slot->keys_deleted, 0);
			pg_atomic_init_u64(&slot->tags_flushed, 0);
			pg_atomic_init_u64(&slot->tag_keys_deleted, 0);
			pg_atomic_init_u64(&slot->keys_written, 0);
			pg_atomic_init_u64(&slot->values_too_large, 0);
			pg_atomic_init_u64(&slot->entries_delivered, 0);
			pg_atomic_init_u64(&slot->failed_attempts, 0);
			pg_atomic_init_u64(&slot->dead_lettered, 0);
			pg_atomic_init_u32(&slot->wake_requested, 0);
			pg_atomic_init_u64(&slot->passes, 0);
			pg_atomic_init_u64(&slot->redirects_followed, 0);
		}
	}
	ck_launcher = ShmemInitStruct("cachekit launcher", ck_launcher_size(), &found);
	if (!found)
		memset(ck_launcher, 0, ck_launcher_size());
	CkLauncherLock = &(GetNamedLWLockTranche("cachekit"))->lock;
	LWLockRelease(AddinShmemInitLock);
}

/* Reject a malformed Redis URL when it is set, without echoing it. */
static bool
check_redis_url(char **newval, void **extra, GucSource source)
{
	CkRedisUrl	url;
	char	   *err = NULL;

	/* postgresql.conf, or one database for every role (databases.c) */
	if (source == PGC_S_SESSION || source == PGC_S_CLIENT ||
		source == PGC_S_USER || source == PGC_S_DATABASE_USER)
	{
		GUC_check_errcode(ERRCODE_CANT_CHANGE_RUNTIME_PARAM);
		GUC_check_errmsg("cachekit.redis_url cannot be set per session or per role");
		GUC_check_errhint("Set it in postgresql.conf, or for a database with ALTER DATABASE ... SET (superusers only).");
		return false;
	}
	if (*newval == NULL || ck_parse_redis_url(*newval, &url, &err))
		return true;
	GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
	GUC_check_errmsg("invalid cachekit.redis_url: %s", err);
	GUC_check_errhint("The forms are described under \"Connecting to Redis\" in cachekit's README.");
	return false;
}

/* Any tag prefix will do, even an empty one. */
static bool
check_tag_prefix(char **newval, void **extra, GucSource source)
{
	return *newval != NULL;
}

/* Case-insensitive strstr. */
static const char *
ck_strcasestr(const char *haystack, const char *needle)
{
	size_t		len = strlen(needle);

	for (; *haystack; haystack++)
		if (pg_strncasecmp(haystack, needle, len) == 0)
			return haystack;
	return NULL;
}

/*
 * Replace, in place, the value of every "password=" URL parameter (as in
 * ?sentinel_password=...) by "***"; true if there was one.
 */
static bool
ck_mask_query_passwords(StringInfo buf)
{
	bool		masked = false;
	char	   *p = buf->data;

	while ((p = strstr(p, "password=")) != NULL)
	{
		char	   *value = p + 9;
		char	   *end = value;
		StringInfoData rest;

		while (*end && *end != '&' && *end != '#' && *end != '"' && *end != '\'' && *end != ' ')
			end++;
		if (end == value || (end - value == 3 && strncmp(value, "***", 3) == 0))
		{
			p = end;
			continue;
		}
		initStringInfo(&rest);
		appendStringInfo(&rest, "***%s", end);
		buf->len = value - buf->data;
		buf->data[buf->len] = '\0';
		appendStringInfoString(buf, rest.data);
		pfree(rest.data);
		p = buf->data + (value - buf->data) + 3;
		masked = true;
	}
	return masked;
}

/*
 * A copy of msg with secrets replaced by "***", or NULL when it has none:
 * the credentials of every "scheme://credentials@host" (up to the last '@'
 * before the next URL, so that a password holding quotes, spaces, '/' or
 * '@' is covered whole; masking too much is harmless), and everything after
 * the name of a cachekit setting whose name says "password".
 */
static char *
ck_mask_secrets(const char *msg)
{
	StringInfoData out;
	const char *p = msg;
	const char *setting;
	bool		masked = false;

	initStringInfo(&out);
	for (;;)
	{
		const char *scheme = strstr(p, "://");
		const char *next;
		const char *at = NULL;

		if (scheme == NULL)
			break;
		scheme += 3;
		next = strstr(scheme, "://");
		for (const char *q = scheme; *q && (next == NULL || q < next); q++)
			if (*q == '@')
				at = q;
		appendBinaryStringInfo(&out, p, scheme - p);
		if (at)
		{
			appendStringInfoString(&out, "***");
			p = at;
			masked = true;
		}
		else
			p = scheme;
	}
	appendStringInfoString(&out, p);

	/* cachekit.<name with "password"> = value: cut after the name */
	for (setting = ck_strcasestr(out.data, "cachekit."); setting;
		 setting = ck_strcasestr(setting + 1, "cachekit."))
	{
		const char *end = setting + 9;

		while (*end == '_' || isalnum((unsigned char) *end))
			end++;
		if (ck_strcasestr(pnstrdup(setting, end - setting), "password") &&
			*end != '\0')
		{
			/* keep the quote that closes the name and the one that opens the value */
			const char *open = strpbrk(*end == '"' ? end + 1 : end, "\"'");
			char		quote = open ? *open : '\0';

			out.len = (open ? open + 1 : end) - out.data;
			out.data[out.len] = '\0';
			appendStringInfoString(&out, open ? "***" : " ***");
			if (quote)
				appendStringInfoChar(&out, quote);
			masked = true;
			break;
		}
	}

	/* ?sentinel_password=... and the like */
	masked |= ck_mask_query_passwords(&out);
	if (!masked)
	{
		pfree(out.data);
		return NULL;
	}
	return out.data;
}

/* Mask the secrets of one message field in place. */
static bool
ck_mask_field(char **field)
{
	char	   *masked;

	if (*field == NULL)
		return false;
	masked = ck_mask_secrets(*field);
	if (masked == NULL)
		return false;
	*field = masked;
	return true;
}

/*
 * emit_log_hook: a message about a cachekit setting (PostgreSQL's own
 * "parameter changed to" line, a logged or refused ALTER SYSTEM or SET, a
 * misspelt setting name in any letter case) never shows its statement,
 * which may hold a password, and loses the secrets of its own text.
 */
static void
ck_emit_log(ErrorData *edata)
{
	/* hints are cachekit's or PostgreSQL's own words, never a value */
	char	  **fields[] = {&edata->message, &edata->detail, &edata->detail_log,
		&edata->context, &edata->internalquery};
	bool		about_settings = false;

	for (int i = 0; i < (int) lengthof(fields); i++)
		if (*fields[i] && ck_strcasestr(*fields[i], "cachekit."))
			about_settings = true;
	if (about_settings)
	{
		edata->hide_stmt = true;
		for (int i = 0; i < (int) lengthof(fields); i++)
			(void) ck_mask_field(fields[i]);
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/*
 * The slot of the worker serving the current database, or NULL if none.
 * The index found last is tried first: a slot changes hands only when its
 * database stops being served.
 */
CachekitShared *
ck_my_slot(void)
{
	static int	last = -1;

	if (ck_slots == NULL || !OidIsValid(MyDatabaseId))
		return NULL;
	if (ck_shared != NULL)
		return ck_shared;
	/*
	 * The commit path: no lock. A slot that changed hands just now only
	 * means a wake-up for another worker; cachekit_wait checks the
	 * database of what it reads under the lock.
	 */
	if (last >= 0 && ((volatile CachekitShared *) &ck_slots[last])->dboid == MyDatabaseId)
		return &ck_slots[last];
	for (int n = 0; n <= ck_max_databases; n++)
	{
		int			i = (last < 0 ? n : (last + n) % ck_max_databases);
		CachekitShared *slot = &ck_slots[i];
		bool		mine;

		if (i == ck_max_databases)
			continue;			/* the probes' slot */
		SpinLockAcquire(&slot->mutex);
		mine = slot->dboid == MyDatabaseId;
		SpinLockRelease(&slot->mutex);
		if (mine)
		{
			last = i;
			return slot;
		}
	}
	return NULL;
}

/* Wake the worker of the current database, if one is running. */
void
ck_wake_worker(void)
{
	CachekitShared *slot = ck_my_slot();
	Latch	   *latch;

	if (slot == NULL)
		return;
	SpinLockAcquire(&slot->mutex);
	latch = slot->worker_latch;
	SpinLockRelease(&slot->mutex);
	if (latch)
		SetLatch(latch);
}

/*
 * Wake the worker at commit, unless a wake-up is already pending since its
 * last pass began: then it will see this commit's work anyway. This keeps
 * busy writers from signalling the worker once per transaction (and from
 * waking it at all while it waits out a backoff).
 */
void
ck_wake_worker_once(void)
{
	CachekitShared *slot = ck_my_slot();

	if (slot == NULL)
		return;
	if (pg_atomic_read_u32(&slot->wake_requested) != 0)
		return;
	if (pg_atomic_exchange_u32(&slot->wake_requested, 1) == 0)
		ck_wake_worker();
}

/* Tell cachekit_wait below which id of a queue nothing is pending. */
void
ck_publish_floor(Oid queue, int64 floor)
{
	SpinLockAcquire(&ck_shared->mutex);
	if (ck_shared->floor_database != MyDatabaseId || ck_shared->floor_queue != queue)
		ck_shared->drained_pass = 0;
	ck_shared->floor_database = MyDatabaseId;
	ck_shared->floor_queue = queue;
	ck_shared->delivered_floor = floor;
	SpinLockRelease(&ck_shared->mutex);
}

/*
 * Tell cachekit_wait that pass "pass" over this database's queue left
 * nothing undelivered that had committed before its snapshot, and wake the
 * waiters.
 */
void
ck_publish_drained(Oid queue, uint64 pass)
{
	SpinLockAcquire(&ck_shared->mutex);
	if (ck_shared->floor_database != MyDatabaseId || ck_shared->floor_queue != queue)
	{
		ck_shared->floor_database = MyDatabaseId;
		ck_shared->floor_queue = queue;
		ck_shared->delivered_floor = 0;
	}
	ck_shared->drained_pass = pass;
	SpinLockRelease(&ck_shared->mutex);
	ConditionVariableBroadcast(&ck_shared->delivered_cv);
}

/* Record the worker's most recent error for cachekit_stats. */
void
ck_set_last_error(const char *msg)
{
	SpinLockAcquire(&ck_shared->mutex);
	strlcpy(ck_shared->last_error, msg, CK_ERROR_LEN);
	ck_shared->last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&ck_shared->mutex);
}

/* The row type of a state function, once the shared state is known to exist. */
static TupleDesc
ck_state_tupdesc(FunctionCallInfo fcinfo)
{
	TupleDesc	tupdesc;

	if (ck_slots == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cachekit is not loaded"),
				 errhint("Add cachekit to shared_preload_libraries and restart the server.")));
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	return tupdesc;
}

/* cachekit_worker_state(): the worker's counters, behind cachekit_stats. */
Datum
cachekit_worker_state(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[13];
	bool		nulls[13];
	char		last_error[CK_ERROR_LEN];
	TimestampTz last_error_at;
	TimestampTz last_delivery_at;
	bool		connected;
	int			pid;
	int			i = 0;
	CachekitShared *slot = ck_my_slot();
	CachekitShared empty;

	tupdesc = ck_state_tupdesc(fcinfo);

	/* no worker serves this database: zeros */
	if (slot == NULL)
	{
		memset(&empty, 0, sizeof(empty));
		SpinLockInit(&empty.mutex);
		slot = &empty;
	}
	SpinLockAcquire(&slot->mutex);
	strlcpy(last_error, slot->last_error, CK_ERROR_LEN);
	last_error_at = slot->last_error_at;
	last_delivery_at = slot->last_delivery_at;
	connected = slot->connected;
	pid = slot->worker_pid;
	SpinLockRelease(&slot->mutex);

	memset(nulls, 0, sizeof(nulls));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->keys_deleted));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->tags_flushed));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->tag_keys_deleted));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->keys_written));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->values_too_large));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->entries_delivered));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->failed_attempts));
	values[i++] = Int64GetDatum(pg_atomic_read_u64(&slot->dead_lettered));
	if (last_error[0] != '\0')
		values[i] = CStringGetTextDatum(last_error);
	else
		nulls[i] = true;
	i++;
	if (last_error_at != 0)
		values[i] = TimestampTzGetDatum(last_error_at);
	else
		nulls[i] = true;
	i++;
	if (last_delivery_at != 0)
		values[i] = TimestampTzGetDatum(last_delivery_at);
	else
		nulls[i] = true;
	i++;
	values[i++] = BoolGetDatum(connected);
	if (pid != 0)
		values[i] = Int32GetDatum(pid);
	else
		nulls[i] = true;
	i++;

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* cachekit_topology_state(): the Redis topology the worker last connected to. */
Datum
cachekit_topology_state(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};
	int			mode;
	int			nodes;
	TimestampTz refreshed_at;
	CachekitShared *slot;
	uint64		redirects = 0;

	tupdesc = ck_state_tupdesc(fcinfo);
	slot = ck_my_slot();
	mode = nodes = 0;
	refreshed_at = 0;
	if (slot != NULL)
	{
		SpinLockAcquire(&slot->mutex);
		mode = slot->redis_mode;
		nodes = slot->redis_nodes;
		refreshed_at = slot->topology_refreshed_at;
		SpinLockRelease(&slot->mutex);
		redirects = pg_atomic_read_u64(&slot->redirects_followed);
	}

	if (mode == 0)
		nulls[0] = nulls[1] = true;
	else
	{
		values[0] = CStringGetTextDatum(mode == CK_MODE_CLUSTER ? "cluster" : "standalone");
		values[1] = Int32GetDatum(nodes);
	}
	if (refreshed_at != 0)
		values[2] = TimestampTzGetDatum(refreshed_at);
	else
		nulls[2] = true;
	values[3] = Int64GetDatum(redirects);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* cachekit_key_slot(key): the Redis Cluster slot of a key, as cachekit routes it. */
Datum
cachekit_key_slot(PG_FUNCTION_ARGS)
{
	text	   *key = PG_GETARG_TEXT_PP(0);

	PG_RETURN_INT32(ck_key_slot(VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key)));
}
