"""`histo search`: not built yet."""

from histo.cli import not_built

search = not_built("search", issue=5)
