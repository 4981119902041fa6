"""edgecl's benchmarks (docs/benchmarks.md): one folder per benchmark, shared helpers in ``shared/``.

A package so that every script imports the shared helpers the same way (``from benchmarks.shared import
common``); each script, run as ``python benchmarks/<folder>/<script>.py``, puts the checkout's root on
``sys.path`` first. Never imported by ``edgecl`` itself (tests/test_benchmarks_harness.py checks it).
"""
