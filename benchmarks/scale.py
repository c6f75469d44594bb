"""Out-of-core scale test: merges whose inputs are larger than the page cache can hold, read cold from disk.

    python benchmarks/speed.py --scale                  # = python benchmarks/scale.py: 3B base + 3 experts
    python benchmarks/scale.py --layers 4 --keep        # shorter model, keep the inputs for a rerun
    python benchmarks/scale.py --small                  # functional smoke run (tens of MB)

Inputs (``make_synthetic.make_full_experts(generator="tiled")``): a Llama-shaped base of 3.02B parameters in bf16
(hidden 3072, intermediate 8192, 28 layers, 24 heads / 8 KV heads, vocab 32000, untied head: 6.04 GB) and K = 3
full experts (base + deltas of std 0.001-0.004), sharded at 5 GB like ``save_pretrained``'s default: 24.2 GB of
inputs, on a machine with 23.5 GiB of RAM. Every 2-D tensor is a window into a random block (see
``TiledValues``), so generating them costs the disk's write time, not 12 billion Gaussian draws; the realism of the
deltas (spread, sign agreement between experts) is checked against full draws in the same run.

Before every job: the previous output is deleted, ``sync``, and the page cache is dropped (``echo 3 >
/proc/sys/vm/drop_caches`` as root; otherwise ``posix_fadvise(DONTNEED)`` on every input file, which evicts their
clean pages without root). Each job then runs in a fresh subprocess (``speed.run_child``: times inside the child
around the work, peak RSS from ``wait4`` and sampled ``/proc/<pid>/status``); the parent samples
``/proc/meminfo`` (MemAvailable, swap) and reads the device's ``/sys/dev/block/*/stat`` (bytes read / written by
the disk during the job) and ``/proc/vmstat`` (pswpin / pswpout) before and after.

Jobs per round: the cold floors of ``speed.job_floor`` (every input tensor read once, an output of the merged size
written: ``pread`` into recycled buffers, and memory maps with the writes on a thread) and, once, a plain
sequential read of every input file in 16 MiB blocks (the disk's sequential read speed); then ``merge_models``
with TA, TIES, DARE-TIES (density 0.5, weights 1, no Sens). Each merge is divided by the fastest floor of its own
round. The synthetic files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_synthetic as syn  # noqa: E402
import speed  # noqa: E402

SCALE_SHAPE = dict(hidden=3072, intermediate=8192, heads=24, kv_heads=8, vocab=32000)
GOALS = {"ratio": 1.3, "peak_rss_mb": 2000.0}


def scale_shape(layers: int) -> syn.ModelShape:
    return syn.ModelShape(layers=layers, **SCALE_SHAPE)


# --------------------------------------------------------------------------------------------- machine state


def _block_device(path: Path) -> Path | None:
    """/sys/dev/block/<major>:<minor> of the device holding ``path`` (None on overlay or tmpfs)."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    return dev if (dev / "stat").exists() else None


def _disk_bytes(dev: Path | None) -> tuple[int, int] | None:
    """(bytes read, bytes written) by the device since boot (sectors of 512 bytes, whatever the disk's)."""
    if dev is None:
        return None
    fields = (dev / "stat").read_text().split()
    return int(fields[2]) * 512, int(fields[6]) * 512


def _read_ahead_kb(dev: Path | None) -> int | None:
    if dev is None:
        return None
    for queue in (dev / "queue", dev / ".." / "queue"):  # a partition's queue is its disk's
        if (queue / "read_ahead_kb").exists():
            return int((queue / "read_ahead_kb").read_text())
    return None


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])  # kB
    return out


def _vmstat(keys=("pswpin", "pswpout", "pgmajfault")) -> dict[str, int]:
    with open("/proc/vmstat") as fh:
        pairs = (line.split() for line in fh)
        return {k: int(v) for k, v in pairs if k in keys}


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot (/proc/stat; iowait counts as idle)."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals[:8]) - idle, sum(vals[:8])


class MemorySampler:
    """Lowest MemAvailable and highest swap use of the whole machine while a job runs (every 0.25 s)."""

    def __init__(self) -> None:
        self.min_available_kb = None
        self.max_swap_used_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            info = _meminfo()
            avail = info.get("MemAvailable", 0)
            self.min_available_kb = avail if self.min_available_kb is None else min(self.min_available_kb, avail)
            self.max_swap_used_kb = max(self.max_swap_used_kb, info.get("SwapTotal", 0) - info.get("SwapFree", 0))
            self._stop.wait(0.25)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def drop_page_cache(folders: list[Path], mode: str) -> str:
    """Empty the page cache of the inputs; returns the way it was done (``drop_caches`` or ``fadvise``)."""
    os.sync()
    if mode in ("auto", "drop"):
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            if mode == "drop":
                raise
    for folder in folders:  # clean pages of these files only; works without root
        for path in folder.iterdir():
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return "fadvise"


# --------------------------------------------------------------------------------------------- realism


def tiled_realism(num_experts: int = 3, delta_std: float = 0.002) -> dict:
    """Deltas of one up_proj-sized tensor from the tiled generator against full Gaussian draws (same std):
    spread (quantiles of |delta|), exact zeros after bf16 rounding, and the fraction of entries where all experts
    agree in sign (independent signs: 0.25 for 3 experts), which is what TIES thresholds and elects from."""
    import torch

    shape = (SCALE_SHAPE["intermediate"], SCALE_SHAPE["hidden"])
    name = "model.layers.0.mlp.up_proj.weight"
    tiled = syn.TiledValues(num_experts, delta_std)
    gen = torch.Generator().manual_seed(0)
    base = syn._base_tensor(name, shape)
    drawn = [base] + [(base.float() + delta_std * torch.randn(shape, generator=gen)).to(torch.bfloat16)
                      for _ in range(num_experts)]

    def stats(models) -> dict:
        deltas = [m.float() - models[0].float() for m in models[1:]]
        signs = torch.stack([d.sign() for d in deltas])
        agree = (signs == signs[0]).all(0) & (signs[0] != 0)
        sample = deltas[0].abs().flatten()[: 1 << 22]
        quant = torch.quantile(sample, torch.tensor([0.1, 0.5, 0.9, 0.99]))
        return {"delta_std": [round(float(d.std()), 6) for d in deltas],
                "abs_delta_quantiles_10_50_90_99_over_std": [round(float(q) / float(deltas[0].std()), 4)
                                                             for q in quant],
                "exact_zero_fraction": round(float((deltas[0] == 0).float().mean()), 4),
                "all_experts_same_sign": round(float(agree.float().mean()), 4),
                "corr_expert1_expert2": round(float(torch.corrcoef(torch.stack(
                    [deltas[0].flatten(), deltas[1].flatten()]))[0, 1]), 4)}

    return {"tensor": f"{name} {list(shape)}",
            "tiled": stats([tiled.tensor(k, name, shape) for k in range(num_experts + 1)]),
            "randn": stats(drawn)}


# --------------------------------------------------------------------------------------------- run


def run_cold(key: str, cmd: list[str], folders: list[Path], out_root: Path, logs: Path, ctx: dict) -> dict:
    """One job from a cold page cache, with the disk's and the machine's memory counters around it."""
    if out_root.exists():
        shutil.rmtree(out_root)
    t0 = time.perf_counter()
    how = drop_page_cache(folders, ctx["cache"])
    prep_s = time.perf_counter() - t0
    disk0, vm0, cpu0 = _disk_bytes(ctx["dev"]), _vmstat(), _cpu_ticks()
    with MemorySampler() as mem:
        payload = speed.run_child(cmd, logs / f"{key.replace(' ', '_')}.log", ctx["timeout"])
    disk1, vm1, cpu1 = _disk_bytes(ctx["dev"]), _vmstat(), _cpu_ticks()
    # how busy the machine's cores were during the job (this job included): the merges need CPU, the floors little
    machine_busy = (cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1])
    t1 = time.perf_counter()
    os.sync()  # the output's dirty pages that were not yet written back (not part of any job's time)
    payload.update(
        cache=how, sync_before_s=prep_s, sync_after_s=time.perf_counter() - t1,
        disk_read_gb=(disk1[0] - disk0[0]) / 1e9 if disk0 else None,
        disk_written_gb=(disk1[1] - disk0[1]) / 1e9 if disk0 else None,
        swap_in_pages=vm1["pswpin"] - vm0["pswpin"], swap_out_pages=vm1["pswpout"] - vm0["pswpout"],
        major_faults=vm1["pgmajfault"] - vm0["pgmajfault"], machine_cpu_busy=machine_busy,
        child_cpu_s=(payload.get("cpu_user_s") or 0) + (payload.get("cpu_sys_s") or 0),
        min_mem_available_gb=(mem.min_available_kb or 0) / 2**20, max_swap_used_mb=mem.max_swap_used_kb / 1024,
    )
    if out_root.exists():
        shutil.rmtree(out_root)
    err = payload.get("error", "").splitlines()[-1:] if "error" in payload else ""
    print(f"  {key:34s} {speed.fmt(payload.get('seconds'), '8.1f')} s  disk read "
          f"{speed.fmt(payload['disk_read_gb'], '.1f')} GB  rss {speed.fmt(payload.get('peak_rss_mb'), '.0f')} MB "
          f"(anon {speed.fmt(payload.get('peak_anon_mb'), '.0f')})  swap in/out {payload['swap_in_pages']}/"
          f"{payload['swap_out_pages']}  min avail {payload['min_mem_available_gb']:.1f} GiB  cpu "
          f"{payload['child_cpu_s']:.0f} s, machine busy {machine_busy:.0%}  load {payload['load_before']:.1f} {err}",
          flush=True)
    return payload


def summarize(rounds: list[dict], input_bytes: int, methods: list[str]) -> dict:
    """Per round: each merge over the fastest floor of that round; medians over rounds; goals met or missed."""
    out: dict = {"methods": {}}
    floors = [min(j["seconds"] for k, j in r.items() if k.startswith("floor") and j.get("seconds"))
              for r in rounds]
    out["floor_s"] = floors
    out["floor_read_gb_per_s"] = [input_bytes / f / 1e9 for f in floors]
    seq = [r["seqread"] for r in rounds if r.get("seqread", {}).get("seconds")]
    if seq:
        out["seqread_gb_per_s"] = [j["gb_per_s"] for j in seq]
    for method in methods:
        key = f"sens-peft {speed.SHORT[method]}"
        runs = [(r[key], f) for r, f in zip(rounds, floors) if r.get(key, {}).get("seconds")]
        if not runs:
            out["methods"][key] = {"error": next((r[key].get("error") for r in rounds if key in r), "not run")}
            continue
        ratios = [j["seconds"] / f for j, f in runs]
        rss = max(j["peak_rss_mb"] for j, _ in runs)
        swapped = sum(j["swap_in_pages"] + j["swap_out_pages"] for j, _ in runs) + max(
            j["max_swap_used_mb"] for j, _ in runs)
        ratio = statistics.median(ratios)
        out["methods"][key] = {
            "seconds": [j["seconds"] for j, _ in runs], "ratio_to_floor": ratios, "median_ratio": ratio,
            "peak_rss_mb": rss, "peak_anon_mb": max(j["peak_anon_mb"] for j, _ in runs),
            "peak_vmrss_sampled_mb": max(j.get("peak_vmrss_mb", 0) for j, _ in runs),
            "disk_read_gb": [j["disk_read_gb"] for j, _ in runs], "swap": swapped,
            "child_cpu_s": [j.get("child_cpu_s") for j, _ in runs],
            "machine_cpu_busy": [j.get("machine_cpu_busy") for j, _ in runs],
            "load_before": [j.get("load_before") for j, _ in runs],
            "goal_ratio_met": ratio <= GOALS["ratio"], "goal_rss_met": rss <= GOALS["peak_rss_mb"],
            "goal_no_swap_met": swapped == 0,
        }
    return out


def run_step(args) -> None:
    """A step of the parent that needs a lot of memory, run in a child (``--step``), prints its result as JSON."""
    if args.step == "generate":
        shape = syn.SMALL_SHAPE if args.small else scale_shape(args.layers)
        root = Path(args.workdir) / ("small" if args.small else f"scale_{args.layers}l_{args.experts}e")
        base, experts = syn.make_full_experts(root, shape, args.experts, args.shard_size, generator="tiled",
                                              tile_scales=_scales(args))
        print("STEP " + json.dumps([str(base), [str(e) for e in experts]]))
    else:
        print("STEP " + json.dumps(tiled_realism(args.experts)))


def _scales(args) -> tuple[float, ...]:
    return tuple(float(x) for x in args.tile_scales.split(","))


def _step(step: str, argv: list[str] | None):
    """Run ``step`` in a child: the parent stays small, because a child's ``ru_maxrss`` starts from the RSS of
    the parent that spawned it (Linux keeps the high-water mark across fork and exec)."""
    args = list(sys.argv[1:] if argv is None else argv)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--step", step],
                          stdout=subprocess.PIPE, text=True, check=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("STEP ")][-1]
    return json.loads(line[len("STEP "):])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sens_peft_scale")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the 3B shape (28: 3.02B)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="functional smoke run on a tiny shape")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of floors + merges (ratios per round)")
    parser.add_argument("--methods", default=",".join(speed.METHODS))
    parser.add_argument("--floors", default="pread,overlap", help="floor modes of speed.job_floor")
    parser.add_argument("--floor-after", action="store_true", help="run the last floor mode again after "
                        "the merges of each round (ratios use the fastest floor of the round)")
    parser.add_argument("--tile-scales", default=",".join(str(x) for x in syn.TILE_DELTA_SCALES),
                        help="delta scales of the tiled generator, hashed per expert and tensor (e.g. 1 for one)")
    parser.add_argument("--shard-size", default="5GB", help="input and output shard size")
    parser.add_argument("--cache", choices=("auto", "drop", "fadvise"), default="auto")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every child")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic inputs (default: deleted)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    parser.add_argument("--step", choices=("generate", "realism"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # run by the parent in a child process (see _step)
        run_step(args)
        return

    speed.THREADS = args.threads
    shape = syn.SMALL_SHAPE if args.small else scale_shape(args.layers)
    work = Path(args.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    root = work / ("small" if args.small else f"scale_{args.layers}l_{args.experts}e")
    result: dict = {"machine": speed.machine_info(), "sens_peft_commit": speed._git_head(),
                    "load_start": os.getloadavg(), "argv": sys.argv[1:] if argv is None else argv}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        made = _step("generate", argv)
        base, experts = Path(made[0]), [Path(e) for e in made[1]]
        os.sync()
        gen_s = time.perf_counter() - t0
        folders = [base, *experts]
        input_bytes = sum(syn.folder_bytes(f) for f in folders)
        dev = _block_device(base)
        mem_total = _meminfo()["MemTotal"] * 1024
        result["inputs"] = {
            "shape": shape.__dict__, "params_b": shape.num_params() / 1e9, "num_experts": args.experts,
            "gb_per_model": syn.folder_bytes(base) / 1e9, "input_gb": input_bytes / 1e9,
            "input_gib": input_bytes / 2**30, "mem_total_gib": mem_total / 2**30,
            "output_gb": syn.folder_bytes(base) / 1e9, "shards_per_model": len(syn.input_files(base)),
            "shard_size": args.shard_size, "generator": "tiled", "tile_scales": list(_scales(args)),
            "generate_and_sync_s": gen_s}
        result["disk"] = {"device": str(dev.resolve()) if dev else None, "read_ahead_kb": _read_ahead_kb(dev)}
        print(f"inputs: base + {args.experts} experts, {shape.num_params() / 1e9:.2f}B params, "
              f"{input_bytes / 1e9:.1f} GB ({input_bytes / 2**30:.1f} GiB) on a {mem_total / 2**30:.1f} GiB machine; "
              f"generated and synced in {gen_s:.0f} s; device {result['disk']['device']}", flush=True)
        result["realism"] = _step("realism", argv)
        print("  realism (tiled vs full draws):", json.dumps(result["realism"]), flush=True)

        me = [sys.executable, str(HERE / "speed.py")]
        out_root = work / "out"
        common = {"base": str(base), "experts": [str(e) for e in experts], "shard_size": args.shard_size,
                  "device": args.device, "out": str(out_root)}
        ctx = {"cache": args.cache, "dev": dev, "timeout": args.timeout}
        methods = [m for m in args.methods.split(",") if m]
        result["rounds"] = rounds = []
        for rep in range(args.rounds):
            row: dict = {}
            rounds.append(row)
            todo = [("seqread", "seqread", {})] if rep == 0 else []
            todo += [(f"floor {mode}", "floor", {"mode": mode}) for mode in args.floors.split(",") if mode]
            todo += [(f"sens-peft {speed.SHORT[m]}", "sens", {"method": m, "sens": False}) for m in methods]
            if args.floor_after:  # the disk's speed drifts: a floor on each side of the merges
                mode = args.floors.split(",")[-1]
                todo.append((f"floor {mode} after", "floor", {"mode": mode}))
            for key, job, extra in todo:
                cmd = [*me, "--job", job, "--job-args", json.dumps({**common, **extra})]
                row[key] = run_cold(f"{key} r{rep}", cmd, folders, out_root, work / "logs", ctx)
                result["load_end"] = os.getloadavg()
                out.write_text(json.dumps(result, indent=2))
        result["summary"] = summarize(rounds, input_bytes, methods)
        out.write_text(json.dumps(result, indent=2))
        print_summary(result)
    finally:
        if not args.keep and root.exists():
            shutil.rmtree(root)
            print(f"deleted {root}", flush=True)
        if (work / "out").exists():
            shutil.rmtree(work / "out")


def print_summary(result: dict) -> None:
    s = result["summary"]
    print(f"\nfloor (fastest per round): {', '.join(f'{f:.1f} s' for f in s['floor_s'])} = "
          f"{', '.join(f'{g:.2f}' for g in s['floor_read_gb_per_s'])} GB/s of input"
          + (f"; sequential read {', '.join(f'{g:.2f}' for g in s['seqread_gb_per_s'])} GB/s"
             if "seqread_gb_per_s" in s else ""))
    print("| merge | seconds | × cold floor (median) | ≤ 1.3× | peak RSS MB (anon) | ≤ 2 GB | swap | none |")
    print("|---|---:|---:|---|---:|---|---:|---|")
    for key, m in s["methods"].items():
        if "error" in m:
            print(f"| {key} | error | | | | | | |")
            continue
        yes = {True: "met", False: "**missed**"}
        print(f"| {key} | {', '.join(f'{x:.1f}' for x in m['seconds'])} | {m['median_ratio']:.2f}× | "
              f"{yes[m['goal_ratio_met']]} | {m['peak_rss_mb']:.0f} ({m['peak_anon_mb']:.0f}) | "
              f"{yes[m['goal_rss_met']]} | {m['swap']} | {yes[m['goal_no_swap_met']]} |")
    print(f"load average start {result['load_start'][0]:.2f}, end {result.get('load_end', [0])[0]:.2f}")


if __name__ == "__main__":
    main()
