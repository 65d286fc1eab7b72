"""CUDA error codes onto the taxonomy: the table against NVIDIA's own enum, the classes for
cuda-python results and for ONNX Runtime's messages, and what the runner does with each."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pytest

from engines import cuda
from engines.errors import (
    ContextFailure,
    DeviceFailure,
    ExecutionError,
    OutOfMemory,
    TrtServeError,
)
from engines.onnxruntime import map_error
from engines.runner import ModelRunner
from engines.spec import DYNAMIC, IOSpec, TensorSpec

TABLES = {
    DeviceFailure: {**cuda.STICKY_ERRORS, **cuda.PROCESS_ERRORS},
    ExecutionError: cuda.DETERMINISTIC_ERRORS,
    OutOfMemory: cuda.OUT_OF_MEMORY_ERRORS,
}

# The codes issue 10 names, class by class: the table must keep every one of them.
NAMED = {
    DeviceFailure: {214, 226, 700, 702, 710, 714, 715, 716, 717, 718, 719, 721, 810, 911,
                    3, 35, 46, 100, 101, 201, 709, 802, 803, 804, 999},
    ExecutionError: {1, 209, 400},
    OutOfMemory: {2},
}


@pytest.mark.parametrize("cls", list(TABLES))
def test_every_named_code_has_its_class(cls: type[TrtServeError]) -> None:
    assert NAMED[cls] <= set(TABLES[cls])
    for code in TABLES[cls]:
        assert cuda.error_class(code) is cls
        assert type(cuda.error_for(code, "x")) is cls


def test_the_tables_do_not_overlap_and_the_rest_is_a_context_failure() -> None:
    codes = [code for table in TABLES.values() for code in table]
    assert len(codes) == len(set(codes))
    for code in (4, 200, 701, 712):  # not in any table: one operation failed
        assert type(cuda.error_for(code, "x")) is ContextFailure


def test_the_table_names_match_nvidias_enum() -> None:
    runtime = pytest.importorskip("cuda.bindings.runtime",
                                  reason="needs cuda-python: pip install cuda-python")
    for table in TABLES.values():
        for code, name in table.items():
            assert runtime.cudaError_t(code).name == name, code


def test_every_code_documented_as_needing_a_restart_is_sticky() -> None:
    # The CUDA runtime's own words, as cuda-python ships them in each member's __doc__.
    runtime = pytest.importorskip("cuda.bindings.runtime",
                                  reason="needs cuda-python: pip install cuda-python")
    restart = re.compile(r"process\s+must\s+be\s+terminated\s+and\s+relaunched")
    documented = {int(m) for m in runtime.cudaError_t if restart.search(m.__doc__ or "")}
    assert documented, "cuda-python ships no enum docs: the check below would be vacuous"
    assert documented <= set(cuda.STICKY_ERRORS), documented - set(cuda.STICKY_ERRORS)


def test_messages_say_what_the_class_means() -> None:
    assert "sticky" in str(cuda.error_for(700, "a kernel"))
    assert "whole process" in str(cuda.error_for(35, "cudaMalloc"))
    assert "repeats on any context" in str(cuda.error_for(209, "a kernel"))
    assert "out of memory" in str(cuda.error_for(2, "cudaMalloc"))
    assert ExecutionError.retry == "never" and ExecutionError.http_status == 500
    assert issubclass(OutOfMemory, ContextFailure) and OutOfMemory.local_retries == 1


# ONNX Runtime reports a failed CUDA call as "CUDA failure <code>: <text> ; GPU=..."
# (onnxruntime/core/providers/cuda/cuda_call.cc); TensorRT's recorder as "cudaError <code>".
@pytest.mark.parametrize(
    ("text", "cls"),
    [
        ("CUDA failure 700: an illegal memory access was encountered ; GPU=0", DeviceFailure),
        ("CUDA failure 35: CUDA driver version is insufficient ; GPU=0", DeviceFailure),
        ("CUDA failure 1: invalid argument ; GPU=0 ; expr=cudaMemcpyAsync", ExecutionError),
        ("CUDA failure 209: no kernel image is available for execution", ExecutionError),
        ("CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc", OutOfMemory),
        ("CUDA failure 6: the launch timed out ; GPU=0", ContextFailure),
        ("(In catchCudaError (cudaError 716: misaligned address))", DeviceFailure),
    ],
)
def test_onnx_runtime_cuda_failures_get_the_same_classes(text: str,
                                                         cls: type[TrtServeError]) -> None:
    err = map_error(RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {text}"), "tiny")
    assert type(err) is cls
    assert text in err.message


def test_onnx_runtime_failures_without_a_cuda_code_are_context_failures() -> None:
    err = map_error(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom"), "tiny")
    assert type(err) is ContextFailure


# --- what the runner does with each class ---------------------------------------------------


class _Failing:
    """A context that raises the next error from a shared list, then answers."""

    def __init__(self, errors: list[TrtServeError], generation: int) -> None:
        self.errors, self.generation = errors, generation

    def execute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.errors:
            raise self.errors.pop(0)
        return {"y": np.asarray(inputs["x"])}

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Engine:
    name, backend, device = "fake", "fake", "cpu"
    spec = IOSpec((TensorSpec("x", np.dtype(np.float32), (DYNAMIC,)),),
                  (TensorSpec("y", np.dtype(np.float32), (DYNAMIC,)),), None)

    def __init__(self, errors: list[TrtServeError]) -> None:
        self.errors = errors

    def create_context(self, generation: int) -> _Failing:
        return _Failing(self.errors, generation)

    def close(self) -> None:
        pass


X = {"x": np.ones(3, np.float32)}


def _outcomes(errors: list[TrtServeError]) -> tuple[list[str], TrtServeError | None]:
    runner = ModelRunner(_Engine(errors), pool_size=1, spares=1)
    try:
        _, trail = runner.infer(X, local_retries=2)
    except TrtServeError as exc:
        return [a["outcome"] for a in exc.trail], exc
    finally:
        runner.close()
    return [a.outcome for a in trail], None


def test_out_of_memory_gets_one_local_retry_then_goes_back() -> None:
    oom = [OutOfMemory("oom 1"), OutOfMemory("oom 2"), OutOfMemory("oom 3")]
    outcomes, err = _outcomes(oom)
    # local_retries=2 would allow a third try; out of memory stops after one fresh context.
    assert outcomes == ["OutOfMemory", "OutOfMemory"]
    assert type(err) is OutOfMemory and err.retry == "same-replica"
    outcomes, err = _outcomes([OutOfMemory("once")])
    assert outcomes == ["OutOfMemory", "ok"] and err is None


def test_an_execution_error_is_never_retried() -> None:
    outcomes, err = _outcomes([cuda.error_for(1, "a kernel")])
    assert outcomes == ["ExecutionError"]
    assert type(err) is ExecutionError and err.retry == "never"


def test_a_process_level_cuda_error_poisons_the_runner() -> None:
    errors: list[TrtServeError] = [cuda.error_for(35, "cudaMalloc")]
    runner = ModelRunner(_Engine(errors), pool_size=1, spares=1)
    try:
        with pytest.raises(DeviceFailure, match="whole process"):
            runner.infer(X, local_retries=2)
        assert runner.poisoned is not None
    finally:
        runner.close()
