"""SensitivityCallback adds its per-group scores to the Trainer's logs, so every ``report_to`` integration sees them."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import integration_utils

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, lora, tiny_llama, train_args  # noqa: E402

from sens_peft.sensitivity.callback import SensitivityCallback  # noqa: E402
from sens_peft.store import load_sensitivity  # noqa: E402


class Recorder(TrainerCallback):
    """Stands in for a ``report_to`` integration: keeps a copy of every ``logs`` dict it is given."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, copy.deepcopy(logs)))


def _sens(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if k.startswith("sensitivity/")}


def _run(tmp_path, monkeypatch, cb, **kw):
    """Train with the recorder registered as an integration (so the Trainer puts it before the user's callbacks)."""
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    args = train_args(tmp_path / "run", logging_steps=1, **kw)
    args.report_to = ["recorder"]
    trainer = Trainer(model=lora(tiny_llama(seed=0), init_random=False), args=args, train_dataset=TokenData(),
                      callbacks=[cb])
    recorder = next(c for c in trainer.callback_handler.callbacks if isinstance(c, Recorder))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    return trainer, recorder, load_sensitivity(tmp_path / "final")


def test_during_running_and_final_scores_reach_integrations(tmp_path, monkeypatch):
    cb = SensitivityCallback(mode="during", store_probe=False)
    trainer, recorder, rec = _run(tmp_path, monkeypatch, cb)
    order = trainer.callback_handler.callbacks
    assert order.index(cb) < order.index(recorder)  # moved before the integration so that it sees the entries
    expected = {f"sensitivity/{g}": v for g, v in rec.group_dict().items()}
    assert set(expected) == {"sensitivity/layers.0", "sensitivity/layers.1"}
    running = [(step, _sens(logs)) for step, logs in recorder.logs if "loss" in logs]
    assert [step for step, _ in running] == [1, 2, 3, 4]
    # B = 0 at init: the first step's |w * g| is exactly 0 for both LoRA factors; later steps are not
    assert all(v == 0.0 for v in running[0][1].values())
    assert all(v > 0.0 for v in running[-1][1].values())
    assert running[-1][1] == expected  # after the last step the running mean is the final score
    final = [logs for _, logs in recorder.logs if logs and logs == _sens(logs)]
    assert len(final) == 1 and final[0] == expected  # logged once after training, equal to the sidecar
    assert {k: v for k, v in trainer.state.log_history[-1].items() if k != "step"} == expected


def test_after_scores_logged_once_equal_sidecar(tmp_path, monkeypatch):
    cb = SensitivityCallback(mode="both", calibration_samples=3, store_probe=False)
    trainer, recorder, rec = _run(tmp_path, monkeypatch, cb, max_steps=2)
    with_scores = [logs for _, logs in recorder.logs if _sens(logs)]
    # both mode: running during-values at each training log, then the final after-scores once
    assert all(set(_sens(logs)) == {"sensitivity/during/layers.0", "sensitivity/during/layers.1"}
               for logs in with_scores[:-1])
    final = _sens(with_scores[-1])
    assert {k: v for k, v in final.items() if "/during/" not in k} == {
        f"sensitivity/{g}": v for g, v in rec.group_dict().items()}
    during = dict(zip(json.loads(rec.metadata["during.groups"]), rec.extra["during.group_scores"].tolist()))
    assert {k: v for k, v in final.items() if "/during/" in k} == {
        f"sensitivity/during/{g}": v for g, v in during.items()}
    assert sum(1 for logs in trainer.state.log_history if "sensitivity/layers.0" in logs) == 1


def test_callback_added_after_init(tmp_path, monkeypatch):
    """trainer.add_callback(cb) gets no on_init_end: on_train_begin finds the handler and reorders (mid-loop)."""
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    args = train_args(tmp_path / "run", logging_steps=2)
    args.report_to = ["recorder"]
    trainer = Trainer(model=lora(tiny_llama(seed=0), init_random=False), args=args, train_dataset=TokenData())
    cb = SensitivityCallback(mode="during", store_probe=False)
    trainer.add_callback(cb)
    recorder = next(c for c in trainer.callback_handler.callbacks if isinstance(c, Recorder))
    trainer.train()
    order = trainer.callback_handler.callbacks
    assert order.index(cb) < order.index(recorder)
    assert sum(isinstance(c, SensitivityCallback) for c in order) == 1
    steps = [step for step, logs in recorder.logs if "loss" in logs and _sens(logs)]
    assert steps == [2, 4]
    assert recorder.logs[-1][1] == {f"sensitivity/{g}": v for g, v in cb.record.group_dict().items()}


def test_flag_off_leaves_logs_and_order_alone(tmp_path, monkeypatch):
    cb = SensitivityCallback(mode="during", store_probe=False, log_scores=False)
    trainer, recorder, rec = _run(tmp_path, monkeypatch, cb)
    assert recorder.logs and not any(_sens(logs) for _, logs in recorder.logs)
    assert not any(_sens(logs) for logs in trainer.state.log_history)
    order = trainer.callback_handler.callbacks
    assert order.index(cb) > order.index(recorder)
    assert (rec.group_scores > 0).all()  # scoring itself is unaffected


def test_tensorboard_event_files(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: the event-file read-back needs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))  # transformers 5 reads it from here
    cb = SensitivityCallback(mode="during", store_probe=False)
    args = train_args(tmp_path / "run", logging_steps=1, report_to="tensorboard")
    trainer = Trainer(model=lora(tiny_llama(seed=0), init_random=False), args=args, train_dataset=TokenData(),
                      callbacks=[cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    rec = load_sensitivity(tmp_path / "final")
    events = [EventAccumulator(str(p.parent)).Reload() for p in logdir.rglob("events.out.tfevents.*")]
    assert events
    for group, value in rec.group_dict().items():
        tag = f"train/sensitivity/{group}"  # the integrations prefix non-eval keys with "train/"
        scalars = [s for acc in events if tag in acc.Tags()["scalars"] for s in acc.Scalars(tag)]
        assert [s.step for s in scalars][:4] == [1, 2, 3, 4]
        assert scalars[-1].value == pytest.approx(value, rel=1e-6)
        assert torch.isfinite(torch.tensor([s.value for s in scalars])).all()
    images = [img for acc in events if "sensitivity/alpha" in acc.Tags()["images"]
              for img in acc.Images("sensitivity/alpha")]
    assert len(images) == 1 and images[0].step == 4 and images[0].width > 0 and images[0].height > 0
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_flag_off(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: the event-file read-back needs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    cb = SensitivityCallback(mode="during", store_probe=False, log_scores=False)
    args = train_args(tmp_path / "run", logging_steps=1, report_to="tensorboard")
    Trainer(model=lora(tiny_llama(seed=0), init_random=False), args=args, train_dataset=TokenData(),
            callbacks=[cb]).train()
    tags = [EventAccumulator(str(p.parent)).Reload().Tags() for p in logdir.rglob("events.out.tfevents.*")]
    assert any("train/loss" in t["scalars"] for t in tags)
    assert not any("sensitivity" in name for t in tags for name in t["scalars"] + t["images"])
