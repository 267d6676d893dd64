/*-------------------------------------------------------------------------
 *
 * cachekit.h
 *	  Declarations shared by the parts of cachekit: settings, shared memory,
 *	  templates, the queue, the worker and the Redis client.
 *
 * All PostgreSQL version workarounds live at the top of this file.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CACHEKIT_H
#define CACHEKIT_H

#include "postgres.h"

#include "access/htup.h"
#include "storage/itemptr.h"
#include "access/tupdesc.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

/*---- version workarounds ----*/

#if PG_VERSION_NUM < 150000
#define MarkGUCPrefixReserved(x) EmitWarningsOnPlaceholders(x)
#endif

/*---- queue entry kinds (cachekit_queue.kind) ----*/

#define CK_KIND_INVALIDATE	'i'		/* delete keys, flush tags */
#define CK_KIND_WRITE		'w'		/* SET key value [EX ttl], SADD to tags */
#define CK_KIND_DROP		'd'		/* delete key, SREM it from tags */

/* ttl of a drop entry that stands for a write-through value too large to send */
#define CK_TTL_TOO_LARGE	(-1)

#define CK_QUEUE_TABLE		"cachekit_queue"
#define CK_DEAD_TABLE		"cachekit_dead_letter"

/*---- settings (cachekit.c) ----*/

extern char *ck_redis_url;
extern char *ck_database;
extern char *ck_tag_prefix;
extern int	ck_batch_size;
extern int	ck_retry_max_delay;
extern int	ck_connect_timeout;
extern int	ck_command_timeout;
extern int	ck_max_attempts;
extern int	ck_max_value_bytes;
extern int	ck_redelete_after;

/*---- shared memory (cachekit.c) ----*/

#define CK_ERROR_LEN 256

typedef struct CachekitShared
{
	slock_t		mutex;			/* protects the non-atomic fields below */
	Latch	   *worker_latch;	/* set to wake the worker, NULL if none */
	int			worker_pid;
	bool		connected;		/* worker has a live Redis connection */
	char		last_error[CK_ERROR_LEN];
	TimestampTz last_error_at;
	TimestampTz last_delivery_at;
	ConditionVariable delivered_cv; /* broadcast after each delivered batch */
	pg_atomic_uint32 wake_requested;	/* set by committers, cleared by each pass */
	Oid			floor_queue;	/* the queue delivered_floor belongs to */
	int64		delivered_floor;	/* every entry below it is delivered */
	pg_atomic_uint64 keys_deleted;
	pg_atomic_uint64 tags_flushed;
	pg_atomic_uint64 tag_keys_deleted;
	pg_atomic_uint64 keys_written;
	pg_atomic_uint64 values_too_large;
	pg_atomic_uint64 entries_delivered;
	pg_atomic_uint64 failed_attempts;
	pg_atomic_uint64 dead_lettered;
} CachekitShared;

extern CachekitShared *ck_shared;

extern void ck_wake_worker(void);
extern void ck_wake_worker_once(void);
extern void ck_set_last_error(const char *msg);
extern void ck_publish_floor(Oid queue, int64 floor);

/*---- templates (template.c) ----*/

/* one piece of a parsed template: literal text or a column reference */
typedef struct CkTemplatePart
{
	char	   *literal;		/* literal text, or NULL for a column */
	char	   *column;			/* column name, for a column part */
	AttrNumber	attnum;			/* resolved against the table */
	char		format;			/* how to print it: CK_FORMAT_* */
	FmgrInfo	outfunc;		/* the column type's output function */
} CkTemplatePart;

/* how a column part is printed: by its output function, or directly */
#define CK_FORMAT_OUTFUNC	'o'
#define CK_FORMAT_INT2		'2'
#define CK_FORMAT_INT4		'4'
#define CK_FORMAT_INT8		'8'
#define CK_FORMAT_TEXT		't'

typedef struct CkTemplate
{
	char	   *source;			/* the template as written */
	int			nparts;
	CkTemplatePart *parts;
	bool		has_columns;
} CkTemplate;

extern char *ck_template_parse(const char *source, CkTemplate *tpl);
extern char *ck_template_bind(CkTemplate *tpl, TupleDesc tupdesc);
extern bool ck_template_render(CkTemplate *tpl, TupleTableSlot *slot,
							   StringInfo out);

/*---- the queue (queue.c) ----*/

extern void ck_enqueue(Oid nspid, char kind, List *keys, List *tags,
					   List *untags, const char *value, int ttl);
extern Oid	ck_extension_schema(FmgrInfo *flinfo);
extern void ck_note_enqueued(void);
extern void ck_queue_init(void);

/*---- delivery of one batch to Redis (deliver.c) ----*/

/* one queue entry as the worker read it, and what became of it */
typedef struct CkEntry
{
	int64		id;
	ItemPointerData ctid;		/* where the worker read it */
	char		kind;
	int			nkeys;
	char	  **keys;
	int			ntags;
	char	  **tags;
	int			nuntags;
	char	  **untags;
	char	   *value;			/* write-through value, or NULL */
	int			ttl;
	int			attempts;		/* failed attempts before this one */
	bool		failed;			/* Redis refused part of it */
	bool		transient;		/* ...with an error worth retrying */
	char	   *error;			/* the first refusal */
} CkEntry;

/* counters of one delivered batch */
typedef struct CkDeliveryStats
{
	uint64		keys_deleted;
	uint64		tags_flushed;
	uint64		tag_keys_deleted;
	uint64		keys_written;
	uint64		values_too_large;
} CkDeliveryStats;

extern bool ck_deliver_prepare(char **errmsg);
extern bool ck_deliver(CkEntry *entries, int n, CkDeliveryStats *stats, char **errmsg);

/*---- delayed second deletes (redelete.c) ----*/

extern void ck_redelete_remember(CkEntry *entries, int n);
extern long ck_redelete_next_ms(void);
extern bool ck_redelete_run_due(char **errmsg);

/*---- the worker (worker.c) ----*/

extern void ck_register_worker(void);
PGDLLEXPORT void cachekit_worker_main(Datum arg);

/*---- Redis (redis.c): the only part that includes hiredis ----*/

typedef struct CkRedisUrl
{
	char	   *host;
	int			port;
	char	   *user;			/* NULL for none */
	char	   *password;		/* NULL for none */
	int			db;
} CkRedisUrl;

/* the outcome of one command in a pipeline */
typedef enum CkReplyStatus
{
	CK_REPLY_OK,
	CK_REPLY_ERROR,				/* Redis refused this command */
	CK_REPLY_TRANSIENT			/* LOADING, BUSY, OOM...: retry later */
} CkReplyStatus;

typedef struct CkReply
{
	CkReplyStatus status;
	long long	integer;		/* integer replies */
	char	   *error;			/* palloc'd error text */
} CkReply;

extern bool ck_parse_redis_url(const char *url, CkRedisUrl *out, char **errmsg);
extern bool ck_redis_connect(const CkRedisUrl *url, char **errmsg);
extern void ck_redis_disconnect(void);
extern bool ck_redis_connected(void);
extern bool ck_redis_took_wakeup(void);
extern void ck_redis_append(int argc, const char **argv, const size_t *argvlen);
extern bool ck_redis_read(CkReply *reply, char **errmsg);
extern bool ck_redis_script_load(const char *body, char *sha, char **errmsg);

#endif							/* CACHEKIT_H */
