"""What a node operator configures and runs: the snapshotter service, the CRI image service
beside it (`image_service.py`), and their configuration file (`config.py`, its kinds of value
`values.py`); systemd is told when they serve (`systemd.py`). `lazyfs snapshotter` is the
command that reads the file and starts them."""
