"""Attempts to an engine replica on the Router's own node over a Unix socket of the
replica's, not through Serve's handle and Ray's task RPC.

Why: at 256 callers on an H100 or H200 the hop from a Router to a replica and back took
about 23 ms under load and 7 ms unloaded, longer than the replica's own part of a batch
(docs/benchmarks.md). Each call there crosses Serve's request router, Ray's core worker in
both processes and Serve's replica wrapper. Where Router and replica share a node, the same
call needs only a message on a socket.

The replica (``LaneServer``) listens on an abstract Unix socket named after its replica id:
nothing in a file system, gone with the process. It serves processes of its own user only
(``SO_PEERCRED``). A frame is a head and a body: their two lengths, then their pickles. The Router
sends a call (head: its id; body: the model, the inputs, the keyword arguments of
``EngineReplica._infer``) or a cancel (the id); the replica answers each call (head: its id,
whether it succeeded, how many calls it has in flight; body: its result or its error).
A body that one end cannot read (a class that only the other end's version of the code has,
during a rolling update) fails that call alone, as a failure of the replica, not a death:
the lane stays open and its other calls go on. A call runs through the same
``EngineReplica._infer`` as Serve's calls (per-model limits, the attempt's deadline,
cancellation stops the run). One limit holds for both kinds of call: past ``limit()`` calls
in flight, the lane's and ``others()`` (Serve's) together, the replica refuses at once
(``Full``), as Serve sheds past ``max_ongoing_requests``, read at each call: Serve changes it
without replacing the replica. Serve counts only its own calls, so the replica refuses those
too when lane calls hold the rest of the limit (``EngineReplica.infer``).

The Router (``Lanes``) keeps one connection per replica, opened in the background as
replicas appear. A connection that closes with calls in flight ends them at once with
``LaneClosed``: the attempt loop takes it for a death while Serve lists the replica, and
for a replica Serve stopped once it does not. Which replica to use is still decided by the rules of
the request router (``routing.eligible``, ``routing.by_own_load``), with the replica's calls
in flight, as its last lane answer gave them, as the queue length.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any

from engines.errors import ReplicaFailure

from .routed import in_flight
from .routing import by_own_load, eligible

log = logging.getLogger("trtserve.lane")

_LENGTHS = struct.Struct("!QQ")  # of a frame's head and body
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
# Seconds between tries to reach a replica whose lane did not answer (a replica of a
# version without one or with another PROTOCOL, or one still starting).
RETRY_CONNECT_S = 1.0
# Seconds a Router leaves out a replica that answered Full while others have room: its
# count of calls in flight is only as fresh as its last answer to this Router.
FULL_FOR_S = 0.1
# The frames' format. It is part of the socket's name, so that a Router and a replica that
# speak different ones (a rolling update) find no lane to each other and use Serve's path.
PROTOCOL = 2


def address(replica_id: str) -> str:
    """The replica's abstract socket (Linux): the leading NUL keeps it out of any file
    system."""
    return f"\0trtserve-lane-{PROTOCOL}-{replica_id}"


def available() -> bool:
    """Abstract Unix sockets and ``SO_PEERCRED``: Linux."""
    return sys.platform == "linux" and hasattr(socket, "SO_PEERCRED")


class Full(Exception):
    """The replica has ``limit()`` calls in flight already, the lane's and Serve's together:
    a lane call is refused with it, and so is a Serve call (``EngineReplica.infer``)."""


class LaneClosed(Exception):
    """The connection to the replica closed with the call in flight."""


def _frame(head: tuple[Any, ...], body: Any) -> bytes:
    head_bytes = pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL)
    body_bytes = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTHS.pack(len(head_bytes), len(body_bytes)) + head_bytes + body_bytes


async def _read(reader: asyncio.StreamReader) -> tuple[tuple[Any, ...], bytes]:
    """The head, read; the body still a pickle, for the caller to read where it can fail
    alone."""
    head_length, body_length = _LENGTHS.unpack(await reader.readexactly(_LENGTHS.size))
    head = pickle.loads(await reader.readexactly(head_length))
    return head, await reader.readexactly(body_length)


def _picklable(exc: BaseException) -> BaseException:
    """The error itself when it survives pickling (the taxonomy's all do), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class LaneServer:
    """The replica's end. ``infer`` is ``EngineReplica._infer``; ``others`` counts the
    replica's calls in flight that came another way (Serve's). Create it on the event loop
    that runs ``infer``."""

    def __init__(
        self, replica_id: str, infer: Callable[..., Awaitable[Any]], limit: Callable[[], int],
        others: Callable[[], int],
    ) -> None:
        self.infer = infer
        self.limit = limit
        self.others = others
        self.ongoing = 0  # lane calls in flight
        self.calls = 0  # calls received since the start, run or refused (describe)
        self.replica_id = replica_id
        self.closing = False
        self._uid = os.getuid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(address(replica_id))
        self._sock.listen(128)
        self._sock.setblocking(False)
        self._server: asyncio.Server | None = None
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def load(self) -> int:
        """Every call in flight on the replica, the lane's and Serve's."""
        return self.ongoing + self.others()

    async def _serve(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, sock=self._sock)

    def _same_user(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        return bool(uid == self._uid)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not self._same_user(writer):
            log.warning("lane: refused a connection from another user")
            writer.close()
            return
        calls: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                (kind, call_id), body = await _read(reader)
                if kind == "cancel":
                    task = calls.get(call_id)
                    if task is not None:
                        task.cancel()
                    continue
                try:
                    args, kwargs = pickle.loads(body)
                except Exception as exc:
                    self.calls += 1
                    writer.write(_frame((call_id, False, self.load()), RuntimeError(
                        f"replica {self.replica_id} cannot read this call: "
                        f"{type(exc).__name__}: {exc}")))
                    continue
                task = asyncio.ensure_future(self._call(writer, call_id, args, kwargs))
                calls[call_id] = task
                task.add_done_callback(lambda _, c=call_id: calls.pop(c, None))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the Router closed it, or died
        finally:
            # Nobody is left to read the answers: the work done for them stops.
            for task in list(calls.values()):
                task.cancel()
            writer.close()

    async def _call(
        self, writer: asyncio.StreamWriter, call_id: int, args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.calls += 1
        ok, value = False, None
        if self.closing:
            # Serve is stopping this replica (it no longer routes to it): the Router tries
            # another, and blames this one for nothing worse than being unavailable.
            value = ReplicaFailure(f"replica {self.replica_id} is stopping",
                                   replica_id=self.replica_id)
        elif self.load() >= self.limit():
            value = Full(f"{self.load()} calls in flight")
        else:
            self.ongoing += 1
            try:
                ok, value = True, await self.infer(*args, **kwargs)
            except asyncio.CancelledError:
                return  # the Router cancelled it and waits for no answer
            except Exception as exc:
                value = _picklable(exc)
            finally:
                self.ongoing -= 1
        if writer.is_closing():
            return
        try:
            frame = _frame((call_id, ok, self.load()), value)
        except Exception as exc:  # an answer that cannot travel must still end the call
            frame = _frame((call_id, False, self.load()),
                           RuntimeError(f"unpicklable answer: {exc}"))
        writer.write(frame)

    def close(self) -> None:
        """Stops taking connections and calls (calls in flight go on). Serve calls it on the
        loop that serves; once more, harmlessly, when the replica object is collected."""
        self.closing = True
        if self._sock.fileno() < 0:
            return
        if self._server is not None:
            self._server.close()
        self._task.cancel()
        self._sock.close()


class LaneCall:
    """One call in flight: awaitable for the replica's result, ``cancel()`` to stop it there.
    Shaped like Serve's ``DeploymentResponse``, so the attempt loop treats both alike."""

    def __init__(self, lane: Lane, call_id: int, future: asyncio.Future[Any]) -> None:
        self._lane = lane
        self._id = call_id
        self._future = future

    def __await__(self) -> Generator[Any, None, Any]:
        return self._future.__await__()

    def cancel(self) -> None:
        """Stops the call in the replica unless it was answered. (The future may be
        cancelled already: asyncio cancels what a cancelled task awaits.)"""
        self._lane.cancel(self._id)


class Lane:
    """This process's connection to one replica."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.ongoing = 0  # the replica's calls in flight, as of its last answer
        self._full_until = 0.0
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._reading: asyncio.Task[None] | None = None

    @property
    def has_room(self) -> bool:
        """False for ``FULL_FOR_S`` after the replica answered ``Full``, unless it answered
        anything else since."""
        return asyncio.get_running_loop().time() >= self._full_until

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    @property
    def open(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        # Connected here, not by asyncio: uvloop (Serve's loop) refuses an abstract address
        # (EINVAL). A local stream socket's connect waits only while the replica's backlog
        # (128 connections not yet accepted) is full, here at most 1 s.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)
            sock.connect(address(self.replica_id))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self._reading = asyncio.ensure_future(self._answers(reader))

    async def _answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (call_id, ok, ongoing), body = await _read(reader)
                self.ongoing = ongoing
                try:
                    value = pickle.loads(body)
                except Exception as exc:
                    ok, value = False, RuntimeError(
                        f"an answer from replica {self.replica_id} that cannot be read "
                        f"here: {type(exc).__name__}: {exc}")
                self._full_until = (asyncio.get_running_loop().time() + FULL_FOR_S
                                    if isinstance(value, Full) else 0.0)
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the replica's process is gone, or going
        except Exception:
            log.exception("lane to replica %s: an unreadable answer; closing it",
                          self.replica_id)
        finally:
            self.close(LaneClosed(f"replica {self.replica_id}'s lane closed"))

    def call(self, *args: Any, **kwargs: Any) -> LaneCall:
        assert self._writer is not None
        call_id = next(self._ids)
        frame = _frame(("call", call_id), (args, kwargs))  # before anything waits on it
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._writer.write(frame)
        return LaneCall(self, call_id, future)

    def cancel(self, call_id: int) -> None:
        future = self._pending.pop(call_id, None)
        if future is None:
            return  # answered already
        future.cancel()
        if self.open:
            assert self._writer is not None
            self._writer.write(_frame(("cancel", call_id), None))

    def close(self, why: Exception | None = None) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(why or LaneClosed(f"replica {self.replica_id}'s lane "
                                                       "was closed by this process"))
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()


class Lanes:
    """This process's lanes, one per replica, opened in the background as replicas appear
    (``open_for``) and dropped as they go."""

    def __init__(self) -> None:
        self._lanes: dict[str, Lane] = {}
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, float] = {}

    def open_for(self, replica_ids: frozenset[str]) -> bool:
        """Whether every one of ``replica_ids`` has an open lane; starts opening the missing
        ones (a replica whose lane did not answer is tried again after
        ``RETRY_CONNECT_S``). Lanes of replicas no longer listed are let go once their
        calls are answered: Serve lets a replica it stops finish what it holds."""
        for gone in [r for r, lane in self._lanes.items()
                     if r not in replica_ids and not lane.busy]:
            self._lanes.pop(gone).close()
        for gone in [r for r in self._failed_at if r not in replica_ids]:
            del self._failed_at[gone]
        ready = True
        for replica in replica_ids:
            lane = self._lanes.get(replica)
            if lane is not None and lane.open:
                continue
            ready = False
            if replica not in self._connecting:
                self._start(replica)
        return ready

    def _start(self, replica: str) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._failed_at.get(replica, -RETRY_CONNECT_S) < RETRY_CONNECT_S:
            return
        lane = Lane(replica)

        async def connect() -> None:
            try:
                await lane.connect()
            except OSError:
                self._failed_at[replica] = loop.time()
                return
            finally:
                self._connecting.pop(replica, None)
            old = self._lanes.get(replica)
            if old is not None:
                old.close()
            self._lanes[replica] = lane

        self._connecting[replica] = asyncio.ensure_future(connect())

    def choose(
        self, replicas: frozenset[str], exclude: Iterable[str], ejected: Iterable[str]
    ) -> str | None:
        """The replica to send an attempt to over its lane, by the request router's rules
        (``routing.eligible``: exclusions, room, ejections; then ``routing.by_own_load``,
        the replicas' calls in flight as their lanes last gave them, as queue lengths); None
        while any of ``replicas`` has no open lane, or when nothing is allowed (the caller
        goes through Serve)."""
        if not replicas or not self.open_for(replicas):
            return None
        room = [r for r in replicas if self._lanes[r].has_room]
        chosen = eligible(sorted(replicas), room, exclude, ejected, None)
        if not chosen:
            return None
        return by_own_load(chosen, in_flight(), self.queue_lens())[0][0]

    def lane(self, replica: str) -> Lane:
        return self._lanes[replica]

    def queue_lens(self) -> dict[str, int]:
        return {r: lane.ongoing for r, lane in self._lanes.items()}
