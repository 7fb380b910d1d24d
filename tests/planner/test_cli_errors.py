"""`tandem simulate` and `tandem plan` on input they cannot use: one line that says what is wrong,
exit code 2, no traceback."""

from __future__ import annotations

import json

from tandem.planner import simulate_cli
from tandem.planner.sim_synthetic import synthetic_profile


def test_a_missing_or_unreadable_profile_is_a_one_line_error(tmp_path, capsys):
    flags = ["--num-prefill", "0", "--num-decode", "1", "--num-requests", "4",
             "--out", str(tmp_path / "sim.json")]
    assert simulate_cli.main(["--profile", str(tmp_path / "none.json"), *flags]) == 2
    assert capsys.readouterr().err.strip() == (f"error: No such file or directory: "
                                               f"{tmp_path / 'none.json'}")
    text = tmp_path / "notes.txt"
    text.write_text("not json")
    assert simulate_cli.main(["--profile", str(text), *flags]) == 2
    err = capsys.readouterr().err
    assert "is not a JSON profile" in err and "tandem profile" in err
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert simulate_cli.main(["--profile", str(listed), *flags]) == 2
    assert "holds no profile object" in capsys.readouterr().err


def test_a_missing_trace_is_a_one_line_error(tmp_path, capsys):
    from tandem.launcher.cli import main

    path = tmp_path / "profile.json"
    path.write_text(json.dumps(synthetic_profile(with_transfer=False)))
    code = main(["simulate", "--profile", str(path), "--num-prefill", "0", "--num-decode", "1",
                 "--dataset", f"trace:{tmp_path / 'none.jsonl'}", "--out", str(tmp_path / "s")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"error: No such file or directory: "
                                               f"{tmp_path / 'none.jsonl'}")


def test_plan_with_a_directory_for_a_profile_is_a_one_line_error(tmp_path, capsys):
    from tandem.launcher.cli import main

    code = main(["plan", "--profile", str(tmp_path), "--gpus", "2", "--slo", "ttft_ms=1000",
                 "--out", str(tmp_path / "plan.json")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: Is a directory: {tmp_path}"


def test_zero_random_requests_is_an_error_not_the_default(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(synthetic_profile(with_transfer=False)))
    assert simulate_cli.main(["--profile", str(path), "--num-prefill", "0", "--num-decode", "1",
                              "--num-requests", "0", "--out", str(tmp_path / "s.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: --num-requests must be positive, got 0"
