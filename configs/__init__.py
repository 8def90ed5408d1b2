"""The named configs: `config_lib.load("dvae_mini")` reads `configs/dvae_mini.py`.

Installed with the package as `dalle_jax.configs`, so the names work after any install."""
