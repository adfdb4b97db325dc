"""What a checkpoint directory holds, read from its ``config.json`` alone (before any weight is loaded):
whether it takes images, and whether transformers can load it natively at all.

Releases built on their authors' own code (LLaVA-Med v1.5's ``llava_mistral``, the original
HuatuoGPT-Vision's ``llava_qwen2``) merge and export like any checkpoint (the graft reads tensors, not
classes), but no backend can run them: their config names a class transformers does not have. They are
refused here with what to do, instead of failing inside the loader with "does not recognize this
architecture", or being taken for a text-only model because their vision tower hides in ``mm_*`` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesearch.errors import UserError
from safesearch.textfiles import read_json

# Keys of the original LLaVA code base (and its descendants): an image-text model without ``vision_config``.
_LLAVA_CODE_KEYS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")
CONVERT_HINT = (
    "convert it to its transformers-native class first (LLaVA-style releases: the llava-hf layout, "
    "LlavaForConditionalGeneration; see docs/grafting.md, 'The paper's models')"
)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of the model directory ``path`` as a dict (errors name the file)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"model directory '{path}' has no config.json")
    config = read_json(config_file, "model config")
    if not isinstance(config, dict):
        raise UserError(f"model config {config_file}: not a JSON object")
    return config


def custom_code_reason(config: dict[str, Any]) -> str | None:
    """Why transformers cannot build this config's model natively, or None when it can."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    what = f"model_type {model_type!r}" + (f" ({arch})" if arch else "")
    # With auto_map a checkpoint ships its own code; transformers still loads a type it knows natively.
    own_code = "its own code shipped with the checkpoint (auto_map), which safesearch never runs" if (
        "auto_map" in config) else "its authors' own code"
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return f"{what} is not a model type transformers knows: a release built on {own_code}"
    if arch is not None and not hasattr(transformers, arch):
        return f"{what}: transformers has no class {arch}: a release built on {own_code}"
    return None


def check_native(path: str | Path, config: dict[str, Any]) -> None:
    """Refuse, in one line, a checkpoint that transformers cannot load natively (the transformers backend's
    check; vLLM has its own registry of architectures)."""
    reason = custom_code_reason(config)
    if reason is not None:
        raise UserError(f"the model at '{path}' cannot be evaluated: {reason}; {_kind(config)}{CONVERT_HINT}")


def _llava_code(config: dict[str, Any]) -> bool:
    return "vision_config" not in config and any(k in config for k in _LLAVA_CODE_KEYS)


def _kind(config: dict[str, Any]) -> str:
    return "an image-text model in the original LLaVA code's layout; " if _llava_code(config) else ""


def takes_images(path: str | Path, config: dict[str, Any] | None = None) -> bool:
    """Whether the checkpoint at ``path`` is an image-text model (its config has a vision part), so that a
    suite needing images fails before a long load. A model in the original LLaVA code's layout (vision
    tower named by ``mm_vision_tower``, no ``vision_config``) is refused: no backend runs it, and taking it
    for a text model would blame the suite ("takes text only") for what the checkpoint lacks."""
    config = read_model_config(path) if config is None else config  # ``config``: already read by the caller
    if _llava_code(config):
        reason = custom_code_reason(config) or f"model_type {config.get('model_type')!r} keeps its vision tower in mm_* keys"
        raise UserError(f"the model at '{path}' cannot be evaluated: {reason}; {_kind(config)}{CONVERT_HINT}")
    return "vision_config" in config
