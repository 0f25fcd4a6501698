"""`lazyfs bench`: the container start-up experiment as a command, and what it needs: the
user-space link emulator it reaches registries through (`link.py`)."""
