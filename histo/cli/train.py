"""`histo train`: not built yet."""

from histo.cli import not_built

train = not_built("train", issue=4)
