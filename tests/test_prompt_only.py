"""Prompt-only data (TRL's GRPOTrainer) and rows without labels: the probe and the after pass never crash a save."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import char_llama, lora, tiny_llama  # noqa: E402

from sens_peft.config import SensitivityConfig  # noqa: E402
from sens_peft.errors import DataError, SensPeftError  # noqa: E402
from sens_peft.sensitivity.calibration_data import build_probe, unusable_data_reason  # noqa: E402
from sens_peft.sensitivity.callback import SensitivityCallback  # noqa: E402
from sens_peft.store import load_probe, load_sensitivity  # noqa: E402

# The rows and the collator GRPOTrainer hands its dataloader: untokenised prompts, collated by the identity.
PROMPTS = [{"prompt": f"count to {i}"} for i in range(8)]
CHATS = [{"prompt": [{"role": "user", "content": f"count to {i}"}]} for i in range(8)]


def _identity(features):
    return features


def _args(out):
    return SimpleNamespace(output_dir=str(out), max_grad_norm=1.0, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, world_size=1, deepspeed=None, fsdp=None,
                           resume_from_checkpoint=None)


def _begin(cb, model, loader, out):
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, num_input_tokens_seen=0)
    cb.on_train_begin(_args(out), state, None, model=model, optimizer=None, train_dataloader=loader)
    return state


@pytest.mark.parametrize("rows", [PROMPTS, CHATS], ids=["text", "conversational"])
def test_build_probe_names_the_problem(rows):
    loader = DataLoader(rows, batch_size=2, collate_fn=_identity)
    with pytest.raises(DataError, match=r"keys \['prompt'\].*no 'input_ids'.*GRPOTrainer"):
        build_probe(loader, SensitivityConfig(probe_samples=3))
    assert "prompt-only" in unusable_data_reason(loader, SensitivityConfig())


def test_during_mode_saves_without_probe(tmp_path, caplog):
    """The failing GRPO case: mode='during', then save_pretrained. Scores are written, the probe is skipped."""
    model = lora(tiny_llama(seed=0), init_random=True)
    cb = SensitivityCallback(mode="during", probe_samples=4)
    with caplog.at_level(logging.WARNING, logger="sens_peft.sensitivity.callback"):
        state = _begin(cb, model, DataLoader(PROMPTS, batch_size=2, collate_fn=_identity), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no probe.safetensors" in warnings[0] and "probes=" in warnings[0]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    cb.on_pre_optimizer_step(_args(tmp_path), state, None, optimizer=None)
    model.save_pretrained(str(tmp_path / "final"))  # raised "dictionary update sequence element #0 ..." before
    rec = load_sensitivity(tmp_path / "final")
    torch.testing.assert_close(rec.tensor_scores, torch.stack([0.5 * p.detach().abs().sum() for p in params]))
    assert not (tmp_path / "final" / "probe.safetensors").exists()
    cb.detach()


@pytest.mark.parametrize("mode", ["after", "both"])
def test_after_pass_refused_at_train_begin(tmp_path, mode):
    cb = SensitivityCallback(mode=mode)
    loader = DataLoader(PROMPTS, batch_size=2, collate_fn=_identity)
    with pytest.raises(SensPeftError, match=rf"mode='{mode}'.*prompt-only.*Use mode='during'"):
        _begin(cb, lora(tiny_llama(seed=0)), loader, tmp_path)
    cb.detach()


def test_tokenised_rows_without_labels_through_identity_collator(tmp_path):
    """Tokenised rows a trainer collates by the identity are padded by the library; labels = the non-pad tokens."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 64, (int(n),), generator=g).tolist()} for n in (5, 7, 6, 4)]
    loader = DataLoader(rows, batch_size=2, collate_fn=_identity)
    config = SensitivityConfig(probe_samples=4)
    assert unusable_data_reason(loader, config) is None
    probe = build_probe(loader, config, pad_id=0)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    for j, i in enumerate(order):
        n = len(rows[i]["input_ids"])
        assert probe.input_ids[j, :n].tolist() == rows[i]["input_ids"]
        assert probe.attention_mask[j].sum() == n and (probe.labels[j, n:] == -100).all()
        assert probe.labels[j, :n].tolist() == rows[i]["input_ids"]
    # and the after pass accepts them too
    cb = SensitivityCallback(mode="after", calibration_samples=2, probe_samples=2)
    model = lora(tiny_llama(seed=0))
    _begin(cb, model, loader, tmp_path)
    cb.on_train_end(_args(tmp_path), SimpleNamespace(global_step=1, is_world_process_zero=True), None, model=model)
    model.save_pretrained(str(tmp_path / "final"))
    assert load_sensitivity(tmp_path / "final").metadata["num_samples"] == "2"
    assert len(load_probe(tmp_path / "final", vocab_size=64)) == 2
    cb.detach()


def _grpo(tmp_path, cb):
    """A real TRL GRPOTrainer on a tiny character-level Llama (offline, about a second on one core)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    if not hasattr(trl, "GRPOTrainer"):
        pytest.skip(f"trl {trl.__version__} has no GRPOTrainer")
    from peft import LoraConfig
    model, tok = char_llama()
    ds = datasets.Dataset.from_dict({"prompt": ["hello world", "the quick fox", "lorem ipsum", "abc def"]})
    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, bf16=False, use_cpu=True, report_to="none",
                          save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    return trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                           args=args, train_dataset=ds, processing_class=tok, callbacks=[cb],
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))


def test_real_grpo_trainer_during(tmp_path):
    cb = SensitivityCallback(mode="during", task="grpo")
    trainer = _grpo(tmp_path, cb)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    rec = load_sensitivity(tmp_path / "final")
    assert rec.metadata["num_steps"] == "2" and rec.groups == ["layers.0", "layers.1"]
    assert (rec.tensor_scores[1::2] > 0).all()  # the lora_B factors (lora_A's |A * dA| is 0 while B = 0)
    assert not (tmp_path / "final" / "probe.safetensors").exists()
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    final = trainer.state.log_history[-1]
    assert {k: v for k, v in final.items() if k != "step"} == {f"sensitivity/{g}": v
                                                               for g, v in rec.group_dict().items()}


def test_real_grpo_trainer_after_refused(tmp_path):
    trainer = _grpo(tmp_path, SensitivityCallback(mode="after"))
    with pytest.raises(SensPeftError, match="Use mode='during'"):
        trainer.train()
