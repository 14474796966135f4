"""Training and offline evaluation: the done-criterion in small, determinism, CLI error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onerec.checkpoint import load_checkpoint
from onerec.manifest import verify_manifest
from onerec_fp8 import cli


def run_cli(capsys, *argv) -> tuple[int, dict | None, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    out = captured.out.strip()
    return code, (json.loads(out) if out else None), captured.err


@pytest.mark.slow
def test_trained_tiny_beats_popularity_twice(trained_tiny, capsys):
    """The done-criterion in small: train `tiny` on synth data, eval recall@10 >= 2x popularity."""
    verify_manifest(trained_tiny.checkpoint_dir)
    metrics = json.loads((trained_tiny.checkpoint_dir / "train_metrics.json").read_text())
    assert metrics["valid_losses"][metrics["best_epoch"] - 1] == min(metrics["valid_losses"])
    assert metrics["train_losses"][-1] < metrics["train_losses"][0]
    code, result, _ = run_cli(
        capsys, "eval", "--checkpoint", trained_tiny.checkpoint_dir, "--data", trained_tiny.data_dir,
        "--k", 10, "--beam", 32, "--max-users", 300,
    )
    assert code == 0
    assert result["num_users"] == 300
    assert 0 < result["popularity_recall@10"] < 1
    assert result["recall@10"] >= 2 * result["popularity_recall@10"], result
    assert result["ndcg@10"] >= 2 * result["popularity_ndcg@10"], result
    assert result["ndcg@10"] <= result["recall@10"]


def test_evaluate_api_and_metrics(trained_tiny):
    from onerec.evaluate import evaluate, ranking_metrics, recommend

    model, table = load_checkpoint(trained_tiny.checkpoint_dir)
    requests = trained_tiny.split.test.iloc[:40]
    items, scores = recommend(model, table, requests, k=5, beam_size=8, batch_size=16, device="cpu")
    assert items.shape == scores.shape == (40, 5)
    assert ((table[items] >= 0).all(-1)).all()  # only known items
    assert (np.diff(scores, axis=1) <= 0).all()
    result = evaluate(model, table, requests, k=5, beam_size=8, batch_size=16, device="cpu")
    assert result == ranking_metrics(items, requests["target"].to_numpy(), 5)
    # Hand-checked metric values: hit at rank 0, hit at rank 2, miss.
    m = ranking_metrics(np.array([[7, 1, 2], [1, 2, 7], [1, 2, 3]]), np.array([7, 7, 7]), 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / 3)


def test_training_is_deterministic_given_the_seed(tmp_path):
    from onerec.synth import synthesize
    from onerec.train import train

    synthesize(tmp_path / "data", seed=3, users=60, items=40, interactions_per_user=12, topics=4)
    runs = [
        train(tmp_path / "data", "tiny", tmp_path / f"ck{i}", epochs=1, seed=seed, batch_size=64, progress=False)
        for i, seed in enumerate((7, 7, 8))
    ]
    weights = [verify_manifest(r["checkpoint"])["model.safetensors"]["sha256"] for r in runs]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert runs[0]["train_losses"] == runs[1]["train_losses"]
    model, table = load_checkpoint(runs[0]["checkpoint"])
    assert model.cfg.profile_features == ["age", "income_k", "night_share", "activity"]
    assert float(model.context.profile_std.min()) > 0


def test_moe_preset_trains_with_its_load_balancing_loss(tmp_path):
    from onerec.model import MoE
    from onerec.synth import synthesize
    from onerec.train import train

    synthesize(tmp_path / "data", seed=4, users=50, items=40, interactions_per_user=10, topics=4)
    result = train(tmp_path / "data", "tiny-moe", tmp_path / "ck", epochs=2, seed=0, batch_size=64, progress=False)
    assert result["epochs_run"] == 2 and all(np.isfinite(result["train_losses"]))
    model, _ = load_checkpoint(result["checkpoint"])
    moe_blocks = [b for b in model.blocks if isinstance(b.ffn, MoE)]
    assert len(moe_blocks) == 2  # tiny-moe: blocks 1 and 2


def test_cli_error_paths(tmp_path, capsys):
    missing = tmp_path / "nope"
    for argv in (
        ("train", "--data", missing, "--preset", "tiny", "--out", tmp_path / "ck"),
        ("eval", "--checkpoint", tmp_path / "ck", "--data", missing),
        ("eval", "--checkpoint", missing, "--data", tmp_path),  # data folder without interactions
    ):
        code, result, err = run_cli(capsys, *argv)
        assert code == 1 and result is None
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
        assert str(missing) in lines[0] or "interactions" in lines[0]
    code, _, err = run_cli(capsys, "train", "--data", tmp_path, "--preset", "3b", "--out", tmp_path / "ck")
    assert code == 1 and "unknown preset" in err
    code, _, err = run_cli(capsys, "data", "synth", "--out", tmp_path / "d", "--users", 0)
    assert code == 1 and "positive" in err


def test_eval_refuses_existing_out_and_bad_sources(trained_tiny, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", trained_tiny.data_dir, "--out", trained_tiny.checkpoint_dir)
    assert code == 1 and "already exists" in err
    code, _, err = run_cli(capsys, "eval", "--quantized", tmp_path / "missing-q", "--data", trained_tiny.data_dir)
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_resolve_device_rules():
    import torch

    from onerec.devices import resolve_device
    from onerec.errors import UserError

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match="auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda:0")
