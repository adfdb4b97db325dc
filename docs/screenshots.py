"""Screenshots of ``safesearch dashboard`` for the README, taken by hand:

    .venv/bin/python docs/screenshots.py [--world PATH] [--out docs/img]
    .venv/bin/python docs/screenshots.py --storage sqlite:///storage/safesearch.db --study toy   # the demo's

With ``--storage`` and ``--study``, shoots that study (the README's images are the demo's study, seed 0:
``safesearch demo`` then this with its storage). Otherwise it makes the tests' dashboard study (tests/dashboard_study.py: `safesearch run` then `validate` on the small toy
world; by default the world the tests build and reuse under storage/.test-cache, built if missing), serves it
with `safesearch dashboard` and has headless Chromium (Debian's ``chromium``, or ``--chromium PATH``) take:

- ``dashboard-study.png``: the study page, the Pareto front plot with its objectives by name, the feasible
  front highlighted (infeasible trials grey);
- ``dashboard-trial.png``: a front trial's page, its note (scores per suite on search and holdout,
  coefficients, sample exchanges);
- ``dashboard-responses.png``: the same trial's ``responses-N.jsonl`` artifact, previewed as a table.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), so that the script waits
for what it shows and can open the preview; nothing beyond the standard library and Chromium is needed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "storage" / ".test-cache" / "toyworld-small-0"  # the tests' small world (tests/conftest.py)
SIZE = (1400, 1000)


class Chromium:
    """Headless Chromium, one page, driven over the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, exe: str, profile: Path, size: tuple[int, int] = SIZE) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        # Above 4 in the parent, so that the child's dup2 onto 3 and 4 cannot clobber them.
        cmd_r, res_w = (self._high(fd) for fd in (cmd_r, res_w))

        def onto_3_and_4() -> None:
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={size[0]},{size[1]}", "about:blank"],
            close_fds=False, preexec_fn=onto_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        self.out, self.inp, self.buf, self.next_id = cmd_w, res_r, b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", page=True, width=size[0], height=size[1],
                  deviceScaleFactor=1, mobile=False)

    @staticmethod
    def _high(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def call(self, method: str, page: bool = False, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if page:
            msg["sessionId"] = self.session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited during {method}")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True)["result"].get(
            "value")

    def wait(self, ready: str, timeout: float = 30.0) -> None:
        """Wait until the JavaScript expression ``ready`` is true, then a second for plots and fonts to settle."""
        deadline = time.monotonic() + timeout
        while not self.js(ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.js('location.href')}: not ready after {timeout:.0f} s ({ready})")
            time.sleep(0.2)
        time.sleep(1.0)

    def goto(self, url: str, ready: str) -> None:
        self.call("Page.navigate", page=True, url=url)
        self.wait(ready)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", page=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path}")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # it may be gone already
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.out)
        os.close(self.inp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, default=None,
                    help=f"a built small toy world (default: {WORLD.relative_to(ROOT)}, built if missing)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "chromium",
                    help="the Chromium binary (default: $CHROMIUM, else chromium on PATH)")
    ap.add_argument("--storage", default=None, metavar="URL",
                    help="shoot the finished study --study of this storage instead of making one")
    ap.add_argument("--study", default=None, help="with --storage: the study's name")
    ap.add_argument("--artifacts", type=Path, default=None, help="with --storage: its artifact store")
    args = ap.parse_args()
    if (args.storage is None) != (args.study is None):
        sys.exit("error: give --storage and --study together")
    if not shutil.which(args.chromium):
        sys.exit(f"error: --chromium {args.chromium}: not found (apt-get install chromium)")

    sys.path.insert(0, str(ROOT / "tests"))
    from dashboard_study import make_dashboard_study

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="safesearch-screenshots-") as tmp:
        if args.storage is not None:
            from safesearch.storage import artifact_root

            made = {"name": args.study, "url": args.storage, "artifacts": artifact_root(args.storage, args.artifacts)}
        else:
            world = args.world
            if world is None:
                from safesearch.toyworld.build import build

                build(WORLD, seed=0, profile="small")  # reuses what is complete
                world = WORLD
            made = make_dashboard_study(Path(tmp) / "study", world.resolve())
        env = {**os.environ, "SAFESEARCH_STORAGE": ""}
        report = json.loads(subprocess.run(
            [sys.executable, "-m", "safesearch", "pareto", made["name"], "--storage", made["url"], "--json",
             "--plot", str(Path(tmp) / "pareto.png")], check=True, capture_output=True, text=True, env=env).stdout)
        trial = report["front"][0]["trial"]
        server = subprocess.Popen(
            [sys.executable, "-m", "safesearch", "dashboard", "--storage", made["url"], "--port", "0",
             "--artifacts", str(made["artifacts"])], stderr=subprocess.PIPE, text=True, env=env)
        browser = None
        try:
            line = server.stderr.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if not m:
                sys.exit(f"error: the dashboard did not start: {line}{server.stderr.read()}")
            base = f"http://127.0.0.1:{m.group(1)}"
            with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
                (study_id,) = [s["study_id"] for s in json.load(r)["study_summaries"] if s["study_name"] == made["name"]]
            page = f"{base}/dashboard/studies/{study_id}"
            browser = Chromium(args.chromium, Path(tmp) / "profile")

            browser.goto(page, "document.querySelectorAll('#graph-pareto-front .point').length > 0 && "
                               "[...document.querySelectorAll('h6')].some(h => h.textContent.startsWith('Best Trial'))")
            browser.screenshot(args.out / "dashboard-study.png")

            browser.goto(f"{page}/trials?numbers={trial}",
                         "!!document.querySelector('.MuiCardContent-root h2') && "
                         "!!document.querySelector('[aria-label=\"show artifact table\"]')")
            browser.screenshot(args.out / "dashboard-trial.png")

            browser.js("document.querySelector('[aria-label=\"show artifact table\"]').click()")
            browser.wait("!!document.querySelector('.MuiModal-root table td')")
            browser.screenshot(args.out / "dashboard-responses.png")
        finally:
            if browser is not None:
                browser.close()
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
