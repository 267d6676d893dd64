/*-------------------------------------------------------------------------
 *
 * topology.c
 *	  Which Redis node to talk to, and getting a ready connection to it:
 *	  a single node (TCP, TLS or a unix socket), or the master a group of
 *	  Sentinels names.
 *
 * A topology is made from cachekit.redis_url and kept until the URL
 * changes; it remembers what it learnt (which Sentinel answered last).
 * Every connect resolves afresh: after a failover the Sentinels name the
 * new master, and a node that answers ROLE with anything but "master" is
 * not written to. The connection comes back logged in (AUTH), on its
 * database (SELECT) and checked (PING or ROLE), all within
 * cachekit.connect_timeout per step.
 *
 * Through Sentinel a failover must not lose what the old master
 * acknowledged: after each batch the worker WAITs for the replicas the
 * master listed (ck_topology_sync), and on a new master it first deletes
 * the keys and flushes the tags it delivered lately (ck_topology_replay).
 *
 * The topology owns its connections. A cluster (cachekit.redis_mode, or
 * a seed that says cluster_enabled:1) is set up by cluster.c: its slot map
 * and one connection per primary; the URL's hosts are only seeds there.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "utils/memutils.h"

/* Parse the URL into a new topology; NULL with *errmsg when it is invalid. */
CkTopology *
ck_topology_create(const char *url_text, char **errmsg)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "cachekit topology",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	CkTopology *topo = palloc0(sizeof(CkTopology));

	topo->cxt = cxt;
	if (url_text == NULL || !ck_parse_redis_url(url_text, &topo->url, errmsg))
	{
		MemoryContextSwitchTo(old);
		*errmsg = pstrdup(url_text == NULL ? "it is not set" : *errmsg);
		MemoryContextDelete(cxt);
		return NULL;
	}
	topo->sentinel_order = palloc(sizeof(int) * Max(topo->url.nsentinels, 1));
	for (int i = 0; i < topo->url.nsentinels; i++)
		topo->sentinel_order[i] = i;
	MemoryContextSwitchTo(old);
	return topo;
}

/* Free a topology and close its connections. */
void
ck_topology_free(CkTopology *topo)
{
	if (topo)
	{
		ck_topology_disconnect(topo);
		MemoryContextDelete(topo->cxt);
	}
}

/* Close the topology's connections (it connects anew on demand). */
void
ck_topology_disconnect(CkTopology *topo)
{
	if (topo)
		ck_nodes_close(topo);
}

/* Can a batch go out through the topology's connections? */
bool
ck_topology_usable(CkTopology *topo)
{
	return topo != NULL && ck_nodes_usable(topo);
}

/* A deadline cachekit.connect_timeout from now. */
static TimestampTz
ck_connect_deadline(void)
{
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ck_connect_timeout);
}

/* Run a set-up command; an error reply fails it as "<what> failed: <error>". */
static bool
ck_setup_command(CkConn *conn, int argc, const char **argv, const char *what,
				 TimestampTz deadline, CkCallResult *res, char **errmsg)
{
	if (!ck_redis_call(conn, argc, argv, deadline, res, errmsg))
		return false;
	if (res->error)
	{
		*errmsg = psprintf("%s failed: %s", what, res->error);
		return false;
	}
	return true;
}

/* AUTH (when there is a password), then SELECT the database or PING. */
static bool
ck_login(CkConn *conn, const char *user, const char *password, int db,
		 TimestampTz deadline, char **errmsg)
{
	CkCallResult res;

	if (password)
	{
		const char *argv[3];
		int			argc = 0;

		argv[argc++] = "AUTH";
		if (user)
			argv[argc++] = user;
		argv[argc++] = password;
		if (!ck_setup_command(conn, argc, argv, "AUTH", deadline, &res, errmsg))
			return false;
	}
	if (db != 0)
	{
		const char *argv[2] = {"SELECT", psprintf("%d", db)};

		return ck_setup_command(conn, 2, argv, "SELECT", deadline, &res, errmsg);
	}
	else
	{
		const char *argv[1] = {"PING"};

		/* catches NOAUTH now rather than at the first batch */
		return ck_setup_command(conn, 1, argv, "PING", deadline, &res, errmsg);
	}
}

/* The password the Sentinels want: the URL's, else the setting's, else none. */
static const char *
ck_sentinel_password(const CkRedisUrl *url)
{
	if (url->sentinel_password)
		return url->sentinel_password;
	if (ck_redis_sentinel_password && ck_redis_sentinel_password[0] != '\0')
		return ck_redis_sentinel_password;
	return NULL;
}

/* Ask one Sentinel where the master is: 1 found, 0 unknown name, -1 failed. */
static int
ck_sentinel_ask(CkTopology *topo, const CkHostPort *s, char **host, int *port,
				char **errmsg)
{
	CkRedisUrl *url = &topo->url;
	TimestampTz deadline = ck_connect_deadline();
	const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", url->master_name};
	const char *password = ck_sentinel_password(url);
	CkConn	   *conn;
	CkCallResult res;
	int			found = -1;

	conn = ck_conn_open(s->host, s->port, NULL, url->tls, deadline, errmsg);
	if (conn == NULL)
	{
		*errmsg = psprintf("Sentinel at %s:%d: %s", s->host, s->port, *errmsg);
		return -1;
	}
	if (password)
	{
		const char *auth[2] = {"AUTH", password};

		if (!ck_setup_command(conn, 2, auth, "Sentinel AUTH", deadline, &res, errmsg))
			goto done;
	}
	if (!ck_setup_command(conn, 3, argv, "SENTINEL get-master-addr-by-name", deadline,
						  &res, errmsg))
		goto done;
	if (res.nil)
		found = 0;
	else if (res.nstrings == 2 && res.strings[0] && res.strings[1] &&
			 atoi(res.strings[1]) > 0 && atoi(res.strings[1]) <= 65535)
	{
		*host = res.strings[0];
		*port = atoi(res.strings[1]);
		found = 1;
	}
	else
		*errmsg = pstrdup("SENTINEL get-master-addr-by-name: unexpected reply");
done:
	if (found < 0)
		*errmsg = psprintf("Sentinel at %s: %s", conn->where, *errmsg);
	ck_conn_free(conn);
	return found;
}

/* Is the node we reached really the master? (It may have been demoted.) */
static bool
ck_check_master(CkConn *conn, const char *name, TimestampTz deadline, char **errmsg)
{
	const char *argv[1] = {"ROLE"};
	CkCallResult res;

	if (!ck_setup_command(conn, 1, argv, "ROLE", deadline, &res, errmsg))
		return false;
	if (res.nstrings < 1 || res.strings[0] == NULL || strcmp(res.strings[0], "master") != 0)
	{
		*errmsg = psprintf("Redis at %s, named master \"%s\" by a Sentinel, is a %s "
						   "(a failover is under way?)", conn->where, name,
						   res.nstrings >= 1 && res.strings[0] ? res.strings[0] : "non-master");
		return false;
	}
	/* ROLE lists the connected replicas third: each batch must reach them */
	conn->replicas = (res.nstrings >= 3 && res.strings[2]) ? atoi(res.strings[2]) : 0;
	return true;
}

/* Connect to a node and log in; for a Sentinel's master, check its ROLE. */
CkConn *
ck_topology_open_node(CkTopology *topo, const char *host, int port, char **errmsg)
{
	CkRedisUrl *url = &topo->url;
	TimestampTz deadline = ck_connect_deadline();
	CkConn	   *conn = ck_conn_open(host, port, url->path, url->tls, deadline, errmsg);

	if (conn == NULL)
		return NULL;
	if (!ck_login(conn, url->user, url->password, url->db, deadline, errmsg) ||
		(url->kind == CK_REDIS_SENTINEL &&
		 !ck_check_master(conn, url->master_name, deadline, errmsg)))
	{
		ck_conn_free(conn);
		return NULL;
	}
	return conn;
}

/*
 * Ask the Sentinels, in order, where the master is, and connect to it. The
 * first Sentinel whose master answers as one moves to the front for next
 * time; one that names a stale master (it has not heard of the failover
 * yet) is passed over. The failures are told apart: no Sentinel reachable,
 * no Sentinel knows the name, or the named master could not be used.
 */
static CkConn *
ck_sentinel_connect(CkTopology *topo, char **host, int *port, char **errmsg)
{
	CkRedisUrl *url = &topo->url;
	int			unknown = 0;
	char	   *unreachable = NULL;
	char	   *master_error = NULL;

	for (int k = 0; k < url->nsentinels; k++)
	{
		int			idx = topo->sentinel_order[k];
		char	   *err = NULL;
		int			found = ck_sentinel_ask(topo, &url->sentinels[idx], host, port, &err);
		CkConn	   *conn;

		if (found == 0)
			unknown++;
		else if (found < 0)
			unreachable = err;
		else if ((conn = ck_topology_open_node(topo, *host, *port, &err)) != NULL)
		{
			memmove(&topo->sentinel_order[1], &topo->sentinel_order[0], sizeof(int) * k);
			topo->sentinel_order[0] = idx;
			return conn;
		}
		else if (master_error == NULL)
			master_error = err;
		if (ConfigReloadPending)
			break;
	}
	if (master_error)
		*errmsg = master_error;
	else if (unknown > 0)
		*errmsg = psprintf("unknown master name \"%s\": %d of %d Sentinels answered and none knows it",
						   url->master_name, unknown, url->nsentinels);
	else
		*errmsg = psprintf("no Sentinel reachable (%d tried), last error: %s",
						   url->nsentinels, unreachable ? unreachable : "none");
	return NULL;
}

/* Describe where the connection goes, for the worker's log (no password). */
static char *
ck_describe(const CkRedisUrl *url, const char *host, int port)
{
	const char *tls = url->tls ? " over TLS" : "";

	if (url->kind == CK_REDIS_UNIX)
		return psprintf("unix socket %s db %d", url->path, url->db);
	if (url->kind == CK_REDIS_SENTINEL)
		return psprintf("%s:%d/%d%s (master \"%s\" named by Sentinel)", host, port, url->db,
						tls, url->master_name);
	return psprintf("%s:%d/%d%s", host, port, url->db, tls);
}

/* Make a connection the topology's one node, its scripts loaded (freed on failure). */
static bool
ck_use_single(CkTopology *topo, CkConn *conn, const char *host, int port, char **where,
			  char **errmsg)
{
	if (!ck_deliver_prepare(conn, errmsg))
	{
		ck_conn_free(conn);
		return false;
	}
	topo->mode = CK_MODE_STANDALONE;
	ck_node_add(topo, host, port, conn);
	*where = ck_describe(&topo->url, host, port);
	return true;
}

/* The first seed of the URL that answers, logged in; NULL with *errmsg if none. */
static CkConn *
ck_seed_connect(CkTopology *topo, char **host, int *port, char **errmsg)
{
	CkRedisUrl *url = &topo->url;

	if (url->kind == CK_REDIS_UNIX || url->nhosts == 0)
	{
		/* a unix socket's node is named by its path */
		*host = url->kind == CK_REDIS_UNIX ? url->path : url->host;
		*port = url->port;
		return ck_topology_open_node(topo, *host, *port, errmsg);
	}
	for (int i = 0; i < url->nhosts; i++)
	{
		CkConn	   *conn;

		*host = url->hosts[i].host;
		*port = url->hosts[i].port;
		conn = ck_topology_open_node(topo, *host, *port, errmsg);
		if (conn != NULL || ConfigReloadPending)
			return conn;
	}
	return NULL;
}

/*
 * Connect to the hosts of a redis:// or unix:// URL: a single node, or a
 * cluster (forced by cachekit.redis_mode, or found by asking the seed).
 */
static bool
ck_direct_connect(CkTopology *topo, char **where, char **errmsg)
{
	CkRedisUrl *url = &topo->url;
	char	   *host;
	int			port;
	bool		cluster = (ck_redis_mode == CK_MODE_CLUSTER);
	CkConn	   *conn;

	if (cluster && (url->kind != CK_REDIS_TCP || url->db != 0))
	{
		*errmsg = pstrdup(url->kind != CK_REDIS_TCP ?
						  "cachekit.redis_mode is cluster: cachekit.redis_url must be redis:// or rediss://" :
						  "invalid cachekit.redis_url: Redis Cluster has only database 0");
		return false;
	}
	if ((conn = ck_seed_connect(topo, &host, &port, errmsg)) == NULL)
		return false;
	if (ck_redis_mode == CK_MODE_AUTO && url->kind == CK_REDIS_TCP &&
		!ck_cluster_detect(conn, &cluster, errmsg))
	{
		ck_conn_free(conn);
		return false;
	}
	if (cluster)
	{
		if (!ck_cluster_connect(topo, conn, errmsg))
			return false;
		*where = psprintf("Redis Cluster of %d primaries (seed %s:%d%s)", list_length(topo->nodes),
						  host, port, url->tls ? " over TLS" : "");
		return true;
	}
	if (url->nhosts > 1)
	{
		ck_conn_free(conn);
		*errmsg = psprintf("cachekit.redis_url lists several hosts, which is for Redis Cluster only, but Redis at %s:%d is not in cluster mode",
						   host, port);
		return false;
	}
	return ck_use_single(topo, conn, host, port, where, errmsg);
}

/*
 * Connect to the node(s) the topology names, logged in, on the database,
 * with cachekit's scripts loaded. False with *errmsg set; *where describes
 * what it connected to.
 */
bool
ck_topology_connect(CkTopology *topo, char **where, char **errmsg)
{
	CkRedisUrl *url = &topo->url;
	char	   *host = url->host;
	int			port = url->port;
	CkConn	   *conn;

	ck_topology_disconnect(topo);
	if (url->kind != CK_REDIS_SENTINEL)
	{
		if (!ck_direct_connect(topo, where, errmsg))
		{
			ck_topology_disconnect(topo);
			return false;
		}
	}
	else
	{
		if ((conn = ck_sentinel_connect(topo, &host, &port, errmsg)) == NULL ||
			!ck_use_single(topo, conn, host, port, where, errmsg))
			return false;
	}
	ck_publish_topology(topo, false);
	if (url->kind == CK_REDIS_SENTINEL)
	{
		char	   *master = psprintf("%s:%d", host, port);

		/* another master than last time: a failover happened */
		if (topo->master && strcmp(topo->master, master) != 0)
			topo->master_changed = true;
		if (topo->master == NULL || strcmp(topo->master, master) != 0)
			topo->master = MemoryContextStrdup(topo->cxt, master);
	}
	return true;
}

/*
 * After a batch, through Sentinel or in a cluster: wait until each node's
 * replicas have it too (WAIT), so that a failover right after cannot lose
 * it; false with *errmsg when they did not acknowledge it in time (the
 * batch is then sent again).
 */
bool
ck_topology_sync(CkTopology *topo, char **errmsg)
{
	return ck_nodes_wait(topo, errmsg);
}

/*---- after a failover: deliveries the new master may not have ----*/

/*
 * What the worker delivered through Sentinel lately, kept for
 * CK_RECENT_WINDOW_MS (at most CK_RECENT_MAX_KEYS keys). A master that
 * acknowledged a batch may still lose it in a failover: WAIT covers a
 * crash, but between a replica's promotion and the Sentinels' switch the
 * old master can take writes that only replicas about to be reattached
 * saw. So when a new connection goes to another master than the last one,
 * those keys are deleted and those tags flushed there before anything else
 * is sent: every key then ends deleted or equal to its row.
 */
#define CK_RECENT_WINDOW_MS (30 * 1000)
#define CK_RECENT_MAX_KEYS 1000000

typedef struct CkRecent
{
	MemoryContext cxt;
	TimestampTz at;
	int			nkeys;
	char	  **keys;
	int			ntags;			/* flushed tags */
	char	  **tags;
} CkRecent;

/* Forget recent batches beyond the window or the size limit. */
static void
ck_recent_trim(CkTopology *topo)
{
	TimestampTz horizon = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), -CK_RECENT_WINDOW_MS);

	while (topo->recent != NIL)
	{
		CkRecent   *r = linitial(topo->recent);

		if (r->at >= horizon && topo->recent_keys <= CK_RECENT_MAX_KEYS)
			break;
		if (r->at >= horizon)
			topo->recent_truncated = true;	/* a failover now could lose it */
		topo->recent_keys -= r->nkeys;
		topo->recent = list_delete_first(topo->recent);
		MemoryContextDelete(r->cxt);
	}
	if (topo->recent == NIL)
		topo->recent_truncated = false;
}

/* Remember the keys and flushed tags of a batch delivered through Sentinel. */
void
ck_topology_note_delivered(CkTopology *topo, const CkEntry *entries, int n)
{
	MemoryContext cxt;
	MemoryContext old;
	CkRecent   *r;
	int			nkeys = 0;
	int			ntags = 0;

	if (topo == NULL || topo->url.kind != CK_REDIS_SENTINEL || n == 0)
		return;
	for (int i = 0; i < n; i++)
	{
		nkeys += entries[i].nkeys;
		if (entries[i].kind == CK_KIND_INVALIDATE)
			ntags += entries[i].ntags;
	}
	cxt = AllocSetContextCreate(topo->cxt, "cachekit recent batch", ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(cxt);
	r = palloc0(sizeof(CkRecent));
	r->cxt = cxt;
	r->at = GetCurrentTimestamp();
	r->keys = palloc(sizeof(char *) * (nkeys + 1));
	r->tags = palloc(sizeof(char *) * (ntags + 1));
	for (int i = 0; i < n; i++)
	{
		for (int k = 0; k < entries[i].nkeys; k++)
			r->keys[r->nkeys++] = pstrdup(entries[i].keys[k]);
		if (entries[i].kind == CK_KIND_INVALIDATE)
			for (int t = 0; t < entries[i].ntags; t++)
				r->tags[r->ntags++] = pstrdup(entries[i].tags[t]);
	}
	MemoryContextSwitchTo(topo->cxt);
	topo->recent = lappend(topo->recent, r);
	MemoryContextSwitchTo(old);
	topo->recent_keys += r->nkeys;
	ck_recent_trim(topo);
}

/*
 * On a new master (after a failover): delete the recent keys and flush the
 * recent tags there. False with *error when that failed (the connection
 * is then not to be used).
 */
bool
ck_topology_replay(CkTopology *topo, char **error)
{
	CkEntry		e;
	CkDeliveryStats stats;
	ListCell   *lc;
	int			k = 0;
	int			t = 0;

	if (!topo->master_changed)
		return true;
	ck_recent_trim(topo);
	if (topo->recent_truncated)
		ereport(WARNING,
				(errmsg("cachekit cannot repeat every delivery of the last %d s on the new Redis master",
						CK_RECENT_WINDOW_MS / 1000),
				 errdetail("More than %d keys were delivered in that time; a failover may have lost some of them.",
						   CK_RECENT_MAX_KEYS)));
	memset(&e, 0, sizeof(e));
	e.kind = CK_KIND_INVALIDATE;
	foreach(lc, topo->recent)
		t += ((CkRecent *) lfirst(lc))->ntags;
	e.keys = palloc(sizeof(char *) * (topo->recent_keys + 1));
	e.tags = palloc(sizeof(char *) * (t + 1));
	t = 0;
	foreach(lc, topo->recent)
	{
		CkRecent   *r = lfirst(lc);

		memcpy(e.keys + k, r->keys, sizeof(char *) * r->nkeys);
		memcpy(e.tags + t, r->tags, sizeof(char *) * r->ntags);
		k += r->nkeys;
		t += r->ntags;
	}
	e.nkeys = k;
	e.ntags = t;
	if (k + t > 0)
	{
		if (!ck_deliver(topo, &e, 1, &stats, error))
			return false;
		if (e.failed)
		{
			*error = psprintf("repeating recent deliveries on the new master failed: %s", e.error);
			return false;
		}
		ereport(LOG,
				(errmsg("cachekit worker deleted %d keys and flushed %d tags delivered in the last %d s on the new Redis master, as the failover may have lost them",
						k, t, CK_RECENT_WINDOW_MS / 1000)));
	}
	topo->master_changed = false;
	return true;
}
