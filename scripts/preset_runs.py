"""Write tests/fixtures/preset_runs.json: every run (config hash) each experiment's sweep
composes at each scale it is recorded for.

    python scripts/preset_runs.py            # rewrite the fixture from today's presets
    python scripts/preset_runs.py --check    # exit 1 when today's presets compose other runs

A run's folder is the hash of its configuration, so a change to a preset or a config group
that changes any value moves runs to new folders: committed records stop matching and
half-done sweeps start over. tests/test_experiments.py holds the presets to this fixture;
rewrite it only for a deliberate change of what the runs compute (a new config key, a new
default), and say so in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.catalog import compose, sweep_jobs  # noqa: E402
from stablelora.config.identity import config_hash  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "preset_runs.json"
ABOUT = (
    "Every run (config hash) each experiment's sweep composes at each scale. "
    "tests/test_experiments.py checks that the presets compose exactly these runs, so that "
    "committed records and running sweeps keep their folders; scripts/preset_runs.py "
    "rewrites it after a deliberate change."
)


def runs(key: str) -> list[str]:
    """The sorted config hashes of every job of ``<experiment>@<scale>``."""
    name, scale = key.split("@")
    jobs = sweep_jobs(name, scale)
    return sorted({config_hash(compose(name, scale, tuple(job))) for job in jobs})


def main(argv: list[str]) -> int:
    keys = sorted(json.loads(FIXTURE.read_text())["runs"])
    today = {key: runs(key) for key in keys}
    if "--check" in argv:
        recorded = json.loads(FIXTURE.read_text())["runs"]
        moved = [key for key in keys if today[key] != recorded[key]]
        print("same runs" if not moved else f"other runs: {moved}")
        return 1 if moved else 0
    FIXTURE.write_text(json.dumps({"about": ABOUT, "runs": today}, indent=0) + "\n")
    print(f"{sum(map(len, today.values()))} runs of {len(today)} sweeps -> {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
