"""Stages: each is a typed config plus a run function, registered as an `align` command."""
