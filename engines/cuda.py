"""CUDA through cuda-python (``cuda.bindings``): device queries, device and pinned host
buffers, streams and async copies, and CUDA error codes mapped onto the taxonomy.

CUDA errors fall into four classes, each with its own answer:

- process-fatal: a sticky error (illegal address, launch failure...) leaves the CUDA context
  of the whole process unusable, every later call fails, a new stream included; and some
  errors concern the process itself (no driver, no device). DeviceFailure: the replica must
  restart.
- deterministic (invalid value, no kernel image for this device): the same work fails the
  same way on any context. ExecutionError, never retried.
- out of memory: OutOfMemory, one fresh context locally, then another replica.
- anything else concerns one operation, and a fresh execution context may succeed:
  ContextFailure.

The same classes apply to ONNX Runtime's CUDA failures, read from their text
(``error_from_text``). ``provoke_illegal_address`` causes a real sticky error on purpose, for
the ``cuda`` fault kind.

cuda-python imports without a driver, so everything here degrades to "no GPU" on a machine
without one instead of failing at import.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import (
    ContextFailure,
    DeviceFailure,
    EngineLoadFailure,
    ExecutionError,
    OutOfMemory,
    TrtServeError,
)

# Source of every table below: the cudaError_t reference of the CUDA Runtime API
# (https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html), whose text
# cuda-python ships as each member's __doc__ (cuda-bindings 13.4.4 here). tests/test_cuda_errors.py
# checks every number against the installed enum's name, and that every code whose doc says
# "the process must be terminated and relaunched" is in STICKY_ERRORS.

# Sticky: the doc of each says "To continue using CUDA, the process must be terminated and
# relaunched", except 214, uncorrectable ECC: a hardware fault that no context can work around.
STICKY_ERRORS: dict[int, str] = {
    214: "cudaErrorECCUncorrectable",
    226: "cudaErrorContained",
    700: "cudaErrorIllegalAddress",
    702: "cudaErrorLaunchTimeout",
    710: "cudaErrorAssert",
    714: "cudaErrorHardwareStackError",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    717: "cudaErrorInvalidAddressSpace",
    718: "cudaErrorInvalidPc",
    719: "cudaErrorLaunchFailure",
    721: "cudaErrorTensorMemoryLeak",
    810: "cudaErrorMpsClientTerminated",
    911: "cudaErrorExternalDevice",
}

# Not sticky, but about the process, not one context: the driver, the devices it sees, the
# primary context. A fresh execution context in the same process meets the same error.
PROCESS_ERRORS: dict[int, str] = {
    3: "cudaErrorInitializationError",
    34: "cudaErrorStubLibrary",
    35: "cudaErrorInsufficientDriver",
    46: "cudaErrorDevicesUnavailable",
    100: "cudaErrorNoDevice",
    101: "cudaErrorInvalidDevice",
    201: "cudaErrorDeviceUninitialized",
    709: "cudaErrorContextIsDestroyed",
    802: "cudaErrorSystemNotReady",
    803: "cudaErrorSystemDriverMismatch",
    804: "cudaErrorCompatNotSupportedOnDevice",
    999: "cudaErrorUnknown",
}

# The call itself is wrong for this device or these arguments ("not within an acceptable
# range", "no kernel image ... suitable for the device"): repeating it repeats the error.
DETERMINISTIC_ERRORS: dict[int, str] = {
    1: "cudaErrorInvalidValue",
    9: "cudaErrorInvalidConfiguration",
    98: "cudaErrorInvalidDeviceFunction",
    209: "cudaErrorNoKernelImageForDevice",
    400: "cudaErrorInvalidResourceHandle",
}

# "unable to allocate enough memory or other resources": may pass once memory is freed.
OUT_OF_MEMORY_ERRORS: dict[int, str] = {2: "cudaErrorMemoryAllocation"}

# cudaStreamQuery's "still running", which is not an error.
NOT_READY = 600

_NAMES: dict[int, str] = {
    **STICKY_ERRORS, **PROCESS_ERRORS, **DETERMINISTIC_ERRORS, **OUT_OF_MEMORY_ERRORS,
}


def error_class(code: int) -> type[TrtServeError]:
    """The taxonomy class for CUDA error ``code`` (never 0)."""
    code = int(code)
    if code in STICKY_ERRORS or code in PROCESS_ERRORS:
        return DeviceFailure
    if code in DETERMINISTIC_ERRORS:
        return ExecutionError
    if code in OUT_OF_MEMORY_ERRORS:
        return OutOfMemory
    return ContextFailure


def error_for(code: int, what: str) -> TrtServeError:
    """The taxonomy error for CUDA error ``code`` raised while doing ``what``."""
    code = int(code)
    said = f"{what}: CUDA error {code} ({_NAMES.get(code) or _error_name(code)})"
    if code in STICKY_ERRORS:
        return DeviceFailure(f"{said}, which is sticky: this process's GPU state is lost")
    if code in PROCESS_ERRORS:
        return DeviceFailure(f"{said}, which concerns the whole process: no new context can "
                             f"cure it")
    if code in DETERMINISTIC_ERRORS:
        return ExecutionError(f"{said}, which the same work repeats on any context")
    if code in OUT_OF_MEMORY_ERRORS:
        return OutOfMemory(f"{said}: the device is out of memory")
    return ContextFailure(said)


_CODE_IN_TEXT = re.compile(r"(?:CUDA failure|CUDA error|cudaError\w*|error code)\D{0,12}(\d{1,4})")


def code_in_text(text: str) -> int | None:
    """The CUDA error code a library's message quotes (ONNX Runtime's 'CUDA failure 700: ...',
    TensorRT's 'cudaError 700: ...'), if any."""
    match = _CODE_IN_TEXT.search(text)
    return None if match is None else int(match.group(1))


def error_from_text(text: str, what: str) -> TrtServeError | None:
    """The taxonomy error for the CUDA error code quoted in a library's message, if any."""
    code = code_in_text(text)
    if code is None:
        return None
    err = error_for(code, what)
    err.message = f"{err.message}: {text.strip()[:500]}"
    return err


def _error_name(code: int) -> str:
    try:
        from cuda.bindings import runtime
    except ImportError:
        return "unknown"
    try:
        return runtime.cudaError_t(code).name
    except ValueError:
        return "unknown"


def visible_device_count() -> int:
    """CUDA devices this process can use; 0 without cuda-python, a driver or a GPU."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return 0
    err, count = runtime.cudaGetDeviceCount()
    if err != runtime.cudaError_t.cudaSuccess:
        return 0
    return int(count)


# --- devices, buffers, streams ------------------------------------------------------------
#
# Every call below goes through check(), so a failing CUDA call always surfaces as a taxonomy
# error (error_for's class), never as a silently ignored status tuple.


def _runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise EngineLoadFailure(
            f"cuda-python is not installed ({exc}); install it with `pip install cuda-python`"
        ) from exc
    return runtime


def check(result: tuple[Any, ...], what: str) -> Any:
    """Unwrap a cuda-python ``(error, *values)`` result, raising error_for() on a failure.

    Returns the single value, a tuple of several, or None when the call returns only a status.
    """
    err, *values = result
    if int(err) != 0:
        raise error_for(int(err), what)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    ordinal: int
    name: str
    major: int
    minor: int
    total_memory: int
    uuid: str

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"

    def describe(self) -> str:
        return f"GPU {self.ordinal} ({self.name}, compute capability {self.compute_capability})"


def device_info(ordinal: int = 0) -> DeviceInfo | None:
    """The visible GPU ``ordinal``; None where there is no usable driver or no such GPU."""
    if no_device_reason(ordinal) is not None:
        return None
    runtime = _runtime()
    try:
        props = check(
            runtime.cudaGetDeviceProperties(ordinal), f"cudaGetDeviceProperties({ordinal})"
        )
    except TrtServeError:
        return None
    name = props.name.split(b"\0", 1)[0].decode(errors="replace")
    return DeviceInfo(ordinal, name, int(props.major), int(props.minor), int(props.totalGlobalMem),
                      _uuid_text(bytes(props.uuid.bytes)))


def _uuid_text(raw: bytes) -> str:
    """As nvidia-smi prints it: GPU-8-4-4-4-12 hex digits."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def no_device_reason(ordinal: int = 0) -> str | None:
    """Why CUDA offers no GPU ``ordinal`` to this process, in CUDA's own words; None if it does."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return "cuda-python is not installed"
    err, count = runtime.cudaGetDeviceCount()
    if int(err) != 0:
        return f"cudaGetDeviceCount failed: {_describe(int(err))}"
    if ordinal >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"CUDA sees {count} GPU(s){where}, so there is no GPU {ordinal}"
    return None


def _describe(code: int) -> str:
    name = _NAMES.get(code) or _error_name(code)
    text = ""
    try:
        from cuda.bindings import runtime

        err, raw = runtime.cudaGetErrorString(runtime.cudaError_t(code))
        if int(err) == 0:
            text = ": " + raw.decode(errors="replace")
    except (ImportError, ValueError):
        pass
    return f"CUDA error {code} ({name}{text})"


def versions() -> dict[str, int]:
    """The CUDA driver and runtime versions (1000 * major + 10 * minor), as CUDA reports them:
    the driver is 0 where none is installed."""
    runtime = _runtime()
    return {
        "cuda_driver": int(check(runtime.cudaDriverGetVersion(), "cudaDriverGetVersion")),
        "cuda_runtime": int(check(runtime.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
    }


def set_device(ordinal: int) -> None:
    """Make ``ordinal`` current for the calling thread (CUDA's current device is per thread)."""
    check(_runtime().cudaSetDevice(ordinal), f"cudaSetDevice({ordinal})")


class DeviceBuffer:
    """``nbytes`` of device memory from cudaMalloc (256-byte aligned, as TensorRT requires)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        # cudaMalloc(0) returns a null pointer, which TensorRT rejects as a tensor address.
        self.ptr: int = int(check(_runtime().cudaMalloc(max(self.nbytes, 1)),
                                  f"cudaMalloc({self.nbytes} bytes)"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(_runtime().cudaFree(ptr), "cudaFree")


class PinnedBuffer:
    """``nbytes`` of page-locked host memory, so async copies really are asynchronous."""

    def __init__(self, nbytes: int) -> None:
        runtime = _runtime()
        self.nbytes = int(nbytes)
        self.ptr: int = int(check(
            runtime.cudaHostAlloc(max(self.nbytes, 1), runtime.cudaHostAllocDefault),
            f"cudaHostAlloc({self.nbytes} bytes)",
        ))

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy array over the start of the buffer; valid only until free()."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(
                f"{list(shape)} of {dtype.name} needs {count * dtype.itemsize} bytes, "
                f"the pinned buffer has {self.nbytes}"
            )
        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(_runtime().cudaFreeHost(ptr), "cudaFreeHost")


class Stream:
    """A non-blocking stream: it never synchronizes with the legacy default stream."""

    def __init__(self) -> None:
        runtime = _runtime()
        self._stream: Any = check(
            runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags",
        )

    @property
    def handle(self) -> int:
        """The raw cudaStream_t, as TensorRT's execute_async_v3 takes it."""
        return int(self._stream)

    def synchronize(self, what: str) -> None:
        check(_runtime().cudaStreamSynchronize(self._stream), f"{what}: cudaStreamSynchronize")

    def query(self) -> int:
        """cudaStreamQuery's code, unraised: 0 done, NOT_READY still running, else an error
        of earlier asynchronous work (a sticky one shows up here first)."""
        (err,) = _runtime().cudaStreamQuery(self._stream)
        return int(err)

    def destroy(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            check(_runtime().cudaStreamDestroy(stream), "cudaStreamDestroy")


def copy_to_device_async(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream,
                         what: str) -> None:
    runtime = _runtime()
    check(
        runtime.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes,
                                runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
        f"{what}: cudaMemcpyAsync host to device ({nbytes} bytes)",
    )


def copy_to_host_async(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream,
                       what: str) -> None:
    runtime = _runtime()
    check(
        runtime.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes,
                                runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
        f"{what}: cudaMemcpyAsync device to host ({nbytes} bytes)",
    )


# --- a real sticky fault, on purpose ------------------------------------------------------

# Device address 0x100 lies in the page CUDA never maps (its null page), so the store is
# outside every allocation of every library in the process. A constant address, rather than
# a null pointer, keeps the compiler from treating the store as undefined and dropping it.
_SCRIBBLE_SOURCE = b"""
extern "C" __global__ void scribble() {
    *reinterpret_cast<volatile unsigned long long*>(0x100ull) = 0xdeadull;
}
"""


def provoke_illegal_address(ordinal: int = 0) -> int:
    """Break GPU ``ordinal`` for this whole process with a real illegal-address error.

    Compiles a one-thread kernel with NVRTC, launches it on the device's primary context (the
    one the runtime API, and so ONNX Runtime's CUDA provider, work in), and returns the CUDA
    error code the synchronization reports: 700 (cudaErrorIllegalAddress). From then on every
    CUDA call in this process fails. Raises EngineLoadFailure where there is no GPU, driver
    or NVRTC to do it with.
    """
    reason = no_device_reason(ordinal)
    if reason is not None:
        raise EngineLoadFailure(f"cannot provoke a CUDA fault on GPU {ordinal}: {reason}")
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as exc:
        raise EngineLoadFailure(f"cannot provoke a CUDA fault: {exc}") from exc
    check(driver.cuInit(0), "cuInit")
    device = check(driver.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    attribute = driver.CUdevice_attribute
    major = check(driver.cuDeviceGetAttribute(
        attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "cuDeviceGetAttribute")
    minor = check(driver.cuDeviceGetAttribute(
        attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "cuDeviceGetAttribute")
    cubin = _compile(nvrtc, f"sm_{major}{minor}")
    # Retained and never released: dropping the last reference would destroy the context,
    # and with it the very error this function exists to leave behind.
    context = check(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
    check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent(primary context)")
    module = check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
    kernel = check(driver.cuModuleGetFunction(module, b"scribble"), "cuModuleGetFunction")
    check(driver.cuLaunchKernel(kernel, 1, 1, 1, 1, 1, 1, 0, 0, None, 0), "cuLaunchKernel")
    (err,) = driver.cuCtxSynchronize()
    return int(err)


def _compile(nvrtc: Any, arch: str) -> bytes:
    """The scribble kernel as a cubin for ``arch``, so no PTX JIT (and its driver-version
    constraints) is involved."""
    try:
        program = _nvrtc_check(
            nvrtc, nvrtc.nvrtcCreateProgram(_SCRIBBLE_SOURCE, b"scribble.cu", 0, [], []),
            "nvrtcCreateProgram",
        )
    except RuntimeError as exc:  # cuda-pathfinder found no libnvrtc
        raise EngineLoadFailure(
            f"cannot provoke a CUDA fault: NVRTC is unavailable: {exc}"
        ) from exc
    try:
        options = [f"--gpu-architecture={arch}".encode()]
        (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        if int(err) != 0:
            size = _nvrtc_check(nvrtc, nvrtc.nvrtcGetProgramLogSize(program), "log size")
            text = b" " * size
            _nvrtc_check(nvrtc, nvrtc.nvrtcGetProgramLog(program, text), "nvrtcGetProgramLog")
            raise EngineLoadFailure(
                f"NVRTC cannot compile the fault kernel for {arch}: "
                f"{text.decode(errors='replace').strip()}"
            )
        size = _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        cubin = b" " * size  # NVRTC fills it in place, as cuda-python's own examples do
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _nvrtc_check(nvrtc: Any, result: tuple[Any, ...], what: str) -> Any:
    """check() for NVRTC, whose status codes are not CUDA error codes."""
    err, *values = result
    if int(err) != 0:
        _, name = nvrtc.nvrtcGetErrorString(err)
        raise EngineLoadFailure(f"{what} failed: {name.decode(errors='replace')}")
    return values[0] if values else None
