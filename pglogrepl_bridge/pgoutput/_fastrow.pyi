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
def driver_row(
    plan: tuple[int | Callable[[bytes], Any], ...], buf: bytes, pos: int, /
) -> tuple[Any, ...] | None: ...
def driver_dict(
    template: dict[str, None],
    plan: tuple[int | Callable[[bytes], Any], ...],
    buf: bytes,
    pos: int,
    /,
) -> dict[str, Any] | None: ...
def copy_text(ncols: int, buf: bytes, pos: int, /) -> bytes | None: ...
def row_key(
    indexes: tuple[int, ...], ncols: int, buf: bytes, pos: int, /
) -> tuple[Any, bool] | None: ...
def digit_run(data: str | bytes | bytearray | memoryview, length: int, /) -> bool: ...
def ipv4_int(data: bytes | memoryview, /) -> int | None: ...
def int_array_json(text: str, /) -> str: ...
def text_array_json(text: str, ascii: bool, separator: str, /) -> str | None: ...
def copy_row(line: bytes, ncols: int, /) -> list[bytes | None] | None: ...
def bind_row_change(cls: type, fields: tuple[str, str, str, str, str, str], /) -> None: ...
def row_change(relations: dict[int, Any], payload: bytes, pos: int, /) -> Any | None: ...
def bind_held(cls: type, fields: tuple[str, str, str, str], /) -> None: ...
def hold_rows(
    targets: dict[Any, Any],
    held: dict[str, Any],
    tables: dict[str, Any],
    transitions: dict[Any, Any],
    merge: Any,
    changes: Any,
    start: int,
    room: int,
    /,
) -> tuple[int, int]: ...
def pump_rows(
    get_copy_data: Callable[[int], Any],
    relations: dict[int, Any],
    changes: list[Any],
    limit: int,
    /,
) -> tuple[int, Any, Any]: ...
def put_row(relations: dict[int, Any], changes: list[Any], message: Any, /) -> bool: ...

class JsonRow:
    def __init__(
        self,
        columns: Sequence[
            tuple[str | None, int, Callable[[bytes], str] | None, Callable[[bytes], str]]
        ],
    ) -> None: ...
    def __call__(self, buf: bytes, pos: int, /) -> str | None: ...
    def utf8(self, buf: bytes, pos: int, /) -> bytes | None: ...
