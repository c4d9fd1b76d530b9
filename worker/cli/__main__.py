"""``python -m worker.cli``: the command line, without the installed script."""

from worker.cli import main

main()
