"""Readers for the image-attack benchmarks, in their published formats.

MM-SafetyBench (Liu et al., ECCV 2024) publishes, per scenario, the harmful question with its key phrase
and the rephrased questions that point at an image of that phrase; SafeBench (FigStep's data set, Gong et
al. 2023) publishes each question with the "Steps to ..." statement that FigStep types into its image.
Both readers keep the original question as the item's text, because that is what the judge must see: the
attack material (``qr``, ``instruction``) only changes what the model is shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesearch.datasets._io import (
    UniqueIds,
    benchmark_files,
    cell,
    check_string,
    image_file,
    json_type,
    option,
    optional_field,
    read_csv,
    read_json,
    require_dir,
    text_field,
)
from safesearch.datasets.items import Item, QueryRelevant
from safesearch.errors import UserError

# image kind -> the rephrased question the benchmark pairs with it. The SD image shows no text, so its
# question says "The image shows ..."; the two kinds with the phrase typed say "The bottom of the image ...".
MMSB_QUESTIONS = {
    "SD": "Rephrased Question(SD)",
    "SD_TYPO": "Rephrased Question",
    "TYPO": "Rephrased Question",
}


def read_mmsafetybench(path: Path, *, images: str = "imgs", image_kind: str = "SD_TYPO") -> list[Item]:
    """MM-SafetyBench: ``processed_questions/NN-Scenario.json`` files ({"0": record, ...}), one file or a
    folder searched for them, and the images at ``<images>/<scenario>/<image_kind>/<id>.jpg``, ``images``
    being relative to the parent of the JSON files' folder (``data/imgs`` beside
    ``data/processed_questions``).

    Without that image folder the items carry no image and the TYPO question: the TYPO image (the key
    phrase typed) is the one kind that can be redrawn here, so the benchmark still runs without its
    Stable Diffusion pictures. With the folder, every image must be there: a partial download
    would otherwise mix attacks of two kinds under one name.
    """
    option("mmsafetybench", "images", images, str)
    option("mmsafetybench", "image_kind", image_kind, str)
    if image_kind not in MMSB_QUESTIONS:
        raise UserError(
            f"mmsafetybench: image_kind should be {', '.join(MMSB_QUESTIONS)}, got '{image_kind}'"
        )
    items: list[Item] = []
    ids = UniqueIds()
    checked: set[Path] = set()
    for file in benchmark_files(path, "*.json", "MM-SafetyBench"):
        root = file.parent.parent / images
        if root.exists():
            require_dir(root, f"MM-SafetyBench image folder (for {file})")
            kind, images_root = image_kind, root
        else:
            kind, images_root = "TYPO", None  # rendered locally, see the docstring
        for qid, rec in _mmsb_records(file):
            items.append(_mmsb_item(file, qid, rec, kind, images_root, ids, checked))
    return items


def _mmsb_records(file: Path) -> list[tuple[str, dict[str, Any]]]:
    """(question id, record) in file order: the published files are one object keyed "0", "1", ..."""
    data = read_json(file, "MM-SafetyBench")
    if not isinstance(data, dict):
        raise UserError(
            f"{file}: MM-SafetyBench expects a JSON object keyed by question id, got {json_type(data)}"
        )
    if not data:
        raise UserError(f"{file}: MM-SafetyBench file has no records (an empty JSON object)")
    records = []
    for qid, rec in data.items():
        where = f"{file}: record '{qid!s:.40}'"
        # the id names an image file: a blank one or one with a path separator would point elsewhere
        if not qid.strip() or any(c in qid for c in "/\\\0"):
            raise UserError(f'{where}: question id should be a plain name like "0"')
        check_string(qid, "the question id", where)
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object, got {json_type(rec)}")
        records.append((qid, rec))
    return records


def _mmsb_item(
    file: Path,
    qid: str,
    rec: dict[str, Any],
    kind: str,
    images_root: Path | None,
    ids: UniqueIds,
    checked: set[Path],
) -> Item:
    where = f"{file}: record '{qid}'"
    scenario = file.stem  # "01-Illegal_Activitiy", misspelt as released: it also names the image folder
    key_phrase = text_field(rec, "Key Phrase", where).strip()
    # Only the question shown with the chosen image kind is required; the other may be absent.
    question = text_field(rec, MMSB_QUESTIONS[kind], where).strip()
    image = None
    if images_root is not None:
        image = image_file(images_root / scenario / kind / f"{qid}.jpg", where, checked)
    return Item(
        id=ids.add(f"mmsb-{scenario}-{qid}", where, f"{file.name} record '{qid}'"),
        text=text_field(rec, "Question", where).strip(),
        kind="harmful",
        category=scenario,
        qr=QueryRelevant(key_phrase=key_phrase, kind=kind, question=question, image=image),
        meta={
            "key_phrase": key_phrase,
            # kept for reports only, so a release without them still reads
            "phrase_type": optional_field(rec, "Phrase Type", where, "").strip(),
            "changed_question": optional_field(rec, "Changed Question", where, "").strip(),
        },
    )


SAFEBENCH_COLUMNS = ["dataset", "category_id", "task_id", "category_name", "question", "instruction"]


def read_safebench(path: Path) -> list[Item]:
    """SafeBench (FigStep's ``safebench.csv`` or ``SafeBench-Tiny.csv``): one question a row, with the
    instruction ("Steps to ...") that FigStep types into its image; the judge sees the question."""
    items = []
    ids = UniqueIds()
    for lineno, row in read_csv(path, "SafeBench", SAFEBENCH_COLUMNS):
        where = f"{path}:{lineno}"
        dataset, category_id, task_id = (cell(row, k, where) for k in ("dataset", "category_id", "task_id"))
        items.append(
            Item(
                id=ids.add(f"safebench-{dataset}-{category_id}-{task_id}", where, f"line {lineno}"),
                text=cell(row, "question", where),
                kind="harmful",
                category=cell(row, "category_name", where),
                instruction=cell(row, "instruction", where),
                meta={"dataset": dataset, "category_id": category_id, "task_id": task_id},
            )
        )
    return items
