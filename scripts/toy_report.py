"""Toy runs beside their chance figures; grouping methods also get group-to-name top-1 (docs/toy.md).

    python scripts/toy_report.py outputs/quickstart_groupvit outputs/quickstart_ovsegmentor [--json report.json]

See ovseg_lab/tools/toy_report.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovseg_lab.errors import SetupError  # noqa: E402


def main() -> int:
    import ovseg_lab.resolvers  # noqa: F401
    from ovseg_lab.tools.toy_report import main as run

    try:
        run()
    except SetupError as err:
        print(f"\nERROR: {err}\n", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
