"""Which torch device a command runs on: one rule for train, eval and serve."""

from __future__ import annotations

from onerec.errors import UserError


def resolve_device(device=None):
    """A torch.device as it is. None or "auto": CUDA when present, else CPU. "cpu" and "cuda[:N]" as given; asking for CUDA
    where there is none, or for anything else, is a UserError (not a traceback later on)."""
    import torch  # heavy: torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r}: {exc}") from None
