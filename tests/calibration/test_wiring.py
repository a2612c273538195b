"""What calibrate wires together: held-out splits by source, the divergence note, the output-aware
start, and micro-batches that give the whole batch's gradient."""

import h5py
import numpy as np
import pytest

from benchmarks.narrow_set import augment
from bwacal.calibrate import CalibrationOptions, calibrate
from bwacal.data import write_dataset
from bwacal.fit import _batch_gradients
from bwacal.quantize import quantize_network, select_layers

import bwacal


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """8 Fashion-MNIST images (one per class) x 32 augmented variants each, sources = the image."""
    with h5py.File("data/fmnist_calib.h5", "r") as f:
        images, labels, attrs = f["images"][:400], f["labels"][:400], dict(f["images"].attrs)
    rng = np.random.default_rng(0)
    picks = [int(np.flatnonzero(labels == c)[0]) for c in range(8)]
    x = np.concatenate([augment(images[p, 0], 32, rng) for p in picks])
    path = tmp_path_factory.mktemp("narrow") / "narrow.h5"
    write_dataset(path, x, np.repeat(labels[picks], 32), mean=attrs["mean"], std=attrs["std"],
                  sources=np.repeat(np.arange(8), 32))
    return path


def _run(calib, **kw):
    opts = CalibrationOptions(bits=2, epochs=3, holdout=0.25, weight_method="minmax", method="bwa", **kw)  # the split, not the method
    return calibrate("data/zoo/resnet20.onnx", calib, opts).report


def test_a_split_by_source_shows_the_overfitting_a_random_split_hides(narrow):
    by_source = _run(narrow, split="source")
    shuffled = _run(narrow, split="random")
    last = {name: r["history"][-1] for name, r in (("source", by_source), ("random", shuffled))}
    assert last["source"]["heldout_loss"] > 2 * last["source"]["train_loss"]
    assert by_source["divergence"] is not None and "held-out" in by_source["divergence"]
    assert last["random"]["heldout_loss"] < 2 * last["random"]["train_loss"]
    assert shuffled["divergence"] is None
    assert by_source["split"] == "source" and CalibrationOptions().split == "auto"


def test_auto_split_follows_the_files_sources(narrow):
    report = calibrate("data/zoo/resnet20.onnx", narrow,
                       CalibrationOptions(bits=4, epochs=0, holdout=0.25, method="bwa")).report
    # whole sources held out: 2 of 8 sources of 32 images
    assert report["heldout_images"] == 64


def test_output_aware_start_is_a_candidate_of_auto_and_can_be_forced(tiny):
    model, calib = tiny
    auto = calibrate(model, calib, CalibrationOptions(bits=2, epochs=0)).report
    assert {"uniform_minmax", "uniform_mse", "uniform_output"} <= set(auto["accuracy"])
    forced = calibrate(model, calib, CalibrationOptions(bits=2, epochs=0, weight_method="output")).report
    assert forced["start"] == "output"
    mse = calibrate(model, calib, CalibrationOptions(bits=2, epochs=0, weight_method="mse")).report
    assert "uniform_output" not in mse["accuracy"]


def test_micro_batches_give_the_whole_batchs_loss_and_gradients():
    model = bwacal.load_model("data/zoo/resnet20.onnx")
    layers = select_layers(model.graph, 3)
    net = quantize_network(model, layers, "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (10,) + model.input_shape).astype(np.float32)
    t = np.log(np.full((10, model.num_classes), 1 / model.num_classes))
    wrt = [qw.name for qw in net.weights]
    params = net.params()
    whole_loss, whole = _batch_gradients(net, params, x, None, t, "kl", wrt, None)
    for micro in (1, 3, 4):
        loss, grads = _batch_gradients(net, params, x, None, t, "kl", wrt, micro)
        assert loss == pytest.approx(whole_loss, rel=1e-6)
        for name in wrt:
            scale = np.abs(whole[name]).max()
            np.testing.assert_allclose(grads[name], whole[name], atol=1e-5 * scale, err_msg=name)


def test_the_micro_batch_is_chosen_to_fit_the_budget(tiny):
    from bwacal.fit import FitOptions, fit_bit_weights

    model_path, calib = tiny
    model = bwacal.load_model(model_path)
    net = quantize_network(model, select_layers(model.graph, 3), "mse")
    x = np.random.default_rng(0).normal(0, 1, (32,) + model.input_shape).astype(np.float32)
    t = np.log(np.full((32, model.num_classes), 1 / model.num_classes))

    def fit(budget):
        result = fit_bit_weights(net, lambda epoch: [(x, None, t)], lambda: [(x[:8], None, t[:8])],
                                 FitOptions(epochs=1, batch_size=32, memory_budget=budget))
        return result.micro_batch

    assert fit(1 << 30) == 32  # fits whole
    small = fit(200_000)
    assert 1 <= small < 32


def test_no_forward_after_fitting_starts_takes_more_than_the_micro_batch(tiny, monkeypatch):
    """The held-out passes of the fit and the accuracy after it run in micro-batches as the steps do
    (at 224x224 whole batches there grew the heap past the steps' peak)."""
    import bwacal.calibrate
    from bwacal.engine import Engine

    model_path, calib = tiny
    sizes, fitting = [], []
    run, fit = Engine.run, bwacal.calibrate.fit_bit_weights

    def counting_run(self, feeds, *args, **kwargs):
        if fitting:
            sizes.append(len(next(iter(feeds.values()))))
        return run(self, feeds, *args, **kwargs)

    def marking_fit(*args, **kwargs):
        fitting.append(True)
        return fit(*args, **kwargs)

    monkeypatch.setattr(Engine, "run", counting_run)
    monkeypatch.setattr(bwacal.calibrate, "fit_bit_weights", marking_fit)
    report = calibrate(model_path, calib, CalibrationOptions(bits=3, epochs=2, batch_size=32, micro_batch=5, method="bwa",
                                                             weight_method="mse")).report
    assert report["heldout_images"] == 32 and report["micro_batch"] == 5
    assert sizes and max(sizes) == 5
