"""Training-batch augmentation (data.augment) and per-channel standardisation (data.normalize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import USER_CODE, compose_run, dataset_of, read_metrics, run_experiment, stream_of, timeless_records

from clients.augment import PADDING, crop_flip
from simulator.config import ConfigError

DIGITS = ["engine.backend=local", "rounds=2", "federation.clients_per_round=4", "client.epochs=1"]


def _by_loops(x: torch.Tensor, rows: list[int], columns: list[int], flips: list[bool]) -> torch.Tensor:
    """crop_flip written per image, as torchvision's RandomCrop(padding=4) then RandomHorizontalFlip."""
    padded = torch.nn.functional.pad(x, (PADDING,) * 4)
    height, width = x.shape[2:]
    out = []
    for image, top, left, flip in zip(padded, rows, columns, flips):
        crop = image[:, top : top + height, left : left + width]
        out.append(crop.flip(2) if flip else crop)
    return torch.stack(out)


def test_crop_flip_crops_the_padded_image_and_flips_it_as_drawn():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    augmented = crop_flip(x, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)  # the draws crop_flip makes, in its order
    offsets = torch.randint(0, 2 * PADDING + 1, (2, 64, 1), generator=replay)
    flips = (torch.rand(64, 1, generator=replay) < 0.5).flatten().tolist()
    expected = _by_loops(x, offsets[0].flatten().tolist(), offsets[1].flatten().tolist(), flips)
    assert torch.equal(augmented, expected)
    assert 10 < sum(flips) < 54 and len(set(offsets[0].flatten().tolist())) == 2 * PADDING + 1


def test_crop_flip_is_a_function_of_its_generator_and_keeps_shape_and_type():
    x = torch.rand(16, 1, 8, 8)
    a, b = crop_flip(x, torch.Generator().manual_seed(1)), crop_flip(x, torch.Generator().manual_seed(1))
    other = crop_flip(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert a.shape == x.shape and a.dtype == x.dtype
    # A crop at the centre offset, unflipped, is the image itself: content moves, it is not invented.
    centred = _by_loops(x, [PADDING] * 16, [PADDING] * 16, [False] * 16)
    assert torch.equal(centred, x)


def test_normalize_standardises_each_channel_by_the_training_set_and_defaults_to_on_with_augmentation():
    plain = dataset_of(compose_run(["data.dataset=digits"]))
    augmented = dataset_of(compose_run(["data.augment=crop_flip"]))
    unaugmented_but_normalized = dataset_of(compose_run(["data.normalize=true"]))
    for standardized in (augmented, unaugmented_but_normalized):
        assert abs(float(standardized.x_train.mean())) < 1e-5
        assert float(standardized.x_train.std()) == pytest.approx(1.0, abs=1e-4)
        mean, std = plain.x_train.mean(), plain.x_train.std()
        np.testing.assert_allclose(standardized.x_test, (plain.x_test - mean) / std, atol=1e-5)
    assert dataset_of(compose_run(["data.augment=crop_flip", "data.normalize=false"])).x_train.min() == 0.0


def test_augmentation_runs_on_training_batches_only_every_sample_once_a_step(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))
    import augmentations

    augmentations.CALLS.clear()
    everyone = ["federation.num_clients=4", "federation.clients_per_round=4", "client.batch_size=16"]
    run_experiment(tmp_path, [*DIGITS, *everyone, "data.augment=augmentations.recorded_crop_flip"])
    assert len(read_metrics(tmp_path)) == 2
    # The check before any client trains tries it on two samples. Then every client trains every round
    # on all its samples, each augmented once in its batch, and nothing else is augmented: evaluation
    # and probes (no gradient) would have raised.
    checked, *trained = augmentations.CALLS
    training_samples = len(dataset_of(compose_run(["data.dataset=digits"])).y_train)
    assert checked == 2 and sum(trained) == 2 * training_samples and max(trained) == 16


def test_augmentation_changes_what_clients_train_on_and_so_the_model(tmp_path):
    run_experiment(tmp_path / "plain", [*DIGITS, "data.normalize=true"])
    run_experiment(tmp_path / "augmented", [*DIGITS, "data.augment=crop_flip"])
    plain, augmented = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "augmented")
    assert all(p["train_loss"] != a["train_loss"] for p, a in zip(plain, augmented))
    assert plain[-1]["acc_seen"] != augmented[-1]["acc_seen"]


@pytest.mark.ray
def test_augmented_runs_give_the_same_numbers_in_process_and_on_1_or_2_ray_actors(tmp_path):
    common = [*DIGITS, "data.augment=crop_flip", "seed=4"]
    run_experiment(tmp_path / "local", common)
    run_experiment(tmp_path / "ray1", [*common[1:], "engine.backend=ray", "engine.num_actors=1"])
    run_experiment(tmp_path / "ray2", [*common[1:], "engine.backend=ray", "engine.num_actors=2"])
    assert (
        timeless_records(tmp_path / "local")
        == timeless_records(tmp_path / "ray1")
        == timeless_records(tmp_path / "ray2")
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.dataset=synthetic", "data.augment=crop_flip"], "data.augment = 'crop_flip' augments images"),
        (["data.augment=flip_crop"], "data.augment = 'flip_crop': unknown augmentation; valid: crop_flip"),
        (
            ["data.augment=augmentations.cropped"],
            "returned torch.float32 (2, 1, 7, 7) for a batch of torch.float32 (2, 1, 8, 8)",
        ),
    ],
)
def test_an_augmentation_that_cannot_serve_the_data_is_refused_before_any_client_trains(
    tmp_path, monkeypatch, overrides, message
):
    monkeypatch.syspath_prepend(str(USER_CODE))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_experiment(tmp_path, ["engine.backend=local", *overrides])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_rotation_of_standardised_images_brings_in_black_not_the_mean_colour():
    run = compose_run(["scenario=rotated_digits", "data.normalize=true"])
    dataset, stream = dataset_of(run), stream_of(run)
    black = float(dataset.blank.ravel()[0])  # digits' background is 0: black
    assert black < -0.5 and float(dataset.x_train[:, 0, 0, 0].max()) == black  # a corner pixel is background
    n = len(dataset.y_train)
    by_45_degrees = stream.x_train[2 * n : 3 * n]  # task 2 of 5 up to 90 degrees: its corners come from outside
    np.testing.assert_allclose(by_45_degrees[:, 0, 0, 0], black, atol=1e-5)
