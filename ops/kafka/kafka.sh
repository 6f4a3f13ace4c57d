#!/usr/bin/env bash
# A native single-node Kafka (KRaft, combined broker+controller) for tests and local runs, no Docker.
#
#   kafka.sh fetch                           copy the broker jars pinned in pom.xml into ops/kafka/lib
#   kafka.sh start  [--port N] [--dir D]     fresh broker on 127.0.0.1:N (default 9092), prints bootstrap=...
#   kafka.sh stop   [--port N] [--dir D]     SIGTERM, SIGKILL after 20 s
#   kafka.sh status [--port N] [--dir D]     exit 0 when running
#
# The run dir (default ops/kafka/run/PORT) holds server.properties, the data, server.log and kafka.pid.
# Every start formats new storage with a new cluster id: the broker is a disposable test fixture.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIB="$HERE/lib"
STAMP="$LIB/.pom.sha256"
START_TIMEOUT_S="${KAFKA_START_TIMEOUT_S:-90}"
# For ../lib.sh (parse_args, running_pid, stop, status, ...): see there.
SELF=kafka.sh PORT=9092 PROC_PATTERN='kafka\.Kafka' STOP_POLL_S=0.2
PID_NAME=kafka.pid LOG_NAME=server.log
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

endpoint() { echo "bootstrap=127.0.0.1:$PORT"; }

fetch() {
  local want
  want="$(sha256sum "$HERE/pom.xml" | cut -d' ' -f1)"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found (needed once to fetch the Kafka jars)"
  local tmp="$LIB.tmp.$$"
  rm -rf "$tmp"
  echo "kafka.sh: fetching Kafka jars into $LIB" >&2
  # Offline first (a warm ~/.m2 needs no network), then online. mvn -q still prints ANSI resets on
  # stdout, so its output is kept for errors only.
  local mvn=(mvn -q -B -Dstyle.color=never -f "$HERE/pom.xml" dependency:copy-dependencies
             -DoutputDirectory="$tmp" -DincludeScope=runtime)
  if ! "${mvn[@]}" -o >"$tmp.log" 2>&1 && ! "${mvn[@]}" >"$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    rm -rf "$tmp" "$tmp.log"
    die "mvn dependency:copy-dependencies failed"
  fi
  rm -f "$tmp.log"
  echo "$want" >"$tmp/.pom.sha256"
  rm -rf "$LIB"
  mv "$tmp" "$LIB"
}

free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
    return
  fi
  local p
  for _ in $(seq 200); do  # fallback: a random port below the ephemeral range that refuses connections
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  die "no free port found"
}

# Kafka cluster ids are 16 random bytes, base64url without padding; one starting with '-' would read as a flag.
cluster_id() {
  local id="-"
  while [[ "$id" == -* ]]; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
  done
  echo "$id"
}

write_config() {
  local cport="$1"
  cat >"$DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=127.0.0.1:$cport
log.dirs=$DIR/data
num.partitions=3
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
EOF
  # WARN everywhere, except the one INFO line that says the server is up ("Kafka Server started").
  cat >"$DIR/log4j2.properties" <<EOF
status = warn
shutdownHook = disable
appender.file.type = File
appender.file.name = file
appender.file.fileName = $LOG
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
EOF
}

start() {
  parse_args "$@"
  if already_running; then
    return 0
  fi
  fetch
  command -v java >/dev/null || die "java not found"

  mkdir -p "$DIR"
  rm -rf "$DIR/data" "$LOG" "$DIR/kafka.out" "$PIDFILE"
  write_config "$(free_port)"
  local cp="$LIB/*"
  java -cp "$cp" kafka.tools.StorageTool format --standalone \
    --config "$DIR/server.properties" --cluster-id "$(cluster_id)" >"$DIR/format.log" 2>&1 \
    || { cat "$DIR/format.log" >&2; die "storage format failed"; }

  # shellcheck disable=SC2086
  nohup java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    ${KAFKA_JVM_OPTS:-} -Dlog4j2.configurationFile="$DIR/log4j2.properties" -Dkafka.logs.dir="$DIR" \
    -cp "$cp" kafka.Kafka "$DIR/server.properties" >"$DIR/kafka.out" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"

  local deadline=$((SECONDS + START_TIMEOUT_S))
  until grep -q 'Kafka Server started' "$LOG" 2>/dev/null; do
    if ! alive "$pid"; then
      echo "kafka.sh: broker exited during start-up; tail of its logs:" >&2
      tail -n 40 "$DIR/kafka.out" "$LOG" >&2 2>/dev/null || true
      rm -f "$PIDFILE"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "kafka.sh: broker not up after ${START_TIMEOUT_S}s; tail of its logs:" >&2
      tail -n 40 "$DIR/kafka.out" "$LOG" >&2 2>/dev/null || true
      stop_pid "$pid"
      exit 1
    fi
    sleep 0.2
  done
  endpoint
}

cmd="${1:-}"
shift || true
case "$cmd" in
  fetch) fetch ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  *) echo "usage: $0 {fetch|start|stop|status} [--port N] [--dir D]" >&2; exit 2 ;;
esac
