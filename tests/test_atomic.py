"""The one atomic writer: complete file or the previous one, never a half-written file."""

import json

import pytest

from sharding.atomic import TMP_PREFIX, atomic_path, atomic_write, write_json


def test_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"iou": 0.5})
    write_json(path, {"iou": 0.75})
    assert json.loads(path.read_text()) == {"iou": 0.75}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")
    with pytest.raises(type(error)), atomic_write(path, "wb") as f:
        f.write(b"half a checkpo")
        raise error
    assert path.read_bytes() == b"previous"
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))


def test_atomic_path_renames_only_on_success(tmp_path):
    path = tmp_path / "grid.png"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX)
        tmp.write_bytes(b"png")
        assert not path.exists()
    assert path.read_bytes() == b"png"
    with pytest.raises(ValueError, match="whole files"), atomic_write(path, "a"):
        pass
    assert path.read_bytes() == b"png"
