"""The quantized artifact: save_quantized / load_quantized.

Folder (the data contract of docs/architecture.md):
    config.json          OneRecV2Config (the same file as the checkpoint's)
    recipe.json          format, recipe, per-layer FP8 layout, excluded layers and why,
                         calibration statistics, source checkpoint manifest sha256, sizes, and
                         with layer_choice="timed" the choice's timings ("layer_choice")
    model.safetensors    FP8Linear buffers as stored (weight_fp8 float8_e4m3fn, weight_scale and
                         input_scale fp32) + every other tensor in bf16
    semantic_ids.npy     the tokenizer table
    reports/             quantization.json and quantization.png (per-layer SQNR and AbsMax)
    manifest.json        written last (onerec.manifest.write_manifest)

A folder is recognised as quantized by its recipe.json. Loading needs nothing else: the layer
layout in recipe.json rebuilds the FP8Linear modules, the weights load strictly.

`quantize_folder` is the whole step, checkpoint folder -> quantized folder: the `onerec-fp8
quantize` command and the pipeline's quantize step both call it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from onerec.checkpoint import CONFIG, SEMANTIC_IDS, WEIGHTS, load_checkpoint, load_weights
from onerec.devices import resolve_device
from onerec.errors import UserError
from onerec.manifest import atomic_folder, manifest_digest, verify_manifest, write_manifest
from onerec.model import MoE, OneRecV2, OneRecV2Config
from onerec.quant import plots
from onerec.quant.fp8 import FP8Linear
from onerec.semantic_ids import load_table, validate_table

log = logging.getLogger(__name__)

RECIPE = "recipe.json"
FORMAT = "onerec-fp8-quantized/1"
HIGH_PRECISION = torch.bfloat16  # dtype of everything that is not FP8 (weights and activations)


def is_quantized_folder(folder: str | Path) -> bool:
    return (Path(folder) / RECIPE).is_file()


def recipe_name(recipe_json: dict) -> str | None:
    """The recipe's name in a recipe.json (which also carries the per-layer layout and statistics)."""
    recipe = recipe_json.get("recipe")
    return recipe.get("name") if isinstance(recipe, dict) else recipe_json.get("name")


def fp8_layers(model: torch.nn.Module) -> dict[str, FP8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def layer_layout(layer: FP8Linear) -> dict:
    return {
        "shape": [layer.out_features, layer.in_features], "weight": layer.weight_granularity,
        "activation": layer.activation, "block": layer.block, "bias": layer.bias is not None,
    }


def size_summary(model: torch.nn.Module) -> dict:
    """Bytes of the quantized layers as stored (FP8 + scales) vs the same layers' bf16 weights."""
    layers = fp8_layers(model)
    stored = sum(b.numel() * b.element_size() for m in layers.values() for b in m.buffers())
    bf16 = sum(2 * m.in_features * m.out_features for m in layers.values())
    return {
        "quantized_layers_fp8_bytes": stored, "quantized_layers_bf16_bytes": bf16,
        "ratio_vs_bf16": stored / bf16 if bf16 else None,
    }


def _state_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    fp8_buffer_names = {f"{name}.{b}" for name, m in fp8_layers(model).items() for b, t in m._buffers.items() if t is not None}
    state = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if key not in fp8_buffer_names and t.is_floating_point():
            t = t.to(HIGH_PRECISION)
        state[key] = t.contiguous()
    return state


def save_quantized(
    model: OneRecV2, table: np.ndarray, report, out: str | Path, source_checkpoint: str | Path | None = None,
    overwrite: bool = False, extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the quantized folder for `model` (already passed through quantize) and its report.

    `report` is the QuantizationReport (or its dict); `extra(folder)` may add files (e.g. more
    reports) before the manifest is written.
    """
    report = report if isinstance(report, dict) else report.to_dict()
    layers = fp8_layers(model)
    if not layers:
        raise UserError("the model has no FP8 layer: nothing was quantized (check the recipe's patterns)")
    validate_table(table, model.cfg.codebook_size)
    source = None
    if source_checkpoint is not None:
        source = {"path": str(source_checkpoint), "manifest_sha256": manifest_digest(source_checkpoint)}
    recipe_json = {
        "format": FORMAT,
        "recipe": report["recipe"],
        "layers": {name: layer_layout(m) for name, m in layers.items()},
        "excluded": report["excluded"],
        "calibration": report.get("calibration", {}),
        "source_checkpoint": source,
        "high_precision_dtype": str(HIGH_PRECISION).removeprefix("torch."),
        "size": size_summary(model),
        "torch_version": torch.__version__,
    }
    if report.get("layer_choice"):  # GPU, rows, per-layer times and choice (onerec/engine/layer_choice.py)
        recipe_json["layer_choice"] = report["layer_choice"]
    with atomic_folder(out, overwrite) as tmp:
        model.cfg.save(tmp / CONFIG)
        (tmp / RECIPE).write_text(json.dumps(recipe_json, indent=2, sort_keys=True) + "\n")
        save_file(_state_for_export(model), str(tmp / WEIGHTS), metadata={"format": "pt", "quantization": FORMAT})
        np.save(tmp / SEMANTIC_IDS, table.astype(np.int32), allow_pickle=False)
        reports = tmp / "reports"
        reports.mkdir()
        (reports / "quantization.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        stats = report.get("calibration", {}).get("layers", {})
        bars = {
            name: {"sqnr_db": s.get("sqnr_db"), "activation_absmax": s.get("absmax"),
                   "weight_absmax": float(layers[name].dequantized_weight().abs().max())}
            for name, s in stats.items()
        }
        if bars:
            plots.layer_bars(
                bars, reports / "quantization.png",
                f"{report['recipe']['name']}: per-layer SQNR and AbsMax ({len(layers)} FP8 layers, "
                f"{len(report['excluded'])} kept in high precision)",
            )
        if extra is not None:
            extra(tmp)
        write_manifest(tmp)
    log.info("wrote %s (%s)", out, recipe_json["size"])
    return Path(out)


def load_quantized(
    qdir: str | Path, device: str | torch.device = "cpu", verify: bool = True,
) -> tuple[OneRecV2, np.ndarray, dict]:
    """(FP8 model in eval mode, semantic-id table, recipe.json as a dict) from a quantized folder."""
    from onerec.quant.recipes import _replace, recipe_from_dict  # heavy: torch

    qdir = Path(qdir)
    if not is_quantized_folder(qdir):
        raise UserError(f"{qdir} is not a quantized folder (no {RECIPE})")
    if verify:
        verify_manifest(qdir)
    try:
        recipe = json.loads((qdir / RECIPE).read_text())
        cfg = OneRecV2Config.load(qdir / CONFIG)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{qdir}: invalid {RECIPE} or {CONFIG} ({exc})") from None
    if recipe.get("format") != FORMAT:
        raise UserError(f"{qdir / RECIPE}: format {recipe.get('format')!r}, this code reads {FORMAT!r}")
    recipe_from_dict(recipe["recipe"])  # a recipe this code can serve (e.g. not the retired FP8 attention)
    with torch.device("meta"):
        model = OneRecV2(cfg)  # no random init: every tensor comes from the file
    for name, spec in recipe["layers"].items():
        N, K = spec["shape"]
        layer = FP8Linear(K, N, spec["weight"], spec["activation"], bias=spec["bias"], block=spec["block"], name=name)
        _replace(model, name, layer)
    model = model.to_empty(device="cpu").to(HIGH_PRECISION)
    for m in model.modules():
        if isinstance(m, MoE):
            m.aux_loss = torch.zeros(())  # a plain attribute, created on "meta" above
    state = load_weights(qdir / WEIGHTS)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{qdir / WEIGHTS}: does not fit config.json and {RECIPE} ({str(exc).splitlines()[0]})") from None
    table = load_table(qdir / SEMANTIC_IDS)
    return model.to(device).eval(), table, recipe


def check_made_from(quantized_dir: str | Path, recipe: dict, checkpoint_dir: str | Path,
                    table: np.ndarray, q_table: np.ndarray) -> None:
    """UserError unless the quantized folder was made from this checkpoint (the gates compare the two).

    recipe.json records the source checkpoint's manifest sha256; the semantic-id tables must be equal too.
    """
    source = (recipe.get("source_checkpoint") or {}).get("manifest_sha256")
    if source and source != manifest_digest(checkpoint_dir):
        raise UserError(f"{quantized_dir} was quantized from another checkpoint than {checkpoint_dir} "
                        "(manifest sha256 differs)")
    if not np.array_equal(table, q_table):
        raise UserError(f"{quantized_dir} and {checkpoint_dir} have different semantic-id tables")


def quantize_folder(
    checkpoint: str | Path, calibration: str | Path, recipe: str, out: str | Path, exclude: list[str] | tuple = (),
    options: dict | None = None, max_requests: int | None = None, batch_size: int = 64, overwrite: bool = False,
    reuse: bool = False, device: str | None = "cpu",
) -> dict:
    """Quantize a checkpoint folder with `recipe` (calibrated on a request table) into `out`.

    `device`: where the model runs while calibrating ("auto": CUDA when present). The weights are
    quantized in fp32 either way and saved from the CPU, so the folder does not depend on it.

    `reuse`: an intact quantized folder already at `out`, made from this checkpoint with this
    exact recipe, is kept as it is. Returns what was quantized, what not, the worst layer's SQNR
    and the size ratio.
    """
    from onerec.features import count_unseen  # heavy: pandas
    from onerec.quant.calibrate import Calibration  # heavy: torch
    from onerec.quant.recipes import make_recipe, quantize  # heavy: torch

    if batch_size < 1 or (max_requests is not None and max_requests < 1):
        raise UserError("--batch-size and --max-requests must be positive")
    config = make_recipe(recipe, exclude=list(exclude), **(options or {}))
    out = Path(out)
    if reuse and _same_quantization(out, checkpoint, config.to_dict()):
        log.info("%s already holds %s of this checkpoint: reused", out, recipe)
        return {"quantized": str(out), "checkpoint": str(checkpoint), "recipe": recipe, "reused": True}

    t0 = time.monotonic()
    model, table = load_checkpoint(checkpoint, device=resolve_device(device))
    calib = Calibration.from_path(calibration, table, context_len=model.cfg.context_len, batch_size=batch_size,
                                  max_requests=max_requests)
    report = quantize(model, config, calib)
    save_quantized(model, table, report, out, source_checkpoint=checkpoint, overwrite=overwrite)
    written = json.loads((out / RECIPE).read_text())
    worst = report.worst_layer_sqnr
    log.info("quantized %d layers with %s in %.1fs", len(report.quantized), recipe, time.monotonic() - t0)
    return {
        "quantized": str(out), "checkpoint": str(checkpoint), "recipe": report.recipe["name"], "reused": False,
        "checkpoint_sha256": written["source_checkpoint"]["manifest_sha256"],
        "quantized_layers": len(report.quantized), "excluded": report.excluded,
        "calibration_requests": report.calibration.get("num_requests"), "calibration_source": calib.source,
        "calibration_unseen_profile_values": count_unseen(calib.requests, model.cfg.categorical_features),
        "worst_layer": worst[0] if worst else None, "worst_layer_sqnr_db": worst[1] if worst else None,
        "size_ratio_vs_bf16": written["size"]["ratio_vs_bf16"], "size": written["size"],
        "seconds": round(time.monotonic() - t0, 2),
    }


def _same_quantization(out: Path, checkpoint: str | Path, recipe: dict) -> bool:
    """Is `out` an intact quantized folder of this checkpoint (by manifest) and this recipe?"""
    if not is_quantized_folder(out):
        return False
    try:
        verify_manifest(out)
        recipe_json = json.loads((out / RECIPE).read_text())
        source = (recipe_json.get("source_checkpoint") or {}).get("manifest_sha256")
        return source == manifest_digest(checkpoint) and recipe_json.get("recipe") == recipe
    except (UserError, ValueError, OSError):
        return False


def load_model_folder(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True,
) -> tuple[OneRecV2, np.ndarray, dict | None]:
    """(model in eval mode, semantic-id table, recipe.json or None) from a checkpoint or a quantized folder.

    `dtype` applies to a checkpoint; a quantized model keeps its stored FP8 and bf16 tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist or is not a folder")
    if is_quantized_folder(folder):
        return load_quantized(folder, device=device, verify=verify)
    model, table = load_checkpoint(folder, device=device, dtype=dtype, verify=verify)
    return model, table, None
