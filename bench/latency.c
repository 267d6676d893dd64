/*
 * bench/latency.c: COMMIT-to-key-gone latency of a cachekit trigger.
 *
 * For each sample: SET user:<id> in Redis, send an autocommit UPDATE of that
 * row (its reply is the COMMIT returning), then wait in poll() on the
 * sockets at once: PostgreSQL's, and on each Redis node one connection
 * subscribed to the keyspace channel of user:* (event "del"). Each side is
 * timed when poll() reports its socket readable, before anything is parsed,
 * on one monotonic clock: the sample is (del readable) - (COMMIT reply
 * readable). A negative sample means the worker's delete reached us first.
 * Nothing else runs in this process, so the two times carry no event-loop
 * noise (the Node client it replaces could take one callback milliseconds
 * before the other).
 *
 * Against a Redis Cluster (REDIS_CLUSTER_PORTS) it subscribes on every node
 * given (a keyspace event is published on the node that owns the key) and
 * sets each key on its owner, following MOVED.
 *
 * Prints key=value lines (milliseconds) on stdout; RAW_FILE, if set, gets
 * every sample in microseconds, one per line. notify-keyspace-events is
 * set on each node for the run and given back its old value at the end,
 * also when the probe fails or gets SIGINT or SIGTERM.
 *
 * Environment: PGHOST PGPORT PGUSER PGDATABASE (read by libpq), REDIS_PORT
 * or REDIS_CLUSTER_PORTS (a comma list of the primaries' ports), SAMPLES
 * (1000), WARMUP (20), ID_FIRST, ID_LAST (ids to update: a range the
 * background load leaves alone), MAX_GAP_MS (5: random pause between
 * samples), TIMEOUT_MS (2000), RAW_FILE.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#define CHANNEL_PREFIX "__keyspace@0__:"
#define MAX_NODES 16

/* one Redis node: a connection for commands, one subscribed to its events */
typedef struct Node
{
	int			port;
	redisContext *cmd;
	redisContext *sub;
	char	   *old_flags;		/* notify-keyspace-events before the run */
} Node;

static Node nodes[MAX_NODES];
static int	nnodes = 0;
static volatile sig_atomic_t stop = 0;

/* An integer from the environment, or a default. */
static long
env_long(const char *name, long dflt)
{
	const char *v = getenv(name);

	return (v && *v) ? strtol(v, NULL, 10) : dflt;
}

/* Nanoseconds on the monotonic clock. */
static long long
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Give every node its notify-keyspace-events back (at exit, by atexit). */
static void
restore_flags(void)
{
	for (int i = 0; i < nnodes; i++)
	{
		redisReply *r;

		if (nodes[i].old_flags == NULL || nodes[i].cmd == NULL || nodes[i].cmd->err)
			continue;
		r = redisCommand(nodes[i].cmd, "CONFIG SET notify-keyspace-events %s", nodes[i].old_flags);
		if (r == NULL || r->type == REDIS_REPLY_ERROR)
			fprintf(stderr, "latency: could not restore notify-keyspace-events on port %d\n",
					nodes[i].port);
		if (r)
			freeReplyObject(r);
		free(nodes[i].old_flags);
		nodes[i].old_flags = NULL;
	}
}

/* SIGINT, SIGTERM: stop after the current sample (the flags are restored). */
static void
on_signal(int sig)
{
	(void) sig;
	stop = 1;
}

/* Print a message and leave. */
static void
die(const char *what, const char *detail)
{
	fprintf(stderr, "latency: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
	exit(1);
}

/* Run a Redis command that must not fail; returns its reply. */
static redisReply *
must(redisContext *c, redisReply *r, const char *what)
{
	if (r == NULL)
		die(what, c->errstr);
	if (r->type == REDIS_REPLY_ERROR)
		die(what, r->str);
	return r;
}

/* Is this reply the pmessage "del" of key? */
static int
is_del_of(redisReply *r, const char *key)
{
	const char *chan;

	if (r->type != REDIS_REPLY_ARRAY || r->elements != 4 ||
		r->element[0]->type != REDIS_REPLY_STRING ||
		strcmp(r->element[0]->str, "pmessage") != 0)
		return 0;
	chan = r->element[2]->str;
	if (strncmp(chan, CHANNEL_PREFIX, strlen(CHANNEL_PREFIX)) != 0 ||
		strcmp(chan + strlen(CHANNEL_PREFIX), key) != 0)
		return 0;
	return strcmp(r->element[3]->str, "del") == 0;
}

/* Read what the subscriber socket has; 1 once key's "del" was among it. */
static int
read_events(redisContext *sub, const char *key)
{
	redisReply *r;
	int			seen = 0;

	if (redisBufferRead(sub) != REDIS_OK)
		die("reading keyspace events", sub->errstr);
	for (;;)
	{
		if (redisGetReplyFromReader(sub, (void **) &r) != REDIS_OK)
			die("parsing keyspace events", sub->errstr);
		if (r == NULL)
			break;
		seen |= is_del_of(r, key);
		freeReplyObject(r);
	}
	return seen;
}

/* Read what PostgreSQL sent; 1 once the UPDATE's reply is complete. */
static int
read_reply(PGconn *pg)
{
	PGresult   *res;

	if (!PQconsumeInput(pg))
		die("reading the UPDATE's reply", PQerrorMessage(pg));
	while (!PQisBusy(pg))
	{
		res = PQgetResult(pg);
		if (res == NULL)
			return 1;
		if (PQresultStatus(res) != PGRES_COMMAND_OK || strcmp(PQcmdTuples(res), "1") != 0)
			die("the UPDATE did not change one row", PQresultErrorMessage(res));
		PQclear(res);
	}
	return 0;
}

/* The node listening on a port (a MOVED names one of them). */
static Node *
node_of_port(int port)
{
	for (int i = 0; i < nnodes; i++)
		if (nodes[i].port == port)
			return &nodes[i];
	die("a MOVED names a port not in REDIS_CLUSTER_PORTS", NULL);
	return NULL;
}

/* SET key on the node that owns it, following MOVED. */
static void
set_key(const char *key)
{
	Node	   *n = &nodes[0];

	for (int tries = 0; tries <= nnodes; tries++)
	{
		redisReply *r = redisCommand(n->cmd, "SET %s cached", key);

		if (r == NULL)
			die("SET", n->cmd->errstr);
		if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "MOVED ", 6) == 0)
		{
			const char *colon = strrchr(r->str, ':');

			n = node_of_port(colon ? atoi(colon + 1) : 0);
			freeReplyObject(r);
			continue;
		}
		freeReplyObject(must(n->cmd, r, "SET"));
		return;
	}
	die("SET", "redirected too often");
}

/*
 * One sample: *send_ns, *commit_ns and *gone_ns get when the UPDATE was
 * sent and when each socket turned readable (gone_ns -1 on timeout, or
 * when a signal stopped the run).
 */
static void
one_sample(PGconn *pg, int id, long timeout_ms, long long *send_ns, long long *commit_ns,
		   long long *gone_ns)
{
	char		key[64];
	char		idtext[16];
	const char *params[1] = {idtext};
	int			replied = 0;
	long long	deadline;

	snprintf(key, sizeof(key), "user:%d", id);
	snprintf(idtext, sizeof(idtext), "%d", id);
	set_key(key);
	*commit_ns = *gone_ns = -1;
	*send_ns = now_ns();
	if (!PQsendQueryPrepared(pg, "lat_update", 1, params, NULL, NULL, 0))
		die("sending the UPDATE", PQerrorMessage(pg));
	deadline = now_ns() + timeout_ms * 1000000LL;
	while (!replied || *gone_ns < 0)
	{
		struct pollfd fds[MAX_NODES + 1];
		long long	t;
		int			n;

		fds[0] = (struct pollfd) {PQsocket(pg), POLLIN, 0};
		for (int i = 0; i < nnodes; i++)
			fds[i + 1] = (struct pollfd) {nodes[i].sub->fd, POLLIN, 0};
		if (replied && (now_ns() > deadline || stop))
			return;				/* the del never came, or we are stopped */
		n = poll(fds, nnodes + 1, 50);
		t = now_ns();
		if (n < 0 && errno != EINTR)
			die("poll", strerror(errno));
		if (n <= 0)
			continue;
		if ((fds[0].revents & POLLIN) && !replied && read_reply(pg))
		{
			replied = 1;
			*commit_ns = t;
		}
		for (int i = 0; i < nnodes; i++)
			if ((fds[i + 1].revents & POLLIN) && read_events(nodes[i].sub, key) && *gone_ns < 0)
				*gone_ns = t;
	}
}

/* Connect to a node, turn its keyspace events on and subscribe to user:*. */
static void
node_open(int port)
{
	Node	   *n = &nodes[nnodes];
	redisReply *flags;

	if (nnodes == MAX_NODES)
		die("too many Redis ports", NULL);
	n->port = port;
	n->cmd = redisConnect("127.0.0.1", port);
	n->sub = redisConnect("127.0.0.1", port);
	if (n->cmd == NULL || n->cmd->err || n->sub == NULL || n->sub->err)
		die("connecting to Redis", n->cmd && n->cmd->err ? n->cmd->errstr : n->sub ? n->sub->errstr : NULL);
	nnodes++;
	flags = must(n->cmd, redisCommand(n->cmd, "CONFIG GET notify-keyspace-events"), "CONFIG GET");
	n->old_flags = strdup(flags->elements == 2 ? flags->element[1]->str : "");
	freeReplyObject(flags);
	/* K: keyspace channel, g: generic commands (DEL, UNLINK, ...) */
	freeReplyObject(must(n->cmd, redisCommand(n->cmd, "CONFIG SET notify-keyspace-events Kg"),
						 "CONFIG SET"));
	freeReplyObject(must(n->sub, redisCommand(n->sub, "PSUBSCRIBE " CHANNEL_PREFIX "user:*"),
						 "PSUBSCRIBE"));
}

/* The nodes named by REDIS_CLUSTER_PORTS (a comma list) or REDIS_PORT. */
static void
nodes_open(void)
{
	const char *list = getenv("REDIS_CLUSTER_PORTS");
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;	/* no SA_RESTART: poll() returns EINTR */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	atexit(restore_flags);
	if (list && *list)
	{
		char	   *copy = strdup(list);

		for (char *tok = strtok(copy, ","); tok; tok = strtok(NULL, ","))
			node_open(atoi(tok));
		free(copy);
	}
	else if (env_long("REDIS_PORT", 0) > 0)
		node_open((int) env_long("REDIS_PORT", 0));
	if (nnodes == 0)
		die("REDIS_PORT or REDIS_CLUSTER_PORTS must be set", NULL);
}

/* Ascending order of long long. */
static int
cmp_ll(const void *a, const void *b)
{
	long long	x = *(const long long *) a,
				y = *(const long long *) b;

	return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array, in milliseconds. */
static double
pct_ms(const long long *v, int n, double p)
{
	int			rank = (int) (p * n + 0.999999);

	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return v[rank - 1] / 1e6;
}

int
main(void)
{
	long		samples = env_long("SAMPLES", 1000);
	long		warmup = env_long("WARMUP", 20);
	long		first = env_long("ID_FIRST", 99001);
	long		last = env_long("ID_LAST", 100000);
	long		gap_ms = env_long("MAX_GAP_MS", 5);
	long		timeout_ms = env_long("TIMEOUT_MS", 2000);
	const char *raw_file = getenv("RAW_FILE");
	long long  *lat = calloc(samples + 1, sizeof(long long));
	long long  *e2e = calloc(samples + 1, sizeof(long long));
	int			n = 0,
				timeouts = 0,
				early = 0;
	double		sum = 0;
	PGconn	   *pg;
	PGresult   *res;

	pg = PQconnectdb("");
	if (PQstatus(pg) != CONNECTION_OK)
		die("connecting to PostgreSQL", PQerrorMessage(pg));
	res = PQprepare(pg, "lat_update",
					"UPDATE users SET name = name || '', updated_at = now() WHERE id = $1::int", 1, NULL);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		die("preparing the UPDATE", PQresultErrorMessage(res));
	PQclear(res);
	nodes_open();

	srand((unsigned) getpid());
	for (long i = 0; i < warmup + samples && !stop; i++)
	{
		int			id = (int) (first + rand() % (last - first + 1));
		long long	t_send,
					t_commit,
					t_gone;

		one_sample(pg, id, timeout_ms, &t_send, &t_commit, &t_gone);
		if (stop)
			break;
		if (i >= warmup)
		{
			if (t_gone < 0)
				timeouts++;
			else
			{
				lat[n] = t_gone - t_commit;
				e2e[n] = t_gone - t_send;
				early += lat[n] < 0;
				sum += lat[n];
				n++;
			}
		}
		if (gap_ms > 0)
			usleep((useconds_t) (rand() % (gap_ms * 1000)));
	}
	if (stop)
		die("interrupted", NULL);
	restore_flags();

	if (raw_file)
	{
		FILE	   *f = fopen(raw_file, "w");

		if (f == NULL)
			die("opening RAW_FILE", strerror(errno));
		for (int k = 0; k < n; k++)
			fprintf(f, "%.1f\n", lat[k] / 1000.0);
		fclose(f);
	}
	printf("samples=%d\ntimeouts=%d\nearly=%d\n", n, timeouts, early);
	if (n > 0)
	{
		printf("mean_ms=%.3f\n", sum / n / 1e6);
		qsort(lat, n, sizeof(long long), cmp_ll);
		qsort(e2e, n, sizeof(long long), cmp_ll);
		printf("min_ms=%.3f\np50_ms=%.3f\np90_ms=%.3f\np99_ms=%.3f\nmax_ms=%.3f\n",
			   lat[0] / 1e6, pct_ms(lat, n, 0.50), pct_ms(lat, n, 0.90),
			   pct_ms(lat, n, 0.99), lat[n - 1] / 1e6);
		printf("e2e_p50_ms=%.3f\ne2e_p99_ms=%.3f\n", pct_ms(e2e, n, 0.50), pct_ms(e2e, n, 0.99));
	}
	for (int i = 0; i < nnodes; i++)
	{
		redisFree(nodes[i].sub);
		redisFree(nodes[i].cmd);
	}
	PQfinish(pg);
	return n == 0 ? 1 : 0;
}
