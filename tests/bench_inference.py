"""`make bench`, part 1: what Part III promises, measured side by side in one run on this machine.

Each figure is a ratio of two measurements taken in the same run, next to its goal:

- KV-cache decoding vs recomputing the whole prefix, a 4-layer GPT at two widths generating 512
  tokens (float32);
- tiled (FlashAttention-style) vs naive attention at L = 4096: peak memory of the tensors the
  computation creates, and time;
- multi-head latent attention at a 4096-token context: one decode step from the latent cache, absorbed
  vs decompressing every cached latent into per-head keys and values (time), and the cache bytes;
- the library's ``attention``: ``need_weights=False`` vs ``F.scaled_dot_product_attention``, and the
  weight-returning path vs SDPA's math backend at L = 1024.

It prints a table and writes it, with the raw numbers, to ``_build/bench/inference.{md,json}``.
Nothing here is asserted: a loaded machine cannot make a test fail; a goal not met is reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "bench"


def seconds(fn, repeat: int = 7, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode that are alive at the same time.

    Every tensor an operator returns is counted once per storage, from its creation until the last
    Python reference to it goes (a weakref finaliser): the working memory of the computation, not
    counting the inputs it was given.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _free(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if ptr in self.live:
                    self.live[ptr][1] += 1
                else:
                    self.live[ptr] = [nbytes, 1]
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._free, ptr)
        return out


def peak_bytes(fn) -> int:
    with torch.no_grad(), PeakMemory() as mode:
        result = fn()
        del result
    return mode.peak


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- 1. KV cache ---------------------------------------------------------------------------------

def bench_kv_cache() -> list[dict]:
    """Two widths of a 4-layer GPT: a cached step costs about the same fixed eager overhead at both
    (a few hundred small operators), a recomputed step grows with the width, so the ratio does too."""
    from handson.nn.decoder import GPT, generate
    from handson.nn.kv_cache import generate_cached

    rows = []
    new_tokens, prompt_len = 512, 32
    for d_model in (256, 512):
        torch.manual_seed(0)
        model = GPT(vocab_size=256, max_len=prompt_len + new_tokens, d_model=d_model, n_head=8,
                    n_layers=4, d_ff=4 * d_model).eval()
        idx = torch.randint(0, 256, (1, prompt_len))
        with torch.no_grad():
            t0 = time.perf_counter()
            full = generate(model, idx, new_tokens, temperature=0)
            t_full = time.perf_counter() - t0
            t0 = time.perf_counter()
            cached = generate_cached(model, idx, new_tokens, temperature=0)
            t_cached = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({
            "name": f"KV cache: GPT d_model={d_model}, 4 layers ({n_params / 1e6:.1f}M parameters), "
                    f"512 new tokens after 32, cached vs full recompute (float32)",
            "baseline_s": t_full, "candidate_s": t_cached, "ratio": t_full / t_cached,
            "goal": ">= 10x faster", "met": t_full / t_cached >= 10,
            "same_tokens": bool(torch.equal(full, cached)),
            "shown": f"{t_full:.2f} s vs {t_cached:.2f} s ({t_full / new_tokens * 1e3:.1f} vs "
                     f"{t_cached / new_tokens * 1e3:.2f} ms per token)"})
    return rows


# --- 2. tiled attention --------------------------------------------------------------------------

def bench_tiled() -> list[dict]:
    from handson.nn import attention
    from handson.nn.acceleration import tiled_attention

    torch.manual_seed(0)
    L, d = 4096, 64
    q, k, v = (torch.randn(1, 1, L, d) for _ in range(3))
    naive = lambda: attention(q, k, v, is_causal=True)  # noqa: E731  the (L, L) weights are built
    tiled = lambda: tiled_attention(q, k, v, block_q=128, block_k=128, causal=True)  # noqa: E731
    with torch.no_grad():
        diff = (naive()[0] - tiled()[0]).abs().max().item()
    m_naive, m_tiled = peak_bytes(naive), peak_bytes(tiled)
    with torch.no_grad():
        t_naive, t_tiled = seconds(naive, repeat=3, warmup=1), seconds(tiled, repeat=3, warmup=1)
    return [
        {"name": "tiled vs naive attention, L = 4096, causal: peak working memory",
         "baseline_bytes": m_naive, "candidate_bytes": m_tiled, "ratio": m_naive / m_tiled,
         "goal": ">= 10x less", "met": m_naive / m_tiled >= 10, "max_abs_diff": diff,
         "shown": f"{_mib(m_naive)} vs {_mib(m_tiled)}"},
        {"name": "tiled vs naive attention, L = 4096, causal: time (tiled is Python loops)",
         "baseline_s": t_naive, "candidate_s": t_tiled, "ratio": t_naive / t_tiled, "goal": "(measured)",
         "met": None, "shown": f"{t_naive * 1e3:.0f} ms vs {t_tiled * 1e3:.0f} ms"},
    ]


# --- 3. multi-head latent attention ----------------------------------------------------------------

def bench_mla() -> list[dict]:
    from handson.nn import merge_heads
    from handson.nn.multi_latent_attention import MultiHeadLatentAttention, mla_cache_elements

    torch.manual_seed(0)
    S, n_head, d_head, d_rope, d_c = 4096, 16, 64, 32, 256
    m = MultiHeadLatentAttention(d_model=1024, n_head=n_head, d_head=d_head, d_rope=d_rope, d_c=d_c,
                                 d_c_q=384).eval()
    x = torch.randn(1, 1, 1024)
    c_kv, k_r = torch.randn(1, S, d_c), torch.randn(1, S, d_rope)
    everything = torch.ones(1, 1, 1, S, dtype=torch.bool)   # the last position may attend every key

    def decode(attend):
        """One decode step for the last position, from the cached latents, with the chapter's forms."""
        q_c, q_r = m.queries(x, offset=S - 1)
        out, _ = attend(q_c, q_r, c_kv, k_r, everything)
        return m.o(merge_heads(out))

    with torch.no_grad():
        naive = lambda: decode(m.attend_naive)  # noqa: E731  every cached latent decompressed per head
        absorbed = lambda: decode(m.attend_absorbed)  # noqa: E731  from the latents alone
        diff = (naive() - absorbed()).abs().max().item()
        t_naive, t_abs = seconds(naive), seconds(absorbed)
    per_token_mla = mla_cache_elements(d_c, d_rope)
    per_token_mha = 2 * n_head * d_head
    return [
        {"name": "MLA decode step at a 4096-token context: absorbed vs decompressing the latents",
         "baseline_s": t_naive, "candidate_s": t_abs, "ratio": t_naive / t_abs, "goal": "(measured)",
         "met": None, "max_abs_diff": diff, "shown": f"{t_naive * 1e3:.1f} ms vs {t_abs * 1e3:.2f} ms"},
        {"name": "MLA cache at 4096 tokens (float32, one layer): latent vs per-head K and V",
         "baseline_bytes": per_token_mha * S * 4, "candidate_bytes": per_token_mla * S * 4,
         "ratio": per_token_mha / per_token_mla, "goal": "(n_h d_h 2 / (d_c + d_rope))", "met": None,
         "shown": f"{_mib(per_token_mha * S * 4)} vs {_mib(per_token_mla * S * 4)}"},
    ]


# --- 4. the library's attention --------------------------------------------------------------------

def bench_attention() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from handson.nn import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1024, 64) for _ in range(3))
    with torch.no_grad():
        t_lib = seconds(lambda: attention(q, k, v, is_causal=True, need_weights=False))
        t_sdpa = seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t_lib_w = seconds(lambda: attention(q, k, v, is_causal=True))

        def math_backend():
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t_math = seconds(math_backend)
    return [
        {"name": "attention(need_weights=False) vs F.scaled_dot_product_attention, L = 1024",
         "baseline_s": t_sdpa, "candidate_s": t_lib, "ratio": t_lib / t_sdpa, "goal": "within 1.1x",
         "met": t_lib / t_sdpa <= 1.1, "shown": f"{t_lib * 1e3:.1f} ms vs {t_sdpa * 1e3:.1f} ms"},
        {"name": "attention(need_weights=True) vs SDPA's math backend, L = 1024",
         "baseline_s": t_math, "candidate_s": t_lib_w, "ratio": t_lib_w / t_math, "goal": "within 1.5x",
         "met": t_lib_w / t_math <= 1.5, "shown": f"{t_lib_w * 1e3:.1f} ms vs {t_math * 1e3:.1f} ms"},
    ]


def main() -> int:
    machine = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(),
               "processor": platform.processor() or platform.machine()}
    print(f"machine: {machine['cores']} cores, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"Python {machine['python']}", flush=True)
    rows: list[dict] = []
    for bench in (bench_kv_cache, bench_tiled, bench_mla, bench_attention):
        try:
            got = bench()
        except Exception as e:  # a chapter's module missing or broken: report it, measure the rest
            got = {"name": bench.__name__, "error": f"{type(e).__name__}: {e}"}
        for row in got if isinstance(got, list) else [got]:
            rows.append(row)
            if "error" in row:
                print(f"  {row['name']}: could not run ({row['error']})", flush=True)
                continue
            verdict = {True: "goal met", False: "goal NOT met", None: ""}[row["met"]]
            print(f"  {row['name']}\n      {row['shown']}   ratio {row['ratio']:.1f}   goal {row['goal']}"
                  f"   {verdict}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "inference.json").write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    lines = [f"machine: {machine['cores']} cores, torch {machine['torch']}", "",
             "| measurement | measured | ratio | goal | met |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | |")
        else:
            met = {True: "yes", False: "no", None: ""}[r["met"]]
            lines.append(f"| {r['name']} | {r['shown']} | {r['ratio']:.1f} | {r['goal']} | {met} |")
    (OUT / "inference.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'inference.md'} and {OUT / 'inference.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
