"""Pipeline stages: each a plain `run(config) -> result` function that the CLI calls."""
