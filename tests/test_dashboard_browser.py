"""``safesearch dashboard`` in a real browser: headless Chromium renders optuna-dashboard's pages (a React app)
of a real study, and the test reads what a person would see in the rendered DOM.

Chromium is Debian's package (``apt-get install chromium``; ``make test`` installs it when run as root, which is
how CI runs). Without it the test skips, and fails under ``CI=true``. ``$CHROMIUM`` names another binary.

What the pages must show (the study is tests/dashboard_study.py's: its searched trials of highest safety break
the over-refusal bound, so that the front differs with and without constraints):

- the objectives by name ("safety", "medical"): the Pareto front's axis selectors, the history plot's y axis,
  the importance plot's legend; the timeline tells infeasible trials apart (the constraint lists are read);
- the best trials, as the "Best Trial(s)" card, the trial list's "Best Trial" chips and the highlighted points
  of the Pareto front plot, equal to the front `safesearch pareto --json` reports;
- a front trial's page: its note rendered (heading with its baseline, "Holdout split" section, the tables) and
  its `responses-N.jsonl` artifact listed, downloadable and previewable as a table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import unavailable
from dashboard_study import make_dashboard_study, served_dashboard

SAFESEARCH = str(Path(sys.executable).with_name("safesearch"))
RENDER_TIMEOUT_S = 90
# The dashboard is a single-page app: Chromium runs it until its requests are answered and this much virtual
# time has passed (virtual time stands still while a request is pending, so a slow server does not cut it short).
VIRTUAL_TIME_MS = 15000


def chromium() -> str:
    """The Chromium binary: $CHROMIUM, else ``chromium`` (Debian's) or ``chromium-browser`` on PATH."""
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe or not shutil.which(exe):
        unavailable("chromium is not installed (apt-get install chromium, or `make test` as root; "
                    "$CHROMIUM names another binary)")
    return str(exe)


def render_cmd(exe: str, url: str, profile: Path) -> list[str]:
    """Headless Chromium printing the page's DOM once the app has rendered."""
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={profile}", "--window-size=1400,1000", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
            "--dump-dom", url]


# -- the rendered DOM as a tree ------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track",
         "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    def text(self) -> str:
        parts: list[str] = []

        def walk(n: Node) -> None:
            for c in n.children:
                if isinstance(c, str):
                    parts.append(c)
                elif c.tag not in ("style", "script"):
                    walk(c)

        walk(self)
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Node]:
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None,
                 where: Callable[[Node], bool] | None = None) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
                and (where is None or where(n))]

    def find(self, tag: str | None = None, cls: str | None = None,
             where: Callable[[Node], bool] | None = None) -> Node:
        found = self.find_all(tag, cls, where)
        assert found, f"no <{tag or '*'}{'.' + cls if cls else ''}> here: {self.text()[:300]!r}"
        return found[0]

    def up(self, cls: str) -> Node:
        """The nearest ancestor of class ``cls``."""
        n = self.parent
        while n is not None and cls not in n.classes:
            n = n.parent
        assert n is not None, f"no ancestor .{cls} of <{self.tag}> {self.text()[:80]!r}"
        return n

    def following(self, where: Callable[[Node], bool]) -> Node:
        """The first node after this one in document order (not inside it) that matches."""
        nodes = list(root_of(self).iter())
        inside = {id(n) for n in self.iter()}
        after = nodes[nodes.index(self) + 1:]
        for n in after:
            if id(n) not in inside and where(n):
                return n
        raise AssertionError(f"nothing after <{self.tag}> {self.text()[:80]!r} matches")


def root_of(n: Node) -> Node:
    while n.parent is not None:
        n = n.parent
    return n


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#document", {}, None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in _VOID:
            self.cur = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.cur.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.cur))

    def handle_endtag(self, tag: str) -> None:
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data: str) -> None:
        self.cur.children.append(data)


def parse(html: str) -> Node:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root


# -- the study, served and rendered ----------------------------------------------------------------


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return r.read()


@pytest.fixture(scope="module")
def browser() -> str:
    return chromium()


@pytest.fixture(scope="module")
def pages(browser: str, toyworld_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The study made as a user makes it, `safesearch dashboard` serving it, the front `safesearch pareto
    --json` reports, and the study page and a front trial's page as Chromium rendered them."""
    root = tmp_path_factory.mktemp("dash-browser")
    made = make_dashboard_study(root, toyworld_small)
    env = {**os.environ, "SAFESEARCH_STORAGE": ""}
    pareto = subprocess.run(
        [SAFESEARCH, "pareto", made["name"], "--storage", made["url"], "--json", "--plot", str(root / "p.png")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert pareto.returncode == 0, pareto.stderr
    report = json.loads(pareto.stdout)
    with served_dashboard(made) as (base, study_id):
        shown = report["front"][0]  # the front trial whose page is read
        urls = {"study": f"{base}/dashboard/studies/{study_id}",
                "trial": f"{base}/dashboard/studies/{study_id}/trials?numbers={shown['trial']}"}
        procs = {name: subprocess.Popen(render_cmd(browser, url, root / f"profile-{name}"), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name, url in urls.items()}
        doms = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=RENDER_TIMEOUT_S)
            assert proc.returncode == 0 and "</html>" in out, f"chromium on {urls[name]}: rc {proc.returncode}\n{err}"
            doms[name] = parse(out)
        yield {**made, "base": base, "id": study_id, "report": report, "shown": shown, "dom": doms}


# -- what the pages show ---------------------------------------------------------------------------


def _card(dom: Node, heading: Callable[[str], bool]) -> Node:
    """The card (MUI Paper) whose h6 heading text satisfies ``heading``."""
    return dom.find("h6", where=lambda n: heading(n.text())).up("MuiPaper-root")


def _trial_numbers(node: Node) -> list[int]:
    """The trials ``node`` links to (``.../trials?numbers=N``), in order."""
    return [int(m.group(1)) for a in node.find_all("a")
            if (m := re.search(r"/trials\?numbers=(\d+)$", a.attrs.get("href", "")))]


def _translate(node: Node) -> tuple[float, float]:
    m = re.search(r"translate\(([-\d.e]+),\s*([-\d.e]+)\)", node.attrs.get("transform", ""))
    assert m, f"<{node.tag} class={node.attrs.get('class')!r}> has no translate"
    return float(m.group(1)), float(m.group(2))


def _axis(plot: Node, axis: str) -> Callable[[float], float]:
    """Pixels (in the plot's frame) to values along ``axis`` ("x" or "y"), from Plotly's tick labels."""
    ticks = []
    for t in plot.find_all("g", cls=f"{axis}tick"):
        label = t.find("text")
        value = float(label.attrs["data-unformatted"].replace("\u2212", "-"))
        ticks.append((_translate(label)[0 if axis == "x" else 1], value))
    assert len(ticks) >= 2, f"{axis} axis without ticks"
    (p0, v0), (p1, v1) = ticks[0], ticks[-1]
    return lambda p: v0 + (p - p0) * (v1 - v0) / (p1 - p0)


def _pareto_plot_points(dom: Node) -> tuple[list[tuple[float, float]], int]:
    """The (x, y) values of the points the Pareto front plot draws as best trials, and how many it draws."""
    plot = dom.find("div", where=lambda n: n.attrs.get("id") == "graph-pareto-front")
    # The best trials' trace is the one with the colour bar titled "Best Trial" (class cb<uid> / trace<uid>).
    title = plot.find("text", where=lambda n: n.text() == "Best Trial")
    uid = next(c[2:] for c in title.up("colorbar").classes if c.startswith("cb") and c != "colorbar")
    trace = plot.find("g", cls=f"trace{uid}")
    ox, oy = _translate(trace.up("xy"))  # the points are drawn in the plot area's frame
    to_x, to_y = _axis(plot, "x"), _axis(plot, "y")
    best = [(to_x(ox + px), to_y(oy + py)) for px, py in map(_translate, trace.find_all("path", cls="point"))]
    return best, len(plot.find_all("path", cls="point"))


def test_pages_name_the_objectives(pages: dict[str, Any]) -> None:
    study = pages["dom"]["study"]
    pareto = _card(study, lambda t: t == "Pareto Front")
    axes = {legend.text(): legend.following(lambda n: n.attrs.get("role") == "combobox").text()
            for legend in pareto.find_all("legend", where=lambda n: n.text().startswith("Objective"))}
    assert axes == {"Objective X:": "safety", "Objective Y:": "medical"}  # not "0" and "1"
    titles = {n.text() for n in study.find_all("text", where=lambda n: "ytitle" in n.classes)}
    assert "safety" in titles  # the history plot's y axis
    legends = [n.text() for n in study.find_all("text", cls="legendtext")]
    assert "safety" in legends and "medical" in legends  # the importance plot, per objective
    assert "Infeasible" in legends  # the timeline reads the constraint lists


def test_best_trials_are_the_front_of_safesearch_pareto(pages: dict[str, Any]) -> None:
    front = pages["report"]["front"]
    numbers = sorted(t["trial"] for t in front)
    # The study page's card: "Best Trial (number=N)" for one, a list of "Trial N" for several; each links N.
    card = _card(pages["dom"]["study"], lambda t: t.startswith("Best Trial"))
    assert sorted(set(_trial_numbers(card))) == numbers
    if len(numbers) == 1:
        assert card.find("h6").text() == f"Best Trial (number={numbers[0]})"
    # The trial list beside a trial's page: a "Best Trial" chip on the front's trials and on no other.
    listed = {}
    for item in pages["dom"]["trial"].find_all(cls="MuiListItemButton-root"):
        primary = item.find_all(cls="MuiListItemText-primary")
        if primary and (m := re.fullmatch(r"Trial (\d+)", primary[0].text())):
            listed[int(m.group(1))] = [c.text() for c in item.find_all(cls="MuiChip-label")]
    assert sorted(listed) == list(range(pages["report"]["n_complete"]))
    chipped = sorted(k for k, chips in listed.items() if "Best Trial" in chips)
    assert chipped == numbers
    # The Pareto front plot highlights the same trials (by their values), among all the complete ones.
    best, drawn = _pareto_plot_points(pages["dom"]["study"])
    want = sorted((t["scores"]["safety"], t["scores"]["medical"]) for t in front)
    assert sorted(best) == [pytest.approx(w, abs=0.005) for w in want]
    assert drawn == pages["report"]["n_complete"]


def test_trial_page_shows_the_note_and_the_responses(pages: dict[str, Any]) -> None:
    trial, shown = pages["dom"]["trial"], pages["shown"]
    n = shown["trial"]
    assert trial.find("h4").text().startswith(f"Trial {n} (trial_id=")
    # The note, rendered from Markdown: "## Trial 0: baseline `zero`" reads "Trial 0: baseline zero".
    note = trial.find("h5", where=lambda h: h.text() == "Note").following(lambda x: "MuiCard-root" in x.classes)
    heading = f"Trial {n}" + (f": baseline {shown['baseline']}" if shown.get("baseline") else "")
    assert note.find("h2").text() == heading
    sections = [h.text() for h in note.find_all("h3")]
    assert sections == ["Search split", "Holdout split", "Coefficients", "Sample exchanges"]
    scores = [p.text() for p in note.find_all("p") if p.text().startswith("safety ")]
    assert len(scores) == 2 and all(p.endswith("· feasible") for p in scores)  # search and holdout, both feasible
    assert len(note.find_all("table")) == 4
    # Its responses: listed as an artifact, downloadable, with the button that previews it as a table.
    card = trial.find("h5", where=lambda h: h.text() == "Artifacts").following(lambda x: "MuiCard-root" in x.classes)
    assert card.find("p").text() == f"responses-{n}.jsonl"
    card.find("button", where=lambda b: b.attrs.get("aria-label") == "show artifact table")
    link = card.find("a", where=lambda a: a.attrs.get("aria-label") == "download artifact")
    assert link.attrs["download"] == f"responses-{n}.jsonl"
    rows = [json.loads(r) for r in _get(pages["base"] + link.attrs["href"]).decode().splitlines()]
    assert rows and all("suite" in r and "prompt" in r for r in rows)
