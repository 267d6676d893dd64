/*-------------------------------------------------------------------------
 *
 * transport.c
 *	  Bytes to and from one Redis process: a non-blocking TCP or unix
 *	  socket, optionally wrapped in TLS (OpenSSL 3.0).
 *
 * Every wait is a latch wait with a deadline, so interrupts (SIGTERM, the
 * barriers of DROP DATABASE) are served while the peer is slow or hung,
 * during the TLS handshake too; a configuration reload abandons a
 * connection attempt so that the worker can start over with the new
 * settings. Reads always ask the socket (or OpenSSL) first and wait only
 * when it has nothing: OpenSSL may hold decrypted bytes of a record it has
 * already read (SSL_pending), which the socket will never signal again.
 *
 * This is the only file that includes OpenSSL. The TLS context is built
 * afresh for each connection from the cachekit.redis_tls_* settings, so new
 * certificate files take effect at the next connection (after a reload, at
 * once: a reload reconnects).
 *
 *-------------------------------------------------------------------------
 */
#include "cachekit.h"

#include <fcntl.h>
#include <netdb.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

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

/* The text of OpenSSL's oldest queued error, or "what" when there is none. */
static const char *
ck_tls_error(const char *what)
{
	unsigned long code = ERR_get_error();
	char		buf[256];

	ERR_clear_error();
	if (code == 0)
		return what;
	ERR_error_string_n(code, buf, sizeof(buf));
	return pstrdup(buf);
}

/*
 * Wait until the socket is ready for "event" (WL_SOCKET_READABLE or
 * WL_SOCKET_WRITEABLE); false when the deadline passed or (while
 * connecting) a configuration reload is pending.
 */
static bool
ck_transport_wait(CkTransport *t, uint32 event, TimestampTz deadline)
{
	if (t->socket_events != event)
	{
		ModifyWaitEvent(t->wait_set, t->socket_pos, event, NULL);
		t->socket_events = event;
	}
	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		WaitEvent	occurred;
		long		timeout_ms;
		int			n;

		if (now >= deadline)
			return false;
		if (t->connecting && ConfigReloadPending)
			return false;
		timeout_ms = (long) ((deadline - now + 999) / 1000);
		n = WaitEventSetWait(t->wait_set, timeout_ms, &occurred, 1, PG_WAIT_EXTENSION);
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

/* The message for a wait that failed: a reload or the deadline. */
static char *
ck_wait_failed(CkTransport *t, const char *what)
{
	if (t->connecting && ConfigReloadPending)
		return psprintf("%s: interrupted by a configuration reload", what);
	if (t->connecting)
		return psprintf("%s: timed out after cachekit.connect_timeout (%d ms)",
						what, ck_connect_timeout);
	return psprintf("%s: timed out after cachekit.command_timeout (%d ms)",
					what, ck_command_timeout);
}

/* Refuse a private key file others than this server's user may read. */
static bool
ck_tls_key_file_private(const char *path, char **errmsg)
{
	struct stat st;

	if (stat(path, &st) != 0)
	{
		*errmsg = psprintf("could not read cachekit.redis_tls_key_file \"%s\": %m", path);
		return false;
	}
	if (!S_ISREG(st.st_mode))
	{
		*errmsg = psprintf("cachekit.redis_tls_key_file \"%s\" is not a regular file", path);
		return false;
	}

	/* as PostgreSQL for its own key: ours and 0600, or root's and 0640 */
	if ((st.st_uid == geteuid() && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) ||
		(st.st_uid == 0 && (st.st_mode & (S_IWGRP | S_IXGRP | S_IRWXO)) != 0) ||
		(st.st_uid != geteuid() && st.st_uid != 0))
	{
		*errmsg = psprintf("cachekit.redis_tls_key_file \"%s\" has group or world access, or another owner: "
						   "it must be owned by the server's user with mode 0600 or less, "
						   "or by root with mode 0640 or less", path);
		return false;
	}
	return true;
}

/* Can this file be read? (OpenSSL's own messages do not name the file.) */
static bool
ck_tls_file_readable(const char *setting, const char *path, char **errmsg)
{
	int			fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
	{
		*errmsg = psprintf("could not read %s \"%s\": %m", setting, path);
		return false;
	}
	close(fd);
	return true;
}

/* Load the client certificate and key (mTLS) into ctx. */
static bool
ck_tls_load_client_cert(SSL_CTX *ctx, char **errmsg)
{
	const char *cert = ck_redis_tls_cert_file;
	const char *key = ck_redis_tls_key_file;

	if ((cert == NULL || cert[0] == '\0') && (key == NULL || key[0] == '\0'))
		return true;
	if (cert == NULL || cert[0] == '\0' || key == NULL || key[0] == '\0')
	{
		*errmsg = "cachekit.redis_tls_cert_file and cachekit.redis_tls_key_file must be set together";
		return false;
	}
	if (!ck_tls_file_readable("cachekit.redis_tls_cert_file", cert, errmsg) ||
		!ck_tls_file_readable("cachekit.redis_tls_key_file", key, errmsg) ||
		!ck_tls_key_file_private(key, errmsg))
		return false;
	if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
	{
		*errmsg = psprintf("could not load cachekit.redis_tls_cert_file \"%s\": %s",
						   cert, ck_tls_error("not a PEM certificate"));
		return false;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
	{
		*errmsg = psprintf("could not load cachekit.redis_tls_key_file \"%s\": %s",
						   key, ck_tls_error("not a PEM private key"));
		return false;
	}
	if (SSL_CTX_check_private_key(ctx) != 1)
	{
		*errmsg = psprintf("cachekit.redis_tls_key_file \"%s\" does not match the certificate: %s",
						   key, ck_tls_error("mismatch"));
		return false;
	}
	return true;
}

/* A TLS client context from the cachekit.redis_tls_* settings; NULL on failure. */
static SSL_CTX *
ck_tls_context(char **errmsg)
{
	SSL_CTX    *ctx;
	const char *ca = ck_redis_tls_ca_file;

	ERR_clear_error();
	ctx = SSL_CTX_new(TLS_client_method());
	if (ctx == NULL)
	{
		*errmsg = psprintf("could not create a TLS context: %s", ck_tls_error("out of memory"));
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	if (ck_redis_tls_verify == CK_TLS_VERIFY_NONE)
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	else
	{
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
		if (ca && ca[0] != '\0')
		{
			if (!ck_tls_file_readable("cachekit.redis_tls_ca_file", ca, errmsg))
				goto fail;
			if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
			{
				*errmsg = psprintf("could not load cachekit.redis_tls_ca_file \"%s\": %s",
								   ca, ck_tls_error("no PEM certificate in it"));
				goto fail;
			}
		}
		else if (SSL_CTX_set_default_verify_paths(ctx) != 1)
		{
			*errmsg = psprintf("could not load the system's trusted certificates: %s",
							   ck_tls_error("unknown error"));
			goto fail;
		}
	}
	if (!ck_tls_load_client_cert(ctx, errmsg))
		goto fail;
	return ctx;

fail:
	SSL_CTX_free(ctx);
	return NULL;
}

/* Is this host written as an IP address? */
static bool
ck_host_is_ip(const char *host)
{
	unsigned char buf[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* Set up the TLS session on t->fd: SNI, and the name to verify. */
static bool
ck_tls_session(CkTransport *t, const char *host, char **errmsg)
{
	SSL_CTX    *ctx = ck_tls_context(errmsg);
	const char *name;

	if (ctx == NULL)
		return false;
	t->ssl = SSL_new(ctx);
	SSL_CTX_free(ctx);			/* the session holds its own reference */
	if (t->ssl == NULL || SSL_set_fd(t->ssl, t->fd) != 1)
	{
		*errmsg = psprintf("could not start TLS: %s", ck_tls_error("out of memory"));
		return false;
	}
	name = (ck_redis_tls_server_name && ck_redis_tls_server_name[0] != '\0') ?
		ck_redis_tls_server_name : host;
	if (name == NULL)
		return true;
	if (!ck_host_is_ip(name))
		SSL_set_tlsext_host_name(t->ssl, name);
	if (ck_redis_tls_verify == CK_TLS_VERIFY_FULL)
	{
		X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
		int			ok;

		X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
		ok = ck_host_is_ip(name) ? X509_VERIFY_PARAM_set1_ip_asc(param, name) :
			X509_VERIFY_PARAM_set1_host(param, name, 0);
		if (ok != 1)
		{
			*errmsg = psprintf("could not set the name to verify: %s", ck_tls_error("invalid name"));
			return false;
		}
	}
	return true;
}

/* Why a handshake failed, in words. */
static char *
ck_tls_handshake_error(CkTransport *t, int ret)
{
	int			err = SSL_get_error(t->ssl, ret);
	long		verify = SSL_get_verify_result(t->ssl);
	unsigned long code = ERR_peek_error();

	if (verify != X509_V_OK)
		return psprintf("the server's certificate was refused: %s",
						X509_verify_cert_error_string(verify));
	if (code != 0)
	{
		if (ERR_GET_REASON(code) == SSL_R_WRONG_VERSION_NUMBER ||
			ERR_GET_REASON(code) == SSL_R_PACKET_LENGTH_TOO_LONG)
			return psprintf("%s (is this a plain-text Redis port?)", ck_tls_error(""));
		return pstrdup(ck_tls_error(""));
	}
	if (err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN)
		return pstrdup("the server closed the connection during the handshake "
					   "(does it speak TLS, and does it want a client certificate?)");
	return psprintf("TLS error %d", err);
}

/* Drive the TLS handshake to its end or the deadline. */
static bool
ck_tls_handshake(CkTransport *t, TimestampTz deadline, char **errmsg)
{
	for (;;)
	{
		int			ret;
		int			err;

		ERR_clear_error();
		ret = SSL_connect(t->ssl);
		if (ret == 1)
			return true;
		err = SSL_get_error(t->ssl, ret);
		if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
		{
			*errmsg = psprintf("TLS handshake failed: %s", ck_tls_handshake_error(t, ret));
			return false;
		}
		if (!ck_transport_wait(t, err == SSL_ERROR_WANT_READ ?
							   WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE, deadline))
		{
			*errmsg = ck_wait_failed(t, "TLS handshake (is this a TLS port?)");
			return false;
		}
	}
}

/* A non-blocking socket connecting to addr; -1 with errno on failure. */
static int
ck_socket_start(const struct sockaddr *addr, socklen_t addrlen)
{
	int			fd = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int			one = 1;

	if (fd < 0)
		return -1;
	if (!pg_set_noblock(fd))
	{
		close(fd);
		return -1;
	}
	if (addr->sa_family != AF_UNIX)
	{
		(void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		(void) setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	}
	if (connect(fd, addr, addrlen) != 0 && errno != EINPROGRESS)
	{
		int			save = errno;

		close(fd);
		errno = save;
		return -1;
	}
	return fd;
}

/* Make the wait set of a new socket: latch, postmaster death, the socket. */
static void
ck_transport_wait_set(CkTransport *t)
{
	t->wait_set = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(t->wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(t->wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	t->socket_events = WL_SOCKET_WRITEABLE;
	t->socket_pos = AddWaitEventToSet(t->wait_set, t->socket_events, t->fd, NULL, NULL);
}

/* Connect the socket to one address and wait for the outcome. */
static bool
ck_socket_connect(CkTransport *t, const struct sockaddr *addr, socklen_t addrlen,
				  TimestampTz deadline, const char *what, char **errmsg)
{
	int			sockerr = 0;
	socklen_t	len = sizeof(sockerr);

	t->fd = ck_socket_start(addr, addrlen);
	if (t->fd < 0)
	{
		*errmsg = psprintf("could not connect to %s: %m", what);
		return false;
	}
	ck_transport_wait_set(t);
	if (!ck_transport_wait(t, WL_SOCKET_WRITEABLE, deadline))
	{
		*errmsg = ck_wait_failed(t, psprintf("could not connect to %s", what));
		return false;
	}
	if (getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &sockerr, &len) != 0 || sockerr != 0)
	{
		*errmsg = psprintf("could not connect to %s: %s", what,
						   strerror(sockerr ? sockerr : errno));
		return false;
	}
	return true;
}

/* Connect to host:port, trying each of its addresses in turn. */
static bool
ck_tcp_connect(CkTransport *t, const char *host, int port, TimestampTz deadline,
			   char **errmsg)
{
	struct addrinfo hints;
	struct addrinfo *res;
	char		portstr[16];
	char	   *what = psprintf(strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
	int			rc;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	snprintf(portstr, sizeof(portstr), "%d", port);
	rc = getaddrinfo(host, portstr, &hints, &res);
	if (rc != 0)
	{
		*errmsg = psprintf("could not resolve host \"%s\": %s", host, gai_strerror(rc));
		return false;
	}
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next)
	{
		if (ck_socket_connect(t, ai->ai_addr, ai->ai_addrlen, deadline, what, errmsg))
		{
			freeaddrinfo(res);
			return true;
		}
		ck_transport_close(t);
		t->connecting = true;
		if (ConfigReloadPending || GetCurrentTimestamp() >= deadline)
			break;
	}
	freeaddrinfo(res);
	return false;
}

/* Connect to a unix socket. */
static bool
ck_unix_connect(CkTransport *t, const char *path, TimestampTz deadline, char **errmsg)
{
	struct sockaddr_un addr;

	if (strlen(path) >= sizeof(addr.sun_path))
	{
		*errmsg = psprintf("the unix socket path \"%s\" is too long", path);
		return false;
	}
	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	strlcpy(addr.sun_path, path, sizeof(addr.sun_path));
	return ck_socket_connect(t, (struct sockaddr *) &addr, sizeof(addr), deadline,
							 psprintf("unix socket \"%s\"", path), errmsg);
}

/*
 * Open a connection: to host:port, or to the unix socket at path, over TLS
 * if asked. Everything (name lookup aside) is done by the deadline. On
 * failure returns false with *errmsg set and t closed.
 */
bool
ck_transport_open(CkTransport *t, const char *host, int port, const char *path,
				  bool tls, TimestampTz deadline, char **errmsg)
{
	bool		ok;

	memset(t, 0, sizeof(CkTransport));
	t->fd = -1;
	t->connecting = true;
	if (path)
		ok = ck_unix_connect(t, path, deadline, errmsg);
	else
		ok = ck_tcp_connect(t, host, port, deadline, errmsg);
	if (ok && tls)
		ok = ck_tls_session(t, path ? NULL : host, errmsg) &&
			ck_tls_handshake(t, deadline, errmsg);
	t->connecting = false;
	if (!ok)
		ck_transport_close(t);
	return ok;
}

/* Send all of data by the deadline. */
bool
ck_transport_send(CkTransport *t, const char *data, size_t len,
				  TimestampTz deadline, char **errmsg)
{
	while (len > 0)
	{
		uint32		event = WL_SOCKET_WRITEABLE;
		ssize_t		n;

		if (t->ssl)
		{
			int			ret;

			ERR_clear_error();
			ret = SSL_write(t->ssl, data, (int) Min(len, INT_MAX));
			n = ret;
			if (ret <= 0)
			{
				int			err = SSL_get_error(t->ssl, ret);

				if (err == SSL_ERROR_WANT_READ)
					event = WL_SOCKET_READABLE;
				else if (err != SSL_ERROR_WANT_WRITE)
				{
					*errmsg = psprintf("lost the connection: %s",
									   ck_tls_error("closed by the server"));
					return false;
				}
			}
		}
		else
		{
			n = send(t->fd, data, len, MSG_NOSIGNAL);
			if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			{
				*errmsg = psprintf("lost the connection: %m");
				return false;
			}
		}
		if (n > 0)
		{
			data += n;
			len -= n;
		}
		else if (!ck_transport_wait(t, event, deadline))
		{
			*errmsg = ck_wait_failed(t, "sending");
			return false;
		}
	}
	return true;
}

/*
 * Receive what is there, up to cap bytes, waiting (by the deadline) only
 * when nothing is. Returns the byte count, or -1 with *errmsg set.
 */
ssize_t
ck_transport_recv(CkTransport *t, char *buf, size_t cap, TimestampTz deadline,
				  char **errmsg)
{
	for (;;)
	{
		uint32		event = WL_SOCKET_READABLE;
		ssize_t		n;

		if (t->ssl)
		{
			int			ret;

			/* bytes OpenSSL already holds come out here, with no wait */
			ERR_clear_error();
			ret = SSL_read(t->ssl, buf, (int) Min(cap, INT_MAX));
			if (ret > 0)
				return ret;
			n = SSL_get_error(t->ssl, ret);
			if (n == SSL_ERROR_WANT_WRITE)
				event = WL_SOCKET_WRITEABLE;
			else if (n != SSL_ERROR_WANT_READ)
			{
				*errmsg = psprintf("lost the connection: %s",
								   ck_tls_error("closed by the server"));
				return -1;
			}
		}
		else
		{
			n = recv(t->fd, buf, cap, 0);
			if (n > 0)
				return n;
			if (n == 0)
			{
				*errmsg = pstrdup("lost the connection: closed by the server");
				return -1;
			}
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			{
				*errmsg = psprintf("lost the connection: %m");
				return -1;
			}
		}
		if (!ck_transport_wait(t, event, deadline))
		{
			*errmsg = ck_wait_failed(t, "waiting for an answer");
			return -1;
		}
	}
}

/* Close the connection, if open. */
void
ck_transport_close(CkTransport *t)
{
	if (t->ssl)
	{
		/* no close_notify: the peer may be hung, and nothing waits for it */
		SSL_free(t->ssl);
		t->ssl = NULL;
	}
	if (t->wait_set)
		FreeWaitEventSet(t->wait_set);
	t->wait_set = NULL;
	if (t->fd >= 0)
		close(t->fd);
	t->fd = -1;
	t->connecting = false;
}
