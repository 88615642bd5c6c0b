"""Deterministic WebDataset tar writing, and the DALI index (``wds2idx`` format) beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

INDEX_VERSION = "v1.2"


BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records, as GNU tar and Python's tarfile do


def _header_template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # the checksum counts itself as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[329:337] = b"0000000\0"  # devmajor
    header[337:345] = b"0000000\0"  # devminor
    return header


_TEMPLATE = bytes(_header_template())
_TEMPLATE_SUM = sum(_TEMPLATE)


def ustar_header(name: str, size: int) -> bytes:
    """One USTAR header: a regular file owned by root, mode 0644, mtime 0.

    Written by hand from a template because ``tarfile.TarInfo.tobuf`` was half the build's time.
    """
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"member name {name!r} is longer than the 100 bytes USTAR allows")
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[0 : len(encoded)] = encoded
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return bytes(header)


@dataclass
class ShardWriter:
    """Builds one tar in memory, recording where each member's data starts for the DALI index."""

    chunks: list[bytes] = field(default_factory=list)
    offset: int = 0
    samples: list[list[tuple[str, int, int, str]]] = field(default_factory=list)

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append ``{key}.{ext}`` for each ``ext`` in ``members``, in the given order."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        components = []
        pieces = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            pad = -len(data) % BLOCK
            pieces += (ustar_header(name, len(data)), data, bytes(pad))
            components.append((ext, self.offset + BLOCK, len(data), name))
            self.offset += BLOCK + len(data) + pad
        # One chunk per sample: hashing and writing 15 small pieces each cost more than a join.
        self.chunks.append(b"".join(pieces))
        self.samples.append(components)

    def finish(self) -> tuple[list[bytes], bytes]:
        """End the archive; return the tar as a list of chunks, and its index bytes.

        Chunks rather than one ``bytes``: joining a 100 MB shard costs a copy for nothing.
        """
        end = self.offset + 2 * BLOCK  # two zero blocks mark the end
        self.chunks.append(bytes(2 * BLOCK + (-end % RECORD)))
        return self.chunks, format_index(self.samples).encode()


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
