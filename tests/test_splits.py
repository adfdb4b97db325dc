"""Splits: search and holdout disjoint by construction (partition by id hash, published splits), checked by
``validate`` before it scores, recorded in the study and the export; VQA-RAD's published test split."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from eval_models import FIXTURES
from study_world import spec_dict, write_spec

from safesearch.cli import main
from safesearch.datasets import Item, read_dataset
from safesearch.errors import UserError
from safesearch.evaluate import load_items
from safesearch.search import HOLDOUT_ITEMS_ATTR, SEARCH_ITEMS_ATTR
from safesearch.splits import Partition, SplitRule, ids_digest, in_split, parse_partition, position
from safesearch.studyspec import study_spec_from_dict
from safesearch.suites import SubsetSpec, parse_suite


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _items(n: int) -> list[Item]:
    return [Item(id=f"q-{i}", text=f"request {i}", kind="harmful") for i in range(n)]


# -- the partition ----------------------------------------------------------------------------------------


def test_partition_is_disjoint_covering_and_stable_under_reordering() -> None:
    items = _items(2000)
    rule = SplitRule("partition", partition=Partition())
    search, holdout = in_split(items, rule, "search"), in_split(items, rule, "holdout")
    s_ids, h_ids = {it.id for it in search}, {it.id for it in holdout}
    assert not s_ids & h_ids and len(s_ids | h_ids) == 2000  # shares summing to 1 place every item
    assert 540 < len(search) < 660  # ~30% (binomial: sd ~20)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert {it.id for it in in_split(shuffled, rule, "search")} == s_ids
    assert {it.id for it in in_split(items[:700], rule, "search")} == {i for i in s_ids if int(i[2:]) < 700}
    # Another seed, another partition; shares below 1 leave the rest out of every split.
    other = SplitRule("partition", partition=Partition(seed=1))
    assert {it.id for it in in_split(items, other, "search")} != s_ids
    part = Partition((("search", 0.1), ("holdout", 0.2)))
    assert 0.25 < sum(part.split_of(it.id) is None for it in items) / 2000 < 0.75


def test_partition_is_independent_of_the_subset_hash() -> None:
    """The subset ranks by sha256(seed:id); the partition by its own hash: the search split's subset is
    not the lowest-ranked items of the file."""
    from safesearch.evaluate import select

    items = _items(400)
    search = in_split(items, SplitRule("partition"), "search")
    chosen = select(search, SubsetSpec(size=20, seed=0))
    overall = select(items, SubsetSpec(size=20, seed=0))
    assert {it.id for it in chosen} != {it.id for it in overall}
    assert 0 <= position("q-1", 0) < 1 and position("q-1", 0) != position("q-1", 1)


@pytest.mark.parametrize("raw, message", [
    ({"search": 0, "holdout": 0.7}, r"share 0 is not in \(0, 1\]"),
    ({"search": 1.5}, r"share 1.5 is not in \(0, 1\]"),
    ({"search": -0.1, "holdout": 0.5}, r"share -0.1 is not in \(0, 1\]"),
    ({"search": 0.6, "holdout": 0.7}, "shares sum to 1.3, above 1"),
    ({"search": "a lot"}, r"search: should be a share in \(0, 1\]"),
    ({"search": True}, r"search: should be a share in \(0, 1\]"),
    ({"seed": 0}, "names no split"),
    ({"search": 0.3, "seed": "x"}, "seed: should be an integer"),
    ([0.3, 0.7], "should map split names to shares"),
])
def test_bad_partitions_are_one_line(raw: Any, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        parse_partition(raw, "s.yaml: partition")
    assert "\n" not in e.value.message and e.value.message.startswith("s.yaml: partition")


# -- suites --------------------------------------------------------------------------------------------


def _suite(tmp_path: Path, **fields: Any) -> Any:
    raw = {"name": "s", "metric": "safety", "dataset": {"format": "hexphi", "path": str(FIXTURES / "hexphi")},
           **fields}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return parse_suite(raw, source=path)


def test_a_single_file_suite_is_partitioned_and_its_splits_never_share_an_id(tmp_path: Path) -> None:
    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "text": f"do harm {i}", "kind": "harmful"}) + "\n"
                            for i in range(300)))
    suite = _suite(tmp_path, dataset={"format": "jsonl", "path": str(data)})
    assert suite.splits.by == "partition" and suite.splits.describe() == \
        "partition (holdout 0.7, search 0.3; seed 0)"
    every = load_items(suite, tmp_path)  # no split named: the whole file
    search = load_items(suite, tmp_path, split="search")
    holdout = load_items(suite, tmp_path, split="holdout")
    assert len(every) == 300 and len(search) + len(holdout) == 300
    assert not {it.id for it in search} & {it.id for it in holdout}
    # Subsets are drawn inside the split: whatever their sizes and seeds, they cannot meet.
    for size, seed in ((10, 0), (50, 3), (200, 7)):
        s = load_items(replace(suite, subset=SubsetSpec(size, seed)), tmp_path, split="search")
        h = load_items(replace(suite, subset=SubsetSpec(size, seed + 1)), tmp_path, split="holdout")
        assert not {it.id for it in s} & {it.id for it in h}
    with pytest.raises(UserError, match=r"suite 's': no split 'test' in this suite's partition \(known: holdout, search\)"):
        load_items(suite, tmp_path, split="test")


@pytest.mark.parametrize("fields, message", [
    ({"partition": {"search": 0.5, "holdout": 0.6}}, "s.yaml: partition: shares sum to 1.1, above 1"),
    ({"partition": {"search": 0.0}}, r"s.yaml: partition.search: share 0.0 is not in \(0, 1\]"),
    ({"partition": {"search": 0.3}, "splits": {"search": "dev"}}, "partition: give partition: or splits:, not both"),
    ({"dataset": {"format": "jsonl", "path": "data/{split}/x.jsonl", "split": "holdout"},
      "partition": {"search": 0.3}}, "already splits by {split}"),
    ({"splits": {"search": "test", "holdout": "test"}}, "two splits map to 'test'"),
    ({"dataset": {"format": "hexphi", "path": "x", "split": "dev"}}, "dataset.split: no split 'dev' in this suite's partition"),
])
def test_bad_split_rules_name_the_file_and_field(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _suite(tmp_path, **fields)


def test_published_splits_by_path_and_by_field(tmp_path: Path) -> None:
    for split, ids in (("dev", ["a", "b"]), ("test", ["c", "d"])):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": i, "text": f"t {i}", "kind": "harmful"}) + "\n" for i in ids))
    by_path = _suite(tmp_path, dataset={"format": "jsonl", "path": str(tmp_path / "{split}.jsonl"), "split": "test"},
                     splits={"search": "dev", "holdout": "test"})
    assert by_path.splits.by == "path"
    assert [it.id for it in load_items(by_path, tmp_path)] == ["c", "d"]
    assert [it.id for it in load_items(by_path, tmp_path, split="search")] == ["a", "b"]
    assert [it.id for it in load_items(by_path, tmp_path, split="holdout")] == ["c", "d"]
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"id": i, "text": f"t {i}", "kind": "harmful", "split": s}) + "\n"
                           for i, s in (("a", "train"), ("b", "test"), ("c", "train"))))
    by_field = _suite(tmp_path, dataset={"format": "jsonl", "path": str(one)}, splits={"search": "train", "holdout": "test"})
    assert by_field.splits.by == "field"
    assert [it.id for it in load_items(by_field, tmp_path, split="search")] == ["a", "c"]
    assert [it.id for it in load_items(by_field, tmp_path, split="holdout")] == ["b"]
    assert len(load_items(by_field, tmp_path)) == 3


def test_vqa_rad_reads_the_published_split_and_the_example_suite_scores_its_test_set(tmp_path: Path) -> None:
    src = FIXTURES / "vqa_rad"
    shutil.copytree(src, tmp_path / "vqa-rad")
    path = tmp_path / "vqa-rad" / "VQA_RAD Dataset Public.json"
    records = json.loads(path.read_text())
    kinds = ["test_freeform", "test_para", "para", "freeform"] * 6
    extra = [dict(records[0], qid=10 + i, phrase_type=p, question=f"Is it view {i}?") for i, p in enumerate(kinds)]
    path.write_text(json.dumps(records + extra))
    items = read_dataset("vqa_rad", path)
    test_ids = {f"vqarad-{10 + i}" for i, p in enumerate(kinds) if p.startswith("test_")}
    assert {it.id for it in items if it.split == "test"} == test_ids and len(test_ids) == 12
    assert {it.id for it in items if it.split == "train"} == {it.id for it in items} - test_ids
    example = yaml.safe_load((Path(__file__).parent.parent / "objectives" / "vqa-rad.yaml").read_text())
    assert example["dataset"]["filter"] == {"split": "test"}
    example["dataset"]["path"] = str(path)
    suite = parse_suite(example)
    tested = load_items(suite, tmp_path)
    assert {it.id for it in tested} == test_ids
    search, holdout = (load_items(suite, tmp_path, split=s) for s in ("search", "holdout"))
    assert {it.id for it in search} | {it.id for it in holdout} == {it.id for it in tested}
    assert not {it.id for it in search} & {it.id for it in holdout}
    path.write_text(json.dumps([dict(records[0], phrase_type="test_other")]))
    with pytest.raises(UserError, match="record 1: phrase_type 'test_other' is not one of freeform, para"):
        read_dataset("vqa_rad", path)


def test_ids_digest_is_order_free() -> None:
    assert ids_digest(["b", "a"]) == ids_digest(["a", "b"]) != ids_digest(["a"])


def test_a_study_refuses_a_holdout_that_is_its_search_split(tmp_path: Path, toyworld_small: Path) -> None:
    data = spec_dict(tmp_path, toyworld_small)
    data["objectives"][0]["holdout_split"] = "search"
    with pytest.raises(UserError, match=r"objectives\[0\].holdout_split: suite 'toy-harmful-general': the "
                                        r"holdout split is the search split \('search'\)"):
        study_spec_from_dict(data, base_dir=tmp_path, where="t.yaml")


# -- a study on a single-file suite: validate proves the splits disjoint ------------------------------------


def _single_file_suite(tmp: Path, world: Path) -> Path:
    """The toy world's general harmful requests of both evaluation splits in ONE file without a split:
    the suite partitions it."""
    lines = [line for split in ("search", "holdout")
             for line in (world / "data" / split / "harmful_general.jsonl").read_text().splitlines()]
    data = tmp / "bench" / "harmful.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "split"}) + "\n"
                            for line in lines))
    suite = tmp / "suites" / "one-file-harmful.yaml"
    suite.parent.mkdir()
    suite.write_text(yaml.safe_dump({
        "name": "one-file-harmful", "metric": "safety",
        "dataset": {"format": "jsonl", "path": str(data)},
        "partition": {"search": 0.3, "holdout": 0.7, "seed": 0},
        "judge": {"type": "keyword"}, "generation": {"max_new_tokens": 16}}))
    return suite


@pytest.fixture(scope="module")
def single_file_study(toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("splits")
    suite = _single_file_suite(tmp, toyworld_small)
    data = spec_dict(tmp, toyworld_small, subset=8, n_trials=2)
    data["objectives"][0].update(suites=[str(suite)], subset=12, holdout_subset=30)
    spec = write_spec(tmp / "studies" / "t.yaml", data)
    url = f"sqlite:///{tmp / 'st' / 'safesearch.db'}"
    main(["run", str(spec), "--storage", url])
    return {"tmp": tmp, "spec": spec, "url": url, "suite": suite}


def test_validate_reports_disjoint_n_per_split_and_export_records_the_ids(
    single_file_study: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    url = single_file_study["url"]
    code, out, err = run(["validate", "t", "--storage", url, "--no-references"], capsys)
    assert code == 0, err
    assert ("suite one-file-harmful: search 12 items (search), holdout 30 items (holdout), none shared; "
            "partition (holdout 0.7, search 0.3; seed 0)") in err
    assert "suite toy-benign: search 8 items (search), holdout 8 items (holdout), none shared" in err
    study = optuna.load_study(study_name="t", storage=url)
    searched, held = study.user_attrs[SEARCH_ITEMS_ATTR], study.user_attrs[HOLDOUT_ITEMS_ATTR]
    assert searched["one-file-harmful@search[12]"]["n"] == 12
    assert held["one-file-harmful@holdout[30]"]["n"] == 30
    out_dir = single_file_study["tmp"] / "export"
    code, _, err = run(["export", "t", "--trial", "0", "--out", out_dir, "--storage", url], capsys)
    assert code == 0, err
    items = json.loads((out_dir / "safesearch.json").read_text())["study"]["items"]
    assert items == {"search": searched, "holdout": held}
    assert len(items["holdout"]["one-file-harmful@holdout[30]"]["ids_sha256"]) == 64


def test_a_changed_data_file_is_refused_by_workers_and_validate(
    single_file_study: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The items a study searched are recorded: a worker or validate reading other items says so."""
    tmp = single_file_study["tmp"]
    import sqlite3

    copy_db = tmp_path / "copy.db"
    with sqlite3.connect(tmp / "st" / "safesearch.db") as src, sqlite3.connect(copy_db) as dst:
        src.backup(dst)  # the database and its write-ahead log, as one file
    data = Path(yaml.safe_load(single_file_study["suite"].read_text())["dataset"]["path"])
    original = data.read_text()
    try:
        data.write_text("".join(line + "\n" for line in original.splitlines()[:100]))
        for args in (["validate", "t", "--no-references"], ["worker", single_file_study["spec"]]):
            code, _, err = run([*args, "--storage", f"sqlite:///{copy_db}"], capsys)
            assert code == 2 and err.count("\n") == 1, err
            assert err.startswith("error: suite 'one-file-harmful' (split search): the items read here (")
            assert "are not the 12 the study searched" in err
    finally:
        data.write_text(original)


def test_validate_refuses_a_holdout_that_shares_items_with_the_search(
    toyworld_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A published split whose holdout file holds the search file's items (a copy): one line naming the
    suite, nothing scored, nothing stored."""
    world = tmp_path / "world"
    (world / "data").mkdir(parents=True)
    for split in ("search", "holdout"):
        shutil.copytree(toyworld_small / "data" / split, world / "data" / split)
    shutil.copy(world / "data" / "search" / "benign.jsonl", world / "data" / "holdout" / "benign.jsonl")
    data = spec_dict(tmp_path, toyworld_small, subset=6, n_trials=1, baselines={"zero": True})
    data["data_root"] = str(world)
    spec = write_spec(tmp_path / "t.yaml", data)
    url = f"sqlite:///{tmp_path / 'db.db'}"
    code, _, err = run(["run", spec, "--storage", url], capsys)
    assert code == 0, err
    code, _, err = run(["validate", "t", "--storage", url, "--no-references"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: suite 'toy-benign': its holdout split (holdout) shares 6 of its 6 items with "
                          "the search split (search), e.g. 'benign-search-")
    study = optuna.load_study(study_name="t", storage=url)
    assert HOLDOUT_ITEMS_ATTR not in study.user_attrs
    assert not [k for k in study.user_attrs if k.startswith("holdout.")]


def test_eval_scores_the_split_it_is_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from eval_models import chat_model

    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "text": f"Explain thing {i}.", "kind": "benign"}) + "\n"
                            for i in range(40)))
    suite = tmp_path / "bench.yaml"
    suite.write_text(yaml.safe_dump({"metric": "over_refusal", "dataset": {"format": "jsonl", "path": str(data)},
                                     "generation": {"max_new_tokens": 4}}))
    n = {}
    for split in (None, "search", "holdout"):
        report = tmp_path / f"{split}.json"
        code, out, err = run(["eval", chat_model(), "--suite", suite, "--json", report,
                              *(["--split", split] if split else [])], capsys)
        assert code == 0, err
        got = json.loads(report.read_text())["suites"][0]
        assert got["split"] == (split or "all") and got["split_rule"].startswith("partition")
        n[split] = {o["id"] for o in got["items"]}
        assert (split or "all") in out
    assert n["search"] | n["holdout"] == n[None] and not n["search"] & n["holdout"]
    code, _, err = run(["eval", chat_model(), "--suite", suite, "--split", "dev"], capsys)
    assert code == 2 and err == ("error: --split: suite 'bench': no split 'dev' in this suite's partition "
                                 "(known: holdout, search)\n")
