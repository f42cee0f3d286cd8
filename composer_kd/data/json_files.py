"""JSON records beside datasets: read, written all at once, and fetched from a remote (where "not there" is told
apart from a failure to reach it)."""

import json
import os
import tempfile
from typing import Any, Optional

from streaming.base.storage.download import CloudDownloader

__all__ = ['read_json', 'remote_json', 'write_json']


def read_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, record: Any, indent: Optional[int] = 1) -> None:
    """Writes ``record`` to ``path`` all at once (a temporary file, then a rename)."""
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=indent)
    os.replace(tmp, path)


def _not_found(error: Exception) -> bool:
    """Whether a download failed because the object is not there: Streaming raises ``FileNotFoundError`` for a
    local folder and most stores, but passes on botocore's ``ClientError`` (S3: 404, NoSuchKey) and the Google
    and Azure clients' not-found errors (code 404)."""
    if isinstance(error, FileNotFoundError):
        return True
    response = getattr(error, 'response', None)
    if isinstance(response, dict) and response.get('Error', {}).get('Code') in ('404', 'NoSuchKey'):
        return True
    return 404 in (getattr(error, 'code', None), getattr(error, 'status_code', None))


def remote_json(url: str, timeout: float = 60) -> Optional[dict[str, Any]]:
    """The JSON file at ``url`` (any URI Streaming downloads from, or a folder path); None when it is not there.
    Any other failure (credentials, network) is raised."""
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, os.path.basename(url))
        try:
            CloudDownloader.direct_download(url, target, timeout)
        except Exception as e:
            if _not_found(e):
                return None
            raise
        return read_json(target)


