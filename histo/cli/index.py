"""`histo index`: not built yet."""

from histo.cli import not_built

index = not_built("index", issue=5)
