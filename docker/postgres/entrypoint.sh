#!/bin/sh
# One server of the PostgreSQL pair, run as the postgres user on the data in $PGDATA (a volume).
#
#   PG_ROLE=primary  first start: initdb, with the superuser POSTGRES_USER (chat) and POSTGRES_PASSWORD, then the
#                    database POSTGRES_DB (chat)
#   PG_ROLE=replica  first start: pg_basebackup -R from PRIMARY_HOST:PRIMARY_PORT; from then on it streams
#
# Both listen on PG_LISTEN (all addresses unless set) at PG_PORT and take connections with the password (SCRAM),
# replication included; inside the container, on its socket, without one (the health check).
set -eu
: "${PG_ROLE:=primary}" "${PG_PORT:=5432}" "${PG_LISTEN:=*}" "${POSTGRES_USER:=chat}" "${POSTGRES_DB:=chat}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
: "${PGDATA:?set PGDATA}"

settings() {
    # Last in the file, so that they win over the primary's, which pg_basebackup copies.
    cat >> "$PGDATA/postgresql.conf" <<CONF

# chatqueue
listen_addresses = '$PG_LISTEN'
port = $PG_PORT
unix_socket_directories = '/var/run/postgresql'
wal_level = replica
max_wal_senders = 10
hot_standby = on
wal_keep_size = 256MB
password_encryption = 'scram-sha-256'
# No message text, nor who sent it, in the server's log: no statements or their values, and errors without the
# DETAIL line that repeats a row's values (a unique key's owner).
log_statement = 'none'
log_min_duration_statement = -1
log_error_verbosity = terse
log_parameter_max_length = 0
log_parameter_max_length_on_error = 0
CONF
}

make_primary() {
    umask 077
    secrets=$(mktemp -d)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$secrets/password"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$secrets/password" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256
    printf 'host all all all scram-sha-256\nhost replication all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    settings
    # The database, made on a server that listens on a private socket alone meanwhile: nothing, the health check
    # included, reaches it before it is whole.
    pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories='$secrets'" start
    psql -h "$secrets" -p "$PG_PORT" -U "$POSTGRES_USER" -d postgres -v ON_ERROR_STOP=1 -q \
        -c "CREATE DATABASE \"$POSTGRES_DB\""
    pg_ctl -D "$PGDATA" -w -m fast stop
    rm -rf "$secrets"
}

make_replica() {
    : "${PRIMARY_HOST:?set PRIMARY_HOST}" "${PRIMARY_PORT:=5432}"
    export PGPASSWORD="$POSTGRES_PASSWORD"
    tries=0
    until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 120 ]; then echo "the primary at $PRIMARY_HOST:$PRIMARY_PORT does not answer" >&2; exit 1; fi
        sleep 1
    done
    # -R writes standby.signal and the primary's address (with the password) into postgresql.auto.conf.
    if ! pg_basebackup -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$POSTGRES_USER" -D "$PGDATA" -R -X stream \
            --checkpoint=fast; then
        find "$PGDATA" -mindepth 1 -delete  # an empty folder again, for the next start to try anew
        exit 1
    fi
    unset PGPASSWORD
    settings
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    case "$PG_ROLE" in
        primary) make_primary ;;
        replica) make_replica ;;
        *) echo "PG_ROLE must be primary or replica, not '$PG_ROLE'" >&2; exit 1 ;;
    esac
fi
exec postgres -D "$PGDATA" "$@"
