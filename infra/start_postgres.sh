#!/usr/bin/env bash
# PostgreSQL on 127.0.0.1 for Airflow's metadata database and MLflow's backend store, from
# Debian's postgresql package (apt-get install -y postgresql; binaries /usr/lib/postgresql/*/bin).
# A private cluster, not the package's system one: the first start runs initdb into
# $PG_DIR/data; every start makes sure of a login role `gensar` whose password is generated
# once into $PG_DIR/password (mode 600) and of the databases `airflow` and `mlflow` it owns.
#   infra/start_postgres.sh                       port 5432, PG_DIR=$GENSAR_HOME/postgres
#   PG_PORT=55432 PG_DIR=/srv/gensar-pg infra/start_postgres.sh
# Connect with postgresql://gensar:$(cat $PG_DIR/password)@127.0.0.1:$PG_PORT/airflow (or /mlflow).
# Postgres refuses to run as root: run as root, the server runs as the package's `postgres`
# user, so PG_DIR must be reachable by that user. Ctrl-C (or a TERM to this script) stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
GENSAR_HOME="${GENSAR_HOME:-$PWD/.gensar}"
DIR="${PG_DIR:-$GENSAR_HOME/postgres}"
PORT="${PG_PORT:-5432}"
BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
[ -x "$BIN/postgres" ] || { echo "no PostgreSQL server binaries (apt-get install -y postgresql, or set PG_BIN)" >&2; exit 1; }
as=()
super="$(id -un)"  # initdb names the superuser after the OS user that runs it
mkdir -p "$DIR/data" "$DIR/run"
chmod 700 "$DIR/data"
if [ "$(id -u)" = 0 ]; then
  # setpriv execs (no fork): the server's pid is our child's, so the trap below reaches it
  as=(setpriv --reuid=postgres --regid=postgres --init-groups)
  super=postgres
  chown postgres: "$DIR/data" "$DIR/run"
fi
if [ ! -s "$DIR/data/PG_VERSION" ]; then
  # local socket: peer (the OS user that owns the server); TCP: passwords only (scram)
  "${as[@]}" "$BIN/initdb" -D "$DIR/data" -E UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256 >"$DIR/initdb.log"
fi
if [ ! -s "$DIR/password" ]; then
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/password")
fi
PASSWORD="$(cat "$DIR/password")"
# loopback TCP only, and the socket in our own folder (the system one belongs to the package)
"${as[@]}" "$BIN/postgres" -D "$DIR/data" -c listen_addresses=127.0.0.1 -c port="$PORT" \
  -c unix_socket_directories="$DIR/run" -c max_connections=200 & pid=$!
# INT is PostgreSQL's fast shutdown: TERM would wait for every client to disconnect
trap 'kill -INT "$pid" 2>/dev/null; wait "$pid"' EXIT INT TERM
# ready = our server (not another one on this folder or port) accepts connections
for _ in $(seq 1 60); do
  kill -0 "$pid" 2>/dev/null || { echo "postgres exited during start-up (see above)" >&2; exit 1; }
  if [ "$(head -1 "$DIR/data/postmaster.pid" 2>/dev/null)" = "$pid" ] &&
     "${as[@]}" "$BIN/pg_isready" -q -h "$DIR/run" -p "$PORT" -U "$super" -d postgres; then
    break
  fi
  [ "$_" = 60 ] && { echo "postgres did not accept connections within 60 s" >&2; exit 1; }
  sleep 1
done
# the password (hex) goes in on stdin, never on a command line
"${as[@]}" "$BIN/psql" -X -h "$DIR/run" -p "$PORT" -d postgres -qAt -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT 'CREATE ROLE gensar' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gensar')\gexec
ALTER ROLE gensar LOGIN PASSWORD '$PASSWORD';
SELECT 'CREATE DATABASE airflow OWNER gensar' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'airflow')\gexec
SELECT 'CREATE DATABASE mlflow OWNER gensar' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SQL
echo "postgres ready on 127.0.0.1:$PORT: role gensar (password in $DIR/password), databases airflow, mlflow"
wait "$pid"
