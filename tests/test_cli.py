import pytest

from jobs.cli import COMMANDS, build_parser, main


def test_every_command_has_help_with_an_example(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"avray {name}" in out and "example" in out


def test_preprocess_options_parse_into_its_dataclass():
    from jobs.cli import dataclass_from_args
    from jobs.preprocess import PreprocessConfig

    ns = build_parser().parse_args(["preprocess", "a", "b", "--out", "o", "--fps", "4", "--allow-scheme", "https",
                                    "--overwrite"])
    cfg = dataclass_from_args(PreprocessConfig, ns)
    assert cfg.inputs == ("a", "b") and cfg.out == "o" and cfg.fps == 4.0
    assert cfg.allow_scheme == ("https",) and cfg.overwrite is True and cfg.hop_seconds is None


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avray preprocess: error: no such file or folder") and err.count("\n") == 1
