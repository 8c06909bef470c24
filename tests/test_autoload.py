"""The start-up hook's plugin loading, run in this process (tests/test_registration.py runs the hook
itself in fresh installs)."""
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
