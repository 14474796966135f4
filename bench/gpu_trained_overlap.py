"""FP8 vs bf16 top-10 overlap on a model trained on the GPU.

Synthesises interaction data, trains a preset on the GPU (bf16 autocast), quantizes it with
fp8_dynamic (calibration from training users), then runs `trained_overlap` (engine and plain beam
search, bf16 and FP8, on the validation users) and writes one JSON. `bench/gpu_bench.py --trained
DIR` runs `trained_overlap` on an existing folder.

    PYTHONPATH=. python3 bench/gpu_trained_overlap.py --preset small --users 10000 --items 5000 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger(__name__)


def trained_overlap(folder: Path, beam_sizes: list[int], k: int = 10, batch_size: int = 256, device=None,
                    moe_kernel: str | None = None) -> dict:
    """FP8 vs bf16 top-k overlap on a trained checkpoint's real validation histories.

    `folder` holds ckpt/ (onerec-fp8 train), quantized/ (onerec-fp8 quantize) and data/ (its data
    folder). Compares the FP8 engine on the quantized model with the bf16 engine and with the
    plain bf16 search, and the plain search on the quantized model (what the quality gate runs) with plain
    bf16; also recall@k of each against the validation targets and, for the FP8 engines, the
    quality gate's paired interval of the relative recall@k change against the bf16 engine and its
    non-inferiority verdict at the gate's default margin. `moe_kernel`: the engines' MoE op
    (EngineConfig.moe_kernel; None: the model's MoE module).
    """
    import numpy as np
    import torch

    from bench.models import overlap
    from onerec.data import iter_batches, load_dataset, split_leave_last_out
    from onerec.engine.engine import Engine, EngineConfig
    from onerec.evaluate import per_user_metrics, ranking_metrics
    from onerec.generate import beam_search
    from onerec.quant.export import load_model_folder, recipe_name
    from onerec.quant.gate_stats import non_inferiority, paired_relative_change
    from onerec.quant.quality_gate import QualityGateConfig
    from onerec.semantic_ids import SemanticIdIndex

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, table, _ = load_model_folder(folder / "ckpt", device=device, dtype=torch.bfloat16)
    qmodel, _, recipe = load_model_folder(folder / "quantized", device=device)
    cfg = model.cfg
    requests = split_leave_last_out(load_dataset(folder / "data"), max_history=cfg.context_len).valid
    targets = requests["target"].to_numpy(np.int64)
    index = SemanticIdIndex.build(table, cfg.codebook_size).to(device)
    out: dict = {"model": f"d_model {cfg.d_model}, {cfg.n_layers} blocks, codebook {cfg.codebook_size}, "
                          f"context {cfg.context_len}, {len(table)} items",
                 "users": len(requests), "k": k, "recipe": recipe_name(recipe) or "?", "moe_kernel": moe_kernel,
                 "recall_margin": QualityGateConfig().max_relative_recall_drop, "by_beam": {}}
    for beam in beam_sizes:
        # graphs off: the histories' lengths vary by batch; graphs do not change the numerics
        engine_cfg = EngineConfig(beam_size=beam, k=k, cuda_graphs=False, moe_kernel=moe_kernel)
        runs = {
            "bf16-eager": lambda b, beam=beam: beam_search(model, b.history_sids, b.history_mask, index, b.profile,
                                                            beam_size=beam, k=k),
            "fp8-eager": lambda b, beam=beam: beam_search(qmodel, b.history_sids, b.history_mask, index, b.profile,
                                                           beam_size=beam, k=k),
            "bf16-engine": Engine(model, index, engine_cfg).recommend,
            "fp8-engine": Engine(qmodel, index, engine_cfg).recommend,
        }
        items = {name: [] for name in runs}
        for batch in iter_batches(requests, table, cfg.context_len, cfg.profile_features, batch_size,
                                  categorical=cfg.categorical_features):
            b = batch.to(device)
            for name, fn in runs.items():
                recs = fn(b) if "eager" in name else fn(b.history_sids, b.history_mask, b.profile)
                items[name].append(recs.items.cpu())
        items = {name: torch.cat(v) for name, v in items.items()}
        row = {
            "overlap_fp8_engine_vs_bf16_engine": overlap(items["fp8-engine"], items["bf16-engine"]),
            "overlap_fp8_engine_vs_bf16_eager": overlap(items["fp8-engine"], items["bf16-eager"]),
            "overlap_bf16_engine_vs_bf16_eager": overlap(items["bf16-engine"], items["bf16-eager"]),
            "overlap_fp8_eager_vs_bf16_eager": overlap(items["fp8-eager"], items["bf16-eager"]),
        }
        for name, v in items.items():
            row[f"recall@{k}_{name}"] = ranking_metrics(v.numpy(), targets, k)[f"recall@{k}"]
        bf16_hits = per_user_metrics(items["bf16-engine"].numpy(), targets, k)[0]
        interval = paired_relative_change(bf16_hits, per_user_metrics(items["fp8-engine"].numpy(), targets, k)[0])
        row[f"recall@{k}_change_fp8-engine_vs_bf16_engine"] = {
            **interval, "verdict": non_inferiority(interval, out["recall_margin"])}
        out["by_beam"][str(beam)] = row
        log.info("trained checkpoint, beam %d: %s", beam, row)
    for key in next(iter(out["by_beam"].values()), {}):
        if key.startswith("overlap"):
            out[f"{key}_min"] = min(row[key] for row in out["by_beam"].values())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--beams", default="64,256")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script on small sizes")
    parser.add_argument("--moe-kernel", default=None, choices=["torch", "triton"],
                        help="the engines' MoE op (MoE presets; default: the model's MoE module)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from onerec.data import calibration_requests, load_dataset, split_leave_last_out
    from onerec.model import OneRecV2Config
    from onerec.quant.export import quantize_folder
    from onerec.synth import synthesize
    from onerec.train import train

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="trained_overlap_"))
    synth = synthesize(work / "data", seed=0, users=args.users, items=args.items)
    trained = train(work / "data", preset=args.preset, out=work / "ckpt", epochs=args.epochs, seed=0,
                    device=args.device)
    cfg = OneRecV2Config.from_preset(args.preset)
    split = split_leave_last_out(load_dataset(work / "data"), max_history=cfg.context_len)
    calibration_requests(split, n=512, seed=0).to_parquet(work / "calibration.parquet", index=False)
    quantized = quantize_folder(work / "ckpt", work / "calibration.parquet", "fp8_dynamic", work / "quantized")
    overlap = trained_overlap(work, [int(b) for b in args.beams.split(",")], k=10, device=args.device,
                              moe_kernel=args.moe_kernel)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
        "command": " ".join(["python3", *sys.argv]), "preset": args.preset, "synth": synth,
        "train": {k: v for k, v in trained.items() if k in ("epochs_run", "best_epoch", "valid_losses", "seconds")},
        "quantize": {k: v for k, v in quantized.items() if "ratio" in k or k in ("quantized_layers",)},
        "overlap": overlap, "seconds": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"trained_overlap_{args.preset}_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
