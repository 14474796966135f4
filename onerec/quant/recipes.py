"""FP8 recipes as small config dataclasses, and `quantize(model, recipe, calibration)`.

Like torchao's `quantize_(model, config)`: one config class per recipe, one handler per config
class (registered in `HANDLERS` below with `@register_handler`), one function that selects the
layers, calibrates when the recipe needs it and swaps nn.Linear for FP8Linear in place.

Recipes (onerec/quant/fp8.py has the numerics):
- fp8_dynamic (default, the paper's): per-output-channel FP32 weight scales, per-token dynamic
  activation scales. Option `layer_choice`: "all" (default: every selected layer in FP8) or
  "timed" (on a CUDA GPU, each of the engine's GEMMs is timed in bf16 and FP8 at one user's rows,
  `layer_choice_rows`, and a layer stays FP8 only where that is at least `min_speedup` times
  faster; onerec/engine/layer_choice.py);
- fp8_static: per-channel weights, one static per-tensor activation scale per layer from the
  calibration observer (max | percentile | mse);
- fp8_block: 128x128 weight blocks, 1x128 dynamic activation blocks (the paper's MoE choice).

Attention stays in bf16 in every recipe. A recipe.json with `"attention": "bf16"` (a field the
recipes once had) still loads; `"fp8"` is refused: FP8 cross-attention was retired
(`RETIRED_FP8_ATTENTION`).

Layer selection: fnmatch patterns over module names (`model.named_modules()`); a layer is
quantized when it is an nn.Linear, matches `include`, matches no `exclude`, and its dims are
multiples of 16 (the FP8 GEMM's constraint on GPU). Every other nn.Linear is reported in
`QuantizationReport.excluded` with its reason, never skipped silently. Embeddings and norms are
not nn.Linear and always stay in high precision.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from onerec.errors import UserError
from onerec.quant.calibrate import Calibration, measure_sqnr, observe_activations
from onerec.quant.fp8 import E4M3_MAX, FP8Linear

log = logging.getLogger(__name__)

GEMM_MULTIPLE = 16  # torch._scaled_mm on GPU needs K and N multiples of 16
# Version of a recipe's serialised form (recipe.json "recipe"); dicts without one are the first
# form, which had the same fields.
RECIPE_VERSION = 1

DEFAULT_INCLUDE = [
    "blocks.*.cross_q", "blocks.*.cross_o", "blocks.*.self_qkv", "blocks.*.self_o",
    "blocks.*.ffn.w1", "blocks.*.ffn.w2", "blocks.*.ffn.w3",
    "blocks.*.ffn.experts.*.w1", "blocks.*.ffn.experts.*.w2", "blocks.*.ffn.experts.*.w3",
    "blocks.*.ffn.shared.w1", "blocks.*.ffn.shared.w2", "blocks.*.ffn.shared.w3",
    "context.proj",
]
# Kept in high precision even if an include pattern matched: cheap or numerically sensitive.
DEFAULT_EXCLUDE = ["*.router", "context.profile_proj", "heads.*"]
RETIRED_FP8_ATTENTION = (
    "FP8 attention (attention=\"fp8\") was retired: measured on an H200 on 2026-12-04 it was slower than bf16 "
    "(0.92x the bf16 engine) and cost recall@10 (-2.7%); quantize again without it"
)


@dataclass
class FP8RecipeConfig:
    """Layer selection shared by all recipes (fnmatch patterns over module names)."""

    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))

    name = "base"  # class attribute: the recipe's registry name
    weight = "per_channel"  # FP8Linear weight granularity
    activation = "per_token"  # FP8Linear activation mode
    needs_calibration = False  # True when scales come from calibration data

    def to_dict(self) -> dict:
        return {
            "name": self.name, "version": RECIPE_VERSION, "weight": self.weight, "activation": self.activation,
            **dataclasses.asdict(self),
        }


LAYER_CHOICES = ("all", "timed")


@dataclass
class FP8DynamicConfig(FP8RecipeConfig):
    layer_choice: str = "all"  # "all" | "timed": FP8 only where it measured faster (module doc)
    layer_choice_rows: int = 512  # rows of each decoder GEMM the choice is timed at (1 user x beam 512)
    min_speedup: float = 1.0  # FP8 stays where bf16 time / FP8 time >= this

    name = "fp8_dynamic"

    def __post_init__(self) -> None:
        if self.layer_choice not in LAYER_CHOICES:
            raise UserError(f"fp8_dynamic: layer_choice must be one of {', '.join(LAYER_CHOICES)}, "
                            f"got {self.layer_choice!r}")
        if self.layer_choice_rows < 1 or not self.min_speedup > 0:
            raise UserError(f"fp8_dynamic: layer_choice_rows must be >= 1 and min_speedup > 0, got "
                            f"{self.layer_choice_rows} and {self.min_speedup}")


@dataclass
class FP8StaticConfig(FP8RecipeConfig):
    observer: str = "percentile"  # max | percentile | mse
    percentile: float = 99.99

    name = "fp8_static"
    activation = "per_tensor"
    needs_calibration = True

    def __post_init__(self) -> None:
        if self.observer not in ("max", "percentile", "mse"):
            raise UserError(f"fp8_static: unknown observer {self.observer!r} (max, percentile, mse)")
        if not 0 < self.percentile <= 100:
            raise UserError(f"fp8_static: percentile must be in (0, 100], got {self.percentile}")


@dataclass
class FP8BlockConfig(FP8RecipeConfig):
    block_size: int = 128

    name = "fp8_block"
    weight = "block"
    activation = "block"


RECIPES: dict[str, type[FP8RecipeConfig]] = {
    cls.name: cls for cls in (FP8DynamicConfig, FP8StaticConfig, FP8BlockConfig)
}


def make_recipe(name: str, exclude: list[str] | tuple = (), **options) -> FP8RecipeConfig:
    """A recipe config by name; `exclude` patterns are added to the defaults, options set fields."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    cls = RECIPES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise UserError(f"recipe {name} has no option(s) {sorted(unknown)}")
    recipe = cls(**options)
    recipe.exclude = [*recipe.exclude, *exclude]
    return recipe


def recipe_from_dict(d: dict) -> FP8RecipeConfig:
    """Inverse of FP8RecipeConfig.to_dict (recipe.json): reads version 1 and the unversioned form."""
    d = dict(d)
    version = d.pop("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise UserError(f"recipe.json: recipe version {version!r}, this code reads version {RECIPE_VERSION}")
    name = d.pop("name", None)
    for derived in ("weight", "activation"):
        d.pop(derived, None)
    if d.pop("attention", "bf16") != "bf16":
        raise UserError(f"recipe.json: {RETIRED_FP8_ATTENTION}")
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r} in recipe.json")
    known = {f.name for f in dataclasses.fields(RECIPES[name])}
    if set(d) - known:
        raise UserError(f"recipe.json: recipe {name} has no field(s) {sorted(set(d) - known)}")
    return RECIPES[name](**d)


def static_input_scale(observer, recipe: FP8StaticConfig) -> tuple[float, float]:
    """(clip value, static activation scale) of a layer: the recipe's observer clip over E4M3's max."""
    clip = observer.clip_value(recipe.observer, recipe.percentile)
    return clip, max(clip, 1e-12) / E4M3_MAX


# --- handlers: one per config class, the only place that knows how a recipe builds its layer ---

Handler = Callable[[nn.Linear, FP8RecipeConfig, str, dict], FP8Linear]
HANDLERS: dict[type[FP8RecipeConfig], Handler] = {}


def register_handler(config_cls: type[FP8RecipeConfig]):
    def wrap(fn: Handler) -> Handler:
        HANDLERS[config_cls] = fn
        return fn

    return wrap


@register_handler(FP8DynamicConfig)
def _fp8_dynamic(linear: nn.Linear, recipe: FP8DynamicConfig, name: str, calib: dict) -> FP8Linear:
    return FP8Linear.from_linear(linear, "per_channel", "per_token", name=name)


@register_handler(FP8StaticConfig)
def _fp8_static(linear: nn.Linear, recipe: FP8StaticConfig, name: str, calib: dict) -> FP8Linear:
    return FP8Linear.from_linear(linear, "per_channel", "per_tensor", input_scale=calib["input_scale"], name=name)


@register_handler(FP8BlockConfig)
def _fp8_block(linear: nn.Linear, recipe: FP8BlockConfig, name: str, calib: dict) -> FP8Linear:
    return FP8Linear.from_linear(linear, "block", "block", block=recipe.block_size, name=name)


# --- layer selection ---

def _matches(name: str, patterns: list[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def select_layers(model: nn.Module, recipe: FP8RecipeConfig) -> tuple[list[str], dict[str, str]]:
    """(names to quantize, {name: reason} for every other nn.Linear)."""
    selected, excluded = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        pattern = _matches(name, recipe.exclude)
        if pattern is not None:
            default = pattern in DEFAULT_EXCLUDE
            excluded[name] = (
                f"kept in high precision by default (pattern {pattern!r})" if default
                else f"excluded by pattern {pattern!r}"
            )
            continue
        if _matches(name, recipe.include) is None:
            excluded[name] = "matches no include pattern"
            continue
        N, K = module.weight.shape
        if N % GEMM_MULTIPLE or K % GEMM_MULTIPLE:
            excluded[name] = f"shape [N={N}, K={K}] is not a multiple of {GEMM_MULTIPLE} (FP8 GEMM constraint)"
            continue
        selected.append(name)
    return selected, excluded


# --- the one entry point ---

@dataclass
class QuantizationReport:
    recipe: dict
    quantized: list[str]  # layer names now FP8Linear
    excluded: dict[str, str]  # layer name -> why it stays in high precision
    calibration: dict = field(default_factory=dict)  # "num_requests" and per-layer "layers" statistics
    layer_choice: dict = field(default_factory=dict)  # the timed choice (layer_choice="timed"), else empty

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def worst_layer_sqnr(self) -> tuple[str, float] | None:
        sq = {n: s["sqnr_db"] for n, s in self.calibration.get("layers", {}).items() if s.get("sqnr_db") is not None}
        return min(sq.items(), key=lambda kv: kv[1]) if sq else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize(
    model: nn.Module, recipe: FP8RecipeConfig | str = "fp8_dynamic", calibration: Calibration | None = None,
    measure: bool = True, layer_timer=None,
) -> QuantizationReport:
    """Quantize `model` in place with `recipe`; returns what was quantized, what not and why.

    `calibration` is required for recipes with static scales; for the others it is still used (when
    given) to check activations for NaN/Inf and to record activation statistics and, with
    `measure`, each layer's SQNR for recipe.json and the reports. `layer_timer`: the GEMM timer of
    layer_choice="timed" (onerec.engine.layer_choice.Timer; None: this machine's CUDA GPU).
    """
    if isinstance(recipe, str):
        recipe = make_recipe(recipe)
    handler = HANDLERS.get(type(recipe))
    if handler is None:
        raise UserError(f"no handler registered for recipe config {type(recipe).__name__}")
    if recipe.needs_calibration and calibration is None:
        raise UserError(f"recipe {recipe.name} needs calibration data (static activation scales)")
    model.eval()
    selected, excluded = select_layers(model, recipe)
    choice: dict = {}
    if getattr(recipe, "layer_choice", "all") == "timed":
        from onerec.engine.layer_choice import choose_layers, excluded_reason

        choice = choose_layers(model, selected, recipe.layer_choice_rows, recipe.min_speedup, layer_timer)
        slower = {n: e for n, e in choice["layers"].items() if e["choice"] == "bf16"}
        selected = [n for n in selected if n not in slower]
        excluded.update({n: excluded_reason(e, recipe.min_speedup) for n, e in slower.items()})
    for name, reason in excluded.items():
        log.info("keeping %s in high precision: %s", name, reason)
    stats: dict[str, dict] = {name: {} for name in selected}
    calib_summary: dict = {}
    if calibration is not None:
        observers = observe_activations(model, selected, calibration, desc=f"calibrate {recipe.name}")
        for name, obs in observers.items():
            stats[name] = obs.stats()
            if recipe.needs_calibration:
                stats[name]["clip_value"], stats[name]["input_scale"] = static_input_scale(obs, recipe)
        calib_summary["num_requests"] = (
            len(calibration.requests) if calibration.max_requests is None
            else min(len(calibration.requests), calibration.max_requests)
        )
    fp8_layers = {
        name: handler(model.get_submodule(name), recipe, name, stats[name]) for name in selected
    }
    if calibration is not None and measure and fp8_layers:
        for name, value in measure_sqnr(model, fp8_layers, calibration, desc=f"sqnr {recipe.name}").items():
            stats[name]["sqnr_db"] = value
    for name, layer in fp8_layers.items():
        _replace(model, name, layer)
    log.info("%s: %d layers quantized, %d kept in high precision", recipe.name, len(fp8_layers), len(excluded))
    return QuantizationReport(recipe.to_dict(), selected, excluded, {**calib_summary, "layers": stats}, choice)
