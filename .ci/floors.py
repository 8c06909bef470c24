"""The oldest versions pyproject.toml allows, as pip constraints (``name==version`` lines), or with
``--python`` the oldest Python it allows (``3.9``).

Read from pyproject.toml each time, so the lowest-versions CI step (.ci/lowest_versions) tests the
floors as they are declared, never a copy. Every runtime dependency must declare a floor
(``>=``): one without would claim to work with any release, which no test backs.
"""
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PYPROJECT = Path(__file__).resolve().parent.parent / 'pyproject.toml'


def floor(specifier_set: SpecifierSet, what: str) -> str:
    floors = [spec.version for spec in specifier_set if spec.operator == '>=']
    if len(floors) != 1:
        sys.exit(f'{PYPROJECT}: {what} needs exactly one floor (>=), the oldest release the suite passes with')
    return floors[0]


def main() -> None:
    project = tomllib.loads(PYPROJECT.read_text(encoding='utf-8'))['project']
    if sys.argv[1:] == ['--python']:
        print(floor(Requirement(f"python{project['requires-python']}").specifier, 'requires-python'))
        return
    for line in project['dependencies']:
        requirement = Requirement(line)
        print(f'{requirement.name}=={floor(requirement.specifier, requirement.name)}')


if __name__ == '__main__':
    main()
