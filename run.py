"""Run a FedStream scenario: ``python run.py [scenario=NAME] [strategy=NAME] [key=value ...]``.

Hydra composes ``scenarios/config.yaml`` with the chosen scenario and strategy
files; the run directory (``hydra.run.dir``) receives metrics, the accuracy
matrix, the summary, TensorBoard logs, checkpoints and plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simulator.backends import ClientFailure
from simulator.config import ConfigError, load_config
from simulator.engine import Experiment
from strategies import build_strategy


@hydra.main(config_path="scenarios", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Validate, build the strategy, run, print the run directory and summary."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run = load_config(cfg)
        strategy = build_strategy(cfg.strategy)
        summary = Experiment(run, strategy, run_dir, resume=bool(cfg.resume)).run()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except ClientFailure as error:  # the client's own traceback is in the message
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"run directory: {run_dir}")
    print(json.dumps(summary, indent=2))
    return summary["final_accuracy"]


if __name__ == "__main__":
    main()
