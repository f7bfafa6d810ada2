"""A reward model: the CodeGen backbone with a scalar head, read at given positions.

``RewardModel`` is ``CodeGenForCausalLM`` without its vocabulary head: the same
``transformer.*`` parameters (so it starts from any causal-LM checkpoint by name) plus
``score`` (``n_embd -> 1``, with bias), applied to the final hidden state at the positions the
caller names: by default each sequence's last token; for padded batches the last real token;
for packed sequences the last token of each document (``read_positions`` of shape (B, K)).

Exported by ``moss-export`` as an HF directory that plain ``transformers`` loads too (see
:mod:`moss_train.checkpoint.export`): ``config.json`` of ``CodeGenModel`` with a
``moss_reward`` entry, and safetensors holding ``transformer.*`` and ``score.{weight,bias}``;
``moss_train.checkpoint.export.load_model(dir, REWARD)`` loads it (the model layer does not read checkpoints).
"""

from __future__ import annotations

from typing import Optional

import torch

from moss_train.model.codegen import CodeGenForCausalLM, _Linear
from moss_train.model.config import ModelConfig

SCORE_PREFIX = "score."


class _ScoreHead(_Linear):
    """The scalar head, computed in fp32 whatever the training precision. bf16 keeps 8 bits of
    mantissa: at |r| ~ 5 its step is 0.03, coarser than the margin between two near-identical
    answers (a digit apart), which then tie or swap. The head is one n_embd dot per read
    position, so fp32 costs nothing. A module, so that ZeRO-3 gathers its parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.nn.functional.linear(x.float(), self.weight.float(), bias)


class RewardModel(CodeGenForCausalLM):
    # Parameters a causal-LM checkpoint does not have; stage.init_from leaves them as built.
    fresh_init_prefixes = (SCORE_PREFIX,)
    # With LoRA (moss_train/model/lora.py) the head trains beside the adapters.
    trainable_with_adapters = (SCORE_PREFIX,)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # Built by the parent and dropped: the vocabulary head is not part of a reward model.
        # (Under zero.Init it existed only as this rank's shard, briefly.)
        del self.lm_head
        self.score = _ScoreHead(cfg.n_embd, 1, bias=True, std=cfg.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        read_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Rewards, one per read position: shape (B,) for read_positions (B,) or None (the last
        token), (B, K) for read_positions (B, K). In fp32 (see _ScoreHead)."""
        hidden = self.hidden_states(input_ids, position_ids, segment_ids)
        B, T, C = hidden.shape
        if read_positions is None:
            read_positions = torch.full((B,), T - 1, dtype=torch.long, device=hidden.device)
        index = read_positions.reshape(B, -1, 1).expand(-1, -1, C)
        return self.score(hidden.gather(1, index)).reshape(read_positions.shape)
