"""Each compression recipe end to end on a tiny random Llama: the artifact's shapes, its manifest,
and that reloading it (as a worker would, through `load_model`) gives the very model that was measured."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from streamer.compress import distil, prune, smooth
from streamer.compress.corpus import event_texts
from streamer.compress.errors import CompressError
from streamer.compress.gate import Bounds
from streamer.compress.lowrank import LowRankLinear
from streamer.compress.manifest import Manifest
from streamer.compress.measure import _until_eos
from streamer.compress.pipeline import CompressOptions, compress
from streamer.compress.quantize import GatedMLP, Int8Embedding, Int8Linear, ProjectionSlice, fuse_projections
from streamer.models.loader import load_model
from tests.tiny import CHARS, SPECIALS, save_tiny_llama

OPEN_GATE = Bounds(max_ppl_ratio=1e9, min_agreement=0.0)
CORPUS_TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny"),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": CORPUS_TEXT}) for _ in range(4)) + "\n")
    return path


def run(tiny_dir: Path, out: Path, recipes: list[str], **options: Any) -> Manifest:
    options = {"bounds": OPEN_GATE, "eval_prompts": 4, "device": "cpu", "progress": False, **options}
    outcome = compress(tiny_dir, CompressOptions(recipes=recipes, out=out, **options))
    assert outcome.published
    return Manifest.read(out)


def logits(model: nn.Module, text: str = "hello world") -> torch.Tensor:
    ids = torch.tensor([[len(SPECIALS) + CHARS.index(c) for c in text]])
    with torch.inference_mode():
        return model(input_ids=ids).logits


def assert_reloads_identically(out: Path) -> None:
    """The worker's loader twice gives the same logits: the artifact fully determines the model."""
    first, second = load_model(out, device="cpu"), load_model(out, device="cpu")
    assert torch.equal(logits(first.model), logits(second.model))
    assert first.manifest == Manifest.read(out).model_dump(mode="json")
    recipe = "+".join(step["recipe"] for step in first.manifest["steps"])
    assert first.name == f"{out.name} ({recipe} of {Path(first.manifest['source']).name})"


def test_int8_dynamic_swaps_every_linear_and_embedding_fuses_shared_inputs_and_reloads(tiny_dir, tmp_path):
    manifest = run(tiny_dir, tmp_path / "int8", ["int8-dynamic"])

    assert manifest.weights == "model.safetensors" and (tmp_path / "int8" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "int8", device="cpu")
    modules = list(loaded.model.modules())
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in modules)
    # per block: one q/k/v Linear, o_proj, one gate/up Linear, down_proj; then the head
    assert sum(isinstance(m, Int8Linear) for m in modules) == 4 * 4 + 1
    assert sum(isinstance(m, Int8Embedding) for m in modules) == 1
    head, embedding = loaded.model.get_output_embeddings(), loaded.model.get_input_embeddings()
    assert head.weight is embedding.weight and head.scales is embedding.scales  # still tied, stored once
    assert manifest.steps[0].structure["fused"] == [
        f"model.layers.{i}.{part}" for i in range(4) for part in ("self_attn", "mlp")
    ]
    assert manifest.figures.params == manifest.source_figures.params
    assert manifest.figures.resident_bytes < 0.3 * manifest.source_figures.resident_bytes
    assert_reloads_identically(tmp_path / "int8")


def test_an_int8_dynamic_artifact_of_an_older_layout_is_refused_with_a_clear_error(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path / "int8", ["int8-dynamic"])
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    manifest["steps"][0]["structure"] = {"int8_weight_only": ["lm_head"]}
    (tmp_path / "int8" / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(Exception, match="compressed by an older streamer"):
        load_model(tmp_path / "int8", device="cpu")


def test_int8_linear_stays_close_to_float_per_token_and_reloads_from_its_state_dict():
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 48), torch.randn(2, 5, 64)
    x[0, 0] *= 100  # one loud token does not crush the others: scales are per token
    module = Int8Linear.from_float(linear)
    with torch.inference_mode():
        out, expected = module(x), linear(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    assert module.weight.dtype == torch.int8 and not module.weight.requires_grad
    for token in range(5):
        assert (out[1, token] - expected[1, token]).norm() < 0.02 * expected[1, token].norm()
    reloaded = Int8Linear(64, 48, bias=True)
    reloaded.load_state_dict(module.state_dict())
    with torch.inference_mode():
        assert torch.equal(reloaded(x), out)


def test_int8_embedding_rows_stay_close_to_float():
    torch.manual_seed(0)
    embedding, ids = nn.Embedding(100, 32), torch.tensor([[3, 99, 0]])
    quantized = Int8Embedding.from_float(embedding)
    assert quantized.weight.dtype == torch.int8
    assert torch.allclose(quantized(ids), embedding(ids), atol=embedding.weight.abs().max().item() / 127)


def test_fused_projections_compute_exactly_what_the_separate_ones_did(tiny_dir):
    model = load_model(tiny_dir, device="cpu").model
    before = logits(model)

    fused = fuse_projections(model)

    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert fused == [f"model.layers.{i}.{part}" for i in range(4) for part in ("self_attn", "mlp")]
    assert isinstance(attention.q_proj, ProjectionSlice) and isinstance(mlp, GatedMLP)
    assert torch.allclose(logits(model), before, atol=1e-5)
    assert attention.qkv._memo is None  # the last reader let the shared output go


def test_smoothing_moves_activation_outliers_into_weights_leaving_the_float_model_unchanged(tiny_dir):
    model = load_model(tiny_dir, device="cpu").model
    norm = model.model.layers[0].input_layernorm
    before = logits(model)
    ids = torch.tensor([[len(SPECIALS) + CHARS.index(c) for c in CORPUS_TEXT[:200]]])

    smooth.smooth(model, ids)

    assert not torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.allclose(logits(model), before, atol=1e-4)


def test_a_topic_corpus_keeps_the_text_of_each_json_event_and_skips_the_rest():
    records = [b'{"id": "a", "text": " hello "}', b"not json", b'["a list"]', b'{"id": "b"}', b'{"text": ""}',
               b'{"text": "world"}']  # fmt: skip
    assert event_texts(records) == ["hello", "world"]


def test_the_reference_answer_ends_at_the_sources_eos():
    assert _until_eos([5, 6, 2, 2, 2], {2}) == [5, 6, 2]
    assert _until_eos([5, 6, 7], {2}) == [5, 6, 7]


def test_magnitude_pruning_zeroes_the_requested_share_and_keeps_it_zero_through_recovery(tiny_dir, corpus, tmp_path):
    manifest = run(tiny_dir, tmp_path / "sparse", ["prune-magnitude"], sparsity=0.6, corpus=corpus, recover_steps=3)

    assert manifest.steps[0].options == {"sparsity": 0.6, "recover_steps": 3, "corpus": str(corpus)}
    model = load_model(tmp_path / "sparse", device="cpu").model
    for linear in prune.decoder_linears(model).values():
        assert (linear.weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    assert_reloads_identically(tmp_path / "sparse")


def test_two_four_pruning_leaves_at_most_two_nonzeros_in_every_group_of_four(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path / "24", ["prune-2:4"])

    model = load_model(tmp_path / "24", device="cpu").model
    assert all(prune.is_two_four(linear.weight) for linear in prune.decoder_linears(model).values())
    if not torch.cuda.is_available():
        with pytest.raises(CompressError, match="CUDA"):
            prune.to_semi_structured(model)


def test_low_rank_reaches_the_target_size_and_the_loader_rebuilds_the_factors(tiny_dir, tmp_path):
    manifest = run(tiny_dir, tmp_path / "lr", ["lowrank"], target_params=0.8)

    ranks = manifest.steps[0].structure["ranks"]
    assert ranks and manifest.figures.params <= 0.8 * manifest.source_figures.params
    model = load_model(tmp_path / "lr", device="cpu").model
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.down.out_features == rank
    assert_reloads_identically(tmp_path / "lr")


def test_low_rank_at_full_energy_reproduces_the_layer():
    linear = nn.Linear(16, 8)
    svd = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    factored = LowRankLinear.from_linear(linear, 8, svd)
    x = torch.randn(3, 16)
    assert torch.allclose(factored(x), linear(x), atol=1e-5)


def test_distilled_student_keeps_half_the_layers_and_composes_with_int8(tiny_dir, corpus, tmp_path):
    manifest = run(
        tiny_dir,
        tmp_path / "student",
        ["distil", "int8-dynamic"],
        corpus=corpus,
        train=distil.TrainOptions(steps=4, batch_size=2, seq_len=32, checkpoint_every=2),
    )

    # without one contiguous block of two layers; the last layer always stays
    assert manifest.steps[0].structure in ({"kept_layers": [0, 3], "teacher_layers": 4},
                                           {"kept_layers": [2, 3], "teacher_layers": 4})  # fmt: skip
    assert manifest.recipe == "distil+int8-dynamic"
    loaded = load_model(tmp_path / "student", device="cpu")
    assert loaded.model.config.num_hidden_layers == 2
    assert not (tmp_path / ".student.checkpoints").exists()  # removed once the artifact is published
    assert_reloads_identically(tmp_path / "student")


def test_the_block_of_layers_dropped_is_the_one_that_changes_the_residual_stream_least():
    torch.manual_seed(0)
    states = [torch.randn(1, 8, 16) for _ in range(7)]  # inputs of layers 0-5, then the last output
    states[4] = states[2] + 0.01 * torch.randn(1, 8, 16)  # layers 2 and 3 barely move their input
    assert distil.redundant_block(states, 2) == 2
    states[6] = states[4].clone()  # a block that would take the last layer is never chosen
    assert distil.redundant_block(states, 2) == 2


def test_distillation_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tiny_dir, corpus, tmp_path):
    teacher = load_model(tiny_dir, device="cpu")
    blocks = distil.token_blocks([CORPUS_TEXT] * 4, teacher.tokenizer, 32)
    options = distil.TrainOptions(steps=4, batch_size=2, seq_len=32, checkpoint_every=2)

    def student() -> nn.Module:
        torch.manual_seed(1)
        return distil.shallow_student(teacher.model, 0.5, blocks[:1])[0]

    straight = student()
    distil.train_kl(straight, teacher.model, blocks, options, progress=False)
    interrupted = student()
    distil.train_kl(
        interrupted,
        teacher.model,
        blocks,
        distil.TrainOptions(**{**options.__dict__, "steps": 2}),
        tmp_path,
        progress=False,
    )
    resumed = student()
    losses = distil.train_kl(resumed, teacher.model, blocks, options, tmp_path, progress=False)

    assert len(losses) == 2  # only the two steps after the checkpoint ran
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_quality_gate_refuses_a_bad_model_unless_forced(tiny_dir, tmp_path):
    strict = Bounds(max_ppl_ratio=1.0, min_agreement=1.01)
    options = {"bounds": strict, "eval_prompts": 4, "device": "cpu", "progress": False}

    refused = compress(tiny_dir, CompressOptions(["lowrank"], tmp_path / "no", target_params=0.8, **options))
    forced = compress(
        tiny_dir, CompressOptions(["lowrank"], tmp_path / "yes", force=True, target_params=0.8, **options)
    )

    assert not refused.published and not (tmp_path / "no").exists()
    assert refused.manifest.gate.reasons and not refused.manifest.gate.passed
    assert forced.published and Manifest.read(tmp_path / "yes").gate.forced


def test_the_report_prints_every_artifact_in_a_folder_side_by_side(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from streamer.cli import app

    run(tiny_dir, tmp_path / "a", ["prune-2:4"])
    run(tiny_dir, tmp_path / "b", ["lowrank"], target_params=0.8)

    printed = CliRunner().invoke(app, ["compress", "--report", str(tmp_path)], env={"COLUMNS": "200"})
    assert printed.exit_code == 0, printed.output
    assert "prune-2:4" in printed.output and "lowrank" in printed.output
    assert printed.output.count("greedy agreement") == 1


@pytest.mark.parametrize(
    ("recipes", "message"),
    [
        ([], "at least one"),
        (["shrink"], "unknown recipe"),
        (["int8-dynamic", "lowrank"], "must come last"),
        (["lowrank", "distil"], "distil must come first"),
        (["distil"], "--corpus"),
        (["int4-weight"], "CUDA"),
    ],
)
def test_impossible_recipe_lists_are_refused_before_any_model_is_loaded(recipes, message, tmp_path):
    if torch.cuda.is_available() and message == "CUDA":
        pytest.skip("a GPU is present")
    with pytest.raises(CompressError, match=message):
        compress(tmp_path / "never-loaded", CompressOptions(recipes=recipes, out=tmp_path / "out"))


def test_a_file_corpus_and_a_topic_corpus_together_are_refused(tmp_path):
    from typer.testing import CliRunner

    from streamer.cli import app

    args = ["compress", "--recipe", "distil", "--corpus", "texts.jsonl", "--corpus-topic", "questions",
            "--out", str(tmp_path / "out")]  # fmt: skip
    refused = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "not both" in refused.output
