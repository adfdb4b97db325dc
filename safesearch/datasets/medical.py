"""Readers for the medical accuracy benchmarks, in the formats their authors publish.

Items without an id in the source get ``<format>-<hash of the question and options>``
(:class:`~safesearch.datasets._io.ContentIds`), so that ids (and the splits and seeded subsets chosen by
id) do not change when the file is re-ordered, and a dev and a test file never share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesearch.datasets._io import (
    ContentIds,
    UniqueIds,
    cell,
    check_string,
    field,
    image_file,
    json_type,
    letter_index,
    option,
    optional_field,
    read_csv,
    read_json,
    read_jsonl,
    require_dir,
    text_field,
)
from safesearch.datasets.items import Item
from safesearch.errors import UserError

PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


def read_pubmedqa(path: Path, *, with_context: bool = True) -> list[Item]:
    """PubMedQA's ``ori_pqal.json``: {pmid: {QUESTION, CONTEXTS, final_decision, ...}}, a 3-way MCQ."""
    option("pubmedqa", "with_context", with_context, bool)
    data = read_json(path, "PubMedQA (ori_pqal.json)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: PubMedQA expects a JSON object keyed by PMID, got {json_type(data)}")
    if not data:
        raise UserError(f"{path}: PubMedQA file has no records (an empty JSON object)")
    items = []
    for pmid, rec in data.items():
        where = f"{path}: record {pmid}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object, got {json_type(rec)}")
        question = text_field(rec, "QUESTION", where)
        decision = field(rec, "final_decision", where).strip().lower()
        if decision not in PUBMEDQA_OPTIONS:
            raise UserError(f"{where}: final_decision '{decision}' is not yes, no or maybe")
        text = question
        if with_context:
            text = "Context: " + " ".join(_contexts(rec, where)) + "\nQuestion: " + question
        items.append(
            Item(
                id=f"pubmedqa-{check_string(pmid, 'the PMID', where)}",
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


def _contexts(rec: dict[str, Any], where: str) -> list[str]:
    contexts = field(rec, "CONTEXTS", where, list)
    for c in contexts:  # str() of anything else would put "None" or "{...}" into the prompt
        if not isinstance(c, str):
            raise UserError(f"{where}: every item of 'CONTEXTS' should be a string, got {json_type(c)}")
        check_string(c, "a context", where)
    return contexts


def _text_or_number(obj: dict[str, Any], key: str, where: str) -> str:
    """An option or answer: a string or a number (releases store numeric ones as numbers), not blank."""
    text = str(field(obj, key, where, (str, int, float))).strip()
    if not text:
        raise UserError(f"{where}: field '{key}' is empty")
    return text


def read_medqa(path: Path) -> list[Item]:
    """MedQA-USMLE (4 options) JSONL: question, options {A..D}, answer_idx (a letter), meta_info."""
    items = []
    ids = ContentIds("medqa")
    for lineno, obj in read_jsonl(path, "MedQA-USMLE JSONL"):
        where = f"{path}:{lineno}"
        opts = field(obj, "options", where, dict)
        letters = sorted(opts)
        if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(letters) < 2:
            raise UserError(f"{where}: 'options' should be keyed A, B, C, ... (got {', '.join(letters)})")
        options = tuple(_text_or_number(opts, k, where) for k in letters)
        answer = letter_index(field(obj, "answer_idx", where), len(options), where)
        question = text_field(obj, "question", where)
        items.append(
            Item(
                id=ids.make(question, *options),
                text=question,
                kind="mcq",
                domain="medical",
                category=optional_field(obj, "meta_info", where, "medqa"),
                options=options,
                answer=answer,
            )
        )
    return items


def read_medmcqa(path: Path, *, cop_base: int = 1) -> list[Item]:
    """MedMCQA JSONL: id, question, opa..opd, cop (the correct option; 1-based in the authors' release,
    0-based in the Hugging Face copy: set ``cop_base: 0`` for that one)."""
    if option("medmcqa", "cop_base", cop_base, int) not in (0, 1):
        raise UserError(f"medmcqa: cop_base should be 0 or 1, got {cop_base}")
    items = []
    ids = UniqueIds()
    made = ContentIds("medmcqa")
    for lineno, obj in read_jsonl(path, "MedMCQA JSONL"):
        where = f"{path}:{lineno}"
        options = tuple(_text_or_number(obj, k, where) for k in ("opa", "opb", "opc", "opd"))
        cop = field(obj, "cop", where, int) - cop_base
        if not 0 <= cop < 4:
            raise UserError(f"{where}: cop {cop + cop_base} is out of range for cop_base {cop_base}")
        question = text_field(obj, "question", where)
        given = optional_field(obj, "id", where, None, (str, int))
        item_id = made.make(question, *options) if given is None else str(given)
        items.append(
            Item(
                id=ids.add(item_id, where, f"line {lineno}"),
                text=question,
                kind="mcq",
                domain="medical",
                category=optional_field(obj, "subject_name", where, "medmcqa"),
                options=options,
                answer=cop,
            )
        )
    return items


def read_medbullets(path: Path) -> list[Item]:
    """Medbullets CSV (op4 or op5): question, opa..opd[, ope], answer_idx (a letter)."""
    rows = read_csv(
        path, "Medbullets", ["question", "opa", "opb", "opc", "opd", "answer_idx"], optional=["ope"]
    )
    items = []
    ids = ContentIds("medbullets")
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        keys = ["opa", "opb", "opc", "opd"] + (["ope"] if row.get("ope", "").strip() else [])
        options = tuple(cell(row, k, where) for k in keys)
        question = cell(row, "question", where)
        items.append(
            Item(
                id=ids.make(question, *options),
                text=question,
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
    image folder (``images``, relative to the JSON's directory). ``answer_type``: closed, open or all.

    The published split is each record's ``phrase_type``: ``test_freeform`` and ``test_para`` are the test
    set, ``freeform`` and ``para`` the training set; items carry it as ``split`` ``test`` or ``train``."""
    option("vqa_rad", "images", images, str)
    if option("vqa_rad", "answer_type", answer_type, str) not in ("closed", "open", "all"):
        raise UserError(f"vqa_rad: answer_type should be closed, open or all, got '{answer_type}'")
    data = read_json(path, "VQA-RAD JSON")
    if not isinstance(data, list):
        raise UserError(f"{path}: VQA-RAD expects a JSON list of questions, got {json_type(data)}")
    if not data:
        raise UserError(f"{path}: VQA-RAD file has no records (an empty JSON list)")
    folder = require_dir(path.parent / images, "VQA-RAD image folder")
    items = []
    ids = UniqueIds()
    checked: set[Path] = set()  # VQA-RAD asks many questions about each image: check each once
    for n, rec in enumerate(data, start=1):
        where = f"{path}: record {n}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object, got {json_type(rec)}")
        kind_of_answer = field(rec, "answer_type", where).strip().lower()
        if answer_type != "all" and kind_of_answer != answer_type:
            continue
        image_name = text_field(rec, "image_name", where)
        if "\0" in image_name:
            raise UserError(f"{where}: field 'image_name' holds a NUL character")
        item_id = f"vqarad-{optional_field(rec, 'qid', where, n, (str, int))}"
        items.append(
            Item(
                id=ids.add(item_id, where, f"record {n}"),
                text=text_field(rec, "question", where),
                kind="vqa",
                domain="medical",
                category=optional_field(rec, "image_organ", where, "").strip(),
                image=image_file(folder / image_name, where, checked),
                answer_text=_text_or_number(rec, "answer", where),
                split=_vqa_rad_split(rec, where),
                meta={"answer_type": kind_of_answer, "question_type": rec.get("question_type")},
            )
        )
    return items


VQA_RAD_PHRASE_TYPES = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}


def _vqa_rad_split(rec: dict[str, Any], where: str) -> str:
    """``test`` or ``train`` from the record's ``phrase_type``; a record without one has no split."""
    phrase_type = optional_field(rec, "phrase_type", where, "").strip().lower()
    if not phrase_type:
        return ""
    if phrase_type not in VQA_RAD_PHRASE_TYPES:
        known = ", ".join(VQA_RAD_PHRASE_TYPES)
        raise UserError(f"{where}: phrase_type '{phrase_type}' is not one of {known}")
    return VQA_RAD_PHRASE_TYPES[phrase_type]
