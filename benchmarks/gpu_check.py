"""The vLLM backend on one GPU (H100/H200, under 8 minutes): per-trial merge and evaluation times and the
merge's effective memory bandwidth, on a random Qwen2-shaped model of about 1B parameters, plus two checks.

Nothing is downloaded. Steps, each timed:

1. three checkpoints of a random Qwen2 (Qwen2.5-1.5B's shape with 20 layers: 1.17B parameters, tied
   embeddings, bf16), generated on the GPU tensor by tensor and written as safetensors: ``unaligned``,
   ``aligned`` = unaligned + noise, ``medical`` = aligned + noise; a small word-level tokenizer with a chat
   template;
2. ``VLLMGrafted`` on the graft (anchor medical; safety = aligned - unaligned, medical = medical - aligned;
   one group per layer): the engine, then the merger inside vLLM's worker (anchor and vectors on the GPU);
3. trials: trial 0 merges all-zero coefficients (the anchor copied back: the plain-copy yardstick), the
   others random coefficients; each prints the merge's device time, the bytes it moves (anchor + live
   vectors read, parameter written), their effective bandwidth, then greedy generation and option
   log-likelihoods on the merged model;
4. checks: (a) the direct write (``load_weights``) gives the outputs of vLLM's layerwise reload for the
   same coefficients; (b) merging A then B in the live engine gives the outputs of a fresh engine on the
   exported checkpoint of B. Either failing exits non-zero.

Run: ``bash benchmarks/gpu_check.sh`` (or this script with ``--help``). On a CPU it runs too, with tiny
shapes (``--tiny``), as a dry run of the same code (check (a) needs a GPU and is skipped there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
import transformers  # noqa: E402

from safesearch.backends.vllm import VLLMBackend, VLLMGrafted, apply_graft  # noqa: E402
from safesearch.export import PlannedTensor, export_merged, write_safetensors  # noqa: E402
from safesearch.graftspec import spec_from_dict  # noqa: E402
from safesearch.prompts import mcq_answer_text, mcq_user_text  # noqa: E402
from safesearch.toyworld.tokenizer import build_tokenizer  # noqa: E402

T0 = time.perf_counter()
_VOCABULARY = (
    "the patient dose drug child fever pain heart blood test scan doctor nurse treat acute chronic "
    "infection virus bacteria tablet injection daily weekly risk safe harm allergy symptom sign lung "
    "kidney liver brain bone skin eye ear throat stomach muscle nerve cell gene protein sugar salt water "
    "how what which why when where is are can should does give take stop start increase reduce avoid"
)
WORDS = tuple(_VOCABULARY.split(" "))


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def qwen2_config(args: argparse.Namespace) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"],
    )


def _noise(key: str, salt: int, shape: tuple[int, ...], device: str) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:7], "little")
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def write_family(root: Path, config: transformers.Qwen2Config, device: str) -> dict[str, Path]:
    """unaligned, aligned, medical: random bf16 weights, each fine-tune adding its own small noise."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in transformers.Qwen2ForCausalLM(config).named_parameters()}
    planned = [PlannedTensor(n, s, torch.bfloat16) for n, s in shapes.items()]
    tokenizer = build_tokenizer([" ".join(WORDS), "( a ) ( b ) ( c ) ( d ) answer : sorry , i cannot"])
    paths = {}
    for level, name in enumerate(("unaligned", "aligned", "medical")):
        d = root / name
        d.mkdir(parents=True)
        config.save_pretrained(d)
        transformers.GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0).save_pretrained(d)
        tokenizer.save_pretrained(d)

        def produce(key: str, level: int = level) -> torch.Tensor:
            shape = shapes[key]
            base = 1.0 if key.endswith("norm.weight") else 0.0  # RMSNorm weights around 1
            t = base + _noise(key, 0, shape, device) * 0.02
            for salt in range(1, level + 1):
                t += _noise(key, salt, shape, device) * 2e-3
            return t.to(torch.bfloat16).cpu()

        write_safetensors(d / "model.safetensors", planned, produce)
        paths[name] = d
    return paths


def prompts(rng: random.Random, n: int, words: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + " ?" for _ in range(n)]


def mcq_requests(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for q in prompts(rng, n, (12, 30)):
        options = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        out += [(mcq_user_text(q, options), mcq_answer_text(options, i)) for i in range(4)]
    return out


def merge_bytes(merger, coefs) -> int:
    """What an ideal in-place merge moves: each merged tensor's anchor and live vectors read, the result written."""
    total = 0
    group_of = merger.grouping.group_of
    for name, a in merger.anchor.items():
        live = sum(1 for v, ts in merger.vectors.items() if name in ts and coefs[v][group_of[name]] != 0)
        total += a.numel() * a.element_size() * (2 + live)
    return total


def probe(backend, texts: list[str], requests: list[tuple[str, str]]) -> tuple[list[list[int]], list]:
    """Greedy token ids (the random model writes ids the small tokenizer cannot spell) and log-likelihoods."""
    backend.generate(texts, 32)
    return backend.last_tokens, backend.loglikelihood(requests)


def set_mode_and_apply(worker, coefs, mode: str) -> float:
    state = worker._safesearch_graft
    old, state.mode = state.mode, mode
    try:
        return apply_graft(worker, coefs)
    finally:
        state.mode = old


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a CPU dry run of this script)")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--mcq", type=int, default=64, help="MCQ questions (4 options each) per trial")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start, slower decode)")
    ap.add_argument("--kernel", choices=("eager", "compiled"), default="eager")
    ap.add_argument("--skip-export-check", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab = 64, 2, 128, 2, 1, 512
        args.prompts, args.mcq, args.max_new_tokens = min(args.prompts, 16), min(args.mcq, 4), 16
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    import vllm

    gpu = torch.cuda.get_device_name(0) if cuda else "none (CPU dry run)"
    log(f"torch {torch.__version__}, vllm {vllm.__version__}, GPU: {gpu}")
    root = Path(tempfile.mkdtemp(prefix="safesearch-gpu-check-", dir=args.dir))
    failures: list[str] = []
    try:
        config = qwen2_config(args)
        paths = write_family(root, config, device)
        size = (paths["medical"] / "model.safetensors").stat().st_size
        log(f"wrote 3 random Qwen2 checkpoints ({size / 1e9:.2f} GB each, bf16) under {root}")
        spec = spec_from_dict({
            "anchor": "medical",
            "checkpoints": {n: str(p) for n, p in paths.items()},
            "vectors": {"safety": {"diff": "aligned - unaligned"}, "medical": {"diff": "medical - aligned"}},
            "groups": {"preset": "layer"},
            "dtype": "bfloat16",
        })
        engine = {"max_model_len": 1024, "enforce_eager": args.enforce_eager or not cuda}
        if cuda:
            engine["gpu_memory_utilization"] = args.gpu_memory_utilization
        else:
            engine["kv_cache_memory_bytes"] = 256 << 20
        t = time.perf_counter()
        g = VLLMGrafted(spec, kernel=args.kernel, **engine)
        info = g.info
        n_params = sum(a.numel() for a in g.merger.anchor.values())
        log(f"engine + merger in the worker: {time.perf_counter() - t:.1f}s; {n_params / 1e9:.3f}B merged parameters "
            f"on {info['device']}, mode {info['mode']}, resident {info['resident_bytes'] / 1e9:.2f} GB, "
            f"kernel {args.kernel}")

        rng = random.Random(0)
        texts = prompts(rng, args.prompts, (20, 60))
        requests = mcq_requests(rng, args.mcq)
        groups = g.merger.active_groups()
        print(f"{'trial':>5} {'merge ms':>9} {'apply ms':>9} {'GB moved':>9} {'GB/s':>7} {'gen s':>7} {'tok/s':>8} "
              f"{'loglik s':>9} {'eval s':>7}", flush=True)
        for trial in range(args.trials):
            table = {} if trial == 0 else {
                v: {gname: rng.uniform(0.0, 2.0) if v == "safety" else rng.uniform(-0.5, 0.5) for gname in gs}
                for v, gs in groups.items()
            }
            coefs = g.merger.parse(table)
            t0 = time.perf_counter()
            g.apply(coefs)
            t1 = time.perf_counter()
            g.backend.generate(texts, args.max_new_tokens)
            t2 = time.perf_counter()
            g.backend.loglikelihood(requests)
            t3 = time.perf_counter()
            moved = merge_bytes(g.merger, coefs)
            tokens = sum(len(t) for t in g.backend.last_tokens)
            print(f"{trial:>5} {g.last_merge_s * 1e3:>9.1f} {(t1 - t0) * 1e3:>9.1f} {moved / 1e9:>9.2f} "
                  f"{moved / g.last_merge_s / 1e9:>7.0f} {t2 - t1:>7.2f} {tokens / (t2 - t1):>8.0f} {t3 - t2:>9.2f} "
                  f"{t3 - t1:>7.2f}" + ("  (all zero: anchor copied back)" if trial == 0 else ""), flush=True)

        a = g.merger.parse({"safety": {"*": 1.0}, "medical": {"*": -0.2}})
        b = g.merger.parse({"safety": {"*": 0.5, f"layer.{args.layers - 1}": 1.5}, "medical": {"*": 0.3}})
        few_texts, few_requests = texts[:16], requests[:32]
        if cuda and info["mode"] == "direct":
            g.apply(b)
            direct = probe(g.backend, few_texts, few_requests)
            seconds = g.backend.llm.collective_rpc(set_mode_and_apply, args=(b, "layerwise"))[0]
            g.backend.llm.reset_prefix_cache()
            layerwise = probe(g.backend, few_texts, few_requests)
            ok = direct == layerwise
            log(f"check (a) direct write == layerwise reload: {'PASS' if ok else 'FAIL'} "
                f"(layerwise merge {seconds * 1e3:.1f} ms)")
            if not ok:
                failures.append("direct != layerwise")
        else:
            log("check (a) direct write == layerwise reload: skipped (the direct write needs CUDA, unquantized)")
        if not args.skip_export_check:
            g.apply(a)
            g.apply(b)
            live = probe(g.backend, few_texts, few_requests)
            t = time.perf_counter()
            out = export_merged(g.merger, b, root / "export-b")
            t_export = time.perf_counter() - t
            fresh = VLLMBackend.from_pretrained(out, **engine)
            t_fresh = time.perf_counter() - t - t_export
            fresh_out = probe(fresh, few_texts, few_requests)
            fresh.close()
            ok = fresh_out == live
            log(f"check (b) merge A then B live == fresh engine on the export of B: {'PASS' if ok else 'FAIL'} "
                f"(export {t_export:.1f}s, fresh engine {t_fresh:.1f}s)")
            if not ok:
                failures.append("live != fresh export")
                diff = sum(x != y for x, y in zip(live[0], fresh_out[0], strict=True))  # token id lists
                ll = max(abs(x[0] - y[0]) for x, y in zip(live[1], fresh_out[1], strict=True))
                log(f"  {diff}/{len(live[0])} generations differ; largest log-likelihood difference {ll:.3g}")
        g.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log("done: " + ("all checks passed" if not failures else "FAILED: " + ", ".join(failures)))
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
