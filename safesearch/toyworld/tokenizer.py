"""A word-level tokenizer built offline from the synthetic corpus, with a chat template.

Word-level keeps the toy models small (a vocabulary of a few hundred words) and makes every token a
readable word. It is a plain ``tokenizers`` model wrapped as ``PreTrainedTokenizerFast``, so
transformers and vLLM load it from the checkpoint directory like any other tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, USER, ASSISTANT]

# One user turn, then the assistant's; the assistant turn ends with EOS, which is the stop token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + " {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + " {{ message['content'] }} " + EOS + " "
    "{% elif message['role'] == 'system' %}{{ message['content'] }} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

_NORMALIZER = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
# Words split on whitespace, each punctuation mark a token of its own.
_PRE_TOKENIZER = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def words_of(text: str) -> list[str]:
    """The word tokens ``text`` becomes (lower-cased, punctuation split off)."""
    return [w for w, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is every word of ``corpus``, sorted (so the same corpus gives the same ids)."""
    vocab_words = sorted({w for text in corpus for w in words_of(text)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = _NORMALIZER
    tok.pre_tokenizer = _PRE_TOKENIZER
    # WordPiece's decoder puts a space between words; cleanup=False keeps decode(encode(x)) word-exact.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="left",
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
