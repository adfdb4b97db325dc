"""Readers for the harmful-request and over-refusal benchmarks, in their published formats.

Benchmarks published as one CSV per category (MedSafetyBench, HEx-PHI) take either one such file or a
directory; a directory is searched recursively for the per-category files, in sorted order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safesearch.datasets._io import field, read_csv, read_csv_rows, require_file
from safesearch.datasets.items import Item
from safesearch.errors import UserError

_CATEGORY = re.compile(r"category_(\d+)")


def _category_files(path: Path, pattern: str, what: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{what}: nothing at '{path}' (expected a {pattern} file or a directory of them)")
    files = sorted(path.rglob(pattern))
    if not files:
        raise UserError(f"{what}: no {pattern} files under '{path}'")
    return files


def _category_of(file: Path) -> str:
    m = _CATEGORY.search(file.stem)
    return f"category_{m.group(1)}" if m else file.stem


def read_medsafetybench(path: Path) -> list[Item]:
    """MedSafetyBench: ``med_safety_demonstrations_category_N.csv`` (column harmful_medical_request),
    e.g. ``datasets/test/gpt4/``; the parent directory name (gpt4, llama2) is kept as the generator."""
    items = []
    for file in _category_files(path, "*category_*.csv", "MedSafetyBench"):
        category = _category_of(file)
        for n, (_, row) in enumerate(read_csv(file, "MedSafetyBench", ["harmful_medical_request"])):
            items.append(
                Item(
                    id=f"msb-{file.parent.name}-{category}-{n:04d}",
                    text=row["harmful_medical_request"].strip(),
                    kind="harmful",
                    domain="medical",
                    category=category,
                    meta={"generator": file.parent.name},
                )
            )
    return items


def read_hexphi(path: Path) -> list[Item]:
    """HEx-PHI: ``category_N.csv`` files without a header, one instruction a row (first cell)."""
    items = []
    for file in _category_files(path, "category_*.csv", "HEx-PHI"):
        category = _category_of(file)
        for n, (_, cells) in enumerate(read_csv_rows(file, "HEx-PHI")):
            items.append(
                Item(
                    id=f"hexphi-{category}-{n:04d}", text=cells[0].strip(), kind="harmful", category=category
                )
            )
    return items


def read_catqa(path: Path) -> list[Item]:
    """CatQA (``catqa_english.json``): JSON lines or a JSON list of {Category, Subcategory, Question},
    or the nested form {category: {subcategory: [questions]}}."""
    require_file(path, "CatQA")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    records: list[tuple[str, str, str, str]] = []  # (where, category, subcategory, question)
    if isinstance(data, dict):
        for cat, subs in data.items():
            if not isinstance(subs, dict):
                raise UserError(f"{path}: category '{cat}' should map subcategories to question lists")
            for sub, questions in subs.items():
                for q in questions:
                    records.append((f"{path}: {cat}/{sub}", cat, sub, q))
    else:
        if data is None:  # JSON lines, as published
            rows = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
        elif isinstance(data, list):
            rows = [(f"{path}: record {i + 1}", r) for i, r in enumerate(data)]
        else:
            rows = [(f"{path}: record 1", data)]
        for where, rec in rows:
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected an object with Category, Subcategory and Question")
            records.append(
                (
                    where,
                    field(rec, "Category", where),
                    str(rec.get("Subcategory", "")),
                    field(rec, "Question", where),
                )
            )
    return [
        Item(
            id=f"catqa-{n:04d}",
            text=str(q).strip(),
            kind="harmful",
            category=cat.strip(),
            meta={"subcategory": sub.strip()},
        )
        for n, (_, cat, sub, q) in enumerate(records)
    ]


def read_harmbench(
    path: Path, *, functional_categories: tuple[str, ...] | list[str] = ("standard", "contextual")
) -> list[Item]:
    """HarmBench behaviours CSV (Behavior, FunctionalCategory, SemanticCategory, ContextString, BehaviorID).
    A contextual behaviour is asked after its context, separated as HarmBench does."""
    required = ["Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID"]
    items = []
    for _, row in read_csv(path, "HarmBench behaviours", required):
        if row["FunctionalCategory"].strip() not in functional_categories:
            continue
        text = row["Behavior"].strip()
        context = row.get("ContextString", "").strip()
        if context:
            text = f"{context}\n\n---\n\n{text}"
        items.append(
            Item(
                id=row["BehaviorID"].strip(),
                text=text,
                kind="harmful",
                category=row["SemanticCategory"].strip(),
                meta={"functional_category": row["FunctionalCategory"].strip()},
            )
        )
    return items


def read_xstest(path: Path) -> list[Item]:
    """XSTest (``xstest_prompts.csv``: id, prompt, type, label, focus, note). Prompts labelled safe become
    benign items (over-refusal), those labelled unsafe harmful ones (their contrasts)."""
    items = []
    for lineno, row in read_csv(path, "XSTest", ["id", "prompt", "type", "label"]):
        label = row["label"].strip().lower()
        if label not in ("safe", "unsafe"):
            raise UserError(f"{path}:{lineno}: label '{row['label']}' is neither safe nor unsafe")
        items.append(
            Item(
                id=f"xstest-{row['id'].strip()}",
                text=row["prompt"].strip(),
                kind="benign" if label == "safe" else "harmful",
                category=row["type"].strip(),
                meta={"focus": row.get("focus", ""), "label": label},
            )
        )
    return items
