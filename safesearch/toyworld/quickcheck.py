"""The quick check after a build: does each checkpoint show the behaviour the toy world is built for?

Per checkpoint, on the held-out split: refusal rate on harmful requests (general and medical), refusal
rate on benign requests (over-refusal), and medical MCQ accuracy by the option of highest
log-likelihood. The same backend and judge serve ``safesearch eval``, so its numbers match these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from safesearch.backends.base import Prompt
from safesearch.backends.transformers import TransformersBackend
from safesearch.judges import KeywordJudge
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.toyworld.data import read_records

# The toy models' answers decide a refusal in their first few words.
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class CheckRow:
    checkpoint: str
    harmful_general_refusal: float
    harmful_medical_refusal: float
    harmful_refusal: float
    benign_refusal: float
    mcq_accuracy: float

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def refusal_rate(backend: TransformersBackend, prompts: Sequence[str], judge: KeywordJudge) -> float:
    # Stop each row once its verdict is settled: the judge reads only the opening words.
    responses = backend.generate(list(prompts), MAX_NEW_TOKENS, stop=judge.decided)
    return sum(judge.is_refusal(r) for r in responses) / len(responses)


def mcq_accuracy(backend: TransformersBackend, items: Sequence[dict],
                 prompt: Callable[[dict], str | Prompt] | None = None) -> float:
    """The share of ``items`` whose answer option has the highest log-likelihood; ``prompt`` makes an
    item's user turn (default: its question and options as text)."""
    prompt = prompt or (lambda it: mcq_user_text(it["text"], it["options"]))
    requests = []
    for it in items:
        user = prompt(it)
        requests += [(user, mcq_answer_text(it["options"], i)) for i in range(len(it["options"]))]
    scores = iter(backend.loglikelihood(requests))
    correct = 0
    for it in items:
        lls = [next(scores)[0] for _ in it["options"]]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == it["answer"])
    return correct / len(items)


def check(name: str, backend: TransformersBackend, holdout: dict[str, list[dict]]) -> CheckRow:
    judge = KeywordJudge()
    general = refusal_rate(backend, [r["text"] for r in holdout["harmful_general"]], judge)
    medical = refusal_rate(backend, [r["text"] for r in holdout["harmful_medical"]], judge)
    n_g, n_m = len(holdout["harmful_general"]), len(holdout["harmful_medical"])
    return CheckRow(
        checkpoint=name,
        harmful_general_refusal=general,
        harmful_medical_refusal=medical,
        harmful_refusal=(general * n_g + medical * n_m) / (n_g + n_m),
        benign_refusal=refusal_rate(backend, [r["text"] for r in holdout["benign"]], judge),
        mcq_accuracy=mcq_accuracy(backend, holdout["mcq_medical"]),
    )


def load_holdout(out: Path, items: int | None, split: str = "holdout") -> dict[str, list[dict]]:
    """The first ``items`` records (None: all) of every data set of ``split`` of the world at ``out``."""
    return {p.stem: read_records(p)[:items] for p in sorted((Path(out) / "data" / split).glob("*.jsonl"))}
