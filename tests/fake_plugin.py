"""A third-party ``timm.models`` plugin installed into a folder, as pip would leave its metadata."""
from pathlib import Path


def write_plugin(folder: Path, module: str, source: str, entry: str) -> None:
    """``folder/<module>.py`` holding ``source``, and a dist-info that lists it as entry point ``entry``
    of the ``timm.models`` group (put ``folder`` on sys.path to install it)."""
    (folder / f'{module}.py').write_text(source)
    dist_info = folder / f'{module}-1.0.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (dist_info / 'entry_points.txt').write_text(f'[timm.models]\n{entry} = {module}\n')
