"""First-call latency of Maximize through `preimage serve`: cold, cold with the store's cache,
and warm.

One store, three server processes in turn, each timed from its first Maximize request to the
result (1 step, no refine, so the step itself is a small part):

- **cold**: a new store; the server converts the model and measures the channel statistics M_k on
  the reference photographs;
- **restart**: a new server on the same store; it converts again (converted graphs live in each
  process's memory) but reads M_k from the store (``stats/<model>/``);
- **warm**: the same request again in that server (both in memory).

    python bench/first_call.py [--size 224] [--tap logits] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.bundled import bundled_model_path  # noqa: E402
from service.client import PreimageClient  # noqa: E402
from tests.service.test_crash import ServerProcess  # noqa: E402

ONE_STEP = {"steps": 1, "refine_steps": 0, "report_every": 0}


def _first_calls(store: Path, log: Path, model: str | None, size: int, tap: str) -> tuple[str, float, float]:
    """(model id, first call s, second call s) in a fresh server process on ``store``."""
    server = ServerProcess(store, log)
    try:
        server.wait_ready()
        with PreimageClient(server.address, timeout=600) as client:
            if model is None:
                model = client.upload(bundled_model_path().read_bytes(), name="lite0").model.id
            times = []
            for _ in range(2):
                start = time.perf_counter()
                client.maximize(model, tap, [1], height=size, width=size, seed=0, **ONE_STEP).wait()
                times.append(time.perf_counter() - start)
        return model, times[0], times[1]
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tap", default="logits")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    rows = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            store, log = Path(tmp) / "store", Path(tmp) / "server.log"
            model, cold, _ = _first_calls(store, log, None, args.size, args.tap)
            _, restart, warm = _first_calls(store, log, model, args.size, args.tap)
            rows.append({"cold": cold, "restart_with_store_stats": restart, "warm": warm})
            print(json.dumps({k: round(v, 2) for k, v in rows[-1].items()}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "tap": args.tap, "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
