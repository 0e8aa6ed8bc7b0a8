from collections.abc import Sequence

def scan_data(
    buf: bytes | bytearray, start: int, line_start: bool, max_line: int, /
) -> tuple[int, int, int]: ...
def commit_files(
    fds: Sequence[int], tmps: Sequence[bytes], finals: Sequence[bytes], dirs: Sequence[bytes], /
) -> tuple[list[int], list[int]]: ...
