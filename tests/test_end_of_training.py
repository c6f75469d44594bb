"""MergeOnTrainEnd: merging at the end of training equals merge_adapters / merge_models afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, lora, tiny_llama, train_args  # noqa: E402

from sens_peft import MergeOnTrainEnd, SensitivityCallback, merge_adapters, merge_models  # noqa: E402
from sens_peft.io import MergeError  # noqa: E402


def _train(out, model, callbacks, seed):
    trainer = Trainer(model=model, args=train_args(out, max_steps=3, lr_scheduler_type="linear"),
                      train_dataset=TokenData(seed=seed), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def earlier_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("eot")
    folders = []
    for i in range(2):
        trainer = _train(root / f"run{i}", lora(tiny_llama(seed=0)), [SensitivityCallback(calibration_samples=3,
                                                                                        probe_samples=4)], seed=i)
        trainer.save_model(str(root / f"expert{i}"))
        folders.append(root / f"expert{i}")
    return root, folders


def _tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("kw", [dict(method="ties", density=0.5, sens="task+cross"), dict(method="task_arithmetic", sens=None),
                                dict()])  # the default: probe-fitted RegMean (every expert has Grams and probes)
def test_end_of_training_merge_equals_merge_afterwards(earlier_experts, kw):
    root, folders = earlier_experts
    tag = kw.get("method", "default")
    eot = MergeOnTrainEnd(folders, root / f"eot_{tag}", **kw)
    trainer = _train(root / f"run_new_{tag}", lora(tiny_llama(seed=0)),
                     [SensitivityCallback(calibration_samples=3, probe_samples=4), eot], seed=7)
    assert eot.report is not None and (root / f"eot_{tag}" / "adapter_model.safetensors").is_file()
    # the trained model is untouched: only its own adapter, still the active one
    assert list(trainer.model.peft_config) == ["default"] and trainer.model.active_adapter == "default"
    trainer.save_model(str(root / f"new_{tag}"))

    later = merge_adapters(tiny_llama(seed=0), [root / f"new_{tag}", *folders], save_to=root / f"later_{tag}", **kw)
    a, b = _tensors(root / f"eot_{tag}"), _tensors(root / f"later_{tag}")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(eot.report.coefficients.values, later.coefficients.values)
    assert eot.report.config.method == later.config.method == kw.get("method", "probe_fit")


def test_end_of_training_full_finetune(tmp_path):
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    experts = []
    for i in range(2):
        model = tiny_llama(seed=0)
        trainer = _train(tmp_path / f"run{i}", model, [SensitivityCallback(calibration_samples=2, probe_samples=2)], i)
        trainer.save_model(str(tmp_path / f"full{i}"))
        experts.append(tmp_path / f"full{i}")
    eot = MergeOnTrainEnd(experts, tmp_path / "eot", base_model=tmp_path / "base", method="dare_ties",
                          density=0.7, sens="task")
    trainer = _train(tmp_path / "run_new", tiny_llama(seed=0),
                     [SensitivityCallback(calibration_samples=2, probe_samples=2), eot], seed=5)
    trainer.save_model(str(tmp_path / "new"))
    merge_models(tmp_path / "base", [tmp_path / "new", *experts], tmp_path / "later", method="dare_ties",
                 density=0.7, sens="task")
    a, b = load_file(str(tmp_path / "eot" / "model.safetensors")), load_file(str(tmp_path / "later" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_merge_on_train_end_needs_sensitivity_first(earlier_experts, tmp_path):
    _, folders = earlier_experts
    eot = MergeOnTrainEnd(folders, tmp_path / "m", sens="task")
    with pytest.raises(MergeError, match=r"\*before\* MergeOnTrainEnd"):
        _train(tmp_path / "r", lora(tiny_llama(seed=0)), [eot], seed=3)
    assert not (tmp_path / "m").exists()


def test_missing_expert_folder(tmp_path):
    with pytest.raises(MergeError, match="do not exist"):
        MergeOnTrainEnd([tmp_path / "nope"], tmp_path / "out")
