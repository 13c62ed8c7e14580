"""Autoregressive sampling with the model's KV cache: one prefill pass, then one token per step.

Sampling happens on the CPU with its own `torch.Generator`, so a fixed seed gives the same text
on any device and never touches the global RNG (a trainer calling this for sample generations
keeps its exact-resume guarantees).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.errors import LmforgeError


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p (last dim)."""
    logits = logits.clone()
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token id from a [vocab] logits row; temperature 0 means greedy."""
    logits = logits.detach().float().cpu()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    return getattr(cfg, "max_position_embeddings", None)


def _new_cache(model, max_len: int):
    if hasattr(model, "new_kv_cache"):
        return model.new_kv_cache(max_len)
    from lmforge.model import KVCache

    return KVCache(max_len)  # buffers are allocated on first write with the keys' dtype/device


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    stream: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue `prompt_ids`; returns the NEW token ids (without the prompt), stopping after
    `max_new_tokens`, at `eos_id` (included) or at the model's maximum positions. `stream` is
    called with each new id as soon as it is chosen."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise LmforgeError("generate: the prompt is empty; start it with the tokenizer's BOS token")
    limit = _max_positions(model)
    if limit is not None and len(prompt) >= limit:
        prompt = prompt[-(limit - 1) :]  # keep the most recent context that still leaves room
    total = len(prompt) + max_new_tokens
    if limit is not None:
        total = min(total, limit)
    if total <= len(prompt):
        return []
    param = next(model.parameters())
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    was_training = model.training
    model.eval()
    try:
        cache = _new_cache(model, total)
        ids = torch.tensor([prompt], dtype=torch.long, device=param.device)
        logits = model(ids, kv_cache=cache, start_pos=0).logits[0, -1]
        out: list[int] = []
        pos = len(prompt)
        while True:
            token = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(token)
            if stream is not None:
                stream(token)
            if token == eos_id or pos + 1 >= total:
                return out
            step = torch.tensor([[token]], dtype=torch.long, device=param.device)
            logits = model(step, kv_cache=cache, start_pos=pos).logits[0, -1]
            pos += 1
    finally:
        model.train(was_training)


class TextStreamer:
    """Turns a stream of token ids into printable text pieces.

    Byte-level BPE tokens can split a UTF-8 character, so the decoded text is only emitted up to
    the last complete character (a trailing U+FFFD is held back until the next token)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.write = write
        self.ids: list[int] = []
        self.emitted = 0

    def __call__(self, token: int) -> None:
        if token == self.tokenizer.eos_id:  # the end marker is not text
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        end = len(text.rstrip("\ufffd"))
        if end > self.emitted:
            self.write(text[self.emitted : end])
            self.emitted = end

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.emitted:
            self.write(text[self.emitted :])
        self.emitted = len(text)
        return text


def encode_prompt(tokenizer, text: str, bos: bool = True) -> list[int]:
    """Token ids for a prompt: BOS first when `bos` (infer/bos.py decides), like every training
    document; an empty prompt still starts with one token (BOS, else EOS) to condition on."""
    ids = tokenizer.encode(text) if text else []
    if not bos and ids:
        return ids
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return [start, *ids] if start is not None and (not ids or ids[0] != start) else ids
