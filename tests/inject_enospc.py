"""``python tests/inject_enospc.py N ARGS...``: runs ``composer-kd ARGS`` with the N-th ``torch.save`` into a file
Composer opened failing half-way, as a full disk does (some bytes written, then ``OSError(ENOSPC)``) — fault
injection for the tests. (``torch.save`` into memory buffers, as torch.distributed uses it, is left alone.)"""

import errno
import io
import sys

import torch

from composer_kd.cli import main

_real_save = torch.save
_calls = 0


def _failing_save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - torch.save's signature
    global _calls
    if not isinstance(f, io.BufferedWriter):  # Composer saves into a file it opened
        return _real_save(obj, f, *args, **kwargs)
    _calls += 1
    if _calls != int(sys.argv[1]):
        return _real_save(obj, f, *args, **kwargs)
    f.write(b'PK\x03\x04' + bytes(4096))  # the start of a zip archive, never finished
    raise OSError(errno.ENOSPC, 'No space left on device', f.name)


torch.save = _failing_save
if __name__ == '__main__':
    sys.exit(main(sys.argv[2:]))
