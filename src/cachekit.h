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
extern int	ck_max_databases;
extern char *ck_tag_prefix;
extern int	ck_batch_size;
extern int	ck_retry_max_delay;
extern int	ck_connect_timeout;
extern int	ck_command_timeout;
extern int	ck_max_attempts;
extern int	ck_max_value_bytes;
extern int	ck_dead_letter_after;
extern int	ck_batch_bytes;
extern int	ck_redelete_after;
extern int	ck_redis_mode;

/* cachekit.redis_mode: what cachekit.redis_url's hosts are taken for */
#define CK_MODE_AUTO		0	/* a cluster if the first seed reached says so */
#define CK_MODE_STANDALONE	1
#define CK_MODE_CLUSTER		2

/*---- shared memory (cachekit.c) ----*/

#define CK_ERROR_LEN 256

/*
 * The state of one delivery worker, one slot per served database
 * (cachekit.max_databases of them, and one more for the short-lived probe
 * workers, see launcher.c). In a worker, ck_shared is its own slot; in a
 * backend, ck_my_slot() finds the slot of its database (NULL when no worker
 * serves it).
 */
typedef struct CachekitShared
{
	slock_t		mutex;			/* protects the non-atomic fields below */
	Oid			dboid;			/* the database this slot serves, or
								 * InvalidOid when free (set by the launcher
								 * under CkLauncherLock) */
	Latch	   *worker_latch;	/* set to wake the worker, NULL if none */
	int			worker_pid;
	bool		connected;		/* worker has a live Redis connection */
	char		last_error[CK_ERROR_LEN];
	TimestampTz last_error_at;
	TimestampTz last_delivery_at;
	ConditionVariable delivered_cv; /* broadcast after each delivered batch */
	pg_atomic_uint32 wake_requested;	/* set by committers, cleared by each pass */
	Oid			floor_database; /* the database and queue delivered_floor */
	Oid			floor_queue;	/* belongs to (a copied database has the
								 * same queue OID) */
	int64		delivered_floor;	/* every entry below it is delivered */
	uint64		drained_pass;	/* of that queue too: the latest pass that
								 * left nothing committed before its
								 * snapshot undelivered */
	pg_atomic_uint64 passes;	/* passes begun: pass p takes its snapshot
								 * after this counter reached p */
	pg_atomic_uint64 keys_deleted;
	pg_atomic_uint64 tags_flushed;
	pg_atomic_uint64 tag_keys_deleted;
	pg_atomic_uint64 keys_written;
	pg_atomic_uint64 values_too_large;
	pg_atomic_uint64 entries_delivered;
	pg_atomic_uint64 failed_attempts;
	pg_atomic_uint64 dead_lettered;
	/* the Redis topology as the worker last connected to it (cluster.c) */
	int			redis_mode;		/* CK_MODE_STANDALONE or _CLUSTER; 0: not yet */
	int			redis_nodes;	/* nodes written to: 1, or the cluster's primaries */
	TimestampTz topology_refreshed_at;	/* the last slot map read, or 0 */
	pg_atomic_uint64 redirects_followed;	/* MOVED and ASK replies followed */
} CachekitShared;

extern CachekitShared *ck_shared;	/* in a worker: its own slot */
extern CachekitShared *ck_slots;	/* all slots; NULL when not preloaded */

extern CachekitShared *ck_my_slot(void);
extern void ck_slot_reset(CachekitShared *slot, Oid dboid);
extern void ck_wake_worker(void);
extern void ck_wake_worker_once(void);
extern void ck_set_last_error(const char *msg);
extern void ck_publish_floor(Oid queue, int64 floor);
extern void ck_publish_drained(Oid queue, uint64 pass);

/*---- the databases cachekit knows of (databases.c) ----*/

/* what the launcher knows of one database */
typedef enum CkDbState
{
	CK_DB_UNKNOWN,				/* not looked into yet: a probe will */
	CK_DB_NO_EXTENSION,			/* connectable, without the extension */
	CK_DB_EXTENSION,			/* has the extension: to be served */
	CK_DB_TEMPLATE,				/* a template database: skipped */
	CK_DB_NO_CONNECTIONS,		/* datallowconn = false: skipped */
	CK_DB_NOT_SELECTED			/* cachekit.database names another one */
} CkDbState;

typedef struct CkDatabase
{
	Oid			dboid;			/* InvalidOid: an unused entry */
	NameData	name;
	CkDbState	state;
	int			slot;			/* its slot in ck_slots, or -1 */
	int			worker_pid;		/* its worker or probe, 0 if none */
	bool		probing;		/* that process is a probe */
	bool		over_cap;		/* has the extension, no slot was free */
	bool		seen;			/* in pg_database at the last scan */
	bool		restart_now;	/* its worker stopped to restart at once */
	TimestampTz paused_until;	/* DROP/RENAME/COPY of it is running: no
								 * worker until then */
	TimestampTz restart_at;		/* no worker before then */
	TimestampTz reported_at;	/* last committed CREATE/DROP EXTENSION */
} CkDatabase;

/* the launcher's shared part (guarded by CkLauncherLock) */
typedef struct CkLauncherShared
{
	Latch	   *launcher_latch;
	int			launcher_pid;
	bool		scan_requested; /* a database was created: look now */
	int			ndatabases;		/* entries in use or once used */
	CkDatabase	databases[FLEXIBLE_ARRAY_MEMBER];
} CkLauncherShared;

/* entries of CkLauncherShared: databases cachekit can tell apart */
#define CK_MAX_KNOWN_DATABASES 4096

extern CkLauncherShared *ck_launcher;
extern struct LWLock *CkLauncherLock;

extern bool ck_serve_all(void);
extern CkDatabase *ck_database_entry(Oid dboid, bool create);
extern void ck_wake_launcher(void);
extern void ck_report_extension(bool present, const char *datname,
								TimestampTz looked_at);
extern void ck_request_restart(void);
extern void ck_databases_init(void);
extern char *ck_database_url_setting(void);

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
/* types whose output function depends on the session: one canonical form */
#define CK_FORMAT_TIMESTAMPTZ 'Z'
#define CK_FORMAT_TIMESTAMP	'T'
#define CK_FORMAT_DATE		'D'
#define CK_FORMAT_INTERVAL	'I'
#define CK_FORMAT_FLOAT4	'f'
#define CK_FORMAT_FLOAT8	'F'
#define CK_FORMAT_BYTEA		'b'
#define CK_FORMAT_MONEY		'm'

typedef struct CkTemplate
{
	char	   *source;			/* the template as written */
	int			nparts;
	CkTemplatePart *parts;
	bool		has_columns;
} CkTemplate;

extern AttrNumber ck_column_attnum(TupleDesc tupdesc, const char *name);
extern char *ck_template_parse(const char *source, CkTemplate *tpl);
extern char *ck_template_bind(CkTemplate *tpl, TupleDesc tupdesc, int *sqlstate);
extern char *ck_template_rename(const char *source, const char *oldname,
								const char *newname);
extern bool ck_template_render(CkTemplate *tpl, TupleTableSlot *slot,
							   StringInfo out);

/*---- write-through values (rowjson.c) ----*/

typedef struct CkJsonPlan CkJsonPlan;

extern CkJsonPlan *ck_json_plan(TupleDesc desc);
extern char *ck_json_render(CkJsonPlan *plan, TupleTableSlot *slot,
							const AttrNumber *columns);

/*---- trigger functions (trigger.c) ----*/

/* which trigger function a trigger calls */
typedef enum CkTriggerKind
{
	CK_TRIGGER_NONE,			/* not one of cachekit's */
	CK_TRIGGER_INVALIDATE,
	CK_TRIGGER_WRITE_THROUGH
} CkTriggerKind;

/* where rendered work goes: the queue, or cachekit_preview's rows */
typedef void (*CkEmitFunc) (void *arg, char kind, List *keys, List *tags,
							List *untags, const char *value, int ttl);
typedef struct CkSink
{
	CkEmitFunc	emit;
	void	   *arg;
} CkSink;

struct RelationData;
struct Trigger;
struct Bitmapset;

extern CkTriggerKind ck_trigger_kind(Oid funcoid);
extern struct Bitmapset *ck_trigger_validate(struct RelationData *rel, struct Trigger *tg,
											 CkTriggerKind kind);
extern void ck_trigger_render_change(struct RelationData *rel, struct Trigger *tg,
									 CkTriggerKind kind, TupleTableSlot *oldslot,
									 TupleTableSlot *newslot, CkSink *sink);
extern struct Bitmapset *ck_trigger_named_columns(struct RelationData *rel, struct Trigger *tg,
												  CkTriggerKind kind);
extern char *ck_trigger_arg_rename(struct RelationData *rel, struct Trigger *tg,
								   CkTriggerKind kind, int argno,
								   const char *oldname, const char *newname);

/*---- DDL and executor hooks (ddl.c) ----*/

extern void ck_ddl_init(void);
extern bool ck_query_has_modifying_cte(void);

/*---- the queue (queue.c) ----*/

extern Datum ck_targets_array(List *names);
extern void ck_queue_write_entry(Oid queue, char kind, List *keys, List *tags,
								 List *untags, const char *value, int ttl,
								 Datum targets);
extern Oid	ck_queue_relid(Oid nspid);
extern Oid	ck_extension_schema(FmgrInfo *flinfo);
extern void ck_note_enqueued(void);
extern void ck_queue_init(void);

/*---- a transaction's entries, written at pre-commit (pending.c) ----*/

extern void ck_enqueue(Oid nspid, char kind, List *keys, List *tags,
					   List *untags, const char *value, int ttl, Datum targets);
extern void ck_pending_init(void);

/*---- delivery of one batch to Redis (deliver.c) ----*/

/*
 * What a failure of an entry says about it (deliver.c decides, from the
 * reply of Redis; the worker decides the entry's fate from it).
 */
typedef enum CkErrorClass
{
	CK_ERRCLASS_NONE,			/* delivered */
	CK_ERRCLASS_HELD,			/* not sent: waits behind an earlier entry of its key */
	CK_ERRCLASS_TRANSIENT,		/* goes away by itself: retried, not counted */
	CK_ERRCLASS_SERVER,			/* Redis refuses everything: retried, not counted */
	CK_ERRCLASS_ENTRY			/* this entry is refused: counted, may dead-letter */
} CkErrorClass;

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
	TimestampTz first_refused_at;	/* its first counted refusal, or 0 */
	bool		failed;			/* Redis refused part of it, or it was held */
	CkErrorClass errclass;		/* why, when failed */
	char	   *error;			/* the first refusal */
	int			ntargets;		/* targets still owed it (0: the default one) */
	char	  **targets;
} CkEntry;

/* a string named by entries of a batch, and which entry */
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

/* counters of one delivered batch */
typedef struct CkDeliveryStats
{
	uint64		keys_deleted;
	uint64		tags_flushed;
	uint64		tag_keys_deleted;
	uint64		keys_written;
	uint64		values_too_large;
} CkDeliveryStats;

typedef struct CkConn CkConn;	/* a Redis connection, see protocol.c */
typedef struct CkTopology CkTopology;	/* where commands go, see topology.c */

extern CkErrorClass ck_error_class(const char *msg);
extern int	ck_group_items(CkItem *items, int nitems, CkGroup **groups_out);
extern bool ck_deliver_prepare(CkConn *conn, char **errmsg);
extern const char *const *ck_deliver_scripts(int *n);
extern bool ck_deliver(CkTopology *topo, CkEntry *entries, int n, CkDeliveryStats *stats,
					   char **errmsg);

/*---- delayed second deletes (redelete.c) ----*/

extern void ck_redelete_select(int target);
extern void ck_redelete_remember(CkEntry *entries, int n);
extern long ck_redelete_next_ms(void);
extern bool ck_redelete_run_due(CkTopology *topo, char **errmsg);

/*---- the worker (worker.c) ----*/

/* the first retry delay after a failure (then doubling up to cachekit.retry_max_delay) */
#define CK_FIRST_RETRY_MS 20

PGDLLEXPORT void cachekit_worker_main(Datum arg);

/*---- the launcher (launcher.c) ----*/

/* what the launcher tells a worker it starts (bgw_extra) */
typedef struct CkWorkerArgs
{
	int			slot;			/* index in ck_slots */
	bool		probe;			/* only say whether the extension is there */
} CkWorkerArgs;

extern void ck_register_worker(void);
PGDLLEXPORT void cachekit_launcher_main(Datum arg);

/*---- refused entries waiting for their retry (waiting.c) ----*/

extern void ck_waiting_select(int target);
extern void ck_waiting_forget(void);
extern void ck_waiting_start_pass(void);
extern int	ck_waiting_nskipped(void);
extern bool ck_waiting_idle(void);
extern int64 ck_waiting_min_skipped(void);
extern bool ck_waiting_skips(int64 id);
extern TimestampTz ck_waiting_next_retry(void);
extern void ck_waiting_hold(CkEntry *entries, int n);
extern void ck_waiting_update(CkEntry *entries, int n, const bool *refused);

/*---- Redis: where it is (url.c) ----*/

/* how the worker reaches Redis */
typedef enum CkRedisKind
{
	CK_REDIS_TCP,				/* redis://, rediss:// */
	CK_REDIS_UNIX,				/* unix:///path */
	CK_REDIS_SENTINEL			/* redis-sentinel://, rediss-sentinel:// */
} CkRedisKind;

/* one network address */
typedef struct CkHostPort
{
	char	   *host;
	int			port;
} CkHostPort;

typedef struct CkRedisUrl
{
	CkRedisKind kind;
	bool		tls;			/* rediss:// or rediss-sentinel:// */
	char	   *host;			/* TCP: the first host */
	int			port;
	int			nhosts;			/* TCP: every host (cluster seeds), in order */
	CkHostPort *hosts;
	char	   *path;			/* UNIX: the socket */
	int			nsentinels;		/* SENTINEL: where to ask, in order */
	CkHostPort *sentinels;
	char	   *master_name;
	char	   *sentinel_password;	/* URL parameter, or NULL */
	char	   *user;			/* NULL for none */
	char	   *password;		/* NULL for none */
	int			db;
} CkRedisUrl;

extern bool ck_parse_redis_url(const char *url, CkRedisUrl *out, char **errmsg);

/*---- Redis: TLS settings (cachekit.c) ----*/

#define CK_TLS_VERIFY_FULL	0	/* chain and host name */
#define CK_TLS_VERIFY_CA	1	/* chain only */
#define CK_TLS_VERIFY_NONE	2

extern char *ck_redis_tls_ca_file;
extern char *ck_redis_tls_cert_file;
extern char *ck_redis_tls_key_file;
extern int	ck_redis_tls_verify;
extern char *ck_redis_tls_server_name;
extern char *ck_redis_sentinel_password;

/*---- Redis: bytes on a socket, plain or TLS (transport.c) ----*/

struct ssl_st;
struct WaitEventSet;

/* one open socket; every wait on it is a latch wait with a deadline */
typedef struct CkTransport
{
	int			fd;				/* -1 when closed */
	struct ssl_st *ssl;			/* NULL for plain TCP or a unix socket */
	struct WaitEventSet *wait_set;
	int			socket_pos;
	uint32		socket_events;
	bool		connecting;		/* a reload abandons a connection attempt */
} CkTransport;

extern bool ck_transport_open(CkTransport *t, const char *host, int port,
							  const char *path, bool tls, TimestampTz deadline,
							  char **errmsg);
extern bool ck_transport_send(CkTransport *t, const char *data, size_t len,
							  TimestampTz deadline, char **errmsg);
extern ssize_t ck_transport_recv(CkTransport *t, char *buf, size_t cap,
								 TimestampTz deadline, char **errmsg);
extern void ck_transport_close(CkTransport *t);
extern bool ck_redis_took_wakeup(void);

/*---- Redis: commands and replies on one connection (protocol.c) ----*/

struct redisReader;

/* one connection to one Redis (or Sentinel) process */
struct CkConn
{
	MemoryContext cxt;			/* the connection and its buffers */
	CkTransport transport;
	struct redisReader *reader;
	StringInfoData out;			/* commands not sent yet */
	char	   *where;			/* host:port/db or the socket, for messages */
	bool		broken;
	int			replicas;		/* replicas that must have each batch, or 0 */
};

/* a whole reply, nested arrays included (ck_redis_call_value) */
typedef struct CkValue
{
	char		type;			/* CK_VALUE_* */
	char	   *str;			/* string, status or error text */
	long long	integer;
	int			n;				/* array elements */
	struct CkValue *elems;
} CkValue;

#define CK_VALUE_STRING		's'
#define CK_VALUE_ERROR		'e'
#define CK_VALUE_INTEGER	'i'
#define CK_VALUE_ARRAY		'a'
#define CK_VALUE_NIL		'n'

/* the outcome of one command in a pipeline */
typedef enum CkReplyStatus
{
	CK_REPLY_OK,
	CK_REPLY_ERROR				/* Redis refused this command (deliver.c classifies it) */
} CkReplyStatus;

typedef struct CkReply
{
	CkReplyStatus status;
	long long	integer;		/* integer replies */
	char	   *error;			/* palloc'd error text */
	int			nelems;			/* array replies: their string elements */
	char	  **elems;
} CkReply;

/* a reply to a set-up command, flattened: its strings, or its error */
typedef struct CkCallResult
{
	char	   *error;			/* an error reply, or NULL */
	bool		nil;			/* a nil reply */
	int			nstrings;		/* a string, or an array's elements: */
	char	  **strings;		/* strings; a nested array's length; NULL */
} CkCallResult;

extern CkConn *ck_conn_open(const char *host, int port, const char *path,
							bool tls, TimestampTz deadline, char **errmsg);
extern void ck_conn_free(CkConn *conn);
extern bool ck_conn_usable(CkConn *conn);
extern void ck_redis_append(CkConn *conn, int argc, const char **argv,
							const size_t *argvlen);
extern bool ck_redis_read(CkConn *conn, CkReply *reply, char **errmsg);
extern bool ck_redis_call(CkConn *conn, int argc, const char **argv,
						  TimestampTz deadline, CkCallResult *result,
						  char **errmsg);
extern char *ck_redis_format(int argc, const char **argv, const size_t *argvlen,
							 size_t *len);
extern void ck_redis_append_raw(CkConn *conn, const char *cmd, size_t len);
extern bool ck_redis_send(CkConn *conn, char **errmsg);
extern bool ck_redis_call_value(CkConn *conn, int argc, const char **argv,
								TimestampTz deadline, CkValue *value, char **errmsg);
extern bool ck_redis_script_load(CkConn *conn, const char *body, char *sha,
								 char **errmsg);

/*---- Redis: which node to talk to (topology.c) ----*/

typedef struct CkNode CkNode;	/* one node written to (cluster.c) */

/*
 * What the worker connects to, and what it learnt about it. It owns its
 * connections: one node (single, Sentinel) or every primary of a cluster
 * with the slot map; delivery asks it where each command goes (ck_send).
 */
struct CkTopology
{
	MemoryContext cxt;
	CkRedisUrl	url;
	int			mode;			/* CK_MODE_STANDALONE or _CLUSTER once connected */
	List	   *nodes;			/* CkNode: the one node, or the primaries */
	CkNode	  **slots;			/* cluster: each slot's primary, NULL: none */
	List	   *known;			/* cluster: "host:port" of every node seen */
	bool		refresh;		/* cluster: a MOVED said the map is stale */
	int		   *sentinel_order; /* indexes into url.sentinels, best first */
	char	   *master;			/* host:port of the last master connected to */
	bool		master_changed; /* ...which is not the one before: replay */
	List	   *recent;			/* CkRecent: batches delivered lately */
	int64		recent_keys;
	bool		recent_truncated;	/* some were forgotten early */
};

extern CkTopology *ck_topology_create(const char *url_text, char **errmsg);
extern void ck_topology_free(CkTopology *topo);
extern bool ck_topology_connect(CkTopology *topo, char **where, char **errmsg);
extern CkConn *ck_topology_open_node(CkTopology *topo, const char *host, int port,
									 char **errmsg);
extern void ck_topology_disconnect(CkTopology *topo);
extern bool ck_topology_usable(CkTopology *topo);
extern bool ck_topology_sync(CkTopology *topo, char **errmsg);
extern void ck_topology_note_delivered(CkTopology *topo, const CkEntry *entries, int n);
extern bool ck_topology_replay(CkTopology *topo, char **errmsg);

/*---- Redis Cluster: slots, the slot map, routing commands (cluster.c) ----*/

#define CK_NSLOTS 16384

typedef struct CkCmd CkCmd;		/* one command sent, its reply to come */

extern int	ck_key_slot(const char *key, size_t len);
extern const char *ck_slot_tag(int slot);
extern int	ck_topology_slot(CkTopology *topo, const char *key);
extern bool ck_cluster_connect(CkTopology *topo, CkConn *seed, char **errmsg);
extern bool ck_cluster_detect(CkConn *seed, bool *cluster, char **errmsg);
extern void ck_publish_topology(CkTopology *topo, bool refreshed);
extern CkNode *ck_node_add(CkTopology *topo, const char *host, int port, CkConn *conn);
extern void ck_nodes_close(CkTopology *topo);
extern bool ck_nodes_usable(CkTopology *topo);
extern bool ck_route_begin(CkTopology *topo, char **errmsg);
extern CkCmd *ck_send(CkTopology *topo, const char *key, int argc, const char **argv,
					  const size_t *lens);
extern bool ck_recv(CkTopology *topo, CkCmd *cmd, CkReply *reply, char **errmsg);
extern bool ck_nodes_wait(CkTopology *topo, char **errmsg);

/*---- named Redis targets (targets.c) ----*/

#define CK_DEFAULT_TARGET	"default"	/* cachekit.redis_url */
#define CK_MAX_TARGETS		16	/* per database, "default" included */

/* a target's counters in shared memory, in cachekit_target_state()'s order */
enum
{
	CK_TC_ENTRIES_DELIVERED,
	CK_TC_FAILED_ATTEMPTS,
	CK_TC_DEAD_LETTERED,
	CK_TC_KEYS_DELETED,
	CK_TC_TAGS_FLUSHED,
	CK_TC_TAG_KEYS_DELETED,
	CK_TC_KEYS_WRITTEN,
	CK_TARGET_NCOUNTERS
};

extern char *ck_targets;
extern void ck_targets_init(void);
extern void ck_targets_shmem_request(void);
extern void ck_targets_shmem_startup(void);
extern bool ck_targets_parse(const char *value, List **names, List **urls, char **errmsg);
extern bool ck_target_configured(const char *name);
extern bool ck_target_name_valid(const char *name);
extern void ck_target_check_name(const char *name, const char *where);
extern int	ck_target_slot(const char *name);
extern void ck_target_release_others(List *names);
extern void ck_target_set_connected(int slot, bool connected);
extern void ck_target_set_error(int slot, const char *msg);
extern void ck_target_count(int slot, const uint64 *add, bool delivered);

#endif							/* CACHEKIT_H */
