"""edgecl server side."""
