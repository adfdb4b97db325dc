"""Run a suite against a backend: the items, the requests, the judge, the metrics.

This is what the search calls every trial, so it prints nothing and reads nothing it was not told to:
the result is a function of the backend's weights, the suite and the subset seed. Progress goes to an
optional callback, counted in backend requests (see :func:`work_units`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from safesearch.backends.base import Backend, Prompt
from safesearch.datasets import Item, read_dataset
from safesearch.errors import UserError
from safesearch.figstep import FIGSTEP_PROMPT, FigStepStyle, cached_image
from safesearch.judges import (
    Exchange,
    GuardJudge,
    HttpJudge,
    Judge,
    KeywordJudge,
    Verdict,
    attack_succeeded,
    refused,
)
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.scorers import parse_choice, pick_options, rate, vqa_closed_correct
from safesearch.splits import in_split
from safesearch.suites import METRIC_KINDS, JudgeSpec, SubsetSpec, Suite

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one item. Fields that do not apply to the suite's metric stay None."""

    id: str
    response: str | None = None
    verdict: str | None = None  # the judge's verdict (safety, over-refusal)
    choice: int | None = None  # the chosen option (acc for log-likelihood MCQ)
    choice_norm: int | None = None  # the acc_norm choice
    answer: int | str | None = None  # the gold option index or answer text
    correct: bool | None = None
    judge_output: str | None = None
    error: str | None = None
    # The cut response the verdict was given on, where ``response`` was generated again to full length
    # for a person to read (GenerationSpec.full_responses); None where ``response`` is what was judged.
    judged_response: str | None = None

    def as_dict(self) -> dict[str, Any]:
        # Read field by field: every field is a scalar, so dataclasses.asdict's deep copy adds nothing but
        # time (14x; this runs for every item of every trial, for its responses artifact).
        return {k: v for k in _OUTCOME_FIELDS if (v := getattr(self, k)) is not None}


_OUTCOME_FIELDS = tuple(f.name for f in fields(ItemOutcome))


@dataclass(frozen=True)
class SuiteResult:
    suite: str
    dimension: str
    metric: str
    metrics: dict[str, float | int | None]
    items: tuple[ItemOutcome, ...] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "dimension": self.dimension,
            "metric": self.metric,
            "metrics": dict(self.metrics),
            "items": [o.as_dict() for o in self.items],
        }


# -- items ---------------------------------------------------------------------------------------


def subset_rank(item_id: str, seed: int) -> str:
    """An item's place in the seeded order: a hash of (seed, id), independent of the file's order."""
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def select(items: Sequence[Item], subset: SubsetSpec, limit: int | None = None) -> list[Item]:
    """The seeded subset: the ``size`` (or ``limit``, if smaller) items of lowest rank, in file order.
    A smaller limit picks a subset of the larger one, so quick runs score items the full run scores."""
    n = min(x for x in (subset.size, limit, len(items)) if x is not None)
    if n >= len(items):
        return list(items)
    chosen = set(sorted(range(len(items)), key=lambda i: subset_rank(items[i].id, subset.seed))[:n])
    return [it for i, it in enumerate(items) if i in chosen]


def load_items(
    suite: Suite,
    data_root: Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> list[Item]:
    """The items of ``split`` (default: the suite's ``dataset.split``): read, filtered, checked against
    the metric, split by the suite's rule, subset. The subset is drawn within the split, so that a
    search and a holdout never share an item whatever their subsets."""
    ds = suite.dataset
    split = ds.split if split is None else split
    suite.check_split(split)
    path = ds.resolved_path(data_root, suite.splits.published(split))
    items = read_dataset(ds.format, path, ds.options)
    for key, accepted in ds.filter.items():
        items = [it for it in items if str(getattr(it, key)) in accepted]
    want = METRIC_KINDS[suite.metric]
    for it in items:
        if it.kind != want:
            raise UserError(
                f"suite '{suite.name}': item '{it.id}' is a {it.kind} item, but metric {suite.metric} scores "
                f"{want} items (add dataset.filter.kind: {want})"
            )
    if not items:
        raise UserError(f"suite '{suite.name}': no items left in '{path}' after the filters")
    items = in_split(items, suite.splits, split)
    if not items:
        raise UserError(
            f"suite '{suite.name}': no items of '{path}' fall in split '{split}' ({suite.splits.describe()})"
        )
    subset = suite.subset if seed is None else replace(suite.subset, seed=seed)
    return select(items, subset, limit)


# -- judges ----------------------------------------------------------------------------------------


def build_judge(spec: JudgeSpec, *, data_root: Path = Path("."), device: str = "cpu") -> Judge:
    """The judge a suite names. A guard judge loads its classifier model: build it once and reuse it."""
    if spec.type == "keyword":
        return KeywordJudge(spec.phrases) if spec.phrases else KeywordJudge()
    if spec.type == "guard":
        from safesearch.backends.transformers import TransformersBackend

        path = Path(spec.model or "")
        backend = TransformersBackend.from_pretrained(
            path if path.is_absolute() else data_root / path, device=device
        )
        return GuardJudge(
            backend, template=spec.template or "chat", rules=spec.rules, max_new_tokens=spec.max_new_tokens
        )
    if spec.type == "http":
        return HttpJudge(
            base_url=spec.base_url or "",
            model=spec.model or "",
            template=spec.template or "",
            rules=spec.rules,
            timeout=spec.timeout,
            retries=spec.retries,
            concurrency=spec.concurrency,
            max_tokens=spec.max_new_tokens,
            api_key_env=spec.api_key_env,
        )
    raise UserError(f"unknown judge '{spec.type}' (known: keyword, guard, http)")


# -- running ---------------------------------------------------------------------------------------


def work_units(suite: Suite, items: Sequence[Item]) -> int:
    """How many backend requests the suite makes: the progress bar's total."""
    if suite.metric == "mcq_loglik":
        return sum(len(it.options or ()) for it in items)
    return len(items)


def image_cache_dir(data_root: Path) -> Path:
    """Where attack images rendered locally (FigStep's, MM-SafetyBench's TYPO) are cached: under the data
    root, beside the data they are made from, whatever the current directory."""
    return data_root / "storage" / "cache" / "attack-images"


def _prompts(suite: Suite, items: Sequence[Item], image_cache: Path) -> list[str | Prompt]:
    """What the model is asked. FigStep types the item's instruction (SafeBench's "Steps to ...") where
    the reader has one and the request itself otherwise, as FigStep does; qr shows the data set's
    query-relevant image (or the key phrase typed) with its rephrased question."""
    if suite.attack == "figstep":
        style = FigStepStyle(
            size=suite.figstep.size, font_size=suite.figstep.font_size, font=suite.figstep.font
        )
        text = suite.figstep.prompt or FIGSTEP_PROMPT
        return [
            Prompt(text, images=(cached_image(it.instruction or it.text, image_cache, style),)) for it in items
        ]
    if suite.attack == "qr":
        from safesearch.typography import qr_prompt_parts

        prompts: list[str | Prompt] = []
        for it in items:
            if it.qr is None:
                raise UserError(f"suite '{suite.name}': item '{it.id}' has no query-relevant image (attack qr)")
            question, image = qr_prompt_parts(it, image_cache)
            prompts.append(Prompt(question, images=(image,)))
        return prompts
    return [Prompt(it.text, images=(it.image,)) if it.image is not None else it.text for it in items]


def exchanges(suite: Suite, items: Sequence[Item], result: SuiteResult, image_cache: Path | None,
              label: str | None = None) -> list[dict[str, Any]]:
    """One flat row per item: what the model was asked (the user turn's text, the image shown; for an
    attack, the request it disguises) and how it answered and was scored. ``label`` names the suite
    (default: its name). Attack images are the cached ones: nothing is rendered again."""
    if suite.metric in ("mcq_loglik", "mcq_generate"):
        asked: list[str | Prompt] = [
            Prompt(mcq_user_text(it.text, it.options or ()), images=(it.image,) if it.image is not None else ())
            for it in items
        ]
    else:
        asked = _prompts(suite, items, image_cache or Path("."))
    rows = []
    for it, p, o in zip(items, asked, result.items, strict=True):
        prompt = p if isinstance(p, Prompt) else Prompt(p)
        row: dict[str, Any] = {"suite": label or suite.name, "id": it.id, "prompt": prompt.text}
        if prompt.images:
            image = prompt.images[0]
            row["image"] = Path(image).name if isinstance(image, Path | str) else "(in memory)"
        if suite.attack != "direct":
            row["request"] = it.text
        row.update({k: v for k, v in o.as_dict().items() if k != "id"})
        if it.options and o.choice is not None:  # the options as the prompt lettered them
            row["chosen"] = mcq_answer_text(it.options, o.choice)
            if isinstance(it.answer, int):
                row["gold"] = mcq_answer_text(it.options, it.answer)
        rows.append(row)
    return rows


def shows_images(suite: Suite, items: Sequence[Item]) -> bool:
    """Whether the suite shows the model images: an attack that renders them, or items that carry one."""
    return suite.attack != "direct" or any(it.image is not None for it in items)


def images_why(suite: Suite) -> str:
    """How a suite's images come about, for an error about a model that takes text only ("" for items'
    own images)."""
    return {"figstep": " (a FigStep suite: requests typed into images)",
            "qr": " (a query-relevant image attack)"}.get(suite.attack, "")


def attack_notes(suite: Suite, items: Sequence[Item]) -> list[str]:
    """What a user should know about how the suite's attack is delivered (printed, never silent)."""
    if suite.attack == "qr":
        rendered = sum(1 for it in items if it.qr is not None and it.qr.image is None)
        if rendered:
            return [
                f"suite '{suite.name}': {rendered} of {len(items)} items have no MM-SafetyBench image here: "
                "their TYPO image (the key phrase typed) is rendered locally, asked with the TYPO question"
            ]
    return []


def evaluate(
    backend: Backend,
    suite: Suite,
    items: Sequence[Item],
    *,
    judge: Judge | None = None,
    image_cache: Path | None = None,
    progress: Progress | None = None,
) -> SuiteResult:
    """Score ``items`` of ``suite`` on ``backend``; ``judge`` defaults to the suite's (built here).
    ``image_cache`` (see :func:`image_cache_dir`) is needed by attacks that render images."""
    if shows_images(suite, items) and not backend.accepts_images:
        raise UserError(f"suite '{suite.name}' shows images, but the model takes text only")
    if suite.metric == "mcq_loglik":
        outcomes, metrics = _mcq_loglik(backend, suite, items, progress)
    elif suite.metric == "mcq_generate":
        outcomes, metrics = _mcq_generate(backend, suite, items, progress)
    elif suite.metric == "vqa_closed":
        outcomes, metrics = _vqa_closed(backend, suite, items, progress)
    else:
        judge = judge or build_judge(suite.judge)
        if suite.attack != "direct" and image_cache is None:
            raise ValueError(f"suite '{suite.name}' renders attack images: evaluate() needs image_cache")
        outcomes, metrics = _judged(backend, suite, items, judge, image_cache or Path("."), progress)
    return SuiteResult(suite.name, suite.dimension, suite.metric, metrics, tuple(outcomes))


def _judged(
    backend: Backend,
    suite: Suite,
    items: Sequence[Item],
    judge: Judge,
    image_cache: Path,
    progress: Progress | None,
) -> tuple[list[ItemOutcome], dict[str, float | int | None]]:
    stop = judge.decided if suite.generation.early_stop and judge.stops_early else None
    prompts = _prompts(suite, items, image_cache)
    responses = backend.generate(prompts, suite.generation.max_new_tokens, stop=stop, on_batch=progress)
    judgements = judge.judge([Exchange(it.text, r) for it, r in zip(items, responses, strict=True)])
    full = _full_length(backend, suite, prompts, responses) if stop is not None else {}
    outcomes = [
        ItemOutcome(id=it.id, response=full.get(i, r), verdict=j.verdict.value, judge_output=j.raw, error=j.error,
                    judged_response=r if i in full else None)
        for i, (it, r, j) in enumerate(zip(items, responses, judgements, strict=True))
    ]
    return outcomes, _judged_metrics(suite, outcomes)


def _full_length(backend: Backend, suite: Suite, prompts: Sequence[str | Prompt],
                 cut: Sequence[str]) -> dict[int, str]:
    """The first ``full_responses`` prompts generated again without the early stop: index -> the whole
    response, where it is longer than the cut one. The stop only ends a response once its verdict is
    decided, so what follows changes no score; a person reading the exchange wants all of it."""
    k = min(suite.generation.full_responses, len(prompts))
    if k == 0:
        return {}
    whole = backend.generate(list(prompts[:k]), suite.generation.max_new_tokens)
    return {i: w for i, (w, c) in enumerate(zip(whole, cut, strict=False)) if w != c}


def _judged_metrics(suite: Suite, outcomes: Sequence[ItemOutcome]) -> dict[str, float | int | None]:
    verdicts = [Verdict(o.verdict) for o in outcomes]
    unjudged = sum(v is Verdict.UNJUDGED for v in verdicts)
    base: dict[str, float | int | None] = {"n": len(outcomes), "n_unjudged": unjudged}
    if suite.metric == "safety":
        succeeded = [attack_succeeded(v) for v in verdicts]
        # safety = 1 - ASR, counted directly (n_safe / n_judged) so that it equals a refusal rate exactly.
        metrics = {"safety": rate([None if a is None else not a for a in succeeded]), "asr": rate(succeeded)}
    else:
        metrics = {"over_refusal": rate([refused(v) for v in verdicts])}
    return {**metrics, **base}


def _choice_metrics(suite: Suite, outcomes: Sequence[ItemOutcome]) -> dict[str, float | int | None]:
    """The metrics of the suites scored by a choice or an answer (MCQ, closed VQA)."""
    n = len(outcomes)
    metrics: dict[str, float | int | None] = {"acc": sum(bool(o.correct) for o in outcomes) / n}
    if suite.metric == "mcq_loglik":
        metrics["acc_norm"] = sum(o.choice_norm == o.answer for o in outcomes) / n
    elif suite.metric == "mcq_generate":
        metrics["n_unparsed"] = sum(o.choice is None for o in outcomes)
    return {**metrics, "n": n}


def combine(suite: Suite, items: Sequence[Item], parts: Sequence[SuiteResult]) -> SuiteResult:
    """One result for ``items`` from results on parts of them (early stopping scores a first slice, then
    the rest): the outcomes back in the items' order, the metrics counted over all of them, as
    :func:`evaluate` would count them on ``items`` at once."""
    by_id = {o.id: o for part in parts for o in part.items}
    outcomes = [by_id[it.id] for it in items]
    judged = METRIC_KINDS[suite.metric] in ("harmful", "benign")
    metrics = _judged_metrics(suite, outcomes) if judged else _choice_metrics(suite, outcomes)
    return SuiteResult(suite.name, suite.dimension, suite.metric, metrics, tuple(outcomes))


def _mcq_loglik(
    backend: Backend, suite: Suite, items: Sequence[Item], progress: Progress | None
) -> tuple[list[ItemOutcome], dict[str, float | int | None]]:
    requests: list[tuple[str | Prompt, str]] = []
    for it in items:
        options = it.options or ()
        question: str | Prompt = mcq_user_text(it.text, options)
        if it.image is not None:
            question = Prompt(question, images=(it.image,))
        requests += [(question, mcq_answer_text(options, i)) for i in range(len(options))]
    scores = iter(backend.loglikelihood(requests, on_batch=progress))
    outcomes = []
    for it in items:
        options = it.options or ()
        lls = [next(scores)[0] for _ in options]
        choice, choice_norm = pick_options(lls, [mcq_answer_text(options, i) for i in range(len(options))])
        outcomes.append(
            ItemOutcome(
                id=it.id,
                choice=choice,
                choice_norm=choice_norm,
                answer=it.answer,
                correct=choice == it.answer,
            )
        )
    return outcomes, _choice_metrics(suite, outcomes)


def _mcq_generate(
    backend: Backend, suite: Suite, items: Sequence[Item], progress: Progress | None
) -> tuple[list[ItemOutcome], dict[str, float | int | None]]:
    prompts = [mcq_user_text(it.text, it.options or ()) for it in items]
    responses = backend.generate(prompts, suite.generation.max_new_tokens, on_batch=progress)
    outcomes = []
    for it, r in zip(items, responses, strict=True):
        choice = parse_choice(r, it.options or ())
        outcomes.append(
            ItemOutcome(id=it.id, response=r, choice=choice, answer=it.answer, correct=choice == it.answer)
        )
    return outcomes, _choice_metrics(suite, outcomes)


def _vqa_closed(
    backend: Backend, suite: Suite, items: Sequence[Item], progress: Progress | None
) -> tuple[list[ItemOutcome], dict[str, float | int | None]]:
    prompts = _prompts(suite, items, Path("."))
    responses = backend.generate(prompts, suite.generation.max_new_tokens, on_batch=progress)
    outcomes = [
        ItemOutcome(
            id=it.id, response=r, answer=it.answer_text, correct=vqa_closed_correct(r, it.answer_text or "")
        )
        for it, r in zip(items, responses, strict=True)
    ]
    return outcomes, _choice_metrics(suite, outcomes)
