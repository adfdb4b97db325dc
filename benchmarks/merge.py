"""What one trial's merge costs, against two yardsticks measured side by side in the same run.

A random-weight Llama of about 1 GB (bf16) is written as three checkpoints (unaligned, aligned = unaligned +
noise, medical = aligned + noise); the toy-world spec (anchor medical, safety = aligned - unaligned,
medical = medical - aligned, one group per layer) is loaded into a :class:`~safesearch.merging.Merger`, and
the live model comes from ``AutoModelForCausalLM.from_pretrained``. Then ``--repeat`` rounds, each running
every arm once in turn (so a burst of load from other processes hits all arms alike), reported as the best
and the median per arm:

* ``copy``: ``param.copy_(anchor)`` for every merged tensor: moves 2 bytes-units per element (read, write);
* ``merge``: one in-place merge of two vectors: reads anchor and two vectors and writes the parameter,
  2 + 2 units; its lower bound is ``copy * (2 + 2) / 2``, the time to move the same bytes by plain copies
  (issue 18's goal: merge <= 1.3x that bound). Arms: the default kernel (``auto``: compiled here when a C++
  compiler works), ``eager``, and eager as it was before issue 18 (bf16 terms cast into a temporary per add,
  not into a resident scratch); every arm's merged weights are checked to be the same bits;
* ``disk`` (left out by ``--kernels-only``): what a mergekit-style search pays per trial: write the merged
  weights as safetensors (fsync) and load them back with ``from_pretrained`` (from a warm page cache, the
  disk path's best case); the full export, which also hashes every input file for its provenance, is timed
  once beside it; and the eager kernel by scratch chunk size.

Peak memory is read from the kernel (VmHWM, reset before the merges) and compared with the budget:
anchor + vectors + model + the scratch buffers. Run: ``.venv/bin/python benchmarks/merge.py`` (about 4
minutes on a 2-core machine; ``--kernels-only --layers 4`` about 2).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from safesearch.export import PlannedTensor, export_merged, write_safetensors
from safesearch.graftspec import spec_from_dict
from safesearch.merging import DEFAULT_CHUNK, Merger, merge_into

GB = 1024**3


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _random(name: str, salt: int, shape: tuple[int, ...]) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:7], "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write_family(root: Path, config: transformers.LlamaConfig, dtype: torch.dtype) -> dict[str, Path]:
    """Three checkpoints of ``config`` written tensor by tensor (never a whole model in memory)."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in transformers.LlamaForCausalLM(config).named_parameters()}
    planned = [PlannedTensor(n, s, dtype) for n, s in shapes.items()]
    paths = {}
    for level, name in enumerate(("unaligned", "aligned", "medical")):
        d = root / name
        d.mkdir(parents=True)
        config.save_pretrained(d)

        def produce(key: str, level: int = level) -> torch.Tensor:
            t = _random(key, 0, shapes[key]) * 0.02
            for salt in range(1, level + 1):  # each fine-tune adds its own small change
                t += _random(key, salt, shapes[key]) * 1e-3
            return t.to(dtype)

        write_safetensors(d / "model.safetensors", planned, produce)
        paths[name] = d
    return paths


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(arms: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds per call of every arm, ``repeat`` rounds of one call each in turn (load hits all arms alike)."""
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeat):
        for k, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def old_eager(merger: Merger, params: dict[str, torch.Tensor], coefs) -> None:
    """The eager kernel as it was before issue 18: every bf16 term cast by ``add_`` into a temporary."""
    for name, a in merger.anchor.items():
        g = merger.grouping.group_of[name]
        terms = [(coefs[v][g], t[name]) for v, t in merger.vectors.items() if name in t]
        merge_into(params[name], a, terms, merger.scratch)


def disk_part(args, merger: Merger, model, coefs, root: Path, paths: dict[str, Path], dtype: torch.dtype,
              t_fused: float, t_eager: float) -> None:
    """The eager kernel by chunk size, the disk round trip a mergekit-style search pays, the full export."""
    chunks = {}
    for chunk in [*sorted({1 << k for k in range(15, 21)} | {DEFAULT_CHUNK["cpu"]}), None]:
        m = Merger(merger.anchor, merger.vectors, merger.grouping, kernel="eager",
                   chunk=chunk or max(a.numel() for a in merger.anchor.values()))
        label = "whole tensor" if chunk is None else f"{chunk}" + (" (default)" if chunk == DEFAULT_CHUNK["cpu"] else "")
        chunks[label] = best(lambda m=m: m.apply(model, coefs), args.repeat)
    merger.apply(model, coefs)

    out = root / "exported"
    config_text = (paths["medical"] / "config.json").read_text()
    planned = [PlannedTensor(n, tuple(p.shape), p.dtype) for n, p in model.state_dict().items()]
    state = model.state_dict()

    def round_trip() -> None:  # what a disk-based search pays per trial: save, then load
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "config.json").write_text(config_text)
        write_safetensors(out / "model.safetensors", planned, state.__getitem__)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
        del reloaded

    t_disk = best(round_trip, max(1, args.repeat - 1))
    shutil.rmtree(out)
    t0 = time.perf_counter()
    export_merged(merger, coefs, out, params=merger.bind(model))
    t_export = time.perf_counter() - t0
    print()
    print(f"{'disk round trip: write safetensors + reload':48s} {t_disk * 1e3:8.1f} ms  "
          f"({t_disk / t_fused:.1f}x the default merge, {t_disk / t_eager:.1f}x the eager one)")
    print(f"{'full export (provenance hashes 3 inputs)':48s} {t_export * 1e3:8.1f} ms")
    print("eager merge by scratch chunk (elements, best): " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in chunks.items()))
    print(f"peak including the disk round trip {_status('VmHWM') / GB:.3f} GiB (adds the reloaded model)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=6144)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kernels-only", action="store_true", help="time the copy and the merge kernels only")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    dtype = torch.bfloat16
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )
    root = Path(tempfile.mkdtemp(prefix="safesearch-bench-", dir=args.dir))
    load0 = os.getloadavg()
    try:
        t0 = time.perf_counter()
        paths = write_family(root, config, dtype)
        print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"load average {load0[0]:.2f} at start")
        print(f"wrote 3 checkpoints in {time.perf_counter() - t0:.1f}s")

        spec = spec_from_dict({
            "anchor": "medical",
            "checkpoints": {n: str(p) for n, p in paths.items()},
            "vectors": {"safety": {"diff": "aligned - unaligned"}, "medical": {"diff": "medical - aligned"}},
            "groups": {"preset": "layer"},
        })
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(paths["medical"], dtype=dtype).eval()
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        merger = Merger.from_spec(spec, device="cpu", dtype=dtype)
        t_build = time.perf_counter() - t0
        for c in merger.sources.checkpoints.values():
            c.close()  # drop the memory maps of the inputs
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        merged_bytes = sum(t.numel() * t.element_size() for t in merger.anchor.values())
        print(f"model: {model_bytes / 1e9:.3f} GB = {model_bytes / GB:.3f} GiB bf16 ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
              f"{len(merger.names)} tensors); from_pretrained {t_load:.2f}s; Merger.from_spec {t_build:.2f}s (once)")

        params = merger.bind(model)
        coefs = merger.parse({"safety": {"*": 0.8, "layer.3": 1.3}, "medical": {"*": -0.1, "head": 0.2}})
        eager = Merger(merger.anchor, merger.vectors, merger.grouping, kernel="eager")  # shares the tensors
        t0 = time.perf_counter()
        merger.apply(model, coefs)  # the default kernel: compiles and probes here (cached on disk afterwards)
        t_compile = time.perf_counter() - t0
        default_kernel = "compiled" if merger.compiles(len(merger.vectors)) else "eager (fallback)"
        arms = {
            "copy": lambda: [params[n].copy_(a) for n, a in merger.anchor.items()],
            "default": lambda: merger.apply(model, coefs),
            "eager": lambda: eager.apply(model, coefs),
            "old eager": lambda: old_eager(merger, params, coefs),
        }
        arms["default"]()
        want = {n: params[n].clone() for n in params}
        same_bits = True
        for k in ("eager", "old eager"):  # every kernel writes the very same bits
            arms[k]()
            same_bits = same_bits and all(torch.equal(params[n], t) for n, t in want.items())
        del want

        _reset_peak()
        base_rss = _status("VmRSS")
        times = interleaved(arms, args.repeat)
        peak = _status("VmHWM")
        t_copy, t_fused, t_eager, t_old = (min(times[k]) for k in arms)
        n_vec = len(merger.vectors)
        bound = t_copy * (2 + n_vec) / 2
        median_bound = statistics.median(times["copy"]) * (2 + n_vec) / 2
        scratch_bytes = merger.scratch.numel() * 4 * (1 if merger.cast is None else 2)
        budget = merged_bytes * (1 + n_vec) + model_bytes + scratch_bytes

        # no drift: A, B, A equals A
        other = merger.parse({"safety": {"*": -3.0}, "medical": {"*": 1.0}})
        merger.apply(model, coefs)
        first = {n: params[n].clone() for n in list(params)[:4]}
        merger.apply(model, other)
        merger.apply(model, coefs)
        assert all(torch.equal(params[n], t) for n, t in first.items())

        def line(label: str, t: float, note: str = "") -> None:
            print(f"{label:48s} {t * 1e3:8.1f} ms  {note}")

        def rate(t: float) -> str:
            return f"{(2 + n_vec) * merged_bytes / t / 1e9:.1f} GB/s"

        print()
        print(f"{'best of ' + str(args.repeat) + ' interleaved rounds':48s} {'best':>8s}     {'/ bound':>7s}  {'median':>8s}     {'/ bound':>7s}")
        for label, k in (("plain copy of the merged tensors", "copy"), (f"merge, default kernel ({default_kernel})", "default"),
                         ("merge, eager kernel", "eager"), ("merge, eager kernel before issue 18", "old eager")):
            b, m = min(times[k]), statistics.median(times[k])
            print(f"{label:48s} {b * 1e3:8.1f} ms  {b / bound:6.2f}x  {m * 1e3:8.1f} ms  {m / median_bound:6.2f}x")
        line(f"bound: the merge's bytes by plain copy (x{(2 + n_vec) / 2:.0f})", bound,
             f"(median {median_bound * 1e3:.1f} ms; copy moves {2 * merged_bytes / t_copy / 1e9:.1f} GB/s)")
        print()
        print(f"merge / copy bound (best): default {t_fused / bound:.2f}x ({rate(t_fused)}; compile and probe "
              f"{t_compile:.1f}s once), eager {t_eager / bound:.2f}x ({rate(t_eager)}), eager before issue 18 "
              f"{t_old / bound:.2f}x   (goal <= 1.3x)")
        print(f"the three merges give the same bits: {same_bits}")
        print(f"peak RSS during the copies and merges {peak / GB:.3f} GiB (RSS before them {base_rss / GB:.3f} GiB; "
              f"anon {_status('RssAnon') / GB:.3f} GiB, file {_status('RssFile') / GB:.3f} GiB); "
              f"anchor + vectors + model + scratch = {budget / GB:.3f} GiB")
        if not args.kernels_only:
            disk_part(args, merger, model, coefs, root, paths, dtype, t_fused, t_eager)
        load1 = os.getloadavg()
        print(f"load average {load1[0]:.2f} at the end (1-minute; 2 means both cores busy)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
