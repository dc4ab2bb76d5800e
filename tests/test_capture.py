"""Capture: which calls count, in which order, and what is kept alive."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from proxoptim.capture import Capture


def tracked(*modules, keep_input=True, keep_output_grad=False):
    return Capture(
        (index, module, keep_input, keep_output_grad) for index, module in enumerate(modules)
    )


def test_calls_count_only_once_backward_reaches_them():
    layer = nn.Linear(3, 2)
    capture = tracked(layer)
    x = torch.randn(4, 3)
    out = layer(x)
    assert capture.calls() == {}
    out.sum().backward()
    (call,) = capture.calls()[0]
    assert call.input is x and call.module is layer


def test_no_grad_frozen_weight_and_inference_mode_are_ignored():
    layer = nn.Linear(3, 2)
    capture = tracked(layer)
    with torch.no_grad():
        layer(torch.randn(1, 3))
    with torch.inference_mode():
        layer(torch.randn(1, 3))
    layer.weight.requires_grad_(False)
    layer(torch.randn(1, 3)).sum().backward()
    assert capture.calls() == {}


def test_output_gradient_is_kept_on_request():
    layer = nn.Linear(3, 2)
    capture = tracked(layer, keep_output_grad=True)
    x = torch.randn(4, 3)
    weights = torch.randn(4, 2)
    (layer(x) * weights).sum().backward()
    (call,) = capture.calls()[0]
    assert torch.equal(call.output_grad, weights)
    assert torch.allclose(call.output_grad.T @ x, layer.weight.grad)


def test_gradient_hook_survives_inplace_activation():
    layer = nn.Linear(3, 2)
    capture = tracked(layer, keep_output_grad=True)
    x = torch.randn(4, 3)
    out = layer(x)
    torch.relu_(out)
    out.sum().backward()
    (call,) = capture.calls()[0]
    # δ is the gradient of the layer's own output (before the in-place ReLU).
    assert torch.allclose(call.output_grad.T @ x, layer.weight.grad)


def test_forward_and_backward_order_are_recorded():
    first, second = nn.Linear(3, 3), nn.Linear(3, 1)
    capture = tracked(first, second)
    second(first(torch.randn(2, 3))).sum().backward()
    calls = capture.calls()
    assert calls[0][0].sequence < calls[1][0].sequence
    assert calls[1][0].confirmation < calls[0][0].confirmation  # backward reaches `second` first


def test_keep_input_false_records_order_only():
    layer = nn.Linear(3, 2)
    capture = tracked(layer, keep_input=False)
    layer(torch.randn(4, 3)).sum().backward()
    assert capture.calls()[0][0].input is None


def test_many_forwards_without_backward_keep_nothing():
    layer = nn.Linear(3, 2)
    capture = tracked(layer)
    inputs = [torch.randn(2, 3) for _ in range(1000)]
    refs = [weakref.ref(x) for x in inputs]
    for x in inputs:
        layer(x)  # output (and with it the graph and the gradient hook) dropped at once
    del inputs, x
    gc.collect()
    assert capture.calls() == {}
    assert all(ref() is None for ref in refs)


def test_cleared_inputs_are_released():
    layer = nn.Linear(3, 2)
    capture = tracked(layer)
    x = torch.randn(4, 3)
    layer(x).sum().backward()
    ref = weakref.ref(x)
    del x
    assert ref() is not None
    capture.clear()
    assert ref() is None


def test_deleting_the_capture_removes_its_hooks():
    layer = nn.Linear(3, 2)
    capture = tracked(layer)
    assert len(layer._forward_hooks) == 1
    del capture
    assert len(layer._forward_hooks) == 0


def test_remove_is_idempotent():
    layer = nn.Linear(3, 2)
    capture = tracked(layer)
    capture.remove()
    capture.remove()
    assert not capture.attached and len(layer._forward_hooks) == 0


def test_activation_checkpointing_counts_each_call_once():
    for use_reentrant in (False, True):
        layer = nn.Linear(3, 3)
        capture = tracked(layer)
        x = torch.randn(4, 3, requires_grad=use_reentrant)
        out = checkpoint(
            lambda t, layer=layer: torch.tanh(layer(t)), x, use_reentrant=use_reentrant
        )
        out.sum().backward()
        assert len(capture.calls()[0]) == 1, use_reentrant
        capture.remove()
