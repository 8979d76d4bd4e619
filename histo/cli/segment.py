"""`histo segment`: not built yet."""

from histo.cli import not_built

segment = not_built("segment", issue=6)
