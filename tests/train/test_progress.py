"""How ``dynmm train`` shows its epochs: a line per epoch in a log or a pipe, one updating line per stage on a
terminal. No Ray: the records are those the driver receives."""

from __future__ import annotations

import io

from dynmm.cli.train import EpochPrinter


def epoch_record(stage: str, epoch: int, epochs: int) -> dict:
    metrics = {"train_loss": 1.0 / (epoch + 1), "val_accuracy": 0.5 + epoch / 100, "val_gflops_per_sample": 2e-4,
               "val_compute_reduction": 0.25, "epoch_seconds": 0.1}
    return {"stage": stage, "epoch": epoch, "epochs": epochs, "metrics": metrics}


def shown(printer: EpochPrinter, stages: dict[str, int]) -> str:
    for stage, epochs in stages.items():
        for epoch in range(epochs):
            printer(epoch_record(stage, epoch, epochs))
    printer.close()
    return printer.stream.getvalue()


def test_a_log_gets_one_plain_line_per_epoch():
    output = shown(EpochPrinter(io.StringIO()), {"experts": 3, "gate": 2})  # not a terminal
    lines = output.splitlines()
    assert [line.split()[:2] for line in lines] == [["experts", "1/3"], ["experts", "2/3"], ["experts", "3/3"],
                                                    ["gate", "1/2"], ["gate", "2/2"]]
    assert "\r" not in output
    assert "loss 0.3333" in lines[2] and "val accuracy 0.5200" in lines[2] and "ETA 0:00" in lines[2]


def test_a_terminal_gets_one_updating_line_per_stage():
    output = shown(EpochPrinter(io.StringIO(), interactive=True), {"experts": 40, "gate": 2})
    finished_lines = output.split("\n")
    assert len([line for line in finished_lines if line.strip()]) == 2, "one line per stage"
    experts_final = finished_lines[0].split("\r")[-1]
    assert experts_final.split()[:2] == ["experts", "40/40"] and "loss 0.0250" in experts_final
    assert "ETA" in experts_final and "val accuracy 0.8900" in experts_final
    assert finished_lines[1].split("\r")[-1].split()[:2] == ["gate", "2/2"]


def test_a_resumed_stage_continues_its_line_from_the_checkpointed_epoch():
    printer = EpochPrinter(io.StringIO(), interactive=True)
    printer(epoch_record("gate", 5, 8))
    assert printer.bars["gate"].n == 6
    printer.close()
