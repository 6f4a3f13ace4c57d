#!/usr/bin/env bash
# A native single-node Kafka (KRaft, combined broker+controller) for tests and local runs, no Docker.
#
#   kafka.sh fetch                           copy the broker jars pinned in pom.xml into ops/kafka/lib
#   kafka.sh start  [--port N] [--dir D] [--sasl-scram USER:PASSWORD] [--tls-dir T]
#                                            fresh broker on 127.0.0.1:N (default 9092), prints bootstrap=...
#   kafka.sh stop   [--port N] [--dir D]     SIGTERM, SIGKILL after 20 s
#   kafka.sh status [--port N] [--dir D]     exit 0 when running
#
# The run dir (default ops/kafka/run/PORT) holds server.properties, the data, server.log and kafka.pid.
# Every start formats new storage with a new cluster id: the broker is a disposable test fixture.
#
# --sasl-scram makes the client listener SASL_PLAINTEXT: USER logs in with PASSWORD over SCRAM-SHA-256,
# SCRAM-SHA-512 or PLAIN (the credentials are written at format time, and the broker uses them itself
# between its listeners). --tls-dir serves the client listener over TLS (SSL, or SASL_SSL with
# --sasl-scram) with T/server.pem, T/server.key (PEM, unencrypted PKCS#8) and T/ca.pem, which signed
# them; clients are not asked for a certificate. Without either the listener is PLAINTEXT with no
# login, as before.
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

SASL_USER="" SASL_PASSWORD="" TLS_DIR=""

# The SASL settings of the client listener, for --sasl-scram (SCRAM and PLAIN, one user).
sasl_config() {
  local jaas="required username=\"$SASL_USER\" password=\"$SASL_PASSWORD\"" name="${1,,}"
  cat <<EOF
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-256
listener.name.$name.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule $jaas;
listener.name.$name.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule $jaas;
listener.name.$name.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule $jaas user_$SASL_USER="$SASL_PASSWORD";
EOF
}

# The TLS settings of the client listener, for --tls-dir: a PEM keystore (key + certificate) and trust in ca.pem.
tls_config() {
  cat "$TLS_DIR/server.key" "$TLS_DIR/server.pem" >"$DIR/keystore.pem"
  cat <<EOF
ssl.keystore.type=PEM
ssl.keystore.location=$DIR/keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
ssl.client.auth=none
EOF
}

write_config() {
  local cport="$1" listener
  listener="$([[ -n "$SASL_USER" ]] && echo SASL_ || true)$([[ -n "$TLS_DIR" ]] && echo SSL || echo PLAINTEXT)"
  cat >"$DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=$listener://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$cport
advertised.listeners=$listener://127.0.0.1:$PORT
listener.security.protocol.map=$listener:$listener,CONTROLLER:PLAINTEXT
inter.broker.listener.name=$listener
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
  [[ -z "$SASL_USER" ]] || sasl_config "$listener" >>"$DIR/server.properties"
  [[ -z "$TLS_DIR" ]] || tls_config >>"$DIR/server.properties"
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
  local args=()
  while (($#)); do
    if [[ "$1" == --sasl-scram ]]; then
      local creds="${2:?--sasl-scram needs USER:PASSWORD}"
      SASL_USER="${creds%%:*}" SASL_PASSWORD="${creds#*:}"
      [[ "$SASL_USER" =~ ^[A-Za-z0-9_-]+$ && "$SASL_PASSWORD" =~ ^[A-Za-z0-9_.-]+$ ]] \
        || die "--sasl-scram: USER must match [A-Za-z0-9_-]+, PASSWORD [A-Za-z0-9_.-]+"
      shift 2
    elif [[ "$1" == --tls-dir ]]; then
      TLS_DIR="$(cd "${2:?--tls-dir needs a folder}" && pwd)" || die "--tls-dir: no folder $2"
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
  fetch
  command -v java >/dev/null || die "java not found"

  mkdir -p "$DIR"
  rm -rf "$DIR/data" "$LOG" "$DIR/kafka.out" "$PIDFILE"
  write_config "$(free_port)"
  local cp="$LIB/*"
  local scram=()
  if [[ -n "$SASL_USER" ]]; then
    local user="name=$SASL_USER,password=$SASL_PASSWORD"
    scram=(--add-scram "SCRAM-SHA-256=[$user]" --add-scram "SCRAM-SHA-512=[$user]")
  fi
  java -cp "$cp" kafka.tools.StorageTool format --standalone "${scram[@]}" \
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
