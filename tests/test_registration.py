"""timm sees EPSANet without ``import timm_epsa``: the start-up hook and the ``timm.models`` entry point;
and the wheel and the sdist hold what a release needs.

The package is installed twice per test module, from a copy of this checkout: as a wheel and as an
editable install, each into a fresh virtual environment, and every check runs in a new interpreter.
The environments reuse the installed torch and timm through a path file listing this interpreter's
site-packages folders rather than through ``--system-site-packages``: that would also run the .pth
files there, among them the hook of the timm-epsa installed here, and a wheel missing its own hook
would pass unnoticed.
"""
import email
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from fake_plugin import write_plugin

pytestmark = pytest.mark.slow  # virtual environments and new interpreters

REPO = Path(__file__).resolve().parents[1]
CHILDREN = Path(__file__).with_name('_registration_children.py')
EPSANETS = ['epsanet50', 'epsanet50_large', 'epsanet101', 'epsanet101_large']


class Env:
    """A virtual environment with timm-epsa installed, and how to run Python in it."""

    def __init__(self, root: Path, workdir: Path):
        self.python = str(root / ('Scripts/python.exe' if os.name == 'nt' else 'bin/python'))
        self.workdir = workdir  # not the checkout, whose timm_epsa/ would shadow the installed one
        self.package_home: Optional[Path] = None  # where `timm_epsa` must come from, once installed

    def site_packages(self) -> str:
        return self.run('import sysconfig; print(sysconfig.get_path("purelib"))').stdout.strip()

    def run(
            self,
            code_or_args,
            env: Optional[Dict[str, str]] = None,
            cwd: Optional[Path] = None,
    ) -> subprocess.CompletedProcess:
        """Run code (a string) or a script with arguments (a list); fail the test if it fails."""
        args = ['-c', textwrap.dedent(code_or_args)] if isinstance(code_or_args, str) else code_or_args
        full_env = {k: v for k, v in os.environ.items() if k not in ('TIMM_EPSA_AUTOLOAD', 'PYTHONPATH')}
        full_env['OMP_NUM_THREADS'] = '1'  # tiny models; more threads only contend on a shared machine
        full_env.update(env or {})
        return _run([self.python, *args], cwd=cwd or self.workdir, env=full_env)

    def run_json(self, code_or_args, env: Optional[Dict[str, str]] = None) -> dict:
        return json.loads(self.run(code_or_args, env).stdout.strip().splitlines()[-1])


def _build_flags() -> List[str]:
    """Build offline with the installed setuptools when it is recent enough, else let pip fetch one."""
    try:
        import setuptools
    except ImportError:
        return []
    return ['--no-build-isolation', '--no-index'] if int(setuptools.__version__.split('.')[0]) >= 77 else []


def _run(args: List[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    if result.returncode != 0:
        pytest.fail(f'{args[:4]}... exited with {result.returncode}\n'
                    f'--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}')
    return result


def _pip(*args: str) -> None:
    _run([sys.executable, '-m', 'pip', *args])


def _make_env(root: Path, workdir: Path) -> Env:
    venv.create(root, with_pip=False)
    env = Env(root, workdir)
    site_dirs = [p for p in sys.path if Path(p).name in ('site-packages', 'dist-packages')]
    Path(env.site_packages(), '_registration_test_deps.pth').write_text('\n'.join(site_dirs) + '\n')
    return env


def _install(env: Env, *target: str) -> None:
    # --ignore-installed: never let pip touch the timm-epsa it sees through the path file.
    _pip('--python', env.python, 'install', '--no-deps', '--ignore-installed', *_build_flags(), *target)


def _repository_files() -> List[str]:
    """The files of this checkout as a clean clone plus uncommitted work would have them."""
    if shutil.which('git') is None or not (REPO / '.git').exists():
        pytest.skip('needs a git checkout to copy the sources from')
    files = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
        cwd=REPO, check=True, capture_output=True, text=True).stdout.split('\0')
    return [name for name in files if name and (REPO / name).is_file()]  # not deleted but still listed


@pytest.fixture(scope='module')
def source(tmp_path_factory) -> Path:
    """This checkout as a clean clone plus uncommitted work would have it."""
    dest = tmp_path_factory.mktemp('source')
    for name in _repository_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope='module')
def wheel(source, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp('dist')
    _pip('wheel', '--no-deps', *_build_flags(), '--wheel-dir', str(dist), str(source))
    return next(dist.glob('timm_epsa-*.whl'))


@pytest.fixture(scope='module')
def wheel_env(wheel, tmp_path_factory) -> Env:
    env = _make_env(tmp_path_factory.mktemp('wheel-venv'), tmp_path_factory.mktemp('wheel-work'))
    _install(env, str(wheel))
    env.package_home = Path(env.site_packages())
    return env


@pytest.fixture(scope='module')
def editable_env(source, tmp_path_factory) -> Env:
    env = _make_env(tmp_path_factory.mktemp('editable-venv'), tmp_path_factory.mktemp('editable-work'))
    _install(env, '--editable', str(source))
    env.package_home = source
    return env


@pytest.fixture(scope='module', params=['wheel', 'editable'])
def installed(request) -> Env:
    return request.getfixturevalue(f'{request.param}_env')


def test_bare_start_imports_nothing_heavy(installed):
    state = installed.run_json('''
        import json, sys
        print(json.dumps({
            'heavy': [m for m in ('torch', 'timm', 'timm_epsa', 'numpy') if m in sys.modules],
            'hook': '_timm_epsa_autoload' in sys.modules,
        }))
    ''')
    assert state == {'heavy': [], 'hook': True}


@pytest.fixture(scope='module')
def without_import(installed, tmp_path_factory) -> dict:
    """What one interpreter that never imports timm_epsa gets from timm.

    ``hf-hub:`` is served from an offline Hub cache and ``local-dir:`` from a folder, both holding a
    config.json written here whose architecture is ``epsanet50`` (one block per stage, 10 classes).
    """
    tmp = tmp_path_factory.mktemp('repos')
    config = {
        'architecture': 'epsanet50',
        'num_classes': 10,
        'model_args': {'layers': [1, 1, 1, 1]},
        'pretrained_cfg': {'input_size': [3, 64, 64], 'interpolation': 'bilinear', 'crop_pct': 0.875,
                           'first_conv': 'conv1', 'classifier': 'fc'},
    }
    local_dir = tmp / 'local'
    snapshot = tmp / 'hub' / 'models--someone--epsanet50-tiny' / 'snapshots' / ('0' * 40)
    for folder in (local_dir, snapshot):
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(config))
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('0' * 40)

    return installed.run_json(f'''
        import json, sys, safetensors.torch, timm, torch
        result = {{'models': timm.list_models('epsanet*')}}

        model = timm.create_model('epsanet50').eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        result['created'] = {{
            'block': type(model.layer1[0]).__module__,
            'out': list(out.shape),
            'package': sys.modules['timm_epsa'].__file__,
        }}

        torch.manual_seed(0)
        source = timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=10)
        for folder in ({str(local_dir)!r}, {str(snapshot)!r}):
            safetensors.torch.save_file(source.state_dict(), folder + '/model.safetensors')
        for name in ('hf-hub:someone/epsanet50-tiny', 'local-dir:{local_dir}'):
            model = timm.create_model(name, pretrained=True)
            result[name.split(':')[0]] = {{
                'blocks': [len(getattr(model, f'layer{{i}}')) for i in range(1, 5)],
                'num_classes': model.num_classes,
                'same_weights': all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values())),
                'input_size': list(model.pretrained_cfg['input_size']),
            }}
        print(json.dumps(result))
    ''', env={'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp / 'hub')})


def test_timm_lists_the_models(without_import):
    assert without_import['models'] == EPSANETS


def test_timm_creates_the_model_by_name(installed, without_import):
    created = without_import['created']
    assert created['block'] == 'timm_epsa.models.epsanet'
    assert created['out'] == [1, 1000]
    # The installed copy was used, not another timm-epsa that happens to be on the path.
    assert Path(created['package']).is_relative_to(installed.package_home)


@pytest.mark.parametrize('source', ['hf-hub', 'local-dir'])
def test_hub_style_creation_from_config_json(without_import, source):
    expected = {'blocks': [1, 1, 1, 1], 'num_classes': 10, 'same_weights': True, 'input_size': [3, 64, 64]}
    assert without_import[source] == expected


def test_opt_out_and_explicit_fallback(installed, request):
    off = {'wheel': '0', 'editable': ' False '}[request.node.callspec.params['installed']]  # one .pth code for both
    state = installed.run_json('''
        import json, sys, timm
        hooked = '_timm_epsa_autoload' in sys.modules
        without = timm.list_models('epsanet*')
        import timm_epsa
        print(json.dumps({'hook': hooked, 'without': without, 'after_import': timm.list_models('epsanet*')}))
    ''', env={'TIMM_EPSA_AUTOLOAD': off})
    assert state == {'hook': False, 'without': [], 'after_import': EPSANETS}


def test_broken_plugin_warns_once_and_timm_works(installed, tmp_path):
    """A plugin written for another timm: `import timm` still works, with one warning naming it."""
    write_plugin(tmp_path, 'timm_future_plugin', 'from timm.models import register_model_v2\n', entry='future')

    result = installed.run('import timm; print(timm.list_models("epsanet*"))', env={'PYTHONPATH': str(tmp_path)})
    assert result.stdout.strip() == str(EPSANETS)  # the other plugins still load
    warning_lines = [line for line in result.stderr.splitlines() if 'Warning:' in line]
    assert len(warning_lines) == 1, result.stderr
    assert "RuntimeWarning: timm model plugin 'future' (timm_future_plugin" in warning_lines[0]
    assert "ImportError: cannot import name 'register_model_v2'" in warning_lines[0]


def test_stale_metadata_in_the_working_directory_does_not_hide_the_plugin(editable_env, tmp_path):
    """`python -c` puts the working directory first on sys.path: in an editable checkout that may hold
    an old ``timm_epsa.egg-info`` without entry points, which must not hide the installed metadata."""
    stale = tmp_path / 'timm_epsa.egg-info'
    stale.mkdir()
    (stale / 'PKG-INFO').write_text('Metadata-Version: 2.1\nName: timm-epsa\nVersion: 0.0.1\n')
    result = editable_env.run('import timm; print(timm.list_models("epsanet*"))', cwd=tmp_path)
    assert result.stdout.strip() == str(EPSANETS)


@pytest.mark.parametrize('imports', [
    'import timm; import timm_epsa',
    'import timm_epsa; import timm',
    'import timm.models',
    'import timm_epsa, timm; import timm, timm_epsa; import timm.models, timm_epsa.models',
], ids=['timm-first', 'timm_epsa-first', 'timm.models', 'both-twice'])
def test_import_order_does_not_matter(wheel_env, imports):
    state = wheel_env.run_json(f'''
        import json, sys, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            {imports}
        import timm
        print(json.dumps({{
            'models': timm.list_models('epsanet*'),
            'warnings': [f'{{w.category.__name__}}: {{w.message}}' for w in caught],
            'hooks_left': [type(f).__name__ for f in sys.meta_path if type(f).__name__ == '_TimmImportHook'],
        }}))
    ''')
    assert state['models'] == EPSANETS
    # timm warns 'Overwriting epsanet50 in registry' when a model is registered twice.
    assert [w for w in state['warnings'] if 'registry' in w or 'plugin' in w or 'epsanet' in w] == []
    assert state['hooks_left'] == []  # the finder removes itself once it has fired


def test_start_up_hook_run_twice_installs_one_finder(wheel_env):
    """A venv over a system install with timm-epsa runs the .pth of both site-packages folders."""
    hooks = wheel_env.run('''
        import site, sys, sysconfig
        site.addsitedir(sysconfig.get_path('purelib'))  # processes its .pth files once more
        print(sum(type(f).__name__ == '_TimmImportHook' for f in sys.meta_path))
    ''').stdout
    assert hooks.strip() == '1'


def test_spawned_dataloader_workers(wheel_env):
    state = wheel_env.run_json([str(CHILDREN), 'dataloader'])
    assert state == {'worker_models': [','.join(EPSANETS)] * 2}


def test_ddp_gloo_two_ranks_all_reduce_gradients(wheel_env):
    """After backward each rank holds the mean of the ranks' own gradients (the ranks saw other data)."""
    state = wheel_env.run_json([str(CHILDREN), 'ddp'])
    assert state['block'] == 'timm_epsa.models.epsanet'
    assert state['ranks_agree'] and state['ranks_differ_locally']
    assert state['mean_error'] < 1e-5


def test_the_wheel_and_the_sdist_hold_what_a_release_needs(source, wheel, tmp_path):
    """The wheel: the package with py.typed and the card templates, the start-up hook and its .pth, and
    LICENSE; the sdist: every file of the repository but the CI scripts, so that its tests run
    unpacked (conftest.py, their helpers, hub_cards/). PyPI shows the README with absolute links."""
    if _build_flags() == []:
        pytest.skip('builds offline only with setuptools >= 77 installed')
    dist = tmp_path / 'dist'
    _run([sys.executable, '-c', 'import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])',
          str(dist)], cwd=source)
    sdist = next(dist.glob('timm_epsa-*.tar.gz'))
    repository = set(_repository_files())
    version = wheel.name.split('-')[1]
    with tarfile.open(sdist) as tar:
        packed = {member.name.split('/', 1)[1] for member in tar.getmembers() if member.isfile()}
    generated = {'PKG-INFO', 'setup.cfg'} | {name for name in packed if name.startswith('timm_epsa.egg-info/')}
    assert packed - generated == {name for name in repository if not name.startswith('.')}

    dist_info = f'timm_epsa-{version}.dist-info'
    with zipfile.ZipFile(wheel) as archive:
        assert set(archive.namelist()) == {
            *(name for name in repository if name.startswith('timm_epsa/')),
            '_timm_epsa_autoload.py', 'timm_epsa_autoload.pth',
            *(f'{dist_info}/{name}' for name in (
                'METADATA', 'RECORD', 'WHEEL', 'entry_points.txt', 'top_level.txt', 'licenses/LICENSE')),
        }
        assert archive.read(f'{dist_info}/licenses/LICENSE') == (REPO / 'LICENSE').read_bytes()
        metadata = email.message_from_bytes(archive.read(f'{dist_info}/METADATA'))
    assert 'timm_epsa/py.typed' in repository and 'Apache License' in (REPO / 'LICENSE').read_text()
    assert (metadata['License-Expression'], metadata['License-File']) == ('Apache-2.0', 'LICENSE')
    links = re.findall(r'\]\(([^)\s]+)\)', metadata.get_payload())
    assert 'docs/quickstart.md' in (REPO / 'README.md').read_text() and len(links) > 10
    assert [link for link in links if not link.startswith('https://')] == []


def test_without_site_import_timm_epsa_registers_the_models_where_the_package_is_importable(installed, source):
    """`python -S` runs no .pth file: not the hook, and for an editable install not setuptools'
    finder either, which is what makes its timm_epsa importable (docs/registration.md)."""
    editable = installed.package_home == source
    deps = [p for p in sys.path if Path(p).name in ('site-packages', 'dist-packages')]
    site_dirs = [installed.site_packages(), *deps]
    # timm_epsa first: where it cannot be imported, the run fails before importing torch
    code = 'import timm_epsa, json, sys, timm; print(json.dumps([sys.flags.no_site, timm.list_models("epsanet*")]))'

    def run_without_site(*path: str) -> subprocess.CompletedProcess:
        env = {**{k: v for k, v in os.environ.items() if k != 'TIMM_EPSA_AUTOLOAD'},
               'PYTHONPATH': os.pathsep.join(path), 'OMP_NUM_THREADS': '1'}
        return subprocess.run([installed.python, '-S', '-c', code], cwd=installed.workdir, env=env,
                              capture_output=True, text=True, timeout=300)

    result = run_without_site(*site_dirs)
    if editable:
        assert result.returncode != 0 and "No module named 'timm_epsa'" in result.stderr, result.stderr
        result = run_without_site(str(source), *site_dirs)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [1, EPSANETS]
