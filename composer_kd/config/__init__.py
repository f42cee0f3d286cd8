"""Configs: the schema of every key (kind, default, help, where it goes), YAML reading, and the checks derived
from them. Plain Python — nothing here imports torch, Composer or transformers — so ``composer-kd`` refuses a bad
config in well under a second, before it loads anything."""
