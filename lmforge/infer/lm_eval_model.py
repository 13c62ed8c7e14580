"""An lmforge model as an lm-evaluation-harness `LM`, so lm-eval's own tasks and metrics judge it.

Imports lm-eval at module level: only `lmforge.infer.lm_eval_tasks` imports this module, after it
has checked that the `eval` extra is installed.

What it mirrors from lm-eval's `hf` backend, so the two give the same numbers on the same weights:
the tokenizer's BOS rule on every encoded text (infer/bos.py decides it, as `generate` does), BOS
(else EOS) as the context of an empty-context request, inputs left-truncated to the model's
maximum positions, requests sorted longest first and batched (lm-eval's Collator), one-token
continuations that share a context scored once, log-softmax in float32, rolling windows from
lm-eval's own helper. Generation is greedy (or sampled with a seeded CPU generator) with the KV
cache, one batch per run of equal-length prompts so no padding mask is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from lmforge.infer.generate import _new_cache, sample_next


class LmforgeLM(TemplateLM):
    """model: a plain lmforge Transformer (or anything callable like one) in eval mode;
    tokenizer: an lmforge tokenizer; bos: put BOS before each text (use_bos's answer)."""

    backend = "causal"

    def __init__(
        self, model, tokenizer, bos: bool, batch_size: int = 1, max_length: int | None = None, seed=1234
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.bos = bool(bos and tokenizer.bos_id is not None)
        self.batch_size = max(1, int(batch_size))
        cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
        self._max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048))
        self.seed = seed
        self._bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None
        self._special = {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None}

    # -- what lm-eval asks of a model ----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", "lmforge"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw):
        ids = self.tokenizer.encode(string)
        add = self.bos if add_special_tokens is None else (self.bos and add_special_tokens)
        if add_special_tokens is None and has_bos_prefix(string, self._bos_text):
            add = False  # the text already starts with BOS (a chat template wrote it)
        if add:
            ids = [self.tokenizer.bos_id, *ids]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in self._special])

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """[B, T, V] float32 log-probabilities of right-padded rows (causal: padding after a row's
        tokens changes nothing before it)."""
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        logits = self.model(batch.to(self.device)).logits
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(
            requests, sort_fn=longest_first, group_by="contexts", group_fn=lambda req: req[-2] + req[-1][:-1]
        )
        results = []
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            logprobs = self._logprobs(rows)
            for (request, ctx, cont), row, row_lp in zip(chunk, rows, logprobs):
                cont_lp = row_lp[len(row) - len(cont) : len(row)].unsqueeze(0)  # [1, cont, V]
                greedy = cont_lp.argmax(dim=-1)
                # Requests that share this context and differ only in a one-token continuation
                # reuse these log-probabilities (lm-eval's Collator yields each of them here).
                shared = order.get_cache(req_str=request, cxt_toks=ctx, cont_toks=cont, logits=cont_lp)
                for key, cont_toks, lp in shared:
                    want = torch.tensor(cont_toks, dtype=torch.long, device=lp.device).unsqueeze(0)
                    is_greedy = bool((greedy[:, -want.shape[1] :] == want).all())
                    score = float(torch.gather(lp, 2, want.unsqueeze(-1)).sum())
                    results.append((score, is_greedy))
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, (score, is_greedy))
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            pieces = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, pieces):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores):
            totals[owner] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
            group_by="gen_kwargs",
            group_fn=lambda req: req[1],
        )
        eos_text = self.tokenizer.decode([self.eot_token_id])
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks {max_new} must be below the model's {self.max_length} positions"
                )
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            texts = self._generate(
                prompts, max_new, until, temperature, kwargs.get("top_k"), kwargs.get("top_p")
            )
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
                text = postprocess_generated_text(text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return order.get_original(results)

    # -- batched generation --------------------------------------------------------------------
    def _generate(self, prompts, max_new, until, temperature, top_k, top_p) -> list[str]:
        """Continuations of `prompts` in order; equal-length prompts share one cached batch."""
        out: list[str | None] = [None] * len(prompts)
        runs: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            runs.setdefault(len(p), []).append(i)
        for members in runs.values():
            texts = self._generate_run(
                [prompts[i] for i in members], max_new, until, temperature, top_k, top_p
            )
            for i, text in zip(members, texts):
                out[i] = text
        return out

    @torch.no_grad()
    def _generate_run(self, prompts, max_new, until, temperature, top_k, top_p) -> list[str]:
        gen = torch.Generator().manual_seed(self.seed)
        length = len(prompts[0])
        cache = _new_cache(self.model, length + max_new)
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=cache, start_pos=0).logits[:, -1]
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(max_new):
            tokens = [sample_next(row, temperature, top_k, top_p, gen) for row in logits]
            for i, tok in enumerate(tokens):
                if done[i]:
                    continue
                if tok == self.eot_token_id:
                    done[i] = True
                    continue
                new[i].append(tok)
                text = self.tok_decode(new[i])
                done[i] = any(s and s in text for s in until)
            if all(done) or step + 1 == max_new:
                break
            step_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
            logits = self.model(step_ids, kv_cache=cache, start_pos=length + step).logits[:, -1]
        return [self.tok_decode(n) for n in new]
