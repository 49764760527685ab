"""Segmentation metrics, loss and robustness noise; the tiny fusion-level model trained on 2 Ray workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from dynmm.cli import main
from dynmm.data.format import read_meta
from dynmm.data.nyuv2 import convert_nyuv2
from dynmm.data.readers import resolve_dataset
from dynmm.data.synthetic import write_depth_labelled_nyuv2
from dynmm.models import ModelRecipe, TemperatureSchedule, build_model, depth_encoder_flops, measure_path_costs
from dynmm.spec import load_pipeline
from dynmm.train.batches import RankShare
from dynmm.train.checkpoints import save_state
from dynmm.train.epoch import loss_cost_reductions, train_epoch
from dynmm.train.evaluate import EvalData, Noise, add_noise, evaluate_split
from dynmm.train.host import LocalHost
from dynmm.train.job import CheckpointPlan, DataPlan, StageConfig, WorkerJob
from dynmm.train.metrics import (
    EpochSums,
    confusion_matrix,
    finalize,
    median_frequency_weights,
    segmentation_metrics,
    task_loss,
)
from dynmm.train.stages import build_lr_scheduler, build_optimizer, freeze_for_stage
from dynmm.train.state import StageRun, WorkerState

PIPELINE = Path(__file__).parents[2] / "pipelines" / "nyuv2.yaml"
PATH_GFLOPS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)


def logits_predicting(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C, H, W) logits whose argmax is ``classes`` (values 1..C)."""
    return torch.nn.functional.one_hot(classes - 1, num_classes).permute(0, 3, 1, 2).float()


def segmentation_sums(predicted: torch.Tensor, label: torch.Tensor, num_classes: int = 3) -> EpochSums:
    sums = EpochSums.zeros("segmentation", num_paths=5, num_classes=num_classes)
    paths = torch.zeros(label.shape[0], dtype=torch.long)
    sums.add(logits_predicting(predicted, num_classes), label, torch.tensor(1.0), paths, PATH_GFLOPS)
    return sums


def test_miou_equals_the_hand_computed_confusion_matrix_with_void_excluded():
    label = torch.tensor([[[1, 1, 2, 0], [3, 3, 2, 0]]])
    predicted = torch.tensor([[[1, 2, 2, 3], [3, 1, 2, 1]]])
    # rows = true class 1..3, columns = predicted; the two void pixels are left out
    expected_confusion = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(confusion_matrix(predicted, label, num_classes=3), expected_confusion)
    metrics = finalize(segmentation_sums(predicted, label), static_gflops=5.0)
    iou = [1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]
    assert metrics["iou_class1"] == pytest.approx(iou[0])
    assert metrics["iou_class2"] == pytest.approx(iou[1])
    assert metrics["iou_class3"] == pytest.approx(iou[2])
    assert metrics["miou"] == pytest.approx(sum(iou) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 6)


def test_a_class_absent_from_labels_and_predictions_does_not_count_in_the_miou():
    label = torch.tensor([[[1, 1, 2, 2]]])
    metrics = segmentation_metrics(confusion_matrix(label, label, num_classes=3))
    assert metrics["miou"] == 1.0
    assert np.isnan(metrics["iou_class3"])


def test_two_shards_summed_give_the_miou_of_the_whole_split():
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (6, 5, 7), generator=generator)
    predicted = torch.randint(1, 4, (6, 5, 7), generator=generator)
    whole = finalize(segmentation_sums(predicted, label), 5.0)
    first, second = segmentation_sums(predicted[:2], label[:2]), segmentation_sums(predicted[2:], label[2:])
    first.values += second.values
    assert finalize(first, 5.0) == pytest.approx(whole)
    mean_of_shards = (finalize(segmentation_sums(predicted[:2], label[:2]), 5.0)["miou"]
                      + finalize(segmentation_sums(predicted[2:], label[2:]), 5.0)["miou"]) / 2
    assert whole["miou"] != pytest.approx(mean_of_shards)


def test_segmentation_loss_ignores_void_and_adds_each_scale():
    label = torch.tensor([[[1, 2], [0, 0]]])
    logits = torch.randn(1, 3, 2, 2)
    loss = task_loss("segmentation", logits, label)
    expected = torch.nn.functional.cross_entropy(logits[0, :, 0, :].T, torch.tensor([0, 1]))
    assert loss == pytest.approx(float(expected))
    side = torch.randn(1, 3, 1, 1)  # nearest-neighbour label at 1x1 is the top-left pixel: class 1
    with_side = task_loss("segmentation", logits, label, side_outputs=[side])
    expected_side = torch.nn.functional.cross_entropy(side.flatten(1), torch.tensor([0]))
    assert with_side == pytest.approx(float(expected + expected_side))


def test_class_weights_reweight_the_cross_entropy():
    label = torch.tensor([[[1, 2, 2, 2]]])
    logits = torch.randn(1, 2, 1, 4)
    weighted = task_loss("segmentation", logits, label, class_weights=[3.0, 1.0])
    per_pixel = torch.nn.functional.cross_entropy(logits, label - 1, reduction="none")[0, 0]
    assert weighted == pytest.approx(float((3 * per_pixel[0] + per_pixel[1:].sum()) / (3 + 3)))


def test_median_frequency_weights_balance_rare_classes_and_zero_absent_ones():
    weights = median_frequency_weights([10.0, 30.0, 60.0, 0.0])
    assert weights.tolist() == pytest.approx([3.0, 1.0, 0.5, 0.0])


def test_noise_is_scaled_by_the_mean_magnitude_of_each_sample_and_seeded():
    batch = {"rgb": torch.full((2, 3, 8, 8), 100.0), "depth": torch.full((2, 1, 8, 8), 2000.0),
             "label": torch.zeros(2, 8, 8)}
    batch["rgb"][1] = 10.0
    noisy = add_noise(batch, Noise("rgb", scale=0.5, probability=1.0), torch.Generator().manual_seed(3))
    again = add_noise(batch, Noise("rgb", scale=0.5, probability=1.0), torch.Generator().manual_seed(3))
    assert torch.equal(noisy["rgb"], again["rgb"]) and torch.equal(noisy["depth"], batch["depth"])
    deviation = noisy["rgb"] - batch["rgb"]
    assert float(deviation[0].std()) == pytest.approx(50.0, rel=0.2)
    assert float(deviation[1].std()) == pytest.approx(5.0, rel=0.2)
    assert torch.equal(batch["rgb"][0], torch.full((3, 8, 8), 100.0)), "the input batch must not change"


def test_noise_reaches_about_a_third_of_the_batches_and_either_picks_both_modalities():
    batch = {"rgb": torch.ones(1, 3, 2, 2), "depth": torch.ones(1, 1, 2, 2), "label": torch.zeros(1, 2, 2)}
    generator = torch.Generator().manual_seed(0)
    hit = {"rgb": 0, "depth": 0, "none": 0}
    for _ in range(600):
        noisy = add_noise(batch, Noise("either", scale=1.0), generator)
        changed = [name for name in ("rgb", "depth") if not torch.equal(noisy[name], batch[name])]
        hit[changed[0] if changed else "none"] += 1
    assert 0.28 < (hit["rgb"] + hit["depth"]) / 600 < 0.38
    assert hit["rgb"] > 60 and hit["depth"] > 60


def tiny_nyuv2_overrides(tmp_path: Path) -> list[str]:
    """A tiny ESANet-layout dataset converted under ``tmp_path`` and the pipeline settings that train on it."""
    ids = {"train": ["0001", "0002", "0003", "0004", "0005", "0006"], "test": ["0100", "0101"]}
    write_depth_labelled_nyuv2(tmp_path / "esanet", ids)
    dataset = convert_nyuv2(tmp_path / "esanet", tmp_path / "nyuv2", valid_size=2)
    settings = {
        "data.dataset": dataset, "data.batch_size": 2, "data.eval_batch_size": 4,
        "model.args.preset": "tiny", "model.args.input_size": "[48, 64]",
        "stages.gate.epochs": 2, "stages.gate.epoch_ini": 1, "stages.gate.epoch_hard": 1,
        "scaling.use_gpu": "false", "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.45,
        "run.storage_path": tmp_path / "runs", "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    return [f"{key}={value}" for key, value in settings.items()]


def test_evaluate_command_reports_static_and_dynmm_side_by_side_over_seeded_noise_runs(tmp_path, capsys):
    overrides = tiny_nyuv2_overrides(tmp_path)
    spec = load_pipeline(PIPELINE, overrides)
    torch.manual_seed(0)
    model = build_model(spec.model.name, **spec.model.args)
    (tmp_path / "checkpoint").mkdir()
    save_state(tmp_path / "checkpoint", {"model": model.state_dict()})
    arguments = ["evaluate", str(PIPELINE), "--checkpoint", str(tmp_path / "checkpoint"), "--noise", "depth",
                 "--noise-probability", "1", "--noise-scale", "2", "--runs", "3", "--json"]
    for override in overrides:
        arguments += ["--set", override]

    code = main(arguments)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads(printed.out.strip().splitlines()[-1])
    assert report["runs"] == 3 and report["noise"] == {"modality": "depth", "scale": 2.0, "probability": 1.0}
    static, dynamic = report["models"]["static"], report["models"]["dynmm"]
    assert len(static["miou_per_run"]) == 3 and len(set(static["miou_per_run"])) > 1, "each seed draws new noise"
    assert static["miou_mean"] == pytest.approx(np.mean(static["miou_per_run"]))
    assert static["miou_std"] == pytest.approx(np.std(static["miou_per_run"], ddof=1))
    assert static["path_fractions"] == [0.0, 0.0, 0.0, 0.0, 1.0] and static["depth_encoder_reduction"] == 0.0
    assert static["compute_reduction"] == 0.0
    assert sum(dynamic["path_fractions"]) == pytest.approx(1.0)
    assert main(arguments) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report, "seeded runs repeat exactly"


TINY_3_CLASSES = {"preset": "tiny", "input_size": (48, 64), "num_classes": 3}


def one_gate_epoch(static: bool, resource_lambda: float) -> dict[str, float]:
    """One gate-stage epoch (random-path warm-up) of the tiny fusion net through the loop's own
    ``train_epoch``, on in-memory rows; the finalised training metrics."""
    torch.manual_seed(0)
    model = build_model("nyuv2", static=static, **TINY_3_CLASSES)
    costs = measure_path_costs(model)
    stage = StageConfig("gate", epochs=1, lr=0.01, optimizer="sgd", resource_lambda=resource_lambda, epoch_ini=1,
                        freeze_experts=False)
    job = WorkerJob(ModelRecipe("nyuv2", TINY_3_CLASSES), "segmentation", 3, (stage,), experts_uri="",
                    checkpoints=CheckpointPlan(""), costs=costs, data=DataPlan(batch_size=4, in_memory=True))
    generator = torch.Generator().manual_seed(0)
    columns = {"rgb": 255 * torch.rand((8, 3, 48, 64), generator=generator),
               "depth": 10_000 * torch.rand((8, 1, 48, 64), generator=generator),
               "label": torch.randint(0, 4, (8, 48, 64), generator=generator)}
    state = WorkerState.create(job, model, LocalHost({}, []))
    state.shards["train_gate"] = RankShare(columns, 8, 8)
    freeze_for_stage(model, stage)
    optimizer = build_optimizer(stage, model)
    temperature = TemperatureSchedule(1.0, 1.0, 0, stage.epoch_ini)
    run = StageRun(0, stage, model, optimizer, build_lr_scheduler(stage, optimizer), temperature)
    sums = train_epoch(state, run, 0)
    metrics = {f"train_{key}": value for key, value in finalize(sums, costs.static_flops / 1e9).items()}
    fractions = {f"val_path{p}_fraction": 0.2 for p in range(5)}
    return metrics | loss_cost_reductions(metrics | fractions, job.costs.loss_flops)


def test_the_static_net_trains_on_the_task_loss_alone_with_every_sample_on_the_full_path():
    static = one_gate_epoch(static=True, resource_lambda=1000.0)
    assert static["train_path4_fraction"] == 1.0
    assert static["train_compute_reduction"] == pytest.approx(0.0)
    assert static["train_depth_encoder_reduction"] == 0.0
    assert static["train_loss"] < 100, "lambda 1000 must not reach the static net's loss"
    dynamic = one_gate_epoch(static=False, resource_lambda=1000.0)
    assert dynamic["train_path4_fraction"] < 1.0 and dynamic["train_loss"] > 100


def test_training_reports_the_depth_encoder_saving_beside_the_whole_network_saving():
    model = build_model("nyuv2", **TINY_3_CLASSES)
    costs = measure_path_costs(model)
    half_on_path_zero = {f"{split}_path{path}_fraction": 0.5 if path in (0, 4) else 0.0
                         for split in ("train", "val") for path in range(5)}
    reductions = loss_cost_reductions(half_on_path_zero, costs.loss_flops)
    assert reductions == {"train_depth_encoder_reduction": 0.5, "val_depth_encoder_reduction": 0.5}
    whole_network = 1 - (costs.path_flops[0] + costs.path_flops[4]) / 2 / costs.static_flops
    assert whole_network < 0.25, "the whole-network saving of the same routing is much smaller"
    assert loss_cost_reductions(half_on_path_zero, ()) == {}


def test_evaluate_compares_dynmm_with_the_trained_static_net_in_miou_depth_encoder_and_total_gflops(tmp_path, capsys):
    overrides = tiny_nyuv2_overrides(tmp_path)
    spec = load_pipeline(PIPELINE, overrides)
    torch.manual_seed(0)
    dynamic = build_model(spec.model.name, **spec.model.args)
    static = build_model(spec.model.name, **spec.model.args, static=True)
    for name, model in (("dynmm", dynamic), ("static", static)):
        (tmp_path / name).mkdir()
        save_state(tmp_path / name, {"model": model.state_dict()})
    arguments = ["evaluate", str(PIPELINE), "--checkpoint", str(tmp_path / "dynmm"),
                 "--static-checkpoint", str(tmp_path / "static")]
    for override in overrides:
        arguments += ["--set", override]

    assert main([*arguments, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["static_trained"] is True
    costs, depth_flops = measure_path_costs(dynamic), depth_encoder_flops(dynamic)
    static_row, dynamic_row = report["models"]["static"], report["models"]["dynmm"]
    dataset = resolve_dataset(spec.data.dataset, tmp_path)
    num_classes = read_meta(dataset).num_classes
    test_split = EvalData(dataset, "test", "segmentation", num_classes, costs)
    expected = evaluate_split(static.eval(), test_split, force_path=4)
    assert static_row["miou_mean"] == pytest.approx(expected["miou"]), "the trained static weights are scored"
    assert static_row["gflops_per_sample"] == pytest.approx(costs.expert_flops[4] / 1e9), "no gate in its cost"
    assert static_row["depth_encoder_gflops_per_sample"] == pytest.approx(depth_flops[4] / 1e9)
    assert static_row["depth_encoder_reduction"] == 0.0
    fractions = dynamic_row["path_fractions"]
    dynamic_depth = sum(fraction * flops for fraction, flops in zip(fractions, depth_flops, strict=True))
    assert dynamic_row["depth_encoder_gflops_per_sample"] == pytest.approx(dynamic_depth / 1e9)
    assert dynamic_row["depth_encoder_reduction"] == pytest.approx(1 - dynamic_depth / depth_flops[4])
    capsys.readouterr()
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "trained static model" in printed and "depth GFLOPs" in printed


def test_evaluate_names_a_folder_without_a_checkpoint(tmp_path, capsys):
    arguments = ["evaluate", str(PIPELINE), "--checkpoint", str(tmp_path / "esanet")]
    for override in tiny_nyuv2_overrides(tmp_path):
        arguments += ["--set", override]
    assert main(arguments) == 2
    assert f"{tmp_path / 'esanet'}: no state.pt; pass a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.experts.enabled=true", "stages.experts.enabled: must be false"),
        ("stages.gate.freeze_experts=true", "stages.gate.freeze_experts: must be false"),
        ("model.args.num_classes=13", "model.args.num_classes: the model predicts 13 classes"),
    ],
)
def test_a_fusion_pipeline_set_up_the_modality_level_way_exits_2_naming_the_field(tmp_path, capsys, override, message):
    arguments = ["train", str(PIPELINE)]
    for setting in [*tiny_nyuv2_overrides(tmp_path), override]:
        arguments += ["--set", setting]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_tiny_fusion_model_trains_on_two_ray_workers_and_logs_miou_and_cost(ray_session, tmp_path, mlflow_db):
    from dynmm.train.runner import run_training

    result = run_training(load_pipeline(PIPELINE, tiny_nyuv2_overrides(tmp_path)))

    assert result.quality_metric == "miou"
    assert 0.0 <= result.final_metrics["val_miou"] <= 1.0
    assert result.final_metrics["val_gflops_per_sample"] > 0
    client = MlflowClient(result.tracking_uri)
    logged = client.get_run(result.mlflow_run_id).data.metrics
    assert {"val_miou", "train_miou", "val_gflops_per_sample", "val_compute_reduction", "val_iou_class1",
            "val_path4_fraction", "val_depth_encoder_reduction", "train_depth_encoder_reduction"} <= set(logged)
    assert [entry.step for entry in client.get_metric_history(result.mlflow_run_id, "val_miou")] == [0, 1]
    assert (Path(result.checkpoint_path) / "state.pt").is_file()


@pytest.mark.integration
def test_the_static_net_trains_as_its_own_model_and_feeds_evaluate_as_the_static_baseline(ray_session, tmp_path,
                                                                                         mlflow_db, capsys):
    from dynmm.train.runner import run_training

    overrides = [*tiny_nyuv2_overrides(tmp_path), "model.args.static=true", "stages.gate.epochs=1"]
    result = run_training(load_pipeline(PIPELINE, overrides))

    metrics = result.final_metrics
    assert result.costs.gate_flops == 0.0
    assert metrics["val_path4_fraction"] == 1.0 and metrics["val_compute_reduction"] == pytest.approx(0.0)
    assert metrics["val_depth_encoder_reduction"] == 0.0
    assert metrics["val_gflops_per_sample"] == pytest.approx(result.costs.expert_flops[4] / 1e9)
    dynamic_overrides = [setting for setting in overrides if not setting.startswith("model.args.static")]
    dynamic = build_model("nyuv2", **load_pipeline(PIPELINE, dynamic_overrides).model.args)
    (tmp_path / "dynmm").mkdir()
    save_state(tmp_path / "dynmm", {"model": dynamic.state_dict()})
    arguments = ["evaluate", str(PIPELINE), "--checkpoint", str(tmp_path / "dynmm"),
                 "--static-checkpoint", result.checkpoint_path, "--json"]
    for setting in dynamic_overrides:
        arguments += ["--set", setting]
    capsys.readouterr()
    assert main(arguments) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["static_trained"] is True
    assert report["models"]["static"]["path_fractions"] == [0.0, 0.0, 0.0, 0.0, 1.0]
