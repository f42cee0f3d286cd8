"""``python -m composer_kd`` is the ``composer-kd`` CLI (and ``composer -n N -m composer_kd train ...``)."""

import sys

from composer_kd.cli import main

if __name__ == '__main__':
    sys.exit(main())
