"""A replica's death, seen by the processes on its node before Ray reports it.

Ray learns that an actor died when its process is gone and its sockets close, and the kernel
closes them only after it has freed the process's memory. For a process holding
``resnet50``'s engine (about 2 GB of 4 KiB pages) Ray's report came 226 ms after the exit on
the 2-core machine, and every request in flight there waited for it before its failover;
the lifeline's came after 1 ms (docs/benchmarks.md).

A lifeline is a robust, process-shared pthread mutex in a file under ``/dev/shm``, locked by
the replica for its whole life. A waiter on it in another process wakes with ``EOWNERDEAD``
when the holder dies: the kernel hands the mutex on while it walks the dying thread's robust
futex list, which it does before it releases the process's memory. Ray's report still comes
later and still counts; the lifeline only lets a Router on the same node act first.

Linux with glibc only, and only on one node: where the file or the C library is missing,
nothing is held or watched, and Ray's report is the only one. The first watcher to learn of
a death removes the file, and a replica stopping on purpose removes its own; the file of a
replica that died unheard (80 bytes) goes when the next replica starts on the node.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("trtserve.lifeline")

DIRECTORY = Path("/dev/shm")
PREFIX = "trtserve-lifeline-"
# Larger than glibc's pthread_mutex_t (40 bytes on x86_64, 48 on aarch64) and its attribute.
_MUTEX_BYTES = 64
_ATTR_BYTES = 16
_SIZE = _MUTEX_BYTES + _ATTR_BYTES
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_MAKING = ".making"


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or not DIRECTORY.is_dir():
        return None
    try:
        # CDLL calls release the GIL, so a waiter blocks only its own thread.
        libc = ctypes.CDLL(None, use_errno=True)
        pointer, number = ctypes.c_void_p, ctypes.c_int
        for name, args in (("pthread_mutexattr_init", [pointer]),
                           ("pthread_mutexattr_setpshared", [pointer, number]),
                           ("pthread_mutexattr_setrobust", [pointer, number]),
                           ("pthread_mutex_init", [pointer, pointer]),
                           ("pthread_mutex_lock", [pointer]),
                           ("pthread_mutex_trylock", [pointer]),
                           ("pthread_mutex_consistent", [pointer]),
                           ("pthread_mutex_unlock", [pointer])):
            function = getattr(libc, name)
            function.argtypes = args
            function.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def available() -> bool:
    """Whether this host has lifelines (Linux, glibc, ``/dev/shm``)."""
    return _LIBC is not None


def path_for(replica_id: str) -> Path:
    return DIRECTORY / f"{PREFIX}{replica_id}"


class _Mapped:
    """The file's mutex, mapped into this process."""

    def __init__(self, path: Path, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _SIZE)
            self.map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.mutex = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.attr = self.mutex + _MUTEX_BYTES


class Lifeline:
    """Held by a replica from its start until its process ends: a thread locks the mutex
    and never lets go, so only the process's death releases it."""

    def __init__(self, replica_id: str) -> None:
        self.path = path_for(replica_id)
        self.held = threading.Event()
        if _LIBC is None:
            return
        # Made under another name and renamed once held, so that no one ever finds the
        # file unheld (sweep_dead would take it for a dead replica's).
        making = self.path.with_name(self.path.name + _MAKING)
        try:
            mapped = _Mapped(making, create=True)
        except OSError as exc:
            log.warning("no lifeline for replica %s (%s): Ray alone reports its death",
                        replica_id, exc)
            return
        libc = _LIBC
        for call, arg in ((libc.pthread_mutexattr_init, None),
                          (libc.pthread_mutexattr_setpshared, _PTHREAD_PROCESS_SHARED),
                          (libc.pthread_mutexattr_setrobust, _PTHREAD_MUTEX_ROBUST)):
            call(mapped.attr, *(() if arg is None else (arg,)))
        libc.pthread_mutex_init(mapped.mutex, mapped.attr)
        self._mapped = mapped
        # A thread of its own: the lock belongs to the thread that took it, and it must not
        # end before the process does (Ray's and Serve's threads come and go).
        threading.Thread(target=self._hold, name="lifeline", daemon=True).start()
        self.held.wait(5)
        os.rename(making, self.path)
        sweep_dead()

    def _hold(self) -> None:
        assert _LIBC is not None
        _LIBC.pthread_mutex_lock(self._mapped.mutex)
        self.held.set()
        threading.Event().wait()

    def close(self) -> None:
        """The replica is stopping on purpose: its file goes (its watchers keep their
        mapping and still see the death)."""
        self.path.unlink(missing_ok=True)


def sweep_dead() -> int:
    """Remove the files of replicas that died with no watcher to remove them (a whole app
    stopped at once, or no Router on their node); each replica does it as it starts.
    Returns how many went."""
    assert _LIBC is not None
    swept = 0
    for path in DIRECTORY.glob(f"{PREFIX}*"):
        if path.name.endswith(_MAKING):
            continue
        try:
            mapped = _Mapped(path, create=False)
        except OSError:
            continue  # gone meanwhile, or another user's
        code = _LIBC.pthread_mutex_trylock(mapped.mutex)
        if code == errno.EBUSY:
            continue  # held: its replica lives
        _pass_on(mapped, code)
        path.unlink(missing_ok=True)
        swept += 1
    return swept


class Watcher:
    """Watches the lifelines of replicas on this node: ``on_death(replica_id)`` is called
    once per replica, from a thread of its own, as soon as its holder is gone."""

    def __init__(self, on_death: Callable[[str], None]) -> None:
        self._on_death = on_death
        self._lock = threading.Lock()
        self._watched: set[str] = set()

    def watch(self, replica_ids: frozenset[str]) -> None:
        """Start watching each replica not watched yet whose lifeline is on this node (a
        replica without one, elsewhere or not started yet, is tried again next time)."""
        if _LIBC is None:
            return
        with self._lock:
            new = replica_ids - self._watched
        for replica_id in new:
            try:
                mapped = _Mapped(path_for(replica_id), create=False)
            except OSError:
                continue
            with self._lock:
                if replica_id in self._watched:
                    continue
                self._watched.add(replica_id)
            threading.Thread(target=self._wait, args=(replica_id, mapped),
                             name=f"lifeline-{replica_id}", daemon=True).start()

    def covers(self, replica_ids: frozenset[str]) -> bool:
        """Whether each of ``replica_ids`` is watched: all of them are on this node."""
        with self._lock:
            return bool(replica_ids) and replica_ids <= self._watched

    def _wait(self, replica_id: str, mapped: _Mapped) -> None:
        assert _LIBC is not None
        code = _LIBC.pthread_mutex_lock(mapped.mutex)
        if code not in (0, errno.EOWNERDEAD, errno.ENOTRECOVERABLE):
            log.warning("lifeline of replica %s: pthread_mutex_lock returned %d; not watched",
                        replica_id, code)
            return
        # The holder never lets go while it lives: whoever gets the mutex learns of its death.
        if code == errno.EOWNERDEAD:
            path_for(replica_id).unlink(missing_ok=True)
        _pass_on(mapped, code)
        self._on_death(replica_id)


def _pass_on(mapped: _Mapped, code: int) -> None:
    """Release a dead holder's mutex that ``pthread_mutex_lock`` or ``trylock`` answered
    ``code`` to. The first to get it (EOWNERDEAD) makes it consistent, and each passes it on,
    so every other waiter (the node's other Routers) gets it in turn: unlocked without that,
    glibc wakes only the next waiter, with ENOTRECOVERABLE, and no one after it."""
    assert _LIBC is not None
    if code == errno.EOWNERDEAD:
        _LIBC.pthread_mutex_consistent(mapped.mutex)
    if code != errno.ENOTRECOVERABLE:
        _LIBC.pthread_mutex_unlock(mapped.mutex)
