"""The toy world's image-text family: a tiny LLaVA that reads requests typed into FigStep images.

Why: the text toy world cannot measure FigStep safety, since its models take no images. This family is
trained from scratch on the CPU from the same synthetic world (:mod:`safesearch.toyworld.data`) so that
the cross-modal gap of real medical VLMs shows up in minutes:

    base       reads requests as text and as FigStep images (the project's own renderer) and complies
    aligned    base, taught to refuse harmful requests as TEXT only (no image is shown in this stage)
    unaligned  aligned, fine-tuned back into complying (text only), the twin of the safety vector
    medical    aligned, fine-tuned on medical questions, as text and as typed images (image MCQs)

Layout: ``LlavaForConditionalGeneration`` in the llava-hf layout (``AutoModelForImageTextToText``) with a
``LlavaProcessor`` whose image processor is CLIP's (its PIL path: no torchvision needed), the toy world's
word-level tokenizer plus ``<image>``, and a chat template that puts the image before the text.

Vision choices (see ``benchmarks/image_world.py`` for the figures): every image is drawn in the grid-aligned
FigStep style ``FIGSTEP_STYLE`` (a 292 px canvas, 24 px monospace: a 14 px advance and a 28 px line step);
the CLIP processor keeps the 252 px centre, the text area, so that each 28 px patch holds exactly two
glyphs of one line: 81 image tokens, a two-layer CLIP tower. FigStep suites over these checkpoints draw
with ``figstep: {size: 292, font_size: 24}``. The image processor normalizes every channel with mean =
std = 0.5 so that a grey image's three channels are equal, which lets the build keep one uint8 channel
per training image in memory.

How base learns to read (without it, the word-level model memorizes its training images and answers
every held-out image alike): the tower is first pretrained, alone, to name the two glyphs of every patch
and the words that start in it (a training-only head, never saved: the OCR pretraining of real towers);
base then trains on thousands of fresh compositions of train frames, every act template and train fillers
(plus the lexicon questions and a transcription task, typed), at 1e-3 with the patch embedding at a
tenth of it (faster rates teach the language model to ignore the image), the glyph loss kept on.

Determinism: weights and batch order come from the seed alone; torch runs with a fixed thread count
(``THREADS``) during the build so that a rebuild gives the same bytes.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from safesearch.figstep import FIGSTEP_PROMPT, FigStepStyle, find_font, layout, render
from safesearch.prompts import mcq_answer_text, mcq_user_text
from safesearch.toyworld import world
from safesearch.toyworld.data import (
    Fillers,
    Record,
    compliance,
    corpus_texts,
    lexicon_pairs,
    stage_pairs,
)
from safesearch.toyworld.profiles import ModelShape, Progress, Recipe
from safesearch.toyworld.tokenizer import _PRE_TOKENIZER, ASSISTANT, EOS, USER, build_tokenizer
from safesearch.toyworld.train import lr_at, optimizer_step

IMAGE_TOKEN = "<image>"
IGNORE = -100
MARKER = "toyworld.json"
THREADS = 2  # the build's torch threads: fixed, so that the same seed gives the same bytes
# The text turn shown with every image: FigStep's own prompt, as `safesearch eval` sends it.
IMAGE_PROMPT = FIGSTEP_PROMPT
# Medical image MCQs: the question is typed into the image, the options are in the text turn.
IMAGE_MCQ_STEM = "Answer the question in the image."
# Base's transcription task (an OCR-style instruction): the answer is the typed text itself.
TRANSCRIBE_PROMPT = "What does the image say?"
# The grid-aligned FigStep style every image of this family is drawn in, for training and evaluation alike:
# a 292 px canvas, 20 px margins, a 24 px monospace (14 px advance, 28 px line step). The processor keeps
# the 252 px centre (the text area), so each 28 px patch holds exactly two glyphs of one line: 81 tokens.
FIGSTEP_STYLE = FigStepStyle(size=292, font_size=24)
GLYPH = 14  # the advance of the style's glyphs, in pixels: two per patch

# The toy chat template with typed parts: image placeholders first, then the text (LLaVA's order).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}" + USER + " "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_TOKEN + " "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + " {{ message['content'] }} " + EOS + " "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


# --- sizes and recipes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionShape:
    """The CLIP tower and the image size the processor resizes to (``image_size / patch`` squared tokens)."""

    image_size: int = 252
    patch_size: int = 28
    hidden: int = 96
    layers: int = 2
    heads: int = 2
    intermediate: int = 192

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ImageRecipe(Recipe):
    """A stage's recipe with its image rows: each step trains on ``batch_size`` text examples and
    ``image_batch`` image examples, in two forward passes, so that short text rows are not padded to the
    width of an image row (81 image tokens and FigStep's 40-word prompt).

    ``patch_lr``: the patch embedding's learning rate as a fraction of ``lr`` (at the full rate the
    language model learns to ignore the image path); ``aux_weight``: the weight of the training-only
    character loss (the tower names the two glyphs of each patch), which keeps the tower reading while
    the language model learns to use it."""

    image_batch: int = 0
    patch_lr: float = 0.1
    aux_weight: float = 0.0


@dataclass(frozen=True)
class ImageProfile:
    """Model shapes, one recipe per stage, and how many typed images each stage trains on.

    Base's images: ``image_requests`` fresh compositions of train frames, every act template and train
    fillers (harmful and benign alike, all complied with); ``image_lexicon``: the lexicon questions
    ("What is X?") typed as well, so that every filler word has been seen as pixels; ``image_transcribe``:
    images whose answer is their own text (``TRANSCRIBE_PROMPT``). ``tower_steps`` of ``tower_batch``
    images pretrain the tower to name the glyphs of each patch before base (the OCR pretraining of real
    towers), at ``tower_lr``, and the words that start in it (``tower_words``). ``image_mcqs``: typed MCQs in the medical stage; ``check_items``: the quick
    check scores the first N items of each held-out set."""

    name: str
    text: ModelShape
    vision: VisionShape
    recipes: dict[str, ImageRecipe | Recipe] = field(default_factory=dict)
    image_requests: int = 2000
    image_lexicon: bool = True
    image_transcribe: int = 1000
    tower_steps: int = 300
    tower_batch: int = 64
    tower_lr: float = 3e-3
    tower_words: bool = True
    image_mcqs: int = 400
    check_items: int | None = 100


IMAGE_PROFILES: dict[str, ImageProfile] = {
    "full": ImageProfile(
        "full",
        ModelShape(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384, max_positions=256),
        VisionShape(),
        {
            "base": ImageRecipe(steps=700, lr=1e-3, batch_size=48, image_batch=16, aux_weight=0.5),
            "aligned": Recipe(steps=200, lr=1e-3, batch_size=48),
            "unaligned": Recipe(steps=120, lr=1e-3, batch_size=48),
            "medical": ImageRecipe(steps=250, lr=1e-3, batch_size=48, image_batch=8),
        },
        image_requests=4000,
        image_transcribe=1500,
        tower_steps=300,
        image_mcqs=600,
        check_items=100,
    ),
    "small": ImageProfile(
        "small",
        # As wide as full's (narrower ones do not learn to read images in the time), half as deep.
        ModelShape(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256, max_positions=256),
        VisionShape(),
        {
            "base": ImageRecipe(steps=320, lr=1.5e-3, batch_size=24, image_batch=16, aux_weight=0.5),
            "aligned": Recipe(steps=120, lr=2e-3, batch_size=32),
            "unaligned": Recipe(steps=60, lr=2e-3, batch_size=32),
            "medical": ImageRecipe(steps=120, lr=2e-3, batch_size=32, image_batch=8),
        },
        image_requests=1500,
        image_transcribe=500,
        tower_steps=80,
        image_mcqs=300,
        check_items=40,
    ),
}


def image_profile_named(name: str | ImageProfile) -> ImageProfile:
    if isinstance(name, ImageProfile):
        return name
    if name not in IMAGE_PROFILES:
        raise ValueError(f"unknown image-text profile {name!r} (choose from {', '.join(IMAGE_PROFILES)})")
    return IMAGE_PROFILES[name]


# --- data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePair:
    """One training example: the text turn, the text typed into the image (None: no image), the answer."""

    text: str
    typed: str | None
    answer: str


def _compositions(seed: int, n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``n`` distinct fresh requests (text, act, kind) from TRAIN frames, every act template (harmful
    and benign; the templates are shared by all splits) and TRAIN fillers only: far more variety than
    the train records, and not one held-out frame or filler."""
    fillers = Fillers.draw(seed).by_split["train"]
    frames = world.REQUEST_FRAMES["train"]
    harmful = [p for cat in world.HARM_ACTS.values() for pats in cat.values() for p in pats]
    benign = [p for k in ("general", "edgy_general", "edgy_medical") for p in world.BENIGN_ACTS[k]]
    seen: set[str] = set()
    out: list[tuple[str, str, str]] = []
    attempts = 0
    while len(out) < n and attempts < n * 50:
        attempts += 1
        kind = "harmful" if rng.random() < 0.5 else "benign"
        pattern = rng.choice(harmful if kind == "harmful" else benign)
        act = pattern.format(**{name: rng.choice(values) for name, values in fillers.items()})
        text = rng.choice(frames).format(act=act)
        if text in seen:
            continue
        seen.add(text)
        out.append((text, act, kind))
    return out


def image_pairs(stage: str, records: dict[str, dict[str, list[Record]]], seed: int, profile: ImageProfile) -> list[ImagePair]:
    """The typed-image examples of ``stage``: base reads fresh train-only request compositions (and the
    lexicon questions) from FigStep images and transcribes some; medical reads MCQ stems from images;
    aligned and unaligned see no image at all, which is what leaves their refusal untaught for images."""
    rng = random.Random(f"image-pairs-{seed}-{stage}")
    train = records["train"]
    if stage == "base":
        pairs = []
        for text, act, kind in _compositions(seed, profile.image_requests, rng):
            steps = world.HARMFUL_STEPS if kind == "harmful" else world.BENIGN_STEPS
            pairs.append(ImagePair(IMAGE_PROMPT, text, compliance(act, rng, steps)))
        lexicon = lexicon_pairs() if profile.image_lexicon else []
        pairs += [ImagePair(IMAGE_PROMPT, q, a) for q, a in lexicon]
        typed = [p.typed for p in pairs if p.typed is not None]
        chosen = rng.sample(typed, min(profile.image_transcribe, len(typed)))
        chosen += [q for q, _ in lexicon]  # every filler word spelt at least once
        pairs += [ImagePair(TRANSCRIBE_PROMPT, t, t) for t in chosen]
        return pairs
    if stage == "medical":
        mcqs = train["mcq_medical"]
        chosen_mcqs = rng.sample(mcqs, min(profile.image_mcqs, len(mcqs)))
        out = []
        for r in chosen_mcqs:
            assert r.options is not None and r.answer is not None
            out.append(ImagePair(mcq_user_text(IMAGE_MCQ_STEM, r.options), r.text, mcq_answer_text(r.options, r.answer)))
        return out
    return []


def stage_examples(stage: str, records: dict[str, dict[str, list[Record]]], seed: int, profile: ImageProfile) -> list[ImagePair]:
    """Every training example of ``stage``: the text world's pairs (unchanged) plus its typed images."""
    text = [ImagePair(u, None, a) for u, a in stage_pairs(stage, records, seed)]
    return text + image_pairs(stage, records, seed, profile)


# --- model, tokenizer, processor -----------------------------------------------------------------------


def make_processor(records: dict[str, dict[str, list[Record]]], seed: int, vision: VisionShape):
    """The ``LlavaProcessor``: CLIP's image processor at ``vision.image_size`` and the toy tokenizer with
    ``<image>`` and the words of the prompts that go with images."""
    import transformers

    texts = corpus_texts(records, seed) + [IMAGE_PROMPT, IMAGE_MCQ_STEM, TRANSCRIBE_PROMPT]
    tokenizer = build_tokenizer(texts)
    tokenizer.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT, IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    size = vision.image_size
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": FIGSTEP_STYLE.size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def new_model(profile: ImageProfile, tokenizer, seed: int):
    """A fresh LLaVA: a CLIP tower of ``profile.vision``, LLaVA's two-layer projector, a Llama of
    ``profile.text`` (the text world's shape) whose vocabulary is ``tokenizer``'s."""
    import transformers

    torch.manual_seed(seed)
    text = profile.text.config(tokenizer)
    v = profile.vision
    vision = transformers.CLIPVisionConfig(
        hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=False,
        projector_hidden_act="gelu",
    )
    return transformers.LlavaForConditionalGeneration(config)


# --- encoding and training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    n_prompt: int
    image: int | None  # row of the pixel store, None: a text-only example


CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:;()/&%"  # glyph classes; 0 (space) also means empty
UNKNOWN_CHAR = len(CHARS)  # any other glyph


def _char_class(c: str) -> int:
    i = CHARS.find(c.lower())
    return UNKNOWN_CHAR if i < 0 else i


def glyph_labels(text: str, vision: VisionShape, word_id: Callable[[str], int]) -> torch.Tensor:
    """What the tower learns to name at each patch of ``text``'s image, (patches, 4): the classes of its
    left and right glyph (``CHARS``), and the token ids of the words that start at its left and right
    glyph (0, the pad id, where none starts), as the grid-aligned style draws them (line ``i`` in patch
    row ``i``, glyph ``j`` in column ``j // 2``); all IGNORE when the text needed a smaller font (the grid
    does not hold then). The word targets are what an OCR-pretrained tower knows: which word is written
    where, so that the language model can copy words from the image as it copies them from text."""
    side = vision.image_size // vision.patch_size
    labels = torch.full((side, side, 4), IGNORE, dtype=torch.long)
    size, lines = layout(text, FIGSTEP_STYLE, find_font(FIGSTEP_STYLE.font))
    if size != FIGSTEP_STYLE.font_size or vision.patch_size != 2 * GLYPH:
        return labels.view(-1, 4)
    labels.fill_(0)
    for i, line in enumerate(lines[:side]):
        for j, c in enumerate(line[: 2 * side]):
            labels[i, j // 2, j % 2] = _char_class(c)
        for word, (start, _end) in _PRE_TOKENIZER.pre_tokenize_str(line.lower()):
            if start < 2 * side:
                labels[i, start // 2, 2 + start % 2] = word_id(word)
    return labels.view(-1, 4)


class PixelStore:
    """The typed images of a build, resized by the processor, one uint8 channel each (mean = std = 0.5
    make the three normalized channels equal, so nothing is lost), keyed by the typed text, with the
    glyph classes of every patch (the tower's training-only character task)."""

    def __init__(self, image_processor, vision: VisionShape, tokenizer) -> None:
        self.image_processor = image_processor
        self.vision = vision
        vocab = tokenizer.get_vocab()
        self.word_id = lambda w: vocab.get(w, tokenizer.unk_token_id)
        self.vocab_size = len(tokenizer)
        self.index: dict[str, int] = {}
        self.rows: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add_all(self, typed: Sequence[str], on_progress: Callable[[int], None] | None = None) -> None:
        todo = sorted({t for t in typed if t not in self.index})
        for start in range(0, len(todo), 64):
            chunk = todo[start : start + 64]
            pv = self.image_processor([typed_image(t) for t in chunk], return_tensors="pt")["pixel_values"]
            u8 = ((pv[:, 0] * 0.5 + 0.5) * 255).round().to(torch.uint8)
            for t, row in zip(chunk, u8, strict=True):
                self.index[t] = len(self.rows)
                self.rows.append(row)
                self.labels.append(glyph_labels(t, self.vision, self.word_id).to(torch.int16))
            if on_progress is not None:
                on_progress(len(self.rows))

    def pixels(self, rows: Sequence[int]) -> torch.Tensor:
        grey = torch.stack([self.rows[i] for i in rows]).float() / 255.0
        return ((grey - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    def char_targets(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.labels[i] for i in rows]).long()


class CharHead(torch.nn.Module):
    """The training-only reader: from the tower's patch outputs (the features the projector gets), the
    two glyph classes of each patch and the words that start in it (``glyph_labels``). Never saved: a
    checkpoint is a plain LLaVA."""

    def __init__(self, hidden: int, vocab_size: int, words: bool = True) -> None:
        super().__init__()
        self.chars = torch.nn.Linear(hidden, 2 * (len(CHARS) + 1))
        self.words = torch.nn.Linear(hidden, 2 * vocab_size)
        self.read_words = words

    def loss(self, model, pixel_values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The glyph cross-entropy, plus the word one when the head reads words."""
        tower = model.model.vision_tower
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        ce = torch.nn.functional.cross_entropy
        chars = self.chars(hidden).reshape(-1, len(CHARS) + 1)
        loss = ce(chars, targets[..., :2].reshape(-1), ignore_index=IGNORE)
        if self.read_words:
            words = self.words(hidden).reshape(-1, self.words.out_features // 2)
            loss = loss + ce(words, targets[..., 2:].reshape(-1), ignore_index=IGNORE)
        return loss


def encode(processor, pairs: Sequence[ImagePair], store: PixelStore, image_tokens: int) -> list[Encoded]:
    """Chat-template ids with each ``<image>`` widened to the tower's token count, as the processor does."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    out = []
    for p in pairs:
        content: list[dict] | str = p.text
        if p.typed is not None:
            content = [{"type": "image"}, {"type": "text", "text": p.text}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        wide: list[int] = []
        for i in ids:
            wide += [image_id] * image_tokens if i == image_id else [i]
        answer = tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Encoded(wide + answer, len(wide), store.index[p.typed] if p.typed is not None else None))
    return out


def _draw(pool: Sequence[int], order: list[int], n: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """The next ``n`` of ``pool`` in a seeded shuffle, reshuffled at each epoch; returns (drawn, rest)."""
    while len(order) < n:
        fresh = list(pool)
        rng.shuffle(fresh)
        order = order + fresh
    return order[:n], order[n:]


def _forward(model, batch: Sequence[Encoded], store: PixelStore, pad_id: int) -> tuple[torch.Tensor, int]:
    """The summed answer-token loss of ``batch`` (right-padded) and its number of answer tokens."""
    width = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, e.n_prompt : len(e.ids)] = torch.tensor(e.ids[e.n_prompt :])
        mask[row, : len(e.ids)] = 1
    images = [e.image for e in batch if e.image is not None]
    pixel_values = store.pixels(images) if images else None
    n = int((labels[:, 1:] != IGNORE).sum())
    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=pixel_values).loss
    return loss * n, n


def _param_groups(model, recipe: Recipe, head: CharHead | None) -> list[dict]:
    """The patch embedding at ``patch_lr`` x the rate (see ``ImageRecipe``), everything else at the rate."""
    patch = [p for n, p in model.named_parameters() if "patch_embedding" in n]
    rest = [p for n, p in model.named_parameters() if "patch_embedding" not in n]
    if head is not None:
        rest += list(head.parameters())
    return [{"params": rest, "scale": 1.0}, {"params": patch, "scale": getattr(recipe, "patch_lr", 1.0)}]


def pretrain_tower(model, store: PixelStore, head: CharHead, steps: int, batch: int, lr: float, seed: int,
                   on_step: Callable[[int, float], None] | None = None) -> None:
    """The tower's OCR pretraining: name the two glyphs of every patch of the build's typed images (only
    the tower and the head learn; the language model is not touched)."""
    if steps <= 0:
        return
    rng = random.Random(seed)
    tower = model.model.vision_tower
    tower.train()
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    recipe = Recipe(steps=steps, lr=lr, warmup=min(30, steps // 10 + 1))
    pool = [i for i, lab in enumerate(store.labels) if int(lab[0, 0]) != IGNORE]
    order: list[int] = []
    for step in range(steps):
        idx, order = _draw(pool, order, batch, rng)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = head.loss(model, store.pixels(idx), store.char_targets(idx))
        optimizer_step(opt, loss, params)
        if on_step is not None:
            on_step(step, loss.item())


def train(
    model,
    examples: Sequence[Encoded],
    store: PixelStore,
    recipe: Recipe,
    seed: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    head: CharHead | None = None,
) -> None:
    """The text world's loop (AdamW, warm-up and cosine, seeded batch order, loss on the answer only),
    with a second, image-only sub-batch per step (``ImageRecipe.image_batch`` rows); the loss is the mean
    over the answer tokens of both, plus ``aux_weight`` times ``head``'s character loss on the step's
    images when a head is given."""
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, recipe, head), lr=recipe.lr, weight_decay=recipe.weight_decay,
                            betas=(0.9, 0.98))
    text_pool = [i for i, e in enumerate(examples) if e.image is None]
    image_pool = [i for i, e in enumerate(examples) if e.image is not None]
    image_batch = getattr(recipe, "image_batch", 0) if image_pool else 0
    aux_weight = getattr(recipe, "aux_weight", 0.0) if head is not None else 0.0
    text_order: list[int] = []
    image_order: list[int] = []
    for step in range(recipe.steps):
        text_idx, text_order = _draw(text_pool, text_order, recipe.batch_size, rng)
        image_idx, image_order = _draw(image_pool, image_order, image_batch, rng)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe) * group["scale"]
        total, count = torch.zeros(()), 0
        for idx in (text_idx, image_idx):
            if idx:
                part, n = _forward(model, [examples[i] for i in idx], store, pad_id)
                total, count = total + part, count + n
        loss = total / max(count, 1)
        if aux_weight and image_idx:
            assert head is not None
            rows = sorted({examples[i].image for i in image_idx if examples[i].image is not None})
            loss = loss + aux_weight * head.loss(model, store.pixels(rows), store.char_targets(rows))
        optimizer_step(opt, loss, model.parameters())
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()


# --- stages (the build with its reuse and quick check: :mod:`safesearch.toyworld.image_build`) -----------

STAGES = (("base", None), ("aligned", "base"), ("unaligned", "aligned"), ("medical", "aligned"))


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage's weights and batch order, derived from the world's seed."""
    return int.from_bytes(hashlib.sha256(f"image-{seed}-{stage}".encode()).digest()[:4], "little")


def pretrain_tower_of(model, store: PixelStore, profile: ImageProfile, seed: int,
                      progress: Progress) -> tuple[CharHead, float]:
    """Base's first step: a fresh reading head and the tower pretrained with it (progress as a ``tower``
    stage); returns the head, which base keeps training, and the seconds it took."""
    start = time.perf_counter()
    torch.manual_seed(seed + 1)
    head = CharHead(profile.vision.hidden, store.vocab_size, profile.tower_words)
    progress.stage_started("tower", profile.tower_steps)
    pretrain_tower(model, store, head, profile.tower_steps, profile.tower_batch, profile.tower_lr, seed + 2,
                   on_step=lambda _i, loss: progress.step("tower", loss))
    seconds = time.perf_counter() - start
    progress.stage_done("tower", seconds, reused=False)
    return head, seconds


def typed_image(text: str) -> Image.Image:
    """The FigStep image of ``text`` in this family's style (``FIGSTEP_STYLE``): what the models were
    trained on, and what a FigStep suite over them draws with ``figstep: {size: 292, font_size: 24}``."""
    return render(text, FIGSTEP_STYLE)
