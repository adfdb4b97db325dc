"""Running one bad input through the ``safesearch`` command line and judging what it did.

A :class:`Case` makes its bad input inside a :class:`Workspace` (a copy of the small toy world, valid
specs, a finished study on SQLite) and returns the argv and the text its error must name. :func:`check`
runs it in this process (the CLI's own ``main``, stdout and stderr captured at the file-descriptor level
as well as ``sys.stdout``/``sys.stderr``), in the workspace as the working directory, and reports:

- ``traceback``: a Python traceback on stderr, or an exception other than ``SystemExit`` out of ``main``;
- ``wrong exit``: an exit code other than the expected one (2 for bad input), 0 included;
- ``unclear``: not exactly one line on stderr starting ``error:`` and naming the input;
- ``left behind``: any file or directory of the workspace added, removed or changed, a SQLite database
  that fails ``integrity_check``, a study or trial added or changed, on SQLite or PostgreSQL;
- ``leaked``: a secret of the case (a password) printed anywhere.

It runs under pytest (``test_bad_inputs.py``) and as a script that prints the table per command
(``python tests/bad_inputs/harness.py``), which is how the closing note's before/after figures were made.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (argv, the text the one error line must contain); a tuple of texts: all of them.
Made = tuple[list[str], "str | tuple[str, ...]"]


@dataclass(frozen=True)
class Case:
    command: str
    name: str
    make: Callable[[Any, Path], Made]  # (workspace, this case's own directory) -> argv, named
    code: int = 2
    env: Mapping[str, str] = field(default_factory=dict)
    secret: str | None = None  # must appear nowhere in the output
    postgres: bool = False  # snapshot the PostgreSQL test database too

    @property
    def id(self) -> str:
        return f"{self.command}: {self.name}"


@dataclass
class Outcome:
    case: Case
    code: int | str
    stdout: str
    stderr: str
    named: tuple[str, ...]
    changes: list[str]

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr or self.code == "uncaught"

    @property
    def wrong_exit(self) -> bool:
        return self.code != self.case.code

    @property
    def unclear(self) -> bool:
        lines = self.lines
        return not (
            len(lines) == 1 and lines[0].startswith("error:") and all(n in lines[0] for n in self.named)
        )

    @property
    def leaked(self) -> bool:
        s = self.case.secret
        return bool(s) and (s in self.stderr or s in self.stdout)

    @property
    def left_behind(self) -> bool:
        return bool(self.changes)

    @property
    def clean(self) -> bool:
        return not (self.traceback or self.wrong_exit or self.unclear or self.leaked or self.left_behind)

    def explain(self) -> str:
        return (
            f"{self.case.id}: exit {self.code} (expected {self.case.code}); must name {self.named}; "
            f"changes {self.changes[:5]}\n--- stderr ---\n{self.stderr[-3000:]}\n--- stdout ---\n{self.stdout[-1000:]}"
        )


# -- snapshots ---------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (directories too) with a digest of its content; SQLite databases are
    summarised by their studies and trials (their bytes change when merely opened in WAL mode)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in dirnames:
            p = d / name
            out[str(p.relative_to(root)) + "/"] = "link" if p.is_symlink() else "dir"
        for name in filenames:
            p = d / name
            rel = str(p.relative_to(root))
            if name.endswith((".db-wal", ".db-shm")):
                continue
            if name.endswith(".db"):
                out[rel] = sqlite_summary(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
    return out


def sqlite_summary(path: Path) -> str:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            ok = con.execute("pragma integrity_check").fetchone()[0]
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            rows = []
            for table in ("studies", "trials", "study_user_attributes", "trial_user_attributes", "trial_values"):
                if table in tables:
                    rows.append(f"{table}={con.execute(f'select count(*) from {table}').fetchone()[0]}")
            if "trials" in tables:
                rows.append(str(con.execute("select group_concat(state) from trials").fetchone()[0]))
            return f"sqlite {ok} {' '.join(rows)} tables={len(tables)}"
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return f"not sqlite ({e}) size={path.stat().st_size}"


def postgres_summary(url: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            if "studies" not in tables:
                return f"no optuna tables ({len(tables)} tables)"
            studies = conn.execute(sa.text("select count(*) from studies")).scalar_one()
            trials = conn.execute(sa.text("select count(*), coalesce(sum(length(state::text)), 0) from trials")).one()
            return f"{len(tables)} tables, {studies} studies, trials {tuple(trials)}"
    finally:
        engine.dispose()


def diff(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    changes = [f"+{k}" for k in after if k not in before]
    changes += [f"-{k}" for k in before if k not in after]
    changes += [f"~{k}" for k in before if k in after and before[k] != after[k]]
    return sorted(changes)


# -- running -----------------------------------------------------------------------------------------


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _captured() -> Iterator[tuple[Any, Any]]:
    """fd 1/2 and sys.stdout/sys.stderr into two temporary files."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 (handed to the caller)
    saved = os.dup(1), os.dup(2)
    saved_sys = sys.stdout, sys.stderr
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), encoding="utf-8", write_through=True)
    try:
        yield out, err
    finally:
        for s in (sys.stdout, sys.stderr):
            s.flush()
            s.close()
        sys.stdout, sys.stderr = saved_sys
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def _environment(cwd: Path, env: Mapping[str, str]) -> Iterator[None]:
    old_cwd = os.getcwd()
    old_env = {k: os.environ.get(k) for k in (*env, "SAFESEARCH_STORAGE", "SAFESEARCH_ARTIFACTS", "SAFESEARCH_DATA_ROOT")}
    for k in ("SAFESEARCH_STORAGE", "SAFESEARCH_ARTIFACTS", "SAFESEARCH_DATA_ROOT"):
        os.environ.pop(k, None)
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def invoke(argv: list[str], cwd: Path, env: Mapping[str, str] | None = None, hang_s: int = 120) -> tuple[int | str, str, str]:
    """Run ``safesearch ARGV`` in this process; (exit code or "uncaught"/"hang", stdout, stderr)."""
    from safesearch.cli import main

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(hang_s)
    code: int | str
    try:
        with _environment(cwd, env or {}), _captured() as (out, err):
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except _Hang:
                code = "hang"
            except BaseException:  # what the user would see as a traceback
                import traceback

                traceback.print_exc()
                code = "uncaught"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    out.close()
    err.close()
    return code, stdout, stderr


def check(case: Case, ws: Any) -> Outcome:
    """Make the case's input, run it, compare the workspace (and PostgreSQL) before and after."""
    d = ws.case_dir(case)
    argv, named = case.make(ws, d)
    named_t = (named,) if isinstance(named, str) else tuple(named)
    before = snapshot(ws.root)
    pg_before = postgres_summary(ws.postgres_url) if case.postgres and ws.postgres_url else None
    # The toy suites' paths are relative to the toy world: it is the data root unless a case says otherwise.
    env = {"SAFESEARCH_DATA_ROOT": str(ws.world), **case.env}
    code, stdout, stderr = invoke([str(a) for a in argv], ws.root, env)
    after = snapshot(ws.root)
    changes = diff(before, after)
    if pg_before is not None:
        pg_after = postgres_summary(ws.postgres_url)
        if pg_after != pg_before:
            changes.append(f"postgres: {pg_before} -> {pg_after}")
    if changes:
        ws.restore()
    return Outcome(case, code, stdout, stderr, named_t, changes)


# -- the report ---------------------------------------------------------------------------------------


COLUMNS = ("tried", "clean", "traceback", "wrong exit", "unclear", "left behind", "leaked")


def table(outcomes: list[Outcome]) -> str:
    rows: dict[str, list[int]] = {}
    for o in outcomes:
        r = rows.setdefault(o.case.command, [0] * len(COLUMNS))
        flags = (True, o.clean, o.traceback, o.wrong_exit, o.unclear, o.left_behind, o.leaked)
        for i, f in enumerate(flags):
            r[i] += int(f)
    total = [sum(r[i] for r in rows.values()) for i in range(len(COLUMNS))]
    lines = ["| command | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for cmd in sorted(rows):
        lines.append(f"| {cmd} | " + " | ".join(map(str, rows[cmd])) + " |")
    lines.append("| **all** | " + " | ".join(f"**{x}**" for x in total) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run the whole corpus and print the table per command (and each case that is not clean)."""
    import argparse

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    from cases import CASES
    from workspace import Workspace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="run the cases whose id contains this text")
    p.add_argument("--skip", action="append", default=[], help="skip the cases whose id contains this text")
    p.add_argument("-v", "--verbose", action="store_true", help="print each case that is not clean")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="safesearch-bad-inputs-") as tmp:
        ws = Workspace.create(Path(tmp))
        outcomes = []
        for case in CASES:
            if (args.only and args.only not in case.id) or any(x in case.id for x in args.skip):
                continue
            o = check(case, ws)
            outcomes.append(o)
            if args.verbose and not o.clean:
                print(o.explain(), file=sys.stderr)
            print(f"{'ok  ' if o.clean else 'BAD '} {case.id}", file=sys.stderr, flush=True)
        ws.close()
    print(table(outcomes))


if __name__ == "__main__":
    main()
