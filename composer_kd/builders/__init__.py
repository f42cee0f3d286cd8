"""From a checked config to objects: the models and tokenizer (``models``), the registered optimizer, scheduler,
algorithms, callbacks and loggers (``objects``), and the precomputed teacher's records (``teacher_data``)."""
