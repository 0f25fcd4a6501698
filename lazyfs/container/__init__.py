"""`lazyfs run`: start a container from an image mounted lazily (or pulled eagerly), time it,
and report what each layer fetched."""
