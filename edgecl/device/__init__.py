"""edgecl device side."""
