"""``python -m worker.entrypoints.cli``: the command line, without the installed script."""

from worker.entrypoints.cli import main

main()
