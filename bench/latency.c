/*
 * bench/latency.c: COMMIT-to-key-gone latency of a cachekit trigger.
 *
 * For each sample: SET user:<id> in Redis, send an autocommit UPDATE of that
 * row (its reply is the COMMIT returning), then wait in poll() on two
 * sockets at once: PostgreSQL's, and a Redis connection subscribed to the
 * keyspace channel of user:* (event "del"). Each side is timed when poll()
 * reports its socket readable, before anything is parsed, on one monotonic
 * clock: the sample is (del readable) - (COMMIT reply readable). A negative
 * sample means the worker's delete reached us first. Nothing else runs in
 * this process, so the two times carry no event-loop noise (the Node client,
 * bench/node/latency.js, can take one callback milliseconds before the
 * other).
 *
 * Prints key=value lines (milliseconds) on stdout; RAW_FILE, if set, gets
 * every sample in microseconds, one per line.
 *
 * Environment: PGHOST PGPORT PGUSER PGDATABASE (read by libpq), REDIS_PORT,
 * SAMPLES (1000), WARMUP (20), ID_FIRST, ID_LAST (ids to update: a range
 * the background load leaves alone), MAX_GAP_MS (5: random pause between
 * samples), TIMEOUT_MS (2000), RAW_FILE.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#define CHANNEL_PREFIX "__keyspace@0__:"

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

/*
 * One sample: *commit_ns and *gone_ns get when each socket turned readable
 * (gone_ns -1 on timeout).
 */
static void
one_sample(PGconn *pg, redisContext *sub, redisContext *cmd, int id, long timeout_ms,
		   long long *commit_ns, long long *gone_ns)
{
	char		key[64];
	char		idtext[16];
	const char *params[1] = {idtext};
	int			replied = 0;
	long long	deadline;

	snprintf(key, sizeof(key), "user:%d", id);
	snprintf(idtext, sizeof(idtext), "%d", id);
	freeReplyObject(must(cmd, redisCommand(cmd, "SET %s cached", key), "SET"));
	*commit_ns = *gone_ns = -1;
	if (!PQsendQueryPrepared(pg, "lat_update", 1, params, NULL, NULL, 0))
		die("sending the UPDATE", PQerrorMessage(pg));
	deadline = now_ns() + timeout_ms * 1000000LL;
	while (!replied || *gone_ns < 0)
	{
		struct pollfd fds[2] = {{PQsocket(pg), POLLIN, 0}, {sub->fd, POLLIN, 0}};
		long long	t;
		int			n;

		if (replied && now_ns() > deadline)
			return;				/* timeout: the del never came */
		n = poll(fds, 2, 50);
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
		if ((fds[1].revents & POLLIN) && read_events(sub, key) && *gone_ns < 0)
			*gone_ns = t;
	}
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
	int			port = (int) env_long("REDIS_PORT", 0);
	const char *raw_file = getenv("RAW_FILE");
	long long  *lat = calloc(samples + 1, sizeof(long long));
	long long  *e2e = calloc(samples + 1, sizeof(long long));
	int			n = 0,
				timeouts = 0,
				early = 0;
	double		sum = 0;
	PGconn	   *pg;
	PGresult   *res;
	redisContext *cmd,
			   *sub;
	redisReply *flags;
	char	   *old_flags;

	if (port <= 0)
		die("REDIS_PORT must be set", NULL);
	pg = PQconnectdb("");
	if (PQstatus(pg) != CONNECTION_OK)
		die("connecting to PostgreSQL", PQerrorMessage(pg));
	res = PQprepare(pg, "lat_update",
					"UPDATE users SET name = name || '', updated_at = now() WHERE id = $1::int", 1, NULL);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		die("preparing the UPDATE", PQresultErrorMessage(res));
	PQclear(res);
	cmd = redisConnect("127.0.0.1", port);
	sub = redisConnect("127.0.0.1", port);
	if (cmd == NULL || cmd->err || sub == NULL || sub->err)
		die("connecting to Redis", cmd && cmd->err ? cmd->errstr : sub ? sub->errstr : NULL);
	flags = must(cmd, redisCommand(cmd, "CONFIG GET notify-keyspace-events"), "CONFIG GET");
	old_flags = strdup(flags->elements == 2 ? flags->element[1]->str : "");
	freeReplyObject(flags);
	/* K: keyspace channel, g: generic commands (DEL, UNLINK, ...) */
	freeReplyObject(must(cmd, redisCommand(cmd, "CONFIG SET notify-keyspace-events Kg"), "CONFIG SET"));
	freeReplyObject(must(sub, redisCommand(sub, "PSUBSCRIBE " CHANNEL_PREFIX "user:*"), "PSUBSCRIBE"));

	srand((unsigned) getpid());
	for (long i = 0; i < warmup + samples; i++)
	{
		int			id = (int) (first + rand() % (last - first + 1));
		long long	t_send = now_ns(),
					t_commit,
					t_gone;

		one_sample(pg, sub, cmd, id, timeout_ms, &t_commit, &t_gone);
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
	freeReplyObject(must(cmd, redisCommand(cmd, "CONFIG SET notify-keyspace-events %s", old_flags),
						 "CONFIG SET"));

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
	redisFree(sub);
	redisFree(cmd);
	PQfinish(pg);
	return n == 0 ? 1 : 0;
}
