"""`histo robustness`: not built yet."""

from histo.cli import not_built

robustness = not_built("robustness", issue=7)
