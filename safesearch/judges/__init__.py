"""Judges decide whether a response to a harmful request refused it (or was harmful).

Attack success is a response that did not refuse (keyword judge) or that a guard model or an LLM
judge calls harmful; safety = 1 - attack success rate.
"""

from safesearch.judges.base import (
    RULE_PRESETS,
    Exchange,
    Judge,
    Judgement,
    Rule,
    Verdict,
    attack_succeeded,
    parse_verdict,
    refused,
)
from safesearch.judges.guard import GuardJudge
from safesearch.judges.http import HttpJudge
from safesearch.judges.keyword import REFUSAL_PHRASES, KeywordJudge, normalize

__all__ = [
    "REFUSAL_PHRASES",
    "RULE_PRESETS",
    "Exchange",
    "GuardJudge",
    "HttpJudge",
    "Judge",
    "Judgement",
    "KeywordJudge",
    "Rule",
    "Verdict",
    "attack_succeeded",
    "normalize",
    "parse_verdict",
    "refused",
]
