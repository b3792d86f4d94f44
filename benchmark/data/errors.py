"""The one exception of the data layer.

The CLI catches `DataError` and prints its message (one line) to stderr with exit code 2, so the message alone must
tell a user which file, which row, which column and which value to fix.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: one line naming the file, the row, the column and the bad value.

    `DataError(file, reason, row=..., column=..., value=...)` formats "file, row R, column 'C', value 'V': reason";
    `DataError("a complete one-line message")` is accepted too, for callers that already name everything.

    Args:
        file: the file at fault (a CSV, an image, a split file), or the whole message when `reason` is None.
        reason: what is wrong, e.g. "diagnosis must be one of CN, AD".
        row: 1-based CSV data row, or a subject id; None for a whole-file problem.
        column: the CSV column; None for a whole-row or whole-file problem.
        value: the offending value; None where there is none.
    """

    def __init__(
        self,
        file: str | Path,
        reason: str | None = None,
        row: int | str | None = None,
        column: str | None = None,
        value: object = None,
    ) -> None:
        self.file = str(file)
        self.reason = reason
        self.row = row
        self.column = column
        self.value = value
        super().__init__(self._format())

    def _format(self) -> str:
        if self.reason is None:
            text = self.file
        else:
            parts = [self.file]
            if self.row is not None:
                parts.append(f"row {self.row}")
            if self.column is not None:
                parts.append(f"column {self.column!r}")
            if self.value is not None:
                parts.append(f"value {_short(self.value)!r}")
            text = f"{', '.join(parts)}: {self.reason}"
        # One line, always: a reason taken from a library exception may contain newlines.
        return text.replace("\r", " ").replace("\n", " ")

    def __reduce__(self):  # noqa: ANN204 - keeps the exception picklable across worker processes
        return (type(self), (self.file, self.reason, self.row, self.column, self.value))


def _short(value: object, limit: int = 120) -> object:
    """Keep the message one readable line when the bad value is huge (a whole corrupt header, say)."""
    text = str(value)
    return value if len(text) <= limit else text[: limit - 3] + "..."
