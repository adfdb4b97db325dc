"""The processor of an image-text checkpoint, with or without torchvision.

transformers' ``AutoProcessor`` builds every part a processor class names. Qwen2-VL and Qwen2.5-VL name a
video processor, and transformers' video processors need torchvision; torchvision's registry build does not
import beside a CPU build of torch (this project's CPU install removes it), so ``AutoProcessor`` fails there
on a model that is only ever shown images. Where torchvision is missing, the checkpoint's own processor
class is loaded without its video part: the same image processor (transformers picks its PIL
implementation), tokenizer, chat template and processor options as ``AutoProcessor`` would load, so
prompts and image tokens are the same; only video inputs are unavailable, and that is said once.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any

from safesearch.textfiles import read_json

# Where a checkpoint names its processor class, in the order transformers' AutoProcessor reads them.
_PROCESSOR_CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
_VIDEO = "video_processor"


def processor_class_name(path: Path, model_type: str | None) -> str | None:
    """The processor class the checkpoint at ``path`` names, else the one transformers maps its model type to."""
    for name in _PROCESSOR_CLASS_FILES:
        f = path / name
        if f.is_file():
            data = read_json(f, "processor config")
            if isinstance(data, dict) and isinstance(data.get("processor_class"), str):
                return data["processor_class"]
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(model_type or "")


@cache
def _image_only(cls: type) -> type:
    """``cls`` less its video processor. transformers derives a processor's parts from ``get_attributes``;
    the class's own ``__init__`` still receives ``video_processor=None`` and passes it on unused."""

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != _VIDEO]

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"{cls.__name__}ImagesOnly"
    return ImageOnly


@cache
def _say_no_video(class_name: str) -> None:
    print(
        f"note: torchvision is not installed: {class_name} loads without its video processor "
        "(images work; video inputs are unavailable)",
        file=sys.stderr,
    )


def load_processor(path: str | Path, model_type: str | None = None) -> Any:
    """The processor of the image-text checkpoint at ``path``: ``AutoProcessor``'s, or without torchvision
    the checkpoint's processor class without its video processor (see the module docstring)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = Path(path)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    name = processor_class_name(path, model_type)
    if name is None:
        return AutoProcessor.from_pretrained(path)
    from transformers.models.auto.processing_auto import processor_class_from_name

    cls = processor_class_from_name(name)
    if cls is None or _VIDEO not in cls.get_attributes():
        return AutoProcessor.from_pretrained(path)
    processor = _image_only(cls).from_pretrained(path)
    _say_no_video(name)
    return processor
