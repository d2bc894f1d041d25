"""Experiments run from a source checkout, as ``python -m experiments.NAME`` from the repository
root; they are not part of the installed package."""
