"""What names a disk-cache entry, against the rules written here: the verify shard of an entry and of the
temporary file that becomes it (the first 32 bits of MD5 of the entry's name, the same in every version and pod),
and a source's signature (path under data.image_root, size, time; a series by its folder's)."""

import hashlib
import os
from pathlib import Path

from engine.data.cache_keys import shard_of_entry, source_signature
from engine.utils.io import temp_path_for


def test_an_entry_and_its_temporary_file_belong_to_the_shard_md5_gives_the_name():
    names = [f"{hashlib.md5(str(i).encode()).hexdigest()}.pt" for i in range(40)] + ["a-b-c.pt", "x-y.pt"]
    for name in names:
        temporary = temp_path_for(Path("/cache") / name).name
        assert temporary != name
        for count in (2, 3, 7):
            expected = int.from_bytes(hashlib.md5(name.encode()).digest()[:4], "big") % count
            assert shard_of_entry(name, count) == shard_of_entry(temporary, count) == expected, (name, count)
    assert {shard_of_entry(n, 3) for n in names} == {0, 1, 2}


def test_signature_of_a_file_a_series_in_a_folder_and_a_missing_source(tmp_path):
    volume = tmp_path / "v.nii.gz"
    volume.write_bytes(b"12345")
    stat = os.stat(volume)
    assert source_signature({"image": str(volume)}) == [str(volume), 5, stat.st_mtime_ns]
    assert source_signature({"image": str(volume), "relative": "v.nii.gz"}) == ["v.nii.gz", 5, stat.st_mtime_ns]
    folder = tmp_path / "study"
    folder.mkdir()
    series = folder / "CHEST 1.0"  # a series named inside its folder: its files' total size and newest time
    (folder / "1.dcm").write_bytes(b"abc")
    (folder / "2.dcm").write_bytes(b"defgh")
    newest = max(os.stat(p).st_mtime_ns for p in (folder, folder / "1.dcm", folder / "2.dcm"))
    assert source_signature({"image": str(series)}) == [str(series), 8, newest]
    before, folder_time = source_signature({"image": str(series)}), os.stat(folder).st_mtime_ns
    (folder / "2.dcm").write_bytes(b"other")  # rewritten in place: same names, same size, the folder's time kept
    os.utime(folder / "2.dcm", ns=(newest + 10**9, newest + 10**9))
    os.utime(folder, ns=(folder_time, folder_time))
    assert os.stat(folder).st_mtime_ns == folder_time and source_signature({"image": str(series)}) != before
    assert source_signature({"image": str(folder)})[1:] == source_signature({"image": str(series)})[1:]
    gone = tmp_path / "gone" / "v.nii.gz"
    assert source_signature({"image": str(gone)}) == [str(gone)]
    assert source_signature({"image": str(gone), "relative": "gone/v.nii.gz"}) == ["gone/v.nii.gz"]


def test_a_source_the_storage_does_not_answer_for_is_transient_not_renamed(tmp_path, monkeypatch):
    """ESTALE on the stat: a signature without size and time would name another entry (and `cache --verify`
    would delete this one as stale), so the command stops to be retried."""
    import errno

    import pytest

    from engine.data import cache_keys
    from engine.utils.errors import Transient

    def stale(path):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(cache_keys.os, "stat", stale)
    with pytest.raises(Transient, match="did not answer"):
        source_signature({"image": str(tmp_path / "v.nii.gz")})
