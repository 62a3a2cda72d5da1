"""`python benchmarks/probes [--only SECTION ...] [--verbose]`: runs the probe and prints its tally."""

import sys
from pathlib import Path

# Run as a folder, Python puts this folder first on sys.path; import the package from its parent instead, so that
# a case module's name never shadows a library.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from probes.harness import main  # noqa: E402

sys.exit(main())
