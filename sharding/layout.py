"""The dataset's zip layout: which member is which part of which sample.

Names follow the original EVA dataset::

    bg_jpg/bg_img_{b}.jpg                 (variant: bg_{b}.jpg)
    fg_bg_jpg/fg_bg_{f}_{b}_{flip}_{n}.jpg
    mask_black_jpg/bg_mask_{f}_{b}_{flip}_{n}.jpg
    depth_fg_bg_jpg/depth_fg_bg_{f}_{b}_{flip}_{n}.jpg  (variant: depth_{f}_{b}_{flip}_{n}.jpg)

optionally nested under one top-level folder (``batch3/bg_jpg/...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The part (see ``shard_format.PARTS``) each of the zip's folders holds.
FOLDERS = {
    "bg_jpg": "bg",
    "fg_bg_jpg": "fg_bg",
    "mask_black_jpg": "mask",
    "depth_fg_bg_jpg": "depth",
}
# Real zips also carry the bare foregrounds and their masks; they are not part of a sample.
EXTRA_FOLDERS = {"fg_jpg", "mask_jpg"}

# At most 9 digits a number: keys stay short enough for tar's 100-byte names, and a name of
# thousands of digits cannot make int() fail.
_NUMBER = r"(\d{1,9})"
_STEM = rf"{_NUMBER}_{_NUMBER}_([01])_{_NUMBER}"
_PATTERNS = {
    # ASCII: Python's \d also matches other scripts' digits, and int("٣") == 3.
    "bg": re.compile(rf"bg(?:_img)?_{_NUMBER}\.jpe?g", re.IGNORECASE | re.ASCII),
    "fg_bg": re.compile(rf"fg_bg_{_STEM}\.jpe?g", re.IGNORECASE | re.ASCII),
    "mask": re.compile(rf"bg_mask_{_STEM}\.jpe?g", re.IGNORECASE | re.ASCII),
    "depth": re.compile(rf"depth(?:_fg_bg)?_{_STEM}\.jpe?g", re.IGNORECASE | re.ASCII),
}
_BATCH_NUMBER = re.compile(r"batch_?(\d{1,9})", re.IGNORECASE | re.ASCII)


def is_junk(name: str) -> bool:
    """macOS and Windows litter that zips pick up: ``__MACOSX/``, ``.DS_Store``, ``._*``."""
    parts = name.split("/")
    return (
        "__MACOSX" in parts
        or parts[-1] in (".DS_Store", "Thumbs.db", "desktop.ini")
        or parts[-1].startswith("._")
    )


def batch_number(zip_name: str) -> int | None:
    """The batch number in ``batch7_images.zip``, or None."""
    m = _BATCH_NUMBER.search(zip_name)
    return int(m.group(1)) if m else None


def zip_tag(zip_name: str) -> str:
    """A short key prefix for a zip: ``batch7`` for ``batch7_images.zip``."""
    number = batch_number(zip_name)
    if number is not None:
        return f"batch{number}"
    stem = zip_name.rsplit("/", 1)[-1].removesuffix(".zip")
    return re.sub(r"[^A-Za-z0-9_-]", "-", stem)  # keys must not contain dots


@dataclass
class ZipLayout:
    """The members of one zip, sorted into parts; what could not be placed is kept with a reason."""

    bg: dict[int, str] = field(default_factory=dict)
    fg_bg: dict[tuple[int, int, int, int], str] = field(default_factory=dict)
    mask: dict[tuple[int, int, int, int], str] = field(default_factory=dict)
    depth: dict[tuple[int, int, int, int], str] = field(default_factory=dict)
    unparsed: list[tuple[str, str]] = field(default_factory=list)  # (member, part)
    # (part, id) -> every member naming it, where more than one does: the same name twice in
    # the zip, or names that differ only in case, leading zeros or a naming variant.
    duplicates: dict[tuple[str, object], list[str]] = field(default_factory=dict)
    junk: int = 0
    extra: int = 0
    other: int = 0

    @property
    def found_any_folder(self) -> bool:
        return bool(self.bg or self.fg_bg or self.mask or self.depth or self.unparsed)


def classify(names: list[str]) -> ZipLayout:
    """Sort zip member names into the four parts by folder and file name."""
    layout = ZipLayout()
    for name in names:
        if name.endswith("/"):
            continue  # directory entry
        if is_junk(name):
            layout.junk += 1
            continue
        parts = name.split("/")
        folder = parts[-2] if len(parts) >= 2 else ""
        # One optional top-level folder above the part folders, as in batch3/bg_jpg/...
        if len(parts) > 3 or folder not in FOLDERS:
            if folder in EXTRA_FOLDERS:
                layout.extra += 1
            else:
                layout.other += 1
            continue
        part = FOLDERS[folder]
        m = _PATTERNS[part].fullmatch(parts[-1])
        if m is None:
            layout.unparsed.append((name, part))
        else:
            ident = int(m.group(1)) if part == "bg" else tuple(int(g) for g in m.groups())
            found = getattr(layout, part)
            if ident in found:
                layout.duplicates.setdefault((part, ident), [found[ident]]).append(name)
            found[ident] = name
    return layout
