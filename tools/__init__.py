"""Developer tooling: not a Django app, not in the image (the dev stack launcher, the config doc)."""
