"""Checks of what a user passes to the public entry points (the PSA layer and its SE gate, the
detection builders): one helper per kind of value, each returning the value in its plain form or
raising one line that names the argument, the value and what to pass instead.

Without them a wrong value fails far from its cause (``slice indices must be integers`` for
``trainable_layers=2.5``), is taken for something else (``'no'`` is a true flag, ``True`` the
number 1) or builds a layer that computes nothing (0 input channels). A value of the wrong kind is
a ``TypeError``, one out of range a ``ValueError``, as Python's own functions raise them.
"""
import operator
from typing import Any, Optional, Tuple

__all__ = ['flag', 'whole_number', 'whole_numbers']


def whole_number(value: Any, name: str, where: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int`` from ``minimum`` (to ``maximum``). Integers of other types (numpy's, a
    0-d integer tensor) are taken as Python takes them as indices; ``bool``, floats and strings are not."""
    if isinstance(value, bool) or not _is_integer(value):
        raise TypeError(f'{where}: {name}={value!r} is not a whole number; pass {_ints(minimum, maximum)}')
    number = operator.index(value)
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f'{where}: {name}={value!r} is out of range; pass {_ints(minimum, maximum)}')
    return number


def whole_numbers(
        value: Any,
        name: str,
        where: str,
        each: str,
        minimum: int = 1,
        maximum: Optional[int] = None,
) -> Tuple[int, ...]:
    """``value`` (a non-empty list or tuple) as a tuple of ints, each as :func:`whole_number` takes
    it; ``each`` says what one of them stands for (``'one per branch'``), for the message."""
    expected = f'{_ints(minimum, maximum, plural=True)}, {each}'
    if not isinstance(value, (list, tuple)):
        raise TypeError(f'{where}: {name}={value!r} is not a list or tuple of whole numbers; pass {expected}')
    bad = next((v for v in value if isinstance(v, bool) or not _is_integer(v)), None)
    if bad is not None:
        raise TypeError(f'{where}: {name}={tuple(value)!r} holds {bad!r}, which is not a whole number; pass {expected}')
    numbers = tuple(operator.index(v) for v in value)
    if not numbers or any(n < minimum or (maximum is not None and n > maximum) for n in numbers):
        raise ValueError(f"{where}: {name}={numbers!r} is {'out of range' if numbers else 'empty'}; pass {expected}")
    return numbers


def flag(value: Any, name: str, where: str, optional: bool = False) -> Optional[bool]:
    """``value`` if it is ``True`` or ``False`` (or None where ``optional``): a string such as
    ``'no'`` would otherwise count as true."""
    if isinstance(value, bool) or (optional and value is None):
        return value
    either = 'True, False or None' if optional else 'True or False'
    raise TypeError(f'{where}: {name}={value!r} is not a flag; pass {either}')


def _is_integer(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _ints(minimum: int, maximum: Optional[int], plural: bool = False) -> str:
    what = 'ints' if plural else 'an int'
    return f'{what} from {minimum} to {maximum}' if maximum is not None else f'{what} of at least {minimum}'
