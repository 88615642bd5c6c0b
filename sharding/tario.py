"""Deterministic WebDataset tar writing; the index beside each tar is in ``shard_format``."""

from __future__ import annotations

from dataclasses import dataclass, field

from sharding.shard_format import IndexEntry, format_index, member_name

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
    samples: list[list[IndexEntry]] = field(default_factory=list)

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append ``{key}.{ext}`` for each ``ext`` in ``members``, in the given order."""
        components = []
        pieces = []
        for ext, data in members.items():
            name = member_name(key, ext)
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
