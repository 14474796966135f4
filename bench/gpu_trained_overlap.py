"""FP8 vs bf16 top-10 overlap on a model trained on the GPU (issue 5's overlap target).

Synthesises interaction data, trains a preset on the GPU (bf16 autocast), quantizes it with
fp8_dynamic (calibration from training users), then runs onerec.engine.benchmark.trained_overlap
(engine and plain beam search, bf16 and FP8, on the validation users) and writes one JSON.

    PYTHONPATH=. python3 bench/gpu_trained_overlap.py --preset small --users 10000 --items 5000 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--beams", default="64,256")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script on small sizes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from onerec.data import calibration_requests, load_dataset, split_leave_last_out
    from onerec.engine.benchmark import trained_overlap
    from onerec.model import OneRecV2Config
    from onerec.quant import quantize_command
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
    quantized = quantize_command.run(str(work / "ckpt"), str(work / "calibration.parquet"), "fp8_dynamic",
                                     str(work / "quantized"))
    overlap = trained_overlap(work, [int(b) for b in args.beams.split(",")], k=10, device=args.device)
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
