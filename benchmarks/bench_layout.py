"""Why per-series vectors are tuples of scalars: one GD step on a quadratic loss, vmapped.

Run:  python benchmarks/bench_layout.py [--series 100000]

The same ``vmap(grad(loss))`` step (10 unrolled per compiled call) with the parameters as one
(B, 3) tensor and the Hessian as (B, 3, 3), against 3 and 9 contiguous (B,) tensors; plus the
hand-written batched step as a reference.
"""

import argparse
import os
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch
from torch.func import grad, vmap

K = 3


def loss_tensor(p, q, r, s):
    quad = sum(p[i] * q[i, j] * p[j] for i in range(K) for j in range(K))
    return quad - 2 * sum(p[j] * r[j] for j in range(K)) + s


def loss_tuple(p, q, r, s):
    quad = sum(p[i] * q[i * K + j] * p[j] for i in range(K) for j in range(K))
    return quad - 2 * sum(p[j] * r[j] for j in range(K)) + s


def steps_tensor(p, q, r, s, frozen, lr):
    for _ in range(10):
        p = torch.where(frozen, p, p - lr * grad(loss_tensor)(p, q, r, s))
    return p


def steps_tuple(p, q, r, s, frozen, lr):
    for _ in range(10):
        g = grad(loss_tuple)(p, q, r, s)
        p = tuple(torch.where(frozen, pi, pi - lr * gi) for pi, gi in zip(p, g))
    return p


def steps_by_hand(p, q, r, s, frozen, lr):
    p = list(p)
    for _ in range(10):
        g = [2 * sum(q[i * K + j] * p[j] for j in range(K)) - 2 * r[i] for i in range(K)]
        p = [torch.where(frozen, p[i], p[i] - lr * g[i]) for i in range(K)]
    return tuple(p)


def per_step_ms(fn, *args, calls=100):
    fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls / 10 * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=100_000)
    batch = parser.parse_args().series
    q = torch.rand(batch, K, K)
    q = q @ q.transpose(1, 2)
    r, s, p = torch.rand(batch, K), torch.rand(batch), torch.zeros(batch, K)
    frozen, lr = torch.zeros(batch, dtype=torch.bool), torch.tensor(1e-3)
    columns = tuple(p.T.contiguous())
    q_columns = tuple(q.reshape(batch, K * K).T.contiguous())
    r_columns = tuple(r.T.contiguous())
    dims = (0, 0, 0, 0, 0, None)
    tensor_ms = per_step_ms(torch.compile(vmap(steps_tensor, in_dims=dims), dynamic=True),
                            p, q, r, s, frozen, lr)
    tuple_ms = per_step_ms(torch.compile(vmap(steps_tuple, in_dims=dims), dynamic=True),
                           columns, q_columns, r_columns, s, frozen, lr)
    hand_ms = per_step_ms(torch.compile(steps_by_hand, dynamic=True),
                          columns, q_columns, r_columns, s, frozen, lr)
    print(f"{batch:,} series, ms per GD step (compiled, 10 steps per call):")
    print(f"  vmap(grad), (B, 3) and (B, 3, 3) tensors : {tensor_ms:.3f}")
    print(f"  vmap(grad), tuples of (B,) tensors       : {tuple_ms:.3f}  "
          f"({tensor_ms / tuple_ms:.1f}x faster)")
    print(f"  hand-written batched step (reference)    : {hand_ms:.3f}")


if __name__ == "__main__":
    main()
