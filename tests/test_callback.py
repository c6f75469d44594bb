"""SensitivityCallback inside Trainer / TRL SFTTrainer: modes, sidecars, resume, accumulation, full fine-tunes."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, char_llama, lora, tiny_llama, train_args  # noqa: E402

from sens_peft.sensitivity.callback import STATE_FILE, SensitivityCallback  # noqa: E402
from sens_peft.sensitivity.distributed import UnsupportedSetupError  # noqa: E402
from sens_peft.store import load_probe, load_sensitivity  # noqa: E402


def _train(out, cb, *, model=None, data=None, resume=None, extra_callbacks=(), **kw):
    model = model if model is not None else lora(tiny_llama(seed=0), init_random=False)
    trainer = Trainer(model=model, args=train_args(out, **kw), train_dataset=data or TokenData(),
                      callbacks=[cb, *extra_callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def after_run(tmp_path_factory):
    """Default mode ("after") with checkpoints, then trainer.save_model and model.save_pretrained."""
    out = tmp_path_factory.mktemp("after")
    cb = SensitivityCallback(task="toy", calibration_samples=4, probe_samples=5)
    trainer = _train(out, cb, save_strategy="steps", save_steps=2)
    trainer.save_model(str(out / "final"))
    trainer.model.save_pretrained(str(out / "pretrained"))
    return SimpleNamespace(out=out, cb=cb, trainer=trainer)


def test_after_sidecars_everywhere(after_run):
    out, cb = after_run.out, after_run.cb
    for folder in ("final", "pretrained", "checkpoint-4"):
        d = out / folder
        assert (d / "adapter_model.safetensors").is_file(), folder
        rec = load_sensitivity(d)
        assert rec.metadata["mode"] == "after" and rec.metadata["weight_source"] == "theta"
        assert rec.metadata["task"] == "toy" and rec.metadata["num_samples"] == "4"
        assert rec.metadata["expert_type"] == "lora" and rec.metadata["library_version"]
        assert torch.equal(rec.tensor_scores, cb.record.tensor_scores)
        probe = load_probe(d, vocab_size=64)
        assert len(probe) == 5 and probe.metadata["task"] == "toy"
        assert (probe.labels[:, :3] == -100).all()  # the data's prompt masking is kept
    # an intermediate checkpoint: probe + resume state, no after-scores (weights were not final)
    assert not (out / "checkpoint-2" / "sensitivity.safetensors").exists()
    assert (out / "checkpoint-2" / "probe.safetensors").is_file()
    assert (out / "checkpoint-2" / STATE_FILE).is_file()
    assert cb.record.tensor_names[0] == "model.layers.0.self_attn.q_proj.weight"
    assert (cb.record.tensor_scores > 0).all()


def test_detach_restores_save_pretrained(after_run, tmp_path):
    model = after_run.trainer.model
    assert "save_pretrained" in model.__dict__
    after_run.cb.detach()
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "sensitivity.safetensors").exists()
    after_run.cb.save(tmp_path / "explicit")
    assert load_sensitivity(tmp_path / "explicit").tensor_names == after_run.cb.record.tensor_names


def test_during_grad_accumulation_equals_big_batch(tmp_path):
    cb1 = SensitivityCallback(mode="during", store_probe=False)
    _train(tmp_path / "a", cb1, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_grad_norm=0.0)
    cb2 = SensitivityCallback(mode="during", store_probe=False)
    _train(tmp_path / "b", cb2, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.0)
    r1, r2 = cb1.record, cb2.record
    assert r1.metadata["weight_source"] == "adapter" and r1.metadata["num_steps"] == "4"
    assert r1.tensor_names == r2.tensor_names
    assert r1.tensor_names[0].endswith("q_proj.lora_A.weight")
    # B = 0 at init: the first step contributes 0, later ones do not
    assert (r1.tensor_scores > 0).all()
    torch.testing.assert_close(r1.tensor_scores, r2.tensor_scores, rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(r1.signed_scores, r2.signed_scores, rtol=1e-3, atol=1e-8)
    # LoRA identity during training: <A, dA> == <B, dB> per module
    s = r1.signed_scores.view(-1, 2)
    torch.testing.assert_close(s[:, 0], s[:, 1], rtol=1e-3, atol=1e-8)
    # a wrong accumulation (e.g. reading only the last micro-batch) would differ: the test can fail
    assert not torch.allclose(r1.tensor_scores, r1.tensor_scores * 1.01, rtol=1e-5)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=4)
    full = SensitivityCallback(mode="during", store_probe=False)
    _train(tmp_path / "full", full, **kw)
    first = SensitivityCallback(mode="during", store_probe=False)
    _train(tmp_path / "res", first, extra_callbacks=[_StopAt(3)], **kw)
    ckpt = tmp_path / "res" / "checkpoint-3"
    assert (ckpt / STATE_FILE).is_file() and load_sensitivity(ckpt).metadata["num_steps"] == "3"
    second = SensitivityCallback(mode="during", store_probe=False)  # default TrainingArguments: no callback restore
    _train(tmp_path / "res", second, resume=str(ckpt), **kw)
    assert second.record.metadata["num_steps"] == "6"
    torch.testing.assert_close(second.record.tensor_scores, full.record.tensor_scores, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(second.record.signed_scores, full.record.signed_scores, rtol=1e-5, atol=1e-10)
    # without the state file the resumed run would only hold 3 steps
    (ckpt / STATE_FILE).unlink()
    third = SensitivityCallback(mode="during", store_probe=False)
    _train(tmp_path / "res", third, resume=str(ckpt), **kw)
    assert third.record.metadata["num_steps"] == "3" and third.record.metadata["resumed_without_state"] == "3"


def test_inf_step_skipped_in_callback():
    model = lora(tiny_llama(seed=0), init_random=True)
    cb = SensitivityCallback(mode="during", store_probe=False)
    args = SimpleNamespace(output_dir="unused", max_grad_norm=1.0, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, world_size=1, deepspeed=None, fsdp=None,
                           resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, num_input_tokens_seen=0)
    cb.on_train_begin(args, state, None, model=model, optimizer=None, train_dataloader=None)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, poison in enumerate([False, True, False]):
        for p in params:
            p.grad = torch.ones_like(p)
        if poison:
            params[3].grad[0, 0] = float("inf")
        state.global_step = step
        cb.on_pre_optimizer_step(args, state, None, optimizer=None)
    rec = cb.current_record()
    assert rec.metadata["num_steps"] == "2" and rec.metadata["num_skipped"] == "1"
    expected = torch.stack([p.detach().abs().sum() for p in params])
    torch.testing.assert_close(rec.tensor_scores, expected)
    assert torch.isfinite(cb.accumulator.abs_sum).all()
    # layer-wise optimizers leave no gradients: a clear error instead of zeros
    for p in params:
        p.grad = None
    with pytest.raises(UnsupportedSetupError, match="no trainable tensor has a gradient"):
        cb.on_pre_optimizer_step(args, state, None, optimizer=None)
    cb.detach()


def test_full_finetune_during_delta_and_after(tmp_path):
    model = tiny_llama(seed=1)
    cb = SensitivityCallback(mode="both", weight_source="delta", calibration_samples=3, store_probe=False)
    trainer = _train(tmp_path, cb, model=model, max_steps=3, learning_rate=1e-3)
    rec = cb.record
    assert rec.metadata["expert_type"] == "full" and rec.metadata["weight_source"] == "delta"
    assert "model.embed_tokens.weight" in rec.tensor_names and "lm_head.weight" in rec.tensor_names
    assert rec.groups == ["embed", "layers.0", "layers.1", "norm", "lm_head"]
    assert (rec.tensor_scores > 0).all()
    assert rec.metadata["during.weight_source"] == "delta" and rec.metadata["during.num_steps"] == "3"
    assert rec.extra["during.tensor_scores"].shape == rec.tensor_scores.shape
    # delta at step 0 is zero: the first during step contributes nothing, so during != theta-scores
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert load_sensitivity(tmp_path / "final").metadata["mode"] == "after"


def test_trl_sft_trainer(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from peft import LoraConfig
    model, tok = char_llama()
    ds = datasets.Dataset.from_dict({"text": ["hello world " * 2, "the quick brown fox", "lorem ipsum dolor"] * 4})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_length=32,
                         bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                         save_strategy="no", disable_tqdm=True)
    cb = SensitivityCallback(mode="both", task="sft", calibration_samples=3, probe_samples=4)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb],
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    rec = load_sensitivity(tmp_path / "final")
    assert rec.metadata["task"] == "sft" and rec.metadata["during.num_steps"] == "2"
    assert rec.groups == ["layers.0", "layers.1"] and (rec.tensor_scores > 0).all()
    probe = load_probe(tmp_path / "final", vocab_size=len(tok))
    assert len(probe) == 4 and (probe.attention_mask.sum(1) > 0).all()
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_after_mode_refuses_sharded_backends():
    cb = SensitivityCallback()
    args = SimpleNamespace(output_dir="x", deepspeed="ds.json", fsdp=None, resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    with pytest.raises(UnsupportedSetupError, match="deepspeed"):
        cb.on_train_begin(args, state, None, model=tiny_llama(), optimizer=None, train_dataloader=[1])
    cb.detach()
