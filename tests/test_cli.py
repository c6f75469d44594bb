"""The sens-peft CLI on tiny models: merge (YAML recipe), inspect, plot."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import make_lora_adapter, tiny_llama, write_sidecars
from safetensors.torch import load_file

from sens_peft import merge_adapters
from sens_peft.cli import main


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama(seed=0).save_pretrained(root / "base")
    folders = []
    for i, scores in enumerate(([1.0, 3.0], [2.0, 1.0], [1.0, 1.0])):
        folder = make_lora_adapter(lambda: tiny_llama(seed=0), root / f"e{i}", seed=10 + i)
        write_sidecars(folder, scores, probe_seed=i)
        folders.append(folder)
    return root, folders


def test_cli_merge_equals_api(experts, capsys):
    root, folders = experts
    recipe = {
        "base_model": "base",
        "experts": [{"path": f.name, "weight": w} for f, w in zip(folders, (1.0, 0.5, 1.0))],
        "method": "ties",
        "parameters": {"density": 0.5, "seed": 1},
        "sens": {"mode": "task+cross", "temperature": 2.0},
        "output": {"type": "lora", "path": "merged_cli"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(root / "recipe.yaml"), "--device", "cpu"]) == 0
    out = root / "merged_cli"
    assert yaml.safe_load((out / "sens_peft_recipe.yaml").read_text()) == recipe
    assert "layers.0" in capsys.readouterr().out

    api = merge_adapters(tiny_llama(seed=0), folders, save_to=root / "merged_api", method="ties", density=0.5, seed=1,
                         sens="task+cross", temperature=2.0, weights=[1.0, 0.5, 1.0], device="cpu")
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(root / "merged_api" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(out))
    assert loaded.peft_config["default"].r == api.details["rank"]


def test_cli_merge_bad_recipe(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("base_model: x\nexperts: [a]\nmethd: ties\n")
    assert main(["merge", str(tmp_path / "r.yaml")]) == 2
    assert "unknown key(s) ['methd']" in capsys.readouterr().err


def test_cli_merge_error_is_one_line_exit_2(experts, tmp_path, capsys):
    """A MergeError (here: importance without element maps in the sidecars) is one line on stderr, exit code 2;
    --debug raises it with its traceback."""
    from sens_peft.errors import MergeError

    root, folders = experts
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": str(root / "base"), "experts": [str(f) for f in folders],
                                      "method": "importance", "sens": None, "device": "cpu",
                                      "output": {"path": str(tmp_path / "out")}}))
    assert main(["merge", str(recipe)]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if "sens-peft merge:" in line]  # (transformers' progress bars aside)
    assert len(ours) == 1 and ours[0].startswith("sens-peft merge: error: ") and "element_maps" in ours[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    with pytest.raises(MergeError, match="element_maps"):
        main(["--debug", "merge", str(recipe)])


def test_cli_inspect(experts, capsys):
    _, folders = experts
    assert main(["inspect", *map(str, folders)]) == 0
    out = capsys.readouterr().out
    assert out.count("probe: 4 sequences x 8 tokens") == 3
    assert "layers.1" in out and "Task-specific coefficients" in out
    # expert e0 puts 3/4 of its sensitivity on layer 1: 75.0%
    assert "75.0%" in out


def test_cli_plot(experts, tmp_path):
    from PIL import Image

    _, folders = experts
    png = tmp_path / "fig.png"
    assert main(["plot", *map(str, folders), "-o", str(png)]) == 0
    image = Image.open(png)
    image.verify()
    image = Image.open(png)
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    layout = json.loads(image.info["Description"])
    assert layout["rows"] == ["layers.0", "layers.1"] and len(layout["columns"]) == 3


def test_cli_help_on_every_command(capsys):
    for cmd in ("merge", "inspect", "plot", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: sens-peft " + cmd in capsys.readouterr().out
