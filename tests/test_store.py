"""The decoded-image store: built by worker processes as by one, resumed after an interruption,
built once when two processes ask for it at the same time, and trained from by a process whose
private memory is limited to a fraction of the store's size.

The memory limit is ``RLIMIT_DATA``: since Linux 4.7 it bounds a process's private writable
memory (heap and anonymous maps), which is where a store loaded whole would go, and not the
read-only file maps through which the store is read: the kernel drops those pages under
pressure and reads them again when needed.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from citylib.data import imagecache

CITIES = ("east", "west")


def records(root: Path, n: int, distinct: int = 40, labels: bool = True) -> pd.DataFrame:
    """``n`` rows over ``distinct`` noise images per city (some with label maps), split 8:1:1."""
    rng = np.random.default_rng(0)
    rows = []
    for c, city in enumerate(CITIES):
        for i in range(distinct):
            path = root / city / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            size = (48 + i % 7, 40 + i % 5)                          # (w, h): not square
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
            label = ""
            if labels and i % 3 == 0:
                label = str(path.with_suffix(".label.png"))
                Image.fromarray(rng.integers(0, 150, (size[1], size[0]), dtype=np.uint8)).save(label)
            rows.append((str(path), city, f"{city}{i}", 0, label))
    base = pd.DataFrame(rows, columns=["path", "city", "group", "view", "label_path"])
    out = base.iloc[np.arange(n) % len(base)].reset_index(drop=True)
    out["split"] = np.where(np.arange(n) % 10 == 8, "val", np.where(np.arange(n) % 10 == 9, "test", "train"))
    return out


def same(a: imagecache.Cache, b: imagecache.Cache) -> bool:
    return (a.key == b.key and np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
            and a.index.equals(b.index))


def test_two_worker_processes_build_the_store_one_builds(tmp_path):
    rec = records(tmp_path / "src", 300)
    one = imagecache.load_cache(imagecache.build_cache(rec, 20, tmp_path / "one", workers=1, progress=False))
    two = imagecache.load_cache(imagecache.build_cache(rec, 20, tmp_path / "two", workers=2, progress=False))
    assert same(one, two)
    assert one.index["has_labels"].tolist() == (rec["label_path"] != "").tolist()
    assert one.labels[~one.index["has_labels"].to_numpy()].max() == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".%s.lock" % two.key, two.key]
    assert sorted(p.name for p in two.folder.iterdir()) == ["images.npy", "index.csv", "labels.npy",
                                                            "meta.json"]


class Stop(Exception):
    pass


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    rec = records(tmp_path / "src", 200)
    whole = imagecache.load_cache(imagecache.build_cache(rec, 16, tmp_path / "whole", workers=1,
                                                         progress=False))
    chunk = imagecache._chunk_rows(200)
    decode, calls = imagecache.prepare, []

    def failing(*args):
        calls.append(args[0])
        if len(calls) > 2 * chunk + 3:            # two chunks and a bit of the third
            raise Stop
        return decode(*args)

    monkeypatch.setattr(imagecache, "prepare", failing)
    root = tmp_path / "cut"
    with pytest.raises(Stop):
        imagecache.build_cache(rec, 16, root, workers=1, progress=False)
    assert not (root / whole.key).exists()        # nothing half-made is taken for a store
    assert (root / f".{whole.key}.building").is_dir()
    calls.clear()
    monkeypatch.setattr(imagecache, "prepare", lambda *a: calls.append(a[0]) or decode(*a))
    resumed = imagecache.load_cache(imagecache.build_cache(rec, 16, root, workers=1, progress=False))
    assert len(calls) == 200 - 2 * chunk          # the third chunk again, not the first two
    assert same(resumed, whole)
    assert not (root / f".{whole.key}.building").exists()


KILLED_BUILD = """
import os, signal, sys
import pandas as pd
from citylib.data import imagecache
decode, calls = imagecache.prepare, []
def dying(*args):                      # killed outright after 30 images: no cleanup runs
    calls.append(1)
    if len(calls) > 30:
        os.kill(os.getpid(), signal.SIGKILL)
    return decode(*args)
imagecache.prepare = dying
imagecache.build_cache(pd.read_csv(sys.argv[1], keep_default_na=False), 16, sys.argv[2], workers=1,
                       progress=False)
"""


def test_a_build_killed_outright_resumes(tmp_path, monkeypatch):
    """SIGKILL (the out-of-memory killer, a scheduler's hard stop) in the middle of a chunk."""
    rec = records(tmp_path / "src", 200)
    rec.to_csv(tmp_path / "records.csv", index=False)
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(tmp_path / "records.csv"),
                           str(tmp_path / "cut")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    key, _ = imagecache.cache_keys(rec, 16)
    assert (tmp_path / "cut" / f".{key}.building").is_dir() and not (tmp_path / "cut" / key).exists()
    decode, calls = imagecache.prepare, []
    monkeypatch.setattr(imagecache, "prepare", lambda *a: calls.append(a[0]) or decode(*a))
    resumed = imagecache.load_cache(imagecache.build_cache(rec, 16, tmp_path / "cut", workers=1,
                                                           progress=False))
    chunk = imagecache._chunk_rows(200)
    assert len(calls) == 200 - (30 // chunk) * chunk                # the finished chunks were kept
    whole = imagecache.load_cache(imagecache.build_cache(rec, 16, tmp_path / "whole", workers=1,
                                                         progress=False))
    assert same(resumed, whole)


def test_a_build_resumed_with_other_workers_finds_its_chunks(tmp_path, monkeypatch):
    """Cut while two workers built it, resumed with one (another machine): the chunks are the
    same. (When chunks followed the worker count, 4000 rows made 16 chunks of 250 rows with two
    workers and 16 of 256 with one, and rows 1000-1023 were taken as done.)"""
    rec = records(tmp_path / "src", 4000, distinct=20)
    whole = imagecache.load_cache(imagecache.build_cache(rec, 8, tmp_path / "whole", workers=1,
                                                         progress=False))
    decode, calls = imagecache.prepare, []

    def failing(*args):
        calls.append(args[0])
        if len(calls) > 1000:
            raise Stop
        return decode(*args)

    monkeypatch.setattr(imagecache, "prepare", failing)
    monkeypatch.setattr(imagecache, "_pool", lambda workers, jobs: contextlib.nullcontext())  # here,
    with pytest.raises(Stop):                                                             # to be cut
        imagecache.build_cache(rec, 8, tmp_path / "cut", workers=2, progress=False)
    monkeypatch.setattr(imagecache, "prepare", decode)
    resumed = imagecache.load_cache(imagecache.build_cache(rec, 8, tmp_path / "cut", workers=1, progress=False))
    assert (resumed.index["width"] > 0).all()        # every row decoded, none left as zeros
    assert same(resumed, whole)


def test_a_build_cut_while_its_arrays_were_made_starts_again(tmp_path):
    rec = records(tmp_path / "src", 50)
    key, _ = imagecache.cache_keys(rec, 16)
    work = tmp_path / "c" / f".{key}.building"
    work.mkdir(parents=True)
    (work / "images.npy").write_bytes(b"\x93NUMPY")  # a header cut short
    got = imagecache.load_cache(imagecache.build_cache(rec, 16, tmp_path / "c", workers=1, progress=False))
    assert same(got, imagecache.load_cache(imagecache.build_cache(rec, 16, tmp_path / "d", workers=1,
                                                                  progress=False)))


def _build(rec, size, root, start, results):
    calls = []
    decode = imagecache.prepare
    imagecache.prepare = lambda *a: calls.append(a[0]) or decode(*a)
    start.wait()                                    # both ask at the same moment
    folder = imagecache.build_cache(rec, size, root, workers=1, progress=False)
    results.put((str(folder), len(calls)))


def test_two_processes_asking_at_once_build_the_store_once(tmp_path, capfd):
    rec = records(tmp_path / "src", 400)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_build, args=(rec, 24, tmp_path / "c", start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0][0] == got[1][0]
    assert sorted(n for _, n in got) == [0, 400]   # one decoded every row, the other reused them
    assert "waiting for another process building the image cache" in capfd.readouterr().err


# ---------------------------------------------------------------- training with little memory

LOW_RAM_ROWS, LOW_RAM_SIZE = 3000, 144             # images.npy: 187 MB, labels.npy: 62 MB


def test_training_reads_a_store_four_times_larger_than_its_memory(tmp_path):
    rec = records(tmp_path / "src", LOW_RAM_ROWS, labels=False)
    rec.to_csv(tmp_path / "records.csv", index=False)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["images_npy_bytes"] >= 4 * got["allowed_bytes"]    # the file, as the build wrote it
    assert got["trained"] and got["test_rows"] == LOW_RAM_ROWS // 10
    assert got["whole_load"] == "MemoryError"      # the limit holds: the store loaded whole fails


def _limited_training(folder: Path) -> dict:
    """In a fresh process: measure the private memory after a warm-up step, allow a quarter of
    the store's size more, then build the store and train a run from it. The network is a tiny
    one, so that what is measured is the data's path, not the weights and optimiser state (the
    smallest registered network's are 150 MB)."""
    import torch

    from citylib.nets import infer, train

    def tiny(arch, n_classes, image_size):                 # (B, 3, S, S) -> (B, 4, S/8, S/8) -> (B, C)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, n_classes))

    train.models.build = tiny
    cfg = train.TrainConfig(epochs=1, batch_size=16, threads=1, device="cpu")
    warm = np.zeros((64, LOW_RAM_SIZE, LOW_RAM_SIZE, 3), np.uint8)
    model = tiny("simpler", 2, LOW_RAM_SIZE)
    opt = torch.optim.Adam(model.parameters(), fused=True)
    torch.set_num_threads(1)
    train.train_one_epoch(model, opt, warm, torch.zeros(64, dtype=torch.int64), np.arange(64), cfg,
                          torch.Generator().manual_seed(0), progress=False)
    infer.predict(model, warm, 16)
    del warm, model, opt
    store = LOW_RAM_ROWS * LOW_RAM_SIZE * LOW_RAM_SIZE * 3
    allowed = store // 4
    private = _vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (private + allowed, resource.RLIM_INFINITY))
    rec = pd.read_csv(folder / "records.csv", keep_default_na=False)
    cache = imagecache.load_cache(imagecache.build_cache(rec, LOW_RAM_SIZE, folder / "store", workers=1,
                                                         progress=False))
    result = train.run(cfg, folder / "run", cache, arch="simpler", seed=0, name="low-ram", progress=False)
    try:
        np.array(cache.images)
        whole = "loaded"
    except MemoryError:
        whole = "MemoryError"
    return {"images_npy_bytes": (cache.folder / "images.npy").stat().st_size, "allowed_bytes": allowed,
            "private_at_start": private,
            "trained": result.finished,
            "test_rows": len(pd.read_csv(folder / "run" / "predictions.csv")), "whole_load": whole}


def _vm_data() -> int:
    """This process's private writable memory in bytes (what RLIMIT_DATA counts)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmData line")


if __name__ == "__main__":
    print(json.dumps(_limited_training(Path(sys.argv[1]))))
