"""Load test on loopback: ≥ 16 clients over 4 tenants mixing uploads, taps, listings and short
visualizations against a `preimage serve` process, for ≥ 60 s. Prints calls, latencies, errors by
code, lost/wrong results, and the server's resident memory after warm-up and at the end:

    python bench/load.py [--clients 16] [--seconds 60]

Exit status 1 when anything was lost or wrong or an error other than RESOURCE_EXHAUSTED occurred.
The generator and its checks are tests/service/_load.py (tests/service/test_load.py runs it briefly).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.rpc.auth import write_config  # noqa: E402
from tests.service._load import run_load  # noqa: E402
from tests.service.test_crash import ServerProcess  # noqa: E402

TENANTS = {f"team{i}": f"team{i}-token" for i in range(4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_config(
            d / "tokens.json",
            {name: {"tokens": [token]} for name, token in TENANTS.items()},
            default_quotas={"max_concurrent_jobs": 2, "max_queued_jobs": 2, "max_models": 6},
        )
        server = ServerProcess(d / "store", d / "server.log", extra=["--tokens", str(d / "tokens.json")])
        try:
            server.wait_ready()
            status = Path(f"/proc/{server.proc.pid}/status")

            def rss() -> float:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
                return float("nan")

            start = time.monotonic()
            report = run_load(server.address, TENANTS, clients=args.clients, seconds=args.seconds, seed=args.seed,
                              rss=rss)  # fmt: skip
            print(report.summary())
            every = max(1, len(report.rss_mib) // 12)
            samples = ", ".join(f"{t:.0f}:{m:.0f}" for t, m in report.rss_mib[::every])
            print(f"  wall {time.monotonic() - start:.0f} s; server RSS samples (s:MiB): {samples}")
        finally:
            server.kill()
    bad = report.lost or report.wrong or report.unexpected_errors()
    if bad:
        print(f"FAILED: lost {report.lost[:5]} wrong {report.wrong[:5]} errors {report.unexpected_errors()}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
