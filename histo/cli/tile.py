"""`histo tile`: not built yet."""

from histo.cli import not_built

tile = not_built("tile", issue=3)
