"""The console's pages, a module per area; ``worker.entrypoints.console.routes`` maps them to
paths."""
