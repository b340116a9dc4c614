"""PolicyWithLoss: an HF causal LM whose forward returns PPO losses or token log-probs, never [B,T,V] logits.

Why a wrapper: under FSDP2 the lm_head weight is only unsharded inside a forward of the module that
owns it (DESIGN.md, "integration points"). So the fused loss (``fastrlhf.kernels.fused_ppo_loss``)
and the log-probs (``linear_token_logprobs``) are computed here, from the body's hidden states and
``lm_head.weight``, inside ``forward``; the trainer never touches the head's weight.

Sequence layout used by every mode: ``input_ids [B, P + R]`` = prompts left-padded to ``P`` followed
by responses right-padded to ``R``; ``attention_mask`` marks real tokens of both. The hidden state at
position ``P - 1 + j`` predicts response token ``j``, so ``hidden[:, P-1 : P+R-1]`` lines up with
``labels = input_ids[:, P:]``. Position ids follow the attention mask (left padding is invisible).
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf.algo.policy_loss import get_policy_loss
from fastrlhf.kernels import linear_token_logprobs

from .heads import position_ids_from_mask


# one position-id helper for every model class (kept under its old name here for callers)
positions_from_mask = position_ids_from_mask


def effective_temperature(config, temperature: float) -> float:
    """``temperature`` with the model's own scaling of its logits folded in, so that log-probs from
    ``hidden @ lm_head.T`` match the distribution the model samples from: Cohere multiplies its logits
    by ``logit_scale``, Granite divides them by ``logits_scaling``. Gemma-2/3's tanh soft-capping
    (``final_logit_softcapping``) is not a scaling, and the fused path refuses it rather than compute
    log-probs of a different distribution."""
    if getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{type(config).__name__}.final_logit_softcapping={config.final_logit_softcapping}: logit "
            "soft-capping is not supported by the fused log-prob / PPO path")
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale not in (0, 1):
        temperature = temperature / scale
    divide = getattr(config, "logits_scaling", None)
    if isinstance(divide, (int, float)) and divide not in (0, 1):
        temperature = temperature * divide
    return float(temperature)


class PolicyWithLoss(nn.Module):
    """Wraps ``lm`` (an HF ``*ForCausalLM``). ``shared_critic=True`` adds a value head (3-model PPO).

    Modes of ``forward``:
      - ``"lm"``: the plain HF call (used by the HF rollout for cached decoding).
      - ``"logprobs"``: ``(logprobs [B, R], entropy [B, R], values [B, R] or None)``, fp32.
      - ``"loss"``: ``fused_ppo_loss`` (or the ``policy_loss=`` variant) over the responses
        -> ``(loss, stats, values [B, R] or None)``.
    ``packing=True`` (modes "logprobs" / "loss") runs the forward on packed valid tokens, same outputs.
    """

    supports_packing = True

    def __init__(
        self,
        lm: nn.Module,
        *,
        shared_critic: bool = False,
        temperature: float = 1.0,
        backend: str = "auto",
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.temperature = effective_temperature(lm.config, float(temperature))
        self.backend = backend
        self.chunk_size = chunk_size
        hidden = lm.get_output_embeddings().weight.shape[1]
        self.value_head = nn.Linear(hidden, 1, bias=False) if shared_critic else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)  # start from V = 0: no bias in the first advantages
            self.value_head.to(torch.float32)  # fp32 even on a bf16 body (as the reward / value heads)

    @property
    def config(self):
        return self.lm.config

    def _response_hidden(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        body = self.lm.get_decoder()
        out = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state[:, prompt_len - 1 : input_ids.shape[1] - 1]

    def _head(self):
        head = self.lm.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def _values(self, hidden: torch.Tensor):
        if self.value_head is None:
            return None
        with torch.autocast(hidden.device.type, enabled=False):  # the value head computes in fp32
            return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(
        self, input_ids, attention_mask=None, *, mode: str = "lm", prompt_len: int | None = None, **kwargs
    ):
        if mode == "lm":
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if prompt_len is None or not 1 <= prompt_len < input_ids.shape[1]:
            raise ValueError(f"mode={mode!r} needs 1 <= prompt_len < {input_ids.shape[1]}, got {prompt_len}")
        if kwargs.pop("packing", False):  # valid tokens only (fastrlhf.models.packing); same outputs
            from .packing import policy_forward_packed
            return policy_forward_packed(self, input_ids, attention_mask, mode=mode, prompt_len=prompt_len,
                                         **kwargs)
        hidden = self._response_hidden(input_ids, attention_mask, prompt_len)
        labels = input_ids[:, prompt_len:]
        weight, bias = self._head()
        if mode == "logprobs":
            return self._logprobs(hidden, weight, bias, labels)
        if mode == "loss":
            values = self._values(hidden)
            if bias is not None:  # folded in exactly: [h, 1] @ [W, b].T = h @ W.T + b (grads reach b too)
                hidden = torch.cat([hidden, hidden.new_ones(*hidden.shape[:-1], 1)], dim=-1)
                weight = torch.cat([weight, bias.unsqueeze(-1).to(weight.dtype)], dim=-1)
            # the variant named by policy_loss (fastrlhf.algo registry; "ppo" is fused_ppo_loss itself)
            loss_fn = get_policy_loss(kwargs.pop("policy_loss", "ppo"))
            loss, stats = loss_fn(
                hidden,
                weight,
                labels,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                backend=self.backend,
                **kwargs,
            )
            return loss, stats, values
        raise ValueError(f"mode must be 'lm', 'logprobs' or 'loss', got {mode!r}")

    def _logprobs(self, hidden, weight, bias, labels):
        lp, ent = linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=self.temperature,
            return_entropy=True,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        return lp, ent, self._values(hidden)
