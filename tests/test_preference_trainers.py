"""SensitivityCallback under TRL's preference trainers (DPOTrainer, KTOTrainer, ORPO) on a tiny character-level Llama.

The after pass of a DPO expert differentiates the DPO loss against the trainer's reference; the during mode scores
the gradients the trainer's optimizer consumes (the DPO loss's). Both are checked against hand computations with
torch.autograd on float64 models: the DPO loss written out here, on unpadded sequences, through a merged copy of the
adapter (so dL/dW of each adapted weight comes from autograd, not from the library's LoRA hooks).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import char_llama, lora  # noqa: E402

from sens_peft.errors import SensPeftError, UnsupportedSetupError  # noqa: E402
from sens_peft.sensitivity.calibration_data import select_examples  # noqa: E402
from sens_peft.sensitivity.calibration_loss import (  # noqa: E402
    PreferenceSpec,
    collate_pairs,
    completion_logps,
    preference_loss,
)
from sens_peft.sensitivity.callback import SensitivityCallback  # noqa: E402
from sens_peft.store import load_probe, load_sensitivity  # noqa: E402

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
from peft import LoraConfig  # noqa: E402

WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
BETA = 0.5
COMMON = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
              logging_steps=1000, learning_rate=1e-2, lr_scheduler_type="constant", dataloader_pin_memory=False)


def _pairs():
    return datasets.Dataset.from_dict({"prompt": [f"say {w} " for w in WORDS], "chosen": WORDS,
                                       "rejected": [w[::-1] for w in WORDS]})


def _policy(dtype=torch.float64):
    """A tiny Llama with a randomly initialised LoRA adapter (so policy and base differ from step 0)."""
    model, tok = char_llama(seed=0)
    return lora(model.to(dtype), init_random=True), tok


def _dpo(tmp_path, cb, model=None, tok=None, **config):
    if model is None:
        model, tok = _policy()
    kw = dict(COMMON, output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, beta=BETA)
    kw.update(config)
    return trl.DPOTrainer(model=model, args=trl.DPOConfig(**kw), train_dataset=_pairs(), processing_class=tok,
                          callbacks=[cb])


# ---------------------------------------------------------------------------------------------- hand computations
def _copy(model):
    """A deep copy without TRL's fused-LM-head patch (an instance ``forward`` whose closure calls the original)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module.__dict__.pop("forward", None)
    return clone


def _seq_logp(model, prompt, completion):
    """log pi(completion | prompt) of one unpadded sequence."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum()


def _dpo_loss(policy, reference, rows, beta=BETA):
    """Mean over pairs of -log sigmoid(beta * [(lp_w - lr_w) - (lp_l - lr_l)]), written out."""
    losses = []
    for row in rows:
        with torch.no_grad():
            ref_w = _seq_logp(reference, row["prompt_ids"], row["chosen_ids"])
            ref_l = _seq_logp(reference, row["prompt_ids"], row["rejected_ids"])
        pol_w = _seq_logp(policy, row["prompt_ids"], row["chosen_ids"])
        pol_l = _seq_logp(policy, row["prompt_ids"], row["rejected_ids"])
        losses.append(-F.logsigmoid(beta * ((pol_w - ref_w) - (pol_l - ref_l))))
    return torch.stack(losses).mean()


def _layer_theta_scores(peft_model, loss_of):
    """Per layer sum over adapted weights of sum |W * dL/dW| with W = W0 + s*B@A, by autograd on a merged copy."""
    merged = _copy(peft_model).merge_and_unload()
    weights = {n: p for n, p in merged.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))}
    for p in merged.parameters():
        p.requires_grad_(False)
    for p in weights.values():
        p.requires_grad_(True)
    loss_of(merged).backward()
    scores = {}
    for name, w in weights.items():
        layer = f"layers.{name.split('layers.')[1].split('.')[0]}"
        scores[layer] = scores.get(layer, 0.0) + float((w.detach() * w.grad).abs().sum())
    return scores


class _RefAdapter:
    """The reference TRL trains a PeftModel against: its 'ref' adapter (a copy of the initial adapter)."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, **kw):
        self.peft_model.set_adapter("ref")
        try:
            return self.peft_model(**kw)
        finally:
            self.peft_model.set_adapter("default")


# ---------------------------------------------------------------------------------------------- DPO: after
def test_dpo_after_pass_scores_the_dpo_loss(tmp_path):
    """One calibration pair: the stored per-layer score equals |W * dL_DPO/dW| summed, from autograd by hand."""
    cb = SensitivityCallback(mode="after", calibration_samples=1, probe_samples=2, task="dpo")
    trainer = _dpo(tmp_path, cb)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    rec = load_sensitivity(tmp_path / "final")
    meta = rec.metadata
    assert meta["calibration_loss"] == "dpo" and meta["trainer"] == "DPOTrainer"
    assert "reference=ref_adapter" in meta["calibration_loss_detail"]  # TRL copies a passed adapter as 'ref'
    assert meta["num_samples"] == "1" and meta["fisher_estimator"] == "per_sample_grad_sq"
    rows = trainer.train_dataset
    row = rows[select_examples(rows, 1, 0)[0]]
    model = trainer.model
    model.set_adapter("default")
    reference = _copy(model)
    expected = _layer_theta_scores(model, lambda m: _dpo_loss(m, _RefAdapter(reference), [row]))
    got = rec.group_dict()
    assert set(got) == set(expected)
    for layer, value in expected.items():
        assert value > 0
        assert got[layer] == pytest.approx(value, rel=1e-5), layer
    # not the chosen completion's LM loss (what a stand-in would score)
    ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
    labels = ids.clone()
    labels[0, : len(row["prompt_ids"])] = -100
    lm = _layer_theta_scores(model, lambda m: m(input_ids=ids, labels=labels).loss)
    assert got["layers.0"] != pytest.approx(lm["layers.0"], rel=1e-2)
    # the input Grams cover the chosen sequence (prompt + chosen), not the rejected one
    q0 = "model.layers.0.self_attn.q_proj.weight"
    owner = rec.gram_aliases.get(q0, q0)
    assert rec.gram_tokens[owner] == len(row["prompt_ids"]) + len(row["chosen_ids"])
    # the probe holds chosen completions, prompt masked
    probe = load_probe(tmp_path / "final", vocab_size=model.config.vocab_size)
    first = rows[select_examples(rows, 2, 0)[0]]
    n_prompt, n_all = len(first["prompt_ids"]), len(first["prompt_ids"]) + len(first["chosen_ids"])
    assert probe.input_ids[0, :n_all].tolist() == first["prompt_ids"] + first["chosen_ids"]
    assert (probe.labels[0, :n_prompt] == -100).all()
    assert probe.labels[0, n_prompt:n_all].tolist() == first["chosen_ids"]


def test_dpo_after_fresh_adapter_uses_the_adapter_disabled_reference(tmp_path):
    """A peft_config adapter (B = 0 at start): the reference is the base model, TRL's choice too."""
    model, tok = char_llama(seed=0)
    cb = SensitivityCallback(mode="after", calibration_samples=2, store_probe=False)
    trainer = trl.DPOTrainer(
        model=model.double(), processing_class=tok, train_dataset=_pairs(), callbacks=[cb],
        args=trl.DPOConfig(**dict(COMMON, output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                  beta=BETA)),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer.train()
    rec = cb.record
    assert "reference=adapter_disabled" in rec.metadata["calibration_loss_detail"]
    rows = trainer.train_dataset
    picked = [rows[i] for i in select_examples(rows, 2, 0)]
    peft_model = trainer.model

    class Base:
        def __call__(self, **kw):
            with peft_model.disable_adapter():
                return peft_model(**kw)

    per_pair = [_layer_theta_scores(peft_model, lambda m, r=r: _dpo_loss(m, Base(), [r])) for r in picked]
    for layer, value in rec.group_dict().items():
        assert value == pytest.approx(sum(p[layer] for p in per_pair) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------- DPO: during
def test_dpo_during_scores_the_dpo_gradient(tmp_path):
    """One step over all pairs, no clipping: the during scores are |theta_0 * dL_DPO/dtheta| of the LoRA factors."""
    model, tok = _policy()
    initial = _copy(model)
    cb = SensitivityCallback(mode="during", task="dpo")
    trainer = _dpo(tmp_path, cb, model, tok, per_device_train_batch_size=len(WORDS), max_grad_norm=0.0)
    rows = [trainer.train_dataset[i] for i in range(len(WORDS))]
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    rec = load_sensitivity(tmp_path / "final")
    assert rec.metadata["mode"] == "during" and rec.metadata["trainer"] == "DPOTrainer"
    reference = _copy(initial)
    factors = [(n, p) for n, p in initial.named_parameters() if p.requires_grad]
    _dpo_loss(initial, reference, rows).backward()
    expected = torch.stack([(p.detach() * p.grad).abs().sum() for _, p in factors]).float()
    assert len(rec.tensor_names) == len(factors)
    assert torch.isfinite(rec.tensor_scores).all() and (rec.tensor_scores > 0).all()
    torch.testing.assert_close(rec.tensor_scores, expected, rtol=1e-5, atol=0)


def test_dpo_during_differs_from_sft_on_the_same_data(tmp_path):
    """The same model and pairs under SFTTrainer (prompt -> chosen): other gradients, other scores."""
    cb_dpo = SensitivityCallback(mode="during", store_probe=False)
    _dpo(tmp_path / "dpo", cb_dpo, max_grad_norm=0.0).train()
    model, tok = _policy()
    sft_data = datasets.Dataset.from_dict({"prompt": [f"say {w} " for w in WORDS], "completion": WORDS})
    cb_sft = SensitivityCallback(mode="during", store_probe=False)
    args = trl.SFTConfig(**dict(COMMON, output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=4,
                                max_grad_norm=0.0))
    trl.SFTTrainer(model=model, args=args, train_dataset=sft_data, processing_class=tok, callbacks=[cb_sft]).train()
    dpo, sft = cb_dpo.record.tensor_scores, cb_sft.record.tensor_scores
    assert torch.isfinite(dpo).all() and (dpo > 0).all() and (sft > 0).all()
    assert not torch.allclose(dpo, sft, rtol=0.1)


# ---------------------------------------------------------------------------------------------- DPO: fallbacks, errors
def test_unsupported_dpo_loss_falls_back_to_chosen_lm_or_refuses(tmp_path, caplog):
    cb = SensitivityCallback(mode="after", calibration_samples=1, store_probe=False)
    with caplog.at_level("WARNING", logger="sens_peft.sensitivity.callback"):
        trainer = _dpo(tmp_path / "auto", cb, loss_type=["nca_pair"])
        trainer.train()
    meta = cb.record.metadata
    assert meta["calibration_loss"] == "chosen_lm" and "nca_pair" in meta["calibration_loss_reason"]
    assert any("chosen_lm" in r.getMessage() and "nca_pair" in r.getMessage() for r in caplog.records)
    # ... and it is the LM loss of the chosen completion (prompt masked), by hand
    rows = trainer.train_dataset
    row = rows[select_examples(rows, 1, 0)[0]]
    ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
    labels = ids.clone()
    labels[0, : len(row["prompt_ids"])] = -100
    expected = _layer_theta_scores(trainer.model, lambda m: m(input_ids=ids, labels=labels).loss)
    for layer, value in cb.record.group_dict().items():
        assert value == pytest.approx(expected[layer], rel=1e-5)
    strict = SensitivityCallback(mode="after", calibration_loss="preference")
    with pytest.raises(UnsupportedSetupError, match=r"nca_pair.*calibration_loss='completion'.*mode='during'"):
        _dpo(tmp_path / "strict", strict, loss_type=["nca_pair"]).train()


def test_unknown_calibration_loss_is_refused():
    with pytest.raises(ValueError, match="calibration_loss='dpo' is not one of"):
        SensitivityCallback(calibration_loss="dpo")


def test_full_finetune_dpo_uses_the_ref_model(tmp_path):
    model, tok = char_llama(seed=0)
    model = model.double()
    ref = copy.deepcopy(model)
    cb = SensitivityCallback(mode="after", calibration_samples=1, store_probe=False, weight_source="theta")
    args = trl.DPOConfig(**dict(COMMON, output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                beta=BETA))
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=_pairs(), processing_class=tok,
                             callbacks=[cb])
    trainer.train()
    rec = cb.record
    assert "reference=model" in rec.metadata["calibration_loss_detail"]
    rows = trainer.train_dataset
    row = rows[select_examples(rows, 1, 0)[0]]
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(trainer.model.named_parameters())[name]
    w.grad = None
    _dpo_loss(trainer.model, ref, [row]).backward()
    expected = float((w.detach() * w.grad).abs().sum())
    assert float(rec.tensor_scores[rec.tensor_names.index(name)]) == pytest.approx(expected, rel=1e-5)


def test_precomputed_reference_log_probs(tmp_path):
    """precompute_ref_log_probs=True: the pass reads TRL's ref_*_logps columns; same scores as computing them."""
    runs = {}
    for precompute in (False, True):
        cb = SensitivityCallback(mode="after", calibration_samples=2, store_probe=False)
        _dpo(tmp_path / str(precompute), cb, precompute_ref_log_probs=precompute).train()
        runs[precompute] = cb.record
    assert "reference=precomputed" in runs[True].metadata["calibration_loss_detail"]
    assert "reference=ref_adapter" in runs[False].metadata["calibration_loss_detail"]
    torch.testing.assert_close(runs[True].tensor_scores, runs[False].tensor_scores, rtol=1e-4, atol=0)


def test_compute_sensitivity_on_pairs_without_a_trainer(caplog):
    """No trainer to read beta / the reference from: the chosen completions' LM loss, said in a warning and the
    metadata."""
    from sens_peft import compute_sensitivity

    model, _ = _policy(torch.float32)
    rows = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 1], "rejected_ids": [9, 8, 1]} for _ in range(3)]
    with caplog.at_level("WARNING", logger="sens_peft.sensitivity.calibrate"):
        rec = compute_sensitivity(model, rows, calibration_samples=2, store_probe=False)
    assert rec.metadata["calibration_loss"] == "chosen_lm"
    assert "not available" in rec.metadata["calibration_loss_reason"]
    assert any("chosen_lm" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- KTO
def _kto(tmp_path, cb, labels=None, **config):
    model, tok = _policy()
    labels = labels if labels is not None else [True] * len(WORDS) + [False] * len(WORDS)
    data = datasets.Dataset.from_dict({"prompt": [f"say {w} " for w in WORDS] * 2,
                                       "completion": WORDS + [w[::-1] for w in WORDS], "label": labels})
    kw = dict(COMMON, output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4)
    kw.update(config)
    return trl.KTOTrainer(model=model, args=trl.KTOConfig(**kw), train_dataset=data, processing_class=tok,
                          callbacks=[cb])


def test_kto_during_and_after(tmp_path):
    cb = SensitivityCallback(mode="both", calibration_samples=1, probe_samples=2, task="kto")
    trainer = _kto(tmp_path, cb)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    rec = load_sensitivity(tmp_path / "final")
    assert rec.metadata["calibration_loss"] == "desirable_lm" and rec.metadata["trainer"] == "KTOTrainer"
    assert "KL baseline" in rec.metadata["calibration_loss_reason"]
    during = rec.extra["during.tensor_scores"]
    assert torch.isfinite(during).all() and (during > 0).all()
    rows = trainer.train_dataset
    desirable = [i for i in range(len(rows)) if rows[i]["label"]]
    row = rows[desirable[select_examples(desirable, 1, 0)[0]]]
    assert row["label"]
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    labels = ids.clone()
    labels[0, : len(row["prompt_ids"])] = -100
    expected = _layer_theta_scores(trainer.model, lambda m: m(input_ids=ids, labels=labels).loss)
    for layer, value in rec.group_dict().items():
        assert value == pytest.approx(expected[layer], rel=1e-5)
    probe = load_probe(tmp_path / "final", vocab_size=trainer.model.config.vocab_size)
    assert len(probe) == 2


def test_kto_preference_loss_is_refused_at_train_start(tmp_path):
    with pytest.raises(UnsupportedSetupError, match=r"unpaired \(KTO\).*mode='during'"):
        _kto(tmp_path, SensitivityCallback(mode="after", calibration_loss="preference")).train()


def test_kto_without_desirable_rows_refused():
    """The after pass has nothing to score: a clear error at train start (a hand-made loader, no trainer)."""
    rows = [{"prompt_ids": [3, 4], "completion_ids": [5, 6], "label": False} for _ in range(4)]
    loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=lambda x: x)
    cb = SensitivityCallback(mode="after")
    args = SimpleNamespace(output_dir="unused", max_grad_norm=1.0, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, world_size=1, deepspeed=None, fsdp=None,
                           resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, num_input_tokens_seen=0)
    with pytest.raises(SensPeftError, match=r"no desirable \(label=True\) completion.*Use mode='during'"):
        cb.on_train_begin(args, state, None, model=_policy(torch.float32)[0], train_dataloader=loader)
    cb.detach()


# ---------------------------------------------------------------------------------------------- ORPO (trl.experimental)
def test_orpo_during_and_after_on_the_chosen_lm_loss(tmp_path):
    """TRL 1.16 keeps ORPO in trl.experimental with whole-sequence columns: during scores its loss, after the
    chosen sequences' LM loss (prompt masked by its chosen_labels), said in the metadata."""
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError as err:
        pytest.skip(f"no ORPOTrainer in this trl: {err}")
    model, tok = _policy()
    cb = SensitivityCallback(mode="both", calibration_samples=1, probe_samples=2)
    args = ORPOConfig(**dict(COMMON, output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                             max_length=64))
    trainer = ORPOTrainer(model=model, args=args, train_dataset=_pairs(), processing_class=tok, callbacks=[cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    rec = load_sensitivity(tmp_path / "final")
    assert rec.metadata["calibration_loss"] == "chosen_lm" and rec.metadata["trainer"] == "ORPOTrainer"
    assert "ORPO" in rec.metadata["calibration_loss_reason"]
    assert (rec.extra["during.tensor_scores"] > 0).all()
    rows = trainer.train_dataset
    row = rows[select_examples(rows, 1, 0)[0]]
    ids, labels = torch.tensor([row["chosen_input_ids"]]), torch.tensor([row["chosen_labels"]])
    assert (labels[0, : len(row["prompt_input_ids"])] == -100).all()
    expected = _layer_theta_scores(trainer.model, lambda m: m(input_ids=ids, labels=labels).loss)
    for layer, value in rec.group_dict().items():
        assert value == pytest.approx(expected[layer], rel=1e-5)
    assert len(load_probe(tmp_path / "final", vocab_size=model.config.vocab_size)) == 2


# ---------------------------------------------------------------------------------------------- pure functions
def test_collate_pairs_matches_trl_layout():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    ours = collate_pairs(rows, pad_id=0, max_length=64)
    theirs = DataCollatorForPreference(pad_token_id=0)(copy.deepcopy(rows))
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert ours[key].tolist() == theirs[key].tolist(), key
    assert collate_pairs(rows, pad_id=0, max_length=3)["completion_mask"].tolist() == [[0, 0, 0], [0, 0, 1],
                                                                                         [0, 0, 0], [0, 0, 1]]


def test_preference_loss_formulas():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(3, generator=g, dtype=torch.float64) for _ in range(4))
    nc, nr = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)
    d = (pc - rc) - (pr - rr)
    beta = 0.3
    sig = preference_loss(pc, pr, rc, rr, PreferenceSpec(beta))
    assert float(sig) == pytest.approx(float(torch.log1p(torch.exp(-beta * d)).mean()), rel=1e-12)
    hinge = preference_loss(pc, pr, rc, rr, PreferenceSpec(beta, ("hinge",), (1.0,)))
    assert float(hinge) == pytest.approx(float(torch.clamp(1 - beta * d, min=0).mean()), rel=1e-12)
    ipo = preference_loss(pc, pr, rc, rr, PreferenceSpec(beta, ("ipo",), (1.0,)), nc, nr)
    ref = (((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2).mean()
    assert float(ipo) == pytest.approx(float(ref), rel=1e-12)
    mix = preference_loss(pc, pr, rc, rr, PreferenceSpec(beta, ("sigmoid", "sft"), (1.0, 0.5)), nc, nr)
    assert float(mix) == pytest.approx(float(sig) + 0.5 * float(-pc.sum() / nc.sum()), rel=1e-12)


def test_completion_logps_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 5, 7, generator=g, dtype=torch.float64)
    ids = torch.tensor([[1, 4, 2, 6, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 2 and 3 are the completion
    lp = torch.log_softmax(logits[0], -1)
    assert float(completion_logps(logits, ids, mask)) == pytest.approx(float(lp[1, 2] + lp[2, 6]), rel=1e-12)
