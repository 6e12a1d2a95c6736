"""handson.exercise_checks.kv_cache: each check passes on a correct cache and names the mistake of a wrong one."""

from __future__ import annotations

import pytest
import torch

from handson.exercise_checks import kv_cache as xc
from handson.nn.decoder import GPT, generate
from handson.nn.kv_cache import KVCache, generate_cached


class Ring:
    """A correct ring-buffer cache."""

    def __init__(self, n_layers, batch_size, n_kv_head, window, head_dim, *, dtype=None, device=None):
        shape = (n_layers, batch_size, n_kv_head, window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype or torch.get_default_dtype(), device=device)
        self.v = torch.zeros_like(self.k)
        self.window, self.pos = window, 0

    def update(self, layer, k, v):
        T = k.size(-2)
        if T > 1 and self.pos + T > self.window:
            raise ValueError("the chunk does not fit in the window")
        slots = torch.arange(self.pos, self.pos + T, device=self.k.device) % self.window
        self.k[layer, :, :, slots] = k
        self.v[layer, :, :, slots] = v
        n = min(self.pos + T, self.window)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def advance(self, n):
        self.pos += n

    def __len__(self):
        return self.pos

    def reset(self):
        self.pos = 0


class Croppable(KVCache):
    def crop(self, n):
        if not 0 <= n <= self.pos:
            raise ValueError(n)
        self.pos = n


def tiny(positions="rope", seed=0):
    torch.manual_seed(seed)
    model = GPT(23, 24, 16, 4, 2, 32, n_kv_head=2, positions=positions).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
    return model


def maker(model, cls=KVCache, size=None):
    attn = model.blocks[0].self_attn
    return lambda B: cls(len(model.blocks), B, attn.n_kv_head, size or model.max_len, attn.head_dim,
                         dtype=torch.float64)


def test_cache_checks_pass_and_catch_mistakes():
    xc.check_cache_update(KVCache)
    xc.check_cache_limits(KVCache)

    class OnlyNew(KVCache):
        def update(self, layer, k, v):
            super().update(layer, k, v)
            return k, v

    class Twice(KVCache):
        def advance(self, n):
            super().advance(2 * n)

    class NoReset(KVCache):
        def reset(self):
            pass

    class Vague(KVCache):
        def _check_room(self, n):
            if self.pos + n > self.max_len:
                raise ValueError("full")

    with pytest.raises(AssertionError, match="only the"):
        xc.check_cache_update(OnlyNew)
    with pytest.raises(AssertionError, match="advanced twice"):
        xc.check_cache_update(Twice)
    with pytest.raises(AssertionError, match="reset"):
        xc.check_cache_update(NoReset)
    with pytest.raises(AssertionError, match="names the limit"):
        xc.check_cache_limits(Vague)
    assert xc.cache_bytes(KVCache(2, 3, 4, 5, 6, dtype=torch.float16)) == xc.expected_bytes(2, 3, 4, 5, 6, torch.float16)


def test_model_checks():
    m = tiny()
    idx = torch.randint(0, 23, (2, 8))
    xc.check_cached_logits(maker(m), m, idx, [3, 1, 4])
    xc.check_crop(maker(m, Croppable), m, idx, 6, 3)
    xc.check_ring_logits(maker(m, Ring, size=3), m, idx, 3, 2)

    class NoOffset(KVCache):
        def __len__(self):
            return 0

    with pytest.raises(AssertionError, match="did not move"):
        xc.check_cached_logits(maker(m, NoOffset), m, idx, [3, 1, 4], reset_and_repeat=False)


def test_generation_checks():
    m = tiny("learned")
    prompt = torch.randint(0, 23, (2, 3))
    xc.check_generate_cached(generate_cached, generate, m, prompt, 4, temperature=0)
    xc.check_generate_cached(generate_cached, generate, m, prompt, 4, temperature=1.5, top_k=3)
    xc.check_projects_only_new(generate_cached, m, prompt, 4, temperature=0)
    no_cache = lambda model, idx, n, **kw: generate(model, idx, n, **kw)           # noqa: E731
    with pytest.raises(AssertionError, match="re-feeds the whole sequence"):
        xc.check_projects_only_new(no_cache, m, prompt, 4, temperature=0)
    greedy = lambda model, idx, n, generator=None, **kw: generate(model, idx, n, temperature=0)  # noqa: E731
    with pytest.raises(AssertionError, match="multinomial"):
        xc.check_generate_cached(greedy, generate, m, prompt, 6, temperature=2.0)


def test_ring_and_batch_checks():
    xc.check_ring_update(Ring)
    xc.check_ring_memory(Ring)

    class Capped(Ring):
        def __len__(self):
            return min(self.pos, self.window)

    with pytest.raises(AssertionError, match="every token seen"):
        xc.check_ring_update(Capped)

    m = tiny("learned", seed=1)
    prompts = [torch.randint(1, 23, (n,)) for n in (4, 2, 1)]

    def batch(model, ps, n, pad_id=0, positions=True):
        lens = [len(p) for p in ps]
        P = max(lens)
        pad = torch.tensor([P - k for k in lens])
        idx = torch.stack([torch.cat([torch.full((P - len(p),), pad_id), p]) for p in ps])
        keys = torch.arange(P)[None] >= pad[:, None]
        pos = (torch.arange(P)[None] - pad[:, None]).clamp(min=0)
        cache = KVCache(2, len(ps), 2, P + n, 4, dtype=torch.float64)
        out = []
        with torch.no_grad():
            logits = model(idx, cache, attn_mask=keys[:, None, None], positions=pos if positions else None)[:, -1]
            for step in range(n):
                out.append(logits.argmax(-1, keepdim=True))
                keys = torch.cat([keys, torch.ones(len(ps), 1, dtype=torch.bool)], 1)
                pos = pos[:, -1:] + 1
                if step < n - 1:
                    logits = model(out[-1], cache, attn_mask=keys[:, None, None],
                                   positions=pos if positions else None)[:, -1]
        new = torch.cat(out, 1)
        return [torch.cat([p, new[b]]) for b, p in enumerate(ps)]

    xc.check_generate_batch(batch, generate, m, prompts, 3, pad_id=5)
    with pytest.raises(AssertionError, match="first real token"):
        xc.check_generate_batch(lambda *a, **k: batch(*a, **k, positions=False), generate, m, prompts, 5)
