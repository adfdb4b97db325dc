"""Readers for the medical accuracy benchmarks, in the formats their authors publish.

Items without an id in the source get ``<format>-<n>``, n the 1-based record number, so that ids (and
the seeded subsets chosen by id) are stable as long as the file is.
"""

from __future__ import annotations

from pathlib import Path

from safesearch.datasets._io import field, letter_index, read_csv, read_json, read_jsonl, require_dir
from safesearch.datasets.items import Item
from safesearch.errors import UserError

PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


def read_pubmedqa(path: Path, *, with_context: bool = True) -> list[Item]:
    """PubMedQA's ``ori_pqal.json``: {pmid: {QUESTION, CONTEXTS, final_decision, ...}}, a 3-way MCQ."""
    data = read_json(path, "PubMedQA (ori_pqal.json)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: PubMedQA expects a JSON object keyed by PMID, got {type(data).__name__}")
    items = []
    for pmid, rec in data.items():
        where = f"{path}: record {pmid}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object")
        question = field(rec, "QUESTION", where)
        decision = field(rec, "final_decision", where).strip().lower()
        if decision not in PUBMEDQA_OPTIONS:
            raise UserError(f"{where}: final_decision '{decision}' is not yes, no or maybe")
        text = question
        if with_context:
            contexts = field(rec, "CONTEXTS", where, list)
            text = "Context: " + " ".join(str(c) for c in contexts) + "\nQuestion: " + question
        items.append(
            Item(
                id=f"pubmedqa-{pmid}",
                text=text,
                kind="mcq",
                domain="medical",
                category="pubmedqa",
                options=PUBMEDQA_OPTIONS,
                answer=PUBMEDQA_OPTIONS.index(decision),
                meta={"pmid": pmid},
            )
        )
    return items


def read_medqa(path: Path) -> list[Item]:
    """MedQA-USMLE (4 options) JSONL: question, options {A..D}, answer_idx (a letter), meta_info."""
    items = []
    for n, (lineno, obj) in enumerate(read_jsonl(path, "MedQA-USMLE JSONL"), start=1):
        where = f"{path}:{lineno}"
        opts = field(obj, "options", where, dict)
        letters = sorted(opts)
        if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(letters) < 2:
            raise UserError(f"{where}: 'options' should be keyed A, B, C, ... (got {', '.join(letters)})")
        options = tuple(str(opts[k]) for k in letters)
        answer = letter_index(field(obj, "answer_idx", where), len(options), where)
        items.append(
            Item(
                id=f"medqa-{n:05d}",
                text=field(obj, "question", where),
                kind="mcq",
                domain="medical",
                category=str(obj.get("meta_info", "medqa")),
                options=options,
                answer=answer,
            )
        )
    return items


def read_medmcqa(path: Path, *, cop_base: int = 1) -> list[Item]:
    """MedMCQA JSONL: id, question, opa..opd, cop (the correct option; 1-based in the authors' release,
    0-based in the Hugging Face copy: set ``cop_base: 0`` for that one)."""
    if cop_base not in (0, 1):
        raise UserError(f"medmcqa: cop_base should be 0 or 1, got {cop_base}")
    items = []
    for n, (lineno, obj) in enumerate(read_jsonl(path, "MedMCQA JSONL"), start=1):
        where = f"{path}:{lineno}"
        options = tuple(str(field(obj, k, where, (str, int, float))) for k in ("opa", "opb", "opc", "opd"))
        cop = field(obj, "cop", where, int) - cop_base
        if not 0 <= cop < 4:
            raise UserError(f"{where}: cop {cop + cop_base} is out of range for cop_base {cop_base}")
        items.append(
            Item(
                id=str(obj.get("id", f"medmcqa-{n:05d}")),
                text=field(obj, "question", where),
                kind="mcq",
                domain="medical",
                category=str(obj.get("subject_name", "medmcqa")),
                options=options,
                answer=cop,
            )
        )
    return items


def read_medbullets(path: Path) -> list[Item]:
    """Medbullets CSV (op4 or op5): question, opa..opd[, ope], answer_idx (a letter)."""
    rows = read_csv(path, "Medbullets", ["question", "opa", "opb", "opc", "opd", "answer_idx"])
    items = []
    for n, (lineno, row) in enumerate(rows, start=1):
        where = f"{path}:{lineno}"
        keys = ["opa", "opb", "opc", "opd"] + (["ope"] if row.get("ope", "").strip() else [])
        options = tuple(row[k].strip() for k in keys)
        items.append(
            Item(
                id=f"medbullets-{n:05d}",
                text=row["question"].strip(),
                kind="mcq",
                domain="medical",
                category=f"op{len(options)}",
                options=options,
                answer=letter_index(row["answer_idx"], len(options), where),
            )
        )
    return items


def read_vqa_rad(
    path: Path, *, images: str = "VQA_RAD Image Folder", answer_type: str = "closed"
) -> list[Item]:
    """VQA-RAD's ``VQA_RAD Dataset Public.json`` (qid, image_name, question, answer, answer_type) and its
    image folder (``images``, relative to the JSON's directory). ``answer_type``: closed, open or all."""
    if answer_type not in ("closed", "open", "all"):
        raise UserError(f"vqa_rad: answer_type should be closed, open or all, got '{answer_type}'")
    data = read_json(path, "VQA-RAD JSON")
    if not isinstance(data, list):
        raise UserError(f"{path}: VQA-RAD expects a JSON list of questions, got {type(data).__name__}")
    folder = require_dir(path.parent / images, "VQA-RAD image folder")
    items = []
    for n, rec in enumerate(data, start=1):
        where = f"{path}: record {n}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object")
        kind_of_answer = str(field(rec, "answer_type", where)).strip().lower()
        if answer_type != "all" and kind_of_answer != answer_type:
            continue
        image = folder / field(rec, "image_name", where)
        if not image.is_file():
            raise UserError(f"{where}: image '{image}' does not exist")
        items.append(
            Item(
                id=f"vqarad-{rec.get('qid', n)}",
                text=field(rec, "question", where),
                kind="vqa",
                domain="medical",
                category=str(rec.get("image_organ", "")).strip(),
                image=image,
                answer_text=str(field(rec, "answer", where, (str, int, float))).strip(),
                meta={"answer_type": kind_of_answer, "question_type": rec.get("question_type")},
            )
        )
    return items
