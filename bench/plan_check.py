"""The plan's wall-time estimate against the real run: `qlora-ft check --plan` with a run's options, then that
run (`qlora-ft train`, a whole process, timed from outside), and the two figures side by side.

    python bench/plan_check.py --model ../shared/models/mini-gpt2-fiction \
        --data ../shared/data/corpora/austen/northanger_abbey.txt --max-steps 30

Every argument is passed to both commands; the run writes into a temporary folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="plan-check-") as tmp:
        found = subprocess.run([sys.executable, "-m", "qlora_ft", "check", *argv, "--plan", "--json", "--show", "0"],
                               check=True, capture_output=True, text=True)  # fmt: skip
        plan = json.loads(found.stdout)["plan"]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qlora_ft", "train", *argv, "--output-dir", f"{tmp}/out",
                        "--check-dir", f"{tmp}/ckpt"], check=True, capture_output=True)  # fmt: skip
        real = time.perf_counter() - started
    estimate = plan["expected_wall_seconds"]
    result = {"device": plan["device"], "expected_wall_seconds": estimate, "real_wall_seconds": round(real, 1),
              "error": f"{100 * (estimate - real) / real:+.1f}%", "seconds": plan["seconds"],
              "steps": plan["total_steps"], "peak_memory_bytes": plan["peak_memory_bytes"]}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
