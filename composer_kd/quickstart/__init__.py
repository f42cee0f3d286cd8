"""``composer-kd quickstart``: the whole product on this machine, offline, and the tiny assets the tests use."""

from composer_kd.quickstart.locate import notebook_folders as notebook_folders
from composer_kd.quickstart.pipeline import run_quickstart as run_quickstart

__all__ = ['notebook_folders', 'run_quickstart']
