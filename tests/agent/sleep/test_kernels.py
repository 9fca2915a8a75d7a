"""The numba training step against slow oracles: torch autograd (gradients), torch's
Adam + clip_grad_norm_ (trajectory), and the dense ``W + B @ A`` head (forward)."""

import numpy as np
import pytest
import torch

from agent.sleep import kernels
from agent.sleep.adapters import AdaptedHead
from export.sleep_reference import (
    TorchTrainer,
    loss_and_grad,
    random_adapted,
    random_head,
)

SHAPES = [  # (dims, rank, n_new, n_teacher_classes)
    ((64, 128, 64, 4), 4, 2, 4),     # the simulator bundle's head, two device classes
    ((256, 64, 5), 8, 5, 7),         # digits-like; the teacher knew 2 device classes already
    ((16, 3), 1, 0, 3),              # one layer, no device classes
    ((12, 10, 8, 6, 3), 3, 1, 0),    # four layers, no teacher (distillation off)
]


def _batch(ad: AdaptedHead, kp: int, n: int, seed: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((n, ad.base.latent_dim))).astype(dtype)   # post-ReLU-like
    y = rng.integers(0, ad.n_classes, n).astype(np.int64)
    t = (2 * rng.standard_normal((n, kp))).astype(dtype)
    return x, y, t


def _numba_grad(ad, x, y, t, kd_weight, temperature, dtype):
    p = ad.pack()
    theta = p.theta.astype(dtype)
    grad = np.full_like(theta, np.nan)          # the kernel must overwrite every entry
    loss = kernels.loss_and_grad(x, y, t, p.layout, p.rank, p.n_new, p.nw_off, p.act,
                                 p.wflat.astype(dtype), p.bflat.astype(dtype), theta,
                                 kd_weight, temperature, grad)
    return loss, grad


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("dims, rank, n_new, kp", SHAPES)
def test_gradients_equal_torch_autograd(dims, rank, n_new, kp, activation):
    ad = random_adapted(dims, rank, n_new, seed=len(dims), activation=activation)
    for seed, (kd, T) in enumerate([(1.0, 2.0), (0.3, 1.0), (0.0, 4.0)]):
        x, y, t = _batch(ad, kp, 17, seed, np.float64)
        loss, grad = _numba_grad(ad, x, y, t, kd, T, np.float64)
        ref_loss, ref_grad = loss_and_grad(ad, x, y, t, kd, T)
        assert loss == pytest.approx(ref_loss, rel=1e-10)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-11)
        # float32, the runtime's dtype: same within single precision.
        x32, t32 = x.astype(np.float32), t.astype(np.float32)
        loss32, grad32 = _numba_grad(ad, x32, y, t32, kd, T, np.float32)
        assert loss32 == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(grad32, ref_grad, rtol=1e-3, atol=1e-5 * np.abs(ref_grad).max())


def test_adam_with_clipping_follows_torch_step_by_step():
    ad = random_adapted((64, 128, 64, 4), rank=4, n_new=2, seed=3)
    p = ad.pack()
    theta = p.theta.copy()
    grad, m, v = (np.zeros_like(theta) for _ in range(3))
    ref = TorchTrainer(ad, lr=1e-2, max_norm=0.5)          # small norm: clipping is active
    for step in range(1, 21):
        x, y, t = _batch(ad, 4, 32, 100 + step)
        loss = kernels.train_step(x, y, t, p.layout, p.rank, p.n_new, p.nw_off, p.act, p.wflat,
                                  p.bflat, theta, 1.0, 2.0, grad, m, v, step, 1e-2, 0.9, 0.999,
                                  1e-8, 0.5)
        ref_loss = ref.step(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(t))
        assert loss == pytest.approx(ref_loss, rel=1e-4)
    np.testing.assert_allclose(theta, ref.model.flat(), atol=2e-5)
    assert np.abs(theta - p.theta).max() > 0.05            # it did move


def test_adam_norm_is_reported_and_no_clipping_when_max_norm_is_zero():
    theta = np.zeros(3, np.float32)
    grad = np.array([3.0, 0.0, 4.0], np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    norm = kernels.adam_step(theta, grad, m, v, 1, 0.1, 0.9, 0.999, 1e-8, 0.0)
    assert norm == pytest.approx(5.0)
    # The first Adam step moves every coordinate with a gradient by lr, against its sign.
    np.testing.assert_allclose(theta, [-0.1, 0.0, -0.1], atol=1e-6)


@pytest.mark.parametrize("dims, rank, n_new, kp", SHAPES)
def test_factored_forward_equals_dense_w_plus_ba(dims, rank, n_new, kp):
    ad = random_adapted(dims, rank, n_new, seed=7)
    x, _, _ = _batch(ad, kp, 9, 1)
    p = ad.pack()
    hs = np.empty(9 * sum(dims[:-1]), np.float32)
    us = np.empty(len(dims[:-1]) * 9 * rank, np.float32)
    fast = kernels.forward(x, p.layout, p.rank, p.n_new, p.nw_off, p.act, p.wflat, p.bflat,
                           p.theta, hs, us)
    # Oracle: explicit dense layers W_i + B_i @ A_i in float64, device rows appended.
    h = x.astype(np.float64)
    L = ad.base.n_layers
    for i, (W, b) in enumerate(zip(ad.base.weights, ad.base.biases, strict=True)):
        z = h @ (W + ad.B[i].astype(np.float64) @ ad.A[i]).T + b
        if i == L - 1:
            z = np.concatenate([z, h @ ad.N.T + x @ ad.S.T + ad.c], axis=1)
        h = np.maximum(z, 0) if i < L - 1 else z
    np.testing.assert_allclose(fast, h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ad.logits(x), h, rtol=1e-4, atol=1e-4)   # the merged numpy head


def test_a_fresh_adapter_is_exactly_the_bundle_head():
    head = random_head((64, 128, 64, 4))
    x = np.abs(np.random.default_rng(0).standard_normal((5, 64))).astype(np.float32)
    ad = AdaptedHead.fresh(head, rank=4, seed=0)
    np.testing.assert_array_equal(ad.logits(x), head.logits(x))
    wider = ad.with_classes(6)
    np.testing.assert_array_equal(wider.logits(x)[:, :4], head.logits(x))
    np.testing.assert_array_equal(wider.logits(x)[:, 4:], 0.0)


def test_pack_unpack_round_trip():
    ad = random_adapted((64, 128, 64, 4), rank=4, n_new=3, seed=1)
    p = ad.pack()
    back = ad.unpack(p.theta, version=5)
    assert back.version == 5 and back.n_classes == ad.n_classes == 7
    for a, b in zip(ad.state_arrays().values(), back.state_arrays().values(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="theta has"):
        ad.unpack(p.theta[:-1], version=1)
