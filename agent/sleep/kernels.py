"""numba kernels of consolidation: forward, backward and Adam for a head with adapters.

Pure functions on flat arrays, no objects (`agent.sleep.adapters` packs and validates).
A head of L dense layers is described by ``layout`` (L, 6) int64, one row per layer::

    n_in, n_out, w_off, b_off, a_off, bb_off

``wflat``/``bflat`` hold the frozen ``W_i`` (n_out, n_in) and ``b_i`` (n_out,) at
``w_off``/``b_off``; ``theta`` holds the trainable ``A_i`` (r, n_in) at ``a_off``, ``B_i``
(n_out, r) at ``bb_off``, and from ``nw_off`` on the device classes' rows ``N`` (n_new,
n_in_last), their skip weights ``S`` (n_new, d) and biases ``c`` (n_new,), in that order.
Layer i computes ``z_i = h_i @ (W_i + B_i @ A_i).T + b_i``, factored as
``h_i @ W_i.T + (h_i @ A_i.T) @ B_i.T``; ``act`` (1 relu, 0 identity) runs between layers;
the logits are ``[z_last, h_last @ N.T + x @ S.T + c]`` (B, K), K = n_out_last + n_new.

Loss of a mini-batch (B rows, labels y, teacher logits t over the first Kp classes)::

    mean_b CE(softmax(z_b), y_b) + kd_weight * T**2 * mean_b KL(softmax(t_b / T) || softmax(z_b[:Kp] / T))

(Hinton et al.'s distillation; the T**2 keeps its gradient scale independent of T.)
Adam and gradient-norm clipping follow torch's `Adam` and `clip_grad_norm_` exactly, so a
torch reference reproduces the trajectory (tests/agent/sleep). Kernels are ``nogil`` (a
sleep thread runs beside the predicting one), ``cache=True`` (``python -m agent.warmup``)
and allocate their scratch per call (a few hundred KB at most). Hand-written loops instead
of ``np.dot``: numba's BLAS needs scipy, which the device does not install.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Vectorizes the inner dot products and axpys; no nnan/ninf, so NaN checks stay honest.
_FM = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, nogil=True, fastmath=_FM, inline="always")
def _dot(a, b, n):
    # a (n,), b (n,) -> sum a * b
    s = 0.0
    for j in range(n):
        s += a[j] * b[j]
    return s


@njit(cache=True, nogil=True, fastmath=_FM, inline="always")
def _axpy(alpha, x, y, n):
    # y (n,) += alpha * x (n,)
    for j in range(n):
        y[j] += alpha * x[j]


@njit(cache=True, nogil=True, fastmath=_FM)
def forward(x, layout, rank, n_new, nw_off, act, wflat, bflat, theta, hs, us):
    """x (B, d) -> logits (B, K); fills hs (sum_i B * n_in_i,) with each layer's input and
    us (L * B * r,) with each layer's ``h_i @ A_i.T`` (kept for the backward pass)."""
    B = x.shape[0]
    L = layout.shape[0]
    k_base = layout[L - 1, 1]
    logits = np.empty((B, k_base + n_new), dtype=theta.dtype)    # (B, K)
    off = 0
    for b in range(B):
        for j in range(x.shape[1]):
            hs[off + b * x.shape[1] + j] = x[b, j]
    for i in range(L):
        n_in, n_out, w_off, b_off, a_off, bb_off = (layout[i, 0], layout[i, 1], layout[i, 2],
                                                    layout[i, 3], layout[i, 4], layout[i, 5])
        h = hs[off: off + B * n_in].reshape((B, n_in))                  # (B, n_in)
        W = wflat[w_off: w_off + n_out * n_in].reshape((n_out, n_in))   # (n_out, n_in)
        A = theta[a_off: a_off + rank * n_in].reshape((rank, n_in))     # (r, n_in)
        Bm = theta[bb_off: bb_off + n_out * rank].reshape((n_out, rank))  # (n_out, r)
        u = us[i * B * rank: (i + 1) * B * rank].reshape((B, rank))     # (B, r)
        nxt = off + B * n_in
        for b in range(B):
            for k in range(rank):
                u[b, k] = _dot(A[k], h[b], n_in)
            for o in range(n_out):
                z = bflat[b_off + o] + _dot(W[o], h[b], n_in) + _dot(Bm[o], u[b], rank)
                if i < L - 1:
                    hs[nxt + b * n_out + o] = max(z, 0.0) if act == 1 else z
                else:
                    logits[b, o] = z
        if i == L - 1:
            d = x.shape[1]
            N = theta[nw_off: nw_off + n_new * n_in].reshape((n_new, n_in))   # (n_new, n_in)
            s_off = nw_off + n_new * n_in
            S = theta[s_off: s_off + n_new * d].reshape((n_new, d))         # (n_new, d)
            c_off = s_off + n_new * d
            for b in range(B):
                for n in range(n_new):
                    logits[b, k_base + n] = (theta[c_off + n] + _dot(N[n], h[b], n_in)
                                             + _dot(S[n], x[b], d))
        off = nxt
    return logits


@njit(cache=True, nogil=True, fastmath=_FM)
def _loss_grad_logits(logits, y, t_logits, kd_weight, temperature, g):
    # logits (B, K), y (B,) int, t_logits (B, Kp) -> mean loss (f64); g (B, K) = dloss/dlogits.
    B, K = logits.shape
    kp = t_logits.shape[1]
    loss = 0.0
    inv_b = 1.0 / B
    for b in range(B):
        top = logits[b, 0]
        for c in range(1, K):
            top = max(top, logits[b, c])
        s = 0.0
        for c in range(K):
            g[b, c] = np.exp(logits[b, c] - top)
            s += g[b, c]
        loss += np.log(s) + top - logits[b, y[b]]
        for c in range(K):
            g[b, c] = g[b, c] / s * inv_b
        g[b, y[b]] -= inv_b
        if kp == 0 or kd_weight == 0.0:
            continue
        # KL(q || p) over the teacher's classes, both at temperature T.
        tq = t_logits[b, 0] / temperature
        ts = logits[b, 0] / temperature
        for c in range(1, kp):
            tq = max(tq, t_logits[b, c] / temperature)
            ts = max(ts, logits[b, c] / temperature)
        sq = 0.0
        ss = 0.0
        for c in range(kp):
            sq += np.exp(t_logits[b, c] / temperature - tq)
            ss += np.exp(logits[b, c] / temperature - ts)
        lq = np.log(sq) + tq
        ls = np.log(ss) + ts
        kl = 0.0
        for c in range(kp):
            log_q = t_logits[b, c] / temperature - lq
            log_p = logits[b, c] / temperature - ls
            q = np.exp(log_q)
            kl += q * (log_q - log_p)
            g[b, c] += kd_weight * temperature * (np.exp(log_p) - q) * inv_b
        loss += kd_weight * temperature * temperature * kl
    return loss * inv_b


@njit(cache=True, nogil=True, fastmath=_FM)
def loss_and_grad(x, y, t_logits, layout, rank, n_new, nw_off, act, wflat, bflat, theta,
                  kd_weight, temperature, grad):
    """Mean loss (f64) of the mini-batch; grad (P,) is overwritten with dloss/dtheta.

    x (B, d), y (B,) int64 in [0, K), t_logits (B, Kp) teacher logits (Kp <= K; Kp = 0
    turns distillation off), theta/grad (P,) same float dtype as x.
    """
    B = x.shape[0]
    L = layout.shape[0]
    tot = 0
    for i in range(L):
        tot += B * layout[i, 0]
    hs = np.empty(tot, dtype=theta.dtype)                 # every layer's input
    us = np.empty(L * B * rank, dtype=theta.dtype)        # every layer's h @ A.T
    logits = forward(x, layout, rank, n_new, nw_off, act, wflat, bflat, theta, hs, us)
    g = np.empty_like(logits)                             # (B, K)
    loss = _loss_grad_logits(logits, y, t_logits, kd_weight, temperature, g)
    grad[:] = 0.0
    k_base = layout[L - 1, 1]
    gz = np.empty((B, k_base), dtype=theta.dtype)         # dloss/dz of the current layer
    for b in range(B):
        for o in range(k_base):
            gz[b, o] = g[b, o]
    off = tot
    for i in range(L - 1, -1, -1):
        n_in, n_out, w_off, a_off, bb_off = (layout[i, 0], layout[i, 1], layout[i, 2],
                                             layout[i, 4], layout[i, 5])
        off -= B * n_in
        h = hs[off: off + B * n_in].reshape((B, n_in))                   # (B, n_in)
        W = wflat[w_off: w_off + n_out * n_in].reshape((n_out, n_in))    # (n_out, n_in)
        A = theta[a_off: a_off + rank * n_in].reshape((rank, n_in))      # (r, n_in)
        Bm = theta[bb_off: bb_off + n_out * rank].reshape((n_out, rank))  # (n_out, r)
        u = us[i * B * rank: (i + 1) * B * rank].reshape((B, rank))      # (B, r)
        dA = grad[a_off: a_off + rank * n_in].reshape((rank, n_in))
        dB = grad[bb_off: bb_off + n_out * rank].reshape((n_out, rank))
        gu = np.zeros((B, rank), dtype=theta.dtype)                      # (B, r)
        below = i > 0                          # the gradient goes on to the layer below
        gh = np.zeros((B, n_in if below else 0), dtype=theta.dtype)      # (B, n_in)
        for b in range(B):
            for o in range(n_out):
                go = gz[b, o]
                if go != 0.0:
                    _axpy(go, u[b], dB[o], rank)
                    _axpy(go, Bm[o], gu[b], rank)
                    if below:
                        _axpy(go, W[o], gh[b], n_in)
            for k in range(rank):
                _axpy(gu[b, k], h[b], dA[k], n_in)
        last = i == L - 1
        if last and n_new > 0:
            d = x.shape[1]
            N = theta[nw_off: nw_off + n_new * n_in].reshape((n_new, n_in))
            dN = grad[nw_off: nw_off + n_new * n_in].reshape((n_new, n_in))
            s_off = nw_off + n_new * n_in
            dS = grad[s_off: s_off + n_new * d].reshape((n_new, d))
            c_off = s_off + n_new * d
            for b in range(B):
                for n in range(n_new):
                    gn = g[b, k_base + n]
                    _axpy(gn, h[b], dN[n], n_in)
                    _axpy(gn, x[b], dS[n], d)
                    grad[c_off + n] += gn
        if not below:
            break
        for b in range(B):
            for k in range(rank):
                _axpy(gu[b, k], A[k], gh[b], n_in)
            if last:
                for n in range(n_new):
                    _axpy(g[b, k_base + n], N[n], gh[b], n_in)
            if act == 1:                       # h = relu(z): dz = dh where z > 0
                for j in range(n_in):
                    if h[b, j] <= 0.0:
                        gh[b, j] = 0.0
        gz = gh
    return loss


@njit(cache=True, nogil=True, fastmath=_FM)
def adam_step(theta, grad, m, v, step, lr, beta1, beta2, eps, max_norm):
    """One Adam update of theta (P,) in place after clipping grad (P,) to a global L2 norm
    of ``max_norm`` (<= 0: no clipping); m, v (P,) moments; step >= 1 counts updates.
    Returns the gradient norm before clipping (f64). Same arithmetic as torch's
    ``clip_grad_norm_`` (coef = max_norm / (norm + 1e-6), at most 1) + ``Adam``.
    """
    P = theta.shape[0]
    sq = 0.0
    for p in range(P):
        sq += np.float64(grad[p]) * grad[p]
    norm = np.sqrt(sq)
    coef = 1.0
    if max_norm > 0.0:
        coef = min(max_norm / (norm + 1e-6), 1.0)
    step_size = lr / (1.0 - beta1 ** step)
    bc2_sqrt = np.sqrt(1.0 - beta2 ** step)
    for p in range(P):
        gp = grad[p] * coef
        m[p] = beta1 * m[p] + (1.0 - beta1) * gp
        v[p] = beta2 * v[p] + (1.0 - beta2) * gp * gp
        theta[p] -= step_size * m[p] / (np.sqrt(v[p]) / bc2_sqrt + eps)
    return norm


@njit(cache=True, nogil=True)
def train_step(x, y, t_logits, layout, rank, n_new, nw_off, act, wflat, bflat, theta,
               kd_weight, temperature, grad, m, v, step, lr, beta1, beta2, eps, max_norm):
    """`loss_and_grad` then `adam_step`: one mini-batch of training. Returns the loss
    before the update (f64)."""
    loss = loss_and_grad(x, y, t_logits, layout, rank, n_new, nw_off, act, wflat, bflat,
                         theta, kd_weight, temperature, grad)
    adam_step(theta, grad, m, v, step, lr, beta1, beta2, eps, max_norm)
    return loss


def warmup() -> None:
    """Compile the float32 signatures the runtime uses (see agent.warmup)."""
    from agent.head import Head
    from agent.sleep.adapters import AdaptedHead

    rng = np.random.default_rng(0)
    head = Head([rng.standard_normal((3, 4)).astype(np.float32),
                 rng.standard_normal((2, 3)).astype(np.float32)],
                [np.zeros(3, np.float32), np.zeros(2, np.float32)])
    ad = AdaptedHead.fresh(head, rank=2, seed=0).with_classes(3)
    p = ad.pack()
    x = rng.standard_normal((2, 4)).astype(np.float32)                 # (B, d)
    y = np.array([0, 2], dtype=np.int64)
    t = rng.standard_normal((2, 2)).astype(np.float32)                 # (B, Kp)
    theta = p.theta.copy()
    grad, m, v = (np.zeros_like(theta) for _ in range(3))
    train_step(x, y, t, p.layout, p.rank, p.n_new, p.nw_off, p.act, p.wflat, p.bflat, theta,
               1.0, 2.0, grad, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 1.0)
