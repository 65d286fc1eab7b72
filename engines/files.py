"""Files that several processes share: generated models, plans, timing caches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: memoryview | bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    Several replicas may write the same file at once: each writes aside, then renames.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
