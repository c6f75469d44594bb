"""compute_sensitivity for experts trained elsewhere: objects, folders, delta against a base, files written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, lora, tiny_llama  # noqa: E402

from sens_peft.config import SensitivityConfig  # noqa: E402
from sens_peft.sensitivity.calibrate import compute_sensitivity, run_calibration  # noqa: E402
from sens_peft.store import load_probe, load_sensitivity  # noqa: E402


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    base = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    peft_model = lora(tiny_llama(seed=0), init_random=True)
    peft_model.save_pretrained(root / "adapter")
    full = tiny_llama(seed=0)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full.save_pretrained(root / "full")
    return root, peft_model, full


def test_peft_object_and_adapter_folder_agree(expert):
    root, peft_model, _ = expert
    data = TokenData(n=8, length=10, seed=3)
    rec = compute_sensitivity(peft_model, data, calibration_samples=4, task="m", save_to=root / "out_obj")
    rec_path = compute_sensitivity(root / "adapter", data, calibration_samples=4, task="m",
                                   base_model=root / "base", save_to=root / "out_path")
    assert rec.tensor_names == rec_path.tensor_names
    torch.testing.assert_close(rec.tensor_scores, rec_path.tensor_scores, rtol=1e-5, atol=0)
    loaded = load_sensitivity(root / "out_path")
    assert loaded.metadata["mode"] == "after" and loaded.metadata["weight_source"] == "theta"
    assert loaded.metadata["num_samples"] == "4" and loaded.metadata["task"] == "m"
    probe = load_probe(root / "out_path", vocab_size=64)
    assert len(probe) == 8  # only 8 examples exist (probe_samples=16 asks for more)
    # the callback's pass is the same function
    ref = run_calibration(peft_model, data, SensitivityConfig(calibration_samples=4, task="m"))
    torch.testing.assert_close(ref.tensor_scores, rec.tensor_scores)


def test_batch_size_changes_estimator(expert):
    _, peft_model, _ = expert
    data = TokenData(n=8, length=10, seed=3)
    per_sample = compute_sensitivity(peft_model, data, calibration_samples=4)
    batched = compute_sensitivity(peft_model, data, calibration_samples=4, calibration_batch_size=4)
    assert batched.metadata["num_steps"] == "1" and batched.metadata["num_samples"] == "4"
    # |w * mean g| <= mean |w * g| per element, hence per tensor
    assert (batched.tensor_scores <= per_sample.tensor_scores * (1 + 1e-5)).all()
    assert not torch.allclose(batched.tensor_scores, per_sample.tensor_scores)


def test_full_model_folder_theta_and_delta(expert):
    root, _, full = expert
    data = TokenData(n=4, length=10, seed=4)
    theta = compute_sensitivity(root / "full", data, calibration_samples=2)
    assert theta.metadata["expert_type"] == "full"
    assert theta.groups == ["embed", "layers.0", "layers.1", "norm", "lm_head"]
    with pytest.raises(ValueError, match="base_model"):
        compute_sensitivity(full, data, calibration_samples=2, weight_source="delta")
    delta = compute_sensitivity(full, data, calibration_samples=2, weight_source="delta", base_model=root / "base")
    # task vector entries are ~0.01 N(0,1): much smaller than the weights
    assert (delta.tensor_scores < theta.tensor_scores).all() and (delta.tensor_scores > 0).all()
    # delta against itself is exactly zero
    zero = compute_sensitivity(full, data, calibration_samples=2, weight_source="delta", base_model=full)
    assert float(zero.tensor_scores.abs().max()) == 0.0


def test_loss_tokens_and_dataloader(expert):
    _, peft_model, _ = expert
    data = TokenData(n=6, length=10, seed=5)
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    labels = compute_sensitivity(peft_model, loader, calibration_samples=3)
    full = compute_sensitivity(peft_model, loader, calibration_samples=3, loss_tokens="full")
    assert labels.metadata["num_tokens"] == str(3 * 7)  # positions 3..9 are scored (the first 3 masked)
    assert full.metadata["num_tokens"] == str(3 * 9)
    assert not torch.allclose(labels.tensor_scores, full.tensor_scores)
    ragged = [{"input_ids": list(range(3, 3 + n))} for n in (4, 7, 5)]
    rec = compute_sensitivity(peft_model, ragged, calibration_samples=3, calibration_batch_size=3)
    assert rec.metadata["num_tokens"] == str(3 + 6 + 4)  # padding is not scored


def test_errors(expert, tmp_path):
    root, _, _ = expert
    with pytest.raises(ValueError, match="base_model"):
        compute_sensitivity(root / "adapter", TokenData(n=2))
    with pytest.raises(FileNotFoundError):
        compute_sensitivity(tmp_path / "missing", TokenData(n=2))
    with pytest.raises(ValueError, match="empty"):
        compute_sensitivity(tiny_llama(), [])
