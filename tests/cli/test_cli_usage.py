"""A mistake the argument parser catches is one line too: the command, the problem and
where the usage is (``--help``), exit 2; never argparse's usage block."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus._cli import main


@pytest.mark.parametrize(
    ("args", "start", "problem", "hint"),
    [
        (["worker"], "bus: error: worker: ", "required: MODULE:BROKER", "bus worker --help"),
        (
            ["dead", "X:b", "frob"],
            "bus: error: dead: ",
            "invalid choice: 'frob'",
            "bus dead --help",
        ),
        (
            ["worker", "X:b", "--concurrency", "many"],
            "bus: error: worker: ",
            "--concurrency: invalid int value: 'many'",
            "bus worker --help",
        ),
        (["send", "X:b", "add", "--nope"], "bus: error: send: ", "unrecognized", "bus send --help"),
        (["dashboard"], "bus: error: dashboard: ", "MODULE:BROKER", "bus dashboard --help"),
        ([], "bus: error: ", "required: COMMAND", "bus --help"),
        (["frob"], "bus: error: ", "invalid choice: 'frob'", "bus --help"),
    ],
)
def test_a_usage_error_is_one_line_with_a_hint_to_help(
    args: list[str],
    start: str,
    problem: str,
    hint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(start), lines[0]
    assert problem in lines[0]
    assert hint in lines[0]
    assert "usage:" not in err


def test_help_still_prints_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["worker", "--help"])
    assert info.value.code == 0
    assert "usage: bus worker" in capsys.readouterr().out


def test_the_docs_show_what_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    printed = docs.split("$ bus dead myapp.tasks:broker frob\n", 1)[1].splitlines()[0]
    with pytest.raises(SystemExit):
        main(["dead", "myapp.tasks:broker", "frob"])
    assert capsys.readouterr().err == printed + "\n"
