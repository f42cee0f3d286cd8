"""The commands: ``train``, ``rounds``, ``precompute-teacher``, ``eval``, ``export`` and ``samples``, each taking a
config checked by ``composer_kd.config`` and the objects ``composer_kd.builders`` makes from it."""
