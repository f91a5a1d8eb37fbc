"""Atomic tensor files written without the zip CRC-32, and why that loses nothing."""

import pytest
import torch

from engine.utils.io import save_tensors


def test_torch_load_never_checks_the_crc_so_files_without_it_lose_nothing(tmp_path):
    """If a later torch verifies the CRC on load, this fails: then the CRC is worth writing again."""
    from torch.utils.serialization import config

    config.save.compute_crc32 = True
    path = tmp_path / "with-crc.pt"
    torch.save({"w": torch.ones(4096)}, path)
    data = bytearray(path.read_bytes())
    at = data.find(bytes.fromhex("0000803f") * 64)  # inside the tensor's bytes (1.0 in float32)
    data[at + 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert float(torch.load(path, weights_only=True)["w"].sum()) != 4096.0  # read as stored, unchecked

    save_tensors({"w": torch.arange(10.0), "labels": ["x"]}, tmp_path / "fast.pt")
    assert not config.save.compute_crc32
    back = torch.load(tmp_path / "fast.pt", weights_only=True, mmap=True)
    assert torch.equal(back["w"], torch.arange(10.0)) and back["labels"] == ["x"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_folder_that_takes_no_files_is_named_with_its_setting_and_the_fix_per_storage(tmp_path):
    import pytest

    from engine.utils.errors import CT3DError
    from engine.utils.io import check_writable

    check_writable(tmp_path / "new" / "cache", "cache.dir")  # made, written to, left empty
    assert list((tmp_path / "new" / "cache").iterdir()) == []
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # as a claim mounted read-only, or owned by another uid, refuses a write
    with pytest.raises(CT3DError) as caught:
        check_writable(blocked / "runs", "output.dir")
    message = str(caught.value)
    assert message.startswith(f"output.dir: {blocked / 'runs'} is not writable")
    assert "fsGroup" in message and "EFS: an access point" in message and "NFS" in message


def test_storage_that_does_not_answer_is_retried_then_transient_and_a_refusal_is_the_users(tmp_path, monkeypatch):
    """EIO (an NFS hiccup at a gang restart) is tried again with growing waits and, if it lasts, is a Transient
    failure (exit 150, retried); EACCES is the user's to fix at once (exit 2), without waiting."""
    import builtins
    import errno

    import pytest

    from engine.utils import io as io_module
    from engine.utils.errors import CT3DError, Transient

    calls, real_open = [], builtins.open

    def failing(codes):
        def fake(path, *args, **kwargs):
            calls.append(path)
            if len(calls) <= len(codes):
                raise OSError(codes[len(calls) - 1], "storage says no")
            return real_open(path, *args, **kwargs)
        return fake

    monkeypatch.setattr(io_module, "open", failing([errno.EIO, errno.ESTALE]), raising=False)
    io_module.check_writable(tmp_path / "out", "output.dir", tries=3, first_wait=0.001)
    assert len(calls) == 3 and not list((tmp_path / "out").iterdir())  # the third try wrote and removed its probe
    calls.clear()
    monkeypatch.setattr(io_module, "open", failing([errno.EIO] * 5), raising=False)
    with pytest.raises(Transient, match="output.dir.*3 tries"):
        io_module.check_writable(tmp_path / "out", "output.dir", tries=3, first_wait=0.001)
    calls.clear()
    monkeypatch.setattr(io_module, "open", failing([errno.EACCES]), raising=False)
    with pytest.raises(CT3DError, match="not writable") as refused:
        io_module.check_writable(tmp_path / "out", "output.dir", tries=3, first_wait=0.001)
    assert not isinstance(refused.value, Transient) and len(calls) == 1


def test_a_volume_read_the_storage_did_not_answer_is_transient_and_a_bad_file_is_a_problem(tmp_path):
    """Reading a volume: EIO / ESTALE from the storage is Transient (the command is retried, exit 150), not a bad
    volume the cache-fill Job would fail on for good; a file that is not a volume stays a problem of its own."""
    import errno

    import pytest

    from engine.config.schema import PreprocessConfig
    from engine.data import cache
    from engine.data.preprocess import preprocess
    from engine.utils.errors import CT3DError, Transient

    def stale(item):
        raise OSError(errno.ESTALE, "Stale file handle")

    with pytest.raises(Transient, match="did not answer"):
        preprocess(stale, {"image": "/claim/v.nii.gz"})

    def broken(item):
        raise ValueError("not a NIfTI file")

    with pytest.raises(CT3DError, match="cannot read volume") as bad:
        preprocess(broken, {"image": "/claim/v.nii.gz"})
    assert not isinstance(bad.value, Transient)
    import unittest.mock

    item_ = {"image": str(tmp_path / "w.nii.gz"), "name": "w.nii.gz", "label": [1.0]}
    with unittest.mock.patch.object(cache, "preprocess", lambda transform, item: preprocess(stale, item)):
        with pytest.raises(Transient):  # the whole check stops to be retried: no volume is written off
            cache.volume_problems([item_], PreprocessConfig(spatial_size=[8, 8, 8]), None, 1)
    (tmp_path / "v.nii.gz").write_bytes(b"x")
    item = {"image": str(tmp_path / "v.nii.gz"), "name": "v.nii.gz", "label": [1.0]}
    problems = cache.volume_problems([item], PreprocessConfig(spatial_size=[8, 8, 8]), None, 1)
    assert len(problems) == 1 and problems[0].name == "v.nii.gz"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); skipped where it cannot be mounted."""
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_full_disk_is_one_transient_line_naming_the_path_and_keeps_what_was_there(small_disk):
    import torch

    from engine.utils.errors import Transient
    from engine.utils.io import save_tensors, write_text

    save_tensors({"w": torch.ones(10)}, small_disk / "last.pt")
    write_text(small_disk / "summary.json", "{}")
    with pytest.raises(Transient, match=r"last.pt: no space left on its filesystem \(.* MiB free\)"):
        save_tensors({"w": torch.ones(2**20)}, small_disk / "last.pt")  # 4 MiB: does not fit
    with pytest.raises(Transient, match="summary.json: no space left"):
        write_text(small_disk / "summary.json", "x" * 2**21)
    assert torch.equal(torch.load(small_disk / "last.pt", weights_only=True)["w"], torch.ones(10))
    assert (small_disk / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt", "summary.json"]  # no temporary file left
