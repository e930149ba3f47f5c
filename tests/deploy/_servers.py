"""Real `preimage serve` processes for the deployment tests (shutdown, scale-out)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+):(\d+)")
START_TIMEOUT = 120.0  # importing torch and starting the conversion fork server on a busy 2-core box


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    lines: list[str] = field(default_factory=list)  # stdout and stderr, as they come

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The HTTP port of /metrics and the probes, from the server's `serving` log line."""
        for line in self.lines:
            if line.startswith("{") and '"serving"' in line:
                record = json.loads(line)
                if record.get("msg") == "serving":
                    return record.get("metrics_port")
        return None

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start(store: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """`preimage serve` on a free loopback port with the given store; waits until it listens."""
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # 2 shared cores: one torch thread per server
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    # The store comes from --store, the rest of the settings from the flags given: a developer's
    # own PREIMAGE_* variables must not change what the test runs.
    for name in list(environ):
        if name.startswith("PREIMAGE_") and name not in (env or {}) and name != "PREIMAGE_CACHE":
            del environ[name]
    cmd = [sys.executable, "-m", "service.cli", "serve", "--address", "127.0.0.1:0", "--store", str(store)]
    if "--metrics-port" not in extra and "PREIMAGE_METRICS_PORT" not in (env or {}):
        # Metrics are on by default at 9464: servers run in parallel (pytest -n) would collide.
        cmd += ["--metrics-port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--no-bundled", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def pump() -> None:  # keep reading so a chatty server never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = LISTENING.search(line)
            if m and not found.is_set():
                port.append(int(m.group(2)))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("the server did not start:\n" + "".join(lines[-30:]))
    if not port:
        proc.wait(timeout=10)
        raise RuntimeError(f"the server exited with {proc.returncode}:\n" + "".join(lines[-30:]))
    return ServerProcess(proc, port[0], lines)
