"""The branch forms an export tuned on this machine, kept so that the next export neither measures
again nor chooses differently.

One JSON file, ``$XDG_CACHE_HOME/timm-epsa/branch-forms.json`` (``~/.cache/timm-epsa/`` without
the variable), maps a key naming everything a measurement depends on (CPU model and flags, usable
cores, runtime and its version, precision, batch sizes, the branch's shape) to the form chosen and
the timings it was chosen from. Exports running at once each add their entries: the file is read,
merged and replaced under an exclusive ``flock`` on a lock file beside it, and replaced by a rename,
so a reader sees the old file or the new one. A cache that cannot be read or written costs time
only: the export measures again and says why the cache was not used.
"""
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional

from ..escaping import first_line

try:
    import fcntl
except ImportError:  # Windows: replacing by rename alone; an entry lost to a race is measured again
    fcntl = None

__all__ = ['CACHE_NAME', 'FormCache', 'default_cache_path']

CACHE_NAME = 'branch-forms.json'
_VERSION = 1  # of the file's layout; a file of another version is ignored, then replaced


def default_cache_path() -> Path:
    root = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(root) / 'timm-epsa' / CACHE_NAME


class FormCache:
    """Entries (JSON objects) by key, in the file at ``path``."""

    def __init__(self, path: Optional[Path] = None, log: Callable[[str], None] = lambda message: None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.log = log

    def load(self) -> Dict[str, dict]:
        """Every entry in the file; none where it is missing, unreadable or of another layout."""
        try:
            data = json.loads(self.path.read_text(encoding='utf-8'))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self.log(f'tuning cache {self.path} not read ({first_line(e)}): measuring again')
            return {}
        if not isinstance(data, dict) or data.get('version') != _VERSION or not isinstance(data.get('entries'), dict):
            return {}
        return data['entries']

    def add(self, entries: Mapping[str, dict]) -> None:
        """Merge ``entries`` into the file, keeping those other exports added meanwhile."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                merged = {**self.load(), **entries}
                text = json.dumps({'version': _VERSION, 'entries': merged}, indent=1, sort_keys=True)
                with tempfile.NamedTemporaryFile(
                        'w', encoding='utf-8', dir=self.path.parent, prefix=f'.{self.path.name}.', suffix='.tmp',
                        delete=False) as tmp:
                    tmp.write(text)
                try:
                    os.replace(tmp.name, self.path)
                except BaseException:
                    os.unlink(tmp.name)
                    raise
        except OSError as e:
            self.log(f'tuning cache {self.path} not written ({first_line(e)}): the next export measures again')

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(f'.{self.path.name}.lock'), 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for a read and a rename: milliseconds
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
