"""`lazyfs bench`: the container start-up experiment as a command. `experiment.py` runs it
(`lazyfs run` in each mode, interleaved, caches emptied), `results.py` holds what it measured
and writes it (JSON, CSV), `plot.py` draws it; `link.py` is the user-space link emulator the
registry is reached through; `trace.py` reads `--trace` files (`lazyfs trace`)."""
