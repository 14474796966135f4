"""Model URI -> verified local folder -> a model ready to recommend.

Accepted URIs:
- `models:/NAME@ALIAS` or `models:/NAME/VERSION`: an MLflow registry version, downloaded by
  `onerec.serve.registry.download_verified` from the tracking server of the caller's Settings (the
  server's entry point builds them once)
  and loaded only when every file of it hashes to the version digest the pipeline signed
  (`digest`: promote and rollback pass it);
- a local folder: a quantized artifact (it has recipe.json) or a bf16 checkpoint, loaded by
  `onerec.checkpoint.load_model_folder`.

Every file of the folder's manifest is hashed before anything is loaded, and every file the
loaders read (json, safetensors, npy) must be listed in it: an altered or unlisted file refuses
to load. The device is CPU (the plain `onerec.generate.beam_search`) or a CUDA GPU, where the
engine area's fast path (`onerec.engine`) is used when it is importable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from onerec.devices import resolve_device
from onerec.errors import UserError
from onerec.manifest import MANIFEST, manifest_digest, verify_manifest
from onerec.serve.registry import download_verified
from onerec.settings import Settings

log = logging.getLogger(__name__)

REGISTRY_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9][\w.\-]*)(?:@(?P<alias>[\w.\-]+)|/(?P<version>\d+))$")
# suffixes of the files a loader reads: each must be covered by the manifest
LOADED_SUFFIXES = (".json", ".safetensors", ".npy")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model URI."""

    uri: str
    name: str
    alias: str | None = None
    version: str | None = None
    folder: Path | None = None  # set for a local folder

    @property
    def is_registry(self) -> bool:
        return self.folder is None

    def pinned_uri(self, version: str | None) -> str:
        """`models:/NAME/VERSION` for an alias once its version is known: later alias moves cannot change it."""
        if self.is_registry and version and str(version).isdigit():
            return f"models:/{self.name}/{version}"
        return self.uri


def parse_model_uri(uri: str, default_name: str | None = None) -> ModelRef:
    if not isinstance(uri, str) or not uri.strip():
        raise UserError("a model URI is required (models:/NAME@ALIAS, models:/NAME/VERSION or a local folder)")
    uri = uri.strip()
    if uri.startswith("models:"):
        m = REGISTRY_URI.match(uri)
        if m is None:
            raise UserError(f"model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return ModelRef(uri, m["name"], alias=m["alias"], version=m["version"])
    if "://" in uri:
        raise UserError(f"model URI {uri!r}: only models:/... registry URIs or local folders are served")
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist or is not a folder")
    return ModelRef(uri, default_name or Settings.model_name, folder=folder.resolve())


def _signed_in(settings: Settings) -> Settings:
    """`settings`, with this process's MLflow client pointed at their tracking server (MLflow
    resolves a version's logged model through the process's URIs) and signed in as the serving account."""
    import mlflow  # optional: the [serve] extra; a local folder serves without it

    from onerec.serve.mlflow_login import (
        use_serving_account,  # heavy: FastAPI, MLflow, PyYAML, Starlette, pandas, pydantic, requests
    )

    uri = settings.tracking_uri()
    if not uri:
        raise UserError("no MLflow tracking server configured for a models:/ URI: set MLFLOW_TRACKING_URI, or start "
                        f"the local stack (`onerec-fp8 stack up`; state dir {settings.state_dir})")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    use_serving_account(settings)
    return settings


def registry_version(ref: ModelRef, settings: Settings) -> str:
    """The registry version number an alias points at now (MLflow, imported lazily)."""
    if ref.version is not None:
        return ref.version
    try:
        from mlflow import MlflowClient  # heavy: MLflow

        settings = _signed_in(settings)
        client = MlflowClient(settings.tracking_uri(), registry_uri=settings.tracking_uri())
        return str(client.get_model_version_by_alias(ref.name, ref.alias).version)
    except Exception as exc:  # mlflow raises its own types; the message names the cause
        raise UserError(f"cannot resolve {ref.uri} in the MLflow registry: {exc}") from None


def require_digest(ref: ModelRef, digest: str | None) -> None:
    """A registry version is served only against its signed version digest (what promote and rollback pass)."""
    if ref.is_registry and not digest:
        raise UserError(f"serving {ref.uri} needs --model-digest (or ONEREC_MODEL_DIGEST), the version digest the pipeline signed (promote "
                        "and rollback pass it; the state record's deployed entry has it): unverified bytes are "
                        "never loaded")


def download(ref: ModelRef, cache_dir: Path, digest: str, settings: Settings) -> Path:
    """A registry version's quantized folder, verified against `digest` (onerec.serve.registry.download_verified)."""
    try:
        return download_verified(ref.uri, cache_dir, digest, _signed_in(settings).tracking_uri())
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot download {ref.uri}: {exc}") from None


def verify_folder(folder: Path) -> dict:
    """Hash every manifest entry, and refuse model files the manifest does not cover."""
    manifest = verify_manifest(folder)
    unlisted = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in LOADED_SUFFIXES and p.name != MANIFEST and not p.name.startswith(".")
        and p.relative_to(folder).as_posix() not in manifest
    )
    if unlisted:
        raise UserError(f"{folder}: files not covered by the manifest: {unlisted[:5]}; refusing to load")
    return manifest


@dataclass
class ServedModel:
    """A loaded model with what the server needs around it."""

    name: str
    version: str
    kind: str  # "fp8" (quantized folder) or "bf16" (checkpoint)
    folder: Path
    digest: str  # sha256 of the manifest: identifies the exact files served
    model: object  # OneRecV2 (possibly with FP8Linear layers)
    table: np.ndarray
    index: object  # SemanticIdIndex on the model's device
    device: str
    context_len: int
    profile_features: list[str]
    profile_fill: np.ndarray  # per feature: the model's stored training mean, used for missing values
    backend: str  # "engine" or "reference"
    search: Callable = field(repr=False)  # (sids, mask, profile, beam, k) -> Recommendations
    recipe: dict | None = None
    beam_widths: tuple[int, ...] | None = None  # the widths served; None: any (the reference search)
    engine: object | None = field(default=None, repr=False)  # onerec.engine.engine.Engine on CUDA

    def width(self, beam: int) -> int | None:
        """The width a request for `beam` is searched with: the smallest served width >= beam, or
        None when beam is wider than every served width."""
        if self.beam_widths is None:
            return beam
        return next((w for w in self.beam_widths if w >= beam), None)

    def prepare(self) -> dict:
        """Everything the server runs, prepared before it says ready: every CUDA graph of the
        served shapes (the engine), then nothing is captured while requests wait."""
        if self.engine is None:
            return {"graphs": 0, "seconds": 0.0, "memory_gib": 0.0, "failed": []}
        return self.engine.capture().to_dict()


@dataclass(frozen=True)
class ServingShapes:
    """The shapes a server is prepared for: beam widths, users per batch and history buckets.

    `beam_widths` None: the engine serves `engine_widths` (the server's default and maximum beam)
    and the reference search any width (it keeps nothing per width). On the engine every (width,
    batch bucket, history bucket) gets a CUDA graph before the server is ready (docs/serving.md:
    sizing them).
    """

    beam_widths: tuple[int, ...] | None = None
    engine_widths: tuple[int, ...] = (128, 512)
    max_batch_users: int = 64
    history_buckets: tuple[int, ...] | None = None  # None: onerec.engine.engine.length_buckets(context_len)

    def batch_buckets(self) -> tuple[int, ...]:
        sizes, n = [], 1
        while n < self.max_batch_users:
            sizes.append(n)
            n *= 2
        return (*sizes, self.max_batch_users)


def _reference_search(model, index) -> Callable:
    from onerec.generate import beam_search  # heavy: torch

    device = model.token_embedding.weight.device

    def search(sids, mask, profile, beam, k):
        profile = None if profile is None else profile.to(device)
        return beam_search(model, sids.to(device), mask.to(device), index, profile, beam_size=beam, k=k)

    return search


def _engine(model, index, device: str, shapes: ServingShapes):
    """The engine area's fast beam search (onerec.engine.engine.Engine) on a CUDA GPU, or None.

    One Engine over one serving view of the weights serves every width; it returns the top
    `width` items, of which the caller keeps k (the top-k of the same sorted beams, as
    onerec.generate.finalize does).
    """
    if not device.startswith("cuda"):
        return None
    try:
        from onerec.engine.engine import Engine, EngineConfig  # heavy: torch
    except ImportError as exc:
        log.info("onerec.engine is not available (%s); using the reference beam search on %s", exc, device)
        return None
    widths = shapes.beam_widths
    try:
        return Engine(model, index, EngineConfig(
            beam_size=max(widths), beam_sizes=widths, k=max(widths), batch_buckets=shapes.batch_buckets(),
            history_buckets=shapes.history_buckets))
    except Exception as exc:  # a fast path that cannot build must not take serving down
        log.warning("the engine is unavailable (%s); using the reference beam search", exc)
        return None


def require_finite(model, folder: Path) -> None:
    """Refuse a model with a NaN or an infinity in any weight, embedding row, scale or buffer: the
    warm-up touches a few items only, and such a model would answer 422 to every request that
    reaches the bad row. One tensor at a time (FP8 ones widened to float32 for the check)."""
    import torch  # heavy: torch

    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        values = tensor if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) else tensor.float()
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise UserError(f"{folder}: tensor {name} has {bad} value(s) that are not finite (NaN or inf); refusing to serve it")


def load_served_model(
    uri: str, device: str = "auto", cache_dir: str | Path | None = None,
    name: str | None = None, version: str | None = None, digest: str | None = None,
    shapes: ServingShapes | None = None, settings: Settings | None = None,
) -> ServedModel:
    """Resolve, verify and load `uri` (see module doc). `name`/`version` override the derived labels;
    `digest` is the signed version digest a registry version must match (a local folder: its
    manifest digest, when given); `shapes` (beam widths with the engine, batch and history
    buckets) default to ServingShapes's; `settings` are the server's (a models:/ URI needs them: the
    tracking server, the serving account, the default cache folder)."""
    import torch  # heavy: torch

    from onerec.quant.export import load_model_folder  # heavy: safetensors, torch
    from onerec.semantic_ids import SemanticIdIndex  # heavy: torch

    ref = parse_model_uri(uri, default_name=name)
    require_digest(ref, digest)
    device = str(resolve_device(device))
    if ref.is_registry:
        if settings is None:
            raise UserError(f"serving {ref.uri} needs the server's settings (its MLflow tracking server)")
        version = version or registry_version(ref, settings)
        ref = parse_model_uri(ref.pinned_uri(version))
        cache = Path(cache_dir or Path(settings.state_dir) / "serving" / "cache")
        folder = download(ref, cache, digest, settings)
    else:
        folder = ref.folder
    log.info("verifying %s", folder)
    verify_folder(folder)
    if not ref.is_registry and digest and manifest_digest(folder) != digest:
        raise UserError(f"{folder}: its manifest digest is not {digest}; refusing to load")
    digest = manifest_digest(folder)
    # bf16 on a GPU; float32 on CPU, where bf16 matmuls are slow and gain nothing (a quantized
    # folder keeps its stored dtypes)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, table, recipe = load_model_folder(folder, device=device, dtype=dtype, verify=False)
    require_finite(model, folder)
    kind = "bf16" if recipe is None else "fp8"
    model.eval()
    cfg = model.cfg
    index = SemanticIdIndex.build(table, cfg.codebook_size).to(device)
    mean = getattr(model.context, "profile_mean", None)
    fill = mean.detach().float().cpu().numpy() if mean is not None else np.zeros(cfg.num_profile_features, np.float32)
    shapes = shapes or ServingShapes()
    engine = _engine(model, index, device, replace(shapes, beam_widths=shapes.beam_widths or shapes.engine_widths))
    if engine is not None:
        def search(sids, mask, profile, beam, k):
            recs = engine.recommend(sids, mask, profile, beam=beam)
            return type(recs)(recs.items[:, :k], recs.scores[:, :k])
        widths = engine.widths
    else:
        search, widths = _reference_search(model, index), shapes.beam_widths
    backend = "engine" if engine is not None else "reference"
    return ServedModel(
        name=name or ref.name,
        version=str(version or ref.version or f"local-{digest[:12]}"),
        kind=kind, folder=folder, digest=digest, model=model, table=table, index=index, device=device,
        context_len=cfg.context_len, profile_features=list(cfg.profile_features), profile_fill=fill.astype(np.float32),
        backend=backend, search=search, recipe=recipe, beam_widths=widths, engine=engine,
    )
