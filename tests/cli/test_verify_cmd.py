"""`agora verify calibrate` measures honest runs and signs tolerances with the required headroom."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from agoranet.cli.verify_cmd import verify_app
from agoranet.verify.records import TolerancesBody
from agoranet.verify.tolerances import load_tolerances, tolerance_for

from ..conftest import tolerance_file


def test_calibrate_signs_confirmed_tolerances_and_merges_classes(tmp_path):
    out, home = tmp_path / "tol.json", str(tmp_path / "home")
    args = ["calibrate", "--precision", "fp32", "--sequences", "8", "--confirm", "8", "--max-tokens", "12",
            "--buckets", "none", "--out", str(out), "--home", home]
    result = CliRunner().invoke(verify_app, args)
    assert result.exit_code == 0, result.output
    record = load_tolerances(out)
    c = tolerance_for(record.body, "fp32")
    assert (c.sequences, c.confirm_sequences, c.headroom) == (8, 8, 1.5)
    assert c.tok >= 1.5 * c.measured_tok and c.tok >= 1e-3 and c.lp >= c.confirmed_lp
    assert c.mass >= 1.5 * c.measured_mass and c.mass >= 1e-3
    assert isinstance(record.body, TolerancesBody) and record.body.reference_precision == "fp32"
    assert json.loads(out.read_text())["type"] == "agora/tolerances/2"
    assert [b.max_prompt_tokens for b in c.buckets] == [c.max_prompt_tokens]  # --buckets none: one bucket


def test_calibrate_replaces_one_class_of_a_record_and_keeps_the_others_as_they_were(tmp_path):
    out, home = tolerance_file(tmp_path / "tol.json"), str(tmp_path / "home")
    before = load_tolerances(out).body
    args = ["calibrate", "--precision", "fp32", "--sequences", "8", "--confirm", "8", "--max-tokens", "12",
            "--buckets", "none", "--floor", "2e-4", "--out", str(out), "--home", home]
    result = CliRunner().invoke(verify_app, args)
    assert result.exit_code == 0, result.output
    after = load_tolerances(out).body
    assert tolerance_for(after, "bf16") == tolerance_for(before, "bf16")  # kept, field for field
    c = tolerance_for(after, "fp32")
    assert c != tolerance_for(before, "fp32") and (c.sequences, c.max_output_tokens) == (8, 12)
    assert min(c.tok, c.lp, c.top, c.mass) >= 2e-4 and c.tok >= 1.5 * c.measured_tok
    assert "never below 0.0002" in after.method and "bf16 kept unchanged" in after.method


def test_calibrate_refuses_a_floor_outside_zero_to_one(tmp_path):
    result = CliRunner().invoke(verify_app, ["calibrate", "--precision", "fp32", "--floor", "0",
                                             "--home", str(tmp_path)])
    assert result.exit_code == 1 and "--floor" in result.output


def test_calibrate_refuses_headroom_below_one_and_a_half(tmp_path):
    result = CliRunner().invoke(verify_app, ["calibrate", "--precision", "fp32", "--headroom", "1.2",
                                             "--home", str(tmp_path)])
    assert result.exit_code == 1 and "headroom" in result.output


def test_verify_needs_a_node_or_a_proof(tmp_path):
    result = CliRunner().invoke(verify_app, ["bafyreceipt", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "--node" in result.output


def test_verify_says_when_its_argument_is_not_a_cid(tmp_path):
    result = CliRunner().invoke(verify_app, ["notacid", "--node", "http://127.0.0.1:9", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "'notacid' is not a CID" in result.output and "no record" not in result.output
