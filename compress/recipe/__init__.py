"""Recipes: the TOML files that say what each table and the MLPs become, parsed and validated."""
