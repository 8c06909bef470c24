"""Load timm model plugins as soon as timm is imported.

timm has no plugin discovery: models defined in another package exist only once that package is
imported, so timm's own ``train.py``, or ``timm.create_model('hf-hub:...')`` on a repo whose
config names ``epsanet50``, cannot see them. This module closes the gap for every package that
declares an entry point in the ``timm.models`` group (timm-epsa declares ``timm_epsa``).

``timm_epsa_autoload.pth``, which timm-epsa's build writes to the top of site-packages, imports
this module at interpreter start-up and calls :func:`install` (unless ``TIMM_EPSA_AUTOLOAD=0``).
It is a top-level module, not ``timm_epsa._autoload``, because importing anything inside the
``timm_epsa`` package runs its ``__init__`` and with it torch and timm. At start-up it only puts a
finder at the front of ``sys.meta_path``; nothing else happens until ``timm`` is imported. Then
the finder wraps timm's own loader, lets ``timm/__init__.py`` run to completion (plugins import
``timm.models`` themselves), removes itself and imports each plugin. Importing a plugin module a
second time is a no-op, so ``import timm_epsa`` before, after or instead of ``import timm`` still
registers each model exactly once.

A plugin that fails to load never breaks ``import timm``, not even one that calls ``sys.exit()``
as it is imported: it costs one ``RuntimeWarning`` naming the entry point and the error, and the
other plugins still load. Only Ctrl-C (``KeyboardInterrupt``) goes through.
"""
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing these at every interpreter start-up costs ~1 ms
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Optional, Sequence

__all__ = ['ENTRY_POINT_GROUP', 'install', 'load_plugins']

ENTRY_POINT_GROUP = 'timm.models'


class _LoadPluginsAfterTimm:
    """Runs timm's own loader, then the plugins."""

    def __init__(self, loader: 'Loader', finder: '_TimmImportHook'):
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: 'ModuleSpec') -> 'Optional[ModuleType]':
        return self.loader.create_module(spec)

    def exec_module(self, module: 'ModuleType') -> None:
        # Give timm its real loader back before its body runs, so it sees nothing of this hook.
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        # Only once timm imported cleanly: a failed `import timm` may be retried and hooked again.
        self.finder.uninstall()
        load_plugins()


class _TimmImportHook:
    """Meta-path finder that answers only for ``timm``, wrapping the loader the others find."""

    def find_spec(
            self,
            fullname: str,
            path: 'Optional[Sequence[str]]' = None,
            target: 'Optional[ModuleType]' = None,
    ) -> 'Optional[ModuleSpec]':
        if fullname != 'timm':
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, 'find_spec', None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoadPluginsAfterTimm(spec.loader, self)
                return spec
        return None

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Load the ``timm.models`` plugins right after ``timm`` is first imported.

    Idempotent: a virtual environment that sees two site-packages folders may run the .pth twice.
    """
    if not any(isinstance(finder, _TimmImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())


def load_plugins() -> None:
    """Import every plugin in the ``timm.models`` entry-point group; warn about any that fails."""
    # Deferred: these cost milliseconds, which only an `import timm` (seconds) should pay.
    import warnings
    from importlib.metadata import distributions

    plugins = {}
    unreadable = []
    try:
        # Every copy of every distribution, not only the first of each name as `entry_points()`
        # reads: a stale `*.egg-info` in the working directory would hide the installed metadata.
        # One whose entry points cannot be read (undecodable, damaged) is skipped, not the rest.
        for dist in distributions():
            try:
                entry_points = dist.entry_points
            except Exception as e:
                unreadable.append(f"{getattr(dist, '_path', dist)} ({type(e).__name__}: {e})")
                continue
            for ep in entry_points:
                if ep.group == ENTRY_POINT_GROUP:
                    plugins.setdefault(ep.value, ep)
    except Exception as e:
        warnings.warn(
            f'Could not list the timm model plugins (entry-point group {ENTRY_POINT_GROUP!r}): '
            f'{type(e).__name__}: {e}',
            RuntimeWarning,
        )
    if unreadable:
        warnings.warn(
            f'timm model plugins: skipped the entry points of {len(unreadable)} installed '
            f"distribution{'s' if len(unreadable) > 1 else ''} that could not be read: {'; '.join(unreadable)}",
            RuntimeWarning,
        )

    for ep in plugins.values():
        try:
            ep.load()
        except (Exception, SystemExit) as e:
            warnings.warn(
                f'timm model plugin {ep.name!r} ({ep.value}, entry-point group {ENTRY_POINT_GROUP!r}) '
                f'failed to load and was skipped: {type(e).__name__}: {e}',
                RuntimeWarning,
            )
