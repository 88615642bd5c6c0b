"""Deterministic WebDataset tar writing, and the DALI index (``wds2idx`` format) beside it."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

INDEX_VERSION = "v1.2"


@dataclass
class ShardWriter:
    """Builds one tar in memory, recording where each member's data starts for the DALI index."""

    buffer: io.BytesIO = field(default_factory=io.BytesIO)
    samples: list[list[tuple[str, int, int, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # USTAR with fixed owner and mtime: the same samples always give the same bytes.
        # Closed by finish(), not a with-block: samples arrive one call at a time.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT
        )

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append ``{key}.{ext}`` for each ``ext`` in ``members``, in the given order."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        components = []
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            # addfile pads the data to 512-byte blocks; the data starts right after the header.
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            components.append((ext, self._tar.offset - padded, len(data), info.name))
        self.samples.append(components)

    def finish(self) -> tuple[bytes, bytes]:
        """Close the archive; return the tar bytes and its index bytes."""
        self._tar.close()
        return self.buffer.getvalue(), format_index(self.samples).encode()


def format_index(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """The text ``wds2idx`` writes: a version line, then ``ext offset size name`` per member."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in components))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[list[tuple[str, int, int, str]]]:
    """Read an index written by ``format_index`` or ``wds2idx``; raise ValueError if malformed."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"bad index header {lines[0]!r}")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"bad index line {line!r}")
        samples.append(
            [
                (fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            ]
        )
    if len(samples) != int(head[1]):
        raise ValueError(f"index says {head[1]} samples but lists {len(samples)}")
    return samples
