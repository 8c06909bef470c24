"""Fetching one file of a Hub repo with the checks ``hf_hub_download`` leaves out.

* **A revision is a name, not a path.** huggingface_hub stores the commit a branch or tag resolved
  to in ``<cache>/refs/<revision>`` and reads it back from there, so a revision such as
  ``../../../../x`` writes (and reads) outside the cache. Such revisions are refused before it sees them.
* **A silent Hub fails fast.** When the Hub accepts connections but does not answer,
  ``hf_hub_download`` retries with growing timeouts for minutes. One metadata request with the
  ``HF_HUB_ETAG_TIMEOUT`` timeout (10 s unless set) comes first: if it fails for a network reason,
  the file comes from the local cache or the error says the Hub cannot be reached.
* **The bytes are the ones the Hub states.** The Hub's ETag for a file in Git LFS or Xet, as
  weights are, is its sha256, and the cache stores the file under it. The file is hashed and
  compared every time it is used: a damaged download, or a cached copy changed since, is removed
  from the cache and refused. (Small files in plain Git have their Git blob hash as ETag instead;
  nothing is fetched through here that would be one.)
"""
import os
from typing import Optional, Tuple

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.file_download import REGEX_SHA256
from huggingface_hub.utils.sha import sha_fileobj

from ..escaping import first_line

try:
    from httpx2 import TransportError  # how huggingface_hub 2.x fails when the network does
except ImportError:  # huggingface_hub 1.x
    from httpx import TransportError

__all__ = [
    'HubFileMismatchError', 'HubUnreachableError', 'InvalidRevisionError', 'TransportError', 'check_revision',
    'download', 'split_repo_revision',
]

# The statuses huggingface_hub retries as the Hub being unavailable (its private
# utils._http._DEFAULT_RETRY_ON_STATUS_CODES, copied rather than imported from a private module).
_UNAVAILABLE = (408, 429, 500, 502, 503, 504)


class InvalidRevisionError(HFValidationError):
    """A revision that is not the name of a branch, tag or commit."""


class HubUnreachableError(ConnectionError):
    """The Hub did not answer (or could not be reached) and the file is not in the local cache."""


class HubFileMismatchError(OSError):
    """A file's bytes do not match the checksum the Hub states for it."""


def split_repo_revision(hf_hub_id: str) -> Tuple[str, Optional[str]]:
    """``'org/repo@revision'`` -> ``('org/repo', 'revision')``, the revision checked (None if not given)."""
    repo_id, at, revision = hf_hub_id.partition('@')
    if not at:
        return repo_id, None
    check_revision(revision)
    return repo_id, revision


def check_revision(revision: Optional[str]) -> None:
    """Refuse a revision huggingface_hub would turn into a path outside its cache, or one that is not
    a Git name at all (empty, absolute, with ``.``/``..`` components, backslashes, '@' or control
    characters). Branch names with ``/`` (``refs/pr/1``) are fine."""
    if revision is None:
        return
    parts = revision.split('/')
    if (not revision or not revision.isprintable() or '\\' in revision or '@' in revision
            or any(part in ('', '.', '..') for part in parts)):
        raise InvalidRevisionError(
            f'revision {revision!r} is not the name of a branch, tag or commit: huggingface_hub would use it as a '
            f'path in its cache, so it is refused')


def download(repo_id: str, filename: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """The local path of ``filename`` of ``repo_id`` at ``revision``, downloaded into the Hub cache
    unless there already, with the checks above. Errors are huggingface_hub's, plus
    :class:`HubUnreachableError`, :class:`HubFileMismatchError` and :class:`InvalidRevisionError`."""
    check_revision(revision)
    etag, unreachable = None, None
    if not constants.HF_HUB_OFFLINE:
        timeout = constants.HF_HUB_ETAG_TIMEOUT
        try:
            etag = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=timeout).etag
        except TransportError as e:
            silent = 'Timeout' in type(e).__name__
            unreachable = f'did not answer within {timeout} s' if silent else f'cannot be reached ({first_line(e)})'
        except HfHubHTTPError as e:
            if e.response is None or e.response.status_code not in _UNAVAILABLE:
                raise
            unreachable = f'is unavailable (HTTP {e.response.status_code})'
    if unreachable is None:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    else:
        try:
            path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except LocalEntryNotFoundError:
            raise HubUnreachableError(
                f'the Hub at {constants.ENDPOINT} {unreachable}, and {filename} of {repo_id} is not in the local cache '
                f'({cache_dir or constants.HF_HUB_CACHE}); check the network (or HF_ENDPOINT) and try again') from None
    _verify(path, etag, repo_id, filename)
    return path


def _verify(path: str, etag: Optional[str], repo_id: str, filename: str) -> None:
    """Compare the file with the sha256 it is cached under (its ETag), or the one just served."""
    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    if not REGEX_SHA256.match(expected):  # a cache without symlinks
        expected = etag or ''
    if not REGEX_SHA256.match(expected):
        return  # the Hub stated no sha256 for it: nothing to compare with
    with open(blob, 'rb') as f:
        actual = sha_fileobj(f).hex()
    if actual == expected:
        return
    removed = True
    for damaged in {path, blob}:
        try:
            os.remove(damaged)
        except FileNotFoundError:
            pass
        except OSError:
            removed = False
    then = ('It was removed from the cache; load it again to download it anew' if removed else
            f'It could not be removed from the cache: delete {blob} and load it again')
    raise HubFileMismatchError(
        f'the {filename} of {repo_id} in the cache does not match the sha256 the Hub states for it '
        f'({expected[:12]}...; its bytes give {actual[:12]}...): the download was damaged or the file altered. {then}')
