"""`trainer train | evaluate | export`: flags come from the pydantic models, help included."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand

from trainer.config import TrainConfig, TrainerError


class Train(TrainConfig):
    """Fine-tune a pretrained CNN on an ImageFolder tree; writes RUN_DIR (--out) with config,
    checkpoints, history and the evaluation report."""

    def cli_cmd(self) -> None:
        import os

        from trainer.evaluate import evaluate
        from trainer.train import train

        config = TrainConfig.model_validate(self.model_dump())
        result = train(config)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: one report, by rank 0
            from trainer.attributes import fit_attributes

            fit_attributes(result.run_dir)  # attr_ columns in DATA/manifest.csv: their heads
            evaluate(result.run_dir)


class Evaluate(BaseModel):
    """Evaluate a run's best checkpoint: metrics, per-photo predictions, confusion matrix,
    curves, worst mistakes and MODEL_CARD.md in RUN_DIR/report (through the service's own
    preprocessing)."""

    run_dir: CliPositionalArg[Path] = Field(description="run folder made by `trainer train`")
    data: Path | None = Field(None, description=(
        "evaluate on another ImageFolder (its test/, else val/, else every label folder); "
        "default: the run's validation split"))

    def cli_cmd(self) -> None:
        from trainer.evaluate import evaluate

        evaluate(self.run_dir, data=self.data)


class Export(BaseModel):
    """Export a run's best model to ONNX (contract in its metadata), verify it against torch
    on real photos, optionally quantize to int8, and save it to the BentoML model store."""

    run_dir: CliPositionalArg[Path] = Field(description="run folder made by `trainer train`")
    int8: bool = Field(False, description="also write a static int8 (QDQ, per-channel) model "
                                          "calibrated on training photos, with its speed and "
                                          "accuracy change")
    name: str = Field("product-classifier", description="BentoML model name")
    save: bool = Field(True, description="save into the BentoML model store ($BENTOML_HOME)")
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.onnx exporter (dynamo: faster graph, measured)")
    int8_reduce_range: bool = Field(False, description=(
        "--int8 with 7-bit weights, for serving ONNX Runtime int8 on x86 CPUs without VNNI "
        "(AVX2 only: Intel before Ice Lake / Cascade Lake, AMD before Zen 4), where 8-bit "
        "weights can overflow its int16 sums; the service refuses 8-bit weights checked on a "
        "VNNI CPU there. Costs a little accuracy where VNNI exists (BENCHMARKS.md)"))
    flip_tta: bool = Field(False, description=(
        "also write model.flip.onnx (logits of the photo and its mirror image averaged in the "
        "graph) and report its validation accuracy gain against its inference cost; off by "
        "default: it doubles the compute per photo"))

    def cli_cmd(self) -> None:
        from trainer.export import export

        export(self.run_dir, int8=self.int8 or self.int8_reduce_range,
               int8_reduce_range=self.int8_reduce_range, name=self.name, save=self.save,
               exporter=self.exporter, flip_tta=self.flip_tta)


class Trainer(BaseSettings, cli_prog_name="trainer", cli_kebab_case=True,
              cli_implicit_flags=True, cli_enforce_required=False):
    """Fine-tune, evaluate and export product photo classifiers."""

    train: CliSubCommand[Train]
    evaluate: CliSubCommand[Evaluate]
    export: CliSubCommand[Export]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> None:
    import os

    # glibc malloc otherwise returns freed pages to the OS every step and faults them back
    # (measured 3-4x slower CPU training); these only take effect for a fresh process.
    if "MALLOC_MMAP_MAX_" not in os.environ and argv is None:
        os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736")
        os.execv(sys.executable, [sys.executable, "-m", "trainer", *sys.argv[1:]])
    from pydantic import ValidationError
    from rich.console import Console

    try:
        CliApp.run(Trainer, cli_args=sys.argv[1:] if argv is None else argv)
    except (TrainerError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            exc = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'config'}: "
                            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}")
        raise SystemExit(2) from None
