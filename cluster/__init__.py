"""Ray cluster layer: the only package that imports ray."""
