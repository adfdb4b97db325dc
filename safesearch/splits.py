"""Splits: which of a suite's items a search scores and which the holdout re-scores, disjoint by construction.

A suite states one rule (:class:`SplitRule`):

- ``path``: the benchmark ships one file (or folder) per split and ``{split}`` in the dataset path names
  it (the toy world's ``data/{split}/``, MedQA's ``phrases_no_exclude_{split}.jsonl``);
- ``field``: one file whose items carry their split (VQA-RAD's ``phrase_type``, a JSONL ``split`` key);
- ``partition``: one file with no split of its own (HEx-PHI, CatQA, HarmBench, XSTest, MM-SafetyBench,
  SafeBench...): each item falls in a split by a seeded hash of its id: by default ``holdout`` takes 70%
  of the hash range and ``search`` 30% (splits in name order, whatever order a file lists them in). An item's split depends on its id and the seed
  alone, so it does not move when the file is re-ordered, filtered or subset, and no id is in two splits.

Under ``path`` and ``field`` a study's split names go through ``names`` (``{search: dev, holdout: test}``:
the search scores MedQA's dev file, the holdout its test file); a name not mapped is the published name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from safesearch.errors import UserError

if TYPE_CHECKING:
    from safesearch.datasets.items import Item

RULES = ("path", "field", "partition")
# 30% of the items to search on, 70% to validate on: every trial scores a subset of the search split,
# while the holdout is scored once per front trial and wants the tighter estimate.
DEFAULT_SHARES: tuple[tuple[str, float], ...] = (("holdout", 0.7), ("search", 0.3))
ALL = ""  # the split name that means every item (``safesearch eval`` without --split on a partition)


@dataclass(frozen=True)
class Partition:
    """Shares of the hash range, in order: split ``i`` holds the ids whose position falls in its share.
    Parsed partitions list their splits in name order (see :func:`parse_partition`)."""

    shares: tuple[tuple[str, float], ...] = DEFAULT_SHARES
    seed: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shares)

    def split_of(self, item_id: str) -> str | None:
        """The split of ``item_id``; None when the shares sum below 1 and the id falls past them."""
        u = position(item_id, self.seed)
        edge = 0.0
        for name, share in self.shares:
            edge += share
            if u < edge:
                return name
        return None

    def describe(self) -> str:
        shares = ", ".join(f"{name} {share:g}" for name, share in self.shares)
        return f"partition ({shares}; seed {self.seed})"


@dataclass(frozen=True)
class SplitRule:
    by: str = "partition"  # one of RULES
    names: tuple[tuple[str, str], ...] = ()  # path/field: a study's split name -> the published one
    partition: Partition = field(default_factory=Partition)

    def published(self, split: str) -> str:
        """The published split a study's ``split`` names (path and field rules)."""
        return dict(self.names).get(split, split)

    def short(self) -> str:
        """A few words for a table: ``hash 0.3/0.7 seed 0``, ``path: dev/test``, ``field: train/test``."""
        if self.by == "partition":
            shares = dict(self.partition.shares)
            shown = "/".join(f"{shares[n]:g}" for n in ("search", "holdout") if n in shares)
            return f"hash {shown or '-'} seed {self.partition.seed}"
        names = dict(self.names)
        return f"{self.by}: {names.get('search', 'search')}/{names.get('holdout', 'holdout')}"

    def describe(self) -> str:
        if self.by == "partition":
            return self.partition.describe()
        where = "the file per {split}" if self.by == "path" else "the items' own split"
        names = ", ".join(f"{a} = {b}" for a, b in self.names)
        return f"published ({where}{'; ' + names if names else ''})"


def position(item_id: str, seed: int) -> float:
    """Where ``item_id`` falls in [0, 1): a hash of the seed and the id alone. Its own prefix keeps it
    independent of the subset's ranking (:func:`safesearch.evaluate.subset_rank`), which hashes the same ids."""
    digest = hashlib.sha256(f"partition:{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_split(items: Sequence[Item], rule: SplitRule, split: str) -> list[Item]:
    """The items of ``split`` under ``rule`` (every item for :data:`ALL`). Under ``path`` the file already
    holds one split, so every item it holds is in it."""
    if split == ALL or rule.by == "path":
        return list(items)
    if rule.by == "field":
        wanted = rule.published(split)
        return [it for it in items if it.split == wanted]
    return [it for it in items if rule.partition.split_of(it.id) == split]


def check_split(rule: SplitRule, split: str, where: str) -> None:
    """Refuse a split name the rule cannot form (a partition forms only its own names)."""
    if rule.by == "partition" and split != ALL and split not in rule.partition.names:
        known = ", ".join(rule.partition.names)
        raise UserError(f"{where}: no split '{split}' in this suite's partition (known: {known})")


def ids_digest(ids: Iterable[str]) -> str:
    """A fingerprint of a set of item ids (order-free): what a split scored, to compare later."""
    blob = "\n".join(sorted(ids)).encode()
    return hashlib.sha256(blob).hexdigest()


# -- parsing ----------------------------------------------------------------------------------------


def parse_partition(raw: object, where: str) -> Partition:
    """``{search: 0.3, holdout: 0.7, seed: 0}``: every share in (0, 1], their sum at most 1."""
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where}: should map split names to shares, e.g. {{search: 0.3, holdout: 0.7, seed: 0}}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{where}.seed: should be an integer, got {seed!r}")
    shares = []
    for name, share in raw.items():
        if name == "seed":
            continue
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise UserError(f"{where}: split name {name!r} should be a non-blank word")
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise UserError(f"{where}.{name}: should be a share in (0, 1], got {share!r}")
        if not 0 < share <= 1:
            raise UserError(f"{where}.{name}: share {share} is not in (0, 1]")
        shares.append((name, float(share)))
    if not shares:
        raise UserError(f"{where}: names no split (e.g. search: 0.3, holdout: 0.7)")
    total = sum(s for _, s in shares)
    if total > 1 + 1e-9:
        raise UserError(f"{where}: shares sum to {total:g}, above 1 (an item can be in one split only)")
    # In name order, so that writing the mapping in another order (a YAML dump sorts keys) keeps every
    # item in its split.
    return Partition(tuple(sorted(shares)), seed)


def parse_names(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    """``{search: dev, holdout: test}``: a study's split names -> published ones, no two to one."""
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where}: should map a study's splits to published ones, e.g. {{search: dev, holdout: test}}")
    names = []
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
            raise UserError(f"{where}: {key!r}: {value!r} should be a published split name")
        names.append((key, str(value)))
    published = [b for _, b in names]
    twice = next((b for b in published if published.count(b) > 1), None)
    if twice is not None:
        raise UserError(f"{where}: two splits map to '{twice}' (they would score the same items)")
    return tuple(names)
