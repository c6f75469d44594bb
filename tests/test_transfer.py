"""Transferability: hand-computed alignments, causal shift and masking, vocab slicing, batching, PEFT adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sens_peft.store import ProbeSet
from sens_peft.transfer import (
    alignment_scores,
    scored_positions,
    transferability_for_adapters,
    transferability_for_models,
    transferability_matrix,
)

ALIGNMENTS = ["cosine", "neg_l2", "neg_kl", "l2"]


# ---------------------------------------------------------------- pure pieces


def test_scored_positions_shift_and_masks():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 4, 5, -100, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])  # row 0: right pad at 4; row 1: left pad at 0
    mask = scored_positions(attn, labels)
    # row 0: labels at t+1 ∈ {2, 3} scored (t=1, 2); t=3 → label 7 at a padded position → no
    # row 1: t=0 → label 4 but t=0 is padding → no; t=1 → label 5 → yes
    assert mask.tolist() == [[False, True, True, False, False], [False, True, False, False, False]]


def test_alignment_scores_hand():
    z_i = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    z_j = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
    assert alignment_scores(z_i, z_j, "cosine").tolist() == pytest.approx([0.0, 1.0])
    assert alignment_scores(z_i, z_j, "neg_l2").tolist() == pytest.approx([-math.sqrt(2), 0.0])
    assert alignment_scores(z_i, z_j, "l2").tolist() == pytest.approx([math.sqrt(2), 0.0])
    # KL(p_j || p_i), p_j = softmax([0, 1]), p_i = softmax([1, 0])
    e = math.e
    pj = [1 / (1 + e), e / (1 + e)]
    pi = [e / (1 + e), 1 / (1 + e)]
    kl = sum(a * math.log(a / b) for a, b in zip(pj, pi))
    assert alignment_scores(z_i, z_j, "neg_kl").tolist() == pytest.approx([-kl, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="alignment"):
        alignment_scores(z_i, z_j, "dot")


# ---------------------------------------------------------------- fake experts: logits = table lookup


VOCAB = 12


def make_tables(k=3, vocabs=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocabs = vocabs or [VOCAB] * k
    base = torch.randn(VOCAB, max(vocabs), generator=g)
    # experts share a base and differ by a per-expert perturbation, like fine-tunes of one model
    return [base[:, :v] + (0.3 + 0.4 * i) * torch.randn(VOCAB, v, generator=g) for i, v in enumerate(vocabs)]


def table_logits_fn(tables):
    def fn(i, batch):
        return tables[i].to(batch["input_ids"].device)[batch["input_ids"]]

    return fn


def make_probe(n=5, t=7, seed=0, pad_left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    labels = ids.clone()
    labels[:, :2] = -100  # prompt not scored
    for r in range(n):
        pad = r % 3
        if pad:
            if pad_left:
                attn[r, :pad] = 0
                labels[r, :pad] = -100
            else:
                attn[r, t - pad :] = 0
                labels[r, t - pad :] = -100
    return ProbeSet(input_ids=ids, attention_mask=attn, labels=labels)


def reference_matrix(tables, probes, alignment, vocab_size=None):
    """Plain loops in float64: for every probe j, sequence, position t with labels[t+1] scored."""
    k = len(tables)
    out = torch.zeros(k, k, dtype=torch.float64)
    for j, probe in enumerate(probes):
        for i in range(k):
            scores = []
            for r in range(len(probe)):
                for t in range(probe.input_ids.shape[1] - 1):
                    if probe.labels[r, t + 1] == -100 or not probe.attention_mask[r, t] or not probe.attention_mask[r, t + 1]:
                        continue
                    tok = probe.input_ids[r, t]
                    v = min(tables[i].shape[1], tables[j].shape[1], vocab_size or 10**9)
                    zi, zj = tables[i][tok, :v].double(), tables[j][tok, :v].double()
                    if alignment == "cosine":
                        s = float(zi @ zj / (zi.norm() * zj.norm()))
                    elif alignment in ("neg_l2", "l2"):
                        s = float((zi - zj).norm()) * (1 if alignment == "l2" else -1)
                    else:
                        pj, pi = torch.softmax(zj, 0), torch.softmax(zi, 0)
                        s = -float((pj * (pj.log() - pi.log())).sum())
                    scores.append(s)
            out[i, j] = sum(scores) / len(scores)
    return out


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_matrix_matches_reference(alignment):
    tables = make_tables()
    probes = [make_probe(seed=s, pad_left=bool(s % 2)) for s in range(3)]
    got = transferability_matrix(table_logits_fn(tables), probes, alignment=alignment, batch_size=2)
    assert got.dtype == torch.float32 and got.shape == (3, 3)
    assert torch.allclose(got.double(), reference_matrix(tables, probes, alignment), rtol=1e-5, atol=1e-5)
    diag = torch.diagonal(got)
    if alignment == "cosine":
        assert torch.allclose(diag, torch.ones(3))
    else:
        assert torch.allclose(diag, torch.zeros(3), atol=1e-6)


def test_unscored_positions_do_not_matter():
    tables = make_tables()
    probes = [make_probe(seed=s) for s in range(3)]
    fn = table_logits_fn(tables)

    def noisy(i, batch):
        logits = fn(i, batch).clone()
        keep = scored_positions(batch["attention_mask"], batch["labels"])
        logits[~keep] = torch.randn_like(logits[~keep]) * 100  # garbage wherever nothing is scored
        return logits

    a = transferability_matrix(fn, probes, alignment="neg_l2")
    b = transferability_matrix(noisy, probes, alignment="neg_l2")
    assert torch.allclose(a, b)


def test_vocab_slicing():
    tables = make_tables(vocabs=[12, 14, 13])  # e.g. an added pad token
    probes = [make_probe(seed=s) for s in range(3)]
    got = transferability_matrix(table_logits_fn(tables), probes, alignment="cosine")
    assert torch.allclose(got.double(), reference_matrix(tables, probes, "cosine"), atol=1e-5)
    got5 = transferability_matrix(table_logits_fn(tables), probes, alignment="neg_kl", vocab_size=5)
    assert torch.allclose(got5.double(), reference_matrix(tables, probes, "neg_kl", vocab_size=5), atol=1e-5)
    assert not torch.allclose(got5, transferability_matrix(table_logits_fn(tables), probes, alignment="neg_kl"))


def test_batch_size_invariance():
    tables = make_tables()
    probes = [make_probe(n=7, seed=s) for s in range(3)]
    results = [transferability_matrix(table_logits_fn(tables), probes, alignment="neg_kl", batch_size=b)
               for b in (1, 3, 100)]
    for r in results[1:]:
        assert torch.allclose(r, results[0], atol=1e-6)


def test_errors():
    tables = make_tables()
    probe = make_probe()
    empty = ProbeSet(input_ids=probe.input_ids, attention_mask=probe.attention_mask,
                     labels=torch.full_like(probe.labels, -100))
    with pytest.raises(ValueError, match="probe 1 has no scored positions"):
        transferability_matrix(table_logits_fn(tables[:2]), [probe, empty])
    with pytest.raises(ValueError, match="alignment"):
        transferability_matrix(table_logits_fn(tables), [probe] * 3, alignment="kl")
    with pytest.raises(ValueError, match="num_experts=2"):
        transferability_for_models(lambda i: None, 2, [probe] * 3)
    with pytest.raises(ValueError, match="logits of expert"):
        transferability_matrix(lambda i, b: torch.zeros(1, 2, 3), [probe])


# ---------------------------------------------------------------- one model at a time


class TableModel(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        return (self.table[input_ids],)


@pytest.mark.parametrize("alignment", ["cosine", "neg_kl", "l2"])
def test_models_one_at_a_time_equals_matrix(alignment):
    tables = make_tables(vocabs=[12, 12, 11])
    probes = [make_probe(seed=s) for s in range(3)]
    loads = []

    def load(i):
        loads.append(i)
        return TableModel(tables[i])

    got = transferability_for_models(load, 3, probes, alignment=alignment, batch_size=2, vocab_size=11)
    want = transferability_matrix(table_logits_fn(tables), probes, alignment=alignment, batch_size=4,
                                  vocab_size=11)
    assert torch.allclose(got, want, atol=1e-6)
    assert loads == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------- tiny PEFT model with two adapters


@pytest.fixture(scope="module")
def peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False,
                lora_dropout=0.1)
    model = get_peft_model(base, LoraConfig(**lora), adapter_name="math")
    model.add_adapter("code", LoraConfig(**lora))
    return model


def _probe64(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[attn == 0] = -100
    return ProbeSet(input_ids=ids, attention_mask=attn, labels=labels)


@pytest.mark.parametrize("alignment", ["cosine", "neg_kl"])
def test_adapters_equal_direct_computation(peft_model, alignment):
    probes = [_probe64(1), _probe64(2)]
    peft_model.set_adapter("math")
    peft_model.train()
    grads_before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    got = transferability_for_adapters(peft_model, ["math", "code"], probes, alignment=alignment, batch_size=2)
    # state restored
    assert peft_model.active_adapter == "math" and peft_model.training
    assert grads_before == {n: p.requires_grad for n, p in peft_model.named_parameters()}

    # direct: full logits per adapter in eval mode, then the formula by hand
    peft_model.eval()
    logits = {}
    with torch.no_grad():
        for name in ("math", "code"):
            peft_model.set_adapter(name)
            logits[name] = [peft_model(input_ids=p.input_ids, attention_mask=p.attention_mask).logits.double()
                            for p in probes]
    peft_model.set_adapter("math")
    peft_model.train()
    names = ["math", "code"]
    want = torch.zeros(2, 2, dtype=torch.float64)
    for j, probe in enumerate(probes):
        mask = torch.zeros_like(probe.labels, dtype=torch.bool)
        mask[:, :-1] = (probe.labels[:, 1:] != -100) & probe.attention_mask[:, 1:].bool() & probe.attention_mask[:, :-1].bool()
        ref = logits[names[j]][j][mask]
        for i in range(2):
            z = logits[names[i]][j][mask]
            if alignment == "cosine":
                s = (z * ref).sum(-1) / (z.norm(dim=-1) * ref.norm(dim=-1))
            else:
                pj, pi = ref.softmax(-1), z.softmax(-1)
                s = -(pj * (pj.log() - pi.log())).sum(-1)
            want[i, j] = s.mean()
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert not torch.allclose(got[0, 1], got[1, 1])  # the adapters really differ
    with pytest.raises(ValueError, match="not loaded"):
        transferability_for_adapters(peft_model, ["math", "nope"], probes)
