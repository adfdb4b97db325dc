"""A guard-model judge: a classifier LM (Llama Guard, Qwen3Guard, ...) run through a backend.

With ``template="chat"`` the exchange goes to the guard model as a [user, assistant] conversation through
its own chat template (that is how Llama Guard and Qwen3Guard-Gen build their moderation prompt);
otherwise ``template`` is a user turn with ``{request}`` and ``{response}`` placeholders. The verdict is
parsed from the guard's greedy output with ordered :class:`Rule` s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safesearch.backends.base import Backend, Prompt
from safesearch.judges.base import LLAMA_GUARD_RULES, Exchange, Judgement, Rule, Verdict, parse_verdict


def render_template(template: str, exchange: Exchange) -> str:
    # str.replace, not str.format: requests and responses are full of braces.
    return template.replace("{request}", exchange.request).replace("{response}", exchange.response)


@dataclass
class GuardJudge:
    backend: Backend
    template: str = "chat"
    rules: tuple[Rule, ...] = LLAMA_GUARD_RULES
    max_new_tokens: int = 16
    name: str = "guard"
    stops_early: bool = False

    @property
    def labels(self) -> frozenset[Verdict]:
        return frozenset(r.verdict for r in self.rules)

    def prompt(self, exchange: Exchange) -> Prompt:
        if self.template == "chat":
            return Prompt(messages=(("user", exchange.request), ("assistant", exchange.response)))
        return Prompt(render_template(self.template, exchange))

    def judge(self, exchanges: Sequence[Exchange]) -> list[Judgement]:
        outputs = self.backend.generate([self.prompt(e) for e in exchanges], self.max_new_tokens)
        out = []
        for text in outputs:
            verdict = parse_verdict(text, self.rules)
            err = None if verdict is not Verdict.UNJUDGED else "no rule matched the guard's output"
            out.append(Judgement(verdict, raw=text, error=err))
        return out

    def decided(self, response_prefix: str) -> bool:
        return False
