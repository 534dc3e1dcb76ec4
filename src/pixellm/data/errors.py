"""The one error type of bad dataset content: ``DataError`` names the file, record and field.

Every loader raises ``DataError`` for input it cannot use (an unreadable image, an annotation of the
wrong type, a mask of the wrong size, ...). Read at set-up time (the JSON file and the fields every
record must have) it stops the run before training starts; raised by a dataset's ``__getitem__``
or by the collate function it makes ``pixellm.reliability.skipping`` skip and count the sample.
Anything else that escapes a dataset is a bug in pixellm and is not caught.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad dataset content, with where it is and what to do about it.

    ``str(err)`` reads ``"{file}: record {index}: field '{field}': {problem}. {hint}"``; the parts
    that are unknown are left out. A ``ValueError``, so callers that caught ``ValueError`` still do.

    Args:
        problem: What is wrong, e.g. ``"polygon with 2 points (at least 3 needed)"``.
        file: The file that holds the bad content (a JSON, an image).
        index: The record index in ``file`` (or the dataset item index when there is no record).
        field: The field of the record, e.g. ``"answers[0][1].segmentation"``.
        hint: What the user can do, e.g. ``"fix or delete the record"``.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        index: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = None if file is None else str(file)
        self.index = index
        self.field = field
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if self.index is not None:
            parts.append(f"record {self.index}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        text = ": ".join([*parts, self.problem])
        return f"{text}. {self.hint}" if self.hint else text

    def __reduce__(self) -> tuple:
        # DataLoader workers pickle exceptions; keep the keyword-only parts.
        return _rebuild, (self.problem, self.file, self.index, self.field, self.hint)


def _rebuild(
    problem: str, file: str | None, index: int | None, field: str | None, hint: str | None
) -> DataError:
    return DataError(problem, file=file, index=index, field=field, hint=hint)
