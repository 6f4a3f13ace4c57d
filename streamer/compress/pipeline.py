"""One `streamer compress` run: apply the recipes in order, write the artifact, measure it against
the source in the same process, gate it, and publish it only if it passes (or `--force`)."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from streamer.compress import artifact, corpus, distil, lowrank, prune, quantize, smooth
from streamer.compress.corpus import TopicCorpus
from streamer.compress.errors import CompressError, GateFailed
from streamer.compress.evalset import load_eval_set
from streamer.compress.gate import Bounds, check
from streamer.compress.manifest import Manifest, Step, weights_sha256
from streamer.compress.measure import compare
from streamer.models.loader import DEFAULT_CACHE_DIR, LoadedModel, load_model

STRUCTURAL = ("distil", "lowrank", "prune-magnitude", "prune-2:4")
QUANTIZERS = (*quantize.CPU_SCHEMES, *quantize.GPU_SCHEMES)
RECIPES = (*STRUCTURAL, *QUANTIZERS)


@dataclass
class CompressOptions:
    recipes: Sequence[str]
    out: Path
    force: bool = False
    corpus: Path | TopicCorpus | None = None
    target_params: float | None = 0.7
    energy: float | None = None
    sparsity: float = 0.5
    keep_layers: float = 0.5
    recover_steps: int = 0
    train: distil.TrainOptions = field(default_factory=distil.TrainOptions)
    checkpoints: Path | None = None
    bounds: Bounds = field(default_factory=Bounds)
    eval_prompts: int = 200
    device: str = "auto"
    cache_dir: Path = DEFAULT_CACHE_DIR
    progress: bool = True


@dataclass
class Outcome:
    manifest: Manifest
    source_name: str
    published: bool


def validate(options: CompressOptions) -> None:
    """Reject impossible recipe lists before any model is loaded."""
    if not options.recipes:
        raise CompressError(f"give at least one --recipe: {', '.join(RECIPES)}")
    unknown = [r for r in options.recipes if r not in RECIPES]
    if unknown:
        raise CompressError(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    quantizers = [r for r in options.recipes if r in QUANTIZERS]
    if len(quantizers) > 1 or (quantizers and options.recipes[-1] != quantizers[0]):
        raise CompressError("at most one quantization recipe, and it must come last")
    if len(set(options.recipes)) != len(options.recipes):
        raise CompressError("each recipe may appear once")
    if "distil" in options.recipes and options.recipes[0] != "distil":
        raise CompressError("distil must come first (later recipes name the student's layers)")
    for scheme in quantizers:
        if scheme in quantize.GPU_SCHEMES:
            quantize.require_gpu_scheme(scheme)
    if options.out.exists() and (not options.out.is_dir() or any(options.out.iterdir())):
        raise CompressError(f"{options.out} exists and is not empty")
    needs_corpus = "distil" in options.recipes or options.recover_steps > 0
    if needs_corpus and options.corpus is None:
        raise CompressError(
            "distillation and recovery need --corpus (a JSONL file with a 'text' field, or .txt) or --corpus-topic"
        )


def compress(source: Path | None, options: CompressOptions) -> Outcome:
    """Run the recipes; the outcome's manifest holds the figures as measured and the gate's verdict."""
    validate(options)
    loaded = load_model(source, device=options.device, cache_dir=options.cache_dir)
    source_dir = loaded.directory
    texts = corpus.read(options.corpus) if options.corpus is not None else []
    model = copy.deepcopy(loaded.model)
    steps = []
    for recipe in options.recipes:
        model, step = _apply(recipe, model, loaded, texts, options)
        steps.append(step)
    manifest = Manifest(
        source=str(source) if source is not None else loaded.name,
        source_sha256=weights_sha256(source_dir),
        steps=steps,
        weights=artifact.SAFETENSORS,
        versions={"torch": torch.__version__, "transformers": _transformers_version()},
    )
    tmp = options.out.parent / f".tmp-{options.out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    artifact.save(model, loaded.tokenizer, manifest, tmp)
    del model
    reloaded, _ = artifact.load(tmp, loaded.device, loaded.dtype)
    evalset = load_eval_set().limited(options.eval_prompts)
    source_figures, figures = compare(
        loaded.model, reloaded, loaded.tokenizer, evalset, source_dir, tmp, options.progress
    )
    manifest.source_figures, manifest.figures = source_figures, figures
    manifest.gate = check(source_figures, figures, options.bounds, options.force)
    manifest.write(tmp)
    outcome = Outcome(manifest, loaded.name, published=False)
    if not manifest.gate.passed and not options.force:
        shutil.rmtree(tmp, ignore_errors=True)
        return outcome
    artifact.publish(tmp, options.out)
    shutil.rmtree(_checkpoint_dir(options), ignore_errors=True)
    outcome.published = True
    return outcome


def gate_error(manifest: Manifest) -> GateFailed:
    reasons = "; ".join(manifest.gate.reasons) if manifest.gate else "not measured"
    return GateFailed(f"quality gate failed: {reasons}; nothing written (rerun with --force to keep it)")


def _apply(
    recipe: str, model: nn.Module, loaded: LoadedModel, texts: list[str], options: CompressOptions
) -> tuple[nn.Module, Step]:
    """One recipe on `model` (in place where possible); returns the model to go on with and its step."""
    match recipe:
        case "distil":
            calibration = corpus.one_row(texts, loaded.tokenizer, distil.CALIBRATION_TOKENS, loaded.device)
            student, structure = distil.shallow_student(model, options.keep_layers, calibration)
            _train(student, loaded, texts, options, options.train, recipe)
            return student, Step(
                recipe=recipe,
                options={
                    "keep_layers": options.keep_layers,
                    "steps": options.train.steps,
                    "corpus": str(options.corpus),
                },
                structure=structure,
            )
        case "lowrank":
            structure = lowrank.factorize(
                model,
                energy=options.energy,
                target_fraction=None if options.energy else options.target_params,
                calibration=lowrank.calibration_ids(loaded.tokenizer, texts or corpus.default_texts()),
            )
            _recover(model, loaded, texts, options, recipe)
            return model, Step(
                recipe=recipe,
                options=_recovery_options(options, energy=options.energy, target_params=options.target_params),
                structure=structure,
            )
        case "prune-magnitude" | "prune-2:4":
            two_four = recipe == "prune-2:4"
            masks = prune.two_four_masks(model) if two_four else prune.magnitude_masks(model, options.sparsity)
            prune.apply_masks(model, masks)
            _recover(model, loaded, texts, options, recipe, after_step=lambda: prune.apply_masks(model, masks))
            sparsity = 0.5 if two_four else options.sparsity
            return model, Step(recipe=recipe, options=_recovery_options(options, sparsity=sparsity))
        case "int8-dynamic":
            calibration = corpus.one_row(
                texts or corpus.default_texts(), loaded.tokenizer, smooth.CALIBRATION_TOKENS, loaded.device
            )
            smooth.smooth(model, calibration)
            fused = quantize.int8_dynamic(model)
            return model, Step(
                recipe=recipe,
                options={
                    "smooth_alpha": smooth.ALPHA,
                    "calibration": str(options.corpus) if texts else "pydoc_data.topics",
                },
                structure={"layout": quantize.LAYOUT, "fused": fused},
            )
        case _:  # GPU schemes are applied when the artifact is loaded on its device
            return model, Step(
                recipe=recipe, options={"group_size": quantize.INT4_GROUP_SIZE} if recipe == "int4-weight" else {}
            )


def _recovery_options(options: CompressOptions, **extra) -> dict:
    corpus_name = {"corpus": str(options.corpus)} if options.recover_steps > 0 else {}
    return {**extra, "recover_steps": options.recover_steps, **corpus_name}


def _recover(
    model: nn.Module, loaded: LoadedModel, texts: list[str], options: CompressOptions, recipe: str, after_step=None
) -> None:
    if options.recover_steps > 0:
        train = distil.TrainOptions(**{**options.train.__dict__, "steps": options.recover_steps})
        _train(model, loaded, texts, options, train, recipe, after_step)


def _train(student, loaded: LoadedModel, texts, options: CompressOptions, train, recipe: str, after_step=None) -> None:
    """KL training towards the source; checkpoints per recipe so composed recipes resume separately."""
    blocks = distil.token_blocks(texts, loaded.tokenizer, train.seq_len)
    checkpoints = _checkpoint_dir(options) / recipe.replace(":", "-")
    distil.train_kl(student, loaded.model, blocks, train, checkpoints, after_step, options.progress)


def _checkpoint_dir(options: CompressOptions) -> Path:
    return options.checkpoints or options.out.parent / f".{options.out.name}.checkpoints"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
