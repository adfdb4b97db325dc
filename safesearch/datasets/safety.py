"""Readers for the harmful-request and over-refusal benchmarks, in their published formats.

Benchmarks published as one CSV per category (MedSafetyBench, HEx-PHI) take either one such file or a
directory; a directory is searched recursively for the per-category files, in sorted order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safesearch.datasets._io import (
    ContentIds,
    UniqueIds,
    benchmark_files,
    cell,
    check_string,
    json_type,
    jsonl_lines,
    option,
    optional_field,
    parse_json,
    read_csv,
    read_csv_rows,
    read_text,
    text_field,
)
from safesearch.datasets.items import Item
from safesearch.errors import UserError

_CATEGORY = re.compile(r"category_(\d+)")


def _category_of(file: Path) -> str:
    m = _CATEGORY.search(file.stem)
    return f"category_{m.group(1)}" if m else file.stem


def read_medsafetybench(path: Path) -> list[Item]:
    """MedSafetyBench: ``med_safety_demonstrations_category_N.csv`` (column harmful_medical_request),
    e.g. ``datasets/test/gpt4/``; the parent directory name (gpt4, llama2) is kept as the generator.
    Ids: ``msb-<generator>-<category>-<content hash>`` (see :class:`ContentIds`)."""
    items = []
    for file in benchmark_files(path, "*category_*.csv", "MedSafetyBench"):
        category = _category_of(file)
        ids = ContentIds(f"msb-{file.parent.name}-{category}")
        for lineno, row in read_csv(file, "MedSafetyBench", ["harmful_medical_request"]):
            text = cell(row, "harmful_medical_request", f"{file}:{lineno}")
            items.append(
                Item(
                    id=ids.make(text),
                    text=text,
                    kind="harmful",
                    domain="medical",
                    category=category,
                    meta={"generator": file.parent.name},
                )
            )
    return items


def read_hexphi(path: Path) -> list[Item]:
    """HEx-PHI: ``category_N.csv`` files without a header, one instruction a row (one cell). Ids:
    ``hexphi-<category>-<content hash>`` (see :class:`ContentIds`)."""
    items = []
    for file in benchmark_files(path, "category_*.csv", "HEx-PHI"):
        category = _category_of(file)
        ids = ContentIds(f"hexphi-{category}")
        for lineno, cells in read_csv_rows(file, "HEx-PHI"):
            text = _hexphi_instruction(cells, f"{file}:{lineno}")
            items.append(
                Item(
                    id=ids.make(text),
                    text=text,
                    kind="harmful",
                    category=category,
                )
            )
    return items


def _hexphi_instruction(cells: list[str], where: str) -> str:
    """The row's one cell. A second non-blank cell means an unquoted comma cut the instruction in two,
    and reading the first half alone would ask the model a different question."""
    text = cells[0].strip()
    if not text:
        raise UserError(f"{where}: HEx-PHI row has an empty first cell (expected the instruction there)")
    if any(c.strip() for c in cells[1:]):
        raise UserError(
            f"{where}: HEx-PHI row has {len(cells)} cells, expected one instruction "
            "(quote an instruction that holds a comma)"
        )
    return text


def read_catqa(path: Path) -> list[Item]:
    """CatQA (``catqa_english.json``): JSON lines or a JSON list of {Category, Subcategory, Question},
    or the nested form {category: {subcategory: [questions]}}."""
    records = list(_catqa_records(read_text(path, "CatQA"), path))
    if not records:
        raise UserError(f"{path}: CatQA file has no questions")
    ids = ContentIds("catqa")
    return [
        Item(
            id=ids.make(q.strip()),
            text=q.strip(),
            kind="harmful",
            category=cat.strip(),
            meta={"subcategory": sub.strip()},
        )
        for cat, sub, q in records
    ]


def _catqa_records(text: str, path: Path) -> Iterator[tuple[str, str, str]]:
    """(category, subcategory, question) from either layout. JSON lines when the first non-blank line is
    a JSON value by itself (as published), else one JSON document (a list, or the nested form)."""
    lines = list(jsonl_lines(text))
    if not lines:
        raise UserError(f"{path}: CatQA file is empty")
    try:
        parse_json(lines[0][1], path, lines[0][0])
    except UserError:
        yield from _catqa_value(parse_json(text, path), str(path))
        return
    for lineno, line in lines:
        yield from _catqa_value(parse_json(line, path, lineno, "JSON line"), f"{path}:{lineno}")


def _catqa_value(value: Any, where: str) -> Iterator[tuple[str, str, str]]:
    """The questions of one JSON value: a record, a list of records, or the nested form (an object
    without the keys of a record)."""
    if isinstance(value, list):
        for i, rec in enumerate(value, start=1):
            yield _catqa_record(rec, f"{where}: record {i}")
    elif isinstance(value, dict) and not {"Category", "Question"} & value.keys():
        yield from _catqa_nested(value, where)
    else:
        yield _catqa_record(value, where)


def _catqa_record(rec: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(rec, dict):
        wanted = "an object with Category, Subcategory and Question"
        raise UserError(f"{where}: expected {wanted}, got {json_type(rec)}")
    return (
        text_field(rec, "Category", where),
        optional_field(rec, "Subcategory", where, ""),
        text_field(rec, "Question", where),
    )


def _catqa_nested(data: dict[str, Any], where: str) -> Iterator[tuple[str, str, str]]:
    for cat, subs in data.items():
        if not isinstance(subs, dict):
            raise UserError(
                f"{where}: category '{cat}' should map subcategories to lists of questions, "
                f"got {json_type(subs)}"
            )
        for sub, questions in subs.items():
            here = f"{where}: {cat}/{sub}"
            if not isinstance(questions, list):
                raise UserError(f"{here}: expected a list of questions, got {json_type(questions)}")
            for q in questions:
                if not isinstance(q, str) or not q.strip():
                    raise UserError(f"{here}: every question should be a non-empty string, got {q!r:.60}")
                yield check_string(cat, "a category", here), sub, check_string(q, "a question", here)


def read_harmbench(
    path: Path, *, functional_categories: tuple[str, ...] | list[str] = ("standard", "contextual")
) -> list[Item]:
    """HarmBench behaviours CSV (Behavior, FunctionalCategory, SemanticCategory, ContextString, BehaviorID).
    A contextual behaviour is asked after its context, separated as HarmBench does."""
    # a bare string would be matched by substring ("standard" in "contextual_standard"), so a list it is
    option("harmbench", "functional_categories", functional_categories, (list, tuple))
    if not all(isinstance(c, str) for c in functional_categories):
        raise UserError(
            f"harmbench: option functional_categories should list strings, got {functional_categories}"
        )
    required = ["Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID"]
    items = []
    ids = UniqueIds()
    for lineno, row in read_csv(path, "HarmBench behaviours", required, optional=["ContextString"]):
        where = f"{path}:{lineno}"
        if row["FunctionalCategory"].strip() not in functional_categories:
            continue
        text = cell(row, "Behavior", where)
        context = row.get("ContextString", "").strip()
        if context:
            text = f"{context}\n\n---\n\n{text}"
        items.append(
            Item(
                id=ids.add(cell(row, "BehaviorID", where), where, f"line {lineno}"),
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
    ids = UniqueIds()
    for lineno, row in read_csv(path, "XSTest", ["id", "prompt", "type", "label"], optional=["focus"]):
        where = f"{path}:{lineno}"
        label = row["label"].strip().lower()
        if label not in ("safe", "unsafe"):
            raise UserError(f"{where}: label '{row['label']}' is neither safe nor unsafe")
        items.append(
            Item(
                id=ids.add(f"xstest-{cell(row, 'id', where)}", where, f"line {lineno}"),
                text=cell(row, "prompt", where),
                kind="benign" if label == "safe" else "harmful",
                category=row["type"].strip(),
                meta={"focus": row.get("focus", ""), "label": label},
            )
        )
    return items
