"""The errors multitap-rl raises for problems with the user's input, files or settings.

Everything here derives from :class:`MultiTapError`: the command line prints such an error as one
line and exits with status 2; any other exception is a bug and keeps its traceback. Each class is
also the built-in exception code written before these classes existed would catch (``ValueError``,
``ImportError``), so ``except ValueError`` keeps working.

* :class:`ConfigError` -- an argument, option, weights/gates spec, schema or recipe;
* :class:`DataError` -- a data file, dataset, feature store or batch as a whole;
* :class:`SampleError` -- one sample of a batch: ``.index`` (position in the batch the callee saw),
  ``.field`` (``"image"``, ``"text"``, ``"question"``) and ``.message``. Callers that know better
  names (the CLI's row, TRL's completion) re-raise it with :meth:`SampleError.at`;
* :class:`CheckpointError` -- a checkpoint or base model that cannot be used as asked;
* :class:`HeadsError` -- stage-2 heads that cannot be fit, read or used;
* :class:`MissingDependencyError` -- an optional dependency (which extra to install), raised by
  :func:`require` (one package, imported) and :func:`require_all` (every package a job needs,
  checked at once before it starts).

Bad samples have one vocabulary everywhere (``MultiTapModel.score``, every reward adapter, the
CLI's ``--on-invalid``): ``on_invalid="raise"`` (the first bad sample raises a ``SampleError``
naming it), ``"skip"`` (it is left out and reported: NaN in a ``ScoreOutput``, ``None`` where
the trainer accepts ``None``), or a finite float (the reward such a sample gets).
"""

from __future__ import annotations

import importlib
import math

__all__ = [
    "ON_INVALID",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HeadsError",
    "MissingDependencyError",
    "MultiTapError",
    "SampleError",
    "check_on_invalid",
    "require",
    "require_all",
]

ON_INVALID = ("raise", "skip")


class MultiTapError(Exception):
    """Base class: the user's input, files or settings cannot be used as asked (not a bug)."""


class ConfigError(MultiTapError, ValueError):
    """A bad argument, option, weights or gates spec, schema or recipe."""


class DataError(MultiTapError, ValueError):
    """A data file, dataset, feature store or batch that cannot be used as asked."""


class CheckpointError(MultiTapError, ValueError):
    """A checkpoint or base model that cannot be used as asked (missing, mismatched, corrupt)."""


class HeadsError(MultiTapError, ValueError):
    """Heads that cannot be fit, read or used as asked (bad input, corrupt file, wrong backbone)."""


class MissingDependencyError(MultiTapError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class SampleError(DataError, TypeError):
    """One bad sample: ``SampleError(3, "image", "file not found: a.png")``.

    ``str()`` is ``"image 3: file not found: a.png"``; with a ``unit`` (what the index counts, e.g.
    ``"row"`` or ``"completion"``) it is ``"row 3: image: file not found: a.png"``, and a ``source``
    (a file) is put in front. It is a ``ValueError`` (a ``DataError``) and, because a sample of the
    wrong type raised ``TypeError`` before this class existed, also a ``TypeError``.
    """

    def __init__(self, index: int | None, field: str, message: str, *, unit: str | None = None,
                 source: str | None = None, detail: str = ""):
        self.index, self.field, self.message = index, field, message
        self.unit, self.source, self.detail = unit, source, detail
        super().__init__(self._text())

    def _text(self) -> str:
        if self.unit is None:
            where = self.field if self.index is None else f"{self.field} {self.index}"
            text = f"{where}{self.detail}: {self.message}"
        else:
            text = f"{self.unit} {self.index}{self.detail}: {self.field}: {self.message}"
        return f"{self.source}: {text}" if self.source else text

    def __str__(self) -> str:
        return self._text()

    def __reduce__(self):
        return (_rebuild_sample_error, (self.index, self.field, self.message, self.unit, self.source, self.detail))

    def at(self, index: int | None, unit: str | None = None, source: str | None = None,
           detail: str = "") -> SampleError:
        """The same problem under the caller's name for the sample (e.g. line 7 of a file instead of
        sample 2 of a batch; ``detail`` is put right after the index, e.g. ``", candidate 3"``);
        raise it ``from`` this one."""
        return SampleError(index, self.field, self.message, unit=unit, source=source, detail=detail)


def _rebuild_sample_error(index, field, message, unit, source, detail="") -> SampleError:
    return SampleError(index, field, message, unit=unit, source=source, detail=detail)


def check_on_invalid(value, allowed=ON_INVALID, allow_float: bool = True):
    """``value`` if it is one of ``allowed`` or (``allow_float``) a finite number (as a float),
    else a :class:`ConfigError` listing what is accepted."""
    if isinstance(value, str):
        if value in allowed:
            return value
    elif allow_float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    options = " | ".join(repr(a) for a in allowed) + (" | a finite float" if allow_float else "")
    raise ConfigError(f"on_invalid must be {options}, got {value!r}")


def require(package: str, extra: str, what: str):
    """Import and return the optional ``package``, or raise :class:`MissingDependencyError` saying
    that ``what`` needs it and which extra of multitap-rl brings it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingDependencyError(f"{what} needs {package.split('.')[0]}: pip install 'multitap-rl[{extra}]'") \
            from None


def require_all(needs, what: str) -> None:
    """Check, before any work, that every optional package ``what`` needs is installed: ``needs`` is
    ``[(package, extra), ...]`` (``extra``: the extra of multitap-rl that brings the package). One
    :class:`MissingDependencyError` names every missing package and the extras to install, e.g.
    ``the demo needs trl, datasets (extra 'trl') and matplotlib (extra 'plots'), not installed:
    pip install 'multitap-rl[trl,plots]'``. Presence only: nothing is imported (a dotted name
    imports its parent package)."""
    import importlib.util

    missing: dict[str, list[str]] = {}  # extra -> its missing packages, in the order given
    for package, extra in needs:
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found and package not in missing.get(extra, []):
            missing.setdefault(extra, []).append(package)
    if not missing:
        return
    groups = [f"{', '.join(pkgs)} (extra {extra!r})" for extra, pkgs in missing.items()]
    listing = groups[0] if len(groups) == 1 else f"{', '.join(groups[:-1])} and {groups[-1]}"
    raise MissingDependencyError(f"{what} needs {listing}, not installed: "
                                 f"pip install 'multitap-rl[{','.join(missing)}]'")
