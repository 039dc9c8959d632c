"""The `mlcloud` command line: thin Typer commands over the engine in mlcloud/."""
