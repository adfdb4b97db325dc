"""Responses kept whole where a person reads them: with the judge's early stop, the first
``full_responses`` items are generated again to full length for the record, and their verdicts, and every
score, stay those of the cut responses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from safesearch.backends.transformers import TransformersBackend
from safesearch.dashboard import samples_section
from safesearch.evaluate import evaluate, exchanges, load_items
from safesearch.suites import load_suite, packaged_suites_dir


@pytest.fixture(scope="module")
def medical(toyworld_small: Path) -> TransformersBackend:
    return TransformersBackend.from_pretrained(toyworld_small / "medical", device="cpu")


def _suite(full: int):
    suite = load_suite("toy-harmful-general", [packaged_suites_dir()])
    return replace(suite, generation=replace(suite.generation, full_responses=full))


def test_a_sample_is_generated_to_full_length_and_the_scores_stay(toyworld_small: Path,
                                                                  medical: TransformersBackend) -> None:
    items = load_items(_suite(0), toyworld_small)[:12]
    cut = evaluate(medical, _suite(0), items)
    kept = evaluate(medical, _suite(4), items)
    assert cut.metrics == kept.metrics
    assert [o.verdict for o in cut.items] == [o.verdict for o in kept.items]
    assert all(o.judged_response is None for o in cut.items)
    # The first 4 items' records hold the whole response and, beside it, the cut one the verdict rests on;
    # the others are as judged.
    for c, k in zip(cut.items[:4], kept.items[:4], strict=True):
        if k.judged_response is not None:
            assert k.judged_response == c.response and k.response != c.response
    assert [o.response for o in kept.items[4:]] == [o.response for o in cut.items[4:]]
    assert all(o.judged_response is None for o in kept.items[4:])
    longer = [k for k in kept.items[:4] if k.judged_response is not None and len(k.response) > len(k.judged_response)]
    assert longer, [(o.response, o.judged_response) for o in kept.items[:4]]  # the stop did cut some
    # What the artifact and the dashboard note show: the whole responses, those first.
    rows = exchanges(_suite(4), items, kept, None)
    assert rows[0]["response"] == kept.items[0].response
    assert any("judged_response" in r for r in rows[:4]) and not any("judged_response" in r for r in rows[4:])
    # Even listed last, a whole response is the one the note shows.
    shown = "\n".join(samples_section(list(reversed(rows)), per_suite=1))
    first_full = next(r for r in reversed(rows) if "judged_response" in r)
    assert first_full["id"] in shown and rows[-1]["id"] not in shown
