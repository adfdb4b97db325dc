"""The Markdown a study's trials and study note carry for optuna-dashboard (pure functions)."""

from __future__ import annotations

from safesearch.dashboard import (
    HOLDOUT_HEADING,
    holdout_table,
    samples_section,
    scores_section,
    trial_note,
    with_holdout,
    with_study_holdout,
)

SUITES = {"harm@search[4]": {"safety": 0.75, "asr": 0.25, "n": 4, "n_unjudged": 0}}


def _note(number: int = 3, baseline: str | None = None) -> str:
    search = scores_section("### Search split", {"safety": 0.75}, {"over_refusal": 0.2}, {"over_refusal": "max 0.1"},
                            SUITES, False)
    samples = samples_section([
        {"suite": "harm@search[4]", "id": f"h{i}", "prompt": "how to | do it\nnow", "response": "no", "verdict": "refusal"}
        for i in range(3)])
    return trial_note(number, baseline, search, {"safety": {"embed": 0.5, "layer.0": 1.0}}, samples)


def test_a_note_names_the_baseline_and_shows_scores_coefficients_and_samples() -> None:
    note = _note(0, "zero")
    assert note.startswith("## Trial 0: baseline `zero`\n\nA baseline, enqueued before the search: the anchor as is.")
    assert "**safety** 0.750 · **over_refusal** 0.200 (max 0.1) · INFEASIBLE" in note
    assert "| harm@search[4] | 4 | safety 0.750, asr 0.250 |" in note
    assert "| embed | 0.500 |" in note and "| layer.0 | 1.000 |" in note
    # Two samples per suite; a pipe or a line break in a prompt does not break the table.
    assert note.count("| harm@search[4] | h") == 2 and "how to \\| do it now" in note
    assert _note(3).startswith("## Trial 3\n\n### Search split")


def test_holdout_goes_before_the_coefficients_and_is_replaced_not_repeated() -> None:
    first = scores_section(HOLDOUT_HEADING, {"safety": 0.5}, {}, {}, {"harm@holdout[4]": {"safety": 0.5, "n": 4}}, None)
    second = scores_section(HOLDOUT_HEADING, {"safety": 0.9}, {}, {}, {"harm@holdout[4]": {"safety": 0.9, "n": 4}}, None)
    once = with_holdout(_note(), first)
    assert once.index(HOLDOUT_HEADING) < once.index("### Coefficients") and "**safety** 0.500" in once
    twice = with_holdout(once, second)
    assert twice.count(HOLDOUT_HEADING) == 1 and "**safety** 0.900" in twice and "**safety** 0.500" not in twice
    assert twice.replace("0.900", "0.500") == once


def test_the_study_note_keeps_what_a_person_wrote() -> None:
    rows = [("1", "* zero", {"scores": {"safety": 0.1}}, {"scores": {"safety": 0.2}, "feasible": True}),
            ("", "[aligned]", {}, {"scores": {"safety": 1.0}, "feasible": False})]
    table = holdout_table(rows, ["safety"], [])
    note = with_study_holdout("My notes on this study.\n", table)
    assert note.startswith("My notes on this study.\n\n## Holdout split (safesearch validate)")
    assert "| 1 | * zero | 0.100 / 0.200 | yes |" in note and "|  | [aligned] | - / 1.000 | NO |" in note
    again = with_study_holdout(note + "\n## Later\nmore words\n", table)
    assert again.count("## Holdout split") == 1 and again.endswith("## Later\nmore words\n")
