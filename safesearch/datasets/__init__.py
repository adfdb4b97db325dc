"""Readers for local benchmark files, one per published format, all producing :class:`Item` lists.

Nothing is downloaded: a reader given a missing file says where it looked and what belongs there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safesearch.datasets.generic import read_jsonl_items
from safesearch.datasets.items import Item
from safesearch.datasets.medical import read_medbullets, read_medmcqa, read_medqa, read_pubmedqa, read_vqa_rad
from safesearch.datasets.multimodal import read_mmsafetybench, read_safebench
from safesearch.datasets.plaintext import read_text_items
from safesearch.datasets.safety import (
    read_catqa,
    read_harmbench,
    read_hexphi,
    read_medsafetybench,
    read_xstest,
)
from safesearch.errors import UserError

# format name -> (reader, what the path points at)
FORMATS: dict[str, tuple[Callable[..., list[Item]], str]] = {
    "jsonl": (read_jsonl_items, "a JSONL file in the generic (toy world) schema"),
    "text": (read_text_items, "a text file of prompts, one a line (kind, category in the suite's options)"),
    "pubmedqa": (read_pubmedqa, "PubMedQA's ori_pqal.json"),
    "medqa": (read_medqa, "a MedQA-USMLE 4-option JSONL file"),
    "medmcqa": (read_medmcqa, "a MedMCQA JSONL file (train/dev)"),
    "medbullets": (read_medbullets, "medbullets_op4.csv or medbullets_op5.csv"),
    "vqa_rad": (read_vqa_rad, "VQA_RAD Dataset Public.json, beside its image folder"),
    "medsafetybench": (read_medsafetybench, "a med_safety_demonstrations_category_N.csv or a folder of them"),
    "hexphi": (read_hexphi, "a HEx-PHI category_N.csv or a folder of them"),
    "catqa": (read_catqa, "catqa_english.json"),
    "harmbench": (read_harmbench, "harmbench_behaviors_text_all.csv"),
    "xstest": (read_xstest, "xstest_prompts.csv"),
    "mmsafetybench": (
        read_mmsafetybench,
        "MM-SafetyBench's processed_questions/*.json (a file or their folder), beside imgs/",
    ),
    "safebench": (read_safebench, "FigStep's safebench.csv (question and instruction columns)"),
}


def read_dataset(fmt: str, path: Path, options: dict[str, Any] | None = None) -> list[Item]:
    """The items of the file (or folder) at ``path``, read as ``fmt`` with reader ``options``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format '{fmt}' (known: {', '.join(FORMATS)})")
    reader, what = FORMATS[fmt]
    options = dict(options or {})
    unknown = sorted(set(options) - set(reader_options(fmt)))
    if unknown:
        known = ", ".join(reader_options(fmt)) or "none"
        raise UserError(f"{fmt} dataset: unknown option(s) {', '.join(unknown)} (known: {known})")
    if not path.exists():
        raise UserError(f"{fmt} dataset: nothing at '{path}' (expected {what}; nothing is downloaded)")
    return reader(path, **options)


def reader_options(fmt: str) -> list[str]:
    """The keyword options the reader of ``fmt`` takes."""
    params = inspect.signature(FORMATS[fmt][0]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


__all__ = ["FORMATS", "Item", "read_dataset"]
