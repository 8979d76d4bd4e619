"""`python -m histo.cli ...` (what torchrun launches: `torchrun ... -m histo.cli train ...`)."""

from histo.cli import main

main()
