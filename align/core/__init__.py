"""Core: what every layer needs (errors, registries, typed configs, the stage folder contract, atomic files, process rank)."""
