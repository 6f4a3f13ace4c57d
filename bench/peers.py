"""Issue 19's peers in one run, side by side, ratios printed: the engine, then the window route.

    .venv/bin/python -m bench.peers [--quick] [--part engine|windows|all] [--int8 DIR | --no-int8]
        [--rounds N] [--concurrency 1 16 48] [--events N] [--keys N] [--no-settle-heap]

(a) engine   bench/peers_engine.py's `peers` part (`run_peers`): the native continuous engine (`streamer
             serve`, fp32 de-quantized from the default GGUF) and, unless --no-int8, a second `streamer serve`
             on an int8-dynamic artifact, vs llama.cpp's llama-server on the same GGUF, each through its own
             OpenAI API, at each --concurrency (1 16 48), prompts and answers of mixed lengths, A/B/A order.
             The artifact is --int8 DIR (default /tmp/peers-smol-int8); a directory without one is made
             first with `streamer compress --recipe int8-dynamic --out DIR --eval-prompts 20` (1-2
             minutes). The in-process step profile is not run here: `python -m bench.peers_engine --part profile`.
(b) windows  bench/peers_windows.py's `run_peers`: streamer's Kafka-to-Kafka tumbling count route vs Quix
             Streams (.venv-quix) and faust-streaming (.venv-faust) on one topic, the same events, timed
             and checked alike, A/B/A order; streamer's process calls `streamer.heap.settle_heap()` after
             start-up as the product does (--no-settle-heap: the diagnostic without it).

Each part prints its own detailed tables as it goes; the run ends with one summary block: the date, the
machine, the load average before, between and after the parts, the engine's tokens/s ratios to
llama-server per concurrency (fp32 and int8), and the window route's streamer/quix and streamer/faust
ratios with their range over runs. A part that fails is reported there and the other still runs; the exit
status is 1 if a part failed or a window run did not match.

--quick: the engine's quick mode (8 requests at concurrency 1) with one round, and the window route on
20,000 events over 2,000 keys, one round (an explicit --rounds, --events or --keys wins).

Needs what `make bench` builds first: the Kafka jars, llama-server (`make llama-server`), .venv-quix and
.venv-faust (`make quix-venv faust-venv`); redis-server on PATH. On 2 cores the full run (no --quick) takes
about 10 minutes (engine ~6, windows ~3), 1-2 more when the int8 artifact is made first; --quick with
--no-int8 about 3.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import peers_engine, peers_windows
from bench.windows_kafka import ROOT, _cpu_model, _faust_version

DEFAULT_INT8 = Path("/tmp/peers-smol-int8")
QUICK_WINDOWS = {"events": 20_000, "keys": 2_000}


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _machine() -> str:
    memory = ""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f", {int(line.split()[1]) / 2**20:.0f} GiB"
    import torch

    return (f"{_cpu_model()}, {os.cpu_count()} cpus{memory}, {platform.system()} {platform.release()}, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def _llama_version() -> str:
    try:
        out = subprocess.run([str(ROOT / "ops" / "llama" / "bin" / "llama-server"), "--version"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "? (make llama-server)"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version:")]
    return lines[0].removeprefix("version:").strip() if lines else "?"


def _recipes(artifact: Path) -> list[str]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return [step.get("recipe", "?") for step in manifest.get("steps", [])]


def _unusable(directory: Path) -> bool:
    """Something is there, but no artifact, so `streamer compress --out` would refuse it."""
    return (not (directory / "manifest.json").is_file() and directory.exists()
            and (not directory.is_dir() or any(directory.iterdir())))


def ensure_int8(directory: Path) -> Path:
    """`directory` holding an artifact (a manifest.json), made first with `streamer compress` if absent."""
    if (directory / "manifest.json").is_file():
        recipes = _recipes(directory)
        if recipes[-1:] != ["int8-dynamic"]:
            print(f"note: {directory} is an artifact of {' + '.join(recipes) or 'no recipe'}, not int8-dynamic; "
                  "serving it as side `int8` anyway")
        return directory
    if _unusable(directory):
        raise RuntimeError(f"{directory} exists but holds no artifact (no manifest.json)")
    cmd = [str(ROOT / ".venv" / "bin" / "streamer"), "compress", "--recipe", "int8-dynamic", "--out",
           str(directory), "--eval-prompts", "20"]
    print(f"no int8 artifact in {directory}: making it first (1-2 minutes): {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"int8 artifact made in {time.perf_counter() - started:.0f} s", flush=True)
    return directory


def _part(title: str, run: Callable[[], Any], failures: dict[str, str]) -> Any:
    """run(), its errors reported and kept for the summary instead of ending the whole run."""
    print(f"\n{'=' * 30} {title} {'=' * 30}", flush=True)
    started = time.perf_counter()
    try:
        return run()
    except Exception as exc:  # the other part still runs; the summary says this one failed
        traceback.print_exc()
        failures[title] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return None
    finally:
        print(f"({title}: {time.perf_counter() - started:.0f} s)", flush=True)


def _engine_summary(figures: peers_engine.Figures | None, failure: str | None) -> list[str]:
    if figures is None:
        return [f"(a) engine: FAILED, {failure}" if failure else "(a) engine: not run"]
    names = {"llama": "llama-server", "streamer": "streamer fp32", "int8": "streamer int8"}
    sides = [s for s in names if any(s in rates for rates in figures.rates.values())]
    lines = ["(a) engine vs llama-server, same GGUF, each through its OpenAI API: completion tokens/s, mean of each "
             "side's runs (min-max); ratio = side's mean / llama-server's mean"]
    lines.append(f"  {'conc':>4}  " + "  ".join(f"{names[s]:<28}" for s in sides).rstrip())
    for concurrency, rates in figures.rates.items():
        cells = []
        for side in sides:
            rate = rates.get(side)
            cell = "" if rate is None else f"{rate.mean:.1f} ({rate.low:.1f}-{rate.high:.1f})"
            if rate is not None and side != "llama":
                cell += f" = {rate.ratio:.2f}x"
            cells.append(f"{cell:<28}")
        lines.append(f"  {concurrency:>4}  " + "  ".join(cells).rstrip())
    if figures.llama_step_ms:
        lines.append("  llama-server decode step alone: " + ", ".join(
            f"{rows} rows {ms:.1f} ms" for rows, ms in figures.llama_step_ms.items()))
    return lines


def _windows_summary(figures: peers_windows.Figures | None, failure: str | None) -> list[str]:
    if figures is None:
        return [f"(b) window route: FAILED, {failure}" if failure else "(b) window route: not run"]
    lines = [f"(b) window route, Kafka to Kafka, tumbling 60 s count per key: {figures.events:,} events, "
             f"{figures.windows:,} windows; events/s end to end (first record into the app -> last result appended)"]
    for peer, rates in figures.rates.items():
        lines.append(f"  {peer:<9} mean {peers_windows._mean(rates):>9,.0f}  runs "
                     + " / ".join(f"{r:,.0f}" for r in rates))
    for peer in ("quix", "faust"):
        if ratio := figures.ratio(peer):
            lines.append(f"  streamer / {peer:<6} {ratio[0]:5.2f}x  "
                         f"(range over runs {ratio[1]:.2f}x - {ratio[2]:.2f}x)")
    lines.append("  correctness: " + (f"MISMATCH in runs {', '.join(figures.mismatches)}" if figures.mismatches
                                      else "every run's windows match the input's, window by window"))
    return lines


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the engine's quick mode, one round; windows on 20,000 events, 2,000 keys, one round")
    parser.add_argument("--part", choices=("engine", "windows", "all"), default="all")
    parser.add_argument("--int8", type=Path, default=DEFAULT_INT8,
                        help=f"the int8-dynamic artifact the engine part serves too, made first if absent "
                             f"(default {DEFAULT_INT8})")
    parser.add_argument("--no-int8", action="store_true", help="serve no int8 artifact")
    parser.add_argument("--in-process", action="store_true",
                        help="streamer's engine on a thread of the server (the default config), not engine.own_process")
    parser.add_argument("--rounds", type=int, default=None, help="A/B rounds of each part (default 2; --quick 1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 48], help="the engine's concurrencies")
    parser.add_argument("--events", type=int, default=None, help="window route: events (default 100,000)")
    parser.add_argument("--keys", type=int, default=None, help="window route: keys (default 10,000)")
    parser.add_argument("--no-settle-heap", action="store_true",
                        help="window route diagnostic: streamer's process skips streamer.heap.settle_heap()")
    args = parser.parse_args()
    if args.part in ("engine", "all") and not args.no_int8 and _unusable(args.int8):
        parser.error(f"{args.int8} exists but holds no artifact (no manifest.json): remove it, pass another "
                     "--int8 DIR, or --no-int8")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    quick_windows = QUICK_WINDOWS if args.quick else {}

    started, started_at = time.perf_counter(), datetime.datetime.now(datetime.UTC)
    command = shlex.join([".venv/bin/python", "-m", "bench.peers", *sys.argv[1:]])
    loads = [("before", _loadavg())]
    print(f"bench.peers (issue 19), {started_at:%Y-%m-%d %H:%M} UTC: {command}")
    print(f"machine: {_machine()}")
    print(f"load average at start: {loads[0][1]}")

    failures: dict[str, str] = {}
    engine: peers_engine.Figures | None = None
    windows: peers_windows.Figures | None = None
    int8: Path | None = None
    if args.part in ("engine", "all"):
        def run_engine() -> peers_engine.Figures:
            nonlocal int8
            int8 = None if args.no_int8 else ensure_int8(args.int8)
            return peers_engine.run_peers(peers_engine.Options(tuple(args.concurrency), rounds, args.quick, int8,
                                                               not args.in_process))

        engine = _part("(a) engine", run_engine, failures)
        loads.append(("after (a)", _loadavg()))
    if args.part in ("windows", "all"):
        options = peers_windows.Options(
            events=args.events or quick_windows.get("events", peers_windows.Options.events),
            keys=args.keys or quick_windows.get("keys", peers_windows.Options.keys),
            rounds=rounds, settle_heap=not args.no_settle_heap)
        windows = _part("(b) window route", lambda: peers_windows.run_peers(options), failures)
        loads.append(("after (b)", _loadavg()))

    minutes = (time.perf_counter() - started) / 60
    lines = [f"{'=' * 30} summary {'=' * 30}",
             f"bench.peers (issue 19), {started_at:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min: {command}",
             f"machine: {_machine()}",
             f"peers: llama-server {_llama_version()}, quixstreams {peers_windows._quix_version()}, "
             f"faust-streaming {_faust_version()}",
             "load average (1/5/15 min): " + "; ".join(f"{when} {load}" for when, load in loads)]
    if args.part in ("engine", "all"):
        if int8:
            lines.append(f"int8 artifact: {int8} ({' + '.join(_recipes(int8))})")
        lines += _engine_summary(engine, failures.get("(a) engine"))
    if args.part in ("windows", "all"):
        if args.no_settle_heap:
            lines.append("window route: --no-settle-heap (diagnostic: streamer's process without settle_heap())")
        lines += _windows_summary(windows, failures.get("(b) window route"))
    print("\n" + "\n".join(lines))
    if failures or (windows is not None and windows.mismatches):
        sys.exit(1)


if __name__ == "__main__":
    main()
