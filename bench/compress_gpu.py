"""GPU targets of issue 5 on an 8B-shaped Llama (random weights: speed does not depend on them).

- int4 weight-only (torchao, group 128) decode tokens/s at batch 1 vs bf16, target >= 1.8x;
  int8 weight-only and fp8 (Hopper) alongside for the table;
- 2:4 semi-structured sparse Linear (PyTorch kernels) vs dense at batch-64 prefill, target >= 1.2x.

Run (from bench/gpu.sh): python -m bench.compress_gpu [--layers 32] [--new-tokens 64] [--compile]
Writes compress_gpu.md to $OUT (or the current directory) and prints it. Needs CUDA and torchao.
"""

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from streamer.compress import quantize
from streamer.compress.errors import CompressError

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 4096}  # fmt: skip
PREFILL_BATCH, PREFILL_SEQ = 64, 128


def llama_8b_shape(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **LLAMA_8B)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def decode_tokens_per_s(model: torch.nn.Module, new_tokens: int) -> float:
    ids = torch.randint(0, LLAMA_8B["vocab_size"], (1, 32), device="cuda")
    kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": 0}
    model.generate(input_ids=ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids=ids, **kwargs)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def cuda_ms(fn: Callable[[], torch.Tensor], repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


@torch.inference_mode()
def sparse_prefill_rows() -> list[tuple[str, float, float]]:
    """Dense vs 2:4 time for each Linear shape of an 8B block at batch-64 prefill."""
    from torch.sparse import to_sparse_semi_structured

    hidden, inter = LLAMA_8B["hidden_size"], LLAMA_8B["intermediate_size"]
    kv = hidden // LLAMA_8B["num_attention_heads"] * LLAMA_8B["num_key_value_heads"]
    rows = []
    for name, (out_f, in_f) in {"q/o": (hidden, hidden), "k/v": (kv, hidden), "gate/up": (inter, hidden),
                                "down": (hidden, inter)}.items():  # fmt: skip
        weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        groups = weight.reshape(out_f, -1, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        weight = (groups * torch.zeros_like(groups).scatter_(-1, keep, 1)).reshape(out_f, in_f)
        x = torch.randn(PREFILL_BATCH * PREFILL_SEQ, in_f, device="cuda", dtype=torch.bfloat16)
        sparse = to_sparse_semi_structured(weight)
        dense_ms = cuda_ms(lambda w=weight, x=x: torch.nn.functional.linear(x, w))
        sparse_ms = cuda_ms(lambda w=sparse, x=x: torch.nn.functional.linear(x, w))
        rows.append((name, dense_ms, sparse_ms))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's forward first")
    args = parser.parse_args()
    try:
        quantize.require_gpu_scheme("int4-weight")
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = [f"# compress GPU bench ({torch.cuda.get_device_name()}, 8B shape, {args.layers} layers)", "",
             "| decode, batch 1 | tokens/s | vs bf16 |", "| --- | --- | --- |"]  # fmt: skip
    schemes = ["bf16", "int8-weight", "int4-weight"]
    if torch.cuda.get_device_capability() >= (8, 9):
        schemes.append("fp8")
    baseline = None
    for scheme in schemes:
        model = llama_8b_shape(args.layers)
        if scheme != "bf16":
            quantize.apply_gpu(model, scheme)
        if args.compile:
            model.forward = torch.compile(model.forward, mode="max-autotune")
        speed = decode_tokens_per_s(model, args.new_tokens)
        baseline = baseline or speed
        lines.append(f"| {scheme} | {speed:.1f} | {speed / baseline:.2f}x |")
        del model
        torch.cuda.empty_cache()
    lines += ["", "target: int4-weight >= 1.80x bf16", "",
              f"| 2:4 Linear, prefill {PREFILL_BATCH}x{PREFILL_SEQ} | dense ms | 2:4 ms | speed-up |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for name, dense_ms, sparse_ms in sparse_prefill_rows():
        lines.append(f"| {name} | {dense_ms:.3f} | {sparse_ms:.3f} | {dense_ms / sparse_ms:.2f}x |")
    lines += ["", "target: 2:4 >= 1.20x dense"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(os.environ.get("OUT", ".")).joinpath("compress_gpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
