"""``python -m histoclass`` runs the CLI."""

from histoclass.cli import main

main()
