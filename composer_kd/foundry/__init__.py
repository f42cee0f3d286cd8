"""composer-kd as an LLM Foundry plugin: ``llmfoundry train`` builds a ``composer_kd_distillation`` model, our
callbacks and the precomputed-teacher loader through Foundry's registries (the entry points in ``pyproject.toml``).
Nothing here imports ``llmfoundry`` at import time: Foundry imports these entry points, not the other way round."""
