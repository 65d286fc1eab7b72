"""CUDA through cuda-python (``cuda.bindings``): device queries, and CUDA error codes mapped
onto the taxonomy.

A sticky error (illegal address, launch failure, uncorrectable ECC...) leaves the CUDA
context of the whole process unusable: every later call fails, a new stream included. Those
become DeviceFailure, and the replica must restart. Any other CUDA error concerns one
operation, and a fresh execution context may succeed: ContextFailure.

cuda-python imports without a driver, so everything here degrades to "no GPU" on a machine
without one instead of failing at import.
"""

from __future__ import annotations

import re

from .errors import ContextFailure, DeviceFailure, TrtServeError

# cudaError_t values whose effect is sticky (CUDA runtime API docs, "Error Handling").
STICKY_ERRORS: dict[int, str] = {
    214: "cudaErrorECCUncorrectable",
    700: "cudaErrorIllegalAddress",
    702: "cudaErrorLaunchTimeout",
    710: "cudaErrorAssert",
    714: "cudaErrorHardwareStackError",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    717: "cudaErrorInvalidAddressSpace",
    718: "cudaErrorInvalidPc",
    719: "cudaErrorLaunchFailure",
}


def is_sticky(code: int) -> bool:
    return int(code) in STICKY_ERRORS


def error_for(code: int, what: str) -> TrtServeError:
    """The taxonomy error for CUDA error ``code`` raised while doing ``what``."""
    code = int(code)
    name = STICKY_ERRORS.get(code) or _error_name(code)
    if is_sticky(code):
        return DeviceFailure(f"{what}: sticky CUDA error {code} ({name}); this process's GPU "
                             f"state is lost")
    return ContextFailure(f"{what}: CUDA error {code} ({name})")


_CODE_IN_TEXT = re.compile(r"(?:CUDA failure|CUDA error|cudaError\w*|error code)\D{0,12}(\d{1,4})")


def error_from_text(text: str, what: str) -> TrtServeError | None:
    """Find a CUDA error code in a library's message (ONNX Runtime's 'CUDA failure 700: ...')."""
    match = _CODE_IN_TEXT.search(text)
    if match is None:
        return None
    err = error_for(int(match.group(1)), what)
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
