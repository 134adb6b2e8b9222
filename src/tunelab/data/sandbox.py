"""A Jinja sandbox for user data templates (``data.template``) whose values and output stay bounded.

jinja2's :class:`~jinja2.sandbox.SandboxedEnvironment` keeps templates away from Python internals and
bounds ``range()`` (``MAX_RANGE``), but lets a template ask for any amount of memory or time:
``{{ 'x' * 10**10 }}``, ``{{ 9 ** 9 ** 9 }}``, a ``~`` concatenation doubled in a loop, ``'x'.ljust(10**10)``.
No library bounds these, hence this subclass. It checks, before computing when the size can be known and
right after otherwise, every intercepted operator (``*``, ``**``, ``+``, ``%``), every ``~`` concatenation,
every method and filter call (integer arguments, ``join``, ``replace``, ``indent``, printf and
``str.format`` widths), counts loop steps of ``range()``, and stops rendering once the output passes
:data:`MAX_CHARS`. A value past a bound raises :class:`TemplateLimitError`; the caller names the template.
Unary operators cannot grow a value (``-x`` of a bounded number is bounded), so none is intercepted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sized
from typing import Any

from jinja2.compiler import CodeGenerator
from jinja2.sandbox import SandboxedEnvironment, safe_range

MAX_CHARS = 1 << 24
"""Longest string, list or rendered output a data template may make (16 Mi characters or items)."""
MAX_INT_BITS = 1 << 16
"""Largest integer (in bits) a data template may compute."""
MAX_STEPS = 10_000_000
"""Most ``range()`` loop steps one rendering may take."""
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
_FORMAT_FIELD = re.compile(r"\{[^{}]*:([^{}]*)\}")


class TemplateLimitError(Exception):
    """A template asked for a value or output larger than the bounds of :mod:`tunelab.data.sandbox`."""


def _refuse(what: str) -> TemplateLimitError:
    return TemplateLimitError(f"{what}, more than a data template may make ({MAX_CHARS:,} characters or items, "
                              f"integers of {MAX_INT_BITS:,} bits); simplify the template")


def _check(value: Any) -> Any:
    """``value`` itself, refused if it is a string/sequence longer than :data:`MAX_CHARS` or a huge integer."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_CHARS:
        raise _refuse(f"a value of {len(value):,} characters or items")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _refuse(f"an integer of {value.bit_length():,} bits")
    return value


def _check_count(value: Any) -> None:
    """An integer argument that could be a width or a repeat count."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
        raise _refuse(f"a width or count of {value:,}")


def _length(value: Any) -> int:
    return len(value) if isinstance(value, Sized) else 0


def _check_printf(fmt: str, args: Any) -> None:
    """``fmt % args``: no literal width or precision, and no ``*`` argument, over :data:`MAX_CHARS`."""
    for match in _PRINTF.finditer(fmt):
        for size in match.groups():
            if size and size.isdigit():
                _check_count(int(size))
    for value in args if isinstance(args, tuple) else (args,):
        _check_count(value)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too large, before computing it."""
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int):
                if len(seq) * max(count, 0) > MAX_CHARS:
                    raise _refuse(f"repeating {len(seq):,} characters or items {count:,} times")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _refuse("a product of large integers")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if left.bit_length() * min(right, MAX_INT_BITS + 1) > MAX_INT_BITS:
            raise _refuse(f"{left} ** {right}")
    elif operator == "%" and isinstance(left, str):
        _check_printf(left, right)
    elif operator == "+" and _length(left) + _length(right) > MAX_CHARS:
        raise _refuse(f"a concatenation of {_length(left) + _length(right):,} characters or items")


def _check_call(name: str, owner: Any, args: tuple, kwargs: dict) -> None:
    """Arguments of a method (``owner.name(...)``) or of a filter (``owner`` is the filtered value)."""
    for value in (*args, *kwargs.values()):
        _check_count(value)
    if name == "join" and isinstance(owner, str) and args:
        _check_join(args[0], owner)
    elif name == "join" and isinstance(owner, Sized) and args and isinstance(args[0], str):
        _check_join(owner, args[0])
    elif name == "replace" and isinstance(owner, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        count = owner.count(old) if old else len(owner) + 1
        if len(owner) + count * max(len(new) - len(old), 0) > MAX_CHARS:
            raise _refuse("a replace() making a long string")
    elif name == "indent" and isinstance(owner, str):
        width = next((a for a in (*args, *kwargs.values()) if isinstance(a, int)), 4)
        if len(owner) + owner.count("\n") * abs(width) > MAX_CHARS:
            raise _refuse("an indent() making a long string")
    elif name == "format" and isinstance(owner, str):
        _check_printf(owner, args)


def _check_join(items: Any, separator: str) -> None:
    if isinstance(items, Sized) and len(items) * len(separator) > MAX_CHARS:
        raise _refuse(f"joining {len(items):,} items with a separator of {len(separator):,} characters")


class _CountedRange:
    """A ``range`` whose iteration counts steps against the rendering's budget (empty loops take time too)."""

    def __init__(self, env: BoundedSandbox, inner: range):
        self.env, self.inner = env, inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: Any) -> Any:
        return self.inner[index]

    def __contains__(self, value: Any) -> bool:
        return value in self.inner

    def __iter__(self) -> Any:
        for value in self.inner:
            self.env.step()
            yield value


class _BoundedGenerator(CodeGenerator):
    """Routes every ``~`` concatenation through :meth:`BoundedSandbox.bounded`."""

    def visit_Concat(self, node, frame) -> None:  # noqa: N802 (jinja's visitor naming)
        self.write("environment.bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedSandbox(SandboxedEnvironment):
    """A :class:`SandboxedEnvironment` whose templates cannot make huge values or output (module docstring)."""

    code_generator_class = _BoundedGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.steps = 0
        self.globals["range"] = self._range
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    def bounded(self, value: Any) -> Any:
        """The result of a ``~`` concatenation, checked."""
        return _check(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _check(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        owner = getattr(__obj, "__self__", None)
        _check_call(getattr(__obj, "__name__", ""), owner, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(owner, (list, dict, set)):
            _check(owner)  # list.extend / append in a loop grows the list itself
        return _check(result)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def checked(*args: Any, **kwargs: Any) -> str:
            for spec in _FORMAT_FIELD.findall(str(value.__self__)):
                for digits in re.findall(r"\d+", spec):
                    _check_count(int(digits))
            _check_call("format", None, args, kwargs)
            return _check(wrapped(*args, **kwargs))

        return checked

    def _range(self, *args: int) -> _CountedRange:
        return _CountedRange(self, safe_range(*args))

    def step(self) -> None:
        """Count one loop step of this rendering; refuse past :data:`MAX_STEPS`."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _refuse(f"more than {MAX_STEPS:,} loop steps")

    def _bounded_filter(self, name: str, function: Any) -> Any:
        skip = 2 if getattr(function, "jinja_pass_arg", None) is not None else 1

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if len(args) >= skip:
                _check_call(name, args[skip - 1], args[skip:], kwargs)
            return _check(function(*args, **kwargs))

        return checked

    def render(self, template: Any, variables: dict[str, Any]) -> str:
        """Render ``template`` with ``variables``, stopping once the output passes :data:`MAX_CHARS`.

        Raises:
            TemplateLimitError: When the template asks for too large a value, output or loop.
        """
        self.steps, parts, size = 0, [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_CHARS:
                raise _refuse(f"an output of more than {MAX_CHARS:,} characters")
            parts.append(chunk)
        return "".join(parts)
