"""tandem.engine: the one engine both worker kinds run."""
