"""Files that travel with an adapter or a merged model (sidecars, probes, merge cards, configs) name hub ids or
folder names, never this machine's absolute paths."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import make_full_expert, make_lora_adapter, save_model, tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData  # noqa: E402

from sens_peft import compute_sensitivity, merge_adapters, merge_models  # noqa: E402
from sens_peft.names import portable_name  # noqa: E402


def _leaks(folder: Path, needle: str) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


def test_portable_name():
    assert portable_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert portable_name("/home/alice/runs/base") == "base"
    assert portable_name("~/models/x") == "x"
    assert portable_name(None, "/tmp/y/base") == "base"
    assert portable_name("") is None


def test_no_local_paths_in_written_files(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = save_model(tiny_llama(seed=0), tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))  # its config now names the local folder
    adapters = []
    for k in range(2):
        folder = make_lora_adapter(tiny_llama, tmp_path / f"a{k}", seed=k + 1)
        compute_sensitivity(str(folder), TokenData(n=4, length=8, seed=k), base_model=base, save_to=folder,
                            calibration_samples=4, gram="full", fisher=False)
        adapters.append(folder)
    merge_adapters(AutoModelForCausalLM.from_pretrained(str(base_dir)), adapters, method="regmean", sens=None,
                   save_to=tmp_path / "merged_lora", device="cpu", progress=False)
    experts = [make_full_expert(tiny_llama(seed=0), tmp_path / f"x{k}", seed=k + 1) for k in range(2)]
    merge_models(base_dir, experts, tmp_path / "merged_full", method="task_arithmetic", sens=None, device="cpu",
                 progress=False)
    for folder in (*adapters, tmp_path / "merged_lora", tmp_path / "merged_full"):
        assert _leaks(folder, str(tmp_path)) == []
    assert "Captured statistics used: `gram`" in (tmp_path / "merged_lora" / "README.md").read_text()


def test_no_local_paths_from_recipes(tmp_path):
    """The recipe paths (sens-peft's schema and a mergekit YAML with base+adapter references), given as absolute
    paths, reach no written file: the recipe copies name folders only."""
    import yaml

    from sens_peft.cli import main

    save_model(tiny_llama(seed=0), tmp_path / "base")
    adapters = [make_lora_adapter(tiny_llama, tmp_path / f"a{k}", seed=k + 1) for k in range(2)]
    own = {"base_model": str(tmp_path / "base"), "method": "ties", "sens": None,
           "experts": [{"path": str(a), "density": 0.5} for a in adapters],
           "output": {"type": "full", "path": str(tmp_path / "merged_own")}}
    mergekit = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "float32",
                "models": [{"model": f"{tmp_path / 'base'}+{a}", "parameters": {"weight": 1.0, "density": 0.5}}
                           for a in adapters]}
    for name, recipe in (("own", own), ("mergekit", mergekit)):
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe))
        assert main(["merge", str(tmp_path / f"{name}.yml"), str(tmp_path / f"merged_{name}"), "--device", "cpu"]) == 0
        written = [f.name for f in (tmp_path / f"merged_{name}").iterdir()]
        assert ("mergekit_config.yml" if name == "mergekit" else "sens_peft_recipe.yaml") in written
        assert _leaks(tmp_path / f"merged_{name}", str(tmp_path)) == []
