"""Build the image-text toy world: the text build's guarantees around :mod:`image_world`'s training.

As in :mod:`safesearch.toyworld.build`, every stage is trained into a temporary directory and renamed into
place with a marker (``toyworld.json``) naming what its weights are a function of; a rebuild reuses every
stage whose marker matches and retrains the rest, and the quick check (:mod:`image_quickcheck`) is written
to ``quickcheck.json`` beside the stages, reused while the weights and the item count are unchanged. The
typed images are rendered only when some stage has to be trained.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from safesearch.toyworld import image_world as iw
from safesearch.toyworld.build import (
    WEIGHTS,
    cached_quick_check,
    prepare_out,
    save_stage,
    sha256_file,
    stage_complete,
)
from safesearch.toyworld.data import make_records, write_records
from safesearch.toyworld.image_quickcheck import ImageCheckRow, check_stage
from safesearch.toyworld.profiles import Progress

MODALITY = "image-text"


@dataclass(frozen=True)
class ImageBuildResult:
    out: Path
    quickcheck: list[ImageCheckRow]
    seconds: dict[str, float]  # per stage (0.0 where reused), plus "data" and "tower" when they ran
    reused: list[str]
    examples: dict[str, tuple[int, int]] = field(default_factory=dict)  # trained stage: (text, image) examples


def expected_marker(stage: str, parent: str | None, seed: int, profile: iw.ImageProfile, out: Path) -> dict:
    """What a stage's weights are a function of: the seed, the profile's shapes and data sizes, the stage's
    own recipe, the FigStep style its images are drawn in, and its parent's weights."""
    knobs = {k: v for k, v in asdict(profile).items() if k not in ("name", "recipes", "check_items")}
    return {
        "stage": stage,
        "seed": seed,
        "modality": MODALITY,
        "profile": knobs,
        "recipe": asdict(profile.recipes[stage]),
        "figstep": asdict(iw.FIGSTEP_STYLE),
        "parent": parent,
        "parent_sha256": sha256_file(out / parent / WEIGHTS) if parent else None,
    }


class _Data:
    """The processor, every stage's examples and the rendered images, made on first use only."""

    def __init__(self, records, seed: int, profile: iw.ImageProfile, progress: Progress) -> None:
        self.records, self.seed, self.profile, self.progress = records, seed, profile, progress
        self.seconds: float | None = None
        self.processor = iw.make_processor(records, seed, profile.vision)
        self._pairs: dict[str, list[iw.ImagePair]] | None = None
        self._store: iw.PixelStore | None = None

    def ready(self) -> tuple[dict[str, list[iw.ImagePair]], iw.PixelStore]:
        if self._pairs is None or self._store is None:
            start = time.perf_counter()
            self._pairs = {name: iw.stage_examples(name, self.records, self.seed, self.profile) for name, _ in iw.STAGES}
            self._store = iw.PixelStore(self.processor.image_processor, self.profile.vision, self.processor.tokenizer)
            self._store.add_all([p.typed for ps in self._pairs.values() for p in ps if p.typed is not None])
            self.seconds = time.perf_counter() - start
            self.progress.message(f"rendered {len(self._store.rows)} typed images in {self.seconds:.1f} s")
        return self._pairs, self._store


def build_image_world(
    out: Path | str,
    seed: int = 0,
    profile: iw.ImageProfile | str = "full",
    progress: Progress | None = None,
    *,
    quick_check: bool = True,
) -> ImageBuildResult:
    """Build (or complete) the image-text world at ``out``: ``out/{base,aligned,unaligned,medical}`` and
    the world's records in ``out/data``; a function of ``seed`` and ``profile`` alone."""
    profile = iw.image_profile_named(profile)
    progress = progress or Progress()
    transformers.utils.logging.disable_progress_bar()
    out = Path(out)
    prepare_out(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(iw.THREADS)  # the same seed gives the same bytes only at a fixed thread count
    try:
        records = make_records(seed)
        write_records(records, out / "data")
        data = _Data(records, seed, profile, progress)
        seconds: dict[str, float] = {}
        reused: list[str] = []
        examples: dict[str, tuple[int, int]] = {}
        for name, parent in iw.STAGES:
            marker = expected_marker(name, parent, seed, profile, out)
            if stage_complete(out / name, marker):
                reused.append(name)
                seconds[name] = 0.0
                progress.stage_done(name, 0.0, reused=True)
                continue
            pairs, store = data.ready()
            start = time.perf_counter()
            model, tower_seconds = _train_stage(name, parent, out, pairs[name], store, data.processor, seed,
                                                profile, progress, examples)
            if tower_seconds is not None:
                seconds["tower"] = tower_seconds
            save_stage(model, data.processor.tokenizer, out / name, marker, processor=data.processor)
            seconds[name] = time.perf_counter() - start
            progress.stage_done(name, seconds[name], reused=False)
        if data.seconds is not None:
            seconds["data"] = data.seconds
    finally:
        torch.set_num_threads(threads)
    rows = run_image_quick_check(out, progress, profile.check_items) if quick_check else []
    return ImageBuildResult(out, rows, seconds, reused, examples)


def _train_stage(name, parent, out, pairs, store, processor, seed, profile, progress, examples):
    """Train one stage from its parent (base: from scratch, its tower first taught to name the glyphs of
    each patch); returns the model and the tower's pretraining seconds (None for other stages)."""
    stage_seed = iw.stage_seed(seed, name)
    recipe = profile.recipes[name]
    head, tower_seconds = None, None
    if parent is None:
        model = iw.new_model(profile, processor.tokenizer, stage_seed)
        head, tower_seconds = iw.pretrain_tower_of(model, store, profile, stage_seed, progress)
    else:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(out / parent, dtype=torch.float32)
    encoded = iw.encode(processor, pairs, store, profile.vision.tokens)
    examples[name] = (sum(e.image is None for e in encoded), sum(e.image is not None for e in encoded))
    progress.stage_started(name, recipe.steps)
    iw.train(model, encoded, store, recipe, stage_seed, processor.tokenizer.pad_token_id,
             on_step=lambda _i, loss: progress.step(name, loss), head=head)
    return model, tower_seconds


def run_image_quick_check(out: Path, progress: Progress | None = None, items: int | None = None) -> list[ImageCheckRow]:
    """The image-text world's quick check (:func:`build.cached_quick_check` with
    :func:`image_quickcheck.check_stage`)."""
    return cached_quick_check(out, [name for name, _ in iw.STAGES], items, ImageCheckRow, check_stage, progress,
                              modality=MODALITY)


def weights_digests(out: Path | str) -> dict[str, str]:
    """The sha256 of every stage's weights at ``out``: two builds of one seed must agree byte for byte."""
    return {name: sha256_file(Path(out) / name / WEIGHTS) for name, _ in iw.STAGES}
