"""The bundled digits data and CNN."""

from __future__ import annotations

import torch

from squeezer.examples.digits import DigitsCNN, digits_accuracy, load_digits_arrays, make_digits_task, train_digits_model


def test_bundled_digits_shape_and_split():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and images.max() == 16 and sorted(set(labels.tolist())) == list(range(10))
    task = make_digits_task(seed=0)
    assert len(task.y_train) + len(task.y_test) == 1797
    assert task.x_train.shape[1:] == (1, 8, 8) and 0.0 <= float(task.x_train.min()) and float(task.x_train.max()) <= 1.0
    counts = torch.bincount(task.y_test, minlength=10)
    assert counts.min() >= 50, "every class is in the test split"
    again = make_digits_task(seed=0)
    assert torch.equal(task.y_test, again.y_test)


def test_cnn_learns():
    task = make_digits_task(seed=0)
    model = train_digits_model(task, epochs=3)
    assert isinstance(model, DigitsCNN) and not model.training
    assert digits_accuracy(model, task) > 0.8
