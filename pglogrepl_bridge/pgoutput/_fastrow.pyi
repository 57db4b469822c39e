from collections.abc import Callable, Sequence
from typing import Any

_LoadRow = Callable[[list[bytes | None]], tuple[Any, ...]]

def typed_row(
    template: dict[str, None],
    load_text_row: _LoadRow,
    load_binary_row: _LoadRow,
    buf: bytes,
    pos: int,
    /,
) -> dict[str, Any] | None: ...
def text_array_json(text: str, ascii: bool, separator: str, /) -> str | None: ...
def copy_row(line: bytes, ncols: int, /) -> list[bytes | None] | None: ...
def bind_row_change(cls: type, fields: tuple[str, str, str, str, str, str], /) -> None: ...
def row_change(relations: dict[int, Any], payload: bytes, pos: int, /) -> Any | None: ...
def put_row(relations: dict[int, Any], changes: list[Any], message: Any, /) -> bool: ...

class JsonRow:
    def __init__(
        self,
        columns: Sequence[
            tuple[str | None, int, Callable[[bytes], str] | None, Callable[[bytes], str]]
        ],
    ) -> None: ...
    def __call__(self, buf: bytes, pos: int, /) -> str | None: ...
