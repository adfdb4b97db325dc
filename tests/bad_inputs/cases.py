"""The corpus of bad inputs: what users get wrong, command by command.

Each case makes one bad input in its own directory of the workspace and returns the argv and the text
the one error line must contain (the input's name: a file, a field, an option). Families of mistakes in a
spec are tried through every command that reads that spec (``groups``/``merge`` read a graft spec;
``study create``/``run``/``worker`` a study spec), since each command reads it on its own path.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness import Case

CASES: list[Case] = []
DELETE = object()
SECRET = "s3/cr@t?x"
NO_SERVER = "postgresql+psycopg://postgres@127.0.0.1:1/test"


def add(command: str, name: str, make: Callable[[Any, Path], Any], **kw: Any) -> None:
    CASES.append(Case(command, name, make, **kw))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def edit(data: Any, *edits: tuple[Sequence[Any], Any]) -> Any:
    """A deep copy of ``data`` with each (key path, value) set, or deleted for :data:`DELETE`."""
    data = copy.deepcopy(data)
    for path, value in edits:
        node = data
        for k in path[:-1]:
            node = node[k]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return data


# -- graft specs: groups and merge ------------------------------------------------------------------

GRAFT_COMMANDS = ("groups", "merge")


def graft_argv(command: str, ws: Any, d: Path, spec: Path) -> list[Any]:
    if command == "groups":
        return ["groups", spec]
    return ["merge", spec, "--coef", ws.coef, "--out", d / "out"]


def graft_file(name: str, content: Callable[[Any, Path], str | bytes] | str | bytes, named: Any,
               commands: Sequence[str] = GRAFT_COMMANDS) -> None:
    for cmd in commands:
        def make(ws: Any, d: Path, cmd: str = cmd) -> Any:
            body = content(ws, d) if callable(content) else content
            return graft_argv(cmd, ws, d, write(d / "graft.yaml", body)), named

        add(cmd, name, make)


def graft_edit(name: str, edits: Callable[[Any, Path], list[tuple[Sequence[Any], Any]]] | list, named: Any,
               commands: Sequence[str] = GRAFT_COMMANDS) -> None:
    for cmd in commands:
        def make(ws: Any, d: Path, cmd: str = cmd) -> Any:
            g = ws.graft_dict()
            g["checkpoints"] = {n: str(ws.world / n) for n in g["checkpoints"]}
            data = edit(g, *(edits(ws, d) if callable(edits) else edits))
            return graft_argv(cmd, ws, d, ws.write_yaml(d / "graft.yaml", data)), named

        add(cmd, name, make)


for _cmd in GRAFT_COMMANDS:
    add(_cmd, "spec file does not exist", lambda ws, d, c=_cmd: (graft_argv(c, ws, d, d / "nope.yaml"), "nope.yaml"))
    add(_cmd, "spec is a directory", lambda ws, d, c=_cmd: (graft_argv(c, ws, d, d), str(d)))
graft_file("spec is not YAML", "anchor: [medical\n", "graft.yaml")
graft_file("spec is a YAML list", "- anchor\n- medical\n", "graft.yaml")
graft_file("spec is empty", "", "graft.yaml")
graft_file("spec has non-UTF-8 bytes", b"anchor: m\xe9dical\n", "graft.yaml")
graft_edit("unknown top field", [(("anchr",), "medical")], "anchr")
graft_edit("anchor missing", [(("anchor",), DELETE)], "anchor")
graft_edit("anchor names no checkpoint", [(("anchor",), "base")], "anchor")
graft_edit("anchor is a list", [(("anchor",), ["medical"])], "anchor")
graft_edit("checkpoints empty", [(("checkpoints",), {})], "checkpoints")
graft_edit("checkpoint directory missing", lambda ws, d: [(("checkpoints", "aligned"), str(d / "gone"))], "gone")
graft_edit("checkpoint path is a file", lambda ws, d: [(("checkpoints", "aligned"), str(write(d / "f.txt", "x")))],
           "f.txt")
graft_edit("checkpoint path empty", [(("checkpoints", "aligned"), "")], "checkpoints.aligned")
graft_edit("checkpoint path a number", [(("checkpoints", "aligned"), 5)], "checkpoints.aligned")
graft_edit("checkpoint name starts with a digit", [(("checkpoints", "1x"), "/tmp")], "1x")


def _pickle_only(ws: Any, d: Path) -> list:
    c = d / "pickled"
    write(c / "config.json", (ws.world / "aligned" / "config.json").read_text())
    write(c / "pytorch_model.bin", b"\x80\x02not really")
    return [(("checkpoints", "aligned"), str(c))]


def _truncated(ws: Any, d: Path) -> list:
    c = ws.copy_checkpoint("aligned", d / "trunc")
    f = c / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    return [(("checkpoints", "aligned"), str(c))]


def _garbage_weights(ws: Any, d: Path) -> list:
    c = ws.copy_checkpoint("aligned", d / "garbage")
    (c / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return [(("checkpoints", "aligned"), str(c))]


def _bad_config(text: str) -> Callable[[Any, Path], list]:
    def edits(ws: Any, d: Path) -> list:
        c = ws.copy_checkpoint("aligned", d / "badcfg")
        (c / "config.json").write_text(text)
        return [(("checkpoints", "aligned"), str(c))]

    return edits


def _wrong_shape(ws: Any, d: Path) -> list:
    c = ws.copy_checkpoint("aligned", d / "shape")
    cfg = json.loads((c / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (c / "config.json").write_text(json.dumps(cfg))
    return [(("checkpoints", "aligned"), str(c))]


def _other_model(ws: Any, d: Path) -> list:
    from tiny_models import build_tiny_llama

    return [(("checkpoints", "aligned"), str(build_tiny_llama(d / "llama")))]


def _index_missing_shard(ws: Any, d: Path) -> list:
    c = ws.copy_checkpoint("aligned", d / "sharded")
    from safetensors import safe_open

    with safe_open(str(c / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    write(c / "model.safetensors.index.json", json.dumps({"weight_map": {k: "model-00002-of-00002.safetensors" for k in keys}}))
    return [(("checkpoints", "aligned"), str(c))]


def _two_loose_files(ws: Any, d: Path) -> list:
    c = ws.copy_checkpoint("aligned", d / "loose")
    (c / "model.safetensors").rename(c / "a.safetensors")
    write(c / "b.safetensors", (c / "a.safetensors").read_bytes())
    return [(("checkpoints", "aligned"), str(c))]


def _no_weights(ws: Any, d: Path) -> list:
    c = ws.copy_checkpoint("aligned", d / "noweights")
    (c / "model.safetensors").unlink()
    return [(("checkpoints", "aligned"), str(c))]


graft_edit("checkpoint holds pickle weights only", _pickle_only, "pickle")
graft_edit("checkpoint weights truncated", _truncated, "model.safetensors")
graft_edit("checkpoint weights garbage", _garbage_weights, "model.safetensors")
graft_edit("checkpoint without weights", _no_weights, "noweights")
graft_edit("checkpoint index names a missing shard", _index_missing_shard, "model-00002-of-00002.safetensors")
graft_edit("checkpoint has two loose weight files", _two_loose_files, "loose")
graft_edit("checkpoint config.json malformed", _bad_config("{oops"), "config.json")
graft_edit("checkpoint config.json a list", _bad_config("[1, 2]"), "config.json")
graft_edit("checkpoint config disagrees with its tensors", _wrong_shape, "shape")
graft_edit("checkpoint config without architectures or sizes", _bad_config('{"model_type": "llama"}'), "badcfg")
graft_edit("checkpoint of another architecture", _other_model, "aligned")
graft_edit("prefix_map on the anchor", [(("checkpoints", "medical"), {"path": "x", "prefix_map": {"a": "b"}})], "prefix_map")
graft_edit("prefix_map maps to a number", [(("checkpoints", "aligned"), {"path": "x", "prefix_map": {"a": 1}})], "prefix_map")
graft_edit("checkpoint unknown field", [(("checkpoints", "aligned"), {"path": "x", "prefx_map": {}})], "prefx_map")
graft_edit("vectors empty", [(("vectors",), {})], "vectors")
graft_edit("vectors missing", [(("vectors",), DELETE)], "vectors")
graft_edit("diff malformed", [(("vectors", "safety", "diff"), "aligned minus unaligned")], "diff")
graft_edit("diff names no checkpoint", [(("vectors", "safety", "diff"), "aligned - base")], "base")
graft_edit("diff of a checkpoint with itself", [(("vectors", "safety", "diff"), "aligned - aligned")], "diff")
graft_edit("diff is a list", [(("vectors", "safety", "diff"), ["aligned", "unaligned"])], "diff")
graft_edit("orthogonalize against itself", [(("vectors", "safety", "orthogonalize"), "safety")], "orthogonalize")
graft_edit("orthogonalize against no vector", [(("vectors", "safety", "orthogonalize"), "nope")], "nope")
graft_edit("orthogonalize cycle", [(("vectors", "medical", "orthogonalize"), "safety")], "cycle")
graft_edit("trim above 1", [(("vectors", "medical", "trim"), 2)], "trim")
graft_edit("trim a string", [(("vectors", "medical", "trim"), "half")], "trim")
graft_edit("trim NaN", [(("vectors", "medical", "trim"), float("nan"))], "trim")
graft_edit("dare rate 1", [(("vectors", "medical", "dare"), {"rate": 1.0})], "dare.rate")
graft_edit("dare seed a string", [(("vectors", "medical", "dare"), {"rate": 0.5, "seed": "x"})], "dare.seed")
graft_edit("dare unknown field", [(("vectors", "medical", "dare"), {"rate": 0.5, "sed": 1})], "sed")
graft_edit("vector unknown field", [(("vectors", "medical", "weight"), 1)], "weight")
graft_edit("group preset unknown", [(("groups", "preset"), "bogus")], "preset")
graft_edit("group rule bad regex", [(("groups", "rules"), [{"pattern": "layers.(", "group": "x"}])], "pattern")
graft_edit("group rule uses an unknown capture", [(("groups", "rules"), [{"pattern": "layers", "group": "{i}"}])], "group")
graft_edit("group rules a mapping", [(("groups", "rules"), {"pattern": "x"})], "rules")
graft_edit("frozen bad regex", [(("groups", "frozen"), ["(("])], "frozen")
graft_edit("frozen a mapping", [(("groups", "frozen"), {"a": 1})], "frozen")
graft_edit("rules alone leave parameters unplaced", [(("groups",), {"rules": [{"pattern": "mlp", "group": "mlp"}]})],
           "embed_tokens")
graft_edit("dtype a list", [(("dtype",), ["float32"])], "dtype")
graft_edit("dtype unknown", [(("dtype",), "float64")], "dtype")
graft_edit("device unknown", [(("device",), "bogus")], "device")
graft_edit("device a number", [(("device",), 7)], "device")
graft_edit("device cuda without CUDA", [(("device",), "cuda")], "cuda", commands=("merge",))

# -- merge: coefficients and outputs ------------------------------------------------------------------


def merge_with_coef(name: str, content: str | bytes, named: Any, dtype: str | None = None) -> None:
    def make(ws: Any, d: Path) -> Any:
        spec = ws.graft
        if dtype is not None:
            g = ws.graft_dict()
            g["checkpoints"] = {n: str(ws.world / n) for n in g["checkpoints"]}
            spec = ws.write_yaml(d / "graft.yaml", {**g, "dtype": dtype})
        return ["merge", spec, "--coef", write(d / "coef.json", content), "--out", d / "out"], named

    add("merge", name, make)


add("merge", "coefficient file does not exist",
    lambda ws, d: (["merge", ws.graft, "--coef", d / "c.json", "--out", d / "out"], "c.json"))
add("merge", "coefficient file is a directory",
    lambda ws, d: (["merge", ws.graft, "--coef", d, "--out", d / "out"], str(d)))
merge_with_coef("coefficients not JSON", "{safety: 1", "coef.json")
merge_with_coef("coefficients a list", "[1, 2]", "coef.json")
merge_with_coef("coefficients name an unknown vector", '{"saftey": {"*": 1}}', "saftey")
merge_with_coef("coefficients name an unknown group", '{"safety": {"layer.99": 1}}', "layer.99")
merge_with_coef("coefficient '*' is null", '{"safety": {"*": null}}', "safety.*")
merge_with_coef("coefficient a string", '{"safety": {"*": "0.5"}}', "safety.*")
merge_with_coef("coefficient NaN", '{"safety": {"*": NaN}}', "NaN")
merge_with_coef("coefficient Infinity", '{"safety": {"*": Infinity}}', "Infinity")
merge_with_coef("coefficient a boolean", '{"safety": {"*": true}}', "safety.*")
merge_with_coef("coefficients of a vector a number", '{"safety": 0.5}', "safety")
merge_with_coef("coefficient overflows float32", '{"safety": {"*": 1e40}}', "safety")
merge_with_coef("coefficient 1e300", '{"medical": {"*": 1e300}}', "medical")
merge_with_coef("coefficient overflows float16", '{"safety": {"*": 1e7}}', "safety", dtype="float16")
merge_with_coef("coefficients non-UTF-8", b'{"safety": {"*": 0.5}, "\xff": 1}', "coef.json")
merge_with_coef("coefficients empty file", "", "coef.json")


def _out_case(name: str, out: Callable[[Any, Path], Path], named: Any, overwrite: bool = True,
              coef: Callable[[Any, Path], Path] | None = None) -> None:
    def make(ws: Any, d: Path) -> Any:
        argv = ["merge", ws.graft, "--coef", coef(ws, d) if coef else ws.coef, "--out", out(ws, d)]
        return argv + (["--overwrite"] if overwrite else []), named

    add("merge", name, make)


_out_case("--out exists, no --overwrite", lambda ws, d: write(d / "out" / "x", "keep").parent, "--overwrite",
          overwrite=False)
_out_case("--out is the anchor's directory", lambda ws, d: ws.world / "medical", "medical")
_out_case("--out is an input checkpoint", lambda ws, d: ws.world / "unaligned", "unaligned")
_out_case("--out contains the checkpoints", lambda ws, d: ws.world, "toyworld")
_out_case("--out contains the checkpoints, no --overwrite", lambda ws, d: ws.root / "storage", "storage",
          overwrite=False)
_out_case("--out inside the anchor's directory", lambda ws, d: ws.world / "medical" / "merged", "medical",
          overwrite=False)
_out_case("--out is the spec's folder", lambda ws, d: ws.graft.parent, "specs")
_out_case("--out holds the coefficient file", lambda ws, d: d, "coef.json",
          coef=lambda ws, d: write(d / "coef.json", '{"safety": {"*": 0.5}}'))
_out_case("--out is a file", lambda ws, d: write(d / "file.txt", "keep"), "file.txt")
_out_case("--out is a file, no --overwrite", lambda ws, d: write(d / "file.txt", "keep"), "file.txt", overwrite=False)
_out_case("--out under a file", lambda ws, d: write(d / "file.txt", "keep") / "out", "file.txt", overwrite=False)
_out_case("--out is a folder of the user's, not a checkpoint", lambda ws, d: write(d / "notes" / "todo.txt", "x").parent,
          "notes")
_out_case("--out cannot be created", lambda ws, d: Path("/proc/self/safesearch-out"), "/proc/self", overwrite=False)
add("merge", "--device unknown", lambda ws, d: (["merge", ws.graft, "--coef", ws.coef, "--out", d / "o", "--device", "bogus"],
                                                "--device"))
add("merge", "--device cuda without CUDA",
    lambda ws, d: (["merge", ws.graft, "--coef", ws.coef, "--out", d / "o", "--device", "cuda"], "cuda"))
add("merge", "--coef missing", lambda ws, d: (["merge", ws.graft, "--out", d / "o"], "--coef"))

# -- eval -------------------------------------------------------------------------------------------


def eval_model(name: str, model: Callable[[Any, Path], Path], named: Any) -> None:
    add("eval", name, lambda ws, d: (["eval", model(ws, d), "--suite", "toy-benign", "--limit", "2"], named))


def _ckpt_with(edits: Callable[[Any, Path], list]) -> Callable[[Any, Path], Path]:
    return lambda ws, d: Path(edits(ws, d)[0][1])


eval_model("model directory missing", lambda ws, d: d / "nomodel", "nomodel")
eval_model("model is a file", lambda ws, d: write(d / "model.txt", "x"), "model.txt")
eval_model("model directory empty", lambda ws, d: d, "config.json")
eval_model("config.json malformed", _ckpt_with(_bad_config("{oops")), "config.json")
eval_model("config.json a list", _ckpt_with(_bad_config("[]")), "config.json")
eval_model("config.json unknown model type", _ckpt_with(_bad_config('{"model_type": "nosuchmodel"}')), "nosuchmodel")
eval_model("config.json non-UTF-8", lambda ws, d: write(ws.copy_checkpoint("aligned", d / "c") / "config.json",
                                                        b'{"a": "\xff"}').parent, "config.json")
eval_model("pickle weights only", _ckpt_with(_pickle_only), "pickle")
eval_model("weights truncated", _ckpt_with(_truncated), "model.safetensors")
eval_model("weights garbage", _ckpt_with(_garbage_weights), "model.safetensors")
eval_model("no weights", _ckpt_with(_no_weights), "noweights")
eval_model("config disagrees with its tensors", _ckpt_with(_wrong_shape), "shape")
# No architectures: transformers would build a 7B Llama from the defaults (28 GB) and run out of memory.
eval_model("config without architectures or sizes", _ckpt_with(_bad_config('{"model_type": "llama"}')), "shape")
eval_model("chat template does not render", lambda ws, d: write(
    ws.copy_checkpoint("medical", d / "tmpl") / "chat_template.jinja", "{% for %}").parent, "chat template")

# Releases built on their own code (LLaVA-Med v1.5, the original HuatuoGPT-Vision and LLaVA): config.json as theirs.
LLAVA_MED = {"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
             "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu"}


def _release_config(ws: Any, d: Path, extra: dict[str, Any], name: str = "medical") -> Path:
    c = ws.copy_checkpoint(name, d / f"release-{name}")
    config = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps({**config, **extra}))
    return c


eval_model("custom-code release (LLaVA-Med v1.5)", lambda ws, d: _release_config(ws, d, LLAVA_MED),
           ("llava_mistral", "llava-hf"))
eval_model("original LLaVA code under a known model type", lambda ws, d: _release_config(ws, d, {
    "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "clip"}),
    ("LlavaLlamaForCausalLM", "llava-hf"))
eval_model("architecture class transformers lacks", lambda ws, d: _release_config(ws, d, {
    "architectures": ["MedLlamaForCausalLM"]}), "MedLlamaForCausalLM")


def eval_suite(name: str, suite: Callable[[Any, Path], str], named: Any, model: str = "medical",
               extra: Sequence[str] = ()) -> None:
    add("eval", name, lambda ws, d: (["eval", ws.world / model, "--suite", suite(ws, d), "--limit", "2", *extra], named))


def suite_file(text: str | bytes) -> Callable[[Any, Path], str]:
    return lambda ws, d: str(write(d / "s.yaml", text))


def suite_on(dataset_text: str | bytes, fmt: str = "jsonl", metric: str = "over_refusal", name: str = "data.jsonl",
             **more: Any) -> Callable[[Any, Path], str]:
    def make(ws: Any, d: Path) -> str:
        data = write(d / name, dataset_text)
        return str(ws.write_yaml(d / "s.yaml", {"metric": metric, "dataset": {"format": fmt, "path": str(data)}, **more}))

    return make


BENIGN = '{"id": "b1", "text": "how do i bake bread ?", "kind": "benign"}\n'
eval_suite("suite unknown", lambda ws, d: "no-such-suite", "no-such-suite")
eval_suite("suite file missing", lambda ws, d: str(d / "missing.yaml"), "missing.yaml")
eval_suite("suite not YAML", suite_file("metric: [safety\n"), "s.yaml")
eval_suite("suite a YAML list", suite_file("- metric\n"), "s.yaml")
eval_suite("suite empty", suite_file(""), "s.yaml")
eval_suite("suite non-UTF-8", suite_file(b"metric: saf\xe9ty\n"), "s.yaml")
eval_suite("suite unknown field", suite_file("metric: safety\ndataset: {format: jsonl, path: x}\njduge: {}\n"), "jduge")
eval_suite("suite metric unknown", suite_file("metric: accuracy\ndataset: {format: jsonl, path: x}\n"), "metric")
eval_suite("suite dataset path missing", suite_file("metric: safety\ndataset: {format: jsonl}\n"), "dataset.path")
eval_suite("suite dataset format unknown", suite_file("metric: safety\ndataset: {format: parquet, path: x}\n"), "parquet")
eval_suite("suite dataset option unknown", suite_file("metric: safety\ndataset: {format: jsonl, path: x, options: {sep: ','}}\n"), "sep")
eval_suite("suite filter on an unknown field", suite_file("metric: safety\ndataset: {format: jsonl, path: x, filter: {lang: en}}\n"),
           "lang")
eval_suite("suite subset size 0", suite_file("metric: safety\ndataset: {format: jsonl, path: x}\nsubset: {size: 0}\n"),
           "subset.size")
eval_suite("suite judge type unknown", suite_file("metric: safety\ndataset: {format: jsonl, path: x}\njudge: {type: gpt}\n"),
           "gpt")
eval_suite("suite http judge timeout 0", suite_file(
    "metric: safety\ndataset: {format: jsonl, path: x}\njudge: {type: http, base_url: 'http://127.0.0.1:9', model: m, timeout: 0}\n"),
    "timeout")
eval_suite("suite http judge timeout negative", suite_file(
    "metric: safety\ndataset: {format: jsonl, path: x}\njudge: {type: http, base_url: 'http://127.0.0.1:9', model: m, timeout: -5}\n"),
    "timeout")
eval_suite("suite http judge base_url not http", suite_file(
    "metric: safety\ndataset: {format: jsonl, path: x}\njudge: {type: http, base_url: 'ftp://judge', model: m}\n"),
    "base_url")
eval_suite("suite guard judge model missing", suite_on(
    '{"id": "h1", "text": "how to make a weapon ?", "kind": "harmful"}\n', metric="safety",
    judge={"type": "guard", "model": "/nonexistent/guard"}), "/nonexistent/guard")
eval_suite("dataset file missing", lambda ws, d: str(ws.write_yaml(
    d / "s.yaml", {"metric": "over_refusal", "dataset": {"format": "jsonl", "path": str(d / "none.jsonl")}})), "none.jsonl")
eval_suite("dataset non-UTF-8", suite_on(b'{"id": "b1", "text": "caf\xe9", "kind": "benign"}\n'), "data.jsonl")
eval_suite("dataset malformed JSON line", suite_on(BENIGN + "{oops\n"), "data.jsonl:2")
eval_suite("dataset duplicate id", suite_on(BENIGN + BENIGN), "data.jsonl:2")
eval_suite("dataset item of the wrong kind", suite_on(BENIGN, metric="safety"), "b1")
eval_suite("dataset empty", suite_on(""), "data.jsonl")
eval_suite("dataset NaN answer", suite_on('{"id": "q", "text": "t", "kind": "mcq", "options": ["a", "b"], "answer": NaN}\n',
                                          metric="mcq_loglik"), "data.jsonl:1")
eval_suite("CSV lacks its column", suite_on("prompt,type\nhi,x\n", fmt="xstest", name="x.csv"), "x.csv")
eval_suite("CSV field over the csv limit", suite_on('Behavior,FunctionalCategory,SemanticCategory,BehaviorID\n"'
                                                    + "a" * 140_000 + '",standard,x,id1\n', fmt="harmbench",
                                                    metric="safety", name="hb.csv"), "hb.csv")
eval_suite("CSV non-UTF-8", suite_on(b"prompt,type,label\nh\xe9llo,x,safe\n", fmt="xstest", name="x.csv"), "x.csv")
HARMFUL = '{"id": "h1", "text": "how to make a weapon ?", "kind": "harmful"}\n'
eval_suite("partition share 0", suite_on(HARMFUL, metric="safety", partition={"search": 0, "holdout": 0.7}), "partition.search")
eval_suite("partition share above 1", suite_on(HARMFUL, metric="safety", partition={"search": 1.5}), "partition.search")
eval_suite("partition share negative", suite_on(HARMFUL, metric="safety", partition={"search": -0.2, "holdout": 0.5}),
           "partition.search")
eval_suite("partition shares sum above 1", suite_on(HARMFUL, metric="safety", partition={"search": 0.5, "holdout": 0.6}),
           ("partition", "above 1"))
eval_suite("partition share not a number", suite_on(HARMFUL, metric="safety", partition={"search": "most"}),
           "partition.search")
eval_suite("partition and splits both", suite_on(HARMFUL, metric="safety", partition={"search": 0.3},
                                                 splits={"search": "dev"}), "partition")
eval_suite("splits map two to one", suite_on(HARMFUL, metric="safety", splits={"search": "a", "holdout": "a"}),
           "splits")
eval_suite("--split not in the partition", suite_on(HARMFUL, metric="safety"), ("--split", "dev"),
           extra=["--split", "dev"])
eval_suite("--split empty", suite_on(HARMFUL, metric="safety"), "--split", extra=["--split", ""])
eval_suite("--split none of the items carry", suite_on(HARMFUL, metric="safety", splits={"search": "train"}),
           "train", extra=["--split", "search"])


def _mmsb(ws: Any, d: Path, drop_image: bool = False, **options: Any) -> str:
    """A copy of the MM-SafetyBench fixture, one image deleted when ``drop_image``."""
    src = Path(__file__).resolve().parent.parent / "fixtures" / "datasets" / "mmsafetybench"
    shutil.copytree(src, d / "mmsb")
    if drop_image:
        (d / "mmsb" / "data" / "imgs" / "01-Illegal_Activitiy" / "SD_TYPO" / "1.jpg").unlink()
    return str(ws.write_yaml(d / "s.yaml", {"metric": "safety", "attack": "qr", "dataset": {
        "format": "mmsafetybench", "path": str(d / "mmsb" / "data" / "processed_questions"), "options": options}}))


eval_suite("MM-SafetyBench image missing", lambda ws, d: _mmsb(ws, d, drop_image=True), ("1.jpg", "01-Illegal_Activitiy"))
eval_suite("MM-SafetyBench image kind unknown", lambda ws, d: _mmsb(ws, d, image_kind="PHOTO"), "image_kind")
eval_suite("MM-SafetyBench record without its key phrase", suite_on(
    '{"0": {"Question": "q?", "Rephrased Question": "r", "Rephrased Question(SD)": "s"}}', fmt="mmsafetybench",
    metric="safety", name="01-x.json", attack="qr"), ("01-x.json", "Key Phrase"))
eval_suite("SafeBench CSV without the instruction column", suite_on(
    "dataset,category_id,task_id,category_name,question\nForbidQI,1,1,Illegal Activity,How?\n", fmt="safebench",
    metric="safety", name="safebench.csv", attack="figstep"), ("safebench.csv", "instruction"))
eval_suite("SafeBench blank instruction", suite_on(
    "dataset,category_id,task_id,category_name,question,instruction\nForbidQI,1,1,Illegal Activity,How?, \n",
    fmt="safebench", metric="safety", name="safebench.csv", attack="figstep"), ("safebench.csv:2", "instruction"))
eval_suite("qr attack on another format", suite_on(HARMFUL, metric="safety", attack="qr"), "attack")
eval_suite("figstep suite on a text model", suite_on(
    '{"id": "h1", "text": "how to make a weapon ?", "kind": "harmful"}\n', metric="safety", attack="figstep"), "FigStep")


def eval_flag(name: str, extra: Sequence[str] | Callable[[Any, Path], Sequence[Any]], named: Any) -> None:
    add("eval", name, lambda ws, d: (["eval", ws.world / "medical", "--suite", "toy-benign", "--limit", "2",
                                      *(extra(ws, d) if callable(extra) else extra)], named))


eval_flag("--limit 0", ["--limit", "0"], "--limit")
eval_flag("--batch-size 0", ["--batch-size", "0"], "--batch-size")
eval_flag("--backend unknown", ["--backend", "onnx"], "--backend")
add("eval", "--json is a directory", lambda ws, d: (["eval", ws.world / "medical", "--suite", "toy-benign", "--json", d],
                                                  str(d)))
eval_flag("--json under a file", lambda ws, d: ["--json", write(d / "f.txt", "x") / "r.json"], "f.txt")
eval_flag("--json cannot be written", ["--json", "/proc/self/report.json"], "/proc/self")
eval_flag("--device unknown", ["--device", "bogus"], "--device")
eval_flag("--device cuda without CUDA", ["--device", "cuda"], "cuda")
eval_flag("--vllm-option without =", ["--backend", "vllm", "--vllm-option", "max_model_len"], "--vllm-option")
eval_flag("--vllm-option with the transformers backend", ["--vllm-option", "max_model_len=64"], "--vllm-option")
eval_flag("--seed not a number", ["--seed", "x"], "--seed")
eval_flag("--data-root missing", lambda ws, d: ["--data-root", d / "nothing"], "nothing")
eval_flag("--suites-dir missing", lambda ws, d: ["--suites-dir", d / "nodir"], "nodir")
add("eval", "--suite empty", lambda ws, d: (["eval", ws.world / "medical", "--suite", ""], "--suite"))
add("eval", "no --suite", lambda ws, d: (["eval", ws.world / "medical"], "--suite"))

# -- suites -----------------------------------------------------------------------------------------

add("suites", "suite unknown", lambda ws, d: (["suites", "no-such-suite"], "no-such-suite"))
add("suites", "suite file not YAML", lambda ws, d: (["suites", write(d / "s.yaml", "metric: [safety\n")], "s.yaml"))
add("suites", "partition shares sum above 1", lambda ws, d: (["suites", suite_on(
    HARMFUL, metric="safety", partition={"search": 0.8, "holdout": 0.7})(ws, d)], ("partition", "above 1")))
add("suites", "--data-root missing", lambda ws, d: (["suites", "toy-benign", "--data-root", d / "nothing"], "nothing"))
add("suites", "--suites-dir a file", lambda ws, d: (["suites", "--suites-dir", write(d / "f.txt", "x")], "f.txt"))
add("suites", "unknown option", lambda ws, d: (["suites", "--split", "x"], "--split"))


# -- study specs: study create, run, worker ----------------------------------------------------------

STUDY_COMMANDS = ("study create", "run", "worker")


def study_argv(command: str, ws: Any, d: Path, spec: Path, storage: str | None = None) -> list[Any]:
    url = storage if storage is not None else f"sqlite:///{d / 'db' / 's.db'}"
    head = ["study", "create"] if command == "study create" else [command]
    return [*head, spec, "--storage", url]


def _study(ws: Any) -> dict[str, Any]:
    s = ws.study_dict()
    s["graft"] = str(ws.graft)
    s["data_root"] = str(ws.world)
    return s


def study_edit(name: str, edits: Callable[[Any, Path], list] | list, named: Any,
               commands: Sequence[str] = STUDY_COMMANDS) -> None:
    for cmd in commands:
        def make(ws: Any, d: Path, cmd: str = cmd) -> Any:
            data = edit(_study(ws), *(edits(ws, d) if callable(edits) else edits))
            return study_argv(cmd, ws, d, ws.write_yaml(d / "study.yaml", data)), named

        add(cmd, name, make)


def study_file(name: str, content: str | bytes, named: Any) -> None:
    for cmd in STUDY_COMMANDS:
        add(cmd, name, lambda ws, d, c=cmd: (study_argv(c, ws, d, write(d / "study.yaml", content)), named))


for _cmd in STUDY_COMMANDS:
    add(_cmd, "spec file does not exist", lambda ws, d, c=_cmd: (study_argv(c, ws, d, d / "nope.yaml"), "nope.yaml"))
study_file("spec is not YAML", "name: [t\n", "study.yaml")
study_file("spec is a YAML list", "- name\n", "study.yaml")
study_file("spec has non-UTF-8 bytes", b"name: t\xe9\n", "study.yaml")
study_edit("name with a space", [(("name",), "my study")], "name")
study_edit("graft missing", [(("graft",), DELETE)], "graft")
study_edit("graft file missing", lambda ws, d: [(("graft",), str(d / "g.yaml"))], "g.yaml")
study_edit("graft inline with an unknown anchor", lambda ws, d: [(("graft",), {**ws.graft_dict(), "anchor": "x"})], "anchor")
study_edit("search missing", [(("search",), DELETE)], "search")
study_edit("search lacks a vector", [(("search", "medical"), DELETE)], "medical")
study_edit("search names an extra vector", [(("search", "style"), {"range": [0, 1]})], "style")
study_edit("range not a list", [(("search", "safety", "range"), 1.0)], "search.safety.range")
study_edit("range low above high", [(("search", "safety", "range"), [1.0, 0.0])], "search.safety.range")
study_edit("range NaN", [(("search", "safety", "range"), [float("nan"), 1.0])], "search.safety.range")
study_edit("range infinite", [(("search", "safety", "range"), [0.0, float("inf")])], "search.safety.range")
study_edit("range overflows float32", [(("search", "safety", "range"), [0.0, 1e40])], "search.safety")
study_edit("range group bad regex", [(("search", "safety", "groups"), {"layer.(": [0, 1]})], "groups")
study_edit("range with scale and range", [(("search", "safety", "scale"), [0, 1])], "search.safety")
study_edit("objectives missing", [(("objectives",), DELETE)], "objectives")
study_edit("objectives empty", [(("objectives",), [])], "objectives")
study_edit("objective not a mapping", [(("objectives", 0), "safety")], "objectives[0]")
study_edit("objective unknown suite", [(("objectives", 1, "suite"), "toy-mcq")], "toy-mcq")
study_edit("objective suite and suites", [(("objectives", 1, "suites"), ["toy-mcq-medical"])], "objectives[1]")
study_edit("objective metric unknown", [(("objectives", 1, "metric"), "f1")], "metric")
study_edit("objective direction unknown", [(("objectives", 1, "direction"), "up")], "direction")
study_edit("objective subset 0", [(("objectives", 0, "subset"), 0)], "objectives[0].subset")
study_edit("objective subset a string", [(("objectives", 0, "subset"), "ten")], "objectives[0].subset")
study_edit("objective names twice", [(("objectives", 1, "name"), "safety")], "safety")
study_edit("objective split without data", [(("objectives", 1, "split"), "nosuchsplit")], "nosuchsplit")
study_edit("constraint max NaN", [(("constraints", 0, "max"), float("nan"))], "constraints[0].max")
study_edit("constraint max and min", [(("constraints", 0, "min"), 0.0)], "constraints[0]")
study_edit("constraint without a bound", [(("constraints", 0, "max"), DELETE)], "constraints[0]")
study_edit("constraint max a string", [(("constraints", 0, "max"), "10%")], "constraints[0].max")
study_edit("unknown top field", [(("n_trails",), 4)], "n_trails")
study_edit("zero baseline outside the range", [(("search", "safety", "range"), [0.5, 1.0])], "zero")
study_edit("global_lambda names no vector", [(("baselines", "global_lambda", "vector"), "style")], "global_lambda")
study_edit("global_lambda value outside the range", [(("baselines", "global_lambda", "values"), [3.0])], "values")
study_edit("global_lambda values empty", [(("baselines", "global_lambda", "values"), [])], "values")
study_edit("global_lambda grid names no vector", [(("baselines", "global_lambda"), {"grid": {"style": [0.5]}})],
           "style")
study_edit("global_lambda grid value outside the range",
           [(("baselines", "global_lambda"), {"grid": {"safety": [0.5, 9.0]}})], "9.0")
study_edit("enqueue is not a list", [(("baselines", "enqueue"), {"safety": 0.5})], "enqueue")
study_edit("enqueue names no vector", [(("baselines", "enqueue"), [{"coefficients": {"style": 0.5}}])], "style")
study_edit("enqueue value outside the range", [(("baselines", "enqueue"), [{"coefficients": {"safety": 9.0}}])],
           "9.0")
study_edit("enqueue group pattern not a regex",
           [(("baselines", "enqueue"), [{"coefficients": {"safety": {"(": 0.5}}}])], "regular expression")
study_edit("enqueue label taken twice", [(("baselines", "enqueue"), [
    {"label": "a", "coefficients": {"safety": 0.5}}, {"label": "a", "coefficients": {"safety": 0.25}}])], "'a'")
study_edit("sampler unknown", [(("sampler",), "bayes")], "bayes")
study_edit("sampler option unknown", [(("sampler",), {"name": "tpe", "options": {"n_startup": 3}})], "n_startup")
study_edit("sampler option of the wrong type", [(("sampler",), {"name": "tpe", "options": {"n_startup_trials": "ten"}})],
           "n_startup_trials")
study_edit("sampler option that takes a function", [(("sampler",), {"name": "tpe", "options": {"gamma": 0.5}})], "gamma")
study_edit("sampler option a float for an int", [(("sampler",), {"name": "nsga2", "options": {"population_size": 2.5}})],
           "population_size")
study_edit("cmaes weights negative", [(("sampler",), {"name": "cmaes-weighted", "weights": {"safety": -1}})], "weights")
study_edit("weights for tpe", [(("sampler",), {"name": "tpe", "weights": {"safety": 1}})], "weights")
study_edit("seed negative", [(("seed",), -1)], "seed")
study_edit("seed too large", [(("seed",), 2**40)], "seed")
study_edit("seed a string", [(("seed",), "x")], "seed")
study_edit("n_trials 0", [(("n_trials",), 0)], "n_trials")
study_edit("n_trials a float", [(("n_trials",), 1.5)], "n_trials")
study_edit("backend unknown", [(("backend",), "onnx")], "backend")
study_edit("backend_options unknown", [(("backend_options",), {"batchsize": 4})], "batchsize")
study_edit("backend_options batch_size 0", [(("backend_options",), {"batch_size": 0})], "batch_size")
study_edit("backend_options kernel unknown", [(("backend_options",), {"kernel": "fast"})], "kernel")
study_edit("device unknown", [(("device",), "bogus")], "device")
study_edit("device cuda without CUDA", [(("device",), "cuda")], "cuda", commands=("run", "worker"))
study_edit("graft dtype a list", lambda ws, d: [(("graft",), {**ws.graft_dict(), "dtype": ["float32"]})], "dtype")
study_edit("holdout split is the search split", [(("objectives", 0, "holdout_split"), "search")],
           ("holdout_split", "search"))
study_edit("split empty", [(("constraints", 0, "split"), "")], "split")
study_edit("data_root missing", lambda ws, d: [(("data_root",), str(d / "nodata"))], "nodata")
study_edit("max_retries negative", [(("max_retries",), -1)], "max_retries")
study_edit("constraint confidence 1", [(("constraints", 0, "confidence"), 1.0)], "confidence")
study_edit("early_stop a string", [(("early_stop",), "soon")], "early_stop")
study_edit("early_stop fraction 0", [(("early_stop",), {"fraction": 0})], "fraction")
study_edit("early_stop unknown field", [(("early_stop",), {"patience": 2})], "patience")
study_edit("description a list", [(("description",), ["a"])], "description")
# A family of such releases (its vectors merge: the graft reads tensors), but no backend runs the anchor.
study_edit("anchor a custom-code release", lambda ws, d: [(("graft",), {**ws.graft_dict(), "checkpoints": {
    n: str(_release_config(ws, d, LLAVA_MED, n)) for n in ("aligned", "unaligned", "medical")}})],
    ("llava_mistral", "llava-hf"))


def _figstep_objective(ws: Any, d: Path) -> list:
    suite = ws.write_yaml(d / "figstep.yaml", {"metric": "safety", "attack": "figstep", "dataset": {
        "format": "jsonl", "path": "data/{split}/harmful_general.jsonl", "split": "holdout"}})
    return [(("objectives", 0, "suites"), [str(suite)])]


study_edit("FigStep objective on a text-only anchor", _figstep_objective, ("figstep", "takes text only"))


def storage_case(commands: Sequence[str], name: str, url: Callable[[Any, Path], str] | str, named: Any,
                 **kw: Any) -> None:
    for cmd in commands:
        def make(ws: Any, d: Path, cmd: str = cmd) -> Any:
            u = url(ws, d) if callable(url) else url
            if cmd in STUDY_COMMANDS:
                return study_argv(cmd, ws, d, ws.spec, storage=u), named
            head = ["dashboard"] if cmd == "dashboard" else [cmd, "t"]
            if cmd == "export":
                head += ["--trial", "0", "--out", str(d / "out")]
            return [*head, "--storage", u], named

        add(cmd, name, make, **kw)


READERS = ("pareto", "validate", "export", "dashboard", "artifacts")
storage_case(STUDY_COMMANDS + READERS, "--storage empty", "", "--storage")
storage_case(STUDY_COMMANDS + READERS, "--storage an unsupported database", "mysql://u@localhost/db", "mysql")
storage_case(("run", "pareto"), "--storage malformed", "postgresql+psycopg://u@host:notaport/db", "notaport")
storage_case(("run", "pareto"), "--storage in memory", "sqlite://", "sqlite://")
storage_case(("run",) + READERS, "--storage under a file", lambda ws, d: f"sqlite:///{write(d / 'f.txt', 'x')}/s.db", "f.txt")
storage_case(("run", "pareto"), "--storage server unreachable", NO_SERVER, "127.0.0.1:1")
storage_case(("run", "pareto"), "--storage password with / is masked",
             f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:1/test", "127.0.0.1", secret=SECRET)
storage_case(("run", "pareto"), "--storage ?password= is masked",
             f"postgresql+psycopg://postgres@127.0.0.1:1/test?password={SECRET}", "127.0.0.1", secret=SECRET)
storage_case(("run", "pareto"), "--storage database missing",
             lambda ws, d: ws.postgres_url.rsplit("/", 1)[0] + "/safesearch_no_such_db", "safesearch_no_such_db",
             postgres=True)
storage_case(READERS, "--storage file missing", lambda ws, d: f"sqlite:///{d / 'none' / 's.db'}", "s.db")
storage_case(READERS, "--storage not a database", lambda ws, d: f"sqlite:///{write(d / 'x.db', 'not sqlite at all')}",
             "x.db")
storage_case(READERS, "--storage an empty file", lambda ws, d: f"sqlite:///{write(d / 'e.db', '')}", "e.db")
storage_case(READERS[:3], "--storage holds no study", lambda ws, d: ws.postgres_url.rsplit("/", 1)[0] + "/postgres",
             "/postgres")
add("study create", "study exists with another spec", lambda ws, d: (
    ["study", "create", ws.write_yaml(d / "study.yaml", edit(_study(ws), (("n_trials",), 9))), "--storage", ws.url], "'t'"))
add("worker", "study exists with other directions", lambda ws, d: (
    ["worker", ws.write_yaml(d / "study.yaml", edit(_study(ws), (("name",), "plain"))), "--storage", ws.url], "plain"))
add("artifacts", "--trial -1", lambda ws, d: (["artifacts", "t", "--storage", ws.url, "--trial", "-1"], "--trial"))
add("artifacts", "--jsonl without --trial", lambda ws, d: (["artifacts", "t", "--storage", ws.url, "--jsonl"], "--trial"))
add("artifacts", "--out a directory", lambda ws, d: (["artifacts", "t", "--storage", ws.url, "--trial", "0",
                                                     "--out", str(d)], str(d)))
add("worker", "--heartbeat 0", lambda ws, d: (["worker", ws.spec, "--storage", ws.url, "--heartbeat", "0"], "--heartbeat"))
add("worker", "--n-trials 0", lambda ws, d: (["worker", ws.spec, "--storage", ws.url, "--n-trials", "0"], "--n-trials"))
add("worker", "--backend unknown", lambda ws, d: (["worker", ws.spec, "--backend", "onnx"], "--backend"))
add("worker", "--seed not a number", lambda ws, d: (["worker", ws.spec, "--seed", "x"], "--seed"))
add("worker", "--device unknown", lambda ws, d: (["worker", ws.spec, "--storage", f"sqlite:///{d}/s.db", "--device", "gpu"],
                                                 "--device"))
for _cmd in ("run", "worker"):
    add(_cmd, "--threads 0", lambda ws, d, c=_cmd: ([c, ws.spec, "--storage", f"sqlite:///{d}/s.db", "--threads", "0"],
                                                    "--threads"))
    add(_cmd, "--threads not a number", lambda ws, d, c=_cmd: ([c, ws.spec, "--threads", "all"], "--threads"))
    add(_cmd, "--workers-per-machine 0", lambda ws, d, c=_cmd: ([c, ws.spec, "--workers-per-machine", "0"],
                                                                "--workers-per-machine"))
    add(_cmd, "OMP_NUM_THREADS not a number", lambda ws, d, c=_cmd: (
        [c, ws.spec, "--storage", f"sqlite:///{d}/s.db"], ("OMP_NUM_THREADS", "--threads")),
        env={"OMP_NUM_THREADS": "auto"})
add("run", "--artifacts under a file", lambda ws, d: (
    ["run", ws.spec, "--storage", f"sqlite:///{d}/s.db", "--artifacts", write(d / "f.txt", "x") / "a"], "f.txt"))
add("run", "--device cuda without CUDA", lambda ws, d: (["run", ws.spec, "--storage", f"sqlite:///{d}/s.db",
                                                         "--device", "cuda"], "cuda"))

# -- reading a study: pareto, validate, export, dashboard ----------------------------------------------

for _cmd in ("pareto", "validate", "export"):
    extra = ["--trial", "0", "--out", "OUT"] if _cmd == "export" else []
    add(_cmd, "study not found", lambda ws, d, c=_cmd, e=extra: (
        [c, "nosuch", "--storage", ws.url, *[str(d / "out") if x == "OUT" else x for x in e]], "nosuch"))
    add(_cmd, "study not made by safesearch", lambda ws, d, c=_cmd, e=extra: (
        [c, "plain", "--storage", ws.url, *[str(d / "out") if x == "OUT" else x for x in e]], "plain"))
    add(_cmd, "study without a completed trial", lambda ws, d, c=_cmd, e=extra: (
        [c, "empty", "--storage", ws.url, *[str(d / "out") if x == "OUT" else x for x in e]], "empty"))
add("pareto", "--plot is a directory", lambda ws, d: (["pareto", "t", "--storage", ws.url, "--plot", d], str(d)))
add("pareto", "--plot under a file", lambda ws, d: (["pareto", "t", "--storage", ws.url, "--plot",
                                                     write(d / "f.txt", "x") / "p.png"], "f.txt"))
add("pareto", "--plot cannot be written", lambda ws, d: (["pareto", "t", "--storage", ws.url, "--plot",
                                                          "/proc/self/p.png"], "/proc/self"))
add("validate", "--device unknown", lambda ws, d: (["validate", "t", "--storage", ws.url, "--device", "bogus"], "--device"))
add("validate", "--device cuda without CUDA", lambda ws, d: (["validate", "t", "--storage", ws.url, "--device", "cuda"],
                                                             "cuda"))
add("validate", "--suite unknown", lambda ws, d: (["validate", "t", "--storage", ws.url, "--suite", "nosuch-suite"],
                                                  "nosuch-suite"))
add("validate", "--suite file is not YAML", lambda ws, d: (["validate", "t", "--storage", ws.url, "--suite",
                                                            write(d / "s.yaml", "[unclosed")], "s.yaml"))
add("validate", "--suite split shares searched items", lambda ws, d: (
    ["validate", "t", "--storage", ws.url, "--suite", "toy-harmful-general", "--split", "search"], "shares"))
add("validate", "--suites-dir missing", lambda ws, d: (["validate", "t", "--storage", ws.url, "--suite", "toy-benign",
                                                        "--suites-dir", d / "nope"], "--suites-dir"))
add("validate", "--data-root is a file", lambda ws, d: (["validate", "t", "--storage", ws.url, "--suite", "toy-benign",
                                                         "--data-root", write(d / "f.txt", "x")], "--data-root"))


def export(name: str, extra: Callable[[Any, Path], list[Any]] | list[Any], named: Any) -> None:
    add("export", name, lambda ws, d: (["export", "t", "--storage", ws.url,
                                        *(extra(ws, d) if callable(extra) else extra)], named))


export("neither --trial nor --pick", lambda ws, d: ["--out", d / "o"], "--pick")
export("both --trial and --pick", lambda ws, d: ["--trial", "0", "--pick", "knee", "--out", d / "o"], "--pick")
export("--trial out of range", lambda ws, d: ["--trial", "99", "--out", d / "o"], "--trial 99")
export("--trial negative", lambda ws, d: ["--trial", "-1", "--out", d / "o"], "--trial -1")
export("--trial of a failed trial", lambda ws, d: ["--trial", "4", "--out", d / "o"], "FAIL")
export("--pick unknown", lambda ws, d: ["--pick", "best", "--out", d / "o"], "--pick")
export("--out exists", lambda ws, d: ["--trial", "0", "--out", write(d / "o" / "x", "keep").parent], "--overwrite")
export("--out is a checkpoint", lambda ws, d: ["--trial", "0", "--out", ws.world / "aligned", "--overwrite"], "aligned")
export("--out contains the database", lambda ws, d: ["--trial", "0", "--out", ws.db.parent, "--overwrite"], "db")
export("--out under a file", lambda ws, d: ["--trial", "0", "--out", write(d / "f.txt", "x") / "o"], "f.txt")
export("--device unknown", lambda ws, d: ["--trial", "0", "--out", d / "o", "--device", "bogus"], "--device")


def _moved_checkpoint(ws: Any, d: Path) -> list[Any]:
    """A copy of the study whose stored spec names a checkpoint that has since gone."""
    import sqlite3

    db = d / "moved.db"
    src = sqlite3.connect(ws.db)
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close()
    gone = str(d / "gone")
    dst.execute("update study_user_attributes set value_json = replace(value_json, ?, ?) where key = 'spec'",
                (str(ws.world / "aligned"), gone))
    dst.commit()
    dst.close()
    return ["--trial", "0", "--out", d / "o", "--storage", f"sqlite:///{db}"]


export("a stored checkpoint has gone", _moved_checkpoint, "gone")
add("dashboard", "--port out of range", lambda ws, d: (["dashboard", "--storage", ws.url, "--port", "99999"], "--port"))
add("dashboard", "--port in use", lambda ws, d: (["dashboard", "--storage", ws.url, "--port", str(ws.hold_port())],
                                                 "--port"))
add("dashboard", "--artifacts under a file", lambda ws, d: (
    ["dashboard", "--storage", ws.url, "--port", "0", "--artifacts", write(d / "f.txt", "x") / "a"], "f.txt"))

# -- launch recipes: launch slurm, launch kubernetes ---------------------------------------------------


def launch(target: str, name: str, extra: Callable[[Any, Path], list[Any]] | list[Any], named: Any,
           spec: Callable[[Any, Path], Path] | None = None) -> None:
    """``launch TARGET SPEC --workers 2`` (and an image for kubernetes) with ``extra`` flags after."""
    base = ["--image", "registry.example/safesearch:1"] if target == "kubernetes" else []

    def make(ws: Any, d: Path) -> Any:
        argv = ["launch", target, spec(ws, d) if spec else ws.spec, "--workers", "2", *base]
        return [*argv, *(extra(ws, d) if callable(extra) else extra)], named

    add(f"launch {target}", name, make)


for _target in ("slurm", "kubernetes"):
    launch(_target, "spec file does not exist", [], "nope.yaml", spec=lambda ws, d: d / "nope.yaml")
    launch(_target, "spec is not YAML", [], "study.yaml", spec=lambda ws, d: write(d / "study.yaml", "name: [t\n"))
    launch(_target, "spec is empty", [], ("study.yaml", "empty"), spec=lambda ws, d: write(d / "study.yaml", ""))
    launch(_target, "--workers 0", ["--workers", "0"], "--workers")
    launch(_target, "--workers not a number", ["--workers", "many"], "--workers")
    launch(_target, "--out is a directory", lambda ws, d: ["--out", d], "--out")
    launch(_target, "--out is the spec", lambda ws, d: ["--out", ws.spec], ("--out", "spec"))
    launch(_target, "--out under a file", lambda ws, d: ["--out", write(d / "f.txt", "x") / "job"], "f.txt")
    launch(_target, "--safesearch an unclosed quote", ["--safesearch", "apptainer exec 'img"], "--safesearch")
add("launch slurm", "--workers missing", lambda ws, d: (["launch", "slurm", ws.spec], "--workers"))
launch("slurm", "--cpus-per-task 0", ["--cpus-per-task", "0"], "--cpus-per-task")
launch("slurm", "--time not a time", ["--time", "2 days"], "--time")
launch("slurm", "--partition with a space", ["--partition", "gpu long"], "--partition")
launch("slurm", "--mem not a size", ["--mem", "lots"], "--mem")
launch("slurm", "--gres with a newline", ["--gres", "gpu:1\n#SBATCH --x"], "--gres")
launch("slurm", "--setup of two lines", ["--setup", "module load cuda\nsource venv/bin/activate"], "--setup")
launch("slurm", "--name with a space", ["--name", "my job"], "--name")
add("launch kubernetes", "--image missing", lambda ws, d: (["launch", "kubernetes", ws.spec, "--workers", "2"],
                                                           "--image"))
launch("kubernetes", "--image with a space", ["--image", "my image"], "--image")
launch("kubernetes", "--secret not a Kubernetes name", ["--secret", "Storage_URL"], "--secret")
launch("kubernetes", "--secret-key with a slash", ["--secret-key", "db/url"], "--secret-key")
launch("kubernetes", "--name with capitals", ["--name", "SafeSearch"], "--name")
launch("kubernetes", "--name too long", ["--name", "w" * 64], "--name")
launch("kubernetes", "--namespace with a dot", ["--namespace", "team.ml"], "--namespace")
launch("kubernetes", "--artifacts-pvc not a name", ["--artifacts-pvc", "-pvc"], "--artifacts-pvc")
launch("kubernetes", "--artifacts-path relative", ["--artifacts-pvc", "art", "--artifacts-path", "art"],
       "--artifacts-path")
launch("kubernetes", "--mount without a path", ["--mount", "models"], "--mount")
launch("kubernetes", "--mount on the artifacts' path", ["--mount", "m:/artifacts", "--artifacts-pvc", "art"],
       ("--mount", "/artifacts"))
launch("kubernetes", "--memory not a quantity", ["--memory", "64GB"], "--memory")
launch("kubernetes", "--cpus 0", ["--cpus", "0"], "--cpus")
launch("kubernetes", "--workdir relative", ["--workdir", "app"], "--workdir")
launch("kubernetes", "--backoff-limit negative", ["--backoff-limit", "-1"], "--backoff-limit")
add("launch", "unknown target", lambda ws, d: (["launch", "nomad", ws.spec], "nomad"))

# -- the storage proxy, and grpc:// storages ----------------------------------------------------------


def proxy(name: str, argv: Callable[[Any, Path], list[Any]] | list[Any], named: Any, **kw: Any) -> None:
    add("storage proxy", name, lambda ws, d: (["storage", "proxy", *(argv(ws, d) if callable(argv) else argv)],
                                              named), **kw)


proxy("--storage an unsupported database", ["--storage", "mysql://u@localhost/db", "--port", "0"], "mysql")
proxy("--storage malformed", ["--storage", "postgresql+psycopg://u@host:notaport/db", "--port", "0"], "notaport")
proxy("--storage another proxy", ["--storage", "grpc://127.0.0.1:13000", "--port", "0"],
      ("grpc://127.0.0.1:13000", "proxy"))
proxy("--storage SQLite", lambda ws, d: ["--storage", ws.url, "--port", "0"], ("sqlite", "PostgreSQL"))
proxy("--storage default (SQLite)", ["--port", "0"], ("sqlite", "PostgreSQL"))
proxy("--storage server unreachable", ["--storage", NO_SERVER, "--port", "0"], "127.0.0.1:1")
proxy("--storage password is masked", ["--storage", f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:1/test",
                                       "--port", "0"], "127.0.0.1", secret=SECRET)
proxy("--port out of range", lambda ws, d: ["--storage", ws.postgres_url, "--port", "99999"], "--port")
proxy("--port in use", lambda ws, d: ["--storage", ws.postgres_url, "--port", str(ws.hold_port())], "--port",
      postgres=True)
proxy("--host not of this machine", lambda ws, d: ["--storage", ws.postgres_url, "--host", "192.0.2.1", "--port", "0"],
      "--host 192.0.2.1", postgres=True)
proxy("--heartbeat 0", lambda ws, d: ["--storage", ws.postgres_url, "--heartbeat", "0"], "--heartbeat")
storage_case(("pareto",), "--storage grpc:// unreachable", "grpc://127.0.0.1:1", "127.0.0.1:1")
storage_case(("pareto",), "--storage grpc:// port out of range", "grpc://127.0.0.1:99999", "grpc://127.0.0.1:99999")
storage_case(("pareto",), "--storage grpc:// with a password", f"grpc://u:{SECRET}@127.0.0.1:13000", "grpc://u:***@",
             secret=SECRET)
add("worker", "--heartbeat behind a grpc:// proxy", lambda ws, d: (
    ["worker", ws.spec, "--storage", "grpc://127.0.0.1:1", "--heartbeat", "1"], ("--heartbeat", "proxy")))

# -- toyworld, demo, the command line itself -----------------------------------------------------------

add("toyworld build", "--profile unknown", lambda ws, d: (["toyworld", "build", d / "w", "--profile", "huge"], "huge"))
add("toyworld build", "OUT is a file", lambda ws, d: (["toyworld", "build", write(d / "w", "x"), "--profile", "small"], "w"))
add("toyworld build", "OUT under a file", lambda ws, d: (["toyworld", "build", write(d / "f", "x") / "w"], "f"))
add("toyworld build", "--seed not a number", lambda ws, d: (["toyworld", "build", d / "w", "--seed", "x"], "--seed"))
add("toyworld build", "--seed negative", lambda ws, d: (["toyworld", "build", d / "w", "--seed", "-3"], "--seed"))
add("toyworld build", "--family unknown", lambda ws, d: (["toyworld", "build", d / "w", "--family", "gpt2"], "--family"))
add("toyworld build", "--profile of another family", lambda ws, d: (
    ["toyworld", "build", d / "w", "--family", "smollm2", "--profile", "small"], ("--profile small", "smollm2")))
add("toyworld build", "--modality unknown", lambda ws, d: (["toyworld", "build", d / "w", "--modality", "audio"],
                                                            "--modality"))
add("toyworld build", "--modality image-text of another family", lambda ws, d: (
    ["toyworld", "build", d / "w", "--modality", "image-text", "--family", "smollm2"], ("image-text", "smollm2")))
add("toyworld build", "--profile unknown for image-text", lambda ws, d: (
    ["toyworld", "build", d / "w", "--modality", "image-text", "--profile", "smollm2"], ("smollm2", "image-text")))
add("toyworld build", "image-text OUT is a file", lambda ws, d: (
    ["toyworld", "build", write(d / "w", "x"), "--modality", "image-text", "--profile", "small"], "w"))
add("demo", "--modality unknown", lambda ws, d: (["demo", "--modality", "video"], "--modality"))
add("demo", "--storage under a file", lambda ws, d: (["demo", "--storage", write(d / "f", "x") / "s"], "f"))
add("demo", "--seed not a number", lambda ws, d: (["demo", "--seed", "x"], "--seed"))
add("safesearch", "unknown command", lambda ws, d: (["merg"], "merg"))
add("safesearch", "unknown option", lambda ws, d: (["--bogus"], "--bogus"))
add("study", "unknown subcommand", lambda ws, d: (["study", "delete"], "delete"))
add("groups", "no spec given", lambda ws, d: (["groups"], "SPEC"))
add("pareto", "no study given", lambda ws, d: (["pareto"], "STUDY"))
