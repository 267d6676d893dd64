/*-------------------------------------------------------------------------
 *
 * url.c
 *	  Parsing cachekit.redis_url: where Redis is and how to log in.
 *
 *	  redis://[[user]:password@]host[:port][,host[:port]...][/db]
 *	                                      several hosts: Redis Cluster seeds
 *	  rediss://...                        the same over TLS
 *	  unix://[[user]:password@]/path/to/redis.sock[?db=N]
 *	  redis-sentinel://[[user]:password@]host[:port][,host[:port]...][/db]
 *	      [?sentinel_password=...]#master_name
 *	  rediss-sentinel://...               TLS to the Sentinels and the master
 *
 * as redis-py reads them. Messages never contain the password.
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#define CK_SENTINEL_PORT 26379

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


/* Parse host[:port] from s[0..len); IPv6 addresses are written [addr]. */
static bool
ck_parse_hostport(const char *s, int len, int defport, CkHostPort *out, char **errmsg)
{
	const char *end = s + len;
	const char *hostend;
	long		num;

	out->port = defport;
	if (len > 0 && *s == '[')
	{
		const char *close = memchr(s, ']', len);

		if (close == NULL || close == s + 1)
		{
			*errmsg = "an IPv6 host must be written [address]";
			return false;
		}
		out->host = pnstrdup(s + 1, close - s - 1);
		hostend = close + 1;
	}
	else
	{
		hostend = s;
		while (hostend < end && *hostend != ':')
			hostend++;
		if (hostend == s)
		{
			*errmsg = "the host is missing";
			return false;
		}
		out->host = pnstrdup(s, hostend - s);
	}
	if (hostend < end && *hostend == ':')
	{
		if (!ck_parse_number(hostend + 1, end - hostend - 1, 1, 65535, &num))
		{
			*errmsg = "the port must be a number from 1 to 65535";
			return false;
		}
		out->port = (int) num;
	}
	else if (hostend != end)
	{
		*errmsg = "unexpected text after the host";
		return false;
	}
	return true;
}

/* Parse [[user]:password@] at the start of s[0..len); returns its length. */
static int
ck_parse_credentials(const char *s, int len, CkRedisUrl *out, char **errmsg)
{
	const char *at = NULL;
	const char *colon;

	/* the credentials end at the last '@' before the path */
	for (int i = 0; i < len && s[i] != '/'; i++)
		if (s[i] == '@')
			at = s + i;
	if (at == NULL)
		return 0;
	colon = memchr(s, ':', at - s);
	if (colon == NULL)
	{
		*errmsg = "the credentials must be user:password@ or :password@";
		return -1;
	}
	if (colon > s)
	{
		out->user = ck_url_decode(s, colon - s);
		if (out->user == NULL)
		{
			*errmsg = "the user name has a malformed %-escape";
			return -1;
		}
	}
	out->password = ck_url_decode(colon + 1, at - colon - 1);
	if (out->password == NULL)
	{
		*errmsg = "the password has a malformed %-escape";
		return -1;
	}
	return at + 1 - s;
}

/* Parse the /db path part (s starts at the '/', or is empty). */
static bool
ck_parse_db_path(const char *s, int len, CkRedisUrl *out, char **errmsg)
{
	long		num;

	if (len == 0)
		return true;
	if (*s != '/')
	{
		*errmsg = "unexpected text after the host";
		return false;
	}
	if (len == 1)
		return true;
	if (!ck_parse_number(s + 1, len - 1, 0, INT_MAX, &num))
	{
		*errmsg = "the database must be a number";
		return false;
	}
	out->db = (int) num;
	return true;
}

/* Parse the ?name=value&... parameters in s[0..len). */
static bool
ck_parse_query(const char *s, int len, CkRedisUrl *out, char **errmsg)
{
	const char *end = s + len;

	while (s < end)
	{
		const char *amp = memchr(s, '&', end - s);
		const char *pend = amp ? amp : end;
		const char *eq = memchr(s, '=', pend - s);
		long		num;

		if (eq == NULL)
		{
			*errmsg = "a URL parameter must be name=value";
			return false;
		}
		if (eq - s == 2 && strncmp(s, "db", 2) == 0)
		{
			if (!ck_parse_number(eq + 1, pend - eq - 1, 0, INT_MAX, &num))
			{
				*errmsg = "the database must be a number";
				return false;
			}
			out->db = (int) num;
		}
		else if (eq - s == 17 && strncmp(s, "sentinel_password", 17) == 0 &&
				 out->kind == CK_REDIS_SENTINEL)
		{
			out->sentinel_password = ck_url_decode(eq + 1, pend - eq - 1);
			if (out->sentinel_password == NULL)
			{
				*errmsg = "the Sentinel password has a malformed %-escape";
				return false;
			}
		}
		else
		{
			*errmsg = psprintf("unknown URL parameter \"%s\"", pnstrdup(s, eq - s));
			return false;
		}
		s = amp ? amp + 1 : end;
	}
	return true;
}

/* Parse host[:port][,host[:port]...] (Sentinels, or cluster seeds). */
static bool
ck_parse_host_list(const char *s, int len, int defport, int *nout, CkHostPort **out,
				   char **errmsg)
{
	int			n = 1;

	for (int i = 0; i < len; i++)
		if (s[i] == ',')
			n++;
	*out = palloc0(sizeof(CkHostPort) * n);
	*nout = n;
	for (int i = 0; i < n; i++)
	{
		const char *comma = memchr(s, ',', len);
		int			part = comma ? comma - s : len;

		if (!ck_parse_hostport(s, part, defport, &(*out)[i], errmsg))
			return false;
		s += part + 1;
		len -= part + 1;
	}
	return true;
}

/* Which form a URL has; its scheme's length, or 0 if none we know. */
static int
ck_url_scheme(const char *url, CkRedisUrl *out)
{
	static const struct
	{
		const char *prefix;
		CkRedisKind kind;
		bool		tls;
	}			schemes[] = {
		{"redis://", CK_REDIS_TCP, false},
		{"rediss://", CK_REDIS_TCP, true},
		{"unix://", CK_REDIS_UNIX, false},
		{"redis-sentinel://", CK_REDIS_SENTINEL, false},
		{"rediss-sentinel://", CK_REDIS_SENTINEL, true},
	};

	for (int i = 0; i < (int) lengthof(schemes); i++)
		if (strncmp(url, schemes[i].prefix, strlen(schemes[i].prefix)) == 0)
		{
			out->kind = schemes[i].kind;
			out->tls = schemes[i].tls;
			return strlen(schemes[i].prefix);
		}
	return 0;
}

/*
 * Parse cachekit.redis_url into *out.
 * On failure returns false and sets *errmsg (never containing the password).
 */
bool
ck_parse_redis_url(const char *url, CkRedisUrl *out, char **errmsg)
{
	const char *p;
	const char *end;
	const char *hash;
	const char *query;
	int			credlen;

	memset(out, 0, sizeof(CkRedisUrl));
	p = url + ck_url_scheme(url, out);
	if (p == url)
	{
		*errmsg = "it must start with redis://, rediss://, unix://, redis-sentinel:// or rediss-sentinel://";
		return false;
	}
	end = p + strlen(p);

	/* #master_name ends a Sentinel URL, and only it */
	hash = strchr(p, '#');
	if (out->kind == CK_REDIS_SENTINEL)
	{
		if (hash == NULL || hash[1] == '\0')
		{
			*errmsg = "a Sentinel URL must end with #master_name";
			return false;
		}
		out->master_name = ck_url_decode(hash + 1, end - hash - 1);
		if (out->master_name == NULL)
		{
			*errmsg = "the master name has a malformed %-escape";
			return false;
		}
		end = hash;
	}
	else if (hash)
	{
		*errmsg = "only a Sentinel URL has a #master_name";
		return false;
	}
	query = memchr(p, '?', end - p);
	if (query && !ck_parse_query(query + 1, end - query - 1, out, errmsg))
		return false;
	if (query)
		end = query;

	credlen = ck_parse_credentials(p, end - p, out, errmsg);
	if (credlen < 0)
		return false;
	p += credlen;

	if (out->kind == CK_REDIS_UNIX)
	{
		if (*p != '/' || end - p < 2)
		{
			*errmsg = "a unix:// URL needs the socket's absolute path, as in unix:///run/redis.sock";
			return false;
		}
		out->path = ck_url_decode(p, end - p);
		if (out->path == NULL)
		{
			*errmsg = "the socket path has a malformed %-escape";
			return false;
		}
		return true;
	}
	else
	{
		const char *slash = memchr(p, '/', end - p);
		const char *hostend = slash ? slash : end;
		if (out->kind == CK_REDIS_SENTINEL)
		{
			if (!ck_parse_host_list(p, hostend - p, CK_SENTINEL_PORT, &out->nsentinels,
									&out->sentinels, errmsg))
				return false;
		}
		else
		{
			if (!ck_parse_host_list(p, hostend - p, 6379, &out->nhosts, &out->hosts, errmsg))
				return false;
			out->host = out->hosts[0].host;
			out->port = out->hosts[0].port;
		}
		if (!ck_parse_db_path(hostend, end - hostend, out, errmsg))
			return false;
		if (out->nhosts > 1 && out->db != 0)
		{
			*errmsg = "several hosts name Redis Cluster seeds, and Redis Cluster has only database 0";
			return false;
		}
		return true;
	}
}
