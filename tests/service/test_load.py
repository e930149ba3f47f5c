"""A short load test on loopback: 16 clients over 4 tenants mixing uploads, taps, listings and
short visualizations. Zero lost or wrong results, no error but RESOURCE_EXHAUSTED (queue/quota).

PREIMAGE_LOAD_SECONDS sets the duration (default 10 s here; bench/load.py runs the full ≥ 60 s
and reports the memory figures).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from service.jobs.scheduler import SchedulerLimits
from service.rpc.app import start_server
from service.rpc.auth import AuthConfig, write_config
from service.rpc.config import ServerConfig
from tests.service._load import run_load

SECONDS = float(os.environ.get("PREIMAGE_LOAD_SECONDS", "10"))
TENANTS = {f"team{i}": f"team{i}-token" for i in range(4)}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_sixteen_clients_lose_nothing(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    write_config(
        tmp_path / "tokens.json",
        {name: {"tokens": [token]} for name, token in TENANTS.items()},
        default_quotas={"max_concurrent_jobs": 2, "max_queued_jobs": 2, "max_models": 6},
    )
    config = ServerConfig(
        store_dir=tmp_path / "store",
        seed_bundled=False,
        rpc_threads=24,  # every client holds a thread while its stream runs
        scheduler=SchedulerLimits(max_queued=8),
        auth=AuthConfig(tokens_file=tmp_path / "tokens.json"),
    )
    running = start_server("127.0.0.1:0", config)
    try:
        report = run_load(f"127.0.0.1:{running.port}", TENANTS, clients=16, seconds=SECONDS, rss=rss_mib)
    finally:
        running.stop(grace=None)
    print("\n" + report.summary())
    assert report.lost == [] and report.wrong == [], (report.lost[:5], report.wrong[:5])
    assert report.unexpected_errors() == {}
    for kind in ("upload", "taps", "list", "maximize", "invert"):
        assert report.calls[kind] > 0, f"no successful {kind} call: {report.summary()}"


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("reads resident memory from /proc")
