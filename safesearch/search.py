"""The search: a study's trials, each one merge in place plus one evaluation, told to Optuna.

A worker holds one :class:`~safesearch.grafted.GraftedModel` (anchor and vectors resident, loaded once)
and the items of every suite it scores (read once). Per trial: ask (:func:`safesearch.storage.next_trial`,
which keeps the study at exactly ``n_trials`` COMPLETE trials however many workers race), suggest the
coefficients (:class:`SearchSpace`), merge them in place (``grafted.apply``), score the suites on the
search split, record, tell. What a trial records:

- user attrs ``scores`` (objective -> value on the search split), ``constraint_scores`` (constraint ->
  value), ``suites`` (suite@split -> its metrics), ``coefficients`` (the whole table), ``seconds``
  (``merge``, ``eval``), ``worker``; a baseline also ``baseline`` (``zero``, ``lambda=0.5``);
- its constraints through ``trial.set_constraint`` (<= 0 is feasible), which Optuna's samplers read, and
  as the list optuna-dashboard reads (:mod:`safesearch.dashboard`);
- a note (optuna-dashboard's): the baseline it is, scores per suite, coefficients, sample exchanges;
- an artifact ``responses-<trial>.jsonl``: one row per item, its prompt beside its response, verdict or
  chosen option (optuna-dashboard previews it as a table).

The study's objectives name Optuna's values (``set_metric_names``).

With the spec's ``early_stop`` (:mod:`safesearch.earlystop`), a searched trial first scores a slice of
every suite; a hopeless one is told PRUNED there, keeping ``early_stop`` (why, the slice's scores),
``coefficients`` and ``seconds`` as user attrs; the others score the rest and count as above.

Optuna's values are the objectives in the spec's order, or, for ``cmaes-weighted``, their weighted sum
(minimised objectives negated): the front is always read from the ``scores`` attr (:mod:`safesearch.pareto`).

The study keeps its spec (user attr ``spec``, paths absolute) and a fingerprint of its search space; a
worker with a different spec is refused, and ``validate``/``export`` need nothing but the study's name.
Holdout scores (``safesearch validate``) are study user attrs ``holdout.trial.<N>`` (a finished trial
takes no more attrs) and ``holdout.checkpoint.<name>`` for the graft's checkpoints. The items each split
scored are ``items.search`` (set at creation; a worker reading other items is refused) and
``items.holdout`` (set by ``validate``, which first proves the two share no item): n and a digest of the ids.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.trial import TrialState

from safesearch import interrupts
from safesearch.backends.base import Backend
from safesearch.batch import batched, tell
from safesearch.dashboard import (
    record_constraint_list,
    samples_section,
    scores_section,
    trial_note,
)
from safesearch.datasets import Item
from safesearch.earlystop import Measured, hopeless, split_items
from safesearch.errors import UserError
from safesearch.evaluate import (
    SuiteResult,
    build_judge,
    combine,
    evaluate,
    exchanges,
    image_cache_dir,
    images_why,
    load_items,
    shows_images,
    subset_rank,
)
from safesearch.judges import Judge
from safesearch.reconnect import StorageOutage, impatient
from safesearch.splits import ids_digest
from safesearch.storage import BASELINE_ATTR, RetryTrial, count_states, give_up
from safesearch.studyspec import (
    BaselinePoint,
    Constraint,
    Objective,
    StudySpec,
    SuiteRef,
    sampler_class,
    study_spec_from_dict,
)

if TYPE_CHECKING:  # merging loads torch; a study's planning and its errors come before any of it
    from safesearch.merging import Coefficients

SPEC_ATTR = "spec"
FINGERPRINT_ATTR = "fingerprint"
# checkpoint -> file -> [size, mtime_ns, sha256] at the study's creation (see changed_checkpoint_files).
CHECKPOINT_FILES_ATTR = "checkpoint_files"
HOLDOUT_TRIAL = "holdout.trial."
HOLDOUT_CHECKPOINT = "holdout.checkpoint."
# What each split scored: task key -> {suite, split, n, ids_sha256} (see items_record).
SEARCH_ITEMS_ATTR = "items.search"
HOLDOUT_ITEMS_ATTR = "items.holdout"
# How long a joining worker waits for the study's creator to finish setting it up (spec, baselines).
SETUP_WAIT_S = 60.0


# -- the search space ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One Optuna parameter: a coefficient (``vector.group``), a shared scale (``vector.scale``) or a
    per-group factor (``vector.factor.group``)."""

    name: str
    vector: str
    group: str | None
    low: float
    high: float


@dataclass(frozen=True)
class SearchSpace:
    """What a trial suggests and how it becomes a coefficient table.

    ``groups``: vector -> every group (the table's shape); ``params``: the searched parameters;
    ``fixed``: (vector, group) -> constant for ranges [a, a]; ``scaled``: vectors searched as scale x factor.
    """

    groups: dict[str, tuple[str, ...]]
    params: tuple[Param, ...]
    fixed: dict[tuple[str, str], float] = field(default_factory=dict)
    scaled: frozenset[str] = frozenset()

    def distributions(self) -> dict[str, optuna.distributions.FloatDistribution]:
        return {p.name: optuna.distributions.FloatDistribution(p.low, p.high) for p in self.params}

    def suggest(self, trial: optuna.Trial) -> Coefficients:
        return self.coefficients({p.name: trial.suggest_float(p.name, p.low, p.high) for p in self.params})

    def coefficients(self, values: Mapping[str, float]) -> Coefficients:
        """The whole coefficient table for parameter ``values`` (unsearched groups: fixed value or 0)."""
        out: Coefficients = {}
        for v, groups in self.groups.items():
            scale = self._value(values, f"{v}.scale", (v, "*scale")) if v in self.scaled else 1.0
            row = {}
            for g in groups:
                name = f"{v}.factor.{g}" if v in self.scaled else f"{v}.{g}"
                row[g] = scale * self._value(values, name, (v, g))
            out[v] = row
        return out

    def _value(self, values: Mapping[str, float], name: str, key: tuple[str, str]) -> float:
        if name in values:
            return float(values[name])
        return self.fixed.get(key, 0.0)

    def baseline_params(self, spec: StudySpec) -> list[tuple[str, dict[str, float]]]:
        """(label, params) of the baselines: all zeros, the global-lambda grid, then the other grids and
        the user's own points (``baselines.enqueue``), in the spec's order."""
        b = spec.baselines
        points = [("baselines.zero", BaselinePoint("zero", ()))] if b.zero else []
        points += [(f"baselines.global_lambda ({b.lambda_vector} = {x:g})",
                    BaselinePoint(f"lambda={x:g}", ((b.lambda_vector, None, x),)))
                   for x in b.lambda_values if b.lambda_vector is not None]
        points += [(f"baselines {p.label!r}", p) for p in b.points]
        return [(p.label, self._point(p, where)) for where, p in points]

    def _point(self, b: BaselinePoint, where: str) -> dict[str, float]:
        """The params of a baseline point (``where`` names it in errors): each searched group of a vector at
        the point's value, every vector it does not name at 0; a scaled vector takes the value as its scale,
        factors 1 (per-group values on a scaled vector are refused by the spec). A group the search fixes
        keeps its value under one value for the whole vector (as a global lambda sets every searched
        group), and must be given that value by per-group values that name it; any value outside its
        parameter's range is refused rather than clipped."""
        per_group = {v for v, pattern, _ in b.values if pattern is not None}
        for (v, g), fixed in self.fixed.items():
            if v in per_group and b.value(v, g) != fixed:
                raise UserError(f"{where}: group {g} of {v} is fixed at {fixed:g} by search.{v}; "
                                f"the baseline needs {b.value(v, g):g} there")
        named = {v: x for v, _, x in b.values}
        params = {}
        for p in self.params:
            if p.vector in self.scaled:
                value = named.get(p.vector, 0.0) if p.group is None else 1.0
            else:
                value = b.value(p.vector, p.group or "")
            if not p.low <= value <= p.high:
                raise UserError(f"{where}: parameter {p.name} would be {value:g}, outside its range "
                                f"[{p.low:g}, {p.high:g}] (widen search.{p.vector} or drop the baseline)")
            params[p.name] = value
        return params

    def bounds(self) -> Coefficients:
        """Vector -> group -> the largest magnitude its coefficient can take (for overflow checks)."""
        def peak(p: Param) -> float:
            return max(abs(p.low), abs(p.high))

        out: Coefficients = {}
        for v, groups in self.groups.items():
            scale = 1.0
            if v in self.scaled:
                scale = next((peak(p) for p in self.params if p.vector == v and p.group is None),
                             abs(self.fixed.get((v, "*scale"), 0.0)))
            row = {g: abs(self.fixed.get((v, g), 0.0)) for g in groups}
            for p in self.params:
                if p.vector == v and p.group is not None:
                    row[p.group] = peak(p)
            out[v] = {g: scale * c for g, c in row.items()}
        return out


def build_space(spec: StudySpec, groups: Mapping[str, Sequence[str]], active: Mapping[str, Sequence[str]]) -> SearchSpace:
    """The search space of ``spec`` over the merger's groups (``active``: the groups a vector touches;
    the others keep 0 and are not searched)."""
    params: list[Param] = []
    fixed: dict[tuple[str, str], float] = {}
    scaled = set()
    for v, s in spec.search.items():
        if s.scale is not None:
            scaled.add(v)
            if s.scale.fixed:
                fixed[(v, "*scale")] = s.scale.low
            else:
                params.append(Param(f"{v}.scale", v, None, s.scale.low, s.scale.high))
        for g in active.get(v, ()):
            r = s.range_of(g)
            name = f"{v}.factor.{g}" if s.scale is not None else f"{v}.{g}"
            if r.fixed:
                fixed[(v, g)] = r.low
            else:
                params.append(Param(name, v, g, r.low, r.high))
    return SearchSpace({v: tuple(gs) for v, gs in groups.items()}, tuple(params), fixed, frozenset(scaled))


# -- scoring --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """One suite on one split and subset, its items read and its judge built once."""

    key: str
    suite: Any  # safesearch.suites.Suite with the split and subset applied
    items: list[Item]
    judge: Judge | None
    image_cache: Path | None = None  # where its attack images are rendered (the data root's cache)

    @property
    def ids_digest(self) -> str:
        return ids_digest(it.id for it in self.items)


def task_key(ref: SuiteRef) -> str:
    return f"{ref.name}@{ref.split}" + (f"[{ref.subset}]" if ref.subset is not None else "")


def prepare_tasks(
    refs: Sequence[SuiteRef], data_root: Path, *, device: str = "cpu", judges: bool = True
) -> dict[str, Task]:
    """Read every suite's items once (deduplicated by suite, split and subset), then build their judges
    (``judges=False``: the items alone, e.g. to compare splits, or to check the data before torch loads:
    reading items needs no torch, a guard judge does)."""
    tasks: dict[str, Task] = {}
    for ref in refs:
        key = task_key(ref)
        if key in tasks:
            continue
        suite = ref.suite
        suite = replace(
            suite,
            dataset=replace(suite.dataset, split=ref.split),
            subset=replace(suite.subset, size=ref.subset),
        )
        items = load_items(suite, data_root, split=ref.split)
        tasks[key] = Task(key, suite, items, None, image_cache_dir(data_root))
    return build_judges(tasks, data_root, device=device) if judges else tasks


def build_judges(tasks: Mapping[str, Task], data_root: Path, *, device: str = "cpu") -> dict[str, Task]:
    """``tasks`` with their suites' judges built, one per judge spec (a guard judge loads its classifier
    model: built once, shared by every task that names it)."""
    built: dict[Any, Judge] = {}
    out: dict[str, Task] = {}
    for key, t in tasks.items():
        if t.judge is None and t.suite.uses_judge:
            if t.suite.judge not in built:
                built[t.suite.judge] = build_judge(t.suite.judge, data_root=data_root, device=device)
            t = replace(t, judge=built[t.suite.judge])
        out[key] = t
    return out


def exchange_rows(task: Task, result: SuiteResult) -> list[dict[str, Any]]:
    """The task's exchanges (:func:`safesearch.evaluate.exchanges`), named by the task's key."""
    return exchanges(task.suite, task.items, result, task.image_cache, label=task.key)


def items_record(tasks: Mapping[str, Task]) -> dict[str, dict[str, Any]]:
    """What each task scores, as a study keeps it: the suite, the split, n and the ids' digest."""
    return {
        key: {"suite": t.suite.name, "split": t.suite.dataset.split, "n": len(t.items), "ids_sha256": t.ids_digest}
        for key, t in tasks.items()
    }


def search_items(spec: StudySpec) -> dict[str, dict[str, Any]]:
    """:func:`items_record` of the spec's search split, read from this machine's data."""
    return items_record(prepare_tasks(search_refs(spec), spec.data_root, judges=False))


def check_same_items(recorded: Mapping[str, Any], found: Mapping[str, Any], why: str) -> None:
    """Refuse when the items read here are not those a study recorded (a changed data file, another
    split rule, another copy of a benchmark on this machine): ``why`` says what would go wrong."""
    for key, rec in recorded.items():
        now = found.get(key)
        if now is not None and now["ids_sha256"] != rec["ids_sha256"]:
            raise UserError(
                f"suite '{rec['suite']}' (split {rec['split']}): the items read here ({now['n']}) are not the "
                f"{rec['n']} the study searched (another data file or split rule); {why}"
            )


def check_disjoint(search: Mapping[str, Task], holdout: Mapping[str, Task]) -> list[str]:
    """One line per suite with its n per split; a UserError naming the suite when its holdout items
    share an id with its search items (the holdout would re-score what the search optimised on)."""
    lines = []
    for name in dict.fromkeys(t.suite.name for t in holdout.values()):
        searched = [t for t in search.values() if t.suite.name == name]
        held = [t for t in holdout.values() if t.suite.name == name]
        s_ids = {it.id for t in searched for it in t.items}
        h_ids = {it.id for t in held for it in t.items}
        shared = s_ids & h_ids
        s_split = ", ".join(dict.fromkeys(t.suite.dataset.split for t in searched)) or "-"
        h_split = ", ".join(dict.fromkeys(t.suite.dataset.split for t in held))
        if shared:
            raise UserError(
                f"suite '{name}': its holdout split ({h_split}) shares {len(shared)} of its {len(h_ids)} items "
                f"with the search split ({s_split}), e.g. '{min(shared)}': validation would re-score searched "
                f"items ({held[0].suite.splits.describe()})"
            )
        lines.append(f"suite {name}: search {len(s_ids)} items ({s_split}), holdout {len(h_ids)} items "
                     f"({h_split}), none shared; {held[0].suite.splits.describe()}")
    return lines


def run_tasks(backend: Backend, tasks: Mapping[str, Task]) -> dict[str, SuiteResult]:
    return {
        key: evaluate(backend, t.suite, t.items, judge=t.judge, image_cache=t.image_cache)
        for key, t in tasks.items()
        if t.items
    }


def sliced(tasks: Mapping[str, Task], fraction: float) -> tuple[dict[str, Task], dict[str, Task]]:
    """(each task on its first ``fraction`` of items, each task on the rest): early stopping's two
    stages (:func:`safesearch.earlystop.split_items`, the items' seeded order)."""
    first, rest = {}, {}
    for key, t in tasks.items():
        a, b = split_items([subset_rank(it.id, t.suite.subset.seed) for it in t.items], fraction)
        first[key] = replace(t, items=[t.items[i] for i in a])
        rest[key] = replace(t, items=[t.items[i] for i in b])
    return first, rest


def pooled_n(x: Objective | Constraint, results: Mapping[str, SuiteResult], holdout: bool = False) -> tuple[float, float]:
    """(the metric pooled over the suites, each weighted by the items it judged; the items judged)."""
    total = weight = 0.0
    for ref in x.holdout if holdout else x.suites:
        m = results[task_key(ref)].metrics
        value = m.get(x.metric)
        n = float(m.get("n") or 0) - float(m.get("n_unjudged") or 0)
        if value is None or n <= 0:
            continue
        total += float(value) * n
        weight += n
    return (total / weight if weight else math.nan), weight


def pooled(x: Objective | Constraint, results: Mapping[str, SuiteResult], holdout: bool = False) -> float:
    """The objective's metric pooled over its suites (each weighted by the items it judged)."""
    return pooled_n(x, results, holdout)[0]


def score_all(spec: StudySpec, results: Mapping[str, SuiteResult], holdout: bool = False) -> dict[str, Any]:
    """Objectives, constraint scores and Optuna's constraint values. On the search split a constraint with
    a ``confidence`` is checked on its Wilson bound over the items judged; on holdout on the rate itself."""
    scores = {o.name: pooled(o, results, holdout) for o in spec.objectives}
    cons = {c.name: pooled_n(c, results, holdout) for c in spec.constraints}
    return {
        "scores": scores,
        "constraint_scores": {name: rate for name, (rate, _) in cons.items()},
        "constraints": {c.name: c.violation(cons[c.name][0], None if holdout else cons[c.name][1])
                        for c in spec.constraints},
        "suites": {k: dict(r.metrics) for k, r in results.items()},
    }


def constraint_bounds(spec: StudySpec, *, search: bool = True) -> dict[str, str]:
    """Each constraint's bound as words ("max 0.1", on the search split "max 0.1 at 90% confidence" when
    the bound is checked on its Wilson bound), for notes and tables."""
    def words(c: Constraint) -> str:
        bound = f"max {c.max:g}" if c.max is not None else f"min {c.min:g}"
        return bound + (f" at {c.confidence:.0%} confidence" if search and c.confidence is not None else "")

    return {c.name: words(c) for c in spec.constraints}


def feasible(scored: Mapping[str, Any]) -> bool | None:
    """Whether :func:`score_all`'s constraints all hold (None: the spec has none)."""
    violations = scored["constraints"].values()
    return all(v <= 0 for v in violations) if violations else None


def objective_values(spec: StudySpec, scores: Mapping[str, float]) -> list[float]:
    """What Optuna is told: the objectives in order, or for cmaes-weighted their weighted sum (maximised)."""
    if not spec.single_objective:
        return [scores[o.name] for o in spec.objectives]
    sign = {o.name: 1.0 if o.direction == "maximize" else -1.0 for o in spec.objectives}
    return [sum(w * sign[n] * scores[n] for n, w in spec.sampler.weights.items())]


def search_refs(spec: StudySpec) -> list[SuiteRef]:
    return [r for x in (*spec.objectives, *spec.constraints) for r in x.suites]


def holdout_refs(spec: StudySpec) -> list[SuiteRef]:
    return [r for x in (*spec.objectives, *spec.constraints) for r in x.holdout]


# -- the study -------------------------------------------------------------------------------------------


def make_sampler(spec: StudySpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded (``seed`` overrides the spec's, e.g. per worker)."""
    options = dict(spec.sampler.options)
    if spec.sampler.name == "tpe":
        # Parallel workers: a running trial counts as a bad result, so that two workers do not propose
        # the same point at once (no effect with one worker).
        options.setdefault("constant_liar", True)
        # One joint proposal per trial: the per-group coefficients act together, and sampling them
        # jointly reads the study's trials once per trial instead of once per parameter.
        options.setdefault("multivariate", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return sampler_class(spec.sampler.name)(seed=spec.seed if seed is None else seed, **options)


def groups_of(spec: StudySpec, sources: Any = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(every group per vector, the groups each vector touches), from the checkpoints' headers alone
    (``sources``: the spec's checkpoints already opened with :func:`safesearch.vectors.open_sources`)."""
    from safesearch.grouping import group_parameters
    from safesearch.vectors import open_sources, vector_names

    sources = sources or open_sources(spec.graft)
    grouping = group_parameters(sources.anchor.layout.parameters, spec.graft.groups)
    placed = grouping.group_of
    groups = {v: list(grouping.groups) for v in spec.graft.vectors}
    active = {}
    for v, vs in spec.graft.vectors.items():
        hit = {placed[n] for n in vector_names(sources, vs) if n in placed}
        active[v] = [g for g in grouping.groups if g in hit]
    return groups, active


def search_space(spec: StudySpec) -> SearchSpace:
    """The spec's search space over its checkpoints' groups (headers only), with the ranges checked
    against the working dtype: a coefficient beyond its largest finite value can only give inf weights.
    (Workers check the merged weights' range precisely once their tensors are loaded.)"""
    import torch

    from safesearch.merging import anchor_dtype
    from safesearch.vectors import open_sources

    sources = open_sources(spec.graft)
    space = build_space(spec, *groups_of(spec, sources))
    dtype = spec.graft.torch_dtype(anchor_dtype(sources))
    limit = torch.finfo(dtype).max
    for v, row in space.bounds().items():
        worst = max(row.values(), default=0.0)
        if worst > limit:
            raise UserError(f"{spec_where(spec)}: search.{v}: coefficients up to {worst:g} exceed the largest "
                            f"{str(dtype).removeprefix('torch.')} value ({limit:.3g}), the graft's working dtype")
    return space


def spec_where(spec: StudySpec) -> str:
    """How errors name the spec: its file, else the study."""
    return str(spec.source) if spec.source is not None else f"study {spec.name!r}"


def ensure_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, space: SearchSpace, *, sampler_seed: int | None = None,
    create: bool = True, searched: Mapping[str, Any] | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the study (its spec, fingerprint and baselines enqueued) or join it; (study, created).
    ``searched``: :func:`search_items` of ``spec`` when the caller has read them already.

    Creation is race-free: Optuna's unique study name decides who creates, and only the creator enqueues
    the baselines. A joiner waits (up to :data:`SETUP_WAIT_S`) for the creator to finish that setup and
    refuses a study whose directions or search space differ from ``spec``'s.
    """
    from safesearch.storage import mask_url, open_study

    sampler = make_sampler(spec, sampler_seed)
    created = False
    if create:
        try:
            study = optuna.create_study(
                storage=storage, study_name=spec.name, directions=spec.directions, sampler=sampler
            )
            created = True
        except DuplicatedStudyError:
            study = open_study(storage, spec.name, spec.directions, sampler=sampler, create=False)
    else:
        study = open_study(storage, spec.name, spec.directions, sampler=sampler, create=False)
    if created:
        try:
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
            name_metrics(study, spec)
            study.set_user_attr("objectives", spec.objective_directions)
            study.set_user_attr("sampler", spec.sampler.name)
            study.set_user_attr(SEARCH_ITEMS_ATTR, dict(searched) if searched is not None else search_items(spec))
            for label, params in space.baseline_params(spec):
                study.enqueue_trial(params, user_attrs={BASELINE_ATTR: label})
            study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())  # the study is ready for joiners
        except BaseException:
            # Interrupted half-way: a study without its fingerprint would stall every later joiner. Nobody
            # has worked on it yet (joiners wait for the fingerprint), so it goes, and the next run creates it.
            with interrupts.deferred(), contextlib.suppress(Exception):
                optuna.delete_study(study_name=spec.name, storage=storage)
            raise
        # After the fingerprint: hashing a 7B model's files takes a while, and joiners need none of it.
        study.set_user_attr(CHECKPOINT_FILES_ATTR, checkpoint_files(spec))
        return study, True
    deadline = time.monotonic() + SETUP_WAIT_S
    while FINGERPRINT_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise UserError(
                f"study {spec.name!r} in {mask_url(str(getattr(storage, 'url', storage)))} was created but never set up "
                "(its creator stopped early?); delete it or choose another name"
            )
        time.sleep(0.5)
    check_joinable(study, spec, searched)
    if not study.metric_names:  # a study created before its objectives were named
        name_metrics(study, spec)
    return study, False


def name_metrics(study: optuna.Study, spec: StudySpec) -> None:
    """Optuna's values named by the spec's objectives (optuna-dashboard's axes and columns)."""
    from safesearch.dashboard import metric_names

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names(metric_names([o.name for o in spec.objectives], spec.single_objective))


def check_joinable(study: optuna.Study, spec: StudySpec, searched: Mapping[str, Any] | None = None) -> None:
    """Refuse to work on an existing study with ``spec`` when its directions, (once set up) its
    fingerprint or the search items read here (``searched``, else read now) differ: the trials would not
    be comparable."""
    from safesearch.storage import check_directions

    check_directions(study, spec.directions)
    found = study.user_attrs.get(FINGERPRINT_ATTR)
    if found is not None and found != spec.fingerprint():
        raise UserError(
            f"study {spec.name!r} exists with another spec (search space, objectives or sampler differ); "
            "choose another study name or use the spec it was created with"
        )
    recorded = study.user_attrs.get(SEARCH_ITEMS_ATTR)
    if recorded is not None:
        check_same_items(recorded, searched if searched is not None else search_items(spec),
                         f"the trials of study {spec.name!r} would not be comparable: use the same data")


def _used_checkpoints(spec: StudySpec) -> list[str]:
    g = spec.graft
    return list(dict.fromkeys([g.anchor, *(c for v in g.vectors.values() for c in (v.plus, v.minus))]))


def checkpoint_files(spec: StudySpec) -> dict[str, dict[str, list[Any]]]:
    """Size, modification time and sha256 of every file of the checkpoints the spec grafts."""
    from safesearch.checkpoint import sha256_file, top_files

    out: dict[str, dict[str, list[Any]]] = {}
    for name in _used_checkpoints(spec):
        files = top_files(spec.graft.checkpoints[name].path)
        out[name] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns, sha256_file(p)] for p in files}
    return out


def changed_checkpoint_files(study: optuna.Study, spec: StudySpec) -> list[tuple[str, str]]:
    """(checkpoint, file) for every file recorded at the study's creation that is gone or whose sha256
    differs now. A file of the same size and modification time is taken as unchanged (not hashed again)."""
    from safesearch.checkpoint import sha256_file

    changed = []
    for name, files in (study.user_attrs.get(CHECKPOINT_FILES_ATTR) or {}).items():
        if name not in spec.graft.checkpoints:
            continue
        folder = spec.graft.checkpoints[name].path
        if not folder.is_dir():
            continue  # opening it fails, naming it: that error says more than a list of gone files
        for file, (size, mtime_ns, digest) in files.items():
            p = folder / file
            if not p.is_file():
                changed.append((name, f"{file} (gone)"))
                continue
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) and sha256_file(p) != digest:
                changed.append((name, file))
    return changed


def stored_spec(study: optuna.Study) -> StudySpec:
    """The spec a study was created with (as kept in the study)."""
    data = study.user_attrs.get(SPEC_ATTR)
    if data is None:
        raise UserError(f"study {study.study_name!r} was not created by safesearch (it keeps no spec)")
    return study_spec_from_dict(data, where=f"study {study.study_name!r} (stored spec)")


# -- a worker --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: TrialState  # COMPLETE, or PRUNED when early stopping stopped it (``scores``: its first slice's)
    values: list[float] | None
    scores: dict[str, float]
    baseline: str | None
    seconds: dict[str, float]  # ask, suggest, merge, eval, record (attrs, constraints, artifact), tell, total
    stopped: str | None = None  # why early stopping stopped it


@dataclass(frozen=True)
class Stopped:
    """Early stopping's verdict on a trial: why, and what its first slice scored."""

    reason: str
    partial: dict[str, SuiteResult]


def current_front(study: optuna.Study, spec: StudySpec) -> list[tuple[int, dict[str, float]]]:
    """(number, search scores) of the study's current front among its feasible COMPLETE trials: what
    early stopping compares a trial with (nothing while no trial is feasible)."""
    from safesearch.pareto import front, records

    directions = spec.objective_directions
    # Holdout scores play no part: the study's attrs (its spec, every validated score) are not read.
    feasible = [r for r in records(study, holdout=False) if r.feasible and r.scores]
    return [(r.number, r.scores) for r in front(feasible, directions)]


class TrialFailed(Exception):
    """A trial raised: it was told FAIL with ``error`` and queued again as trial ``retry`` (None: not)."""

    def __init__(self, number: int, error: str, retry: int | None) -> None:
        super().__init__(f"trial {number} failed: {error}")
        self.number, self.error, self.retry = number, error, retry


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Worker:
    """One grafted model and the search split's tasks, serving trials of one study."""

    def __init__(
        self,
        spec: StudySpec,
        grafted: Any,  # safesearch.grafted.GraftedModel
        space: SearchSpace,
        artifact_store: Any = None,
        *,
        judge_device: str = "cpu",
    ) -> None:
        self.spec = spec
        self.grafted = grafted
        self.space = space
        self.artifact_store = artifact_store
        self.tasks = prepare_tasks(search_refs(spec), spec.data_root, device=judge_device)
        self._slices: tuple[float, tuple[dict[str, Task], dict[str, Task]]] | None = None
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.retry = RetryTrial(spec.max_retries)

    def run_trial(self, study: optuna.Study, trial: optuna.Trial, ask_s: float = 0.0) -> TrialOutcome:
        """Suggest, merge, evaluate, record and tell one trial.

        A trial that raises is told FAIL with its error and queued again (:func:`give_up`), then
        :class:`TrialFailed` is raised; an interrupt does the same and propagates.
        """
        t0 = time.perf_counter()
        seconds = {"ask": ask_s}
        try:
            # The parameters and the worker's name in one transaction (see safesearch.batch).
            with batched(study, trial):
                coefs = self.space.suggest(trial)
                # Who runs it, known while it runs (the dashboard; which trial a dead worker held).
                trial.set_user_attr("worker", self.name)
            t1 = time.perf_counter()
            self.grafted.apply(coefs)
            t2 = time.perf_counter()
            results = self._evaluate(study, trial)
            t3 = time.perf_counter()
            seconds.update(suggest=t1 - t0, merge=t2 - t1, eval=t3 - t2)
            if isinstance(results, Stopped):
                return self._stop(study, trial, coefs, results, seconds, t0)
            scored = score_all(self.spec, results)
            bad = [n for n, v in scored["scores"].items() if math.isnan(v)]
            if bad:
                raise RuntimeError(f"objective {bad[0]!r}: no item was judged")
            # What the trial records, in one transaction (see safesearch.batch).
            with batched(study, trial) as batch:
                for name, violation in scored["constraints"].items():
                    if not math.isnan(violation):
                        batch.set_constraint(name, violation)
                violations = list(scored["constraints"].values())
                if violations and not any(math.isnan(v) for v in violations):
                    record_constraint_list(trial, violations)  # where optuna-dashboard reads them
                attrs = {
                    "scores": scored["scores"],
                    "constraint_scores": scored["constraint_scores"],
                    "suites": scored["suites"],
                    "coefficients": coefs,
                    "seconds": {"merge": round(t2 - t1, 4), "eval": round(t3 - t2, 4)},
                }
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
                rows = [row for key, t in self.tasks.items() for row in exchange_rows(t, results[key])]
                batch.save_note(trial_note(
                    trial.number, trial.user_attrs.get(BASELINE_ATTR),
                    scores_section("### Search split", scored["scores"], scored["constraint_scores"],
                                   constraint_bounds(self.spec), scored["suites"], feasible(scored)),
                    coefs, samples_section(rows)))
                if self.artifact_store is not None:
                    self._upload_responses(trial, rows)
            t4 = time.perf_counter()
            values = objective_values(self.spec, scored["scores"])
            with warnings.catch_warnings():
                # The paper's CMA-ES baseline ignores constraints; they are stored and the front reads them.
                warnings.filterwarnings("ignore", message="Constraints have been set, but CmaEsSampler")
                tell(study, trial, values)
            t5 = time.perf_counter()
        except optuna.exceptions.UpdateFinishedTrialError:
            raise  # another worker failed it as stale and queued its retry
        except StorageOutage:
            raise  # the trial stays RUNNING: once its heartbeat is silent, another worker retries it
        except BaseException as e:
            interrupted = not isinstance(e, Exception)
            error = "interrupted (Ctrl-C or SIGTERM)" if interrupted else _one_line(e)
            retry = give_up(study, trial, error, self.retry, interrupted=interrupted)
            if interrupted:
                raise
            raise TrialFailed(trial.number, error, retry) from e
        seconds.update(record=t4 - t3, tell=t5 - t4, total=ask_s + t5 - t0)
        return TrialOutcome(
            trial.number, TrialState.COMPLETE, values, scored["scores"], trial.user_attrs.get(BASELINE_ATTR), seconds
        )

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial) -> dict[str, SuiteResult] | Stopped:
        """Every task's result; with early stopping, the first slice, then the rest unless the trial is
        hopeless (a :class:`Stopped`). Baselines always run to the end."""
        backend = self.grafted.backend
        rule = self.spec.early_stop
        if rule is None or trial.user_attrs.get(BASELINE_ATTR):
            return run_tasks(backend, self.tasks)
        cap = self.spec.n_trials if rule.max_stopped is None else rule.max_stopped
        if count_states(study)[TrialState.PRUNED] >= cap:
            return run_tasks(backend, self.tasks)
        first, rest = self._stages(rule.fraction)
        partial = run_tasks(backend, first)
        measured = {x.name: Measured(*pooled_n(x, partial)) for x in (*self.spec.objectives, *self.spec.constraints)}
        # The front is read from the storage only when the dominance rule will look at it.
        front = current_front(study, self.spec) if rule.dominated else []
        why = hopeless(rule, self.spec.objectives, self.spec.constraints, measured, front)
        if why is not None:
            return Stopped(why, partial)
        more = run_tasks(backend, rest)
        return {key: combine(t.suite, t.items, [r for r in (partial.get(key), more.get(key)) if r is not None])
                for key, t in self.tasks.items()}

    def _stages(self, fraction: float) -> tuple[dict[str, Task], dict[str, Task]]:
        """The tasks on their first slice and on the rest (:func:`sliced`), made once per fraction."""
        if self._slices is None or self._slices[0] != fraction:
            self._slices = (fraction, sliced(self.tasks, fraction))
        return self._slices[1]

    def _stop(self, study: optuna.Study, trial: optuna.Trial, coefs: Coefficients, stopped: Stopped,
              seconds: dict[str, float], t0: float) -> TrialOutcome:
        """Tell a hopeless trial PRUNED, what its first slice scored kept as attrs: ``early_stop`` (why,
        the slice's scores and suites) beside ``coefficients`` and ``seconds``. Its constraints as the
        slice measured them (the Wilson bound where a constraint asks for one) are set too, so that the
        samplers learn where the infeasible region lies. A PRUNED trial is not among the n_trials
        COMPLETE ones, nor on the front."""
        scored = score_all(self.spec, stopped.partial)
        with batched(study, trial) as batch:  # one transaction (see safesearch.batch)
            for name, violation in scored["constraints"].items():
                if not math.isnan(violation):
                    batch.set_constraint(name, violation)
            trial.set_user_attr("early_stop", {
                "reason": stopped.reason,
                "scores": scored["scores"],
                "constraint_scores": scored["constraint_scores"],
                "suites": scored["suites"],
            })
            trial.set_user_attr("coefficients", coefs)
            trial.set_user_attr("seconds", {"merge": round(seconds["merge"], 4), "eval": round(seconds["eval"], 4)})
            batch.save_note(trial_note(
                trial.number, None,
                [f"**Stopped early** (PRUNED): {stopped.reason}.", "",
                 *scores_section("### First slice of the search split", scored["scores"],
                                 scored["constraint_scores"], constraint_bounds(self.spec), scored["suites"], None)],
                coefs, []))
        t4 = time.perf_counter()
        tell(study, trial, state=TrialState.PRUNED)
        t5 = time.perf_counter()
        seconds.update(record=t4 - t0 - sum(seconds[k] for k in ("suggest", "merge", "eval")), tell=t5 - t4,
                       total=seconds["ask"] + t5 - t0)
        return TrialOutcome(trial.number, TrialState.PRUNED, None, scored["scores"], None, seconds, stopped.reason)

    def _upload_responses(self, trial: optuna.Trial, exchanges: Sequence[Mapping[str, Any]]) -> None:
        """Every item's exchange as ``responses-<trial>.jsonl``: one flat row per item (suite, id, prompt,
        image, response or choice, verdict, answer), which optuna-dashboard previews as a table."""
        with tempfile.TemporaryDirectory(prefix="safesearch-artifact-") as d:
            path = Path(d) / f"responses-{trial.number}.jsonl"
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in exchanges))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                upload_artifact(
                    artifact_store=self.artifact_store,
                    file_path=str(path),
                    study_or_trial=trial,
                    mimetype="application/jsonl",
                )

    def work(
        self,
        study: optuna.Study,
        n_trials: int,
        *,
        max_trials: int | None = None,
        on_trial: Callable[[TrialOutcome], None] | None = None,
        on_failure: Callable[[TrialFailed], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Serve trials until the study has ``n_trials`` COMPLETE ones (or this worker ran ``max_trials``).

        A failed trial is reported to ``on_failure`` and the worker goes on (the trial runs again, here or
        elsewhere, up to the spec's ``max_retries``); after ``max_consecutive_failures`` failures in a row
        (a broken set-up: a judge that is down, a missing file) it stops with a :class:`UserError`.
        Returns the number of trials this worker completed.
        """
        from safesearch.storage import heartbeat, next_trial

        done = ran = failed_in_a_row = 0
        while max_trials is None or ran < max_trials:
            interrupts.raise_if_requested()
            if should_stop is not None and should_stop():
                break
            t0 = time.perf_counter()
            trial = next_trial(study, n_trials, should_stop=should_stop, retry=self.retry)
            if trial is None:
                break
            ask_s = time.perf_counter() - t0
            try:
                with heartbeat(study, trial):
                    outcome = self.run_trial(study, trial, ask_s)
            except KeyboardInterrupt:
                # run_trial failed and queued its trial; an interrupt just before or after it did not.
                with impatient(), contextlib.suppress(optuna.exceptions.StorageInternalError, StorageOutage):
                    if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                        give_up(study, trial, "interrupted (Ctrl-C or SIGTERM)", self.retry, interrupted=True)
                raise
            except optuna.exceptions.UpdateFinishedTrialError:
                # Another worker failed this trial as stale (this one missed its heartbeat grace period,
                # e.g. a stalled machine) and queued its retry; carry on with the next trial.
                warnings.warn(f"trial {trial.number} was failed by another worker (heartbeat missed); "
                              "its retry runs in its place", stacklevel=1)
                continue
            except TrialFailed as failure:
                failed_in_a_row += 1
                if on_failure is not None:
                    on_failure(failure)
                if failed_in_a_row >= self.spec.max_consecutive_failures:
                    raise UserError(
                        f"worker stopped: {failed_in_a_row} trials failed in a row (max_consecutive_failures), "
                        f"the last one, trial {failure.number}, with {failure.error}; fix the set-up and start "
                        "again (failed trials are queued to run again)"
                    ) from None
                continue
            failed_in_a_row = 0
            ran += 1
            done += outcome.state == TrialState.COMPLETE
            if on_trial is not None:
                on_trial(outcome)
        return done

    def close(self) -> None:
        self.grafted.close()


def check_anchor(spec: StudySpec, tasks: Mapping[str, Task]) -> None:
    """From the anchor's config.json, before any model loads: the spec's backend can run the anchor (the
    transformers backend runs only classes transformers has), and the anchor takes images where a suite
    shows them; otherwise the first trial would fail after minutes of loading."""
    from safesearch.backends.models import check_native, read_model_config, takes_images

    anchor = spec.graft.checkpoints[spec.graft.anchor]
    config = read_model_config(anchor.path)
    images = takes_images(anchor.path, config)
    if spec.backend == "transformers":
        check_native(anchor.path, config)
    if images:
        return
    for t in tasks.values():
        if shows_images(t.suite, t.items):
            raise UserError(f"{spec_where(spec)}: suite '{t.suite.name}' shows images{images_why(t.suite)}, "
                            f"but the anchor {spec.graft.anchor} at '{anchor.path}' takes text only")


def open_worker(
    spec: StudySpec, *, device: str | None = None, artifact_store: Any = None, space: SearchSpace | None = None
) -> Worker:
    """Load the grafted model once (the spec's backend) and the search split's items; the search
    ranges are checked against the loaded tensors (no coefficient may overflow the working dtype)."""
    from safesearch.grafted import open_grafted

    if space is None:
        # From the checkpoints' headers, as `study create` computes it, so both agree on the parameters.
        space = search_space(spec)
    grafted = open_grafted(spec.graft, backend=spec.backend, device=device or spec.device,
                           options=spec.backend_options)
    merger = grafted.merger
    try:
        merger.check_bounds(space.bounds(), where=spec_where(spec), prefix="search.")
    except BaseException:
        grafted.close()
        raise
    judge_device = str(merger.device) if merger.device.type != "cpu" else "cpu"
    return Worker(spec, grafted, space, artifact_store, judge_device=judge_device)


# -- holdout ---------------------------------------------------------------------------------------------


def holdout_scores(spec: StudySpec, backend: Backend, tasks: Mapping[str, Task]) -> dict[str, Any]:
    """The objectives and constraints re-scored on their holdout splits."""
    results = run_tasks(backend, tasks)
    scored = score_all(spec, results, holdout=True)
    return {**scored, "feasible": all(v <= 0 for v in scored["constraints"].values())}
