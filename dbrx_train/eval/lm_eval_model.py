"""lm-eval-harness over our model: lm-eval's LM interface (loglikelihood, loglikelihood_rolling,
generate_until) on a DbrxForCausalLM, batched, with the KV cache for generation, on CPU or GPU.

Needs the `[eval]` extra (`pip install -e '.[eval]'`). Requests are encoded exactly as lm-eval's own
`hf` model encodes them (TemplateLM's pair encoding: trailing context spaces move to the
continuation, the pair is encoded whole and split; an empty context is the end-of-text token), and
scored as it scores them (the last max_length + 1 tokens, log-softmax of the continuation's positions,
greedy = every token the argmax), so our model and lm-eval's `hf` model loading our exported folder
give the same numbers (docs/eval.md: parity figures). Only the continuation's positions go through
the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences
from tqdm import tqdm

from dbrx_train.data.tokenizer import DbrxTokenizer, load_tokenizer
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.generate import SamplingConfig, generate

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's `hf` default for generate_until


class DbrxLM(TemplateLM):
    def __init__(
        self,
        model: DbrxForCausalLM,
        tokenizer: DbrxTokenizer | None = None,
        batch_size: int = 8,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    ):
        super().__init__()
        self.model = model.eval()
        self.tokenizer_ = tokenizer or load_tokenizer()
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.model_device = model.lm_head.weight.device

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, inputs: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Right-padded batch; logits only where a continuation token is predicted."""
        longest = max(map(len, inputs))
        widest = max(map(len, continuations))
        ids_BT = torch.zeros((len(inputs), longest), dtype=torch.long)
        positions_BC = torch.zeros((len(inputs), widest), dtype=torch.long)
        for b, (inp, cont) in enumerate(zip(inputs, continuations, strict=True)):
            ids_BT[b, : len(inp)] = torch.tensor(inp)
            first = len(inp) - len(cont)
            positions_BC[b] = torch.arange(first, first + widest).clamp(max=len(inp) - 1)
        logits_BCV = self.model(
            ids_BT.to(self.model_device), logits_positions=positions_BC.to(self.model_device)
        ).logits
        logprobs_BCV = F.log_softmax(logits_BCV.float(), dim=-1)
        results = []
        for b, cont in enumerate(continuations):
            logprobs_CV = logprobs_BCV[b, : len(cont)]
            targets_C = torch.tensor(cont, device=logprobs_CV.device)
            greedy = bool((logprobs_CV.argmax(dim=-1) == targets_C).all())
            results.append((float(logprobs_CV.gather(1, targets_C[:, None]).sum()), greedy))
        return results

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        # Longest first, as lm-eval's `hf`, so each batch pads little; results go back in request order.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = order[start : start + self.batch_size]
            inputs, continuations = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
                continuations.append(continuation)
            for i, result in zip(chunk, self._score(inputs, continuations), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-likelihood over disjoint max_length windows (as lm-eval's `hf`)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, *window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation with the KV cache, batched by identical generation arguments, cut at the
        first stop string (lm-eval's `until`, plus end-of-text)."""
        eos = self.tok_decode([self.eot_token_id])
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0.0:
                raise ValueError(f"generate_until: only greedy decoding is supported; got {kwargs}")
            max_new = min(max_new, self.max_length - 1)
            for start in tqdm(
                range(0, len(indices), self.batch_size), disable=disable_tqdm, desc="generate_until"
            ):
                chunk = indices[start : start + self.batch_size]
                prompts = [
                    self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in chunk
                ]
                prompts = [p or [self.prefix_token_id] for p in prompts]

                def finished(new_ids: list[int], until: list[str] = until) -> bool:
                    text = self.tok_decode(new_ids)
                    return any(stop in text for stop in until)

                cfg = SamplingConfig(
                    max_new_tokens=max_new, temperature=0.0, eos_token_ids=(self.eot_token_id,)
                )
                with torch.no_grad():
                    new_ids = generate(self.model, prompts, cfg, finished=finished)
                for i, ids in zip(chunk, new_ids, strict=True):
                    text = self.tok_decode(ids)
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[i] = text
        return outputs  # type: ignore[return-value]
