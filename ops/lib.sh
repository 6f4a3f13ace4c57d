# shellcheck shell=bash
# What ops/kafka/kafka.sh and ops/redis/redis.sh share: their --port/--dir arguments, the pid file
# and the start/stop/status plumbing around it. Sourced by them (not run), after they set:
#
#   SELF             the script's name, the prefix of its messages (kafka.sh)
#   HERE             the script's directory; the default run dir is $HERE/run/PORT
#   PORT             the default port
#   PID_NAME         the pid file's name in the run dir
#   LOG_NAME         the log file's name in the run dir
#   PROC_PATTERN     grep pattern the live process's command line must match
#   STOP_POLL_S      seconds between checks while stop waits for the process to go
#
# and they define endpoint(), which prints where the service answers (bootstrap=127.0.0.1:PORT).

STOP_TIMEOUT_S=20  # stop sends SIGKILL when SIGTERM has not ended the process by then
DIR=""

die() { echo "$SELF: $*" >&2; exit 1; }

# Sets PORT, DIR (absolute), PIDFILE and LOG from [--port N] [--dir D].
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
  PIDFILE="$DIR/$PID_NAME"
  # shellcheck disable=SC2034  # LOG is for the sourcing scripts
  LOG="$DIR/$LOG_NAME"
}

# True while the process exists and is not a zombie (an unreaped child of ours still answers kill -0).
alive() {
  kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

# Prints the pid when the pid file names a live process whose command line matches PROC_PATTERN.
running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [[ -n "$pid" ]] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$PROC_PATTERN" || return 1
  echo "$pid"
}

# For start: true, after printing the endpoint as start does, when the service already runs;
# dies when something else holds the port; false when start should go ahead.
already_running() {
  local pid
  if pid="$(running_pid)"; then
    echo "$SELF: already running (pid $pid)" >&2
    endpoint
    return 0
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT is already in use"
  fi
  return 1
}

# SIGTERM, SIGKILL after STOP_TIMEOUT_S, then removes the pid file.
stop_pid() {
  local pid="$1" deadline=$((SECONDS + STOP_TIMEOUT_S))
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid"; do
    if ((SECONDS >= deadline)); then
      echo "$SELF: pid $pid ignored SIGTERM for ${STOP_TIMEOUT_S}s, killing" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep "$STOP_POLL_S"
  done
  # Reap it when it is our own child (start timed out), so no zombie keeps the pid alive.
  wait "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

stop() {
  parse_args "$@"
  local pid
  if pid="$(running_pid)"; then
    stop_pid "$pid"
    echo "$SELF: stopped (pid $pid)" >&2
  else
    rm -f "$PIDFILE"
    echo "$SELF: not running" >&2
  fi
}

status() {
  parse_args "$@"
  local pid
  if pid="$(running_pid)"; then
    echo "running pid=$pid $(endpoint) dir=$DIR"
  else
    echo "stopped dir=$DIR"
    return 1
  fi
}
