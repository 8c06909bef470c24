"""Build glue for what pyproject.toml cannot declare: ``timm_epsa_autoload.pth``, and README.md with
absolute links as the PyPI page's description.

Everything else lives in pyproject.toml. The .pth file sits at the top of site-packages, where
Python runs its ``import`` line at every start-up; the line installs the hook in
``_timm_epsa_autoload.py`` that registers EPSANet with timm without ``import timm_epsa``.

setuptools has no option for a file at the top of site-packages, so a ``build`` sub-command writes
it: into ``build_lib`` for a wheel (whose root is site-packages), and for ``pip install -e``
(PEP 660) straight into the editable wheel, because an editable wheel is made of the finder files
setuptools generates plus what is written to the ``install`` command's ``install_lib`` (its
unpacked wheel); ``build_lib`` is discarded there.
"""
import os
import re
import sys

from setuptools import Command, setup

if sys.version_info >= (3, 11):
    import tomllib
else:  # a build requirement there (pyproject.toml)
    import tomli as tomllib
from setuptools.command.build import build

# .pth files are read in name order: this one must come after setuptools' editable finder
# (`__editable__.timm_epsa-*.pth`), which is what makes `_timm_epsa_autoload` importable there.
PTH_NAME = 'timm_epsa_autoload.pth'

# TIMM_EPSA_AUTOLOAD=0 (or false, no, off, in any case) turns the hook off.
_PTH_CODE = '''\
try:
    if os.environ.get('TIMM_EPSA_AUTOLOAD', '').strip().lower() not in ('0', 'false', 'no', 'off'):
        import _timm_epsa_autoload
        _timm_epsa_autoload.install()
except Exception:  # a broken install must never break interpreter start-up
    pass
'''
# site.py executes a .pth line only if it starts with "import", one line at a time.
PTH_LINE = f'import os; exec({_PTH_CODE!r})\n'


class build_pth(Command):
    """Write :data:`PTH_NAME` where it ends up at the top of site-packages."""

    description = f'write {PTH_NAME}'
    user_options = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options('build_py', ('build_lib', 'build_lib'))

    def run(self) -> None:
        # For an editable wheel, setuptools points install_lib at the wheel's unpacked root.
        target_dir = self.get_finalized_command('install').install_lib if self.editable_mode else self.build_lib
        self.mkpath(target_dir)
        with open(os.path.join(target_dir, PTH_NAME), 'w', encoding='utf-8') as f:
            f.write(PTH_LINE)

    def get_outputs(self) -> list[str]:
        # In editable mode the file is part of the wheel itself, not a build output to link.
        return [] if self.editable_mode else [os.path.join(self.build_lib, PTH_NAME)]

    def get_output_mapping(self) -> dict[str, str]:
        return {}

    def get_source_files(self) -> list[str]:
        return []


class build_with_pth(build):
    sub_commands = [*build.sub_commands, ('build_pth', None)]


# A Markdown link or image target that is a path in this repository: no scheme, not an anchor.
_RELATIVE_LINK = re.compile(r'(\]\()(?![a-z][a-z0-9+.-]*:|#|/)([^)\s]+)\)')


def pypi_readme(here: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """README.md with its links to files of the repository (``docs/hub.md``, ``hub_cards/``) made
    absolute, ``<Repository>/blob/main/<path>``: the PyPI page has no files beside it. The one
    source of the text stays README.md, and of the address pyproject.toml's ``Repository`` URL."""
    with open(os.path.join(here, 'pyproject.toml'), 'rb') as f:
        repository = tomllib.load(f)['project']['urls']['Repository'].rstrip('/')
    with open(os.path.join(here, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    return _RELATIVE_LINK.sub(lambda m: f'{m.group(1)}{repository}/blob/main/{m.group(2)})', readme)


setup(
    cmdclass={'build': build_with_pth, 'build_pth': build_pth},
    long_description=pypi_readme(),
    long_description_content_type='text/markdown',
)
