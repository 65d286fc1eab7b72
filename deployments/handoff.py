"""A batch's inputs handed to an engine replica on the same node through shared memory, not
through Ray's object store.

Ray puts an argument over 100 KiB into its object store: the Router serializes it there, the
raylet tracks it, the replica fetches it. A ``resnet50`` batch of 13 rows is 7.8 MB. So the
Router copies a batch into a buffer of its own, an anonymous shared-memory file
(``memfd_create``), and sends the replica only where to find it (``/proc/<pid>/fd/<fd>`` of
the Router) and where each array lies in it (``SharedInputs``, a few hundred bytes, which Ray
sends inline); the replica maps the file and reads the arrays in place (``Inbox``). The
figures: docs/benchmarks.md, "Inputs handed over in shared memory".

Only where every replica the Router may choose is on its own node (it watches each one's
lifeline, lifeline.py), and only for inputs of at least MIN_BYTES of plain numbers; else the
arrays go through Ray as before. A replica that cannot open the Router's buffer (another
process namespace, another user) answers InputsUnreachable, and that Router sends through
Ray from then on.

A buffer is lent to one attempt at a time (``Outbox``). After an attempt that the replica
answered, refused or died in, it is written again for a later attempt. After one the Router
gave up on (a timeout, a cancel), the replica may still be reading it: it is never written
again, only closed, and the replica's mapping keeps its pages until the replica drops it.
Nothing is named in a file system: a buffer's memory goes when its Router has closed it (or
died) and no replica maps it any more, so a stopped app leaves nothing behind.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .ray_errors import unwrap

log = logging.getLogger("trtserve.handoff")

# Ray's max_direct_call_object_size: an argument below it goes inline with the call, which
# costs less than a buffer.
MIN_BYTES = 100 * 1024
_ALIGN = 64
_GRAIN = 1 << 20
# Free buffers a Router keeps for later batches; one per batch in flight is in use besides.
_KEEP_FREE = 2


class InputsUnreachable(Exception):
    """The replica could not open the Router's buffer. Not in the taxonomy: the Router
    turns it into a ReplicaFailure (another replica, through Ray)."""


@dataclass(frozen=True)
class SharedInputs:
    """What the replica is sent instead of the arrays: the Router's process and descriptor,
    the buffer's inode (which no other buffer has while this one is mapped), and per input
    its dtype, shape and byte offset."""

    pid: int
    fd: int
    inode: int
    arrays: tuple[tuple[str, str, tuple[int, ...], int], ...]

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


def available() -> bool:
    """Whether this host can hand inputs over (Linux: ``memfd_create`` and ``/proc``)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _layout(inputs: Mapping[str, np.ndarray]) -> int | None:
    """Bytes a buffer needs for ``inputs``; None when they are not for a buffer."""
    if any(value.dtype.hasobject for value in inputs.values()):
        return None
    return sum(_aligned(value.nbytes) for value in inputs.values())


class _Buffer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.fd = os.memfd_create("trtserve-inputs", os.MFD_CLOEXEC)
        try:
            # Every page now: no page faults at the first writes, and no memory is an
            # OSError here rather than a signal at a write.
            os.posix_fallocate(self.fd, 0, capacity)
            self.map = mmap.mmap(self.fd, capacity)
        except BaseException:
            os.close(self.fd)
            raise
        self.inode = os.fstat(self.fd).st_ino

    def write(self, inputs: Mapping[str, np.ndarray]) -> SharedInputs:
        arrays, offset = [], 0
        for name, value in inputs.items():
            np.copyto(np.ndarray(value.shape, value.dtype, self.map, offset), value)
            arrays.append((name, value.dtype.str, tuple(value.shape), offset))
            offset = _aligned(offset + value.nbytes)
        return SharedInputs(os.getpid(), self.fd, self.inode, tuple(arrays))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Lent:
    """A buffer lent to one attempt, and what the replica is sent."""

    def __init__(self, buffer: _Buffer, shared: SharedInputs) -> None:
        self.buffer = buffer
        self.shared = shared


class Outbox:
    """A Router's buffers. Used from its event loop only."""

    def __init__(self) -> None:
        self._free: list[_Buffer] = []
        self._lent: set[_Buffer] = set()
        self._largest = 0
        self.off = not available()

    def lend(self, inputs: Mapping[str, np.ndarray]) -> Lent | None:
        """``inputs`` written to a buffer for one attempt; None when they go through Ray."""
        needed = _layout(inputs)
        if self.off or needed is None or needed < MIN_BYTES:
            return None
        fitting = [b for b in self._free if b.capacity >= needed]
        if fitting:
            buffer = min(fitting, key=lambda b: b.capacity)
            self._free.remove(buffer)
        else:
            # As large as the largest batch yet, so that the buffers settle at one size.
            self._largest = max(self._largest, needed)
            try:
                buffer = _Buffer(-(-self._largest // _GRAIN) * _GRAIN)
            except OSError as exc:
                self.turn_off(f"no shared memory for a buffer ({exc})")
                return None
        self._lent.add(buffer)
        return Lent(buffer, buffer.write(inputs))

    def give_back(self, lent: Lent, *, reusable: bool) -> None:
        """``reusable``: the replica is done with it (it answered, refused or died)."""
        buffer = lent.buffer
        self._lent.discard(buffer)
        if reusable and not self.off and len(self._free) < _KEEP_FREE:
            self._free.append(buffer)
        else:
            buffer.close()

    def after_failure(self, exc: BaseException, replica: str | None) -> None:
        """An attempt failed with ``exc`` (as Ray raised it): if its replica could not open
        the buffer, every input goes through Ray from now on."""
        cause = unwrap(exc)
        if isinstance(cause, InputsUnreachable):
            self.turn_off(f"replica {replica}: {cause}")

    def turn_off(self, why: str) -> None:
        """From now on every input goes through Ray's object store."""
        if not self.off:
            log.warning("%s: inputs go through Ray's object store from now on", why)
        self.off = True
        for buffer in self._free:
            buffer.close()
        self._free.clear()

    def close(self) -> None:
        for buffer in [*self._free, *self._lent]:
            buffer.close()
        self._free.clear()
        self._lent.clear()


class Inbox:
    """A replica's mappings of the Routers' buffers, kept while their Routers hold them.
    Used from its event loop only."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], tuple[int, mmap.mmap]] = {}

    def __len__(self) -> int:
        return len(self._maps)

    def arrays(self, shared: SharedInputs) -> dict[str, np.ndarray]:
        """The inputs, read in place (read-only views)."""
        held = self._maps.get((shared.pid, shared.inode))
        mapped = held[1] if held is not None else self._map(shared)
        return {name: np.ndarray(shape, np.dtype(dtype), mapped, offset)
                for name, dtype, shape, offset in shared.arrays}

    def _map(self, shared: SharedInputs) -> mmap.mmap:
        # A new buffer: the time to let go of those their Routers closed (or died with). A
        # view still in use keeps its mapping alive until it is dropped.
        for key, (fd, _) in list(self._maps.items()):
            if _inode(f"/proc/{key[0]}/fd/{fd}") != key[1]:
                del self._maps[key]
        try:
            fd = os.open(shared.path, os.O_RDONLY)
        except OSError as exc:
            raise InputsUnreachable(
                f"cannot open the Router's buffer {shared.path}: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_ino != shared.inode:
                raise InputsUnreachable(f"{shared.path} is no longer the Router's buffer")
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._maps[(shared.pid, shared.inode)] = (shared.fd, mapped)
        return mapped


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
