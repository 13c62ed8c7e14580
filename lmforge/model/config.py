"""The model's shape: `ModelConfig` (with its RoPE scaling and MoE sections), kept beside the model
it describes so the model package needs nothing above it. The run config (lmforge/config.py) embeds it
as its `model:` section and re-exports these names.

`Section` is the strict base every config section shares: unknown keys and wrong types are errors,
and YAML `true` is never read as the number 1.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _bool_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic's lax mode turns YAML `true` into 1 for int/float fields; a typo like
        # `max_steps: true` must be reported instead of silently training for one step.
        types = _leaf_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in types and types & {int, float}:
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _leaf_types(annotation: Any) -> set:
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


class RopeScaling(Section):
    """Llama-3.1 style frequency scaling of RoPE (`rope_type: llama3` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @model_validator(mode="before")
    @classmethod
    def _hf_spelling(cls, value: Any) -> Any:
        # HF configs name the kind: `rope_type: llama3` (older: `type: llama3`). That is the one
        # kind this section describes; any other (yarn, linear, dynamic) is refused, not ignored.
        if isinstance(value, dict) and ({"rope_type", "type"} & value.keys()):
            value = dict(value)
            for key in ("rope_type", "type"):
                kind = value.pop(key, "llama3")
                if kind != "llama3":
                    raise ValueError(f"{key} {kind!r} is not supported; lmforge has Llama-3.1 scaling only (llama3)")
        return value


class MoEConfig(Section):
    num_experts: int = Field(4, ge=1)
    top_k: int = Field(2, ge=1)
    num_shared_experts: int = Field(0, ge=0)
    # Width of each routed (and shared) expert; None means the dense FFN width rule.
    expert_intermediate_size: int | None = Field(None, ge=1)
    norm_topk_prob: bool = True
    aux_loss_coef: float = Field(0.01, ge=0.0)


class ModelConfig(Section):
    preset: str | None = None
    vocab_size: int = Field(6400, ge=1)
    hidden_size: int = Field(512, ge=1)
    num_layers: int = Field(8, ge=1)
    num_heads: int = Field(8, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int | None = Field(None, ge=1)
    # Explicit FFN width wins; otherwise `ffn_rule` derives it from hidden_size:
    #   minimind:  ceil(hidden * 8/3 / 64) * 64   (MiniMind2's rule)
    #   minimind3: ceil(hidden * pi / 64) * 64    (MiniMind-3's rule)
    #   llama:     Llama's multiple_of / ffn_dim_multiplier rule on 4*hidden*2/3
    intermediate_size: int | None = Field(None, ge=1)
    ffn_rule: Literal["minimind", "minimind3", "llama"] = "minimind"
    multiple_of: int = Field(64, ge=1)
    ffn_dim_multiplier: float | None = None
    max_position_embeddings: int = Field(32768, ge=1)
    rope_theta: float = Field(1e6, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    qk_norm: bool = False
    tie_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    init_std: float = Field(0.02, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    moe: MoEConfig | None = None

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"@num_heads hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "change one of them or set model.head_dim"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"@num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}; "
                "grouped-query attention needs num_heads to be a multiple of num_kv_heads"
            )
        if self.moe is not None and self.moe.top_k > self.moe.num_experts:
            raise ValueError(
                f"@moe.top_k {self.moe.top_k} is larger than moe.num_experts {self.moe.num_experts}"
            )
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads
