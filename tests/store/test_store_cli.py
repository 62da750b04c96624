"""`agora store …` end to end through typer's runner, against a temporary home."""

import pytest
from typer.testing import CliRunner

from agoranet.cli.store_cmd import store_app
from agoranet.store import model_cid

runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()


def run(*args, home):
    return runner.invoke(store_app, [*args, "--home", str(home)])


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"vocab": 260}')
    (src / "weights.bin").write_bytes(bytes(range(256)) * 5000)
    return src


def test_add_cat_export_and_car_round_trip(tmp_path, tree):
    home = tmp_path / "home"
    r = run("add", str(tree), home=home)
    assert r.exit_code == 0, r.output
    root = r.stdout.strip()
    assert root == str(model_cid(tree))
    file_cid = run("add", str(tree / "config.json"), home=home).stdout.strip()
    assert run("cat", file_cid, home=home).stdout == '{"vocab": 260}'
    assert run("export", root, str(tmp_path / "out"), home=home).exit_code == 0
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (tree / "weights.bin").read_bytes()
    assert run("export-car", root, str(tmp_path / "m.car"), home=home).exit_code == 0
    other = tmp_path / "other"
    r = run("import-car", str(tmp_path / "m.car"), home=other)
    assert r.exit_code == 0 and r.stdout.strip() == root
    assert root in run("pins", home=other).stdout


def test_unpin_then_gc_frees_the_blocks(tmp_path, tree):
    home = tmp_path / "home"
    root = run("add", str(tree), home=home).stdout.strip()
    assert run("unpin", root, home=home).exit_code == 0
    r = run("gc", home=home)
    assert r.exit_code == 0 and "removed 5 blocks" in r.stdout  # directory, config leaf, file node + 2 leaves
    r = run("cat", root, home=home)
    assert r.exit_code == 1


@pytest.mark.parametrize("args, message", [
    (["cat", "nonsense"], "not a CID"),
    (["cat", "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"], "not in this store"),
    (["unpin", "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"], "is not pinned"),
    (["add", "/no/such/path"], "does not exist"),
    (["import-car", "/no/such.car"], "No such file"),
])
def test_errors_are_one_line_and_exit_non_zero(tmp_path, args, message):
    r = run(*args, home=tmp_path / "home")
    assert r.exit_code == 1
    text = r.stderr if hasattr(r, "stderr") else r.output
    assert message in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1


def test_home_defaults_to_agora_home(tmp_path, tree, monkeypatch):
    monkeypatch.setenv("AGORA_HOME", str(tmp_path / "envhome"))
    r = runner.invoke(store_app, ["add", str(tree)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "envhome" / "blocks" / "index.sqlite").exists()
