"""``safesearch launch slurm|kubernetes``: the files render through the real command line, parse as what
they claim to be (bash, a batch/v1 Job), carry no storage URL, and start a worker that the real
``safesearch worker`` parser accepts; docs/cluster.md shows what the commands print.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_run import run_cli

from safesearch.cli import _register
from safesearch.errors import UserError
from safesearch.launch import check_dns_label, check_dns_subdomain, check_mount, job_name

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "studies" / "toy.yaml"
SECRET_URL = "postgresql+psycopg://ml:hunter2-pw@db.example.org:5432/safesearch"


@pytest.fixture(autouse=True)
def storage_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL with a password where a careless renderer would find it."""
    monkeypatch.setenv("SAFESEARCH_STORAGE", SECRET_URL)


def _render(capsys: pytest.CaptureFixture, *args: object) -> str:
    code, out, err = run_cli(capsys, "launch", *args)
    assert code == 0, err
    assert "hunter2" not in out + err and "db.example.org" not in out + err
    return out


def _worker_params(argv: list[str]) -> dict:
    """``safesearch ARGV`` parsed by the real ``worker`` command, as a shell would pass it, without running it."""
    from safesearch.cli.study import worker

    _register()
    assert argv[0] == "worker", argv
    return worker.make_context("worker", list(argv[1:])).params


def test_kubernetes_job(capsys: pytest.CaptureFixture) -> None:
    out = _render(
        capsys, "kubernetes", SPEC, "--workers", 3, "--image", "registry.example/safesearch:1", "--cpus", 6,
        "--secret", "db-url", "--secret-key", "dsn", "--artifacts-pvc", "shared-art", "--mount", "models:/models",
        "--memory", "48Gi", "--namespace", "ml", "--workdir", "/models/repo",
    )  # fmt: skip
    job = yaml.safe_load(out)
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["name"] == "safesearch-toy" and job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] == 3
    assert spec["backoffLimit"] == 6  # two replacements per worker: restarting a worker is safe
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    ]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy requires
    (c,) = pod["containers"]
    assert c["env"] == [
        {"name": "SAFESEARCH_STORAGE", "valueFrom": {"secretKeyRef": {"name": "db-url", "key": "dsn"}}}
    ]
    assert c["resources"] == {
        "requests": {"cpu": "6", "memory": "48Gi"},
        "limits": {"nvidia.com/gpu": 1, "memory": "48Gi"},
    }
    assert c["image"] == "registry.example/safesearch:1" and c["workingDir"] == "/models/repo"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert {p: claims[n] for p, n in mounts.items()} == {"/models": "models", "/artifacts": "shared-art"}
    assert c["command"][0] == "safesearch" and "--storage" not in c["command"]
    params = _worker_params(c["command"][1:])
    assert params["spec_path"] == SPEC and params["device"] == "cuda:0" and params["threads"] == 6
    assert params["artifacts"] == Path("/artifacts") and params["storage_url"] is None


def test_kubernetes_defaults_and_a_wrapped_command(capsys: pytest.CaptureFixture) -> None:
    out = _render(
        capsys, "kubernetes", SPEC, "--workers", 1, "--image", "img", "--safesearch", "python -m safesearch"
    )
    job = yaml.safe_load(out)
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][:3] == ["python", "-m", "safesearch"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "safesearch-storage", "key": "url"}
    assert "volumes" not in job["spec"]["template"]["spec"] and "--artifacts" not in c["command"]
    assert _worker_params(c["command"][3:])["threads"] == 4


def _exec_line(script: str) -> list[str]:
    (line,) = [ln for ln in script.splitlines() if ln.startswith("exec ")]
    return shlex.split(line)[1:]


def test_slurm_script(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "jobs" / "w.sbatch"
    _render(
        capsys, "slurm", SPEC, "--workers", 4, "--partition", "gpu", "--time", "1-12:00:00", "--cpus-per-task", 8,
        "--mem", "64G", "--setup", "source /shared/venv/bin/activate", "--setup", "module load cuda/12.4",
        "--artifacts", "/shared/art", "--out", out,
    )  # fmt: skip
    script = out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["w.sbatch"]  # no temporary file left
    assert not out.stat().st_mode & stat.S_IWOTH
    subprocess.run(["bash", "-n", str(out)], check=True)
    sbatch = [ln.removeprefix("#SBATCH ") for ln in script.splitlines() if ln.startswith("#SBATCH ")]
    assert sbatch == [
        "--job-name=safesearch-toy", "--array=0-3", "--ntasks=1", "--cpus-per-task=8", "--gres=gpu:1",
        "--time=1-12:00:00", "--partition=gpu", "--mem=64G", "--requeue", "--output=%x-%A_%a.out",
    ]  # fmt: skip
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(i for i, ln in enumerate(script.splitlines()) if ln and not ln.startswith("#"))
    assert all(i < first_command for i, ln in enumerate(script.splitlines()) if ln.startswith("#SBATCH"))
    assert "source /shared/venv/bin/activate\nmodule load cuda/12.4\n" in script
    assert not re.search(r"://\S*@", script)  # no URL with credentials, not even an example
    argv = _exec_line(script)
    assert argv[0] == "safesearch" and "--storage" not in argv
    params = _worker_params(argv[1:])
    assert params["spec_path"] == SPEC and params["device"] == "cuda:0" and params["threads"] == 8
    assert params["artifacts"] == Path("/shared/art")


def _stub(tmp_path: Path) -> Path:
    """A ``safesearch`` that records what it was started with (its arguments and storage URL)."""
    stub = tmp_path / "bin" / "safesearch"
    stub.parent.mkdir()
    stub.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"; printf "%s" "$SAFESEARCH_STORAGE" > "$RECORD.url"\n'
    )
    stub.chmod(0o755)
    return stub


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_runs_the_worker_with_the_url_from_a_file(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """The script itself, run by bash as a task would run it (the worker stubbed): the URL read from the
    file reaches the worker's environment; without one the script stops with one line."""
    url_file = tmp_path / "url"
    url_file.write_text(SECRET_URL + "\n")
    stub = _stub(tmp_path)
    script = _render(capsys, "slurm", SPEC, "--workers", 2, "--storage-file", url_file, "--safesearch", stub)
    assert "hunter2" not in script
    record = tmp_path / "record"
    env = {k: v for k, v in os.environ.items() if k != "SAFESEARCH_STORAGE"} | {"RECORD": str(record)}
    subprocess.run(["bash", "-c", script], check=True, env=env, cwd=ROOT, timeout=30)
    assert record.read_text().split() == _exec_line(script)[1:]
    assert Path(f"{record}.url").read_text() == SECRET_URL

    bare = _render(capsys, "slurm", SPEC, "--workers", 2, "--safesearch", stub)
    r = subprocess.run(["bash", "-c", bare], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "SAFESEARCH_STORAGE: is not set" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run(
        ["bash", "-c", bare], env=env | {"SAFESEARCH_STORAGE": SECRET_URL}, cwd=ROOT, timeout=30
    )
    assert r.returncode == 0 and Path(f"{record}.url").read_text() == SECRET_URL


@pytest.mark.parametrize(
    ("check", "value", "ok"),
    [
        (check_dns_subdomain, "safesearch-storage", True),
        (check_dns_subdomain, "db.url.v2", True),
        (check_dns_subdomain, "Storage", False),
        (check_dns_subdomain, "db_url", False),
        (check_dns_subdomain, "-db", False),
        (check_dns_subdomain, "db.", False),
        (check_dns_subdomain, "a" * 254, False),
        (check_dns_label, "a" * 63, True),
        (check_dns_label, "a" * 64, False),
        (check_dns_label, "team.ml", False),
    ],
)
def test_kubernetes_names(check, value: str, ok: bool) -> None:
    if ok:
        assert check(value, "--secret") == value
    else:
        with pytest.raises(UserError, match="^--secret .*not a valid Kubernetes name"):
            check(value, "--secret")


def test_job_names_and_mounts() -> None:
    assert job_name("toy") == "safesearch-toy"
    assert job_name("Lingshu_7B.v2") == "safesearch-lingshu-7b-v2"
    assert len(job_name("x" * 100)) <= 63 and not job_name("x" * 100).endswith("-")
    assert check_mount("models:/data/models", "--mount") == ("models", "/data/models")
    with pytest.raises(UserError, match="CLAIM:/absolute/path"):
        check_mount("models:data", "--mount")


def _documented(doc: str) -> list[tuple[str, str]]:
    """(command, the block after it) for each fenced block of docs/cluster.md that is a launch command."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", doc, flags=re.S)
    return [
        (b.strip(), blocks[i + 1]) for i, b in enumerate(blocks[:-1]) if b.startswith("safesearch launch ")
    ]


def test_the_docs_show_what_the_commands_render(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    examples = _documented((ROOT / "docs" / "cluster.md").read_text())
    assert {cmd.split()[2] for cmd, _ in examples} == {"slurm", "kubernetes"}
    for cmd, shown in examples:
        words = shlex.split(cmd.replace("\\\n", " "))
        assert _render(capsys, *words[2:]) == shown, f"docs/cluster.md is out of date for: {cmd}"


def test_rendering_loads_no_torch(tmp_path: Path) -> None:
    """Rendering runs on a login node or a laptop: nothing heavy is loaded, not even for a vLLM study."""
    probe = (
        "import sys\nfrom safesearch.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert not {'torch', 'transformers', 'vllm'} & set(sys.modules)\n"
    )
    out = tmp_path / "job.yaml"
    spec = ROOT / "studies" / "lingshu-7b.yaml"  # a vLLM study: its full check would load vLLM
    args = ["launch", "kubernetes", str(spec), "--workers", "2", "--image", "img", "--out", str(out)]
    r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"wrote {out}; submit with `kubectl apply -f {out}`\n"
