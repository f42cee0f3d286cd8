"""The local paths a config names (model folders, the tokenizer, datasets, a checkpoint): refused when missing —
or, for ``train --check --paths-elsewhere`` on a laptop checking a cluster recipe, listed as not checked here.
"""

import os
from typing import Optional, Sequence

from composer_kd.errors import ConfigError

__all__ = ['LocalPaths', 'looks_local']


def looks_local(name: str) -> bool:
    """True for names that can only be a local folder (a hub id is ``name`` or ``org/name``)."""
    return os.path.isabs(name) or name.startswith(('.', '~')) or name.count('/') > 1 or os.sep != '/' and os.sep in name


class LocalPaths:
    """Checks that the local paths a config names exist.

    Args:
        elsewhere (bool): the paths live on another machine (a cluster): a missing one is noted, not refused.
        made_later (Sequence[str]): paths an earlier step of the same job writes (a round's teacher is the previous
            round's student): not checked.
    """

    def __init__(self, elsewhere: bool = False, made_later: Sequence[str] = ()) -> None:
        self.elsewhere = elsewhere
        self.made_later = {os.path.abspath(os.path.expanduser(p)) for p in made_later}
        self.not_checked: list[str] = []

    def _missing(self, key: str, message: str) -> None:
        if not self.elsewhere:
            raise ConfigError(message)
        self.not_checked.append(key)

    def folder(self, key: str, name: str, hub_id_ok: bool = True) -> None:
        """``name`` is an existing folder, or (``hub_id_ok``) may be a Hugging Face Hub id."""
        if os.path.isdir(os.path.expanduser(name)) or (hub_id_ok and not looks_local(name)):
            return
        if os.path.abspath(os.path.expanduser(name)) in self.made_later:
            return
        self._missing(key, f'{key}: folder {name!r} does not exist')

    def file(self, key: str, path: str, message: Optional[str] = None) -> None:
        """``path`` is an existing file or folder (a URI or a ``{format}`` string is not checked)."""
        if '://' in path or '{' in path or os.path.exists(path):
            return
        self._missing(key, message or f'{key}: no such file or folder: {path}')
