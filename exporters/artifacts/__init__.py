"""The artifact directory: typed manifest, atomic write, read and verify."""
