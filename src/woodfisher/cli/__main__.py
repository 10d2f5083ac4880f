"""``python -m woodfisher.cli``."""

from woodfisher.cli import main

main()
