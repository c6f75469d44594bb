"""Bad-input battery: every case must be refused with a clear error naming the file/tensor/expert and what was
expected, leave no output folder (nor a temporary sibling) behind, and leave every input file byte-identical.

Set ``SENS_PEFT_BAD_INPUTS_LOG=<file>`` to collect each case's exact error message into a markdown list.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers import hash_tree, make_full_expert, make_lora_adapter, save_model, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from sens_peft.io import MergeError
from sens_peft.merge import merge_adapters, merge_models
from sens_peft.recipe import RecipeError, load_recipe
from sens_peft.store import ProbeSet, SensitivityRecord, save_probe, save_sensitivity
from sens_peft.validation import FINGERPRINT_KEY, model_fingerprint

KW = dict(device="cpu", progress=False)


def _record(names: list[str], groups: list[str], scores, **meta) -> SensitivityRecord:
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return SensitivityRecord(groups=groups, group_scores=scores[: len(groups)].clone(), tensor_names=names,
                             tensor_scores=scores[: len(names)].clone(),
                             metadata={"estimator": "taylor_abs", "weight_source": "theta", "mode": "after", **meta})


def _sidecar(folder: Path, scores=(2.0, 1.0), names=None, **meta) -> Path:
    names = names or [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    groups = sorted({".".join(n.split(".")[1:3]) for n in names})
    save_sensitivity(_record(names, groups, list(scores)), folder)
    if meta:
        _rewrite_meta(folder / "sensitivity.safetensors", **meta)
    return folder


def _rewrite_meta(file: Path, drop=(), **meta) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        old = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old.update({k: str(v) for k, v in meta.items()})
    for key in drop:
        old.pop(key)
    save_file(tensors, str(file), metadata=old)


def _probe(folder: Path, vocab: int = 96, seed: int = 0, high: Optional[int] = None) -> Path:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 8), generator=gen)
    if high is not None:
        ids[1, 4] = high
    labels = ids.clone()
    labels[:, :2] = -100
    save_probe(ProbeSet(ids, torch.ones_like(ids), labels, {"task": f"t{seed}"}), folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Every input folder of the battery, built once (tiny models: ~2 s)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    w: dict[str, Path] = {"root": root}
    base = tiny_llama(seed=0)
    w["base"] = save_model(base, root / "base")
    w["full0"] = make_full_expert(base, root / "full0", seed=10)
    w["full1"] = make_full_expert(base, root / "full1", seed=11)
    w["full_wide"] = save_model(tiny_llama(seed=0, intermediate_size=48), root / "full_wide")
    w["full_gpt2"] = save_model(tiny_gpt2(), root / "full_gpt2")
    w["full_vocab97"] = save_model(tiny_llama(seed=0, vocab_size=97), root / "full_vocab97")
    nan = _copy(w["full1"], root / "full_nan")
    state = load_file(str(nan / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    w["full_nan"] = nan
    pk = root / "full_bin"
    pk.mkdir()
    shutil.copy(w["full1"] / "config.json", pk / "config.json")
    torch.save(load_file(str(w["full1"] / "model.safetensors")), pk / "pytorch_model.bin")
    w["full_bin"] = pk
    # full experts with sidecars
    w["full_s0"] = _sidecar(_copy(w["full0"], root / "full_s0"), (2.0, 1.0))
    w["full_s1"] = _sidecar(_copy(w["full1"], root / "full_s1"), (1.0, 3.0))
    w["full_s_otherbase"] = _sidecar(_copy(w["full1"], root / "full_s_otherbase"), (1.0, 3.0),
                                     **{FINGERPRINT_KEY: json.dumps(model_fingerprint(
                                         tiny_llama(seed=0, vocab_size=97).config))})
    w["full_s_foreign"] = _sidecar(_copy(w["full1"], root / "full_s_foreign"), (1.0, 3.0),
                                   names=["model.layers.0.self_attn.q_proj.weight",
                                          "model.layers.7.self_attn.q_proj.weight"])

    # LoRA adapters (on tiny_llama(seed=0) unless said otherwise)
    w["lora0"] = make_lora_adapter(tiny_llama, root / "lora0", seed=1)
    w["lora1"] = make_lora_adapter(tiny_llama, root / "lora1", seed=2)
    w["lora_wide"] = make_lora_adapter(lambda: tiny_llama(seed=0, hidden_size=48, num_attention_heads=4,
                                                          num_key_value_heads=4), root / "lora_wide", seed=3)
    w["lora_vocab97"] = make_lora_adapter(lambda: tiny_llama(seed=0, vocab_size=97), root / "lora_vocab97", seed=3,
                                          target_modules=("q_proj", "embed_tokens"))
    w["lora_dora"] = make_lora_adapter(tiny_llama, root / "lora_dora", seed=4, use_dora=True)
    w["lora_rank_pattern"] = make_lora_adapter(tiny_llama, root / "lora_rank_pattern", seed=5, r=4,
                                               rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    w["lora_mts_a"] = make_lora_adapter(tiny_llama, root / "lora_mts_a", seed=6, modules_to_save=["lm_head"])
    w["lora_mts_b"] = make_lora_adapter(tiny_llama, root / "lora_mts_b", seed=7, modules_to_save=["lm_head"])
    w["lora_mlp"] = make_lora_adapter(tiny_llama, root / "lora_mlp", seed=8, target_modules=("up_proj", "down_proj"))
    inf = _copy(w["lora1"], root / "lora_inf")
    state = load_file(str(inf / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key][0, 0] = float("inf")
    save_file(state, str(inf / "adapter_model.safetensors"), metadata={"format": "pt"})
    w["lora_inf"] = inf
    pk = _copy(w["lora1"], root / "lora_bin")
    torch.save(load_file(str(pk / "adapter_model.safetensors")), pk / "adapter_model.bin")
    (pk / "adapter_model.safetensors").unlink()
    w["lora_bin"] = pk
    # LoRA experts with sidecars: a good pair, then one broken sidecar each
    w["s0"] = _probe(_sidecar(_copy(w["lora0"], root / "s0"), (2.0, 1.0)), seed=0)
    w["s1"] = _probe(_sidecar(_copy(w["lora1"], root / "s1"), (1.0, 3.0)), seed=1)
    w["s_version"] = _sidecar(_copy(w["lora1"], root / "s_version"), format_version=99)
    nogroups = _sidecar(_copy(w["lora1"], root / "s_nogroups"))
    _rewrite_meta(nogroups / "sensitivity.safetensors", drop=("groups",))
    w["s_nogroups"] = nogroups
    w["s_nan"] = _sidecar(_copy(w["lora1"], root / "s_nan"), (1.0, float("nan")))
    w["s_negative"] = _sidecar(_copy(w["lora1"], root / "s_negative"), (1.0, -2.0))
    trunc = _sidecar(_copy(w["lora1"], root / "s_truncated"))
    data = (trunc / "sensitivity.safetensors").read_bytes()
    (trunc / "sensitivity.safetensors").write_bytes(data[: len(data) - 7])
    w["s_truncated"] = trunc
    # scores for the q_proj modules, stored next to an adapter of up_proj/down_proj: another adapter's sidecar
    w["s_other_adapter"] = _sidecar(_copy(w["lora_mlp"], root / "s_other_adapter"))
    w["s_other_base"] = _sidecar(_copy(w["lora1"], root / "s_other_base"), **{
        FINGERPRINT_KEY: json.dumps(model_fingerprint(tiny_llama(seed=0, num_hidden_layers=4).config))})
    w["s_probe_oov"] = _probe(_sidecar(_copy(w["lora1"], root / "s_probe_oov")), seed=2, high=96)
    # recipes
    (root / "recipe_unknown.yaml").write_text(
        f"base_model: {w['base']}\nexperts:\n  - path: {w['full0']}\n  - path: {w['full1']}\n"
        "method: ties\nparameters:\n  density: 0.5\n  denisty: 0.4\n")
    (root / "recipe_missing.yaml").write_text(
        f"base_model: {w['base']}\nexperts:\n  - path: {w['full0']}\n  - path: {root / 'no_such_expert'}\n")
    w["recipe_unknown"] = root / "recipe_unknown.yaml"
    w["recipe_missing"] = root / "recipe_missing.yaml"
    return w


@dataclass
class Case:
    id: str
    call: Callable[[dict, Path], object]
    error: type
    match: str
    what: str


def _A(*keys, **kw):
    """merge_adapters on a fresh base from adapter folders, saved to the case's output folder."""
    def call(w, out):
        return merge_adapters(tiny_llama(seed=0), [w[k] for k in keys], save_to=out, **{"sens": None, **KW, **kw})
    return call


def _M(*keys, base="base", **kw):
    def call(w, out):
        return merge_models(w[base], [w[k] for k in keys], out, **{"sens": None, **KW, **kw})
    return call


def _A_out_inside(w, out):
    return merge_adapters(tiny_llama(seed=0), [w["lora0"], w["lora1"]], save_to=w["lora0"] / "merged", sens=None,
                          **KW)


def _M_out_inside(w, out):
    return merge_models(w["base"], [w["full0"], w["full1"]], w["full1"] / "sub" / "merged", sens=None, **KW)


def _A_exists(w, out):
    out.mkdir()
    return merge_adapters(tiny_llama(seed=0), [w["lora0"], w["lora1"]], save_to=out, sens=None, **KW)


def _M_exists(w, out):
    out.mkdir()
    return merge_models(w["base"], [w["full0"], w["full1"]], out, sens=None, **KW)


CASES = [
    # --- experts that do not belong together
    Case("M-config-mismatch", _M("full0", "full_wide"), MergeError,
         r"expert 'full_wide'.*does not match base.*intermediate_size: base.*=64.*=48",
         "full expert of a base with another intermediate_size"),
    Case("M-architecture", _M("full0", "full_gpt2"), MergeError, r"expert 'full_gpt2'.*model_type: base.*'llama'.*'gpt2'",
         "GPT-2 expert for a Llama base"),
    Case("M-vocab-96-vs-97", _M("full0", "full_vocab97"), MergeError,
         r"expert 'full_vocab97'.*vocab_size: base.*=96.*=97.*resize the embeddings",
         "vocabulary 96 vs 97 (an added token)"),
    Case("A-other-base-shapes", _A("lora0", "lora_wide"), MergeError,
         r"adapter 'lora_wide'.*does not fit the base model.*size mismatch", "adapter of a wider base"),
    Case("A-vocab-96-vs-97", _A("lora0", "lora_vocab97"), MergeError,
         r"adapter 'lora_vocab97'.*does not fit the base model.*embed_tokens", "embedding LoRA of a 97-token base"),
    Case("A-dora", _A("lora0", "lora_dora"), MergeError, r"adapter 'lora_dora' uses DoRA", "DoRA adapter"),
    Case("A-modules-to-save-conflict", _A("lora_mts_a", "lora_mts_b"), MergeError,
         r"adapters \['lora_mts_a', 'lora_mts_b'\] all train module 'lm_head' fully \(modules_to_save\)",
         "two adapters train lm_head fully"),
    # --- sidecars
    Case("A-sidecar-format-version", _A("s0", "s_version", sens="task"), MergeError,
         r"expert 's_version'.*sensitivity\.safetensors: format_version 99 is not supported", "format_version 99"),
    Case("A-sidecar-missing-groups", _A("s0", "s_nogroups", sens="task"), MergeError,
         r"expert 's_nogroups'.*sensitivity\.safetensors: metadata 'groups' is missing", "no 'groups' metadata"),
    Case("A-sidecar-nan", _A("s0", "s_nan", sens="task"), MergeError,
         r"expert 's_nan'.*tensor 'group_scores' contains NaN or Inf", "NaN score"),
    Case("A-sidecar-negative", _A("s0", "s_negative", sens="task"), MergeError,
         r"expert 's_negative'.*tensor 'group_scores' has negative entries", "negative score"),
    Case("A-sidecar-truncated", _A("s0", "s_truncated", sens="task"), MergeError,
         r"expert 's_truncated'.*sensitivity\.safetensors cannot be read as safetensors", "truncated file"),
    Case("A-sidecar-other-adapter", _A("s0", "s_other_adapter", sens="task"), MergeError,
         r"expert 's_other_adapter'.*scores tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'.*does not adapt"
         r".*another adapter", "scores of q_proj stored with an up/down_proj adapter"),
    Case("A-sidecar-other-base", _A("s0", "s_other_base", sens="task"), MergeError,
         r"expert 's_other_base'.*computed on another base model \(num_hidden_layers: sidecar=4, base=2\)",
         "fingerprint of a 4-layer base"),
    Case("M-sidecar-other-base", _M("full_s0", "full_s_otherbase", sens="task"), MergeError,
         r"expert 'full_s_otherbase'.*computed on another base model \(vocab_size: sidecar=97, base=96\)",
         "fingerprint of a 97-token base"),
    Case("M-sidecar-foreign-tensor", _M("full_s0", "full_s_foreign", sens="task"), MergeError,
         r"expert 'full_s_foreign'.*scores tensor 'model\.layers\.7\.self_attn\.q_proj\.weight'.*model does not "
         r"have", "scores for layer 7 of a 2-layer model"),
    Case("A-probe-out-of-vocab", _A("s0", "s_probe_oov", sens="cross"), MergeError,
         r"expert 's_probe_oov'.*probe\.safetensors: tensor 'input_ids' has token id 96, outside the model's "
         r"vocabulary of 96", "probe token 96 in a 96-token vocabulary"),
    # --- expert lists
    Case("A-empty", _A(), MergeError, r"no adapters to merge", "empty adapter list"),
    Case("M-empty", _M(), MergeError, r"no experts to merge", "empty expert list"),
    Case("A-duplicate", _A("lora0", "lora0"), MergeError, r"adapters are listed more than once", "same folder twice"),
    Case("M-duplicate", _M("full0", "full0"), MergeError, r"expert folders are listed more than once",
         "same folder twice"),
    Case("M-base-as-expert", _M("full0", "base"), MergeError, r"base folder .* is also listed as an expert",
         "the base listed as an expert"),
    # --- parameters
    Case("A-density-0", _A("lora0", "lora1", method="ties", density=0.0), ValueError,
         r"density must be in \(0, 1\], got 0\.0", "density 0"),
    Case("M-density-1.5", _M("full0", "full1", method="dare_ties", density=1.5), ValueError,
         r"density must be in \(0, 1\], got 1\.5", "density 1.5"),
    Case("A-temperature-0", _A("lora0", "lora1", temperature=0.0), ValueError, r"temperature must be > 0, got 0\.0",
         "temperature 0"),
    Case("M-temperature-negative", _M("full0", "full1", temperature=-1.0), ValueError,
         r"temperature must be > 0, got -1\.0", "temperature -1"),
    Case("A-unknown-method", _A("lora0", "lora1", method="nuslerp"), ValueError,
         r"unknown merge method 'nuslerp'; available: \[", "method 'nuslerp'"),
    Case("M-unknown-method", _M("full0", "full1", method="tie"), ValueError, r"unknown merge method 'tie'",
         "method 'tie'"),
    # --- output folder
    Case("A-output-exists", _A_exists, MergeError, r"output folder .*out already exists; pass overwrite=True",
         "save_to exists"),
    Case("M-output-exists", _M_exists, MergeError, r"output folder .*out already exists; pass overwrite=True",
         "out_dir exists"),
    Case("A-output-inside-input", _A_out_inside, MergeError, r"output folder .*lora0/merged overlaps the input folder",
         "save_to inside an adapter folder"),
    Case("M-output-inside-input", _M_out_inside, MergeError, r"output folder .*full1/sub/merged overlaps the input",
         "out_dir inside an expert folder"),
    # --- broken weights
    Case("M-expert-nan", _M("full0", "full_nan"), MergeError,
         r"expert 'full_nan': tensor 'model\.layers\.1\.mlp\.down_proj\.weight' in .*model\.safetensors contains 1 "
         r"non-finite value\(s\) \(NaN\)", "NaN in a full expert's weight"),
    Case("A-expert-inf", _A("lora0", "lora_inf"), MergeError,
         r"expert 'lora_inf': tensor 'model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight' in .*adapter_model\."
         r"safetensors contains 1 non-finite value\(s\) \(Inf\)", "Inf in a LoRA factor"),
    # --- unsafe formats
    Case("M-pickle-bin", _M("full0", "full_bin"), MergeError,
         r"expert 'full_bin'.*pytorch_model\.bin.*arbitrary code.*allow_pickle=True", "pytorch_model.bin"),
    Case("A-pickle-bin", _A("lora0", "lora_bin"), MergeError,
         r"adapter 'lora_bin'.*adapter_model\.bin.*arbitrary code.*allow_pickle=True", "adapter_model.bin"),
    # --- recipes
    Case("recipe-unknown-key", lambda w, out: load_recipe(w["recipe_unknown"]), RecipeError,
         r"recipe_unknown\.yaml: parameters: unknown key\(s\) \['denisty'\]", "typo 'denisty'"),
    Case("recipe-missing-path", lambda w, out: load_recipe(w["recipe_missing"]), RecipeError,
         r"recipe_missing\.yaml: experts\[1\]\.path .*no_such_expert does not exist", "expert path missing"),
]

_MESSAGES: list[tuple[str, str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def _write_log():
    yield
    target = os.environ.get("SENS_PEFT_BAD_INPUTS_LOG")
    if target and _MESSAGES:
        lines = ["# Bad-input battery: exact error messages", "",
                 "Generated by `SENS_PEFT_BAD_INPUTS_LOG=... pytest tests/test_bad_inputs.py`.", ""]
        for cid, what, msg in _MESSAGES:
            lines += [f"- **{cid}** ({what}):", f"  `{msg}`", ""]
        Path(target).write_text("\n".join(lines))


def test_battery_size():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_cleanly(world, tmp_path, case):
    inputs = {k: hash_tree(v) if v.is_dir() else v.read_bytes() for k, v in world.items() if k != "root"}
    out = tmp_path / "out"
    with pytest.raises(case.error, match="(?s)" + case.match) as info:
        case.call(world, out)
    _MESSAGES.append((case.id, case.what, str(info.value).replace(str(world["root"]), "<root>")
                      .replace(str(tmp_path), "<tmp>")))
    # nothing written: no output, no temporary sibling (a pre-created output folder stays empty)
    left = [p.name for p in tmp_path.iterdir() if not (p == out and case.id.endswith("output-exists"))]
    assert left == [], left
    if out.exists():
        assert list(out.iterdir()) == []
    assert not any(p.name.startswith(".") for p in world["root"].rglob("*") if ".tmp-" in p.name)
    after = {k: hash_tree(v) if v.is_dir() else v.read_bytes() for k, v in world.items() if k != "root"}
    assert after == inputs


# ----------------------------------------------------------------------------------------- inputs that must work


def test_one_expert_merges_to_weight_times_expert(world, tmp_path):
    """One expert with sens: K·softmax over one expert is 1, so c == weight and the merge is weight × expert."""
    from safetensors.torch import load_file as load

    report = merge_models(world["base"], [world["full_s0"]], tmp_path / "one", method="task_arithmetic", sens="task",
                          weights=[0.5], **KW)
    assert torch.equal(report.coefficients.values, torch.full_like(report.coefficients.values, 0.5))
    base, exp = load(str(world["base"] / "model.safetensors")), load(str(world["full0"] / "model.safetensors"))
    out = load(str(tmp_path / "one" / "model.safetensors"))
    for name, b in base.items():
        torch.testing.assert_close(out[name], b + 0.5 * (exp[name] - b), rtol=0, atol=1e-6, msg=name)
    # LoRA, sens="task+cross": transferability of one expert is defined (c == 1)
    rep = merge_adapters(tiny_llama(seed=0), [world["s0"]], method="task_arithmetic", sens="task+cross", **KW)
    assert torch.equal(rep.coefficients.values, torch.ones_like(rep.coefficients.values))


def test_rank_pattern_adapter_merges_exactly(world):
    """rank_pattern / alpha_pattern adapters work: one expert, weight 1 reproduces PEFT's own delta."""
    from helpers import adapted_modules, lora_delta
    from peft import PeftModel

    report = merge_adapters(tiny_llama(seed=0), [world["lora_rank_pattern"]], method="task_arithmetic", sens=None,
                            **KW)
    model = report.model
    ref = PeftModel.from_pretrained(tiny_llama(seed=0), str(world["lora_rank_pattern"]))
    assert model.peft_config["lora_rank_pattern"].rank_pattern == {"v_proj": 2}
    mods = adapted_modules(model, "merged")
    assert any("v_proj" in m for m in mods)
    for m in mods:
        torch.testing.assert_close(lora_delta(model, "merged", m), lora_delta(ref, "default", m), rtol=1e-5,
                                   atol=1e-6)


def test_pickle_allowed_explicitly(world, tmp_path):
    merge_models(world["base"], [world["full_bin"]], tmp_path / "m", sens=None, allow_pickle=True, **KW)
    merge_adapters(tiny_llama(seed=0), [world["lora_bin"]], sens=None, allow_pickle=True, **KW)
