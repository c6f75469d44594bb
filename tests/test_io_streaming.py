"""The streamed full-model I/O: memory-mapped reads, the buffer pool, the background writer, the reader's memory
bound, and failures on each thread leaving no output."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import hash_tree, make_full_expert, save_model, tiny_llama
from safetensors.torch import load_file, save_file

import sens_peft.fused
import sens_peft.merging.streaming as smerge
import sens_peft.methods.dare as dare_module
import sens_peft.methods.ties as ties_module
import sens_peft.shards as shards
import sens_peft.sources as sources
from sens_peft.io import BufferPool, MergeError, TensorSource
from sens_peft.merge import merge_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    base = tiny_llama(seed=0)
    paths = {"base": save_model(base, root / "base", max_shard_size="40KB")}
    paths["experts"] = [make_full_expert(base, root / f"e{k}", seed=k + 1, max_shard_size="40KB") for k in range(3)]
    return paths


def test_mapped_read_equals_pread_and_never_writes_the_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(1000).bfloat16()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    src = TensorSource(tmp_path)
    for name, ref in tensors.items():
        mapped, read = src.get(name, mapped=True), src.get(name)
        assert torch.equal(mapped, ref) and torch.equal(read, ref) and mapped.dtype == ref.dtype
        mapped.zero_()  # copy-on-write: the file must not change
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert torch.equal(src.get("c", mapped=True), tensors["c"])


def test_truncated_file_is_an_error_not_a_crash(tmp_path):
    save_file({"w": torch.randn(4096)}, str(tmp_path / "model.safetensors"))
    src = TensorSource(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # shortened after the header was read
    for mapped in (True, False):
        with pytest.raises(MergeError, match="ended inside tensor 'w'"):
            src.get("w", mapped=mapped)


def test_buffer_pool_reuses_by_size_and_respects_its_cap():
    pool = BufferPool(max_idle_bytes=1000)
    a = pool.take(600)
    ptr = a.data_ptr()
    pool.give(a.view(torch.int16))  # any view of the buffer returns it
    b = pool.take(600)
    assert b.data_ptr() == ptr and b.numel() == 600 and b.dtype == torch.uint8
    c = pool.take(600)
    assert c.data_ptr() != ptr  # the only idle buffer was handed out
    pool.give(b)
    pool.give(c)  # 1200 idle bytes would exceed the cap: the older one is dropped
    assert pool._idle == 600
    pool.give(torch.empty(600, dtype=torch.uint8))  # not from this pool: ignored
    assert pool._idle == 600
    big = pool.take(5000)
    pool.give(big)  # larger than the cap: not kept
    assert pool._idle == 600


def test_streamed_merge_equals_merge_without_mapping_or_threads(models, tmp_path, monkeypatch):
    kw = dict(method="ties", density=0.5, sens=None, device="cpu", progress=False, max_shard_size="30KB")
    merge_models(models["base"], models["experts"], tmp_path / "fast", **kw)
    monkeypatch.setattr(sources, "CAN_MAP", False)  # pread, as on platforms without mmap flags
    merge_models(models["base"], models["experts"], tmp_path / "pread", **kw)
    assert hash_tree(tmp_path / "fast") == hash_tree(tmp_path / "pread")


def test_write_failure_on_the_writer_thread_leaves_nothing(models, tmp_path, monkeypatch):
    calls = []
    original = shards._pwrite_all

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 6:
            raise OSError(28, "No space left on device (simulated)")
        original(fd, data, offset)

    monkeypatch.setattr(shards, "_pwrite_all", failing)
    before = hash_tree(models["base"])
    with pytest.raises(OSError, match="simulated"):
        merge_models(models["base"], models["experts"], tmp_path / "out", method="dare_ties", density=0.5,
                     sens=None, device="cpu", progress=False, max_shard_size="30KB")
    assert len(calls) >= 6
    assert list(tmp_path.iterdir()) == []
    assert hash_tree(models["base"]) == before


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_read_failure_on_the_reader_thread_leaves_nothing(models, tmp_path, monkeypatch, method):
    original = TensorSource.get
    seen = []

    def failing(self, name, pool=None, *, mapped=False):
        seen.append(name)
        if len(seen) == 20:
            raise MergeError(f"cannot read {name!r} (simulated)")
        return original(self, name, pool, mapped=mapped)

    monkeypatch.setattr(TensorSource, "get", failing)
    with pytest.raises(MergeError, match="simulated"):
        merge_models(models["base"], models["experts"], tmp_path / "out", method=method, density=0.5, sens=None,
                     device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_prepare_failure_on_a_worker_leaves_nothing(models, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("threshold selection failed (simulated)")

    monkeypatch.setattr(ties_module, "trim_thresholds", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_models(models["base"], models["experts"], tmp_path / "out", method="ties", density=0.5, sens=None,
                     device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_reader_keeps_in_flight_bytes_within_the_bound(tmp_path):
    """Tensors read and not yet finished by the consumer stay within max_bytes (one oversized tensor alone)."""
    sizes = [100, 100, 100, 900, 100, 100, 100, 100]  # float32 entries; 900 is above the bound on its own
    tensors = {f"t{i}": torch.full((n,), float(i)) for i, n in enumerate(sizes)}
    for name in ("base", "e0"):
        Path(tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    base, expert = TensorSource(tmp_path / "base"), TensorSource(tmp_path / "e0")
    lock = threading.Lock()
    in_flight = [0]
    peak = [0]
    original = TensorSource.get

    def counting(self, name, pool=None, *, mapped=False):
        t = original(self, name, pool, mapped=mapped)
        with lock:
            in_flight[0] += t.numel() * 4
            peak[0] = max(peak[0], in_flight[0])
        return t

    TensorSource.get = counting
    try:
        bound = 2 * 4 * 250  # two sources x 250 entries
        reader = smerge.Prefetcher(list(tensors), base, [expert], depth=8, max_bytes=bound)
        for name, b, experts, *_ in reader:
            time.sleep(0.02)  # a slow consumer: the reader runs ahead as far as the bound allows
            assert torch.equal(b, tensors[name]) and torch.equal(experts[0], tensors[name])
            with lock:
                in_flight[0] -= 2 * b.numel() * 4
            del b, experts
        reader.close()
    finally:
        TensorSource.get = original
    assert peak[0] == 2 * 4 * 900  # the oversized tensor was read alone
    assert in_flight[0] == 0


def test_mapped_reads_release_the_file_mappings(models, tmp_path):
    """Each input tensor's mapping goes with its last reference: after a merge no input file stays mapped."""
    import shutil

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc")
    # copies of their own: tracebacks kept by pytest from earlier failing merges may still map the shared ones
    inputs = [shutil.copytree(p, tmp_path / f"in{i}") for i, p in enumerate([models["base"], *models["experts"]])]
    for method in ("task_arithmetic", "ties", "dare_ties"):
        merge_models(inputs[0], inputs[1:], tmp_path / method, method=method, density=0.5, sens=None,
                     device="cpu", progress=False)
    inputs = [str(Path(p).resolve()) for p in inputs]
    assert not [line for line in maps.read_text().splitlines() if any(p in line for p in inputs)]
    assert load_file(str(next((tmp_path / "ties").glob("*.safetensors"))))


@pytest.mark.parametrize("method,seed,fused", [("task_arithmetic", 0, True), ("ties", 0, True), ("ties", 0, False),
                                               ("dare_ties", 0, True), ("dare_ties", 0, False),
                                               ("dare_ties", None, False), ("dare_linear", 0, True)])
def test_tensors_read_alone_are_split_over_two_threads_with_the_same_output(models, tmp_path, monkeypatch, method,
                                                                            seed, fused):
    """A tensor too large to be read along with others is prepared in groups of experts and merged in two halves
    on two threads; the output is byte-identical to the merge that does neither. With the fused loops, DARE-TIES
    masks are hashed inline (nothing prepared); without them (``fused=False``), drawn ahead in groups."""
    if not fused:
        monkeypatch.setattr(sens_peft.fused, "_loaded", [None])
    elif not sens_peft.fused.available():
        pytest.skip("the fused loops could not be built here")
    kw = dict(method=method, density=0.5 if method != "task_arithmetic" else 1.0, seed=seed, sens=None,
              device="cpu", progress=False, max_shard_size="30KB")
    torch.manual_seed(7)  # seed=None: the DARE keys come from the global RNG, one per tensor, in tensor order
    merge_models(models["base"], models["experts"], tmp_path / "whole", **kw)

    spans, groups = [], []
    original_merge, original_trim, original_masks = (smerge.merge_streamed, ties_module.trim_thresholds,
                                                      dare_module.dare_masks)

    def merge_spy(*args, **kwargs):
        spans.append((kwargs.get("span"), args[1].numel()))
        return original_merge(*args, **kwargs)

    def trim_spy(base, experts, *args, **kwargs):
        groups.append(len(experts))
        return original_trim(base, experts, *args, **kwargs)

    def masks_spy(*args, experts=None, **kwargs):
        groups.append(None if experts is None else len(experts))
        return original_masks(*args, experts=experts, **kwargs)

    monkeypatch.setattr(smerge, "merge_streamed", merge_spy)
    monkeypatch.setattr(ties_module, "trim_thresholds", trim_spy)
    monkeypatch.setattr(dare_module, "dare_masks", masks_spy)
    monkeypatch.setattr(smerge, "READ_AHEAD_BYTES", 1)  # every tensor is read alone
    monkeypatch.setattr(smerge, "DEFAULT_CHUNK", 256)  # and the small ones are still split in chunks
    torch.manual_seed(7)
    merge_models(models["base"], models["experts"], tmp_path / "split", **kw)

    assert hash_tree(tmp_path / "split") == hash_tree(tmp_path / "whole")
    halves = [(span, numel) for span, numel in spans if span is not None]
    assert halves and all(span[1] == numel or span[0] == 0 for span, numel in halves)
    assert {span for span, _ in halves if span[0] == 0} and {span for span, _ in halves if span[0] > 0}
    if method == "dare_ties" and fused:
        assert groups == []
    elif method != "task_arithmetic":
        assert groups and set(groups) == {2, 1}  # 3 experts in groups [0, 1] and [2]
