"""Suites as data: ``objectives/NAME.yaml`` names a dataset, its split and subset, the attack form, the
judge and the metric. The YAML is validated once, here, into plain frozen dataclasses; every mistake is
a one-line error naming the file and the field.

Relative dataset paths are resolved against the data root (``--data-root``, else ``$SAFESEARCH_DATA_ROOT``,
else the current directory); ``{split}`` in a path is replaced by the published name of the split scored.
How a suite's items fall into the search and holdout splits is its :class:`~safesearch.splits.SplitRule`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from safesearch.datasets import FORMATS, reader_options
from safesearch.errors import UserError
from safesearch.judges.base import RULE_PRESETS, Rule, Verdict
from safesearch.splits import ALL, SplitRule, check_split, parse_names, parse_partition
from safesearch.textfiles import read_yaml

METRICS = ("safety", "over_refusal", "mcq_loglik", "mcq_generate", "vqa_closed")
DIMENSIONS = {
    "safety": "safety",
    "over_refusal": "over-refusal",
    "mcq_loglik": "medical",
    "mcq_generate": "medical",
    "vqa_closed": "medical",
}
# The item kind each metric scores: a suite whose items are of another kind is a configuration error.
METRIC_KINDS = {
    "safety": "harmful",
    "over_refusal": "benign",
    "mcq_loglik": "mcq",
    "mcq_generate": "mcq",
    "vqa_closed": "vqa",
}
ATTACKS = ("direct", "figstep", "qr")
JUDGES = ("keyword", "guard", "http")
# "the first 32 new tokens decide a refusal"; judges that read the whole answer need more of it.
DEFAULT_MAX_NEW_TOKENS = {"keyword": 32, "guard": 256, "http": 256}


@dataclass(frozen=True)
class DatasetSpec:
    format: str
    path: str
    split: str = ""  # the split scored when none is named ("": every item, where the rule allows)
    options: dict[str, Any] = field(default_factory=dict)
    filter: dict[str, tuple[str, ...]] = field(default_factory=dict)  # item field -> accepted values

    def resolved_path(self, data_root: Path, published_split: str | None = None) -> Path:
        """The file (or folder) read, ``{split}`` replaced by ``published_split`` (default: ``split``)."""
        split = self.split if published_split is None else published_split
        path = Path(self.path.replace("{split}", split)).expanduser()
        return path if path.is_absolute() else data_root / path


@dataclass(frozen=True)
class SubsetSpec:
    size: int | None = None  # None: every item
    seed: int = 0


@dataclass(frozen=True)
class JudgeSpec:
    type: str = "keyword"
    phrases: tuple[str, ...] | None = None  # keyword: replaces the default list
    model: str | None = None  # guard: checkpoint directory; http: the served model's name
    template: str | None = None  # guard: "chat" or a user turn with {request}/{response}; http: the latter
    rules: tuple[Rule, ...] = ()
    max_new_tokens: int = 16
    base_url: str | None = None
    timeout: float = 60.0
    retries: int = 2
    concurrency: int = 4
    api_key_env: str | None = None

    @property
    def labels(self) -> frozenset[Verdict]:
        if self.type == "keyword":
            return frozenset({Verdict.REFUSAL, Verdict.COMPLIANCE})
        return frozenset(r.verdict for r in self.rules)


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 32
    early_stop: bool = True  # stop each response once the judge can decide (keyword judge only)
    # With early_stop, the first full_responses items of each evaluation are generated again to full length
    # for the record (artifact, dashboard, eval --json): a person reads them; the verdict stays the cut one's.
    full_responses: int = 2


@dataclass(frozen=True)
class FigStepSpec:
    size: int = 760
    font_size: int = 80
    font: str | None = None
    prompt: str | None = None  # the benign text turn; FigStep's by default


@dataclass(frozen=True)
class Suite:
    name: str
    dataset: DatasetSpec
    metric: str
    description: str = ""
    subset: SubsetSpec = SubsetSpec()
    attack: str = "direct"
    judge: JudgeSpec = JudgeSpec()
    generation: GenerationSpec = GenerationSpec()
    figstep: FigStepSpec = FigStepSpec()
    splits: SplitRule = SplitRule()
    source: Path | None = field(default=None, compare=False)

    @property
    def dimension(self) -> str:
        return DIMENSIONS[self.metric]

    def check_split(self, split: str, where: str = "") -> None:
        """Refuse a split this suite cannot form; ``where`` (a spec field, a flag) prefixes the message."""
        here = f"{where}: suite '{self.name}'" if where else f"suite '{self.name}'"
        if self.splits.by == "path" and split == ALL:
            raise UserError(f"{here}: the dataset has a file per split ({self.dataset.path}): name a split")
        check_split(self.splits, split, here)

    @property
    def uses_judge(self) -> bool:
        return self.metric in ("safety", "over_refusal")


# -- loading ------------------------------------------------------------------------------------------


def packaged_suites_dir() -> Path:
    """The example suites installed with the package (``safesearch.objectives``: objectives/ of the source)."""
    import safesearch.objectives

    return Path(safesearch.objectives.__file__).resolve().parent


def default_suite_dirs(first: Path | None = None) -> list[Path]:
    """Where suite names are looked up, in order: ``first`` (``--suites-dir``), ./objectives, then the
    example suites installed with the package, so that a name resolves from any directory."""
    dirs = [*([first] if first is not None else []), Path.cwd() / "objectives", packaged_suites_dir()]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def default_data_root() -> Path:
    return Path(os.environ.get("SAFESEARCH_DATA_ROOT", ".")).expanduser()


def is_suite_path(name: str) -> bool:
    """Whether a suite reference is a path to a suite file rather than a suite's name."""
    return name.endswith((".yaml", ".yml")) or os.sep in name


def find_suite(name: str, dirs: list[Path] | None = None) -> Path:
    """The YAML file of suite ``name`` (or ``name`` itself when it is a path to one)."""
    if is_suite_path(name):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"suite file '{path}' does not exist")
        return path
    dirs = dirs or default_suite_dirs()
    for d in dirs:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
    raise UserError(
        f"unknown suite '{name}': no {name}.yaml in {', '.join(str(d) for d in dirs)}"
        f" (known: {', '.join(known) or 'none'})"
    )


def load_suite(name: str, dirs: list[Path] | None = None) -> Suite:
    path = find_suite(name, dirs)
    return parse_suite(read_yaml(path, "suite"), source=path, default_name=path.stem)


class _Fields:
    """Reads a YAML mapping field by field, naming ``file: section.field`` in every error."""

    def __init__(self, raw: Any, where: str, section: str = "") -> None:
        if not isinstance(raw, dict):
            raise UserError(
                f"{where}: {section or 'the suite'} should be a mapping, got {type(raw).__name__}"
            )
        self.raw, self.where, self.section = dict(raw), where, section

    def name(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"{self.where}: {self.name(key)}: {message}")

    def get(
        self, key: str, types: type | tuple[type, ...], default: Any = None, required: bool = False
    ) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise self.fail(key, "is required")
            return default
        value = self.raw.pop(key)
        types_t = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types_t or not isinstance(value, types_t):
            names = " or ".join(t.__name__ for t in types_t)
            raise self.fail(key, f"should be {names}, got {type(value).__name__} {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...] | list[str], default: str | None = None) -> str:
        value = self.get(key, str, default, required=default is None)
        if value not in choices:
            raise self.fail(key, f"unknown value '{value}' (known: {', '.join(choices)})")
        return value

    def positive(self, key: str, default: int | None) -> int | None:
        value = self.get(key, int, default)
        if value is not None and value < 1:
            raise self.fail(key, f"should be at least 1, got {value}")
        return value

    def section_of(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict, {}), self.where, self.name(key))

    def done(self) -> None:
        if self.raw:
            raise self.fail(sorted(self.raw)[0], "unknown field")


def _rules(f: _Fields, default: str) -> tuple[Rule, ...]:
    value = f.get("rules", (str, list), default)
    if isinstance(value, str):
        if value not in RULE_PRESETS:
            raise f.fail("rules", f"unknown preset '{value}' (known: {', '.join(RULE_PRESETS)})")
        return RULE_PRESETS[value]
    rules = []
    for i, r in enumerate(value):
        rf = _Fields(r, f.where, f"{f.name('rules')}[{i}]")
        pattern = rf.get("pattern", str, required=True)
        verdict = rf.choice("verdict", [v.value for v in Verdict if v is not Verdict.UNJUDGED])
        rf.done()
        try:
            rules.append(Rule(pattern, Verdict(verdict)))
        except Exception as e:  # re.error
            raise rf.fail("pattern", f"bad regular expression ({e})") from None
    if not rules:
        raise f.fail("rules", "needs at least one rule")
    return tuple(rules)


def _judge(f: _Fields) -> JudgeSpec:
    kind = f.choice("type", JUDGES, "keyword")
    if kind == "keyword":
        phrases = f.get("phrases", list)
        if phrases is not None and (
            not phrases or not all(isinstance(p, str) and p.strip() for p in phrases)
        ):
            raise f.fail("phrases", "should be a non-empty list of strings")
        f.done()
        return JudgeSpec(type="keyword", phrases=tuple(phrases) if phrases else None)
    if kind == "guard":
        spec = JudgeSpec(
            type="guard",
            model=f.get("model", str, required=True),
            template=f.get("template", str, "chat"),
            rules=_rules(f, "llama-guard"),
            max_new_tokens=f.positive("max_new_tokens", 16),
        )
    else:
        from safesearch.judges.http import DEFAULT_TEMPLATE, base_url_problem, timeout_problem

        spec = JudgeSpec(
            type="http",
            base_url=f.get("base_url", str, required=True),
            model=f.get("model", str, required=True),
            template=f.get("template", str, DEFAULT_TEMPLATE),
            rules=_rules(f, "safe-unsafe"),
            max_new_tokens=f.positive("max_new_tokens", 16),
            timeout=float(f.get("timeout", (int, float), 60.0)),
            retries=f.get("retries", int, 2),
            concurrency=f.positive("concurrency", 4),
            api_key_env=f.get("api_key_env", str),
        )
        # The same checks as HttpJudge's constructor, refused here where the file and field can be named.
        for key, why in (
            ("base_url", base_url_problem(spec.base_url or "")),
            ("timeout", timeout_problem(spec.timeout)),
        ):
            if why:
                raise f.fail(key, why)
        if spec.retries < 0:
            raise f.fail("retries", f"should be 0 or more, got {spec.retries}")
    if spec.template != "chat" and "{response}" not in (spec.template or ""):
        raise f.fail(
            "template", "should contain {response} (and usually {request}), or be 'chat' for a guard model"
        )
    f.done()
    return spec


def parse_suite(raw: Any, *, source: Path | None = None, default_name: str = "suite") -> Suite:
    where = str(source) if source else "suite"
    top = _Fields(raw, where)
    name = top.get("name", str, default_name)
    description = top.get("description", str, "")
    metric = top.choice("metric", METRICS)

    ds = top.section_of("dataset")
    fmt = ds.choice("format", list(FORMATS))
    path = ds.get("path", str, required=True)
    split = str(ds.get("split", (str, int), ""))
    if "{split}" in path and not split:
        raise ds.fail("split", "is required: the path contains {split}")
    options = ds.get("options", dict, {})
    unknown = sorted(set(options) - set(reader_options(fmt)))
    if unknown:
        raise ds.fail(
            "options",
            f"unknown option '{unknown[0]}' for {fmt} (known: {', '.join(reader_options(fmt)) or 'none'})",
        )
    filters: dict[str, tuple[str, ...]] = {}
    for key, value in ds.get("filter", dict, {}).items():
        if key not in ("kind", "domain", "category", "split"):
            raise ds.fail("filter", f"cannot filter on '{key}' (known: kind, domain, category, split)")
        values = value if isinstance(value, list) else [value]
        filters[key] = tuple(str(v) for v in values)
    ds.done()
    dataset = DatasetSpec(fmt, path, split, dict(options), filters)

    sub = top.section_of("subset")
    subset = SubsetSpec(size=sub.positive("size", None), seed=sub.get("seed", int, 0))
    sub.done()

    splits = _split_rule(top, dataset)

    attack = top.choice("attack", ATTACKS, "direct")
    if attack != "direct" and metric not in ("safety", "over_refusal"):
        raise top.fail("attack", f"{attack} disguises requests; metric '{metric}' takes direct questions only")
    if attack == "qr" and fmt != "mmsafetybench":
        raise top.fail("attack", "qr shows MM-SafetyBench's query-relevant images: it needs dataset.format mmsafetybench")

    judge = _judge(top.section_of("judge"))
    if metric == "over_refusal" and not {Verdict.REFUSAL, Verdict.COMPLIANCE} <= judge.labels:
        raise top.fail("judge", "over_refusal needs a judge whose rules give refusal and compliance verdicts")
    if metric == "safety":
        labels = judge.labels
        if not (
            {Verdict.REFUSAL, Verdict.COMPLIANCE} <= labels or {Verdict.HARMFUL, Verdict.HARMLESS} <= labels
        ):
            raise top.fail(
                "judge", "safety needs rules giving refusal/compliance or harmful/harmless verdicts"
            )

    gen = top.section_of("generation")
    default_tokens = DEFAULT_MAX_NEW_TOKENS[judge.type] if metric in ("safety", "over_refusal") else 32
    generation = GenerationSpec(
        max_new_tokens=gen.positive("max_new_tokens", default_tokens),
        early_stop=gen.get("early_stop", bool, True),
        full_responses=gen.get("full_responses", int, 2),
    )
    if generation.full_responses < 0:
        raise gen.fail("full_responses", f"should be 0 or more, got {generation.full_responses}")
    gen.done()

    fs = top.section_of("figstep")
    figstep = FigStepSpec(
        size=fs.positive("size", 760),
        font_size=fs.positive("font_size", 80),
        font=fs.get("font", str),
        prompt=fs.get("prompt", str),
    )
    fs.done()
    top.done()
    return Suite(
        name=name,
        description=description,
        dataset=dataset,
        subset=subset,
        metric=metric,
        attack=attack,
        judge=judge,
        generation=generation,
        figstep=figstep,
        splits=splits,
        source=source,
    )


def _split_rule(top: _Fields, dataset: DatasetSpec) -> SplitRule:
    """The suite's split rule: ``{split}`` in the path, ``splits:`` (published names), or ``partition:``
    (the default where the file has no split of its own)."""
    where = f"{top.where}: "
    has_partition, has_names = "partition" in top.raw, "splits" in top.raw
    if has_partition and has_names:
        raise top.fail("partition", "give partition: or splits:, not both (a suite has one split rule)")
    by_path = "{split}" in dataset.path
    if has_partition:
        if by_path:
            raise top.fail("partition", "dataset.path already splits by {split}; a partition would split it again")
        rule = SplitRule("partition", partition=parse_partition(top.raw.pop("partition"), where + "partition"))
    elif has_names:
        raw = top.raw.pop("splits")
        names = () if raw == "published" else parse_names(raw, where + "splits")
        rule = SplitRule("path" if by_path else "field", names=names)
    else:
        rule = SplitRule("path") if by_path else SplitRule("partition")
    if dataset.split:
        check_split(rule, dataset.split, where + "dataset.split")
    return rule


def suite_fields() -> list[str]:
    """The top-level fields a suite file may have (for the docs and the tests)."""
    return [f.name for f in fields(Suite) if f.name != "source"]
