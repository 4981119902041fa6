"""The `edgecl` command line (installed as ``edgecl.cli``): thin Typer wrappers over library functions."""
