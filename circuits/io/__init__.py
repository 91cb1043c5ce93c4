"""Circuits out of the engine: file formats (`formats`), diagrams (`render`), comparisons
(`compare`)."""
