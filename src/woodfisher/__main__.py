"""``python -m woodfisher`` (also what ``torchrun -m woodfisher`` runs)."""

from woodfisher.cli import main

main()
