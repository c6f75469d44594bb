"""Two CPU processes under DDP (gloo) give the same scores as one process on the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sens_peft.store import load_sensitivity

WORKER = Path(__file__).parent / "scripts" / "ddp_worker.py"


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.distributed
def test_ddp_two_processes_equal_one(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(WORKER), str(tmp_path / "ddp"), "2"],
         tmp_path)
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), "4"], tmp_path)
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    assert r0["world"] == 2 and "DISTRIBUTED" in r0["parallel"]
    torch.testing.assert_close(r0["abs"], r1["abs"], rtol=0, atol=0)  # grads are all-reduced: identical
    ddp = load_sensitivity(tmp_path / "ddp" / "final")
    single = load_sensitivity(tmp_path / "single" / "final")
    assert ddp.metadata["during.num_steps"] == single.metadata["during.num_steps"] == "3"
    assert ddp.metadata["during.num_samples"] == single.metadata["during.num_samples"] == "12"
    torch.testing.assert_close(ddp.extra["during.tensor_scores"], single.extra["during.tensor_scores"],
                               rtol=1e-4, atol=1e-9)
    # the after pass ran on rank 0 on the trained weights: same weights, same scores
    torch.testing.assert_close(ddp.tensor_scores, single.tensor_scores, rtol=1e-4, atol=1e-9)
    assert not (tmp_path / "ddp" / "final" / "rank1").exists()
