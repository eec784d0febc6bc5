#!/bin/sh
# Redis with a password and an append-only file in /data. The password goes into a configuration file readable by
# this user alone, not onto the command line, where `ps` would show it.
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
umask 077
conf=$(mktemp)
printf 'requirepass "%s"\n' "$REDIS_PASSWORD" > "$conf"
exec redis-server "$conf" --port "${REDIS_PORT:-6379}" --bind "${REDIS_BIND:-0.0.0.0}" --dir /data \
    --appendonly yes --save '' --daemonize no "$@"
