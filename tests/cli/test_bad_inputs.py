"""Bad inputs through the command line (issue 42): each is one `ct3d: error:` line naming the file, row, key or
override, exit 2, and never a Python traceback."""

import pytest

from helpers import cli

CASES = {  # name: (file name, bytes, the argument that uses it, words the error must hold)
    "yaml syntax": ("bad.yaml", b"data:\n  train: [unclosed\n", "--config", ["bad.yaml", "line 3"]),
    "yaml duplicate key": ("dup.yaml", b"train:\n  lr: 1\n  lr: 2\n", "--config", ["duplicate key lr"]),
    "yaml not utf-8": ("latin.yaml", b"train:\n  lr: \xff\xfe\n", "--config", ["latin.yaml", "not UTF-8", "byte 13"]),
    "csv not utf-8": ("latin.csv", b"VolumeName,A\n\xe9t\xe9.nii.gz,0\n", "data.train", ["latin.csv", "byte 13"]),
    "csv duplicate header": ("twice.csv", b"VolumeName,A,A\nx.nii.gz,0,1\n", "data.train", ["'A'", "more than once"]),
    "csv ragged row": ("ragged.csv", b"VolumeName,A\nx.nii.gz,0,1,2\n", "data.train", ["ragged.csv row 2", "4 fields"]),
    "json a list": ("list.json", b"[1, 2]", "data.train", ["list.json", "object of lists"]),
    "json entries not a list": ("dict.json", b'{"training": {"image": "x"}}', "data.train", ["not a list"]),
    "override syntax": (None, None, "train.lr=[1", ["override 'train.lr=[1'", "not valid YAML"]),
    "nan learning rate": (None, None, "train.lr=nan", ["train.lr", "finite"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_one_error_line_and_exit_2_without_a_traceback(tmp_path, case):
    name, content, argument, words = CASES[case]
    if name is None:
        args = [argument]
    else:
        (tmp_path / name).write_bytes(content)
        args = [argument, str(tmp_path / name)] if argument == "--config" else [f"{argument}={tmp_path / name}"]
    proc = cli("check", "--quick", *args, "data.demo.enabled=false", f"output.dir={tmp_path / 'out'}",
               f"cache.dir={tmp_path / 'cache'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    error = [line for line in proc.stderr.splitlines() if line.startswith("ct3d: error:")]
    assert len(error) == 1 and all(w in error[0] for w in words), proc.stderr[-2000:]


def test_an_excel_utf8_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    from engine.config.loading import load_config
    from engine.data.datalist import load_datalist

    (tmp_path / "x.nii.gz").write_bytes(b"x")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfVolumeName,A\nx.nii.gz,1\n")
    cfg = load_config(None, [f"data.train={tmp_path / 'bom.csv'}"])
    listed = load_datalist(tmp_path / "bom.csv", cfg.data)
    assert [it["name"] for it in listed.items] == ["x.nii.gz"] and listed.labels == ["A"]
