"""Where the tests' inputs live, wherever a test file sits (tests/unit, tests/integration)."""

from pathlib import Path

HELPERS = Path(__file__).resolve().parent
REPO = HELPERS.parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# The unmodified MiniMind checkout beside this repository (../shared/reference/minimind).
MINIMIND = REPO.parent / "shared" / "reference" / "minimind"
