"""The study spec: what a search study grafts, searches, scores and keeps. Validated once, here.

A study spec is YAML (``studies/toy.yaml`` is the toy world's)::

    name: toy                        # the study's name in the storage (default: the file name)
    graft: toy-graft.yaml            # a graft spec file (relative to this file), or the graft spec itself inline
    data_root: ..                    # where the suites' relative dataset paths resolve (default: $SAFESEARCH_DATA_ROOT,
                                     # else this file's folder)
    search:                          # one entry per vector of the graft: the range of its per-group coefficients
      safety:
        range: [0.0, 2.0]            # every group independently ...
        groups: {'embed|head': [0.0, 1.0]}   # ... or per group (regex on group names, first match wins;
                                     # [a, a] fixes a group at a, unsearched)
      medical:
        scale: [0.5, 1.0]            # or a shared scale times per-group factors: c[g] = scale * factor[g]
        factor: [0.8, 1.2]
    objectives:                      # one optimised value each (at least one)
      - name: safety
        suites: [toy-harmful-general, toy-harmful-medical]   # or suite: NAME; pooled over their items
        metric: safety               # default: the suite's headline metric (safety, over_refusal, acc)
        split: search                # the split a trial scores (default: search)
        subset: 60                   # items per suite per trial (default: every item)
        holdout_split: holdout       # what `safesearch validate` re-scores on (default: holdout)
        holdout_subset: null         # default: every item
        direction: maximize          # maximize | minimize
    constraints:                     # optional: feasible when every value is within its bound
      - name: over_refusal
        suite: toy-benign
        max: 0.1                     # or min:; same suite/split/subset fields as an objective
        confidence: 0.9              # optional: a trial is feasible when the bound holds at this one-sided
                                     # confidence (Wilson) on the items it scored, not just on their rate
    baselines:                       # enqueued before the search (marked with the user attr `baseline`)
      zero: true                     # the anchor as is: every coefficient 0
      global_lambda:                 # RESTA-style: one coefficient for every group of one vector
        vector: safety
        values: [0.25, 0.5, 1.0, 1.5]
                                     # or a list of {vector, values}, or {grid: {safety: [...], medical: [...]}}
      enqueue:                       # own points, e.g. the aligned model as the medical one less its vector
        - {label: aligned, coefficients: {medical: -1.0}}   # or {V: {group regex: value, ...}}; others 0
    sampler: tpe                     # tpe | nsga2 | gp | random | cmaes-weighted, or {name, options, weights}
    seed: 0
    n_trials: 40                     # COMPLETE trials in the study, baselines included
    backend: transformers            # transformers | vllm
    backend_options: {}              # transformers: batch_size, kernel; vllm: kernel, reload, stop_chunk, engine options
    device: null                     # default: the graft spec's device
    max_retries: 2                   # a failed trial (it raised, or its worker died) runs again up to this often
    max_consecutive_failures: 3      # a worker stops after this many failed trials in a row (a broken set-up)
    early_stop:                      # optional (off by default): stop hopeless trials after a first slice
      fraction: 0.5                  # score this share of every suite's items first
      confidence: 0.95               # stop when a constraint is broken / the trial dominated at this confidence
      dominated: true                # also stop trials the current front dominates (false: constraints only)
      max_stopped: null              # past this many stopped trials, trials run to the end (default: n_trials)

``cmaes-weighted`` is the paper's baseline: CMA-ES on one value, the weighted sum of the objectives
(``sampler: {name: cmaes-weighted, weights: {safety: 0.5, medical: 0.5}}``, minimised objectives
counted negatively); the per-objective scores are still stored, so its front reads like the others.

Every error is one line naming the file and the field (``studies/toy.yaml: objectives[0].suite: unknown
suite 'x' (known: ...)``). :meth:`StudySpec.to_dict` gives the spec as plain data with absolute paths; the
study keeps it, so that ``validate`` and ``export`` need nothing but the study's name.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safesearch.errors import UserError
from safesearch.graftspec import GraftSpec, graft_field
from safesearch.rates import lower_bound, upper_bound
from safesearch.suites import Suite, default_data_root, is_suite_path, load_suite
from safesearch.textfiles import read_yaml

# Here rather than from safesearch.grafted / safesearch.storage, which load torch and optuna: reading a spec
# (and refusing a bad one) stays quick.
BACKENDS = ("transformers", "vllm")
DEFAULT_MAX_RETRIES = 2

SAMPLERS = ("tpe", "nsga2", "gp", "random", "cmaes-weighted")
KERNELS = ("auto", "compiled", "eager")  # safesearch.merging.KERNELS, without importing torch
# numpy's seeds (what Optuna's samplers use) are 32-bit unsigned.
MAX_SEED = 2**32 - 1
DIRECTIONS = ("maximize", "minimize")
# The metrics each suite metric reports, headline first (the default an objective reads).
SUITE_METRICS: dict[str, tuple[str, ...]] = {
    "safety": ("safety", "asr"),
    "over_refusal": ("over_refusal",),
    "mcq_loglik": ("acc", "acc_norm"),
    "mcq_generate": ("acc",),
    "vqa_closed": ("acc",),
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass(frozen=True)
class VectorSearch:
    """The coefficients of one vector: per group in ``range`` (``groups`` overrides, first match wins),
    or, when ``scale`` is set, ``scale * factor[g]`` with the factors in ``range``/``groups``."""

    vector: str
    range: Range
    groups: tuple[tuple[str, Range], ...] = ()
    scale: Range | None = None

    def range_of(self, group: str) -> Range:
        for pattern, r in self.groups:
            if re.search(pattern, group):
                return r
        return self.range


@dataclass(frozen=True)
class SuiteRef:
    """A suite as an objective scores it: the split and the subset size override the suite file's."""

    suite: Suite
    split: str
    subset: int | None

    @property
    def name(self) -> str:
        return self.suite.name


@dataclass(frozen=True)
class Objective:
    name: str
    suites: tuple[SuiteRef, ...]
    metric: str
    direction: str = "maximize"
    holdout: tuple[SuiteRef, ...] = ()


@dataclass(frozen=True)
class Constraint:
    """Feasible when the score is at most ``max`` (or at least ``min``); Optuna's value is the excess.

    With ``confidence``, the search split's check is made on the rate's one-sided Wilson bound over the
    items scored (the upper bound against ``max``): a trial that refuses 2 of 40 benign requests (0.05)
    is not taken as within ``max: 0.1``, since its true rate may well be 0.11. Holdout (``validate``)
    checks the rate itself: that is the claim a user reads, on the larger split.
    """

    name: str
    suites: tuple[SuiteRef, ...]
    metric: str
    max: float | None = None
    min: float | None = None
    holdout: tuple[SuiteRef, ...] = ()
    confidence: float | None = None

    def violation(self, score: float, n: float | None = None) -> float:
        """Optuna's constraint value: <= 0 when feasible. ``n``: the items ``score`` rests on; with it and a
        ``confidence``, the bound is tested (see the class)."""
        if self.max is not None:
            if self.confidence is not None and n is not None:
                score = upper_bound(score, n, self.confidence)
            return score - self.max
        if self.confidence is not None and n is not None:
            score = lower_bound(score, n, self.confidence)
        return self.min - score  # type: ignore[operator]


@dataclass(frozen=True)
class EarlyStop:
    """Stop a hopeless trial after a first slice of its items (state PRUNED; see safesearch.search).

    The first ``fraction`` of every suite's items (in their seeded order) is scored first. The trial
    stops when, at one-sided ``confidence`` (Wilson bounds on the slice's rates), a constraint is already
    broken, or (``dominated``) a feasible trial of the current front beats even the slice's optimistic
    bounds on every objective. Otherwise the rest is scored and the trial counts as any other. Stopped
    trials do not count toward ``n_trials``; once the study holds ``max_stopped`` of them (default:
    ``n_trials``), trials run to the end again, so that a study whose every point is hopeless (a
    constraint nothing meets) still ends.
    """

    fraction: float = 0.5
    confidence: float = 0.95
    dominated: bool = True
    max_stopped: int | None = None


@dataclass(frozen=True)
class BaselinePoint:
    """A baseline at given coefficients: ``values`` are (vector, group pattern, value); a pattern of None
    sets every group of the vector, else the groups it matches (``re.search``, the first matching entry
    wins, as in ``search.V.groups``); groups no entry sets, and vectors not named, are 0."""

    label: str
    values: tuple[tuple[str, str | None, float], ...]

    def value(self, vector: str, group: str) -> float:
        for v, pattern, x in self.values:
            if v == vector and (pattern is None or re.search(pattern, group)):
                return x
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        coefficients: dict[str, Any] = {}
        for v, pattern, x in self.values:
            if pattern is None:
                coefficients[v] = x
            else:
                coefficients.setdefault(v, {})[pattern] = x
        return {"label": self.label, "coefficients": coefficients}


@dataclass(frozen=True)
class Baselines:
    """The trials enqueued before the search: the anchor as is (``zero``), a global-lambda grid over one
    vector (``lambda_vector`` at each of ``lambda_values``, labelled ``lambda=x``), and ``points``: the
    grids over other or several vectors and the user's own coefficient sets (``enqueue``)."""

    zero: bool = True
    lambda_vector: str | None = None
    lambda_values: tuple[float, ...] = ()
    points: tuple[BaselinePoint, ...] = ()


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    options: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # cmaes-weighted only


@dataclass(frozen=True)
class StudySpec:
    name: str
    graft: GraftSpec
    data_root: Path
    search: dict[str, VectorSearch]
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...] = ()
    baselines: Baselines = Baselines()
    sampler: SamplerSpec = SamplerSpec()
    seed: int = 0
    n_trials: int = 40
    backend: str = "transformers"
    backend_options: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    description: str = ""
    max_retries: int = DEFAULT_MAX_RETRIES
    max_consecutive_failures: int = 3
    early_stop: EarlyStop | None = None
    source: Path | None = field(default=None, compare=False)

    @property
    def single_objective(self) -> bool:
        """CMA-ES on the weighted sum: Optuna sees one value; the objectives' scores are user attrs."""
        return self.sampler.name == "cmaes-weighted"

    @property
    def objective_directions(self) -> dict[str, str]:
        """Objective name -> ``maximize`` | ``minimize``, in the spec's order (what the front reads)."""
        return {o.name: o.direction for o in self.objectives}

    @property
    def directions(self) -> list[str]:
        return ["maximize"] if self.single_objective else [o.direction for o in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, every path absolute; :func:`study_spec_from_dict` reads it back."""

        def refs(rs: tuple[SuiteRef, ...]) -> list[str]:
            return [str(r.suite.source or r.name) for r in rs]

        def scored(x: Objective | Constraint) -> dict[str, Any]:
            first, hold = x.suites[0], x.holdout[0] if x.holdout else None
            return {
                "name": x.name,
                "suites": refs(x.suites),
                "metric": x.metric,
                "split": first.split,
                "subset": first.subset,
                "holdout_split": hold.split if hold else None,
                "holdout_subset": hold.subset if hold else None,
            }

        def search(s: VectorSearch) -> dict[str, Any]:
            out: dict[str, Any] = {"range": [s.range.low, s.range.high]}
            if s.groups:
                out["groups"] = {p: [r.low, r.high] for p, r in s.groups}
            if s.scale is not None:
                out = {"scale": [s.scale.low, s.scale.high], "factor": out.pop("range"), **out}
            return out

        return {
            "name": self.name,
            "description": self.description,
            "graft": self.graft.to_dict(),
            "data_root": str(self.data_root.resolve()),
            "search": {v: search(s) for v, s in self.search.items()},
            "objectives": [{**scored(o), "direction": o.direction} for o in self.objectives],
            "constraints": [
                {**scored(c), **({"max": c.max} if c.max is not None else {"min": c.min}),
                 **({"confidence": c.confidence} if c.confidence is not None else {})}
                for c in self.constraints
            ],
            "baselines": {
                "zero": self.baselines.zero,
                **(
                    {"global_lambda": {"vector": self.baselines.lambda_vector, "values": list(self.baselines.lambda_values)}}
                    if self.baselines.lambda_vector
                    else {}
                ),
                # Grids over other vectors and own points, as the enqueue entries they are (parsed back alike).
                **({"enqueue": [b.to_dict() for b in self.baselines.points]} if self.baselines.points else {}),
            },
            "sampler": {
                "name": self.sampler.name,
                "options": self.sampler.options,
                **({"weights": self.sampler.weights} if self.single_objective else {}),
            },
            "seed": self.seed,
            "n_trials": self.n_trials,
            "backend": self.backend,
            "backend_options": self.backend_options,
            "device": self.device,
            "max_retries": self.max_retries,
            "max_consecutive_failures": self.max_consecutive_failures,
            **({"early_stop": {"fraction": self.early_stop.fraction, "confidence": self.early_stop.confidence,
                               "dominated": self.early_stop.dominated, "max_stopped": self.early_stop.max_stopped}}
               if self.early_stop else {}),
        }

    def fingerprint(self) -> str:
        """A hash of what makes two workers' trials comparable: the search space, the vectors and groups,
        the objectives and constraints (suites, splits, subsets), the sampler. Paths, device, backend and
        the retry settings may differ between machines and are left out."""
        d = self.to_dict()
        graft = d["graft"]
        keep = {
            "anchor": graft["anchor"],
            "vectors": graft["vectors"],
            "groups": graft["groups"],
            "dtype": graft["dtype"],
        }

        def strip(xs: list[dict]) -> list[dict]:
            return [{**x, "suites": [Path(s).stem for s in x["suites"]]} for x in xs]

        core = {
            "graft": keep,
            "search": d["search"],
            "objectives": strip(d["objectives"]),
            "constraints": strip(d["constraints"]),
            "sampler": d["sampler"],
            "seed": d["seed"],
            "n_trials": d["n_trials"],
            # Only when set, so that the studies made before it keep their fingerprint.
            **({"early_stop": d["early_stop"]} if "early_stop" in d else {}),
        }
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


# -- loading -------------------------------------------------------------------------------------------


def load_study_spec(path: str | Path, suite_dirs: list[Path] | None = None) -> StudySpec:
    """Read and validate a study spec file; every error names the file and the field."""
    path = Path(path)
    data = read_yaml(path, "study spec")
    return study_spec_from_dict(
        data, base_dir=path.parent, where=str(path), default_name=path.stem, source=path, suite_dirs=suite_dirs
    )


def study_spec_from_dict(
    data: Any,
    base_dir: str | Path | None = None,
    where: str = "study spec",
    default_name: str | None = None,
    source: Path | None = None,
    suite_dirs: list[Path] | None = None,
) -> StudySpec:
    """Validate a study spec given as plain data; ``where`` prefixes every error message."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    f = _Fields(data, where)
    name = f.get("name", str, default_name)
    if name is None:
        raise f.fail("name", "is required")
    if not _NAME.match(name):
        raise f.fail("name", f"{name!r} is not a valid study name (letters, digits, _ . -)")
    description = f.get("description", str, "")

    graft = graft_field(f.get("graft", (str, dict), required=True), base, f"{where}: graft")
    root_raw = f.get("data_root", str, None)
    # Without data_root: $SAFESEARCH_DATA_ROOT, else the spec file's folder (every relative path of a spec
    # file resolves there, as the graft's and the suites' do).
    env_root = os.environ.get("SAFESEARCH_DATA_ROOT")
    if root_raw is not None:
        data_root = _path(root_raw, base)
    else:
        data_root = (default_data_root() if env_root else base).resolve()

    search = _search(f.section("search", required=True), graft)
    objectives = tuple(
        _objective(o, f"objectives[{i}]", where, suite_dirs, base)
        for i, o in enumerate(f.list_of("objectives", required=True))
    )
    _unique([o.name for o in objectives], f.where, "objectives")
    constraints = tuple(
        _constraint(c, f"constraints[{i}]", where, suite_dirs, base) for i, c in enumerate(f.list_of("constraints"))
    )
    _unique([o.name for o in objectives] + [c.name for c in constraints], f.where, "objectives/constraints")
    baselines = _baselines(f.section("baselines"), search)
    seed = f.get("seed", int, 0)
    if not 0 <= seed <= MAX_SEED:
        raise f.fail("seed", f"should be between 0 and {MAX_SEED} (what the samplers accept), got {seed}")
    sampler = _sampler(f, objectives, seed)
    n_trials = f.get("n_trials", int, 40)
    if n_trials < 1:
        raise f.fail("n_trials", f"should be at least 1, got {n_trials}")
    backend = f.get("backend", str, "transformers")
    if backend not in BACKENDS:
        raise f.fail("backend", f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    backend_options = _backend_options(f, backend)
    device = f.get("device", str, None)
    if device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise f.fail("device", f"{device!r} is not auto, cpu, cuda or cuda:N")
    max_retries = f.get("max_retries", int, DEFAULT_MAX_RETRIES)
    if max_retries < 0:
        raise f.fail("max_retries", f"should be 0 or more, got {max_retries}")
    max_failures = f.get("max_consecutive_failures", int, 3)
    if max_failures < 1:
        raise f.fail("max_consecutive_failures", f"should be at least 1, got {max_failures}")
    early_stop = _early_stop(f)
    f.done()
    return StudySpec(
        name=name,
        graft=graft,
        data_root=data_root,
        search=search,
        objectives=objectives,
        constraints=constraints,
        baselines=baselines,
        sampler=sampler,
        seed=seed,
        n_trials=n_trials,
        backend=backend,
        backend_options=backend_options,
        device=device,
        description=description,
        max_retries=max_retries,
        max_consecutive_failures=max_failures,
        early_stop=early_stop,
        source=source,
    )


# -- sections --------------------------------------------------------------------------------------------


def _search(f: _Fields, graft: GraftSpec) -> dict[str, VectorSearch]:
    out = {}
    for v in graft.vectors:
        if v not in f.raw:
            raise f.fail(v, f"missing: every vector of the graft needs a range (vectors: {', '.join(graft.vectors)}; "
                         "[0, 0] leaves one out)")
        out[v] = _vector_search(v, f.section(v, required=True))
    for extra in f.raw:
        raise f.fail(str(extra), f"not a vector of the graft (vectors: {', '.join(graft.vectors)})")
    return out


def _vector_search(vector: str, f: _Fields) -> VectorSearch:
    scale = None
    if "scale" in f.raw:
        scale = _range(f.get("scale", list), f.name("scale"), f.where)
        key = "factor"
    else:
        key = "range"
    r = _range(f.get(key, list, required=True), f.name(key), f.where)
    groups = []
    for pattern, value in f.get("groups", dict, {}).items():
        gwhere = f.name(f"groups.{pattern}")
        try:
            re.compile(str(pattern))
        except re.error as e:
            raise UserError(f"{f.where}: {gwhere}: bad regular expression ({e})") from None
        groups.append((str(pattern), _range(value, gwhere, f.where)))
    f.done()
    return VectorSearch(vector, r, tuple(groups), scale)


def _range(value: Any, name: str, where: str) -> Range:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    ):
        raise UserError(f"{where}: {name}: expected [low, high] (two finite numbers), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if low > high:
        raise UserError(f"{where}: {name}: low {low} is above high {high}")
    return Range(low, high)


def _suites(f: _Fields, section: str, suite_dirs: list[Path] | None, base: Path) -> list[Suite]:
    """The suites of an objective or constraint: names looked up in ``suite_dirs``; a path to a suite file
    (``my-suite.yaml``, ``objectives/x.yaml``) resolved against ``base``, the spec file's folder, as the
    graft spec's path is (not against the directory the command runs in)."""
    one = f.get("suite", str, None)
    many = f.get("suites", list, None)
    if (one is None) == (many is None):
        raise f.fail("suite", "give either suite: NAME or suites: [NAME, ...]")
    key, names = ("suite", [one]) if one is not None else ("suites", many)
    if not names:
        raise f.fail(key, "needs at least one suite")
    suites = []
    for i, n in enumerate(names):
        field_name = key if key == "suite" else f"suites[{i}]"
        if not isinstance(n, str):
            raise f.fail(field_name, f"should be a suite name, got {type(n).__name__} {n!r}")
        ref = n
        if is_suite_path(n) and not Path(n).expanduser().is_absolute():
            ref = str((base / n).resolve())
        try:
            suites.append(load_suite(ref, suite_dirs))
        except UserError as e:
            msg = e.message
            if msg.startswith(f"unknown suite '{n}'"):
                known = msg[msg.find("(known:") :] if "(known:" in msg else ""
                msg = f"unknown suite '{n}' {known}".strip()
            raise f.fail(field_name, msg) from None
    return suites


def _scored(raw: Any, section: str, where: str, suite_dirs: list[Path] | None,
            base: Path) -> tuple[_Fields, dict[str, Any]]:
    """The fields objectives and constraints share."""
    f = _Fields(raw, where, section)
    name = f.get("name", str, required=True)
    if not _NAME.match(name):
        raise f.fail("name", f"{name!r} is not a valid name (letters, digits, _ . -)")
    suites = _suites(f, section, suite_dirs, base)
    kinds = {s.metric for s in suites}
    if len(kinds) > 1:
        raise f.fail("suites", f"the suites score different metrics ({', '.join(sorted(kinds))}); give one objective each")
    available = SUITE_METRICS[suites[0].metric]
    metric = f.get("metric", str, available[0])
    if metric not in available:
        raise f.fail("metric", f"unknown metric {metric!r} for {suites[0].metric} suites (known: {', '.join(available)})")
    split = str(f.get("split", (str, int), "search"))
    subset = _positive(f, "subset")
    hsplit = str(f.get("holdout_split", (str, int), "holdout"))
    hsubset = _positive(f, "holdout_subset")
    for key, value in (("split", split), ("holdout_split", hsplit)):
        if not value.strip():
            raise f.fail(key, "should name a split")
        for s in suites:
            try:
                s.check_split(value)
            except UserError as e:
                raise f.fail(key, e.message) from None
    for s in suites:
        if s.splits.published(split) == s.splits.published(hsplit):
            raise f.fail("holdout_split", f"suite '{s.name}': the holdout split is the search split "
                         f"('{s.splits.published(split)}'): validation would re-score the searched items")
    return f, {
        "name": name,
        "metric": metric,
        "suites": tuple(SuiteRef(s, str(split), subset) for s in suites),
        "holdout": tuple(SuiteRef(s, str(hsplit), hsubset) for s in suites),
    }


def _objective(raw: Any, section: str, where: str, suite_dirs: list[Path] | None, base: Path) -> Objective:
    f, common = _scored(raw, section, where, suite_dirs, base)
    direction = f.get("direction", str, "maximize")
    if direction not in DIRECTIONS:
        raise f.fail("direction", f"unknown direction {direction!r} (known: {', '.join(DIRECTIONS)})")
    f.done()
    return Objective(direction=direction, **common)


def _constraint(raw: Any, section: str, where: str, suite_dirs: list[Path] | None, base: Path) -> Constraint:
    f, common = _scored(raw, section, where, suite_dirs, base)
    hi = f.get("max", (int, float), None)
    lo = f.get("min", (int, float), None)
    if (hi is None) == (lo is None):
        raise f.fail("max", "give either max: or min: (the bound the score must keep)")
    confidence = _confidence(f, "confidence", None)
    f.done()
    return Constraint(max=None if hi is None else float(hi), min=None if lo is None else float(lo),
                      confidence=confidence, **common)


def _confidence(f: _Fields, key: str, default: float | None) -> float | None:
    value = f.get(key, (int, float), default)
    if value is None:
        return None
    if not 0.5 <= value < 1.0:
        raise f.fail(key, f"should be a one-sided confidence in [0.5, 1), e.g. 0.9, got {value!r}")
    return float(value)


def _early_stop(spec: _Fields) -> EarlyStop | None:
    """``early_stop:`` absent, null or false: off; true: on with the defaults; a mapping: on with its fields."""
    raw = spec.get("early_stop", (bool, dict), None)
    if raw is None or raw is False:
        return None
    f = _Fields({} if raw is True else raw, spec.where, "early_stop")
    fraction = f.get("fraction", (int, float), 0.5)
    if not 0.0 < fraction < 1.0:
        raise f.fail("fraction", f"should be between 0 and 1 (the share of items scored first), got {fraction!r}")
    confidence = _confidence(f, "confidence", 0.95)
    dominated = f.get("dominated", bool, True)
    max_stopped = f.get("max_stopped", int, None)
    if max_stopped is not None and max_stopped < 0:
        raise f.fail("max_stopped", f"should be 0 or more, got {max_stopped}")
    f.done()
    return EarlyStop(float(fraction), float(confidence), dominated, max_stopped)  # type: ignore[arg-type]


def _baselines(f: _Fields, search: Mapping[str, VectorSearch]) -> Baselines:
    """``zero``; ``global_lambda`` as one ``{vector, values}`` (labels ``lambda=x``), a list of them (one
    vector each, labels ``lambda V=x``) or ``{grid: {V: [values], ...}}`` (every combination, labels
    ``lambda V=x W=y``); ``enqueue``: ``[{label, coefficients: {V: x | {group pattern: x}}}]``."""
    zero = f.get("zero", bool, True)
    if zero:
        for v, s in search.items():
            r = s.scale or s.range
            if not r.contains(0.0) and not s.groups:
                raise f.fail("zero", f"the all-zero baseline is outside search.{v}'s range [{r.low}, {r.high}]")
    vector, values, points = None, (), []
    raw = f.get("global_lambda", (dict, list), None)
    if isinstance(raw, dict) and "grid" not in raw:
        vector, values = _lambda_entry(_Fields(raw, f.where, f.name("global_lambda")), search)
    elif isinstance(raw, dict):
        points = _lambda_grid(_Fields(raw, f.where, f.name("global_lambda")), search)
    elif isinstance(raw, list):
        if not raw:
            raise f.fail("global_lambda", "needs at least one {vector, values} entry")
        for i, entry in enumerate(raw):
            v, xs = _lambda_entry(_Fields(entry, f.where, f.name(f"global_lambda[{i}]")), search)
            points += [BaselinePoint(f"lambda {v}={x:g}", ((v, None, x),)) for x in xs]
    for i, entry in enumerate(f.list_of("enqueue")):
        points.append(_enqueued(_Fields(entry, f.where, f.name(f"enqueue[{i}]")), search, i))
    labels = ["zero"] * zero + [f"lambda={x:g}" for x in values] + [b.label for b in points]
    dup = next((x for i, x in enumerate(labels) if x in labels[:i]), None)
    if dup is not None:
        raise f.fail("enqueue", f"two baselines are labelled {dup!r} (give each enqueue entry its own label)")
    f.done()
    return Baselines(zero, vector, values, tuple(points))


def _lambda_entry(gl: _Fields, search: Mapping[str, VectorSearch]) -> tuple[str, tuple[float, ...]]:
    """One vector's global-lambda values, each checked against its search range (the others stay 0)."""
    vector = gl.get("vector", str, required=True)
    if vector not in search:
        raise gl.fail("vector", f"{vector!r} is not a vector of the graft (vectors: {', '.join(search)})")
    values = _numbers(gl, "values")
    for x in values:
        _check_uniform(gl, "values", search, vector, x)
    for other, s in search.items():
        r = s.scale or s.range
        if other != vector and not r.contains(0.0):
            raise gl.fail("vector", f"the other vectors stay at 0, outside search.{other}'s range")
    gl.done()
    return vector, values


def _lambda_grid(gl: _Fields, search: Mapping[str, VectorSearch]) -> list[BaselinePoint]:
    """Every combination of the grid's values, one per named vector (vectors not named stay 0)."""
    grid = gl.section("grid", required=True)
    axes: list[tuple[str, tuple[float, ...]]] = []
    for v in list(grid.raw):
        if v not in search:
            raise grid.fail(v, f"{v!r} is not a vector of the graft (vectors: {', '.join(search)})")
        xs = _numbers(grid, v)
        for x in xs:
            _check_uniform(grid, v, search, v, x)
        axes.append((v, xs))
    if not axes:
        raise gl.fail("grid", "names no vector")
    grid.done()
    gl.done()
    for other, s in search.items():
        r = s.scale or s.range
        if other not in dict(axes) and not r.contains(0.0):
            raise gl.fail("grid", f"the vectors it does not name stay at 0, outside search.{other}'s range")
    return [BaselinePoint("lambda " + " ".join(f"{v}={x:g}" for (v, _), x in zip(axes, combo, strict=True)),
                          tuple((v, None, x) for (v, _), x in zip(axes, combo, strict=True)))
            for combo in itertools.product(*(xs for _, xs in axes))]


def _enqueued(e: _Fields, search: Mapping[str, VectorSearch], i: int) -> BaselinePoint:
    """An own point: each named vector at one value, or per group (first matching pattern); ranges are
    checked against the search space's parameters when the groups are known (SearchSpace.baseline_params)."""
    label = e.get("label", str, f"enqueue[{i}]")
    if not label.strip():
        raise e.fail("label", "is empty")
    coefficients = e.section("coefficients", required=True)
    values: list[tuple[str, str | None, float]] = []
    for v in list(coefficients.raw):
        if v not in search:
            raise coefficients.fail(v, f"{v!r} is not a vector of the graft (vectors: {', '.join(search)})")
        x = coefficients.get(v, (float, dict))
        if isinstance(x, dict):
            if search[v].scale is not None:
                raise coefficients.fail(v, f"per-group values need search.{v} without scale (give one number)")
            per = _Fields(x, e.where, coefficients.name(v))
            for pattern in list(per.raw):
                try:
                    re.compile(str(pattern))
                except re.error as err:
                    raise per.fail(str(pattern), f"not a regular expression ({err})") from None
                values.append((v, str(pattern), float(per.get(pattern, float, required=True))))
            per.done()
        else:
            _check_uniform(coefficients, v, search, v, float(x))
            values.append((v, None, float(x)))
    if not values:
        raise e.fail("coefficients", "names no vector")
    coefficients.done()
    e.done()
    return BaselinePoint(label, tuple(values))


def _numbers(f: _Fields, key: str) -> tuple[float, ...]:
    raw = f.get(key, list, required=True)
    if not raw or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in raw):
        raise f.fail(key, f"expected a list of numbers, got {raw!r}")
    return tuple(float(x) for x in raw)


def _check_uniform(f: _Fields, key: str, search: Mapping[str, VectorSearch], vector: str, x: float) -> None:
    """``x`` for every group of ``vector`` must lie in its search range (for a scaled vector: the scale
    holds ``x`` and the factors hold 1)."""
    s = search[vector]
    if s.scale is not None:
        if not s.scale.contains(x) or not s.range.contains(1.0):
            raise f.fail(key, f"{x} needs search.{vector}.scale to hold it and factor to hold 1")
    elif not s.range.contains(x):
        raise f.fail(key, f"{x} is outside search.{vector}.range [{s.range.low}, {s.range.high}]")


def _sampler(f: _Fields, objectives: tuple[Objective, ...], seed: int) -> SamplerSpec:
    raw = f.get("sampler", (str, dict), "tpe")
    s = _Fields({"name": raw} if isinstance(raw, str) else raw, f.where, "sampler")
    name = s.get("name", str, required=True)
    if name not in SAMPLERS:
        raise UserError(f"{f.where}: sampler: unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    options = s.get("options", dict, {})
    cls = sampler_class(name)
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if k not in ("seed", "self")}
    for k, value in options.items():
        if k not in params:
            raise s.fail(f"options.{k}", f"not an option of {name} (known: {', '.join(sorted(params))})")
        wanted = params[k].annotation
        if isinstance(wanted, str) and not _fits(value, wanted):
            raise s.fail(f"options.{k}", f"expected {wanted}, got {type(value).__name__} {value!r:.60}"
                         + ("" if _yaml_settable(wanted) else " (a YAML spec cannot set this option)"))
    try:  # the sampler's own checks of the values (e.g. NSGA-II's population_size >= 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(seed=seed, **options)
    except (ValueError, TypeError) as e:
        raise s.fail("options", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    weights_raw = s.get("weights", dict, None)
    weights: dict[str, float] = {}
    if name == "cmaes-weighted":
        names = [o.name for o in objectives]
        if weights_raw is None:
            weights = {n: 1.0 / len(names) for n in names}
        else:
            for k, w in weights_raw.items():
                if k not in names:
                    raise s.fail(f"weights.{k}", f"not an objective (objectives: {', '.join(names)})")
                if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                    raise s.fail(f"weights.{k}", f"expected a non-negative number, got {w!r}")
            weights = {n: float(weights_raw.get(n, 0.0)) for n in names}
            if not any(weights.values()):
                raise s.fail("weights", "at least one weight must be positive")
    elif weights_raw is not None:
        raise s.fail("weights", "only cmaes-weighted takes weights (the others search every objective)")
    s.done()
    return SamplerSpec(name, dict(options), weights)


# What a YAML value may be, by the type names an annotation's alternatives start with.
_YAML_TYPES: dict[type, tuple[str, ...]] = {
    bool: ("bool",),
    int: ("int", "float"),
    float: ("float",),
    str: ("str",),
    list: ("list", "Sequence", "tuple"),
    dict: ("dict", "Mapping"),
}


def _alternatives(annotation: str) -> list[str]:
    """The top-level alternatives of an annotation string: ``'int | None'`` -> ``['int', 'None']``."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            out.append(annotation[start:i].strip())
            start = i + 1
    out.append(annotation[start:].strip())
    return [a.split("[", 1)[0].rsplit(".", 1)[-1] for a in out]


def _fits(value: Any, annotation: str) -> bool:
    """Whether a YAML value fits a parameter annotated ``annotation`` (as a string, as Optuna writes them)."""
    heads = _alternatives(annotation)
    if value is None:
        return "None" in heads or "Optional" in heads
    for t, names in _YAML_TYPES.items():
        if type(value) is t:
            return any(h in names or h == "Any" for h in heads)
    return False


def _yaml_settable(annotation: str) -> bool:
    names = {n for ns in _YAML_TYPES.values() for n in ns} | {"None", "Any"}
    return any(h in names for h in _alternatives(annotation))


def _backend_options(f: _Fields, backend: str) -> dict[str, Any]:
    """``backend_options`` checked against what the backend takes, before any worker starts."""
    raw = f.section("backend_options")
    if backend == "transformers":
        batch_size = raw.get("batch_size", int, None)
        if batch_size is not None and batch_size < 1:
            raise raw.fail("batch_size", f"should be at least 1, got {batch_size}")
        kernel = raw.get("kernel", str, None)
        if kernel is not None and kernel not in KERNELS:
            raise raw.fail("kernel", f"unknown merge kernel {kernel!r} (known: {', '.join(KERNELS)})")
        raw.done()
        return {k: v for k, v in (("batch_size", batch_size), ("kernel", kernel)) if v is not None}
    # vLLM: the in-place merge's own settings, then vllm.LLM's engine arguments.
    options = dict(raw.raw)
    raw.raw.clear()
    kernel = options.get("kernel")
    if kernel is not None and kernel not in KERNELS:
        raise raw.fail("kernel", f"unknown merge kernel {kernel!r} (known: {', '.join(KERNELS)})")
    from safesearch.backends.vllm import unknown_engine_options

    unknown = unknown_engine_options(options)
    if unknown:
        raise raw.fail(unknown[0], "neither a safesearch vLLM option (kernel, reload, stop_chunk) nor a "
                       "vllm.LLM engine argument")
    return options


def sampler_class(name: str) -> type:
    import optuna

    return {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes-weighted": optuna.samplers.CmaEsSampler,
    }[name]


# -- helpers ---------------------------------------------------------------------------------------------


def _path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _positive(f: _Fields, key: str) -> int | None:
    value = f.get(key, int, None)
    if value is not None and value < 1:
        raise f.fail(key, f"should be at least 1, got {value}")
    return value


def _unique(names: list[str], where: str, section: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise UserError(f"{where}: {section}: the name {n!r} is used twice")
        seen.add(n)


class _Fields:
    """Reads a mapping field by field; every error reads ``file: section.field: message``."""

    def __init__(self, raw: Any, where: str, section: str = "") -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            what = section or "the study spec"
            raise UserError(f"{where}: {what}: expected a mapping, got {type(raw).__name__} {raw!r:.60}")
        self.raw, self.where, self.prefix = dict(raw), where, section

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"{self.where}: {self.name(key)}: {message}")

    def get(self, key: str, types: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.raw or self.raw[key] is None:
            self.raw.pop(key, None)
            if required:
                raise self.fail(key, "missing (required)")
            return default
        value = self.raw.pop(key)
        ts = types if isinstance(types, tuple) else (types,)
        if float in ts and int not in ts:
            ts = (*ts, int)
        if (isinstance(value, bool) and bool not in ts) or not isinstance(value, ts):
            names = " or ".join({dict: "mapping", list: "list", str: "string"}.get(t, t.__name__) for t in ts)
            raise self.fail(key, f"expected {names}, got {type(value).__name__} {value!r:.60}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        return value

    def section(self, key: str, required: bool = False) -> _Fields:
        return _Fields(self.get(key, dict, {}, required=required), self.where, self.name(key))

    def list_of(self, key: str, required: bool = False) -> list[Any]:
        value = self.get(key, list, [], required=required)
        if required and not value:
            raise self.fail(key, "needs at least one entry")
        return value

    def done(self) -> None:
        if self.raw:
            raise self.fail(str(sorted(self.raw, key=str)[0]), "unknown field")
