"""One engine in a child process of its own (`engine.own_process`), found by review: the child runs
`model.threads`, a model without weights fails at start, and a prompt that kills its worker costs only
itself, not the requests that died beside it (they are retried one at a time, so a death names its cause)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamer.config import BatchingSettings, EngineSettings, ModelSettings
from streamer.engine.continuous import ContinuousPool
from streamer.engine.load import load_backend
from streamer.engine.processes import ProcessEngines
from streamer.models.loader import ModelLoadError
from tests.tiny import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def own() -> EngineSettings:
    return EngineSettings(workers=1, own_process=True, kv_cache_gib=0.01, max_running=8, block_size=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-own-process"), max_position_embeddings=1024)


def test_the_child_runs_the_torch_threads_model_threads_asks_for(tiny_dir: Path) -> None:
    """Fails on the code before the fix: the child took os.cpu_count() threads, whatever model.threads said."""
    pool = load_backend(ModelSettings(path=tiny_dir, device="cpu", threads=1), BatchingSettings(), own())
    assert isinstance(pool, ContinuousPool) and isinstance(pool.engine, ProcessEngines)
    try:
        assert pool.engine.specs[0].threads == 1
    finally:
        pool.engine.close()


def test_a_model_without_weights_fails_at_start_not_request_by_request(tiny_dir: Path, tmp_path: Path) -> None:
    """Fails on the code before the fix: the parent loaded only the skeleton, so the service started, its
    child died loading again and again, and every request became a `model_error`."""
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())

    with pytest.raises(ModelLoadError, match="no weights here"):
        load_backend(ModelSettings(path=broken, device="cpu"), BatchingSettings(), own())


# Run in a process of its own: the patch, at the top of the script, is run again by the spawned child.
POISON = textwrap.dedent('''
    import asyncio, json, os, signal, sys
    from pathlib import Path
    from streamer.engine import paged
    from tests.tiny import tiny_tokenizer
    POISON_ID = tiny_tokenizer().unk_token_id
    _real = paged.PagedRunner.step
    def _step(self, rows):  # a prompt holding this token kills its worker (a device assert, an OOM kill)
        if any(len(row.tokens) > 1 and POISON_ID in row.tokens for row in rows):  # prompts, not decoding
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(self, rows)
    paged.PagedRunner.step = _step

    async def main(directory):
        from streamer.config import BatchingSettings, EngineSettings, ModelSettings
        from streamer.engine.load import load_backend
        from streamer.engine.requests import GenRequest
        def ask(text, n):
            return GenRequest(({"role": "user", "content": text},), max_new_tokens=n, ignore_eos=True)
        settings = EngineSettings(workers=1, own_process=True, kv_cache_gib=0.01, max_running=8, block_size=4)
        pool = load_backend(ModelSettings(path=Path(directory), device="cpu"), BatchingSettings(), settings)
        async with pool:
            streams = [pool.stream(ask(t, 200)) for t in ("Tell me a story", "Count to ten", "Why blue?")]
            firsts = [await anext(s) for s in streams]  # all three run on the only child
            poison = asyncio.ensure_future(pool.generate(ask("bad \\u20ac input", 4)))
            async def rest(s):
                return [i async for i in s][-1]
            finals = await asyncio.gather(*(rest(s) for s in streams))
            p = await poison
        print(json.dumps({"others": [f.result.error for f in finals], "poison": p.result.error,
                          "restarts": pool.engine.restarts}))

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1]))
''')


def test_a_prompt_that_kills_the_only_child_fails_alone_and_the_requests_beside_it_are_answered(
        tiny_dir: Path, tmp_path: Path) -> None:
    """Fails on the code before the fix: every request in flight on a dying child counted the death, and all
    were retried together beside the poison, so the three innocent requests failed with it."""
    script = tmp_path / "poison_main.py"
    script.write_text(POISON)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script), str(tiny_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["poison"] == "2 engine worker processes died running it"
    assert out["others"] == [None, None, None]
