"""``composer-kd quickstart``: the whole product on this machine, offline, and the tiny assets the tests use."""

from composer_kd.quickstart.pipeline import run_quickstart as run_quickstart

__all__ = ['run_quickstart']
