"""Faults during training: overflowing (inf) steps inside a real Trainer run, resume from every checkpoint, and a
crash in the end-of-training calibration pass (the adapter must survive, no half sidecar, a clear ERROR)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, lora, tiny_llama, train_args  # noqa: E402

from sens_peft.sensitivity.accumulator import SensitivityAccumulator  # noqa: E402
from sens_peft.sensitivity.callback import STATE_FILE, SensitivityCallback  # noqa: E402
from sens_peft.store import load_sensitivity  # noqa: E402
from sens_peft.validation import FINGERPRINT_KEY  # noqa: E402


def _trainer(out, callbacks, *, model=None, **kw):
    model = model if model is not None else lora(tiny_llama(seed=0), init_random=True)
    return Trainer(model=model, args=train_args(out, **kw), train_dataset=TokenData(), callbacks=list(callbacks))


class _Poison(TrainerCallback):
    """Before SensitivityCallback: an fp16-overflow-like step, one gradient entry becomes inf."""

    def __init__(self, steps):
        self.steps, self.saved = set(steps), None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            p = next(p for p in model.parameters() if p.requires_grad and p.grad is not None)
            self.saved = (p, p.grad[0, 0].clone())
            p.grad[0, 0] = float("inf")


class _Repair(TrainerCallback):
    """After SensitivityCallback: what a GradScaler does for the optimizer (here: undo the poison so the weights
    stay finite and the run goes on)."""

    def __init__(self, poison):
        self.poison = poison

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.poison.saved is not None:
            p, value = self.poison.saved
            p.grad[0, 0] = value
            self.poison.saved = None


def test_inf_steps_skipped_in_trainer_run(tmp_path):
    poison = _Poison(steps={1, 3})
    cb = SensitivityCallback(mode="during", store_probe=False)
    clean = SensitivityCallback(mode="during", store_probe=False)
    trainer = _trainer(tmp_path / "p", [poison, cb, _Repair(poison)], max_steps=5, max_grad_norm=0.0)
    trainer.train()
    _trainer(tmp_path / "c", [clean], max_steps=5, max_grad_norm=0.0).train()
    rec = cb.record
    assert rec.metadata["num_steps"] == "3" and rec.metadata["num_skipped"] == "2"
    assert torch.isfinite(rec.tensor_scores).all() and (rec.tensor_scores > 0).all()
    # the skipped steps are dropped, not averaged in as zeros or inf: the scores differ from the clean 5-step run
    # (same weights trajectory, since the repair restored the gradients) only by which steps are in the mean
    assert clean.record.metadata["num_steps"] == "5"
    trainer.save_model(str(tmp_path / "final"))
    saved = load_sensitivity(tmp_path / "final")
    assert torch.equal(saved.tensor_scores, rec.tensor_scores)
    # the base fingerprint travels with the scores (a merge onto another base refuses them)
    assert json.loads(saved.metadata[FINGERPRINT_KEY])["vocab_size"] == 64


def test_inf_step_clean_run_reference(tmp_path):
    """With skipped steps the mean is over the remaining steps: equal to a clean run measured every other step."""
    poison = _Poison(steps={1, 3})
    cb = SensitivityCallback(mode="during", store_probe=False)
    _trainer(tmp_path / "p", [poison, cb, _Repair(poison)], max_steps=4, max_grad_norm=0.0).train()
    ref = SensitivityCallback(mode="during", store_probe=False, every_n_steps=2)  # measures steps 0 and 2
    _trainer(tmp_path / "r", [ref], max_steps=4, max_grad_norm=0.0).train()
    assert ref.record.metadata["num_steps"] == "2"
    torch.testing.assert_close(cb.record.tensor_scores, ref.record.tensor_scores, rtol=1e-6, atol=1e-12)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    cb = SensitivityCallback(mode="during", store_probe=False)
    _trainer(out, [cb], max_steps=6, save_strategy="steps", save_steps=2).train()
    return out, cb


@pytest.mark.parametrize("step", [2, 4, 6])
def test_resume_from_every_checkpoint(full_run, tmp_path, step):
    out, full = full_run
    ckpt = out / f"checkpoint-{step}"
    assert (ckpt / STATE_FILE).is_file()
    assert load_sensitivity(ckpt).metadata["num_steps"] == str(step)
    # the usual layout: the interrupted run's output_dir holds the checkpoints up to the crash
    run = tmp_path / "run"
    run.mkdir()
    for k in range(2, step + 1, 2):
        shutil.copytree(out / f"checkpoint-{k}", run / f"checkpoint-{k}")
    resumed = SensitivityCallback(mode="during", store_probe=False)
    trainer = _trainer(run, [resumed], max_steps=6, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=str(run / f"checkpoint-{step}"))
    assert "resumed_without_state" not in resumed.record.metadata
    if step == 6:
        # transformers 5.24 runs one more optimizer step when resuming from a run's final checkpoint
        # (global_step 7 > max_steps 6); the sums must still continue from the 6 stored steps
        assert resumed.record.metadata["num_steps"] == str(trainer.state.global_step)
        assert trainer.state.global_step in (6, 7)
        if trainer.state.global_step == 7:
            return
    assert resumed.record.metadata["num_steps"] == "6"
    torch.testing.assert_close(resumed.record.tensor_scores, full.record.tensor_scores, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(resumed.record.signed_scores, full.record.signed_scores, rtol=1e-5, atol=1e-10)


def test_crash_in_calibration_pass_keeps_adapter(tmp_path, monkeypatch, caplog):
    calls = []
    original = SensitivityAccumulator.update

    def crash_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SensitivityAccumulator, "update", crash_on_second)
    cb = SensitivityCallback(task="toy", calibration_samples=4, probe_samples=3)
    trainer = _trainer(tmp_path, [cb], max_steps=2, save_strategy="steps", save_steps=2)
    with caplog.at_level(logging.ERROR, logger="sens_peft"):
        trainer.train()  # training itself succeeded: it must not raise
    assert len(calls) == 2  # the pass really was interrupted mid-way
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "no ERROR log line about the missing sensitivity"
    text = "\n".join(r.getMessage() for r in errors)
    assert "compute_sensitivity" in text and "simulated" in text
    assert cb.record is None
    monkeypatch.undo()
    trainer.save_model(str(tmp_path / "final"))
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "sensitivity.safetensors").exists()
    assert not (tmp_path / "checkpoint-2" / "sensitivity.safetensors").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no half-written file anywhere
