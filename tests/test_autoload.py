"""The start-up hook's plugin loading, run in this process (tests/test_registration.py runs the hook
itself in fresh installs)."""
import re
import sys

import pytest
import timm  # noqa: F401  first: the start-up hook has loaded the plugins, and loads them only once

import _timm_epsa_autoload
from fake_plugin import write_plugin


def test_a_plugin_that_exits_as_it_is_imported_is_skipped_with_one_warning(tmp_path, monkeypatch):
    """`sys.exit()` in a plugin raises SystemExit, which is no Exception: it must not end `import timm`."""
    write_plugin(tmp_path, 'timm_exiting_plugin', 'import sys\nsys.exit(3)\n', entry='exiting')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'timm_exiting_plugin', raising=False)
    with pytest.warns(RuntimeWarning) as caught:
        _timm_epsa_autoload.load_plugins()
    messages = [str(w.message) for w in caught]
    assert messages == ["timm model plugin 'exiting' (timm_exiting_plugin, entry-point group 'timm.models') failed to "
                        "load and was skipped: SystemExit: 3"]


@pytest.mark.parametrize('entry_points, error', [
    (b'[timm.models]\nlisted = \xff\xfe\n', 'UnicodeDecodeError'),
    (b'[timm.models]\nno equals sign on this line\n', '(TypeError|ParsingError)'),  # ParsingError: Python 3.9
], ids=['undecodable', 'malformed'])
def test_unreadable_entry_points_of_one_distribution_skip_it_not_the_rest(tmp_path, monkeypatch, entry_points, error):
    """A stale copy of a distribution (an egg-info left later on the path, shadowed by the installed
    one) whose entry_points.txt is not UTF-8, or has a line that is no entry point, used to end the
    scan, so no plugin after it loaded."""
    installed, stale = tmp_path / 'installed', tmp_path / 'stale'
    installed.mkdir()
    write_plugin(installed, 'timm_listed_plugin', 'LOADED = True\n', entry='listed')
    stale_info = stale / 'timm_listed_plugin-0.1.egg-info'
    stale_info.mkdir(parents=True)
    (stale_info / 'PKG-INFO').write_text('Metadata-Version: 2.1\nName: timm-listed-plugin\nVersion: 0.1\n')
    (stale_info / 'entry_points.txt').write_bytes(entry_points)
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.syspath_prepend(str(stale))  # scanned first: the scan must go on past it
    monkeypatch.delitem(sys.modules, 'timm_listed_plugin', raising=False)
    with pytest.warns(RuntimeWarning) as caught:
        _timm_epsa_autoload.load_plugins()
    assert sys.modules['timm_listed_plugin'].LOADED
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert re.match(
        re.escape(f'timm model plugins: skipped the entry points of 1 installed distribution that could not be read: '
                  f'{stale_info} (') + f'{error}: ', messages[0]), messages[0]
