# Makefile for cachekit (PGXS)
#
#   make && make install          build and install into the pg_config in PATH
#   make installcheck             pg_regress (private server) and TAP tests
#
# The extension version lives only in cachekit.control.

EXTENSION = cachekit
EXTVERSION = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(EXTENSION).control)

MODULE_big = cachekit
OBJS = src/cachekit.o src/template.o src/rowjson.o src/trigger.o src/queue.o src/pending.o src/deliver.o src/waiting.o src/worker.o \
	src/url.o src/transport.o src/protocol.o src/topology.o src/cluster.o \
	src/ddl.o src/preview.o src/replica.o src/launcher.o src/databases.o src/redelete.o src/targets.o
DATA = $(wildcard sql/$(EXTENSION)--*.sql)
PGFILEDESC = "cachekit - Redis cache invalidation from PostgreSQL"

PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS = -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK = -lhiredis -lssl -lcrypto

REGRESS = template statement invalidate manual write_through settings keys ddl preview upgrade_triggers targets
REGRESS_OPTS = --temp-instance=tmp_check_regress --temp-config=$(srcdir)/test/regress.conf

TAP_TESTS = 1
PROVE_TESTS = $(wildcard test/t/*.pl)

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# after the include: Makefile.global resets PROVE_FLAGS
PROVE_FLAGS = -I $(srcdir)/test/perl --verbose

EXTRA_CLEAN = tmp_check_regress
