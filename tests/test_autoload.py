"""The start-up hook's plugin loading, run in this process (tests/test_registration.py runs the hook
itself in fresh installs)."""
import sys

import pytest
import timm  # noqa: F401  first: the start-up hook has loaded the plugins, and loads them only once

import _timm_epsa_autoload


def test_a_plugin_that_exits_as_it_is_imported_is_skipped_with_one_warning(tmp_path, monkeypatch):
    """`sys.exit()` in a plugin raises SystemExit, which is no Exception: it must not end `import timm`."""
    (tmp_path / 'timm_exiting_plugin.py').write_text('import sys\nsys.exit(3)\n')
    dist_info = tmp_path / 'timm_exiting_plugin-1.0.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: timm-exiting-plugin\nVersion: 1.0\n')
    (dist_info / 'entry_points.txt').write_text('[timm.models]\nexiting = timm_exiting_plugin\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'timm_exiting_plugin', raising=False)
    with pytest.warns(RuntimeWarning) as caught:
        _timm_epsa_autoload.load_plugins()
    messages = [str(w.message) for w in caught]
    assert messages == ["timm model plugin 'exiting' (timm_exiting_plugin, entry-point group 'timm.models') failed to "
                        "load and was skipped: SystemExit: 3"]
