#!/bin/sh
# Healthy: the primary takes connections to its database; the replica streams from the primary.
set -eu
query() {
    psql -h /var/run/postgresql -p "${PG_PORT:-5432}" -U "${POSTGRES_USER:-chat}" -d "${POSTGRES_DB:-chat}" -tAc "$1"
}
case "${PG_ROLE:-primary}" in
    primary) [ "$(query 'SELECT NOT pg_is_in_recovery()')" = t ] ;;
    *) [ "$(query 'SELECT status FROM pg_stat_wal_receiver')" = streaming ] ;;
esac
