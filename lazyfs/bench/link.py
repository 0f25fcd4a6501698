"""A user-space TCP link emulator: round-trip latency and bandwidth between client and server.

Loopback is too fast to show what lazy fetching costs on a real network, and `tc netem` is not
always available. This forwards each connection to a target and, in each direction, sends its
bytes one after another at the link's rate (a serializer, per connection or, `aggregate`,
shared by all connections like one link's), then holds them for rtt/2 of propagation. No byte
arrives before the link could have delivered it: an idle link earns no credit, so a burst after
a pause leaves at the rate too. Opening a connection costs one extra round trip, as a TCP
handshake would. Its own scheduling only ever adds time. No root needed.

    python -m lazyfs.bench.link --listen 127.0.0.1:8081 --target 127.0.0.1:8080 \\
        --rtt-ms 20 --rate-mbit 100 --aggregate

`run_link_emulator(...)` serves inside trio, `start_link_emulator(...)` in a subprocess;
`parse_link("20ms,100mbit")` reads the `--link` of `lazyfs bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# Bytes are forwarded in pieces of at most this much, each delivered whole once its last byte
# would have arrived: a piece's first byte comes later than on a wire (never earlier), so a
# piece lasts at most about PIECE_S of link time, and at least an Ethernet frame.
CHUNK_BYTES = 16 * 1024
MIN_PIECE_BYTES = 1500
PIECE_S = 0.001
# What one direction of a connection holds beyond its bytes in flight (a router's queue).
QUEUE_BYTES = 256 * 1024
START_TIMEOUT_S = 10.0


class LinkSpecError(ValueError):
    """A `--link` value that is not RTT[,RATE]."""


@dataclass(frozen=True)
class LinkSpec:
    """A link: its round trip (ms) and its rate per direction (10**6 bit/s; 0 unshaped)."""

    rtt_ms: float
    rate_mbit: float = 0.0

    def __str__(self) -> str:
        rate = f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "unshaped"
        return f"{self.rtt_ms:g} ms RTT, {rate}"


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
_RATE_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1000.0}


def parse_link(text: str) -> LinkSpec:
    """`RTT[,RATE]` as `20ms,100mbit` (units: us, ms, s; bit, kbit, mbit, gbit per second,
    powers of 1000; a RATE of 0 or none leaves the rate unshaped). Raises LinkSpecError."""
    rtt_text, _, rate_text = text.replace(" ", "").lower().partition(",")
    rtt = _number_with_unit(rtt_text, _TIME_UNITS)
    rate = _number_with_unit(rate_text, _RATE_UNITS) if rate_text else 0.0
    if rtt is None or rate is None:
        raise LinkSpecError(f"{text!r} is not RTT,RATE (for example 20ms,100mbit)")
    return LinkSpec(rtt, rate)


def _number_with_unit(text: str, units: dict[str, float]) -> float | None:
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", text.removesuffix("/s"))
    if match is None or (match.group(2) not in units and float(match.group(1)) != 0):
        return None
    return float(match.group(1)) * units.get(match.group(2), 0.0)


class Serializer:
    """One direction of a link: bytes leave one after another at `rate_bytes_per_s`, never
    faster. Shared by connections, it sends their bytes in the order they were handed over,
    as a router's queue does. Time spent idle earns nothing: what comes after a pause
    leaves at the rate, not in a burst."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError(f"a link's rate must be positive, not {rate_bytes_per_s}")
        self.rate = rate_bytes_per_s
        self.busy_until = -math.inf

    def send(self, size: int, now: float) -> float:
        """Queue `size` bytes handed over at `now`; returns when their last byte has left
        (the link's queue drained and these sent at its rate)."""
        self.busy_until = max(now, self.busy_until) + size / self.rate
        return self.busy_until


class _Link:
    """Settings shared by every connection of one emulator."""

    def __init__(
        self, target_host: str, target_port: int, rtt_ms: float, rate_mbit: float, aggregate: bool
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = rtt_ms / 2000
        self.rate_bytes_per_s = rate_mbit * 1_000_000 / 8
        self.piece_bytes = CHUNK_BYTES
        if self.rate_bytes_per_s:
            self.piece_bytes = max(MIN_PIECE_BYTES,
                                   min(CHUNK_BYTES, int(self.rate_bytes_per_s * PIECE_S)))
        # Enough queued pieces to keep a bandwidth-delay product in flight, and a bound.
        in_flight = self.rate_bytes_per_s * self.delay_s if self.rate_bytes_per_s else 2**24
        self.queue_pieces = min(4096, math.ceil((in_flight + QUEUE_BYTES) / self.piece_bytes))
        self.shared: tuple[Serializer, Serializer] | None = None
        if aggregate and self.rate_bytes_per_s:
            self.shared = (Serializer(self.rate_bytes_per_s), Serializer(self.rate_bytes_per_s))

    def serializers(self) -> tuple[Serializer | None, Serializer | None]:
        """(client to server, server to client) serializers of a new connection."""
        if self.shared is not None:
            return self.shared
        if not self.rate_bytes_per_s:
            return None, None
        return Serializer(self.rate_bytes_per_s), Serializer(self.rate_bytes_per_s)

    async def handle(self, client: trio.SocketStream) -> None:
        """Forward one client connection until both directions end or either side breaks."""
        async with client:
            await trio.sleep(2 * self.delay_s)  # the handshake's round trip
            try:
                server = await trio.open_tcp_stream(self.target_host, self.target_port)
            except OSError as exc:
                log.warning("cannot connect to %s:%d: %s", self.target_host, self.target_port, exc)
                return
            up, down = self.serializers()
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, server, up, nursery.cancel_scope)
                nursery.start_soon(self._pipe, server, client, down, nursery.cancel_scope)

    async def _pipe(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        serializer: Serializer | None,
        connection: trio.CancelScope,
    ) -> None:
        """One direction: serialize, stamp with the arrival time, deliver then."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](self.queue_pieces)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, receive, sink, connection)
            async with send:
                try:
                    while data := await source.receive_some(self.piece_bytes):
                        sent = trio.current_time()
                        if serializer is not None:
                            sent = serializer.send(len(data), sent)
                        await send.send((sent + self.delay_s, data))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    connection.cancel()

    @staticmethod
    async def _deliver(
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        sink: trio.SocketStream,
        connection: trio.CancelScope,
    ) -> None:
        async with receive:
            try:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await sink.send_all(data)
                await sink.send_eof()  # pass a half-close on, after the data before it
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                connection.cancel()


async def run_link_emulator(
    listen_host: str,
    listen_port: int,
    target_host: str,
    target_port: int,
    rtt_ms: float,
    rate_mbit: float,
    *,
    aggregate: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started(port)` reports the port listened on.

    `rate_mbit` (10**6 bit/s) applies to each direction, per connection unless `aggregate`;
    0 means unshaped. `listen_port` 0 picks a free port. Raises ValueError for a negative
    round trip or rate.
    """
    if rtt_ms < 0 or rate_mbit < 0:
        raise ValueError(f"rtt_ms and rate_mbit must not be negative ({rtt_ms}, {rate_mbit})")
    link = _Link(target_host, target_port, rtt_ms, rate_mbit, aggregate)
    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
    port = int(listeners[0].socket.getsockname()[1])
    task_status.started(port)
    await trio.serve_listeners(link.handle, listeners)


def start_link_emulator(
    target_port: int,
    rtt_ms: float,
    rate_mbit: float,
    *,
    aggregate: bool = False,
    target_host: str = "127.0.0.1",
    tied: bool = False,
) -> tuple[int, subprocess.Popen[bytes]]:
    """Run the emulator in a subprocess on a free 127.0.0.1 port: (port, process), in a
    session of its own (a Ctrl-C at the terminal leaves it to its caller).

    The caller stops it with `process.terminate()` and `process.wait()`. With `tied`, it also
    ends when its standard input, a pipe from the caller, closes: when the caller exits,
    however it does. Raises RuntimeError if it does not start.
    """
    command = [
        sys.executable, "-m", __name__,
        "--listen=127.0.0.1:0",
        f"--target={target_host}:{target_port}",
        f"--rtt-ms={rtt_ms}",
        f"--rate-mbit={rate_mbit}",
    ] + (["--aggregate"] if aggregate else []) + (["--until-stdin-closes"] if tied else [])
    # Wherever this module came from, the subprocess imports the same.
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    # Unbuffered, so select() sees exactly what has not been read yet.
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE if tied else subprocess.DEVNULL, stdout=subprocess.PIPE,
        bufsize=0, start_new_session=True, env={**os.environ, "PYTHONPATH": path})
    assert process.stdout is not None
    line = b""
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            byte = process.stdout.read(1)
            if not byte:
                break
            line += byte
        # "listening on 127.0.0.1:PORT -> ..."
        port = int(line.split()[2].rpartition(b":")[2])
    except (IndexError, ValueError):
        process.kill()
        process.wait()
        if process.stdin is not None:
            process.stdin.close()
        raise RuntimeError(f"link emulator did not start: {line!r}") from None
    finally:
        process.stdout.close()
    return port, process


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0 or math.isnan(number):
        raise argparse.ArgumentTypeError(f"{value!r} must be a number >= 0")
    return number


async def _until_stdin_closes() -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The command line: serve until interrupted (or, with --until-stdin-closes, until the
    standard input closes)."""
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT (port 0: any)")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=_non_negative, default=0.0, help="round trip, ms")
    parser.add_argument(
        "--rate-mbit", type=_non_negative, default=0.0, help="per direction, 10^6 bit/s; 0: off"
    )
    parser.add_argument(
        "--aggregate", action="store_true", help="one rate for all connections, not each"
    )
    parser.add_argument("--until-stdin-closes", action="store_true",
                        help="stop when the standard input closes (the parent exited)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="linkemu: %(message)s")

    (listen_host, listen_port), (target_host, target_port) = args.listen, args.target

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(
                    run_link_emulator,
                    listen_host,
                    listen_port,
                    target_host,
                    target_port,
                    args.rtt_ms,
                    args.rate_mbit,
                    aggregate=args.aggregate,
                )
            )
            print(
                f"listening on {args.listen[0]}:{port} -> {args.target[0]}:{args.target[1]}"
                f" rtt {args.rtt_ms} ms, {args.rate_mbit or 'unlimited'} Mbit/s"
                f"{' aggregate' if args.aggregate else ' per connection'}",
                flush=True,
            )
            if args.until_stdin_closes:
                await _until_stdin_closes()
                nursery.cancel_scope.cancel()

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve)


if __name__ == "__main__":
    main(prog="python -m lazyfs.bench.link")
