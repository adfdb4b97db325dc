"""Devices a user names (``--device``, a spec's ``device``), checked before anything loads."""

from __future__ import annotations

import re

from safesearch.errors import UserError

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str | None, where: str) -> str | None:
    """``name`` if it names a device (``auto``, ``cpu``, ``cuda``, ``cuda:N``; None passes), else a one-line
    error naming ``where``. Checked without torch: whether this machine has it is :func:`check_device`'s."""
    if name is not None and not _DEVICE.fullmatch(name):
        raise UserError(f"{where}: {name!r} is not a device (auto, cpu, cuda or cuda:N)")
    return name


def check_device(name: str | None, where: str) -> str | None:
    """``name`` if it is a device this machine has (``auto``, ``cpu``, ``cuda``, ``cuda:N``; None passes),
    else a one-line error naming ``where`` (a flag or a spec field). A CUDA device imports torch."""
    if check_device_name(name, where) is None or name in ("auto", "cpu"):
        return name
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{where}: {name!r} asked for, but CUDA is not available on this machine")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"{where}: {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
