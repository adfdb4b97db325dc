"""Every metric and attack on both image-text families the paper's models come in (Qwen2.5-VL: Lingshu,
HuatuoGPT-Vision; LLaVA, llava-hf layout: LLaVA-Med converted), on tiny random checkpoints built from
configs, evaluated in batches and one prompt at a time: the outcomes must be identical.

This machine has no torchvision, so the Qwen2.5-VL checkpoint loads through the image-only processor
(safesearch.backends.processors); that is the path every CPU user of the project takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_models import FIXTURES, llava_model, qwen2_5_vl_model
from PIL import Image

from safesearch.backends.base import Prompt
from safesearch.backends.transformers import TransformersBackend
from safesearch.evaluate import _prompts, evaluate, load_items
from safesearch.suites import parse_suite

JSONL = FIXTURES / "jsonl"
FAMILIES = {"llava": llava_model, "qwen2_5_vl": qwen2_5_vl_model}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, TransformersBackend, TransformersBackend]:
    """(name, batched backend, one-at-a-time backend on the same weights)."""
    batched = TransformersBackend.from_pretrained(FAMILIES[request.param](), batch_size=8)
    single = TransformersBackend(batched.model, processor=batched.processor, batch_size=1)
    return request.param, batched, single


@pytest.fixture(scope="module")
def image_mcq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PMC-VQA / OmniMedVQA style: a question about an image, four options, scored by log-likelihood."""
    root = tmp_path_factory.mktemp("image-mcq")
    lines = []
    for i, (r, record) in enumerate(zip((0, 90, 180, 250), json.loads(
            "[" + ",".join((JSONL / "mcq_medical.jsonl").read_text().splitlines()) + "]"), strict=False)):
        # Sizes differ, so that the images make different numbers of image tokens (Qwen2.5-VL).
        Image.new("RGB", (40 + 20 * i, 60), (r, 255 - r, 40)).save(root / f"img{i}.png")
        lines.append(json.dumps({"id": f"img-mcq-{i}", "kind": "mcq", "text": record["text"],
                                 "options": record["options"], "answer": record["answer"], "image": f"img{i}.png"}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    return root / "items.jsonl"


def _suites(image_mcq: Path) -> dict[str, dict]:
    gen = {"max_new_tokens": 6}
    return {
        "safety-direct": {"metric": "safety", "attack": "direct", "generation": gen,
                          "dataset": {"format": "jsonl", "path": str(JSONL / "harmful_general.jsonl")}},
        "safety-figstep": {"metric": "safety", "attack": "figstep", "generation": gen,
                           "dataset": {"format": "jsonl", "path": str(JSONL / "harmful_medical.jsonl")}},
        "safety-qr": {"metric": "safety", "attack": "qr", "generation": gen, "dataset": {
            "format": "mmsafetybench", "path": str(FIXTURES / "mmsafetybench/data/processed_questions")}},
        "over-refusal": {"metric": "over_refusal", "generation": gen,
                         "dataset": {"format": "jsonl", "path": str(JSONL / "benign.jsonl")}},
        "mcq-image": {"metric": "mcq_loglik", "dataset": {"format": "jsonl", "path": str(image_mcq)}},
        "vqa-closed": {"metric": "vqa_closed", "generation": {"max_new_tokens": 3}, "dataset": {
            "format": "vqa_rad", "path": str(FIXTURES / "vqa_rad/VQA_RAD Dataset Public.json")}},
    }


SUITES = ("safety-direct", "safety-figstep", "safety-qr", "over-refusal", "mcq-image", "vqa-closed")


@pytest.mark.parametrize("suite_name", SUITES)
def test_batched_equals_one_at_a_time(
    suite_name: str, family: tuple[str, TransformersBackend, TransformersBackend], image_mcq: Path, tmp_path: Path
) -> None:
    name, batched, single = family
    raw = _suites(image_mcq)[suite_name]
    raw["dataset"]["split"] = ""  # every item: these fixtures are not split
    suite = parse_suite({"name": suite_name, **raw}, source=tmp_path / f"{suite_name}.yaml")
    items = load_items(suite, tmp_path)
    cache = tmp_path / "cache"
    if suite.attack != "direct" or suite.metric in ("mcq_loglik", "vqa_closed"):
        prompts = _prompts(suite, items, cache) if suite.metric != "mcq_loglik" else []
        assert all(isinstance(p, Prompt) and p.images for p in prompts)
    got = evaluate(batched, suite, items, image_cache=cache)
    once = evaluate(single, suite, items, image_cache=cache)
    assert got.metrics["n"] == len(items) >= 2
    assert got.items == once.items, f"{name} {suite_name}: batched and one-at-a-time outcomes differ"
    if suite.metric != "mcq_loglik":  # the random models say something: outcomes are not all empty
        assert any(o.response for o in got.items)


def test_image_mcq_sees_the_image(family: tuple[str, TransformersBackend, TransformersBackend],
                                  tmp_path: Path) -> None:
    """Same question and options, different image: different option scores (the image reaches the model)."""
    _, batched, _ = family
    images = [Image.new("RGB", (56, 56), (0, 0, 0)), Image.new("RGB", (56, 56), (255, 255, 255))]
    scores = batched.loglikelihood([(Prompt("is there a fracture ?", images=(im,)), "yes") for im in images])
    assert scores[0][1] == scores[1][1] >= 1 and scores[0][0] != scores[1][0]


# -- releases built on their own code ----------------------------------------------------------------

# config.json keys of LLaVA-Med v1.5 and of the original HuatuoGPT-Vision (the original LLaVA code base's
# layout: no vision_config, the tower named by mm_vision_tower): transformers has neither class.
CUSTOM_CODE = {
    "llava-med": {"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
                  "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu"},
    "huatuogpt-vision": {"model_type": "llava_qwen2", "architectures": ["LlavaQwen2ForCausalLM"],
                         "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu"},
}


def custom_code_release(root: Path, name: str) -> Path:
    """A tiny checkpoint whose config.json says what such a release's does (its tensors: a tiny Llama's)."""
    from tiny_models import build_tiny_llama

    path = build_tiny_llama(root / name, seed=3)
    config = json.loads((path / "config.json").read_text())
    config.update(CUSTOM_CODE[name])
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name", sorted(CUSTOM_CODE))
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_custom_code_release_is_refused_in_one_line(name: str, backend: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from safesearch.cli import main

    model = custom_code_release(tmp_path, name)
    suite = tmp_path / "s.yaml"
    suite.write_text(json.dumps({"metric": "safety", "attack": "figstep", "dataset": {
        "format": "jsonl", "path": str(JSONL / "harmful_general.jsonl")}}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model), "--suite", str(suite), "--data-root", str(tmp_path), "--backend", backend])
    err = capsys.readouterr().err
    model_type, arch = CUSTOM_CODE[name]["model_type"], CUSTOM_CODE[name]["architectures"][0]
    assert e.value.code != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        f"error: the model at '{model}' cannot be evaluated: model_type '{model_type}' ({arch}) is not a model "
        "type transformers knows: a release built on its authors' own code; an image-text model in the original "
        "LLaVA code's layout; convert it to its transformers-native class first (LLaVA-style releases: the "
        "llava-hf layout, LlavaForConditionalGeneration; see docs/grafting.md, 'The paper's models')\n")


def test_eval_cli_on_qwen2_5_vl_caches_figstep_under_the_data_root(tmp_path: Path) -> None:
    """`safesearch eval` as a user runs it (a fresh process, another working directory): the video note
    once, the FigStep images under --data-root, nothing where it ran."""
    import os
    import subprocess
    import sys

    data, cwd = tmp_path / "data", tmp_path / "cwd"
    data.mkdir()
    cwd.mkdir()
    suite = tmp_path / "figstep.yaml"
    suite.write_text(json.dumps({"metric": "safety", "attack": "figstep", "generation": {"max_new_tokens": 4},
                                 "dataset": {"format": "jsonl", "path": str(JSONL / "harmful_general.jsonl")}}))
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "safesearch", "eval", str(qwen2_5_vl_model()), "--suite", str(suite),
         "--data-root", str(data), "--json", str(report)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("note: torchvision is not installed: Qwen2_5_VLProcessor loads without its video "
                             "processor (images work; video inputs are unavailable)") == 1
    assert "Traceback" not in done.stderr
    result = json.loads(report.read_text())["suites"][0]
    assert result["metrics"]["n"] == 4
    assert len(list((data / "storage" / "cache" / "attack-images").glob("*.png"))) == 4
    assert list(cwd.iterdir()) == []
