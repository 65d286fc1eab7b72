"""``trtserve infer``: one request to a live server, its outputs and attempt trail printed;
server errors as ``trtserve: <status> <message>`` (exit 1), no server as exit 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deployments.local_cluster import free_port

from .serving import replica_ids, served

pytestmark = pytest.mark.integration

MAX_BATCH = 4


@pytest.fixture(scope="module")
def url(cache_dir: Path) -> Iterator[str]:
    with served(cache_dir, max_batch=MAX_BATCH) as base:
        yield base


def _infer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deployments.cli", "infer", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("binary", [[], ["--binary"]], ids=["json", "binary"])
def test_infer_prints_outputs_and_the_attempt_trail(url: str, binary: list[str]) -> None:
    done = _infer("tiny", "--url", url, "--batch", "3", *binary)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "output logits: shape [3, 8] dtype float32",
        "output probs: shape [3, 8] dtype float32",
    ]
    assert len(lines) == 3 and lines[2].startswith("attempt 1: ok on replica ")
    assert lines[2].split()[5] in replica_ids()


def test_infer_reads_inputs_from_npy_files(url: str, tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 16), np.float32))
    done = _infer("tiny", "--url", url, "--input", f"x={path}", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    assert "output probs: shape [2, 8] dtype float32" in done.stdout.splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", str(MAX_BATCH + 1)],
         f"trtserve: 400 input 'x': batch {MAX_BATCH + 1} is over this model's limit of 4"),
        (["--timeout", "0.000001"], "trtserve: 504 tiny: the request's deadline passed"),
        (["--input", "x=WRONG_DTYPE"],
         "trtserve: 400 input 'x': expected dtype float32, got float64"),
        (["--input", "y=WRONG_DTYPE"], "trtserve: 400 unknown input tensor(s) ['y']"),
    ],
    ids=["batch over the limit", "deadline", "wrong dtype", "unknown input"],
)
def test_server_errors_are_printed_with_their_status(
    url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((1, 16), np.float64))
    done = _infer("tiny", "--url", url, *[a.replace("WRONG_DTYPE", str(wrong)) for a in args])
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(message), done.stderr


def test_an_unknown_model_is_a_404(url: str) -> None:
    done = _infer("nope", "--url", url)
    assert done.returncode == 1
    assert done.stderr == "trtserve: 404 no model 'nope'; serving: tiny\n"


def test_no_server_is_a_clear_message_and_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = _infer("tiny", "--url", url)
    assert done.returncode == 2
    assert done.stderr == (f"trtserve: cannot reach {url}: connection refused "
                           f"(is `trtserve serve` running there?)\n")


def test_bad_input_arguments_are_exit_2(tmp_path: Path) -> None:
    # Checked before anything is sent, so no server is needed.
    missing = _infer("tiny", "--input", f"x={tmp_path / 'absent.npy'}")
    assert missing.returncode == 2 and "absent.npy" in missing.stderr
    malformed = _infer("tiny", "--input", "x")
    assert malformed.returncode == 2
    assert malformed.stderr == "trtserve: --input takes NAME=FILE.npy, got 'x'\n"
