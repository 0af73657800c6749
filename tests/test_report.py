"""simulator.report: results tables from made-up run directories whose every number is known.

The directories hold what a run of ``python run.py --multirun`` leaves for the report:
``summary.json``, Hydra's ``.hydra/{config,hydra,overrides}.yaml`` and, for runs newer
than that file, ``config_resolved.yaml``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import one_error_line, run_module, write_hydra_overrides

from simulator.report import DEFAULT_METRICS, Cell, cell, config_value, main, read_run
from simulator.runs import Run

STRATEGIES = {"fedavg": "flwr.serverapp.strategy.FedAvg", "fot": "strategies.fot.FOT"}


def write_run(
    path: Path,
    strategy: str,
    method: str,
    seed: int,
    summary: dict[str, Any] | None,
    lr: float = 0.05,
    extra: tuple[str, ...] = (),
) -> Path:
    """A finished run (``summary=None``: one that failed before writing its summary), made
    before runs wrote ``config_resolved.yaml``; ``extra`` overrides are only listed."""
    hydra = path / ".hydra"
    write_hydra_overrides(path, [f"strategy={strategy}", f"client.method={method}", f"seed={seed}", *extra])
    (hydra / "config.yaml").write_text(
        "federation:\n  num_clients: 20\n  clients_per_round: 10\n"
        "model:\n  name: mlp\n  head: linear\n"
        f"client:\n  method: {method}\n  lr: {lr}\n"
        f"seed: {seed}\nrounds: 30\nscenario_name: ${{hydra:runtime.choices.scenario}}\n"
        f"strategy:\n  _target_: {STRATEGIES[strategy]}\n"
        "  fraction_train: ${fraction:${federation.clients_per_round},${federation.num_clients}}\n"
        "  min_train_nodes: ${federation.clients_per_round}\n"
    )
    (hydra / "hydra.yaml").write_text(
        "hydra:\n  run:\n    dir: outputs/${now:%Y-%m-%d}\n  runtime:\n    choices:\n"
        f"      scenario: digits\n      strategy: {strategy}\n      hydra/launcher: basic\n"
    )
    if summary is not None:
        full = {
            "average_accuracy": 0.6,
            "average_incremental_accuracy": 0.7,
            "bwt": -0.1,
            "fwt": None,
            "initial_acc_per_task": [0.1, 0.1],
            "rounds": 30,
            "wall_time_s": 12.5,
        } | summary
        (path / "summary.json").write_text(json.dumps(full, indent=2) + "\n")
    return path


# FedAvg with SGD, three seeds: final accuracy 0.70, 0.74, 0.78 (mean 0.74, sample std
# sqrt((0.04² + 0 + 0.04²) / 2) = 0.04), forgetting 0.2, 0.1, 0.3 (mean 0.2, std 0.1).
# FOT with replay, two seeds: final accuracy 0.8 and 0.9 (mean 0.85, std 0.1 / sqrt(2)); only
# seed 0 has forgetting (0.05). No run measured fwt (null).
FEDAVG = [
    {"final_accuracy": 0.70, "forgetting": 0.2},
    {"final_accuracy": 0.74, "forgetting": 0.1},
    {"final_accuracy": 0.78, "forgetting": 0.3},
]
FOT = [{"final_accuracy": 0.8, "forgetting": 0.05}, {"final_accuracy": 0.9}]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun directory: the jobs above, FOT's first, and a job that failed."""
    root = tmp_path / "multirun"
    jobs = [("fot", "replay", s, summary) for s, summary in enumerate(FOT)]
    jobs += [("fedavg", "sgd", s, summary) for s, summary in enumerate(FEDAVG)]
    jobs += [("fedavg", "sgd", 3, None)]
    for number, (strategy, method, seed, summary) in enumerate(jobs):
        name = f"{number}_client.method={method},seed={seed},strategy={strategy}"
        write_run(root / name, strategy, method, seed, summary)
    (root / "multirun.yaml").write_text("{}\n")
    return root


def write_resolved(path: Path, target: str | None = None) -> Path:
    """The run's ``config_resolved.yaml``, as run.py writes it: its config, resolved
    (``fraction_train`` 10 / 20 clients), with ``target`` as its strategy class if given."""
    config = read_run(path).config
    strategy = config["strategy"] | {"fraction_train": 0.5, "min_train_nodes": 10}
    if target:
        strategy["_target_"] = target
    resolved = config | {"strategy": strategy, "scenario_name": "digits"}
    (path / "config_resolved.yaml").write_text(json.dumps(resolved))  # JSON is YAML
    return path


def report(capsys, *args: str | Path) -> tuple[str, str]:
    """``python -m simulator.report ARGS`` in this process: stdout and stderr."""
    assert main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def report_fails(capsys, *args: str | Path) -> str:
    """The message of a report that exits with status 2."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_a_cell_is_the_mean_the_sample_std_and_the_count():
    mean, std, n = cell([0.70, 0.74, 0.78])
    assert (mean, std, n) == (pytest.approx(0.74), pytest.approx(0.04), 3)
    assert cell([0.8, 0.9]).std == pytest.approx(0.1 / math.sqrt(2))  # ddof=1, not 0.05
    assert cell([0.5]) == Cell(0.5, None, 1)
    assert cell([]) == Cell(None, None, 0)


def test_markdown_has_a_row_per_configuration_and_shows_missing_metrics_as_missing(sweep, capsys):
    out, err = report(capsys, sweep, "--metrics", "final_accuracy,forgetting,fwt")
    assert out == (
        "| configuration | final_accuracy | forgetting | fwt |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| FOT client.method=replay | 0.850 ± 0.071 (2) | 0.050 (1) | – |\n"
        "| FedAvg client.method=sgd | 0.740 ± 0.040 (3) | 0.200 ± 0.100 (3) | – |\n"
        "\n"
        "mean ± sample standard deviation (ddof=1) over seeds, (n) runs with the metric.\n"
    )
    failed = sweep / "5_client.method=sgd,seed=3,strategy=fedavg"
    assert err == f"left out {failed}: no summary.json (the job failed or has not finished)\n"


def test_the_default_metrics_and_the_overrides_every_row_shares(tmp_path, capsys):
    for seed, final in enumerate([0.5, 0.7]):
        write_run(tmp_path / str(seed), "fot", "replay", seed, {"final_accuracy": final, "forgetting": 0.1})
    out, _ = report(capsys, tmp_path / "0", tmp_path / "1", "--digits", "2")
    header, _, row, _, footer = out.splitlines()
    assert header == "| configuration | " + " | ".join(DEFAULT_METRICS) + " |"
    assert row == "| FOT | 0.60 ± 0.14 | 0.60 ± 0.00 | 0.10 ± 0.00 | -0.10 ± 0.00 |"  # n below
    assert footer == (
        "mean ± sample standard deviation (ddof=1) over seeds, n = 2 runs each; "
        "every row: client.method=replay strategy=fot."
    )


def test_csv_has_mean_std_and_n_per_metric_at_full_precision(sweep, capsys):
    out, _ = report(capsys, sweep, "--format", "csv", "--metrics", "final_accuracy,forgetting,fwt")
    fot, fedavg = csv.DictReader(io.StringIO(out))
    assert fedavg["configuration"] == "FedAvg client.method=sgd"
    assert float(fedavg["final_accuracy_mean"]) == pytest.approx(0.74, abs=1e-12)
    assert float(fedavg["final_accuracy_std"]) == pytest.approx(0.04, abs=1e-12)
    assert float(fedavg["forgetting_std"]) == pytest.approx(0.1, abs=1e-12)
    assert fedavg["final_accuracy_n"] == "3"
    assert float(fot["final_accuracy_std"]) == pytest.approx(0.1 / math.sqrt(2), abs=1e-12)
    assert (fot["forgetting_mean"], fot["forgetting_std"], fot["forgetting_n"]) == ("0.05", "", "1")
    assert (fot["fwt_mean"], fot["fwt_std"], fot["fwt_n"]) == ("", "", "0")


def test_latex_is_a_booktabs_tabular_with_escaped_names(sweep, capsys):
    out, _ = report(capsys, sweep, "--format", "latex", "--metrics", "final_accuracy,fwt")
    lines = out.splitlines()
    assert lines[0].startswith("% mean ± sample standard deviation (ddof=1)")
    assert lines[1:5] == [
        "\\begin{tabular}{lrr}",
        "\\toprule",
        "configuration & final\\_accuracy & fwt \\\\",
        "\\midrule",
    ]
    assert lines[5] == "FOT client.method=replay & $0.850 \\pm 0.071$ (2) & -- \\\\"
    assert lines[6] == "FedAvg client.method=sgd & $0.740 \\pm 0.040$ (3) & -- \\\\"
    assert lines[7:] == ["\\bottomrule", "\\end{tabular}"]


def test_by_adds_columns_of_config_values_and_sorts_rows_by_them(tmp_path, capsys):
    # Three learning rates of FedAvg/SGD, found in the order 0.1, 0.05, 0.2; with FOT/replay.
    for number, (strategy, method, lr) in enumerate(
        [("fedavg", "sgd", 0.1), ("fot", "replay", 0.05), ("fedavg", "sgd", 0.05), ("fedavg", "sgd", 0.2)]
    ):
        path = write_run(tmp_path / str(number), strategy, method, 0, {"final_accuracy": lr}, lr=lr)
        overrides = path / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text() + f"- client.lr={lr}\n")
    out, _ = report(
        capsys,
        tmp_path / "0",
        tmp_path / "1",
        tmp_path / "2",
        tmp_path / "3",
        "--by",
        "strategy,client.lr",
        "--metrics",
        "final_accuracy",
    )
    assert out.splitlines() == [  # the --by keys are columns, not in the configuration too
        "| strategy | client.lr | configuration | final_accuracy |",
        "| --- | --- | --- | ---: |",
        "| fedavg | 0.05 | client.method=sgd | 0.050 |",
        "| fedavg | 0.1 | client.method=sgd | 0.100 |",
        "| fedavg | 0.2 | client.method=sgd | 0.200 |",
        "| fot | 0.05 | client.method=replay | 0.050 |",
        "",
        "mean ± sample standard deviation (ddof=1) over seeds, n = 1 run each.",
    ]


def test_by_sorts_numbers_as_numbers_and_keeps_ties_in_the_order_found(sweep, capsys):
    out, _ = report(capsys, sweep, "--by", "client.method,rounds", "--format", "csv", "--metrics", "final_accuracy")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["client.method"], r["rounds"], r["configuration"]) for r in rows] == [
        ("replay", "30", "FOT"),
        ("sgd", "30", "FedAvg"),
    ]


def test_config_values_come_from_choices_config_or_overrides():
    config = {
        "strategy": {"_target_": "strategies.fot.FOT", "eta": "${oops}", "min_train_nodes": "${client.batches}"},
        "client": {"method": "ewc", "lr": 0.1, "batches": 4},
        "stream": {"class_incremental": {"tasks": None}},
    }
    chosen = Run(
        Path("/r"),
        overrides=("strategy=fot", "strategy.eta=0.5"),
        strategy="FOT",
        choices={"strategy": "fot"},
        config=config,
    )
    assert config_value(chosen, "strategy") == "fot"
    assert config_value(chosen, "client.method") == "ewc"
    assert config_value(chosen, "client.lr") == "0.1"
    assert config_value(chosen, "stream.class_incremental.tasks") == "null"
    assert config_value(chosen, "client.nothing") is None
    # A run older than config_resolved.yaml: an interpolation in its .hydra/config.yaml is
    # resolved within that config, else taken from the override, else left as written.
    assert config_value(chosen, "strategy.min_train_nodes") == "4"
    assert config_value(chosen, "strategy.eta") == "0.5"
    bare = Run(Path("/r"), overrides=(), config=config)  # no hydra.yaml, no override
    assert config_value(bare, "strategy") == "FOT"
    assert config_value(bare, "strategy.eta") == "${oops}"


def test_by_reads_the_resolved_config_where_the_run_wrote_one(tmp_path, capsys):
    new = write_resolved(write_run(tmp_path / "new", "fot", "sgd", 0, {"final_accuracy": 0.6}))
    old = write_run(tmp_path / "old", "fedavg", "sgd", 0, {"final_accuracy": 0.5})
    out, _ = report(
        capsys, new, old, "--format", "csv", "--metrics", "final_accuracy", "--by", "strategy.min_train_nodes"
    )
    assert [r[:2] for r in csv.reader(io.StringIO(out))] == [
        ["strategy.min_train_nodes", "configuration"],
        ["10", "FOT"],
        ["10", "FedAvg"],
    ]
    # Values only the run's process could resolve (its resolvers, Hydra's runtime):
    assert config_value(read_run(new), "strategy.fraction_train") == "0.5"
    assert config_value(read_run(new), "scenario_name") == "digits"


def test_by_strategy_names_the_class_a_run_put_in_place_of_the_groups(tmp_path, capsys):
    median = "flwr.serverapp.strategy.FedMedian"
    overridden = write_resolved(
        write_run(tmp_path / "a", "fedavg", "sgd", 0, {"final_accuracy": 0.5}, extra=(f"strategy._target_={median}",)),
        median,
    )
    plain = write_run(tmp_path / "b", "fedavg", "sgd", 0, {"final_accuracy": 0.6})
    # A target set other than by an override: told from the group's file in Hydra's config path.
    conf = tmp_path / "conf"
    (conf / "strategy").mkdir(parents=True)
    (conf / "strategy" / "fedavg.yaml").write_text(f"_target_: {STRATEGIES['fedavg']}\n")
    other = write_resolved(write_run(tmp_path / "c", "fedavg", "ewc", 0, {"final_accuracy": 0.7}), "strategies.fot.FOT")
    hydra_yaml = other / ".hydra" / "hydra.yaml"
    sources = f"    config_sources:\n    - path: {conf}\n      schema: file\n"
    hydra_yaml.write_text(hydra_yaml.read_text().replace("  runtime:\n", "  runtime:\n" + sources))
    out, _ = report(
        capsys, overridden, plain, other, "--format", "csv", "--metrics", "final_accuracy", "--by", "strategy"
    )
    strategies = [r[0] for r in csv.reader(io.StringIO(out))]
    assert strategies == ["strategy", "FOT", "FedMedian", "fedavg"]


def test_resume_and_the_spelling_of_a_value_make_no_other_configuration(tmp_path, capsys):
    for seed, (extra, final) in enumerate([(("eval.probes=false",), 0.5), (("eval.probes=False", "resume=true"), 0.7)]):
        write_run(tmp_path / str(seed), "fot", "replay", seed, {"final_accuracy": final}, extra=extra)
    out, _ = report(capsys, tmp_path / "0", tmp_path / "1", "--metrics", "final_accuracy")
    assert out.splitlines()[2] == "| FOT | 0.600 ± 0.141 |"
    assert out.splitlines()[-1].endswith(
        "n = 2 runs each; every row: client.method=replay eval.probes=false strategy=fot."
    )


@pytest.mark.parametrize(
    "name", [".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "config_resolved.yaml"]
)
@pytest.mark.parametrize("text, says", [("a: [1\n", "not YAML"), ("[1, 2]\n", "not a YAML")])
def test_a_hydra_or_config_file_that_is_not_yaml_exits_2_naming_it(tmp_path, capsys, name, text, says):
    path = write_run(tmp_path / "run", "fot", "replay", 0, {"final_accuracy": 0.5})
    if name == ".hydra/overrides.yaml" and text.startswith("["):
        text = "seed: 1\n"  # a list is what overrides.yaml should be
    (path / name).write_text(text)
    message = report_fails(capsys, path)
    assert f"{path / name}: {says}" in message, message


def test_rows_keep_the_order_the_runs_were_given_in(sweep, tmp_path, capsys):
    first = write_run(tmp_path / "z", "fedavg", "ewc", 0, {"final_accuracy": 0.5})
    out, _ = report(capsys, first, sweep, "--format", "csv", "--metrics", "final_accuracy")
    assert [r["configuration"] for r in csv.DictReader(io.StringIO(out))] == [
        "FedAvg client.method=ewc",
        "FOT client.method=replay",
        "FedAvg client.method=sgd",
    ]


def test_the_configuration_column_goes_where_the_by_keys_say_everything(sweep, capsys):
    out, _ = report(capsys, sweep, "--by", "strategy,client.method", "--metrics", "final_accuracy")
    assert out.splitlines()[:4] == [
        "| strategy | client.method | final_accuracy |",
        "| --- | --- | ---: |",
        "| fedavg | sgd | 0.740 ± 0.040 (3) |",
        "| fot | replay | 0.850 ± 0.071 (2) |",
    ]


@pytest.mark.parametrize(
    "args, names",
    [
        (["--metrics", "final_acc"], ["unknown metric 'final_acc'", "final_accuracy", "multirun"]),
        (["--by", "client.methd"], ["unknown --by key 'client.methd'", "multirun"]),
        (["--metrics", "initial_acc_per_task"], ["summary.json: initial_acc_per_task is [0.1, 0.1]"]),
    ],
)
def test_bad_metrics_and_keys_exit_2_naming_them(sweep, capsys, args, names):
    message = report_fails(capsys, sweep, *args)
    assert all(name in message for name in names), message


def test_a_path_without_runs_exits_2_naming_it(tmp_path, capsys):
    write_run(tmp_path / "failed", "fedavg", "sgd", 0, None)
    for path in [tmp_path / "failed", tmp_path / "missing"]:
        message = report_fails(capsys, path)
        assert f"{path}: no summary.json there nor in any subdirectory" in message


def test_the_module_runs_from_the_command_line(sweep):
    result = run_module("simulator.report", str(sweep), "--format", "csv", "--metrics", "final_accuracy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == ("configuration,final_accuracy_mean,final_accuracy_std,final_accuracy_n")
    assert "left out" in result.stderr


def test_rows_that_differ_only_by_how_a_by_key_was_given_keep_what_tells_them_apart(tmp_path, capsys):
    # lr left at the file's 0.05 in one run, set to it in the other: two groups, one value under --by.
    write_run(tmp_path / "default", "fedavg", "sgd", 0, {"final_accuracy": 0.7})
    write_run(tmp_path / "set", "fedavg", "sgd", 0, {"final_accuracy": 0.8}, extra=("client.lr=0.05",))
    out, _ = report(capsys, tmp_path / "default", tmp_path / "set", "--by", "client.lr", "--metrics", "final_accuracy")
    assert out.splitlines()[:4] == [
        "| client.lr | configuration | final_accuracy |",
        "| --- | --- | ---: |",
        "| 0.05 | FedAvg | 0.700 |",
        "| 0.05 | client.lr=0.05 | 0.800 |",
    ]


def test_by_keys_that_tell_every_row_apart_leave_no_configuration_column(sweep, capsys):
    fedavg = [p for p in sweep.iterdir() if "strategy=fedavg" in p.name and (p / "summary.json").exists()]
    out, _ = report(capsys, *fedavg, "--by", "client.method", "--metrics", "final_accuracy")
    assert out.splitlines()[:3] == ["| client.method | final_accuracy |", "| --- | ---: |", "| sgd | 0.740 ± 0.040 |"]


@pytest.mark.parametrize(
    "args, names",
    [
        (["--digits", "-1"], ["argument --digits", "'-1'", "0 to 17"]),
        (["--digits", "100"], ["argument --digits", "'100'", "0 to 17"]),
        (["--metrics", ","], ["argument --metrics", "','", "comma-separated"]),
        (["--by", " , "], ["argument --by", "' , '", "comma-separated"]),
    ],
)
def test_bad_option_values_exit_2_with_one_error_line_naming_the_option(sweep, capsys, args, names):
    line = one_error_line(report_fails(capsys, sweep, *args))
    assert all(name in line for name in names), line
    assert "_names" not in line  # argparse's word for the type function, which means nothing to a user


def test_a_file_or_a_name_too_long_for_the_system_exits_2_naming_it(sweep, tmp_path, capsys):
    run = next(p for p in sweep.iterdir() if (p / "summary.json").is_file())
    line = one_error_line(report_fails(capsys, run / "summary.json"))
    assert f"{run / 'summary.json'}: a file, not a run directory; give its folder {run}" in line, line
    line = one_error_line(report_fails(capsys, tmp_path / ("a" * 300)))
    assert f"{tmp_path / ('a' * 300)}" in line and "File name too long" in line, line


def test_a_summary_that_is_not_text_exits_2_naming_it(tmp_path, capsys):
    path = write_run(tmp_path / "run", "fedavg", "sgd", 0, {"final_accuracy": 0.5})
    (path / "summary.json").write_bytes(b'{"final_accuracy": \xff}')
    line = one_error_line(report_fails(capsys, path))
    assert f"{path / 'summary.json'}: not JSON" in line, line
