"""Built-in recipe files (TOML)."""
