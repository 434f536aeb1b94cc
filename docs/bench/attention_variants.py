"""CPU attention at finetune-bench's longest step, forward and backward, four ways with the same result: what the
shared-prefix training pass runs (SDPA with an explicit lower-right causal mask: the suffix's queries against the
prefix's and its own keys), the same as a square causal call on zero-padded queries (SDPA's causal kernel, which
skips the upper triangle), plain attention (two matmuls and a softmax, the score matrix kept for backward) and
plain attention over four query blocks (each block against only the keys it may see).

    .venv/bin/python docs/bench/attention_variants.py               # 8 rows, 9 heads, 46 + 466 tokens, head 64
    .venv/bin/python docs/bench/attention_variants.py --suffix 100  # shorter rows
    .venv/bin/python docs/bench/attention_variants.py --dtype bf16  # bf16 (a CPU with AVX-512 BF16 / AMX)

Checks every variant against the first computed in fp32 (outputs and gradients to 1e-5 in fp32; in bf16 to 2%
of each tensor's norm), then times them alternating, three rounds of three forward + backward each; run it alone.
"""

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--prefix", type=int, default=46)
    p.add_argument("--suffix", type=int, default=466)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = p.parse_args()
    if min(a.rows, a.heads, a.suffix, a.head_dim) < 1 or a.prefix < 0:
        p.error("--rows, --heads, --suffix and --head-dim must be at least 1, --prefix at least 0")
    B, H, P, S, D = a.rows, a.heads, a.prefix, a.suffix, a.head_dim
    L = P + S
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    q32, k32, v32, grad32 = (torch.randn(B, H, n, D) for n in (S, L, L, S))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q32, k32, v32))
    grad = grad32.to(dtype)
    mask = torch.ones(S, L, dtype=torch.bool).tril(diagonal=P)[None, None].expand(B, 1, S, L)

    def explicit_mask(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def padded_causal(q, k, v):
        full = torch.cat([q.new_zeros(B, H, P, D), q], dim=2)
        return F.scaled_dot_product_attention(full, k, v, is_causal=True)[:, :, P:]

    def plain(q, k, v, blocks=1):
        out, step = [], -(-S // blocks)
        for i in range(0, S, step):
            j = min(i + step, S)
            scores = (q[:, :, i:j] @ k[:, :, :P + j].transpose(-1, -2)) * D**-0.5
            scores = scores.masked_fill(~mask[:, :, i:j, :P + j], float("-inf"))
            out.append(torch.softmax(scores, -1) @ v[:, :, :P + j])
        return torch.cat(out, 2)

    variants = {"SDPA, explicit mask": explicit_mask, "SDPA causal, padded queries": padded_causal,
                "plain": plain, "plain, 4 query blocks": lambda q, k, v: plain(q, k, v, 4)}
    inputs = tuple(t.detach().requires_grad_() for t in (q32, k32, v32))
    out = explicit_mask(*inputs)
    ref = (out, *torch.autograd.grad(out, inputs, grad32))  # the first variant in fp32
    for name, f in variants.items():
        out = f(q, k, v)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        if dtype == torch.float32:
            worst = max((x - y).abs().max().item() for x, y in zip(got, ref))
            print(f"{name}: largest difference to the first {worst:.2e}")
            assert worst < 1e-5, name
        else:
            worst = max(((x.float() - y).norm() / y.norm()).item() for x, y in zip(got, ref))
            print(f"{name}: largest relative difference to the first in fp32 {worst:.2e}")
            assert worst < 2e-2, name
    times = {name: [] for name in variants}
    for _ in range(3):
        for name, f in variants.items():
            start = time.perf_counter()
            for _ in range(3):
                out = f(q, k, v)
                torch.autograd.grad(out, (q, k, v), grad)
            times[name].append((time.perf_counter() - start) / 3 * 1000)
    print(f"[{B}, {H}, {P} + {S}, {D}] {a.dtype}, forward + backward, ms per call (three rounds):")
    for name, ms in times.items():
        print(f"  {name}: {' / '.join(f'{t:.0f}' for t in ms)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
