"""`python -m lazyfs` is the `lazyfs` command."""

from lazyfs.cli import main

raise SystemExit(main())
