"""Speed and memory of sens-peft merges against the I/O floor, mergekit and PEFT, on the same inputs.

    python benchmarks/speed.py                 # full size: base + 3 experts of a 541M-parameter Llama shape
    python benchmarks/speed.py --small         # smoke run, tens of MB
    python benchmarks/speed.py --only floor,sens   # subsets: floor, sens, mergekit, adapters, callback, paired
    python benchmarks/speed.py --only paired --repeat 5   # floor and merge back to back: per-pair ratios
    python benchmarks/speed.py --scale [scale.py options]  # out-of-core: 3B base + 3 experts, cold page cache

Every measured job runs in a fresh subprocess; its peak RSS is that child's own ``ru_maxrss`` (from
``os.wait4``), so one job's memory never contaminates another's. Times are measured inside the child around
the merge call only (imports, model loading and interpreter start excluded); the whole-command wall time is
reported next to it.

Page-cache policy: warm cache. Before every job the parent reads every input file once (untimed) and calls
``os.sync()`` so that dirty pages left by the previous job's output are not written back during the next
one; outputs are deleted after each job. Writes are not fsync'ed by any of the tools (as in normal use). Once, before
the first job, a file of two models' size is written and deleted (untimed), so that the first job does not alone pay
for page-cache memory the VM has never used.

I/O floor: every input tensor read once and an output of the merged size written, three ways (``pread`` into
recycled buffers; memory map + one read of every byte; the same with the writes on a thread, overlapping the
reads as in a merge); the fastest is the floor of the table.

Paired ratios (``--only paired``): this VM's write speed drifts over minutes, so the floor of the table (measured
once, before the merges) can be far from the floor at the time of a merge. Each of ``--repeat`` rounds runs the three
floors and then each merge back to back, and the ratio of that round is the merge over the fastest of its floors;
the median over rounds is reported. TIES and DARE-TIES also run without the fused C loops (``SENS_PEFT_FUSED=0``,
"(torch ops)"), so each round measures what the loops gain.

Synthetic inputs (``make_synthetic.py``): base + K=3 full experts (base + N(0, 0.002²) deltas) in bf16,
sharded at 500 MB like ``save_pretrained(max_shard_size="500MB")``, each expert with a synthetic
``sensitivity.safetensors``; Sens runs pass an explicit transferability matrix, so no model forward runs.
mergekit runs from its own virtual environment (``--mergekit-python``, default /work/mk-venv/bin/python)
through a tiny script that calls its public Python API; it is not a dependency of this project.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_synthetic as syn  # noqa: E402

K = 3
DENSITY = 0.5
TRANSFER = [[1.0, 0.82, 0.71], [0.88, 1.0, 0.64], [0.76, 0.85, 1.0]]
METHODS = ("task_arithmetic", "ties", "dare_ties")
SHORT = {"task_arithmetic": "TA", "ties": "TIES", "dare_ties": "DARE-TIES"}


def _maxrss_mb(ru_maxrss: int) -> float:
    # Linux reports KiB, macOS bytes.
    return ru_maxrss / 1024 if sys.platform != "darwin" else ru_maxrss / 2**20


def _result(payload: dict) -> None:
    payload.setdefault("self_peak_rss_mb", _maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    print("RESULT " + json.dumps(payload), flush=True)


# --------------------------------------------------------------------------------------------- child jobs


def job_floor(args: dict) -> None:
    """Read every input tensor once (base + experts) and write an output of the merged size (the base's tensors).

    ``mode="pread"``: each tensor's bytes are read with ``pread`` into recycled buffers (every byte copied out of
    the page cache once); ``mode="mmap"``: each tensor's byte range is memory-mapped and every byte is read once (a
    max over it), without a copy. Either way the output is streamed to its planned shards as it comes, with the
    library's writer, after the tensor's reads (read and write times add up). ``mode="overlap"``: as ``mmap``, but
    the writes run on the library's writer thread while the next tensors are read, as in a merge (the time is then
    about the larger of the two). All are honest floors (every input byte passes through the CPU once); the table
    uses the fastest.
    """
    import torch

    from sens_peft.io import BufferPool, TensorSource

    base = Path(args["base"])
    folders = [base, *map(Path, args["experts"])]
    out = Path(args["out"])
    max_bytes = syn.parse_size(args["shard_size"])
    mapped = args["mode"] in ("mmap", "overlap")
    overlap = args["mode"] == "overlap"
    t0 = time.perf_counter()
    sources = [TensorSource(f) for f in folders]
    pool = BufferPool(max_idle_bytes=1 << 30)  # room for the K+1 largest tensors: every read reuses memory
    entries = [(name, sources[0].shape(name), sources[0].dtype(name)) for name in sources[0].names()]
    writer = syn.StreamedShardWriter(out, entries, max_bytes, background=overlap)
    read_s = write_s = 0.0
    for idx in writer.order:
        name = entries[idx][0]
        ta = time.perf_counter()
        tensors = [src.get(name, pool, mapped=mapped) for src in sources]
        if mapped:
            for t in tensors:  # read every byte once
                raw = t.reshape(-1).view(torch.uint8)
                (raw.view(torch.int32) if raw.numel() % 4 == 0 else raw).max()  # int max is vectorized, sum is not
        tb = time.perf_counter()
        writer.write(name, tensors[0])
        write_s += time.perf_counter() - tb
        read_s += tb - ta
        if not overlap:  # (mapped tensors are not pooled; the writer thread may still hold the base)
            for t in tensors:
                pool.give(t)
        del tensors
    writer.close()
    seconds = time.perf_counter() - t0
    _result({"seconds": seconds, "read_s": read_s, "write_s": write_s})


def job_seqread(args: dict) -> None:
    """Read every input file from start to end in 16 MiB ``readinto`` calls (no parsing, no writes): the disk's
    sequential read speed when the page cache was dropped before (the scale test), memory speed otherwise."""
    folders = [Path(args["base"]), *map(Path, args["experts"])]
    buf = bytearray(16 << 20)
    total = 0
    t0 = time.perf_counter()
    for folder in folders:
        for path in syn.input_files(folder):
            with open(path, "rb", buffering=0) as fh:
                while got := fh.readinto(buf):
                    total += got
    seconds = time.perf_counter() - t0
    _result({"seconds": seconds, "bytes": total, "gb_per_s": total / seconds / 1e9})


def job_sens(args: dict) -> None:
    """sens-peft merge_models with one method, plain or Sens; ``fused=False``: without the fused C loops."""
    if args.get("fused") is False:
        os.environ["SENS_PEFT_FUSED"] = "0"  # read when the loops are first needed
    import torch

    from sens_peft import merge_models

    kwargs = dict(method=args["method"], max_shard_size=args["shard_size"], overwrite=True,
                  device=args.get("device", "cpu"),
                  progress=False)
    if args["method"] != "task_arithmetic":
        kwargs["density"] = DENSITY
    if args["sens"]:
        kwargs.update(sens="task+cross", transferability=torch.tensor(TRANSFER))
    else:
        kwargs["sens"] = None
    t0 = time.perf_counter()
    try:
        report = merge_models(args["base"], args["experts"], args["out"], **kwargs)
    except TypeError as err:  # older signature without progress=
        if "progress" not in str(err):
            raise
        kwargs.pop("progress")
        t0 = time.perf_counter()
        report = merge_models(args["base"], args["experts"], args["out"], **kwargs)
    seconds = time.perf_counter() - t0
    coeffs = report.coefficients.summary() if getattr(report, "coefficients", None) is not None else None
    _result({"seconds": seconds, "report_seconds": getattr(report, "seconds", None),
             "coefficients": _jsonable(coeffs)})


def job_profile(args: dict) -> None:
    """job_sens under cProfile; writes the top functions by cumulative and internal time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        job_sens(args)
    finally:
        prof.disable()
        for key in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.get("top", 30))
            Path(args["profile_out"] + f".{key}.txt").write_text(buf.getvalue())


def _jsonable(obj):
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    try:
        return float(obj)
    except Exception:
        return str(obj)


def job_adapters(args: dict) -> None:
    """One LoRA merge of K adapters loaded into one PeftModel: sens-peft merge_adapters or PEFT's
    add_weighted_adapter. Only the merge call is timed."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(args["base"], dtype=torch.float32)
    names = [f"e{k}" for k in range(len(args["experts"]))]
    model = PeftModel.from_pretrained(model, args["experts"][0], adapter_name=names[0])
    for name, folder in zip(names[1:], args["experts"][1:]):
        model.load_adapter(folder, adapter_name=name)
    impl, method = args["impl"], args["method"]
    t0 = time.perf_counter()
    if impl == "peft":
        kw = {"density": DENSITY, "majority_sign_method": "total"} if method != "cat" else {}
        model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=method, **kw)
    else:
        from sens_peft import merge_adapters

        kw = dict(method=method, adapter_name="merged", output="lora", device="cpu")
        if method != "task_arithmetic":
            kw["density"] = DENSITY
        if args.get("sens"):
            kw.update(sens="task+cross", transferability=torch.tensor(TRANSFER),
                      sensitivities=list(args["experts"]))
        else:
            kw["sens"] = None
        merge_adapters(model, names, **kw)
    seconds = time.perf_counter() - t0
    _result({"seconds": seconds})


def job_callback(args: dict) -> None:
    """Median optimizer-step time of a Trainer run with and without SensitivityCallback(mode='during'), runs
    interleaved (plain, during, plain, during), and the time of the 'after' calibration pass."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from sens_peft import SensitivityCallback, SensitivityConfig

    small = args["small"]
    cfg = LlamaConfig(hidden_size=128 if small else 512, intermediate_size=352 if small else 1408,
                      num_hidden_layers=2 if small else 4, num_attention_heads=4 if small else 8,
                      num_key_value_heads=4 if small else 8, vocab_size=1000 if small else 8000,
                      max_position_embeddings=512, tie_word_embeddings=False)
    seq, batch = (64, 4) if small else (256, 4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (256, seq), generator=gen)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    steps, warm = (8, 2) if small else (args.get("steps", 25), 3)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.end: list[float] = []

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            self.end.append(time.perf_counter())

    def build(lora: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(syn.LORA_TARGETS)))
        return model

    def timed_events(callback, spent: list[float]) -> None:
        """Time every event method of ``callback`` (its own work, summed per optimizer step): a direct measure of
        its cost that the noise between whole training steps (±5 % here) does not blur."""
        for event in [e for e in dir(callback) if e.startswith("on_")]:
            inner = getattr(callback, event)

            def wrapped(*a, _inner=inner, _event=event, **k):
                t = time.perf_counter()
                try:
                    return _inner(*a, **k)
                finally:
                    if _event not in ("on_train_end", "on_train_begin"):
                        spent.append(time.perf_counter() - t)

            setattr(callback, event, wrapped)

    def run(lora: bool, sens_mode: str | None, out: str, spent: list[float] | None = None):
        model = build(lora)
        timer_before, timer_after = StepTimer(), StepTimer()
        callbacks = [timer_before]
        if sens_mode:
            callback = SensitivityCallback(SensitivityConfig(mode=sens_mode, task="bench",
                                                             calibration_samples=args.get("calib", 32)),
                                           calibration_data=data.select(range(64)))
            if spent is not None:
                timed_events(callback, spent)
            callbacks.append(callback)
        callbacks.append(timer_after)
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                                  learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to=[],
                                  use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
        step_times = [b - a for a, b in zip(timer_after.marks, timer_after.marks[1:])][warm - 1:]
        end_pass = timer_after.end[0] - timer_before.end[0] if timer_before.end and timer_after.end else None
        return step_times, total, end_pass

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lora in (True, False):
            kind = "lora" if lora else "full"
            plain, during, spent = [], [], []
            for rep in range(2):
                plain += run(lora, None, f"{tmp}/p{rep}")[0]
                during += run(lora, "during", f"{tmp}/d{rep}", spent)[0]
            p_steps, p_total, _ = run(lora, None, f"{tmp}/pa")
            a_steps, a_total, after_s = run(lora, "after", f"{tmp}/a")
            mp, md = statistics.median(plain), statistics.median(during)
            own = sum(spent) / (2 * steps)  # the callback's own time per optimizer step (all its events)
            results[kind] = {
                "step_s_plain": mp, "step_s_during": md, "during_ratio": md / mp,
                "callback_s_per_step": own, "callback_share": own / mp,
                "step_s_plain_all": plain, "step_s_during_all": during,
                "train_s_plain": p_total, "train_s_with_after": a_total, "after_pass_s": after_s,
                "after_pass_in_steps": (after_s / mp) if after_s else None,
                "after_fraction_of_train": (after_s / p_total) if after_s else None,
                "steps": steps, "batch": batch, "seq": seq,
            }
    results["model"] = {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
                        "params_m": sum(p.numel() for p in build(False).parameters()) / 1e6}
    _result({"seconds": None, "callback": results})


# --------------------------------------------------------------------------------------------- parent

MK_RUNNER = '''
import json, resource, sys, time
t0 = time.perf_counter()
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
t1 = time.perf_counter()
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
opts = dict(device="cpu", copy_tokenizer=False, lazy_unpickle=False, quiet=True, out_shard_size=int(sys.argv[3]))
try:
    options = MergeOptions(**opts)
except Exception:
    opts.pop("quiet")
    options = MergeOptions(**opts)
run_merge(cfg, sys.argv[2], options=options)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"seconds": t2 - t1, "import_s": t1 - t0,
      "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
'''


def mergekit_yaml(method: str, base: Path, experts: list[Path]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for e in experts:
        lines += [f"  - model: {e}", "    parameters:", "      weight: 1.0"]
        if method != "task_arithmetic":
            lines.append(f"      density: {DENSITY}")
    lines += ["parameters:", "  normalize: false", "  lambda: 1.0", "dtype: bfloat16", ""]
    return "\n".join(lines)


def in_child(fn, *args):
    """``fn(*args)`` in a spawned process: generating inputs would otherwise grow this parent, and a child's
    ``ru_maxrss`` starts from the RSS of the parent that spawned it (Linux keeps the high-water mark across fork and
    exec), which would inflate every later job's peak RSS."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def warm_cache(folders: list[Path]) -> float:
    t0 = time.perf_counter()
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                with open(f, "rb") as h:
                    while h.read(64 << 20):
                        pass
    return time.perf_counter() - t0


def prime_writes(folder: Path, nbytes: int) -> None:
    """Write and delete a file of ``nbytes`` once, untimed. On this VM the first write into never-used page-cache
    memory ran ~10x slower than later ones (2.1 s vs 0.19 s for 1 GB); without this the first job alone pays it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prime.bin"
    block = b"\0" * (64 << 20)
    with open(path, "wb") as fh:
        for _ in range(max(1, nbytes // len(block))):
            fh.write(block)
    path.unlink()
    os.sync()


def _sample_rss(pid: int, peak: dict) -> None:
    """Peak of the child's anonymous and file-backed resident memory (kB), sampled from /proc every 20 ms.
    ru_maxrss counts pages of mmap'ed input files that were touched (safetensors reads through mmap), so it
    overstates the memory a merge really needs; RssAnon is the part that is the process's own."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
    except (OSError, ValueError, IndexError):
        pass


THREADS: int | None = None


def run_child(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run ``cmd``; return its RESULT payload plus wall time and the child's own peak RSS (os.wait4)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    if THREADS:
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = t0 + timeout
        peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            _sample_rss(proc.pid, peak)
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    payload: dict = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            payload = json.loads(line[len("RESULT "):])
    payload.update(whole_s=wall, peak_rss_mb=_maxrss_mb(usage.ru_maxrss), rc=proc.returncode,
                   peak_anon_mb=peak["RssAnon"] / 1024, peak_file_mapped_mb=peak["RssFile"] / 1024,
                   peak_vmrss_mb=peak["VmRSS"] / 1024, cpu_user_s=usage.ru_utime, cpu_sys_s=usage.ru_stime,
                   load_before=load_before, load_after=os.getloadavg()[0])
    if proc.returncode != 0 or "seconds" not in payload:
        tail = "\n".join(text.splitlines()[-15:])
        payload["error"] = f"rc={proc.returncode}: {tail}"
    return payload


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        model = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        info["cpu"] = model[0] if model else None
        mem = [line for line in open("/proc/meminfo") if line.startswith("MemTotal")]
        info["mem_gb"] = round(int(mem[0].split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def fmt(x, spec=".2f", suffix=""):
    return "–" if x is None else f"{x:{spec}}{suffix}"


def build_table(jobs: dict, floor_key: str) -> str:
    floor = jobs.get(floor_key, {}).get("seconds")
    rows = ["| job | merge s | whole cmd s | × floor | × reference | × plain | peak RSS MB | peak anon MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, job in jobs.items():
        if job.get("seconds") is None and "error" not in job:
            continue
        s = job.get("seconds")
        ratio_floor = s / floor if s and floor else None
        mk = ratio_plain = None
        if key.startswith("sens-peft "):
            method = key.split()[1]
            mk_s = jobs.get(f"mergekit {method}", {}).get("seconds")
            mk = s / mk_s if s and mk_s else None
            if key.endswith("+Sens"):
                plain_s = jobs.get(key.replace(" +Sens", ""), {}).get("seconds")
                ratio_plain = s / plain_s if s and plain_s else None
        if key.startswith("adapters "):
            ratio_floor = None
            ref = None
            if key.startswith("adapters sens-peft TA"):
                ref = jobs.get("adapters PEFT cat", {}).get("seconds")
            elif key.startswith("adapters sens-peft TIES"):
                ref = jobs.get("adapters PEFT ties_svd", {}).get("seconds")
            mk = s / ref if s and ref else None
            if key.endswith("+Sens"):
                plain_key = "adapters sens-peft TA (lora)" if " TA " in key else "adapters sens-peft TIES (svd)"
                plain_s = jobs.get(plain_key, {}).get("seconds")
                ratio_plain = s / plain_s if s and plain_s else None
        err = " (error)" if "error" in job else ""
        rows.append(f"| {key}{err} | {fmt(s)} | {fmt(job.get('whole_s'))} | {fmt(ratio_floor, '.2f', '×')} | "
                    f"{fmt(mk, '.3f', '×')} | {fmt(ratio_plain, '.3f', '×')} | {fmt(job.get('peak_rss_mb'), '.0f')} | "
                    f"{fmt(job.get('peak_anon_mb'), '.0f')} |")
    return "\n".join(rows)


def main() -> None:
    if "--scale" in sys.argv[1:]:  # the out-of-core test has its own options (benchmarks/scale.py)
        import scale

        scale.main([a for a in sys.argv[1:] if a != "--scale"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sens_peft_speed")
    parser.add_argument("--small", action="store_true", help="tens-of-MB smoke run")
    parser.add_argument("--only", default="floor,sens,mergekit,adapters,callback",
                        help="comma-separated parts: floor, sens, mergekit, adapters, callback, profile, paired")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per sens-peft/floor job (min is reported)")
    parser.add_argument("--shard-size", default="500MB", help="input and output shard size (all tools)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every child (all tools alike); "
                        "default: torch's default (one per core)")
    parser.add_argument("--device", default="cpu", help="device= for merge_models (cpu, cuda)")
    parser.add_argument("--shape", help="custom full-model shape 'hidden,intermediate,layers,vocab' "
                        "(e.g. 4096,11008,4,32000 for 7B-like tensors)")
    parser.add_argument("--mergekit-python", default="/work/mk-venv/bin/python")
    parser.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    parser.add_argument("--skip", help="comma-separated substrings of job names to skip (e.g. '+Sens')")
    parser.add_argument("--append", action="store_true", help="keep the jobs already in --out that this run "
                        "does not re-measure")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--job-args", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.job:
        {"floor": job_floor, "sens": job_sens, "adapters": job_adapters, "callback": job_callback,
         "profile": job_profile, "seqread": job_seqread}[args.job](json.loads(args.job_args))
        return

    global THREADS
    THREADS = args.threads
    parts = set(args.only.split(","))
    methods = [m for m in args.methods.split(",") if m]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    shape = syn.SMALL_SHAPE if args.small else syn.FULL_SHAPE
    tag = "full_small" if args.small else "full"
    if args.shape:
        hidden, inter, layers, vocab = (int(v) for v in args.shape.split(","))
        shape = syn.ModelShape(hidden, inter, layers, hidden // 128, hidden // 128, vocab)
        tag = "full_" + args.shape.replace(",", "_")
    t0 = time.perf_counter()
    base, experts = in_child(syn.make_full_experts, work / tag, shape, K, args.shard_size)
    gen_s = time.perf_counter() - t0
    model_gb = syn.folder_bytes(base) / 1e9
    print(f"inputs: base + {K} experts, {shape.num_params() / 1e6:.0f}M params, {model_gb:.2f} GB each "
          f"(bf16, {len(syn.input_files(base))} shards; ready in {gen_s:.0f} s)", flush=True)
    result: dict = {
        "machine": machine_info(),
        "inputs": {"shape": shape.__dict__, "num_experts": K, "params_m": shape.num_params() / 1e6,
                   "gb_per_model": model_gb, "shard_size": args.shard_size, "dtype": "bfloat16",
                   "delta": "base + N(0, 0.002^2)", "small": args.small},
        "settings": {"density": DENSITY, "weights": 1.0, "lambda": 1.0, "normalize": False,
                     "transferability": TRANSFER, "page_cache": "warm: every input file read once (untimed) "
                     "and os.sync() before each job; outputs deleted after each job; no fsync; one untimed "
                     "write+delete of 2 models' size before the first job",
                     "timing": "inside the child around the merge call; whole_s = whole subprocess"},
        "device": args.device,
        "threads": args.threads,
        "load_start": os.getloadavg(),
        "jobs": {},
    }
    if args.append and Path(args.out).exists():
        # Keep jobs measured by an earlier run (e.g. split across sessions); re-measured ones are replaced.
        old = json.loads(Path(args.out).read_text())
        result["jobs"] = old.get("jobs", {})
        for key in ("callback", "callback_error", "paired"):
            if key in old:
                result[key] = old[key]
        result["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("load_start", "load_end", "threads", "sens_peft_commit")}]
    result["sens_peft_commit"] = _git_head()
    jobs = result["jobs"]
    me = [sys.executable, str(Path(__file__).resolve())]
    out_root = work / "out"
    common = {"base": str(base), "experts": [str(e) for e in experts], "shard_size": args.shard_size,
              "device": args.device}

    skip = [x for x in (args.skip or "").split(",") if x]
    prime_writes(work / "prime", int(2 * model_gb * 1e9))

    def run_once(key: str, cmd_fn, rep: int) -> dict:
        if out_root.exists():
            shutil.rmtree(out_root)
        os.sync()
        warm_cache([base, *experts])
        return run_child(cmd_fn(), logs / f"{key.replace(' ', '_').replace('+', '')}.{rep}.log", args.timeout)

    def measure(key: str, cmd_fn, repeat: int = 1) -> None:
        if any(x in key for x in skip):
            return
        best = None
        runs = []
        for rep in range(repeat):
            payload = run_once(key, cmd_fn, rep)
            runs.append(payload.get("seconds"))
            if best is None or (payload.get("seconds") or 1e18) < (best.get("seconds") or 1e18):
                best = payload
        if repeat > 1:
            best["runs_s"] = runs
        jobs[key] = best
        msg = best.get("error", "").splitlines()[-1:] if "error" in best else ""
        print(f"  {key:32s} {fmt(best.get('seconds'), '8.2f')} s  whole {fmt(best.get('whole_s'), '7.1f')} s  "
              f"rss {fmt(best.get('peak_rss_mb'), '6.0f')} MB  anon {fmt(best.get('peak_anon_mb'), '6.0f')} MB  load {best['load_before']:.1f} {msg}", flush=True)
        if out_root.exists():
            shutil.rmtree(out_root)
        result["load_end"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    def job_cmd(name: str, **extra):
        return lambda: [*me, "--job", name, "--job-args", json.dumps({**common, "out": str(out_root), **extra})]

    if "floor" in parts:
        measure("floor (pread all + streamed write)", job_cmd("floor", mode="pread"), max(args.repeat, 2))
        measure("floor (mmap, read all + streamed write)", job_cmd("floor", mode="mmap"), max(args.repeat, 2))
        measure("floor (mmap, read all + writes on a thread)", job_cmd("floor", mode="overlap"), max(args.repeat, 2))
    if "sens" in parts:
        for method in methods:
            measure(f"sens-peft {SHORT[method]}", job_cmd("sens", method=method, sens=False), args.repeat)
            measure(f"sens-peft {SHORT[method]} +Sens", job_cmd("sens", method=method, sens=True), args.repeat)
    if "paired" in parts:
        rounds = []
        for rep in range(args.repeat):
            floor_s = min(run_once(f"paired floor {mode}", job_cmd("floor", mode=mode), rep).get("seconds") or 1e18
                          for mode in ("pread", "mmap", "overlap"))
            row = {"floor_s": floor_s}
            for method in methods:
                # the same merge without the fused C loops (sens_peft/fused.py): their gain, measured in this run
                variants = [(False, True, ""), (True, True, " +Sens")]
                if method in ("ties", "dare_ties"):
                    variants.append((False, False, " (torch ops)"))
                for sens, fused, suffix in variants:
                    key = f"sens-peft {SHORT[method]}{suffix}"
                    if any(x in key for x in skip):
                        continue
                    cmd = job_cmd("sens", method=method, sens=sens, fused=fused)
                    row[key] = run_once(f"paired {key}", cmd, rep).get("seconds")
            rounds.append(row)
            print(f"  paired round {rep}: floor {floor_s:.2f} s, " + ", ".join(
                f"{k.removeprefix('sens-peft ')} {v / floor_s:.2f}×" for k, v in row.items() if k != "floor_s" and v),
                flush=True)
        summary = {}
        for key in (k for k in rounds[0] if k != "floor_s"):
            ratios = [r[key] / r["floor_s"] for r in rounds if r.get(key)]
            if ratios:
                summary[key] = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                                "max_ratio": max(ratios), "median_s": statistics.median(r[key] for r in rounds)}
        for key in [k for k in summary if k.endswith(" (torch ops)")]:
            fused_key = key.removesuffix(" (torch ops)")
            gains = [r[key] / r[fused_key] for r in rounds if r.get(key) and r.get(fused_key)]
            if gains:
                summary[key]["median_torch_ops_over_fused"] = statistics.median(gains)
        result["paired"] = {"rounds": rounds, "summary": summary,
                            "floor_s_median": statistics.median(r["floor_s"] for r in rounds)}
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "profile" in parts:
        for method in methods:
            prof = str(work / f"speed_profile_{method}")
            measure(f"profile {SHORT[method]}", job_cmd("profile", method=method, sens=False, profile_out=prof))
    if "mergekit" in parts:
        if not Path(args.mergekit_python).exists():
            print(f"  mergekit skipped: {args.mergekit_python} not found", flush=True)
        else:
            runner = work / "mk_runner.py"
            runner.write_text(MK_RUNNER)
            for method in methods:
                cfg = work / f"mk_{method}.yml"
                cfg.write_text(mergekit_yaml(method, base, experts))
                measure(f"mergekit {SHORT[method]}", lambda c=cfg: [
                    args.mergekit_python, str(runner), str(c), str(out_root), str(syn.parse_size(args.shard_size))])
    if "adapters" in parts:
        lshape = syn.LORA_SMALL_SHAPE if args.small else syn.LORA_SHAPE
        lbase, lexperts = in_child(syn.make_lora_experts, work / ("lora_small" if args.small else "lora"), lshape,
                                   K)
        result["inputs"]["lora"] = {"shape": lshape.__dict__, "rank": 16, "targets": list(syn.LORA_TARGETS),
                                    "note": "smaller shape than the full-model part: PEFT ties_svd runs one SVD "
                                            "per module on the CPU"}
        lcommon = {"base": str(lbase), "experts": [str(e) for e in lexperts]}

        def acmd(**extra):
            return lambda: [*me, "--job", "adapters", "--job-args", json.dumps({**lcommon, **extra})]

        measure("adapters PEFT cat", acmd(impl="peft", method="cat"))
        measure("adapters sens-peft TA (lora)", acmd(impl="sens", method="task_arithmetic"))
        measure("adapters sens-peft TA +Sens", acmd(impl="sens", method="task_arithmetic", sens=True))
        measure("adapters PEFT ties_svd", acmd(impl="peft", method="ties_svd"))
        measure("adapters sens-peft TIES (svd)", acmd(impl="sens", method="ties"))
        measure("adapters sens-peft TIES +Sens", acmd(impl="sens", method="ties", sens=True))
    if "callback" in parts:
        payload = run_child([*me, "--job", "callback", "--job-args", json.dumps({"small": args.small})],
                            logs / "callback.log", args.timeout)
        result["callback"] = payload.get("callback")
        if "error" in payload:
            result["callback_error"] = payload["error"]
            print("  callback error:", payload["error"].splitlines()[-1:], flush=True)
        else:
            for kind, r in payload["callback"].items():
                if kind != "model":
                    print(f"  callback {kind}: step {r['step_s_plain'] * 1e3:.0f} ms plain, "
                          f"{r['step_s_during'] * 1e3:.0f} ms during ({r['during_ratio']:.3f}×); after pass "
                          f"{fmt(r['after_pass_s'])} s = {fmt(r['after_pass_in_steps'], '.1f')} steps", flush=True)

    floors = [k for k in jobs if k.startswith("floor") and jobs[k].get("seconds")]
    floor_key = min(floors, key=lambda k: jobs[k]["seconds"]) if floors else "floor"
    result["floor_key"] = floor_key
    table = build_table(jobs, floor_key)
    result["table_markdown"] = table
    result["load_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print()
    print(table)
    if result.get("paired"):
        print()
        print(f"Paired rounds ({len(result['paired']['rounds'])}; floor median "
              f"{result['paired']['floor_s_median']:.2f} s): merge / floor of the same round")
        print("| job | median s | median × floor | min × | max × |")
        print("|---|---:|---:|---:|---:|")
        for key, r in result["paired"]["summary"].items():
            print(f"| {key} | {r['median_s']:.2f} | {r['median_ratio']:.2f}× | {r['min_ratio']:.2f}× | "
                  f"{r['max_ratio']:.2f}× |")
        for key, r in result["paired"]["summary"].items():
            if "median_torch_ops_over_fused" in r:
                print(f"{key} / fused, same round (median): {r['median_torch_ops_over_fused']:.2f}×")
    if result.get("callback"):
        print()
        print("| callback | step plain ms | step during ms | ratio | callback's own ms/step | 1 + own/plain "
              "| after pass s | after in steps |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for kind, r in result["callback"].items():
            if kind != "model":
                own = r.get("callback_s_per_step")
                print(f"| {kind} | {r['step_s_plain'] * 1e3:.0f} | {r['step_s_during'] * 1e3:.0f} | "
                      f"{r['during_ratio']:.3f}× | {fmt(own * 1e3 if own is not None else None, '.1f')} | "
                      f"{fmt(1 + r['callback_share'] if own is not None else None, '.3f', '×')} | "
                      f"{fmt(r['after_pass_s'])} | {fmt(r['after_pass_in_steps'], '.1f')} |")
    print(f"\nload average start {result['load_start'][0]:.2f}, end {result['load_end'][0]:.2f}; "
          f"results in {args.out}")


if __name__ == "__main__":
    main()
