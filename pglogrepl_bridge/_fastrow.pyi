from collections.abc import Callable, Sequence

def split_tuple(buf: bytes, pos: int, ncols: int, /) -> tuple[list[bytes | None], int] | None: ...

class JsonRow:
    def __init__(
        self,
        columns: Sequence[
            tuple[str | None, int, Callable[[bytes], str] | None, Callable[[bytes], str]]
        ],
    ) -> None: ...
    def __call__(self, buf: bytes, pos: int, /) -> str | None: ...
