"""Pick the grammar library for JSON-Schema-constrained decoding by measurement: llguidance, xgrammar, outlines_core.

    .venv/bin/pip install --no-deps xgrammar apache-tvm-ffi outlines-core   # the two peers; not project deps
    .venv/bin/python bench/grammar_libs.py

Run by hand when the choice is revisited (not in `make bench`: the peers are not installed by the project).

Each library, on the default model's real tokenizer (SmolLM2-135M-Instruct, 49,152 tokens, EOS `<|im_end|>` = 2):
  1. compiles examples/schemas/support_ticket.json: the first compile includes the library's one-off tokenizer
     preprocessing; the repeat compile is the schema alone (xgrammar's cache cleared first so it is real work);
  2. walks 16 independent matchers up to 64 steps: each step fills the allowed-token bitmask of every unfinished
     sequence (timed), picks per sequence the allowed token with the highest score in a seeded random (16, vocab)
     matrix (model-free, deterministic, the same scores for all), and advances the matcher with it (timed); a
     sequence ends when it picks EOS;
  3. decodes every finished output and validates it against the schema with jsonschema.
The walks differ (llguidance allows only the canonical token where the grammar forces text, e.g. keys, so its
walks are shorter and spend more of their steps inside strings), so the compared mask figures come from a replay:
the first library's 16 outputs, re-tokenized, are fed to every library REPLAYS times, timing the masks on identical
parser states, also through the batch API where there is one (llguidance's LLExecutor, xgrammar's
BatchGrammarMatcher). Whitespace is compact in all three, so a random walk cannot wander in whitespace.
The mask is paid per generated token on the engine's CPU thread, so it decides; compiles are once per schema.
"""

from __future__ import annotations

import importlib.metadata
import json
import statistics
import time
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import torch

from streamer.models.loader import load_model

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "examples" / "schemas" / "support_ticket.json"
BATCH, STEPS, SEED, EOS, REPLAYS = 16, 64, 1234, 2, 3


class Llguidance:
    name = "llguidance"

    def compile_first(self, tok, schema):
        import llguidance.hf
        self.llg, self.tok = llguidance, llguidance.hf.from_tokenizer(tok, eos_token=EOS)
        self.executor = llguidance.LLExecutor()
        self.compile_repeat(tok, schema)

    def compile_repeat(self, tok, schema):
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        self.template = self.llg.LLMatcher(self.tok, g)  # the constructor compiles; matchers are copies of it
        assert not self.template.is_error(), self.template.get_error()

    def new_matcher(self):
        return self.template.deep_copy()

    def fill(self, m, bitmask, i):
        m.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), bitmask.shape[1] * 4)

    def fill_batch(self, ms, bitmask):
        pairs = [(m, i) for i, m in enumerate(ms)]
        self.executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])

    def advance(self, m, t):  # raises unless the token is allowed, and unless EOS leaves the matcher finished
        if not m.consume_token(t) or (t == EOS and not m.is_stopped()):
            raise RuntimeError(f"token {t}: {m.get_error()}")


class Xgrammar:
    name = "xgrammar"
    options: ClassVar[dict[str, Any]] = {"any_whitespace": False, "separators": (",", ":")}

    def compile_first(self, tok, schema):
        import xgrammar
        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[EOS])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.batcher = xgrammar.BatchGrammarMatcher(max_threads=2)
        self.compiled = self.compiler.compile_json_schema(schema, **self.options)

    def compile_repeat(self, tok, schema):
        self.cache_hit_ms = timed(self.compiler.compile_json_schema, schema, **self.options)[1]
        self.compiler.clear_cache()
        self.compiled = self.compiler.compile_json_schema(schema, **self.options)

    def new_matcher(self):
        return self.xg.GrammarMatcher(self.compiled)

    def fill(self, m, bitmask, i):
        m.fill_next_token_bitmask(bitmask, i)

    def fill_batch(self, ms, bitmask):
        self.batcher.batch_fill_next_token_bitmask(ms, bitmask)

    def advance(self, m, t):
        if not m.accept_token(t) or (t == EOS and not m.is_terminated()):
            raise RuntimeError(f"token {t} rejected, or EOS did not terminate")


class OutlinesCore:
    name, fill_batch = "outlines_core", None

    def compile_first(self, tok, schema):
        import outlines_core
        # byte-level BPE writes bytes as printable stand-ins; Vocabulary.from_pretrained would need the Hub
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        moved = sorted(set(range(256)) - set(keep))
        unbyte = {chr(b): b for b in keep} | {chr(256 + n): b for n, b in enumerate(moved)}
        special = set(tok.get_added_vocab().values())  # never JSON text; EOS is the Vocabulary's own
        vocab: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i not in special:
                vocab.setdefault(bytes(unbyte[c] for c in text), []).append(i)
        self.oc, self.vocab = outlines_core, outlines_core.Vocabulary(EOS, vocab)
        self.compile_repeat(tok, schema)

    def compile_repeat(self, tok, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        self.index = self.oc.Index(regex, self.vocab)

    def new_matcher(self):
        return self.oc.Guide(self.index)

    def fill(self, m, bitmask, i):
        m.write_mask_into(bitmask[i].data_ptr(), bitmask.shape[1], 4)

    def advance(self, m, t):  # the mask allows EOS in a final state, but advance() rejects it there
        if t != EOS or not m.is_finished():
            m.advance(t, return_tokens=False)  # raises on a token the state does not allow


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    return fn(*args, **kwargs), (time.perf_counter() - t) * 1e3


def walk(lib, tok, schema, vocab, forced=None):
    """BATCH matchers for up to STEPS tokens: the seeded walk, or `forced` token lists (each ending in EOS)."""
    matchers = [lib.new_matcher() for _ in range(BATCH)]
    new_us = timed(lambda: [lib.new_matcher() for _ in range(32)])[1] * 1e3 / 32
    bitmask = torch.zeros((BATCH, (vocab + 31) // 32), dtype=torch.int32)
    shifts, gen = torch.arange(32, dtype=torch.int32), torch.Generator().manual_seed(SEED)
    out: list[list[int]] = [[] for _ in range(BATCH)]
    done, mask_us, batch_us, adv_us = [False] * BATCH, [], [], []
    for step in range(STEPS):
        scores = torch.rand((BATCH, vocab), generator=gen)
        live = [i for i in range(BATCH) if not done[i]]
        if not live:
            break
        ms = [matchers[i] for i in live]
        t = time.perf_counter()
        for row, m in enumerate(ms):
            lib.fill(m, bitmask, row)
        mask_us.append((time.perf_counter() - t) * 1e6 / len(live))
        if forced is None:
            allowed = ((bitmask[: len(live)].unsqueeze(-1) >> shifts) & 1).bool().view(len(live), -1)[:, :vocab]
            picks = torch.where(allowed, scores[live], -1.0).argmax(dim=1).tolist()
        else:
            picks = [forced[i][step] for i in live]
            if lib.fill_batch is not None:  # the library's batch API on the same states: the same masks again
                batch_us.append(timed(lib.fill_batch, ms, bitmask)[1] * 1e3 / len(live))
        t = time.perf_counter()
        for m, tid in zip(ms, picks, strict=True):
            lib.advance(m, tid)
        adv_us.append((time.perf_counter() - t) * 1e6 / len(live))
        for i, tid in zip(live, picks, strict=True):
            done[i] = tid == EOS
            out[i] += [] if done[i] else [tid]
    texts = [tok.decode(o) if d else None for o, d in zip(out, done, strict=True)]
    valid = sum(text is not None and is_valid(lib, text, schema) for text in texts)
    tokens = statistics.mean(len(o) + 1 for o, d in zip(out, done, strict=True) if d) if any(done) else 0
    return dict(mask=mask_us, batch=batch_us, adv=adv_us, new_us=new_us, valid=valid, texts=texts, tokens=tokens)


def is_valid(lib, text, schema) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError) as exc:
        print(f"  {lib.name}: invalid output {text!r}: {exc!s:.120}")
        return False


def pct(xs, q):
    return statistics.quantiles(xs, n=10)[8] if q == 90 else statistics.median(xs)


def main() -> None:
    tok = load_model(None, device="cpu", weights=False).tokenizer  # the real tokenizer, no weights
    assert tok.convert_ids_to_tokens(EOS) == "<|im_end|>"
    schema = json.loads(SCHEMA_PATH.read_text())
    vocab, rows, forced = len(tok), [], None
    for lib in (Llguidance(), Xgrammar(), OutlinesCore()):
        version = importlib.metadata.version(lib.name)
        try:
            first = timed(lib.compile_first, tok, schema)[1]
            r = dict(repeat=timed(lib.compile_repeat, tok, schema)[1], first=first, **walk(lib, tok, schema, vocab))
        except Exception as exc:  # a library that cannot run here is reported, not fatal
            print(f"{lib.name} {version}: FAILED: {type(exc).__name__}: {exc}")
            continue
        print(f"{lib.name}: walk: {sum(t is not None for t in r['texts'])}/{BATCH} finished, {r['tokens']:.1f} "
              f"tokens per output with EOS, first: {r['texts'][0]}")
        if hasattr(lib, "cache_hit_ms"):
            print(f"  (xgrammar's repeat compile when served from its cache: {lib.cache_hit_ms:.2f} ms)")
        if forced is None and None not in r["texts"]:  # the replay's sequences: the first complete walk's outputs
            forced = [[*tok.encode(t, add_special_tokens=False), EOS] for t in r["texts"]]
        rows.append((lib, version, r))
    if forced is None:
        raise SystemExit("no library finished all 16 walks: nothing to replay")
    for lib, _, r in rows:
        replays = [walk(lib, tok, schema, vocab, forced) for _ in range(REPLAYS)]
        r.update(rmask=[x for w in replays for x in w["mask"]], rbatch=[x for w in replays for x in w["batch"]])
    base = next((r for lib, _, r in rows if lib.name == "llguidance"), None)
    print(f"\nvocab {vocab}, batch {BATCH}, {STEPS} steps, replay {max(map(len, forced))} steps x {REPLAYS}, "
          f"{torch.get_num_threads()} CPU threads")
    cols = [("library", "<14"), ("version", "<9"), ("1st ms", ">8"), ("rep ms", ">8"), ("mask", ">8"), ("p90", ">8"),
            ("batchAPI", ">9"), ("walk", ">8"), ("w.p90", ">8"), ("advance", ">8"), ("matcher", ">8"),
            ("valid", ">7"), ("vs llg", ">11")]
    print("".join(f"{c:{f}}" for c, f in cols))
    for lib, version, r in rows:
        cells = [lib.name, version, f"{r['first']:.1f}", f"{r['repeat']:.1f}", f"{pct(r['rmask'], 50):.1f}",
                 f"{pct(r['rmask'], 90):.1f}", f"{pct(r['rbatch'], 50):.1f}" if r["rbatch"] else "-",
                 f"{pct(r['mask'], 50):.1f}", f"{pct(r['mask'], 90):.1f}", f"{pct(r['adv'], 50):.1f}",
                 f"{r['new_us']:.1f}", f"{r['valid']}/{BATCH}",
                 "/".join(f"{pct(r['rmask'], q) / pct(base['rmask'], q):.2f}" for q in (50, 90)) if base else "-"]
        print("".join(f"{c:{f}}" for c, (_, f) in zip(cells, cols, strict=True)))
    print("mask, p90: the replay (identical states for all); batchAPI: the library's batch call in the replay;\n"
          "walk, w.p90: the library's own (first, cold) walk; all µs per sequence-step, median unless p90, as is\n"
          "advance (own walk); matcher: µs to make one from the compiled grammar; valid: the own walk's finished\n"
          "outputs that are schema-valid JSON; vs llg: replay mask time over llguidance's, median/p90.")


if __name__ == "__main__":
    main()
