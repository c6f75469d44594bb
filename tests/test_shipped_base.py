"""The pre-trained toy base shipped as package data (sens_peft/testing/data/toy_base).

The quick start, the tests and the quality benchmark's ``maps``/B cells load it instead of pre-training, so it
must be exactly what ``toy.pretrain_base()`` would train from the current code and data: these tests fail when the
settings, the data or the pre-training change without ``python recipes/pretrain_toy_base.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from sens_peft.testing import toy

SHIPPED = toy.SHIPPED_BASE_DIR
REBUILD = "rebuild it with `python recipes/pretrain_toy_base.py`"
SHIPPED_CPU_CAPABILITY = "AVX512"  # torch.backends.cpu.get_cpu_capability() of the machine that trained it


@pytest.fixture(scope="module")
def manifest():
    found = toy.shipped_base_manifest()
    assert found is not None, f"no shipped toy base in {SHIPPED} (expected {toy.SHIPPED_FILES} + shipped.json)"
    return found


def test_manifest_digest_and_settings_match_the_code(manifest):
    settings = toy.ToySettings()
    assert manifest["digest"] == settings.digest(), f"shipped base digest != ToySettings().digest(); {REBUILD}"
    assert manifest["toy_version"] == toy.TOY_VERSION
    recorded = json.loads((SHIPPED / "toy_settings.json").read_text())
    assert recorded == json.loads(json.dumps(dataclasses.asdict(settings))), REBUILD


def test_manifest_data_fingerprint_matches_the_data(manifest):
    # The digest hashes the settings only; a changed generator, split seed or tokenizer changes this instead.
    assert manifest["data_fingerprint"] == toy.pretraining_fingerprint(), f"toy pre-training data changed; {REBUILD}"


def test_pretraining_fingerprint_sees_data_changes(monkeypatch):
    ref = toy.pretraining_fingerprint()
    assert toy.pretraining_fingerprint(toy.ToySettings(seed=1)) != ref
    real = toy._generic_text
    monkeypatch.setattr(toy, "_generic_text", lambda rng: real(rng) + "x")
    assert toy.pretraining_fingerprint() != ref


def test_shipped_weights_are_the_recorded_file(manifest):
    blob = (SHIPPED / "model.safetensors").read_bytes()
    # a Git LFS pointer or a truncated file would load as garbage or not at all
    assert hashlib.sha256(blob).hexdigest() == manifest["model_sha256"]
    state = load_file(SHIPPED / "model.safetensors")
    expected = toy.build_model().state_dict()
    assert set(state) == set(expected)
    assert all(state[k].shape == expected[k].shape and state[k].dtype == torch.float32 for k in state)


def _no_pretraining(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pretrain_base pre-trained although the shipped base matches")

    monkeypatch.setattr(toy, "pretrain_loop", fail)


def test_pretrain_base_loads_the_shipped_base_and_caches_it(tmp_path, monkeypatch):
    _no_pretraining(monkeypatch)
    model = toy.pretrain_base(cache_dir=tmp_path)
    folder = toy.base_path(cache_dir=tmp_path)
    assert model.name_or_path == str(folder) and not model.training
    for name in ("config.json", "model.safetensors", "tokenizer.json", "toy_settings.json"):
        assert (folder / name).is_file(), name
    shipped = load_file(SHIPPED / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], shipped[k]) for k in shipped)
    # the cached folder (what merge_models(base=...) and the quick start's recipes read) gives the same logits
    again = toy.pretrain_base(cache_dir=tmp_path)
    ids = torch.tensor([toy.encode_example(toy.build_tokenizer(), "inc", "0123", "1234")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_loading_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """First run (shipped copy) and later runs (cached folder) must leave the same random state: the quick
    start's LoRA initialisation draws from it next."""
    _no_pretraining(monkeypatch)
    states = []
    for _ in range(2):  # the first call loads the shipped copy, the second the cached folder
        torch.manual_seed(123)
        toy.pretrain_base(cache_dir=tmp_path)
        states.append(torch.get_rng_state())
    torch.manual_seed(123)
    assert torch.equal(states[0], torch.get_rng_state()) and torch.equal(states[1], states[0])


def test_shipped_base_half_knows_every_task(tmp_path, monkeypatch):
    """A quality floor: the regime the suite is built for (the base knows ~20-40% of each task)."""
    _no_pretraining(monkeypatch)
    acc = toy.evaluate(toy.pretrain_base(cache_dir=tmp_path), n=100)
    # measured on the shipped base: inc 0.43, cipher 0.26, rcipher 0.31, d2l 0.19 (first 100 test examples)
    assert acc == pytest.approx({"inc": 0.43, "cipher": 0.26, "rcipher": 0.31, "d2l": 0.19}, abs=0.02)


def test_unwritable_cache_still_returns_the_shipped_base(tmp_path, monkeypatch, caplog):
    _no_pretraining(monkeypatch)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    model = toy.pretrain_base(cache_dir=blocker)
    assert torch.equal(model.lm_head.weight, load_file(SHIPPED / "model.safetensors")["lm_head.weight"])
    assert "cannot cache the shipped base" in caplog.text


def test_other_settings_are_pre_trained(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(toy, "pretrain_loop", lambda model, rows, **kw: calls.append(kw["steps"]))
    toy.pretrain_base(cache_dir=tmp_path, steps=2, batch_size=2)
    assert calls == [2]
    toy.pretrain_base(cache_dir=tmp_path / "forced", force=True)  # force ignores the shipped copy too
    assert calls == [2, toy.ToySettings().steps]


@pytest.mark.slow
def test_shipped_base_is_what_pretraining_produces(tmp_path):
    """Pre-training from scratch (one thread, as the rebuild does) gives the shipped weights bit for bit.

    Catches a change of the pre-training loop itself, which neither the digest nor the data fingerprint sees
    (1-3 minutes on a laptop CPU).
    """
    # Bit identity holds for one CPU kernel family: torch picks other vector kernels on other CPUs, whose float
    # sums round differently and drift over hundreds of steps. The shipped base was trained with AVX512 kernels.
    if torch.backends.cpu.get_cpu_capability() != SHIPPED_CPU_CAPABILITY:
        pytest.skip(f"bit identity is checked on {SHIPPED_CPU_CAPABILITY} CPUs only "
                    f"(this one: {torch.backends.cpu.get_cpu_capability()})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = toy.pretrain_base(cache_dir=tmp_path, force=True)
    finally:
        torch.set_num_threads(threads)
    shipped = load_file(SHIPPED / "model.safetensors")
    state = model.state_dict()
    worst = max((state[k] - shipped[k]).abs().max().item() for k in shipped)
    assert all(torch.equal(state[k], shipped[k]) for k in shipped), f"max |diff| {worst:.3g}; {REBUILD}"
