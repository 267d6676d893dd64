/*-------------------------------------------------------------------------
 *
 * cluster.c
 *	  Where each command goes: the nodes a topology writes to, Redis
 *	  Cluster's slots and slot map, and commands routed, redirected and
 *	  read back in order.
 *
 * A topology (topology.c) holds one node for a single Redis or a Sentinel's
 * master, or every primary of a cluster with the map of which primary
 * serves which of the 16384 slots (read with CLUSTER SHARDS, or CLUSTER
 * SLOTS where that is refused: Redis before 7, an ACL). A key's slot
 * is CRC16 of the key, or of its {hash tag}, modulo 16384.
 *
 * Delivery sends a command with ck_send (naming the key that routes it)
 * and later reads its reply with ck_recv. Each node keeps the commands it
 * was sent, oldest first, so replies are matched to commands however the
 * reads interleave across nodes. A reply that redirects is not the
 * command's answer: MOVED points the slot to another node (the whole map
 * is read again before the next batch) and the command goes there; ASK
 * sends ASKING and the command to the importing node once, the map
 * unchanged; NOSCRIPT (a new node, or one after a failover) loads the
 * scripts on that node and sends the command again. Each command is
 * redirected a few times at most; then its last error stands, of a class
 * that is retried later without being counted (ck_error_class).
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "lib/ilist.h"
#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "utils/memutils.h"

/*
 * The longest WAIT for the replicas after a batch. It is short: while a
 * replica is promoted, WAITs on the old primary fail, and the worker must
 * soon find the new one.
 */
#define CK_WAIT_MAX_MS 500

/* how often one command may be redirected before its error stands */
#define CK_MAX_REDIRECTS 5

/* one node written to, and the commands it owes replies for */
struct CkNode
{
	char	   *host;
	int			port;
	char	   *addr;			/* host:port, for messages and lookups */
	CkConn	   *conn;			/* NULL until first used */
	dlist_head	fifo;			/* CkCmd sent, reply not read yet, oldest first */
	int			replicas;		/* online replicas: WAIT for them after a batch */
	bool		written;		/* sent something since the last WAIT */
};

/* one command sent (or to be sent again), and its reply */
struct CkCmd
{
	dlist_node	link;			/* in its node's fifo */
	CkNode	   *node;
	char	   *raw;			/* the command in the wire format */
	size_t		rawlen;
	int			redirects;
	bool		internal;		/* ASKING, SCRIPT LOAD: the reply is dropped */
	bool		done;
	char	   *lost;			/* the node could not be reached: why */
	CkReply		reply;
};

/*---- slots ----*/

static uint16 crc16_table[256];
static bool crc16_ready = false;

/* CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), as Redis Cluster uses. */
static uint16
ck_crc16(const char *buf, size_t len)
{
	uint16		crc = 0;

	if (!crc16_ready)
	{
		for (int i = 0; i < 256; i++)
		{
			uint16		c = (uint16) (i << 8);

			for (int b = 0; b < 8; b++)
				c = (c & 0x8000) ? (uint16) ((c << 1) ^ 0x1021) : (uint16) (c << 1);
			crc16_table[i] = c;
		}
		crc16_ready = true;
	}
	for (size_t i = 0; i < len; i++)
		crc = (uint16) ((crc << 8) ^ crc16_table[((crc >> 8) ^ (uint8) buf[i]) & 0xff]);
	return crc;
}

/*
 * The slot of a key: of its hash tag, the text between the first '{' and
 * the first '}' after it, when that is not empty; else of the whole key.
 */
int
ck_key_slot(const char *key, size_t len)
{
	const char *open = memchr(key, '{', len);

	if (open)
	{
		size_t		rest = len - (open - key) - 1;
		const char *close = memchr(open + 1, '}', rest);

		if (close && close > open + 1)
			return ck_crc16(open + 1, close - open - 1) % CK_NSLOTS;
	}
	return ck_crc16(key, len) % CK_NSLOTS;
}

/*
 * A short text whose slot is the given one: "{text}" in front of a name
 * puts it in that slot (a tag's private flush set goes in the tag's slot).
 * The table is made on first use, by counting in base 36 until every slot
 * has a text (about 170,000 CRCs).
 */
const char *
ck_slot_tag(int slot)
{
	static char (*tags)[8] = NULL;

	if (tags == NULL)
	{
		static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
		int			left = CK_NSLOTS;

		tags = MemoryContextAllocZero(TopMemoryContext, sizeof(*tags) * CK_NSLOTS);
		for (uint32 i = 0; left > 0; i++)
		{
			char		text[8];
			int			len = 0;
			int			s;

			for (uint32 v = i;; v /= 36)
			{
				text[len++] = digits[v % 36];
				if (v < 36)
					break;
			}
			text[len] = '\0';
			s = ck_key_slot(text, len);
			if (tags[s][0] == '\0')
			{
				memcpy(tags[s], text, len + 1);
				left--;
			}
		}
	}
	return tags[slot];
}

/* The slot that routes a key through this topology (0 unless a cluster). */
int
ck_topology_slot(CkTopology *topo, const char *key)
{
	if (topo->mode != CK_MODE_CLUSTER)
		return 0;
	return ck_key_slot(key, strlen(key));
}

/*---- nodes ----*/

/* Add a node (with its connection, if open) to the topology. */
CkNode *
ck_node_add(CkTopology *topo, const char *host, int port, CkConn *conn)
{
	MemoryContext old = MemoryContextSwitchTo(topo->cxt);
	CkNode	   *node = palloc0(sizeof(CkNode));

	node->host = pstrdup(host);
	node->port = port;
	node->addr = psprintf(strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
	node->conn = conn;
	node->replicas = conn ? conn->replicas : 0;
	dlist_init(&node->fifo);
	topo->nodes = lappend(topo->nodes, node);
	MemoryContextSwitchTo(old);
	return node;
}

/* The node of an address, added (not connected) when new. */
static CkNode *
ck_node_find(CkTopology *topo, const char *host, int port)
{
	ListCell   *lc;

	foreach(lc, topo->nodes)
	{
		CkNode	   *node = lfirst(lc);

		if (node->port == port && strcmp(node->host, host) == 0)
			return node;
	}
	return ck_node_add(topo, host, port, NULL);
}

/* Close a node's connection and free it. */
static void
ck_node_free(CkNode *node)
{
	ck_conn_free(node->conn);
	pfree(node->host);
	pfree(node->addr);
	pfree(node);
}

/* Close every node's connection and forget the nodes. */
void
ck_nodes_close(CkTopology *topo)
{
	ListCell   *lc;

	foreach(lc, topo->nodes)
		ck_node_free(lfirst(lc));
	list_free(topo->nodes);
	topo->nodes = NIL;
	if (topo->slots)
		memset(topo->slots, 0, sizeof(CkNode *) * CK_NSLOTS);
}

/* Has every node it holds a working connection (and a cluster its map)? */
bool
ck_nodes_usable(CkTopology *topo)
{
	ListCell   *lc;

	if (topo->nodes == NIL)
		return false;
	foreach(lc, topo->nodes)
	{
		CkNode	   *node = lfirst(lc);

		if (node->conn != NULL && !ck_conn_usable(node->conn))
			return false;
	}
	return true;
}

/* Publish the topology for cachekit_stats. */
void
ck_publish_topology(CkTopology *topo, bool refreshed)
{
	SpinLockAcquire(&ck_shared->mutex);
	ck_shared->redis_mode = topo->mode;
	ck_shared->redis_nodes = list_length(topo->nodes);
	if (refreshed)
		ck_shared->topology_refreshed_at = GetCurrentTimestamp();
	SpinLockRelease(&ck_shared->mutex);
}

/*---- the slot map ----*/

/* The value of a name in a flat name/value array (CLUSTER SHARDS), or NULL. */
static CkValue *
ck_field(CkValue *map, const char *name)
{
	if (map->type != CK_VALUE_ARRAY)
		return NULL;
	for (int i = 0; i + 1 < map->n; i += 2)
		if (map->elems[i].type == CK_VALUE_STRING && strcmp(map->elems[i].str, name) == 0)
			return &map->elems[i + 1];
	return NULL;
}

/* A node entry of CLUSTER SHARDS: where to reach it, its role and health. */
static bool
ck_shard_node(CkTopology *topo, CkValue *n, char **host, int *port, bool *primary,
			  bool *online)
{
	CkValue    *endpoint = ck_field(n, "endpoint");
	CkValue    *ip = ck_field(n, "ip");
	CkValue    *p = ck_field(n, topo->url.tls ? "tls-port" : "port");
	CkValue    *role = ck_field(n, "role");
	CkValue    *health = ck_field(n, "health");

	if (p == NULL || p->type != CK_VALUE_INTEGER || role == NULL || role->str == NULL)
		return false;
	if (endpoint && endpoint->str && endpoint->str[0] != '\0' && strcmp(endpoint->str, "?") != 0)
		*host = endpoint->str;
	else if (ip && ip->str && ip->str[0] != '\0')
		*host = ip->str;
	else
		return false;
	*port = (int) p->integer;
	*primary = strcmp(role->str, "master") == 0;
	*online = health && health->str && strcmp(health->str, "online") == 0;
	return *port > 0;
}

/* Remember a node's address, to read the map from when the seeds fail. */
static void
ck_note_known(CkTopology *topo, const char *host, int port)
{
	MemoryContext old;
	char	   *addr = psprintf("%s:%d", host, port);
	ListCell   *lc;

	foreach(lc, topo->known)
		if (strcmp((char *) lfirst(lc), addr) == 0)
			return;
	old = MemoryContextSwitchTo(topo->cxt);
	topo->known = lappend(topo->known, pstrdup(addr));
	MemoryContextSwitchTo(old);
}

/* One shard of CLUSTER SHARDS into the new map; false if malformed. */
static bool
ck_map_shard(CkTopology *topo, CkValue *shard, CkNode **slots, List **primaries)
{
	CkValue    *ranges = ck_field(shard, "slots");
	CkValue    *nodes = ck_field(shard, "nodes");
	char	   *phost = NULL;
	int			pport = 0;
	int			replicas = 0;
	CkNode	   *node;

	if (ranges == NULL || nodes == NULL || ranges->type != CK_VALUE_ARRAY ||
		nodes->type != CK_VALUE_ARRAY)
		return false;
	for (int i = 0; i < nodes->n; i++)
	{
		char	   *host;
		int			port;
		bool		primary,
					online;

		if (!ck_shard_node(topo, &nodes->elems[i], &host, &port, &primary, &online))
			return false;
		ck_note_known(topo, host, port);
		if (primary && online)
		{
			phost = host;
			pport = port;
		}
		else if (!primary && online)
			replicas++;
	}
	if (phost == NULL || ranges->n == 0)
		return true;			/* a shard without slots, or its primary down */
	node = ck_node_find(topo, phost, pport);
	node->replicas = replicas;
	if (!list_member_ptr(*primaries, node))
		*primaries = lappend(*primaries, node);
	for (int i = 0; i + 1 < ranges->n; i += 2)
	{
		long long	lo = ranges->elems[i].integer;
		long long	hi = ranges->elems[i + 1].integer;

		if (lo < 0 || hi >= CK_NSLOTS || lo > hi)
			return false;
		for (long long s = lo; s <= hi; s++)
			slots[s] = node;
	}
	return true;
}

/* One range of CLUSTER SLOTS (Redis before 7) into the new map; false if malformed. */
static bool
ck_map_range(CkTopology *topo, CkValue *range, CkNode **slots, List **primaries)
{
	CkNode	   *node;
	long long	lo,
				hi;

	if (range->type != CK_VALUE_ARRAY || range->n < 3 ||
		range->elems[0].type != CK_VALUE_INTEGER || range->elems[1].type != CK_VALUE_INTEGER)
		return false;
	for (int i = 2; i < range->n; i++)
	{
		CkValue    *n = &range->elems[i];

		if (n->type != CK_VALUE_ARRAY || n->n < 2 || n->elems[0].type != CK_VALUE_STRING ||
			n->elems[0].str[0] == '\0' || n->elems[1].type != CK_VALUE_INTEGER)
			return false;
		ck_note_known(topo, n->elems[0].str, (int) n->elems[1].integer);
	}
	lo = range->elems[0].integer;
	hi = range->elems[1].integer;
	if (lo < 0 || hi >= CK_NSLOTS || lo > hi)
		return false;
	node = ck_node_find(topo, range->elems[2].elems[0].str, (int) range->elems[2].elems[1].integer);
	node->replicas = range->n - 3;	/* failed replicas are not listed */
	if (!list_member_ptr(*primaries, node))
		*primaries = lappend(*primaries, node);
	for (long long s = lo; s <= hi; s++)
		slots[s] = node;
	return true;
}

/*
 * Read the map with CLUSTER SHARDS (Redis 7), or CLUSTER SLOTS where that
 * is refused (an older Redis, an ACL); false with *errmsg if neither works.
 */
static bool
ck_map_query(CkTopology *topo, CkConn *conn, CkNode **slots, List **primaries, char **errmsg)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ck_connect_timeout);
	const char *argv[2] = {"CLUSTER", "SHARDS"};
	CkValue		v;
	bool		shards = true;

	if (!ck_redis_call_value(conn, 2, argv, deadline, &v, errmsg))
		return false;
	if (v.type == CK_VALUE_ERROR)
	{
		argv[1] = "SLOTS";
		shards = false;
		if (!ck_redis_call_value(conn, 2, argv, deadline, &v, errmsg))
			return false;
	}
	if (v.type != CK_VALUE_ARRAY)
	{
		*errmsg = psprintf("Redis at %s: CLUSTER %s failed: %s", conn->where, argv[1],
						   v.type == CK_VALUE_ERROR ? v.str : "unexpected reply");
		return false;
	}
	for (int i = 0; i < v.n; i++)
		if (!(shards ? ck_map_shard(topo, &v.elems[i], slots, primaries) :
			  ck_map_range(topo, &v.elems[i], slots, primaries)))
		{
			*errmsg = psprintf("Redis at %s: CLUSTER %s: unexpected reply", conn->where, argv[1]);
			return false;
		}
	return true;
}

/*
 * Read the slot map on a connection: the slots' primaries become the
 * topology's nodes (connections of nodes kept are kept, those of nodes
 * that serve no slot any more are closed).
 */
static bool
ck_map_read(CkTopology *topo, CkConn *conn, char **errmsg)
{
	CkNode	  **slots = palloc0(sizeof(CkNode *) * CK_NSLOTS);
	List	   *primaries = NIL;
	List	   *old_nodes;
	ListCell   *lc;

	if (!ck_map_query(topo, conn, slots, &primaries, errmsg))
		return false;
	/* nodes serving no slot any more are let go */
	old_nodes = topo->nodes;
	topo->nodes = NIL;
	foreach(lc, old_nodes)
	{
		CkNode	   *node = lfirst(lc);

		if (list_member_ptr(primaries, node))
		{
			MemoryContext old = MemoryContextSwitchTo(topo->cxt);

			topo->nodes = lappend(topo->nodes, node);
			MemoryContextSwitchTo(old);
		}
		else
			ck_node_free(node);
	}
	list_free(old_nodes);
	if (topo->slots == NULL)
		topo->slots = MemoryContextAllocZero(topo->cxt, sizeof(CkNode *) * CK_NSLOTS);
	memcpy(topo->slots, slots, sizeof(CkNode *) * CK_NSLOTS);
	topo->refresh = false;
	ck_publish_topology(topo, true);
	return true;
}

/* Connect a node that has no connection yet (logged in, scripts loaded). */
static bool
ck_node_connect(CkTopology *topo, CkNode *node, char **errmsg)
{
	if (node->conn != NULL)
		return true;
	node->conn = ck_topology_open_node(topo, node->host, node->port, errmsg);
	if (node->conn != NULL && !ck_deliver_prepare(node->conn, errmsg))
	{
		ck_conn_free(node->conn);
		node->conn = NULL;
	}
	return node->conn != NULL;
}

/*
 * Read the map again: from a node connected now, else from any node seen,
 * else from the URL's seeds. False with *errmsg when none answered.
 */
static bool
ck_map_refresh(CkTopology *topo, char **errmsg)
{
	ListCell   *lc;
	List	   *addrs = list_copy(topo->known);

	foreach(lc, topo->nodes)
	{
		CkNode	   *node = lfirst(lc);

		if (ck_conn_usable(node->conn) && dlist_is_empty(&node->fifo) &&
			ck_map_read(topo, node->conn, errmsg))
			return true;
	}
	for (int i = 0; i < topo->url.nhosts; i++)
		addrs = lappend(addrs, psprintf("%s:%d", topo->url.hosts[i].host, topo->url.hosts[i].port));
	foreach(lc, addrs)
	{
		char	   *addr = pstrdup(lfirst(lc));
		char	   *colon = strrchr(addr, ':');
		CkConn	   *conn;
		bool		ok;

		*colon = '\0';
		conn = ck_topology_open_node(topo, addr, atoi(colon + 1), errmsg);
		if (conn == NULL)
			continue;
		ok = ck_map_read(topo, conn, errmsg);
		ck_conn_free(conn);
		if (ok)
			return true;
		if (ConfigReloadPending)
			break;
	}
	return false;
}

/* Is the seed part of a cluster (INFO cluster says cluster_enabled:1)? */
bool
ck_cluster_detect(CkConn *seed, bool *cluster, char **errmsg)
{
	const char *argv[2] = {"INFO", "cluster"};
	CkCallResult res;

	if (!ck_redis_call(seed, 2, argv,
					   TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ck_connect_timeout),
					   &res, errmsg))
		return false;
	*cluster = res.error == NULL && res.nstrings == 1 && res.strings[0] &&
		strstr(res.strings[0], "cluster_enabled:1") != NULL;
	return true;
}

/*
 * Set up a cluster topology from a seed connection: read the map on it
 * and connect every primary. The seed's connection is closed.
 */
bool
ck_cluster_connect(CkTopology *topo, CkConn *seed, char **errmsg)
{
	ListCell   *lc;
	bool		ok;

	topo->mode = CK_MODE_CLUSTER;
	ck_nodes_close(topo);
	ok = ck_map_read(topo, seed, errmsg);
	ck_conn_free(seed);
	if (!ok)
		return false;
	if (topo->nodes == NIL)
	{
		*errmsg = pstrdup("the Redis Cluster has no primary serving slots (is it created?)");
		return false;
	}
	foreach(lc, topo->nodes)
		if (!ck_node_connect(topo, lfirst(lc), errmsg))
			return false;
	ck_publish_topology(topo, false);
	return true;
}

/*---- routing ----*/

/* Put a command on a node's pipeline; a node that cannot be reached loses it. */
static void
ck_node_send(CkTopology *topo, CkNode *node, CkCmd *cmd)
{
	char	   *err = NULL;

	cmd->node = node;
	cmd->done = false;
	if (!ck_node_connect(topo, node, &err))
	{
		cmd->lost = psprintf("Redis node %s: %s", node->addr, err);
		return;
	}
	ck_redis_append_raw(node->conn, cmd->raw, cmd->rawlen);
	dlist_push_tail(&node->fifo, &cmd->link);
	node->written = true;
}

/* A command with no reply wanted (ASKING, SCRIPT LOAD) onto a node's pipeline. */
static void
ck_node_send_internal(CkTopology *topo, CkNode *node, int argc, const char **argv)
{
	CkCmd	   *cmd = palloc0(sizeof(CkCmd));
	size_t	   *lens = palloc(sizeof(size_t) * argc);

	for (int i = 0; i < argc; i++)
		lens[i] = strlen(argv[i]);
	cmd->raw = ck_redis_format(argc, argv, lens, &cmd->rawlen);
	cmd->internal = true;
	ck_node_send(topo, node, cmd);
}

/*
 * Before a batch: read the map again if a MOVED said it is stale, and
 * make sure no node owes a reply (a batch cut short leaves none: its
 * connections are closed).
 */
bool
ck_route_begin(CkTopology *topo, char **errmsg)
{
	ListCell   *lc;

	foreach(lc, topo->nodes)
		if (!dlist_is_empty(&((CkNode *) lfirst(lc))->fifo))
		{
			*errmsg = pstrdup("replies of an earlier batch were not read");
			return false;
		}
	if (topo->mode == CK_MODE_CLUSTER && topo->refresh && !ck_map_refresh(topo, errmsg))
		return false;
	return true;
}

/*
 * Send a command about a key (which routes it) and return it, to read its
 * reply with ck_recv. In a cluster a slot no primary serves gets the reply
 * a node would give (CLUSTERDOWN, retried later).
 */
CkCmd *
ck_send(CkTopology *topo, const char *key, int argc, const char **argv, const size_t *lens)
{
	CkCmd	   *cmd = palloc0(sizeof(CkCmd));
	CkNode	   *node;

	cmd->raw = ck_redis_format(argc, argv, lens, &cmd->rawlen);
	if (topo->mode != CK_MODE_CLUSTER)
		node = linitial(topo->nodes);
	else if ((node = topo->slots[ck_topology_slot(topo, key)]) == NULL)
	{
		cmd->done = true;
		cmd->reply.status = CK_REPLY_ERROR;
		cmd->reply.error = pstrdup("CLUSTERDOWN Hash slot not served");
		topo->refresh = true;
		return cmd;
	}
	ck_node_send(topo, node, cmd);
	return cmd;
}

/* Parse "MOVED|ASK <slot> <host>:<port>"; the host may be empty (the same node's). */
static bool
ck_parse_redirect(const char *msg, CkNode *from, int *slot, char **host, int *port)
{
	const char *sp = strchr(msg, ' ');
	const char *addr;
	const char *colon;

	if (sp == NULL)
		return false;
	*slot = atoi(sp + 1);
	addr = strchr(sp + 1, ' ');
	if (addr == NULL || *slot < 0 || *slot >= CK_NSLOTS)
		return false;
	addr++;
	colon = strrchr(addr, ':');
	if (colon == NULL || atoi(colon + 1) <= 0)
		return false;
	*host = colon == addr ? pstrdup(from->host) : pnstrdup(addr, colon - addr);
	*port = atoi(colon + 1);
	return true;
}

/*
 * A reply that is not the command's answer: follow it (the command is sent
 * again) and return true. In a cluster: MOVED, ASK, and NOSCRIPT.
 */
static bool
ck_redirect(CkTopology *topo, CkCmd *cmd)
{
	const char *msg = cmd->reply.error;
	bool		moved;
	int			slot,
				port;
	char	   *host;
	CkNode	   *node;

	if (topo->mode != CK_MODE_CLUSTER || msg == NULL || cmd->redirects >= CK_MAX_REDIRECTS)
		return false;
	if (strncmp(msg, "NOSCRIPT ", 9) == 0)
	{
		int			n;
		const char *const *bodies = ck_deliver_scripts(&n);

		for (int i = 0; i < n; i++)
		{
			const char *argv[3] = {"SCRIPT", "LOAD", bodies[i]};

			ck_node_send_internal(topo, cmd->node, 3, argv);
		}
		node = cmd->node;
	}
	else
	{
		moved = strncmp(msg, "MOVED ", 6) == 0;
		if (!moved && strncmp(msg, "ASK ", 4) != 0)
			return false;
		if (!ck_parse_redirect(msg, cmd->node, &slot, &host, &port))
			return false;
		node = ck_node_find(topo, host, port);
		if (moved)
		{
			topo->slots[slot] = node;
			topo->refresh = true;
		}
		else
		{
			const char *asking[1] = {"ASKING"};

			ck_node_send_internal(topo, node, 1, asking);
		}
		pg_atomic_fetch_add_u64(&ck_shared->redirects_followed, 1);
	}
	cmd->redirects++;
	memset(&cmd->reply, 0, sizeof(CkReply));
	ck_node_send(topo, node, cmd);
	return true;
}

/*
 * The reply to a command sent with ck_send: replies on its node are read in
 * order (kept for their commands) until its own comes, redirections
 * followed. False with *errmsg when a node's connection failed.
 */
bool
ck_recv(CkTopology *topo, CkCmd *cmd, CkReply *reply, char **errmsg)
{
	while (!cmd->done)
	{
		CkNode	   *node = cmd->node;
		CkCmd	   *head;
		ListCell   *lc;

		if (cmd->lost)
		{
			*errmsg = cmd->lost;
			return false;
		}
		/* every node works on its commands while this one's replies are read */
		foreach(lc, topo->nodes)
		{
			CkNode	   *other = lfirst(lc);

			if (other != node && other->conn && other->conn->out.len > 0 &&
				!ck_redis_send(other->conn, errmsg))
				return false;
		}
		Assert(!dlist_is_empty(&node->fifo));
		head = dlist_container(CkCmd, link, dlist_pop_head_node(&node->fifo));
		if (!ck_redis_read(node->conn, &head->reply, errmsg))
			return false;
		if (!head->internal && ck_redirect(topo, head))
			continue;
		head->done = true;
	}
	*reply = cmd->reply;
	return true;
}

/*
 * After a batch: WAIT on every node written to for its replicas, so that a
 * failover cannot lose what it acknowledged. False with *errmsg when one
 * did not have them in time (the batch is then sent again).
 */
bool
ck_nodes_wait(CkTopology *topo, char **errmsg)
{
	ListCell   *lc;
	List	   *waits = NIL;
	List	   *waited = NIL;
	ListCell   *lw;
	char	   *timeout = psprintf("%d", Max(Min(ck_command_timeout / 2, CK_WAIT_MAX_MS), 1));

	foreach(lc, topo->nodes)
	{
		CkNode	   *node = lfirst(lc);
		const char *argv[3] = {"WAIT", psprintf("%d", node->replicas), timeout};
		size_t		lens[3] = {4, strlen(argv[1]), strlen(argv[2])};
		CkCmd	   *cmd;
		bool		written = node->written;

		node->written = false;
		if (!written || node->replicas <= 0)
			continue;
		cmd = palloc0(sizeof(CkCmd));
		cmd->raw = ck_redis_format(3, argv, lens, &cmd->rawlen);
		ck_node_send(topo, node, cmd);
		waits = lappend(waits, cmd);
		waited = lappend(waited, node);
	}
	forboth(lc, waits, lw, waited)
	{
		CkNode	   *node = lfirst(lw);
		CkReply		reply;

		if (!ck_recv(topo, lfirst(lc), &reply, errmsg))
			return false;
		if (reply.status != CK_REPLY_OK || reply.integer < node->replicas)
		{
			*errmsg = reply.error ? psprintf("WAIT failed: %s (Redis at %s)", reply.error, node->addr) :
				psprintf("Redis at %s: %lld of %d replicas acknowledged the batch in time",
						 node->addr, Max(reply.integer, 0), node->replicas);
			if (node->conn)
				node->conn->broken = true;
			return false;
		}
	}
	return true;
}
