"""engines/cuda.py's buffers, streams and copies: every call checked, every failure a taxonomy
error. Without a GPU the calls fail, and must fail as taxonomy errors; with one they run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cuda.bindings", reason="needs cuda-python: pip install cuda-python")

from engines import cuda  # noqa: E402
from engines.errors import (  # noqa: E402
    ContextFailure,
    DeviceFailure,
    ExecutionError,
    OutOfMemory,
)

has_gpu = cuda.visible_device_count() > 0
requires_gpu = pytest.mark.skipif(not has_gpu, reason="needs a CUDA GPU: CUDA sees none here")


@pytest.mark.skipif(has_gpu, reason="a CUDA GPU is visible: the no-GPU path cannot happen")
def test_without_a_gpu_every_call_fails_as_a_taxonomy_error() -> None:
    assert cuda.device_info(0) is None
    reason = cuda.no_device_reason(0)
    assert reason is not None and "cudaGetDeviceCount" in reason
    # No driver (35) or no device (100): the process cannot use CUDA, a context cannot help.
    for make in (lambda: cuda.DeviceBuffer(1024), lambda: cuda.PinnedBuffer(1024), cuda.Stream):
        with pytest.raises(DeviceFailure, match=r"CUDA error \d+ .*whole process"):
            make()


def test_check_maps_each_class_of_code() -> None:
    with pytest.raises(DeviceFailure, match="cudaErrorIllegalAddress"):
        cuda.check((700,), "a kernel")
    with pytest.raises(OutOfMemory, match="CUDA error 2 "):
        cuda.check((2, None), "cudaMalloc")
    with pytest.raises(ExecutionError, match="cudaErrorInvalidValue"):
        cuda.check((1,), "cudaMemcpyAsync")
    with pytest.raises(ContextFailure, match="CUDA error 6 "):
        cuda.check((6,), "a kernel")
    assert cuda.check((0, 42), "ok") == 42
    assert cuda.check((0,), "ok") is None


@pytest.mark.gpu
@requires_gpu
def test_a_round_trip_through_the_device() -> None:
    info = cuda.device_info(0)
    assert info is not None and info.major > 0 and info.total_memory > 0
    cuda.set_device(0)
    data = np.random.default_rng(3).standard_normal((64, 1000)).astype(np.float32)
    up, down = cuda.PinnedBuffer(data.nbytes), cuda.PinnedBuffer(data.nbytes)
    device = cuda.DeviceBuffer(data.nbytes)
    stream = cuda.Stream()
    try:
        np.copyto(up.view(data.dtype, data.shape), data)
        down.view(data.dtype, data.shape)[...] = np.nan
        cuda.copy_to_device_async(device, up, data.nbytes, stream, "test")
        cuda.copy_to_host_async(down, device, data.nbytes, stream, "test")
        stream.synchronize("test")
        np.testing.assert_array_equal(down.view(data.dtype, data.shape), data)
    finally:
        stream.destroy()
        device.free()
        up.free()
        down.free()
    device.free()  # a second free is a no-op, not a double free


@pytest.mark.gpu
@requires_gpu
def test_an_impossible_allocation_is_a_context_failure() -> None:
    info = cuda.device_info(0)
    assert info is not None
    cuda.set_device(0)
    with pytest.raises(OutOfMemory, match="cudaErrorMemoryAllocation"):
        cuda.DeviceBuffer(info.total_memory * 4)
    # Not sticky: the process can still allocate.
    cuda.DeviceBuffer(1 << 20).free()
