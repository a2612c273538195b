"""The ``bwacal`` command line: a thin typer layer over the ``bwacal`` library."""
