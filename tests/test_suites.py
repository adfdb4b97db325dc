"""Suites as data (the shipped ones load; mistakes name file and field), seeded subsets, and
:func:`evaluate` end to end: text suites, FigStep and VQA on a tiny image-text model, determinism."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from eval_models import FIXTURES, chat_model, llava_model

from safesearch.backends.transformers import TransformersBackend
from safesearch.datasets import read_dataset
from safesearch.errors import UserError
from safesearch.evaluate import build_judge, evaluate, load_items, select
from safesearch.judges import HttpJudge, KeywordJudge
from safesearch.suites import SubsetSpec, find_suite, load_suite, parse_suite

OBJECTIVES = Path(__file__).resolve().parent.parent / "objectives"


@pytest.mark.parametrize("path", sorted(OBJECTIVES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_suites_load(path: Path) -> None:
    suite = load_suite(str(path))
    assert suite.name == path.stem and suite.source == path


def test_toy_suites_match_the_quick_check_settings() -> None:
    files = {
        "toy-harmful-general": "harmful_general",
        "toy-harmful-medical": "harmful_medical",
        "toy-benign": "benign",
    }
    for name, stem in files.items():
        suite = load_suite(name, [OBJECTIVES])
        assert (
            suite.generation.max_new_tokens == 16
            and suite.judge.type == "keyword"
            and suite.subset.size is None
        )
        assert suite.dataset.resolved_path(Path("/r")) == Path(
            f"/r/data/holdout/{stem}.jsonl"
        )
    mcq = load_suite("toy-mcq-medical", [OBJECTIVES])
    assert mcq.metric == "mcq_loglik" and mcq.dataset.path.endswith("mcq_medical.jsonl")


BASE = {"metric": "safety", "dataset": {"format": "jsonl", "path": "x.jsonl"}}


def _with(**changes: object) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"judge__type": "oracle"},
            r"s.yaml: judge.type: unknown value 'oracle' \(known: keyword, guard, http\)",
        ),
        (
            {"dataset__format": "parquet"},
            r"s.yaml: dataset.format: unknown value 'parquet' \(known: jsonl, text, pubmedqa",
        ),
        ({"metric": "bleu"}, r"s.yaml: metric: unknown value 'bleu'"),
        ({"attack": "jailbreak"}, r"attack: unknown value 'jailbreak'"),
        ({"dataset__shape": 1}, r"s.yaml: dataset.shape: unknown field"),
        ({"subset__size": 0}, r"subset.size: should be at least 1"),
        ({"subset__size": "ten"}, r"subset.size: should be int, got str"),
        ({"generation__early_stop": "yes"}, r"generation.early_stop: should be bool"),
        ({"dataset__path": "d/{split}.jsonl"}, r"dataset.split: is required: the path contains \{split\}"),
        ({"dataset__options": {"cop_base": 0}}, r"dataset.options: unknown option 'cop_base' for jsonl"),
        ({"dataset__filter": {"colour": "red"}}, r"dataset.filter: cannot filter on 'colour'"),
        ({"judge__type": "guard"}, r"judge.model: is required"),
        ({"judge__type": "http", "judge__model": "m"}, r"judge.base_url: is required"),
        (
            {"judge__type": "guard", "judge__model": "g", "judge__template": "{request}"},
            r"judge.template: should contain \{response\}",
        ),
        (
            {"judge__type": "guard", "judge__model": "g", "judge__rules": "gpt"},
            r"judge.rules: unknown preset 'gpt'",
        ),
        (
            {
                "judge__type": "guard",
                "judge__model": "g",
                "judge__rules": [{"pattern": "(", "verdict": "harmful"}],
            },
            r"rules\[0\].pattern: bad regular expression",
        ),
        (
            {"metric": "over_refusal", "judge__type": "guard", "judge__model": "g"},
            r"judge: over_refusal needs a judge whose rules give refusal",
        ),
        ({"metric": "mcq_loglik", "attack": "figstep"}, r"attack: figstep disguises requests"),
    ],
)
def test_suite_mistakes_name_the_file_and_field(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        parse_suite(_with(**changes), source=Path("s.yaml"))
    assert "\n" not in str(e.value)


def test_suite_names_resolve_to_objectives(tmp_path: Path) -> None:
    assert find_suite("toy-benign", [OBJECTIVES]) == OBJECTIVES / "toy-benign.yaml"
    with pytest.raises(UserError, match=r"unknown suite 'nope': no nope.yaml in .* \(known: .*toy-benign"):
        find_suite("nope", [OBJECTIVES])
    (tmp_path / "bad.yaml").write_text("metric: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_suite("bad", [tmp_path])


# -- subsets -----------------------------------------------------------------------------------------


def test_seeded_subset_is_stable_nested_and_order_free() -> None:
    items = read_dataset("medsafetybench", FIXTURES / "medsafetybench" / "datasets" / "test") * 1
    items = [replace(items[i % 4], id=f"item-{i:03d}") for i in range(40)]
    chosen = select(items, SubsetSpec(size=10, seed=3))
    assert len(chosen) == 10 and [it.id for it in chosen] == sorted(it.id for it in chosen)  # file order
    assert select(items, SubsetSpec(size=10, seed=3)) == chosen
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert {it.id for it in select(shuffled, SubsetSpec(size=10, seed=3))} == {it.id for it in chosen}
    assert {it.id for it in select(items, SubsetSpec(size=10, seed=3), limit=4)} < {it.id for it in chosen}
    assert {it.id for it in select(items, SubsetSpec(size=10, seed=4))} != {it.id for it in chosen}
    assert select(items, SubsetSpec()) == items


def _suite(tmp_path: Path, **raw: object):
    return parse_suite(raw, source=tmp_path / "s.yaml")


def test_metric_and_item_kind_must_agree(tmp_path: Path) -> None:
    suite = _suite(
        tmp_path,
        metric="over_refusal",
        dataset={"format": "xstest", "path": str(FIXTURES / "xstest/xstest_prompts.csv")},
    )
    with pytest.raises(
        UserError,
        match=r"item 'xstest-3' is a harmful item, but metric over_refusal scores benign items \(add dataset.filter.kind: benign\)",
    ):
        load_items(suite, tmp_path)
    ok = replace(suite, dataset=replace(suite.dataset, filter={"kind": ("benign",)}))
    assert [it.id for it in load_items(ok, tmp_path)] == ["xstest-1", "xstest-2"]


# -- evaluate ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat() -> TransformersBackend:
    return TransformersBackend.from_pretrained(chat_model())


@pytest.fixture(scope="module")
def llava() -> TransformersBackend:
    return TransformersBackend.from_pretrained(llava_model())


def test_safety_suite_is_deterministic(tmp_path: Path, chat: TransformersBackend) -> None:
    suite = _suite(
        tmp_path,
        metric="safety",
        dataset={"format": "jsonl", "path": str(FIXTURES / "jsonl/harmful_general.jsonl")},
    )
    items = load_items(suite, tmp_path)
    first = evaluate(chat, suite, items)
    second = evaluate(
        TransformersBackend.from_pretrained(chat_model(), batch_size=1), suite, load_items(suite, tmp_path)
    )
    assert first == second  # per-item outcomes and metrics, whatever the batch size or the load
    assert [o.verdict for o in first.items] == ["refusal", "refusal", "compliance", "compliance"]
    assert first.metrics == {"safety": 0.5, "asr": 0.5, "n": 4, "n_unjudged": 0}


def test_mcq_suites_loglik_and_generate(tmp_path: Path, chat: TransformersBackend) -> None:
    ds = {"format": "jsonl", "path": str(FIXTURES / "jsonl/mcq_medical.jsonl")}
    loglik = evaluate(
        chat,
        _suite(tmp_path, metric="mcq_loglik", dataset=ds),
        load_items(_suite(tmp_path, metric="mcq_loglik", dataset=ds), tmp_path),
    )
    assert [o.choice for o in loglik.items][:2] == [0, 1]  # the two questions it was taught
    assert set(loglik.metrics) == {"acc", "acc_norm", "n"} and loglik.metrics["acc"] >= 2 / 3
    gen_suite = _suite(tmp_path, metric="mcq_generate", dataset=ds, generation={"max_new_tokens": 12})
    generated = evaluate(chat, gen_suite, load_items(gen_suite, tmp_path))
    assert [o.choice for o in generated.items][:2] == [0, 1] and generated.items[0].response.startswith(
        "the answer is albuterol"
    )


def test_unjudged_items_are_never_safe(tmp_path: Path, chat: TransformersBackend) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)  # accepts, never answers
        judge = HttpJudge(
            f"http://127.0.0.1:{s.getsockname()[1]}/v1", "m", timeout=0.2, retries=1, backoff=0.01
        )
        suite = _suite(
            tmp_path,
            metric="safety",
            dataset={"format": "jsonl", "path": str(FIXTURES / "jsonl/harmful_medical.jsonl")},
        )
        result = evaluate(chat, suite, load_items(suite, tmp_path), judge=judge)
    assert result.metrics == {"safety": None, "asr": None, "n": 3, "n_unjudged": 3}
    assert all(o.verdict == "unjudged" and o.error for o in result.items)


def test_figstep_suite_end_to_end_on_an_image_text_model(
    tmp_path: Path, llava: TransformersBackend, chat: TransformersBackend
) -> None:
    suite = _suite(
        tmp_path,
        metric="safety",
        attack="figstep",
        figstep={"size": 112, "font_size": 16},
        dataset={"format": "hexphi", "path": str(FIXTURES / "hexphi")},
    )
    items = load_items(suite, tmp_path)
    cache = tmp_path / "figstep"
    result = evaluate(llava, suite, items, image_cache=cache)
    assert len(list(cache.glob("*.png"))) == 3 and result.metrics["n"] == 3
    assert result == evaluate(llava, suite, items, image_cache=cache)  # cached images, same outcomes
    with pytest.raises(UserError, match="shows images, but the model takes text only"):
        evaluate(chat, suite, items, image_cache=cache)


def _pixels(path_or_image: Any) -> bytes:
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return image.convert("RGB").tobytes()


def test_safebench_figstep_types_the_instruction_not_the_question(
    tmp_path: Path, llava: TransformersBackend
) -> None:
    """FigStep as published: SafeBench's paraphrased instruction ("Steps to ...") is what the image carries,
    the text turn is FigStep's, and the judge is shown the question."""
    from safesearch.evaluate import _prompts
    from safesearch.figstep import FIGSTEP_PROMPT, FigStepStyle, render

    suite = _suite(tmp_path, metric="safety", attack="figstep", figstep={"size": 112, "font_size": 16},
                   dataset={"format": "safebench", "path": str(FIXTURES / "safebench/safebench.csv")})
    items = load_items(suite, tmp_path)
    first = items[0]
    assert first.instruction and first.instruction != first.text
    prompt = _prompts(suite, items, tmp_path / "cache")[0]
    style = FigStepStyle(size=112, font_size=16)
    assert prompt.text == FIGSTEP_PROMPT
    assert _pixels(prompt.images[0]) == _pixels(render(first.instruction, style))
    assert _pixels(prompt.images[0]) != _pixels(render(first.text, style))
    result = evaluate(llava, suite, items, image_cache=tmp_path / "cache")
    assert result.metrics["n"] == len(items) and all(o.response is not None for o in result.items)


def test_qr_shows_the_data_sets_image_with_its_rephrased_question(tmp_path: Path, llava: TransformersBackend) -> None:
    from safesearch.evaluate import _prompts, attack_notes
    from safesearch.typography import render_typo

    root = FIXTURES / "mmsafetybench" / "data"
    suite = _suite(tmp_path, metric="safety", attack="qr",
                   dataset={"format": "mmsafetybench", "path": str(root / "processed_questions")})
    items = load_items(suite, tmp_path)
    prompts = _prompts(suite, items, tmp_path / "cache")
    first = json.loads((root / "processed_questions" / "01-Illegal_Activitiy.json").read_text())["0"]
    assert prompts[0].text == first["Rephrased Question"]  # SD_TYPO's question
    assert prompts[0].images == (root / "imgs" / "01-Illegal_Activitiy" / "SD_TYPO" / "0.jpg",)
    assert items[0].text == first["Question"] and attack_notes(suite, items) == []
    result = evaluate(llava, suite, items, image_cache=tmp_path / "cache")
    assert result.metrics["n"] == len(items)
    # Without the image folder: the key phrase typed (TYPO), asked with the TYPO question, and said so.
    bare = _suite(tmp_path, metric="safety", attack="qr", dataset={
        "format": "mmsafetybench", "path": str(FIXTURES / "mmsafetybench_no_images" / "processed_questions")})
    items = load_items(bare, tmp_path)
    prompt = _prompts(bare, items, tmp_path / "cache")[0]
    assert prompt.text == items[0].qr.question and items[0].qr.kind == "TYPO"
    assert _pixels(prompt.images[0]) == _pixels(render_typo(items[0].qr.key_phrase))
    assert attack_notes(bare, items) == [
        f"suite 'suite': {len(items)} of {len(items)} items have no MM-SafetyBench image here: their TYPO image "
        "(the key phrase typed) is rendered locally, asked with the TYPO question"]
    with pytest.raises(UserError, match="attack: qr shows MM-SafetyBench's query-relevant images: it needs "
                                        "dataset.format mmsafetybench"):
        _suite(tmp_path, attack="qr", **BASE)


def test_vqa_suite_end_to_end_on_an_image_text_model(tmp_path: Path, llava: TransformersBackend) -> None:
    suite = _suite(
        tmp_path,
        metric="vqa_closed",
        dataset={"format": "vqa_rad", "path": str(FIXTURES / "vqa_rad/VQA_RAD Dataset Public.json")},
        generation={"max_new_tokens": 4},
    )
    result = evaluate(llava, suite, load_items(suite, tmp_path))
    assert [o.answer for o in result.items] == ["No", "yes"] and result.metrics["n"] == 2
    assert all(o.correct is not None and o.response is not None for o in result.items)


def test_relative_paths_use_the_data_root(tmp_path: Path) -> None:
    (tmp_path / "data" / "holdout").mkdir(parents=True)
    shutil.copy(FIXTURES / "jsonl/benign.jsonl", tmp_path / "data/holdout/benign.jsonl")
    suite = _suite(
        tmp_path,
        metric="over_refusal",
        dataset={"format": "jsonl", "path": "data/{split}/benign.jsonl", "split": "holdout"},
    )
    assert len(load_items(suite, tmp_path)) == 3
    with pytest.raises(UserError, match=r"nothing at '.*data/holdout/benign.jsonl'"):
        load_items(suite, tmp_path / "elsewhere")


def test_build_judge_from_specs(tmp_path: Path) -> None:
    keyword = build_judge(_suite(tmp_path, judge={"phrases": ["nope"]}, **BASE).judge)
    assert isinstance(keyword, KeywordJudge) and keyword.phrases == ("nope",)
    http = build_judge(
        _suite(
            tmp_path, judge={"type": "http", "base_url": "http://h/v1", "model": "m", "retries": 5}, **BASE
        ).judge
    )
    assert isinstance(http, HttpJudge) and http.retries == 5 and "{response}" in http.template
