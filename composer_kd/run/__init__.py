"""The run layer: YAML run configs → validated settings → Composer objects; ``train`` and ``export``."""
