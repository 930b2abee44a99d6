"""Stage settings: argparse defaults from the config section, flags on top, errors that name the flag."""

import argparse

import pytest

from src.errors import InputError
from src.stage_settings import parse_with_section, section_record


def _report_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--precisions")
    parser.add_argument("--n-boot", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--run", type=int)
    return parser


def test_defaults_come_from_the_section_and_flags_win(tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("report:\n  n_boot: 50\n  run: 4\n")
    args, cfg = parse_with_section(_report_parser(), ["--config", str(yaml_file), "--set", "report.seed=3",
                                                      "--run", "2"], "report")
    assert (args.n_boot, args.seed, args.run, args.precisions) == (50, 3, 2, (0.7, 0.8, 0.9))
    assert (cfg.report.n_boot, cfg.report.seed, cfg.report.run) == (50, 3, 2)
    record = section_record(cfg, "report", pred="oof/x")
    assert record["report"]["run"] == 2 and record["pred"] == "oof/x" and "git" in record


def test_a_bad_flag_value_names_the_flag():
    with pytest.raises(InputError, match="--precisions"):
        parse_with_section(_report_parser(), ["--precisions", "0.7,abc"], "report")
    with pytest.raises(InputError, match="unknown config key"):
        parse_with_section(_report_parser(), ["--set", "report.nope=1"], "report")


def test_a_section_key_without_a_flag_is_refused():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-boot", type=int)
    with pytest.raises(RuntimeError, match="precisions"):
        parse_with_section(parser, [], "report")


def test_keys_of_a_sibling_command_need_no_flag():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-boot", type=int)
    args, cfg = parse_with_section(parser, ["--set", "report.run=5"], "report", not_here=("precisions", "seed", "run"))
    assert args.n_boot == 1000 and cfg.report.run == 5 and not hasattr(args, "run")


def test_the_web_page_takes_its_port_from_the_triage_section(monkeypatch, capsys):
    import uvicorn

    from src.triage import serve

    class FakeEnsemble:
        thresholds_source = "p >= 0.5"

        def describe(self):
            return "fake"

        def source(self):
            return "fake"

    ports = []
    monkeypatch.setattr(serve, "load_ensemble", lambda exp, precision, stacker: FakeEnsemble())
    monkeypatch.setattr(serve, "create_app", lambda *a: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: ports.append((host, port)))
    assert serve.main(["--set", "triage.port=9001"]) == 0
    assert serve.main(["--set", "triage.port=9001", "--port", "9002"]) == 0
    assert ports == [("127.0.0.1", 9001), ("127.0.0.1", 9002)]
    assert '"port": 9002' in capsys.readouterr().out  # the settings it runs with are printed
    with pytest.raises(InputError, match=r"triage\.stacker"):
        serve.main(["--set", "triage.stacker=best"])
