"""`python -m hpcseg`: the hpcseg command (also `torchrun ... -m hpcseg train ...`)."""

from .cli import main

main()
