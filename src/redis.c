/*-------------------------------------------------------------------------
 *
 * redis.c
 *	  The Redis client of the worker, on hiredis: parsing cachekit.redis_url,
 *	  connecting (AUTH, SELECT, timeouts), and pipelined commands.
 *
 * This is the only file that includes hiredis. Commands are always sent as
 * binary-safe argument vectors, never through a format string. Messages
 * never contain the password.
 *
 * The connection is non-blocking: every wait for Redis is a latch wait with
 * a deadline (cachekit.connect_timeout, cachekit.command_timeout), so
 * interrupts are served while Redis is slow. Written for hiredis 0.14
 * (Debian 12): redisConnectNonBlock, redisBufferWrite, redisBufferRead.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include <sys/socket.h>

#include <hiredis/hiredis.h>

#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

static redisContext *conn = NULL;

/* The value of a hex digit, or -1. */
static int
hex_digit_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decode %XX escapes of one URL part into a new string; NULL if malformed. */
static char *
ck_url_decode(const char *s, int len)
{
	char	   *out = palloc(len + 1);
	int			o = 0;

	for (int i = 0; i < len; i++)
	{
		if (s[i] == '%')
		{
			int			hi,
						lo;

			if (i + 2 >= len)
				return NULL;
			hi = hex_digit_value(s[i + 1]);
			lo = hex_digit_value(s[i + 2]);
			if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
				return NULL;
			out[o++] = (char) (hi * 16 + lo);
			i += 2;
		}
		else
			out[o++] = s[i];
	}
	out[o] = '\0';
	return out;
}

/* Parse a decimal number in [min, max] from s[0..len); false if it is not one. */
static bool
ck_parse_number(const char *s, int len, long min, long max, long *out)
{
	long		v = 0;

	if (len <= 0 || len > 10)
		return false;
	for (int i = 0; i < len; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (s[i] - '0');
	}
	if (v < min || v > max)
		return false;
	*out = v;
	return true;
}

/*
 * Parse redis://[[user]:password@]host[:port][/db].
 * On failure returns false and sets *errmsg (never containing the password).
 */
bool
ck_parse_redis_url(const char *url, CkRedisUrl *out, char **errmsg)
{
	const char *p;
	const char *at;
	const char *hostend;
	const char *slash;
	long		num;

	memset(out, 0, sizeof(CkRedisUrl));
	out->port = 6379;

	if (strncmp(url, "rediss://", 9) == 0)
	{
		*errmsg = "TLS (rediss://) is not supported by this build";
		return false;
	}
	if (strncmp(url, "redis://", 8) != 0)
	{
		*errmsg = "it must start with redis://";
		return false;
	}
	p = url + 8;

	/* the credentials end at the last '@' before the path */
	slash = strchr(p, '/');
	at = NULL;
	for (const char *q = p; *q && (slash == NULL || q < slash); q++)
		if (*q == '@')
			at = q;
	if (at)
	{
		const char *colon = memchr(p, ':', at - p);

		if (colon == NULL)
		{
			*errmsg = "the credentials must be user:password@ or :password@";
			return false;
		}
		if (colon > p)
		{
			out->user = ck_url_decode(p, colon - p);
			if (out->user == NULL)
			{
				*errmsg = "the user name has a malformed %-escape";
				return false;
			}
		}
		out->password = ck_url_decode(colon + 1, at - colon - 1);
		if (out->password == NULL)
		{
			*errmsg = "the password has a malformed %-escape";
			return false;
		}
		p = at + 1;
	}

	/* host: a name, an IPv4 address, or [IPv6] */
	if (*p == '[')
	{
		const char *close = strchr(p, ']');

		if (close == NULL || close == p + 1)
		{
			*errmsg = "an IPv6 host must be written [address]";
			return false;
		}
		out->host = pnstrdup(p + 1, close - p - 1);
		hostend = close + 1;
	}
	else
	{
		hostend = p;
		while (*hostend && *hostend != ':' && *hostend != '/')
			hostend++;
		if (hostend == p)
		{
			*errmsg = "the host is missing";
			return false;
		}
		out->host = pnstrdup(p, hostend - p);
	}
	p = hostend;

	if (*p == ':')
	{
		const char *end = p + 1;

		while (*end && *end != '/')
			end++;
		if (!ck_parse_number(p + 1, end - p - 1, 1, 65535, &num))
		{
			*errmsg = "the port must be a number from 1 to 65535";
			return false;
		}
		out->port = (int) num;
		p = end;
	}
	if (*p == '/')
	{
		const char *end = p + 1 + strlen(p + 1);

		if (end > p + 1)
		{
			if (!ck_parse_number(p + 1, end - p - 1, 0, INT_MAX, &num))
			{
				*errmsg = "the database must be a number";
				return false;
			}
			out->db = (int) num;
		}
		p = end;
	}
	if (*p != '\0')
	{
		*errmsg = "unexpected text after the host";
		return false;
	}
	return true;
}

/*
 * Set when a latch wake-up arrived while waiting for Redis: the worker's
 * main loop must not miss it (it may be a commit's).
 */
static bool latch_consumed = false;

/* Did waiting for Redis swallow a latch wake-up? Clears the flag. */
bool
ck_redis_took_wakeup(void)
{
	bool		took = latch_consumed;

	latch_consumed = false;
	return took;
}

/*
 * The events the worker waits for while talking to Redis: its latch,
 * postmaster death, and the socket. Made once per connection; creating an
 * epoll set for every wait would cost more than the wait.
 */
static WaitEventSet *wait_set = NULL;
static int	socket_pos = -1;
static uint32 socket_events = 0;

/* Make the wait set for a new connection. */
static void
ck_wait_set_create(void)
{
	wait_set = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	socket_events = WL_SOCKET_WRITEABLE;
	socket_pos = AddWaitEventToSet(wait_set, socket_events, conn->fd, NULL, NULL);
}

/*
 * Wait until the socket is ready for "event" (WL_SOCKET_READABLE or
 * WL_SOCKET_WRITEABLE) or the deadline passes (false). Interrupts are
 * served meanwhile, so SIGTERM and the barriers of DROP DATABASE never wait
 * for a slow or stopped Redis.
 */
static bool
ck_wait_socket(int event, TimestampTz deadline)
{
	if (socket_events != (uint32) event)
	{
		ModifyWaitEvent(wait_set, socket_pos, event, NULL);
		socket_events = event;
	}
	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		WaitEvent	occurred;
		long		timeout_ms;
		int			n;

		if (now >= deadline)
			return false;
		timeout_ms = (long) ((deadline - now + 999) / 1000);
		n = WaitEventSetWait(wait_set, timeout_ms, &occurred, 1, PG_WAIT_EXTENSION);
		if (n == 0)
			continue;			/* timeout: the loop checks the deadline */
		if (occurred.events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			latch_consumed = true;
			CHECK_FOR_INTERRUPTS();
		}
		if (occurred.events & event)
			return true;
	}
}

/* The deadline for an answer from now. */
static TimestampTz
ck_deadline(int ms)
{
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);
}

/* Report a failed connection, drop it, return false. */
static bool
ck_redis_fail(char **errmsg, const char *what)
{
	*errmsg = psprintf("%s: %s", what, conn->errstr[0] ? conn->errstr : "no answer");
	ck_redis_disconnect();
	return false;
}

/* Send everything queued in the pipeline. */
static bool
ck_redis_flush(TimestampTz deadline, char **errmsg)
{
	int			done = 0;

	for (;;)
	{
		if (redisBufferWrite(conn, &done) != REDIS_OK)
			return ck_redis_fail(errmsg, "lost the connection to Redis");
		if (done)
			return true;
		if (!ck_wait_socket(WL_SOCKET_WRITEABLE, deadline))
		{
			*errmsg = psprintf("Redis did not accept commands within cachekit.command_timeout (%d ms)",
							   ck_command_timeout);
			ck_redis_disconnect();
			return false;
		}
	}
}

/* Read the next raw reply, sending what is queued first. */
static bool
ck_redis_next(redisReply **reply, char **errmsg)
{
	TimestampTz deadline = ck_deadline(ck_command_timeout);
	void	   *r = NULL;

	if (!ck_redis_flush(deadline, errmsg))
		return false;
	for (;;)
	{
		if (redisGetReplyFromReader(conn, &r) != REDIS_OK)
			return ck_redis_fail(errmsg, "unreadable answer from Redis");
		if (r != NULL)
		{
			*reply = r;
			return true;
		}
		if (!ck_wait_socket(WL_SOCKET_READABLE, deadline))
		{
			*errmsg = psprintf("Redis did not answer within cachekit.command_timeout (%d ms)",
							   ck_command_timeout);
			ck_redis_disconnect();
			return false;
		}
		if (redisBufferRead(conn) != REDIS_OK)
			return ck_redis_fail(errmsg, "lost the connection to Redis");
	}
}

/* Run one command on the fresh connection; false with *errmsg on failure. */
static bool
ck_redis_setup_command(int argc, const char **argv, const char *what, char **errmsg)
{
	redisReply *reply;
	size_t		lens[3];

	for (int i = 0; i < argc; i++)
		lens[i] = strlen(argv[i]);
	ck_redis_append(argc, argv, lens);
	if (!ck_redis_next(&reply, errmsg))
		return false;
	if (reply->type == REDIS_REPLY_ERROR)
	{
		*errmsg = psprintf("%s failed: %s", what, reply->str);
		freeReplyObject(reply);
		ck_redis_disconnect();
		return false;
	}
	freeReplyObject(reply);
	return true;
}

/*
 * Connect to Redis, authenticate and select the database.
 * On failure returns false with *errmsg set and no connection.
 */
bool
ck_redis_connect(const CkRedisUrl *url, char **errmsg)
{
	int			sockerr = 0;
	socklen_t	len = sizeof(sockerr);

	ck_redis_disconnect();

	/* non-blocking: every wait is a latch wait with a deadline */
	conn = redisConnectNonBlock(url->host, url->port);
	if (conn == NULL)
	{
		*errmsg = pstrdup("out of memory creating the Redis connection");
		return false;
	}
	if (conn->err)
	{
		*errmsg = psprintf("could not connect to %s:%d: %s", url->host, url->port, conn->errstr);
		ck_redis_disconnect();
		return false;
	}
	ck_wait_set_create();
	if (!ck_wait_socket(WL_SOCKET_WRITEABLE, ck_deadline(ck_connect_timeout)))
	{
		*errmsg = psprintf("could not connect to %s:%d within cachekit.connect_timeout (%d ms)",
						   url->host, url->port, ck_connect_timeout);
		ck_redis_disconnect();
		return false;
	}
	if (getsockopt(conn->fd, SOL_SOCKET, SO_ERROR, &sockerr, &len) != 0 || sockerr != 0)
	{
		*errmsg = psprintf("could not connect to %s:%d: %s", url->host, url->port,
						   strerror(sockerr ? sockerr : errno));
		ck_redis_disconnect();
		return false;
	}
	if (redisEnableKeepAlive(conn) != REDIS_OK)
	{
		*errmsg = psprintf("could not enable keepalive: %s", conn->errstr);
		ck_redis_disconnect();
		return false;
	}

	if (url->password)
	{
		const char *argv[3];
		int			argc = 0;

		argv[argc++] = "AUTH";
		if (url->user)
			argv[argc++] = url->user;
		argv[argc++] = url->password;
		if (!ck_redis_setup_command(argc, argv, "AUTH", errmsg))
		{
			ck_redis_disconnect();
			return false;
		}
	}
	if (url->db != 0)
	{
		const char *argv[2];
		char		dbstr[16];

		snprintf(dbstr, sizeof(dbstr), "%d", url->db);
		argv[0] = "SELECT";
		argv[1] = dbstr;
		if (!ck_redis_setup_command(2, argv, "SELECT", errmsg))
		{
			ck_redis_disconnect();
			return false;
		}
	}
	else
	{
		const char *argv[1] = {"PING"};

		/* catches NOAUTH now rather than at the first batch */
		if (!ck_redis_setup_command(1, argv, "PING", errmsg))
		{
			ck_redis_disconnect();
			return false;
		}
	}
	return true;
}

/* Close the connection, if any. */
void
ck_redis_disconnect(void)
{
	if (wait_set)
		FreeWaitEventSet(wait_set);
	wait_set = NULL;
	if (conn)
		redisFree(conn);
	conn = NULL;
}

/* Is there a usable connection? */
bool
ck_redis_connected(void)
{
	return conn != NULL && conn->err == 0;
}

/* Queue one command in the pipeline (nothing is sent yet). */
void
ck_redis_append(int argc, const char **argv, const size_t *argvlen)
{
	if (redisAppendCommandArgv(conn, argc, argv, argvlen) != REDIS_OK)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not build a Redis command: %s", conn->errstr)));
}

/*
 * Read the next reply of the pipeline (sending what is queued first).
 * Returns false on a connection failure or timeout (*errmsg set; the
 * connection is closed), else fills *reply.
 */
bool
ck_redis_read(CkReply *reply, char **errmsg)
{
	redisReply *r;

	memset(reply, 0, sizeof(CkReply));
	if (!ck_redis_next(&r, errmsg))
		return false;
	if (r->type == REDIS_REPLY_ERROR)
	{
		reply->error = pnstrdup(r->str, r->len);
		reply->status = CK_REPLY_ERROR;
	}
	else
	{
		reply->status = CK_REPLY_OK;
		if (r->type == REDIS_REPLY_INTEGER)
			reply->integer = r->integer;
	}
	freeReplyObject(r);
	return true;
}

/* SCRIPT LOAD a script; its SHA1 (40 hex digits) goes to sha[41]. */
bool
ck_redis_script_load(const char *body, char *sha, char **errmsg)
{
	const char *argv[3] = {"SCRIPT", "LOAD", body};
	size_t		lens[3] = {6, 4, strlen(body)};
	redisReply *reply;

	ck_redis_append(3, argv, lens);
	if (!ck_redis_next(&reply, errmsg))
		return false;
	if (reply->type != REDIS_REPLY_STRING || reply->len != 40)
	{
		*errmsg = psprintf("SCRIPT LOAD failed: %s",
						   reply->type == REDIS_REPLY_ERROR ? reply->str : "unexpected reply");
		freeReplyObject(reply);
		ck_redis_disconnect();
		return false;
	}
	memcpy(sha, reply->str, 40);
	sha[40] = '\0';
	freeReplyObject(reply);
	return true;
}
