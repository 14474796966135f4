"""Calibration: observers on the inputs of linear layers, run over a calibration request table.

One pass of the high-precision model (teacher-forced forward on the requests' targets, the same
GEMM shapes beam search runs) with forward hooks on the chosen nn.Linear modules. Each layer's
`ActivationObserver` keeps exact running moments and maxima plus a bounded random sample of
|x| for percentiles, the MSE clip search and histograms. A second hooked pass (`measure_sqnr`)
compares each layer's FP8 version with its high-precision output on the same inputs.

Observers for static per-tensor activation scales (fp8_static):
- max:        scale = amax / 448 (never saturates on calibration data; wastes range on outliers)
- percentile: scale = P(|x|, q) / 448 (e.g. q = 99.99: clips the rarest outliers)
- mse:        scale = c / 448 with the clip value c minimising the quantize-dequantize MSE
              of the sample over a grid of fractions of amax.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onerec.calibration_table import read_calibration
from onerec.errors import UserError
from onerec.quant.fp8 import E4M3_MAX, check_finite, quantize_per_tensor

log = logging.getLogger(__name__)

OBSERVERS = ("max", "percentile", "mse")
SAMPLE_PER_BATCH = 4096  # |x| values kept per layer and batch
SAMPLE_MAX = 1 << 17  # |x| values kept per layer in all
# Values below this fraction of their token's absmax become 0 in E4M3 with per-token scaling:
# half the smallest subnormal (2^-9) relative to the 448 the absmax maps to.
PER_TOKEN_UNDERFLOW = 2.0**-10 / E4M3_MAX


@dataclass
class Calibration:
    """A calibration request table (onerec.data format) and the tokenizer to batch it."""

    requests: object  # pandas.DataFrame: user_id, history, target, profile columns
    table: np.ndarray
    batch_size: int = 64
    max_requests: int | None = None
    source: dict | None = None  # where the requests came from (onerec.calibration_table)

    @classmethod
    def from_path(cls, path: str | Path, table: np.ndarray, context_len: int | None = None, **kwargs) -> Calibration:
        """A request table file/folder, or a data folder to draw one from (cut to `context_len`)."""
        requests, source = read_calibration(path, context_len)
        return cls(requests, table, source=source, **kwargs)

    def batches(self, model) -> Iterator:
        """Batches of requests whose target is known (the teacher-forced pass needs its codes)."""
        from onerec.data import iter_batches  # heavy: pandas, torch

        requests = self.requests
        if self.max_requests is not None:
            requests = requests.iloc[: self.max_requests]
        targets = requests["target"].to_numpy(np.int64)
        known = (targets >= 0) & (targets < len(self.table))
        known[known] = (self.table[targets[known]] >= 0).all(1)
        requests = requests[known]
        if requests.empty:
            raise UserError("calibration data has no request with a target known to the tokenizer")
        cfg = model.cfg
        yield from iter_batches(requests, self.table, cfg.context_len, cfg.profile_features, self.batch_size,
                                categorical=cfg.categorical_features)

    def num_batches(self, model) -> int:
        n = len(self.requests) if self.max_requests is None else min(self.max_requests, len(self.requests))
        return math.ceil(n / self.batch_size)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_model(model, batch) -> torch.Tensor:
    """The calibration forward: teacher-forced logits [B, n_levels, V]."""
    b = batch.to(_device_of(model))
    return model(b.history_sids, b.history_mask, b.target_sids, b.profile)


def tensor_stats(sample: torch.Tensor) -> dict:
    """variance, AbsMax, AbsP99, kurtosis, AbsMax/AbsP99 of a tensor (float64; kurtosis: Pearson, normal = 3)."""
    x = sample.detach().double().flatten()
    mean = x.mean()
    var = x.var(unbiased=False)
    kurt = ((x - mean) ** 4).mean() / var.clamp(min=1e-300) ** 2
    absx = x.abs()
    amax, p99 = absx.max(), _quantile(absx, 0.99)
    return {
        "variance": float(var), "absmax": float(amax), "absp99": float(p99), "kurtosis": float(kurt),
        "absmax_over_absp99": float(amax / p99) if p99 > 0 else None,
    }


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile refuses more than 2^24 elements: use kthvalue, exact for any size."""
    x = x.flatten()
    k = min(max(1, math.ceil(q * x.numel())), x.numel())
    return x.kthvalue(k).values


class ActivationObserver:
    """Running statistics of one layer's input: exact moments and maxima, a sample of |x|."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.count = 0
        self.moments = torch.zeros(4, dtype=torch.float64)  # sum x, x^2, x^3, x^4
        self.amax = 0.0
        self.nonzero = 0
        self.underflow = 0  # non-zero values that per-token E4M3 scaling flushes to zero
        self.max_token_range_db = 0.0  # largest per-token absmax / min non-zero |x|, in dB
        self._samples: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        check_finite(x, self.name, "calibration activation (layer input)")
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if x.numel() == 0:
            return
        self.count += x.numel()
        self.moments += torch.stack([x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum()]).cpu()
        absx = x.abs()
        self.amax = max(self.amax, float(absx.max()))
        token_max = absx.amax(-1, keepdim=True)
        nz = absx > 0
        self.nonzero += int(nz.sum())
        self.underflow += int((nz & (absx < token_max * PER_TOKEN_UNDERFLOW)).sum())
        min_nz = absx.masked_fill(~nz, float("inf")).amin(-1)
        has = torch.isfinite(min_nz)
        if has.any():
            ratio = (token_max.squeeze(-1)[has] / min_nz[has]).max()
            self.max_token_range_db = max(self.max_token_range_db, 20 * math.log10(float(ratio)))
        if self._kept < SAMPLE_MAX:
            flat = x.flatten().cpu()
            take = min(SAMPLE_PER_BATCH, flat.numel(), SAMPLE_MAX - self._kept)
            idx = torch.randperm(flat.numel(), generator=self._gen)[:take]
            self._samples.append(flat[idx].float())
            self._kept += take

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self._samples) if self._samples else torch.zeros(1)

    def stats(self) -> dict:
        """Exact variance/kurtosis/AbsMax from the moments; AbsP99 from the sample."""
        if self.count == 0:
            return {"elements": 0}
        n = self.count
        s1, s2, s3, s4 = (float(m) / n for m in self.moments)
        var = max(s2 - s1 * s1, 0.0)
        m4 = s4 - 4 * s1 * s3 + 6 * s1 * s1 * s2 - 3 * s1**4
        p99 = float(_quantile(self.sample.abs().double(), 0.99))
        return {
            "elements": n, "variance": var, "absmax": self.amax, "absp99": p99,
            "kurtosis": m4 / var**2 if var > 0 else 0.0,
            "absmax_over_absp99": self.amax / p99 if p99 > 0 else None,
            "per_token_underflow_fraction": self.underflow / self.nonzero if self.nonzero else 0.0,
            "max_token_dynamic_range_db": self.max_token_range_db,
        }

    def clip_value(self, observer: str, percentile: float = 99.99) -> float:
        """The |x| that maps to 448 under a static per-tensor scale, by the chosen observer."""
        if observer == "max":
            return self.amax
        absx = self.sample.abs()
        if observer == "percentile":
            return float(_quantile(absx.double(), percentile / 100.0))
        if observer == "mse":
            return mse_clip_value(self.sample, self.amax)
        raise ValueError(f"unknown observer {observer!r}; known: {', '.join(OBSERVERS)}")


def mse_clip_value(sample: torch.Tensor, amax: float, grid: int = 100) -> float:
    """Clip value c in [amax/100, amax] minimising the MSE of per-tensor E4M3 quantize-dequantize."""
    if amax <= 0:
        return 0.0
    x = sample.float()
    best, best_err = amax, float("inf")
    for frac in np.geomspace(0.01, 1.0, grid):
        scale = torch.tensor(amax * float(frac) / E4M3_MAX)
        err = float(((quantize_per_tensor(x, scale).float() * scale - x) ** 2).mean())
        if err < best_err:
            best, best_err = amax * float(frac), err
    return best


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm  # heavy: tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)


def _pass_with_hooks(model: nn.Module, handles: list, calibration: Calibration, desc: str) -> None:
    """Run the model over the calibration batches, then remove the hooks (also on error)."""
    try:
        for batch in _progress(calibration.batches(model), calibration.num_batches(model), desc):
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def observe_activations(
    model: nn.Module, layers: list[str], calibration: Calibration, desc: str = "calibrate",
) -> dict[str, ActivationObserver]:
    """One hooked pass over the calibration batches: an observer per named nn.Linear input."""
    observers = {name: ActivationObserver(name, seed=i) for i, name in enumerate(layers)}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, o=obs: o.update(args[0]))
        for name, obs in observers.items()
    ]
    _pass_with_hooks(model, handles, calibration, desc)
    return observers


@torch.no_grad()
def measure_sqnr(
    model: nn.Module, fp8_layers: dict[str, nn.Module], calibration: Calibration, desc: str = "sqnr",
) -> dict[str, float]:
    """Per layer SQNR in dB of the FP8 layer vs the high-precision layer of `model` on the same inputs.

    The high-precision model runs unchanged (each layer sees high-precision inputs), so a layer's
    figure measures that layer alone: 10 log10(sum y^2 / sum (y_fp8 - y)^2).
    """
    signal = dict.fromkeys(fp8_layers, 0.0)
    noise = dict.fromkeys(fp8_layers, 0.0)

    def hook(name):
        def fn(_module, args, out):
            y = out.detach().double()
            y_fp8 = fp8_layers[name](args[0]).double()
            signal[name] += float((y**2).sum())
            noise[name] += float(((y_fp8 - y) ** 2).sum())

        return fn

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in fp8_layers]
    _pass_with_hooks(model, handles, calibration, desc)
    return {name: sqnr_db(signal[name], noise[name]) for name in fp8_layers}


SQNR_CAP_DB = 200.0  # an exact layer reports this instead of +inf (JSON has no infinity)


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise), capped at SQNR_CAP_DB; None when the layer saw no input."""
    if signal == 0 and noise == 0:
        return None
    if signal == 0:
        return -SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise)) if noise > 0 else SQNR_CAP_DB

