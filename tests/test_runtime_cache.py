"""TensorRT-RTX's runtime cache on disk: the key, the lock and the atomic write.

An IRuntimeCache exists only on a deserialized engine, which needs a GPU TensorRT-RTX
accepts, so these tests hand runtime_cache.py a stand-in with the binding's two methods
(``serialize() -> IHostMemory``, ``deserialize(blob) -> bool``). That the JIT output is really
saved and reused is unverified until such a GPU runs tests/test_tensorrt_api.py.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from engines import files, runtime_cache
from engines.cuda import DeviceInfo

GPU = DeviceInfo(0, "NVIDIA RTX 4090", 8, 9, 24 << 30, "GPU-0")
VERSIONS = {"cuda_driver": 13000, "cuda_runtime": 13040}


def _lock_is_held(path: Path) -> bool:
    """Whether someone holds the cache's lock (flock locks per open file, so this process's
    own second open conflicts with its first)."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


class FakeCache:
    def __init__(self, data: bytes = b"", accept: bool = True,
                 path: Path | None = None) -> None:
        self.data, self.accept, self.path = data, accept, path
        self.loaded: bytes | None = None
        self.locked_during: list[bool] = []

    def serialize(self) -> bytes:
        if self.path is not None:
            self.locked_during.append(_lock_is_held(self.path))
        return self.data

    def deserialize(self, blob: bytes) -> bool:
        self.loaded = bytes(blob)
        return self.accept


def test_the_key_follows_everything_the_runtime_checks(tmp_path: Path) -> None:
    base = runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116", VERSIONS)
    assert base.parent == tmp_path / "runtime" and base.name.startswith("plan1.")
    other_gpu = DeviceInfo(0, "NVIDIA RTX 5090", 12, 0, 32 << 30, "GPU-1")
    variants = [
        runtime_cache.cache_path(tmp_path, "plan2", GPU, "1.7.1.116", VERSIONS),
        runtime_cache.cache_path(tmp_path, "plan1", other_gpu, "1.7.1.116", VERSIONS),
        runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.8.0", VERSIONS),
        runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116",
                                 {**VERSIONS, "cuda_driver": 13010}),
        runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116",
                                 {**VERSIONS, "cuda_runtime": 12090}),
    ]
    assert len({base, *variants}) == 6
    assert base == runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116", VERSIONS)


def test_save_then_load_round_trips_under_the_lock(tmp_path: Path) -> None:
    path = runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116", VERSIONS)
    saved = FakeCache(b"kernels" * 1000, path=path)
    runtime_cache.save(saved, path)
    assert saved.locked_during == [True]
    assert path.read_bytes() == b"kernels" * 1000
    assert not _lock_is_held(path)  # released after
    assert not list(path.parent.glob("*.tmp")), "the write aside was left behind"
    fresh = FakeCache()
    assert runtime_cache.load(fresh, path)
    assert fresh.loaded == b"kernels" * 1000


def test_nothing_to_load_is_not_an_error(tmp_path: Path) -> None:
    path = runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116", VERSIONS)
    fresh = FakeCache()
    assert not runtime_cache.load(fresh, path)
    assert fresh.loaded is None
    path.write_bytes(b"")
    assert not runtime_cache.load(fresh, path) and fresh.loaded is None


def test_a_cache_the_runtime_rejects_is_logged_and_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116", VERSIONS)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"from another driver")
    assert not runtime_cache.load(FakeCache(accept=False), path)
    assert "does not fit this GPU, driver or TensorRT-RTX" in caplog.text


def test_a_failed_save_leaves_the_old_cache_whole(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116", VERSIONS)
    runtime_cache.save(FakeCache(b"old kernels"), path)

    def interrupted(src: str, dst: str) -> None:
        raise OSError("disk full, say")

    # The new cache is written aside in full; only the rename could replace the old one.
    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        runtime_cache.save(FakeCache(b"new kernels" * 1000), path)
    assert path.read_bytes() == b"old kernels"
    assert not list(path.parent.glob("*.tmp"))
    assert not _lock_is_held(path)


def test_serialize_returning_nothing_is_an_os_error(tmp_path: Path) -> None:
    path = runtime_cache.cache_path(tmp_path, "plan1", GPU, "1.7.1.116", VERSIONS)
    with pytest.raises(OSError, match="serialize returned nothing"):
        runtime_cache.save(FakeCache(None), path)  # type: ignore[arg-type]
    assert not path.exists()
