/*-------------------------------------------------------------------------
 *
 * protocol.c
 *	  Commands and replies on one Redis connection (a CkConn): pipelined
 *	  commands out, replies in, over the transport of transport.c.
 *
 * This is the only file that includes hiredis, and uses only its protocol
 * parts: redisFormatCommandArgv builds a command (always from a binary-safe
 * argument vector, never through a format string) and redisReader parses
 * replies; the socket is ours. Commands not yet sent wait in a StringInfo
 * of the connection's own memory context, so a large pipeline is accounted
 * for like any other memory of the worker.
 *
 * A connection is a value: nothing here is global, so a caller may hold
 * several (Redis Cluster does, one per primary: cluster.c). A connection that failed is marked broken
 * and closed; its owner frees it and makes a new one.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include <hiredis/hiredis.h>

#include "miscadmin.h"
#include "utils/memutils.h"

/* how much to read from the socket at a time */
#define CK_READ_CHUNK (64 * 1024)
/* an output buffer that grew beyond this is given back after use */
#define CK_OUT_KEEP (1024 * 1024)

/* Open a connection (no AUTH, nothing sent yet); NULL with *errmsg on failure. */
CkConn *
ck_conn_open(const char *host, int port, const char *path, bool tls,
			 TimestampTz deadline, char **errmsg)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "cachekit redis connection",
											  ALLOCSET_SMALL_SIZES);
	CkConn	   *conn = MemoryContextAllocZero(cxt, sizeof(CkConn));
	MemoryContext old;

	conn->cxt = cxt;
	if (path)
		conn->where = MemoryContextStrdup(cxt, path);
	else
		conn->where = MemoryContextStrdup(cxt, psprintf(strchr(host, ':') ? "[%s]:%d" : "%s:%d",
														host, port));
	if (!ck_transport_open(&conn->transport, host, port, path, tls, deadline, errmsg))
	{
		MemoryContextDelete(cxt);
		return NULL;
	}
	conn->reader = redisReaderCreate();
	if (conn->reader == NULL)
	{
		ck_transport_close(&conn->transport);
		MemoryContextDelete(cxt);
		*errmsg = pstrdup("out of memory creating the reply reader");
		return NULL;
	}
	old = MemoryContextSwitchTo(cxt);
	initStringInfo(&conn->out);
	MemoryContextSwitchTo(old);
	return conn;
}

/* Close a connection and free everything it holds. */
void
ck_conn_free(CkConn *conn)
{
	if (conn == NULL)
		return;
	ck_transport_close(&conn->transport);
	if (conn->reader)
		redisReaderFree(conn->reader);
	MemoryContextDelete(conn->cxt);
}

/* Can commands go out on this connection? */
bool
ck_conn_usable(CkConn *conn)
{
	return conn != NULL && !conn->broken;
}

/* Mark the connection broken (closing it) and return false. */
static bool
ck_conn_break(CkConn *conn)
{
	conn->broken = true;
	ck_transport_close(&conn->transport);
	resetStringInfo(&conn->out);
	return false;
}

/* Queue one command in the pipeline (nothing is sent yet). */
void
ck_redis_append(CkConn *conn, int argc, const char **argv, const size_t *argvlen)
{
	char	   *cmd = NULL;
	int			len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);

	if (len < 0 || cmd == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not build a Redis command")));
	appendBinaryStringInfo(&conn->out, cmd, len);
	redisFreeCommand(cmd);
}

/* A command in the wire format, palloc'd (to be sent, maybe more than once). */
char *
ck_redis_format(int argc, const char **argv, const size_t *argvlen, size_t *len)
{
	char	   *cmd = NULL;
	int			n = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
	char	   *copy;

	if (n < 0 || cmd == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not build a Redis command")));
	copy = palloc(n);
	memcpy(copy, cmd, n);
	redisFreeCommand(cmd);
	*len = n;
	return copy;
}

/* Queue a command already in the wire format (ck_redis_format). */
void
ck_redis_append_raw(CkConn *conn, const char *cmd, size_t len)
{
	appendBinaryStringInfo(&conn->out, cmd, len);
}

/* Send everything queued in the pipeline by the deadline. */
static bool
ck_conn_flush(CkConn *conn, TimestampTz deadline, char **errmsg)
{
	if (conn->broken)
	{
		*errmsg = psprintf("Redis at %s: the connection is closed", conn->where);
		return false;
	}
	if (conn->out.len == 0)
		return true;
	if (!ck_transport_send(&conn->transport, conn->out.data, conn->out.len, deadline, errmsg))
	{
		*errmsg = psprintf("Redis at %s: %s", conn->where, *errmsg);
		return ck_conn_break(conn);
	}
	if (conn->out.maxlen > CK_OUT_KEEP)
	{
		MemoryContext old = MemoryContextSwitchTo(conn->cxt);

		pfree(conn->out.data);
		initStringInfo(&conn->out);
		MemoryContextSwitchTo(old);
	}
	else
		resetStringInfo(&conn->out);
	return true;
}

/* Send what is queued now, not waiting for a read (the other nodes of a cluster). */
bool
ck_redis_send(CkConn *conn, char **errmsg)
{
	return ck_conn_flush(conn, TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ck_command_timeout),
						 errmsg);
}

/* The next raw reply (sending what is queued first), by the deadline. */
static bool
ck_conn_next(CkConn *conn, TimestampTz deadline, redisReply **reply, char **errmsg)
{
	static char buf[CK_READ_CHUNK];

	if (!ck_conn_flush(conn, deadline, errmsg))
		return false;
	for (;;)
	{
		void	   *r = NULL;
		ssize_t		n;

		if (redisReaderGetReply(conn->reader, &r) != REDIS_OK)
		{
			*errmsg = psprintf("Redis at %s: unreadable answer: %s", conn->where,
							   conn->reader->errstr);
			return ck_conn_break(conn);
		}
		if (r != NULL)
		{
			*reply = r;
			return true;
		}
		n = ck_transport_recv(&conn->transport, buf, sizeof(buf), deadline, errmsg);
		if (n < 0)
		{
			*errmsg = psprintf("Redis at %s: %s", conn->where, *errmsg);
			return ck_conn_break(conn);
		}
		if (redisReaderFeed(conn->reader, buf, n) != REDIS_OK)
		{
			*errmsg = psprintf("Redis at %s: out of memory reading an answer", conn->where);
			return ck_conn_break(conn);
		}
	}
}

/*
 * Read the next reply of the pipeline (sending what is queued first).
 * Returns false on a connection failure or timeout (*errmsg set; the
 * connection is broken), else fills *reply.
 */
bool
ck_redis_read(CkConn *conn, CkReply *reply, char **errmsg)
{
	redisReply *r;

	memset(reply, 0, sizeof(CkReply));
	if (!ck_conn_next(conn, TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ck_command_timeout),
					  &r, errmsg))
		return false;
	if (r->type == REDIS_REPLY_ERROR)
	{
		reply->error = pnstrdup(r->str, r->len);
		/* what an error means is deliver.c's to judge (ck_error_class) */
		reply->status = CK_REPLY_ERROR;
	}
	else
	{
		reply->status = CK_REPLY_OK;
		if (r->type == REDIS_REPLY_INTEGER)
			reply->integer = r->integer;
		else if (r->type == REDIS_REPLY_ARRAY)
		{
			/* the strings of an array (SRANDMEMBER); other elements are NULL */
			reply->nelems = r->elements;
			reply->elems = palloc0(sizeof(char *) * (r->elements + 1));
			for (size_t i = 0; i < r->elements; i++)
				if (r->element[i]->type == REDIS_REPLY_STRING)
					reply->elems[i] = pnstrdup(r->element[i]->str, r->element[i]->len);
		}
	}
	freeReplyObject(r);
	return true;
}

/* A reply as a string (an array as its length), or NULL for a nil. */
static char *
ck_reply_string(const redisReply *r)
{
	if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS)
		return pnstrdup(r->str, r->len);
	if (r->type == REDIS_REPLY_INTEGER)
		return psprintf("%lld", r->integer);
	if (r->type == REDIS_REPLY_ARRAY)
		return psprintf("%zu", r->elements);
	return NULL;
}

/*
 * Run one command and wait (by the deadline) for its reply, flattened into
 * *result. Returns false on a connection failure (*errmsg set); an error
 * reply is a result too.
 */
bool
ck_redis_call(CkConn *conn, int argc, const char **argv, TimestampTz deadline,
			  CkCallResult *result, char **errmsg)
{
	size_t	   *lens = palloc(sizeof(size_t) * argc);
	redisReply *r;

	memset(result, 0, sizeof(CkCallResult));
	for (int i = 0; i < argc; i++)
		lens[i] = strlen(argv[i]);
	ck_redis_append(conn, argc, argv, lens);
	if (!ck_conn_next(conn, deadline, &r, errmsg))
		return false;
	if (r->type == REDIS_REPLY_ERROR)
		result->error = pnstrdup(r->str, r->len);
	else if (r->type == REDIS_REPLY_NIL)
		result->nil = true;
	else if (r->type == REDIS_REPLY_ARRAY)
	{
		result->nstrings = r->elements;
		result->strings = palloc0(sizeof(char *) * (r->elements + 1));
		for (size_t i = 0; i < r->elements; i++)
			result->strings[i] = ck_reply_string(r->element[i]);
	}
	else
	{
		result->nstrings = 1;
		result->strings = palloc0(sizeof(char *) * 2);
		result->strings[0] = ck_reply_string(r);
	}
	freeReplyObject(r);
	return true;
}

/* Copy a parsed reply into a CkValue tree (palloc'd). */
static void
ck_value_from_reply(const redisReply *r, CkValue *v)
{
	memset(v, 0, sizeof(CkValue));
	switch (r->type)
	{
		case REDIS_REPLY_STRING:
		case REDIS_REPLY_STATUS:
			v->type = CK_VALUE_STRING;
			v->str = pnstrdup(r->str, r->len);
			break;
		case REDIS_REPLY_ERROR:
			v->type = CK_VALUE_ERROR;
			v->str = pnstrdup(r->str, r->len);
			break;
		case REDIS_REPLY_INTEGER:
			v->type = CK_VALUE_INTEGER;
			v->integer = r->integer;
			break;
		case REDIS_REPLY_ARRAY:
			v->type = CK_VALUE_ARRAY;
			v->n = r->elements;
			v->elems = palloc0(sizeof(CkValue) * (r->elements + 1));
			for (size_t i = 0; i < r->elements; i++)
				ck_value_from_reply(r->element[i], &v->elems[i]);
			break;
		default:
			v->type = CK_VALUE_NIL;
			break;
	}
}

/*
 * Run one command and wait (by the deadline) for its whole reply, nested
 * arrays included (CLUSTER SHARDS). False on a connection failure.
 */
bool
ck_redis_call_value(CkConn *conn, int argc, const char **argv, TimestampTz deadline,
					CkValue *value, char **errmsg)
{
	size_t	   *lens = palloc(sizeof(size_t) * argc);
	redisReply *r;

	for (int i = 0; i < argc; i++)
		lens[i] = strlen(argv[i]);
	ck_redis_append(conn, argc, argv, lens);
	if (!ck_conn_next(conn, deadline, &r, errmsg))
		return false;
	ck_value_from_reply(r, value);
	freeReplyObject(r);
	return true;
}

/* SCRIPT LOAD a script; its SHA1 (40 hex digits) goes to sha[41]. */
bool
ck_redis_script_load(CkConn *conn, const char *body, char *sha, char **errmsg)
{
	const char *argv[3] = {"SCRIPT", "LOAD", body};
	CkCallResult res;

	if (!ck_redis_call(conn, 3, argv,
					   TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ck_command_timeout),
					   &res, errmsg))
		return false;
	if (res.error || res.nstrings != 1 || res.strings[0] == NULL ||
		strlen(res.strings[0]) != 40)
	{
		*errmsg = psprintf("SCRIPT LOAD failed: %s", res.error ? res.error : "unexpected reply");
		return ck_conn_break(conn);
	}
	memcpy(sha, res.strings[0], 40);
	sha[40] = '\0';
	return true;
}
