"""Build glue for what pyproject.toml cannot declare: ``timm_epsa_autoload.pth``.

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

from setuptools import Command, setup
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


setup(cmdclass={'build': build_with_pth, 'build_pth': build_pth})
