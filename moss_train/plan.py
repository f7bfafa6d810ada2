"""`moss-plan`: before launching, does a recipe fit on its cluster and how long will it take?

    moss-plan --config-name moss16b_pretrain                      the recipe's own cluster
    moss-plan moss16b_pretrain cluster=a100-80g-x1 cluster.nodes=2   16 A100s
    moss-plan model=moss-16b cluster=h100-x8 deepspeed=zero3_offload

Per GPU it counts, in GiB:

- model states (parameters, gradients, optimizer states, and ZeRO-3's gathered layer) under the
  recipe's ZeRO stage and offload, in the same accounting as DeepSpeed's own estimators
  (``estimate_zero3_model_states_mem_needs_all_cold`` / ``estimate_zero2_...``), whose figure is
  printed alongside: 16-bit parameters, fp32 gradients, fp32 master weights and Adam moments;
- activations at the recipe's micro-batch and sequence length, with and without activation
  checkpointing (the saved tensors of this repository's CodeGen block, checked against what
  autograd really saves in tests/test_plan.py), and the loss head's peak (the logits over a
  107k vocabulary are the largest single item at 16B);
- ZeRO's communication buckets and a fixed reserve (CUDA context, NCCL, fragmentation);
- with LoRA (``lora.r`` > 0): the frozen base in 16-bit, and the adapters' weights, gradients
  and optimizer states counted as full training counts all of them; activations as for full
  fine-tuning (the frozen layers' inputs are kept for the adapters' gradients); no weight
  gradients for the base (4 N instead of 6 N FLOPs per token);

then the step time and tokens/day at the cluster's stated MFU, and the time ZeRO's traffic
needs at the cluster's link rate. Exit status: 0 fits (or the GPU memory is unknown), 1 does
not fit (the message says what would), 2 recipe error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Optional

from moss_train.config import MossTrainConfig
from moss_train.errors import ConfigError
from moss_train.model.config import ModelConfig, flops_per_token, inner_dim, model_vocab_size, num_parameters

GIB = 2**30
SECONDS_PER_DAY = 86400
# DeepSpeed's additional_buffer_factor: CPU-side headroom (pinned buffers, fragmentation).
CPU_BUFFER_FACTOR = 1.5
# Precisions the accounting is for (DeepSpeed's estimators assume 16-bit mixed precision).
SIXTEEN_BIT = ("auto", "bf16", "fp16")


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    largest_layer: int  # parameters of the largest single module (what ZeRO-3 gathers at once)
    largest_layer_name: str


def parameter_counts(model: ModelConfig) -> ParameterCounts:
    """Total parameters and the largest module's, as DeepSpeed's `model_to_params` counts them
    on a built model (parameters owned directly by each module), without building it."""
    C, V, inner = model.n_embd, model_vocab_size(model), inner_dim(model)
    modules = {
        "lm_head": V * C + V,
        "transformer.wte": V * C,
        "mlp.fc_in": C * inner + inner,
        "mlp.fc_out": inner * C + C,
        "attn.qkv_proj": 3 * C * C,
    }
    name = max(modules, key=modules.get)
    return ParameterCounts(num_parameters(model), modules[name], name)


# ----------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class Layout:
    """Where the training states live: ZeRO stage, what is offloaded to CPU memory, the GPUs."""

    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def layout_of(cfg: MossTrainConfig) -> Layout:
    ds, cluster = cfg.deepspeed, cfg.cluster
    return Layout(ds.zero_stage, ds.offload_optimizer, ds.offload_param, cluster.nodes, cluster.gpus_per_node)


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU, and CPU bytes per node (offloaded states, or building the model)."""

    params: float
    grads: float
    optimizer: float
    gathered: float  # ZeRO-3: the largest layer gathered in 16-bit with its 16-bit gradient
    cpu_per_node: float

    @property
    def gpu(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered


def model_states(counts: ParameterCounts, layout: Layout) -> ModelStates:
    """Mixed-precision Adam per parameter: 2 bytes 16-bit weights, 4 bytes fp32 gradients
    (ZeRO-2 keeps 2 more bytes of 16-bit gradients), 12 bytes fp32 master weights + Adam m, v.
    ZeRO-1 shards the optimizer, ZeRO-2 also the gradients, ZeRO-3 also the weights; offload
    moves the optimizer (and the fp32 gradients) or the weights to CPU memory."""
    P, gpus, stage = counts.total, layout.gpus, layout.zero_stage
    optimizer = 0.0 if layout.offload_optimizer else 12 * P / (gpus if stage >= 1 else 1)
    if stage == 3:
        params = 0.0 if layout.offload_param else 2 * P / gpus
        grads = 0.0 if layout.offload_optimizer else 4 * P / gpus
        gathered = 4 * counts.largest_layer
    else:
        params, gathered = 2 * P, 0.0
        full_16bit_grads = 2 * P if stage <= 1 else 0.0  # ZeRO-2 shards these too
        fp32_grads = {0: 4 * P, 1: 4 * P / gpus, 2: 6 * P / gpus}[stage]
        grads = full_16bit_grads + (0.0 if layout.offload_optimizer else fp32_grads)
    return ModelStates(params, grads, optimizer, gathered, _cpu_per_node(counts, layout))


def _cpu_per_node(counts: ParameterCounts, layout: Layout, trainable: Optional[int] = None) -> float:
    P = counts.total
    T = P if trainable is None else trainable
    if layout.zero_stage == 3 and (layout.offload_optimizer or layout.offload_param):
        # fp32 master + gradients + Adam moments (16 bytes) of what trains, + 16-bit weights (2)
        # when offloaded.
        return (
            ((16 * T if layout.offload_optimizer else 0) + (2 * P if layout.offload_param else 0))
            / layout.nodes
            * CPU_BUFFER_FACTOR
        )
    if layout.zero_stage == 3:
        # zero.Init: each process materialises one layer at a time in fp32 before sharding it.
        return 4 * counts.largest_layer * layout.gpus_per_node * CPU_BUFFER_FACTOR
    if layout.offload_optimizer:
        # DeepSpeed's ZeRO-2 offload figure: the optimizer's 16 bytes/param, at least 4 bytes
        # per parameter per GPU of the job.
        return T * max(4 * layout.gpus, 16) * CPU_BUFFER_FACTOR
    # Without zero.Init every process builds the whole fp32 model in CPU memory first.
    return 4 * P * layout.gpus_per_node * CPU_BUFFER_FACTOR


def lora_parameters(model: ModelConfig, lora) -> int:
    """The adapters' parameters: r x (inputs + outputs) of each adapted projection, per block."""
    C, inner = model.n_embd, inner_dim(model)
    sizes = {"qkv_proj": C + 3 * C, "out_proj": 2 * C, "fc_in": C + inner, "fc_out": inner + C}
    return model.n_layer * sum(lora.r * sizes[name] for name in lora.target_modules)


def lora_model_states(counts: ParameterCounts, layout: Layout, trainable: int) -> ModelStates:
    """Model states with LoRA: the `trainable` adapter parameters as full training counts its
    parameters (16-bit weights, fp32 gradients, master weights and Adam moments, sharded alike),
    plus the frozen base's 16-bit weights (sharded by ZeRO-3, on the CPU with parameter offload);
    ZeRO-3 gathers the largest layer's 16-bit weights, with no gradient for them."""
    adapters = model_states(ParameterCounts(trainable, 0, "adapters"), layout)
    stage3 = layout.zero_stage == 3
    frozen = 0.0 if stage3 and layout.offload_param else 2 * counts.total / (layout.gpus if stage3 else 1)
    gathered = 2 * counts.largest_layer if stage3 else 0.0
    return ModelStates(
        adapters.params + frozen, adapters.grads, adapters.optimizer, gathered, _cpu_per_node(counts, layout, trainable)
    )


def deepspeed_estimate(counts: ParameterCounts, layout: Layout) -> Optional[tuple[float, float, str]]:
    """(GPU bytes, CPU bytes, function) from DeepSpeed's own estimator for this set-up; None
    where DeepSpeed has none (ZeRO-0/1, or parameter offload without optimizer offload)."""
    if layout.zero_stage == 3 and (layout.offload_optimizer or not layout.offload_param):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts.total,
            counts.largest_layer,
            layout.gpus_per_node,
            layout.nodes,
            cpu_offload=layout.offload_optimizer,
            cpu_offload_params=layout.offload_param,
            zero_init=True,
        )
        return gpu, cpu, "estimate_zero3_model_states_mem_needs_all_cold"
    if layout.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            counts.total, layout.gpus_per_node, layout.nodes, cpu_offload=layout.offload_optimizer
        )
        return gpu, cpu, "estimate_zero2_model_states_mem_needs_all_cold"
    return None


# ----------------------------------------------------------------------------- activations


def layer_saved_bytes_per_token(model: ModelConfig, seq_len: int) -> float:
    """What autograd keeps for one CodeGen block's backward, per token, in 16-bit:
    the block input and ln_1's output (2 x h), q, k, v (3h), the attention output twice (as
    SDPA returned it, kept for its backward, and out_proj's contiguous input: 2h), fc_in's output
    and the GELU's (2 x inner); fp32 LayerNorm statistics (8 bytes) and the attention's fp32
    log-sum-exp per head. Packed documents cost nothing extra: each is its own causal attention
    call, with no mask (codegen.document_attention_layout). `seq_len` is kept for the callers;
    the per-token figure does not depend on it."""
    h = model.n_embd
    return 2 * (7 * h + 2 * inner_dim(model)) + 8 + 4 * model.n_head


def head_saved_bytes_per_token(model: ModelConfig) -> float:
    """Outside the blocks: token ids (int64), ln_f's input and output (16-bit), its statistics,
    the 16-bit logits over the (padded) vocabulary, which the training loss keeps instead of
    fp32 log-probabilities (stages/lm.py: token_cross_entropy), and its fp32 log-sum-exp."""
    return 8 + 4 * model.n_embd + 8 + 2 * model_vocab_size(model) + 4


def head_backward_bytes_per_token(model: ModelConfig) -> float:
    """Transient at the start of backward: the logits' 16-bit gradient, which the loss writes
    straight into one buffer (its fp32 work is done in cache-sized chunks)."""
    return 2 * model_vocab_size(model)


def checkpointed_bytes_per_token(model: ModelConfig, seq_len: int) -> float:
    """With activation checkpointing the blocks keep only their inputs: each block's hidden
    state (16-bit); packed documents add no mask (see layer_saved_bytes_per_token)."""
    return model.n_layer * 2 * model.n_embd


def activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """Peak activation memory of one micro-batch. With checkpointing, one block at a time is
    recomputed (its full saved set) during backward, on top of the checkpointed inputs."""
    layer = layer_saved_bytes_per_token(model, seq_len)
    layers = checkpointed_bytes_per_token(model, seq_len) + layer if checkpointing else model.n_layer * layer
    head = head_saved_bytes_per_token(model) + head_backward_bytes_per_token(model)
    return micro_batch * seq_len * (layers + head)


def saved_activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """What the forward pass leaves saved for backward (no recomputation, no backward
    transients): the part of `activation_bytes` that can be measured with autograd's hooks."""
    if checkpointing:
        layers = checkpointed_bytes_per_token(model, seq_len)
    else:
        layers = model.n_layer * layer_saved_bytes_per_token(model, seq_len)
    return micro_batch * seq_len * (layers + head_saved_bytes_per_token(model))


def bucket_bytes(cfg: MossTrainConfig) -> float:
    """ZeRO's 16-bit gradient buckets (double-buffered when overlap_comm) and ZeRO-3's prefetch."""
    ds = cfg.deepspeed
    if ds.zero_stage == 0:
        return 0.0
    reduce = 2 * ds.reduce_bucket_size * (2 if ds.overlap_comm else 1)
    prefetch = 2 * ds.stage3_prefetch_bucket_size if ds.zero_stage == 3 else 0
    return float(reduce + prefetch)


# ----------------------------------------------------------------------------- time


def zero_traffic_bytes(
    total_params: int, zero_stage: int, gpus: int, accumulation: int, trainable: Optional[int] = None
) -> float:
    """Bytes each GPU sends per optimizer step (ring collectives move (N-1)/N of the data).
    ZeRO-3 gathers the 16-bit weights for forward and again for backward and reduce-scatters the
    gradients, for every micro-batch; ZeRO-2 reduce-scatters gradients every micro-batch and
    gathers the updated weights once; ZeRO-0/1 all-reduce once per step. Only what trains
    (`trainable`, LoRA's adapters; default every parameter) has gradients and updates."""
    if gpus == 1:
        return 0.0
    ring = (gpus - 1) / gpus
    weights = 2 * total_params * ring  # one 16-bit copy of the weights
    grads = 2 * (total_params if trainable is None else trainable) * ring  # one 16-bit copy of what trains
    if zero_stage == 3:
        return (2 * weights + grads) * accumulation
    if zero_stage == 2:
        return grads * (accumulation + 1)
    return 2 * grads


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    cfg: MossTrainConfig
    model: ModelConfig  # vocabulary resolved
    counts: ParameterCounts
    states: ModelStates
    deepspeed: Optional[tuple[float, float, str]]
    activations: float  # the recipe's checkpointing setting
    activations_other: float  # the opposite setting
    buckets: float
    accumulation: int
    step_seconds: Optional[float]
    comm_seconds: Optional[float]
    trainable: Optional[int] = None  # LoRA: the adapters' parameters (None: everything trains)
    full_states: Optional[ModelStates] = None  # LoRA: the model states full fine-tuning would need

    @property
    def gpus(self) -> int:
        return self.cfg.cluster.nodes * self.cfg.cluster.gpus_per_node

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.trainer.global_batch_size * self.cfg.data.seq_len

    @property
    def gpu_total(self) -> float:
        return self.states.gpu + self.activations + self.buckets + self.cfg.cluster.reserve_gib * GIB

    @property
    def fits(self) -> Optional[bool]:
        limit = self.cfg.cluster.gpu_memory_gib
        return None if limit is None else self.gpu_total <= limit * GIB

    @property
    def cpu_fits(self) -> Optional[bool]:
        limit = self.cfg.cluster.cpu_memory_gib
        return None if limit is None else self.states.cpu_per_node <= limit * GIB


def resolve_model(cfg: MossTrainConfig) -> ModelConfig:
    """The recipe's model with its vocabulary size (vocab_size 0: from the recipe's tokenizer)."""
    if cfg.model.vocab_size > 0:
        return cfg.model
    from moss_train.config import recipe_tokenizer
    from moss_train.stages.lm import resolve_model_config

    return resolve_model_config(cfg, recipe_tokenizer(cfg))


def make_plan(cfg: MossTrainConfig, model: Optional[ModelConfig] = None) -> Plan:
    """The plan of a validated recipe (validate it with the cluster's GPU count as world size)."""
    model = model or resolve_model(cfg)
    cluster, trainer, seq = cfg.cluster, cfg.trainer, cfg.data.seq_len
    counts, layout = parameter_counts(model), layout_of(cfg)
    accumulation = trainer.global_batch_size // (trainer.micro_batch_size * layout.gpus)
    checkpointing = model.gradient_checkpointing
    trainable = lora_parameters(model, cfg.lora) if cfg.lora.r else None
    step_seconds = comm_seconds = None
    if cluster.peak_tflops:
        per_token = flops_per_token(model, seq)
        if trainable is not None:  # no weight gradients for the frozen base: 4 N, not 6 N
            n_matmul = counts.total - model_vocab_size(model) * model.n_embd
            per_token += 6 * trainable - 2 * n_matmul
        step_seconds = (
            per_token * trainer.global_batch_size * seq / (layout.gpus * cluster.peak_tflops * 1e12 * cluster.mfu)
        )
    link = cluster.inter_node_gb_per_s if cluster.nodes > 1 else cluster.intra_node_gb_per_s
    if link:
        traffic = zero_traffic_bytes(counts.total, layout.zero_stage, layout.gpus, accumulation, trainable)
        comm_seconds = traffic / (link * 1e9)
    full = model_states(counts, layout)
    return Plan(
        cfg=cfg,
        model=model,
        counts=counts,
        states=full if trainable is None else lora_model_states(counts, layout, trainable),
        deepspeed=deepspeed_estimate(counts, layout) if trainable is None else None,
        activations=activation_bytes(model, trainer.micro_batch_size, seq, checkpointing),
        activations_other=activation_bytes(model, trainer.micro_batch_size, seq, not checkpointing),
        buckets=bucket_bytes(cfg),
        accumulation=accumulation,
        step_seconds=step_seconds,
        comm_seconds=comm_seconds,
        trainable=trainable,
        full_states=full if trainable is not None else None,
    )


# Changes tried, in order, when a plan does not fit: (override, how it changes the recipe).
ALTERNATIVES = (
    ("model.gradient_checkpointing=true", lambda c: replace(c, model=replace(c.model, gradient_checkpointing=True))),
    ("trainer.micro_batch_size=1", lambda c: replace(c, trainer=replace(c.trainer, micro_batch_size=1))),
    ("deepspeed=zero3", lambda c: replace(c, deepspeed=replace(c.deepspeed, zero_stage=3))),
    (
        "deepspeed=zero3_offload",
        lambda c: replace(c, deepspeed=replace(c.deepspeed, zero_stage=3, offload_optimizer=True, offload_param=True)),
    ),
)


def fitting_change(plan: Plan) -> Optional[str]:
    """The first of ALTERNATIVES, applied cumulatively, that makes a plan fit (as overrides)."""
    cfg, applied = plan.cfg, []
    for override, change in ALTERNATIVES:
        changed = change(cfg)
        if changed == cfg:
            continue
        cfg = changed
        applied.append(override)
        model = replace(plan.model, gradient_checkpointing=cfg.model.gradient_checkpointing)
        if make_plan(cfg, model).fits:
            return " ".join(applied)
    return None


# ----------------------------------------------------------------------------- report


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def render(plan: Plan) -> str:
    cfg, cluster, trainer, ds = plan.cfg, plan.cfg.cluster, plan.cfg.trainer, plan.cfg.deepspeed
    offload = (
        "+".join(n for n, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_param)) if on) or "none"
    )
    ckpt = plan.model.gradient_checkpointing
    hardware = f"{cluster.gpu or 'GPU'}, {cluster.gpu_memory_gib or '?'} GiB, {cluster.peak_tflops or '?'} TFLOP/s"
    lines = [
        f"moss-plan: {cfg.stage.name} {plan.model.name} on {cluster.name}: {cluster.nodes} node(s) x "
        f"{cluster.gpus_per_node} GPUs = {plan.gpus} ({hardware})",
        f"model: {plan.counts.total / 1e9:.2f}B parameters, largest layer {plan.counts.largest_layer / 1e6:.1f}M "
        f"({plan.counts.largest_layer_name}); ZeRO-{ds.zero_stage}, offload {offload}, precision {trainer.precision}",
        f"batch: micro {trainer.micro_batch_size} x accumulation {plan.accumulation} x {plan.gpus} GPUs = "
        f"{trainer.global_batch_size} sequences x {cfg.data.seq_len} tokens = "
        f"{plan.tokens_per_step / 1e6:.2f}M tokens/step",
        *_lora_lines(plan),
        "",
        f"{'per GPU (GiB)':48s}{'plan':>8s}   DeepSpeed estimator",
        f"{'  parameters (16-bit)':48s}{_gib(plan.states.params)}",
        f"{'  gradients (fp32, + 16-bit below ZeRO-3)':48s}{_gib(plan.states.grads)}",
        f"{'  optimizer states (fp32 master, Adam m and v)':48s}{_gib(plan.states.optimizer)}",
        f"{'  gathered layer (ZeRO-3: 16-bit weights, grads)':48s}{_gib(plan.states.gathered)}",
        f"{'  model states':48s}{_gib(plan.states.gpu)}   {_deepspeed_figure(plan, 0)}",
        f"{'  activations, checkpointing ' + ('on (recipe)' if ckpt else 'off (recipe)'):48s}{_gib(plan.activations)}",
        f"{'  ZeRO buckets':48s}{_gib(plan.buckets)}",
        f"{'  reserve (CUDA context, NCCL, fragmentation)':48s}{_gib(cluster.reserve_gib * GIB)}",
        f"{'  total':48s}{_gib(plan.gpu_total)}   of {cluster.gpu_memory_gib or '?'} GiB",
        f"{'  (activations with checkpointing ' + ('off' if ckpt else 'on') + ')':48s}{_gib(plan.activations_other)}",
        f"{'CPU per node (GiB)':48s}{_gib(plan.states.cpu_per_node)}   {_deepspeed_figure(plan, 1)}"
        f"   of {cluster.cpu_memory_gib or '?'} GiB",
        "",
    ]
    lines += _timing_lines(plan)
    lines += _verdict_lines(plan)
    return "\n".join(lines)


def _lora_lines(plan: Plan) -> list[str]:
    if plan.trainable is None:
        return []
    lora = plan.cfg.lora
    return [
        f"LoRA r={lora.r} alpha={lora.alpha} on {', '.join(lora.target_modules)}: "
        f"{plan.trainable / 1e6:.1f}M trainable parameters ({100 * plan.trainable / plan.counts.total:.2f}%), "
        "the base frozen in 16-bit; model states "
        f"{plan.states.gpu / GIB:.2f} GiB per GPU vs {plan.full_states.gpu / GIB:.2f} GiB for full fine-tuning"
    ]


def _deepspeed_figure(plan: Plan, index: int) -> str:
    if plan.trainable is not None:
        return "(none for LoRA: DeepSpeed's estimators train every parameter)"
    if plan.deepspeed is None:
        return "(none for this ZeRO stage / offload)"
    return f"{plan.deepspeed[index] / GIB:.2f}  ({plan.deepspeed[2]})"


def _timing_lines(plan: Plan) -> list[str]:
    cluster, trainer = plan.cfg.cluster, plan.cfg.trainer
    if plan.step_seconds is None:
        return ["time: unknown (set cluster.peak_tflops)"]
    tokens_per_day = plan.tokens_per_step * SECONDS_PER_DAY / plan.step_seconds
    run_days = trainer.max_steps * plan.step_seconds / SECONDS_PER_DAY
    lines = [
        f"time at MFU {cluster.mfu:.2f}: {plan.step_seconds:.2f} s/step, {tokens_per_day / 1e9:.2f}B tokens/day; "
        f"max_steps {trainer.max_steps} = {trainer.max_steps * plan.tokens_per_step / 1e9:.1f}B tokens "
        f"in {run_days:.2f} days"
    ]
    if plan.comm_seconds is not None:
        link = "inter-node" if cluster.nodes > 1 else "intra-node"
        lines.append(f"ZeRO traffic: {plan.comm_seconds:.2f} s/step at the {link} link rate")
    return lines


def _verdict_lines(plan: Plan) -> list[str]:
    cluster, lines = plan.cfg.cluster, []
    if plan.fits is None:
        lines.append(f"fit: unknown, cluster {cluster.name!r} has no gpu_memory_gib (pick cluster=a100-80g-x1, ...)")
    elif plan.fits:
        lines.append(f"fits: {plan.gpu_total / GIB:.1f} of {cluster.gpu_memory_gib} GiB per GPU")
    else:
        lines.append(
            f"WARNING: DOES NOT FIT: needs {plan.gpu_total / GIB:.1f} GiB per GPU, "
            f"the cluster has {cluster.gpu_memory_gib} GiB"
        )
        change = fitting_change(plan)
        lines.append(
            f"  would fit with: {change}" if change else "  no usual change fits (more GPUs, or a shorter data.seq_len)"
        )
    if plan.cpu_fits is False:
        lines.append(
            f"WARNING: CPU memory: needs {plan.states.cpu_per_node / GIB:.0f} GiB per node, "
            f"the nodes have {cluster.cpu_memory_gib} GiB"
        )
    if plan.comm_seconds is not None and plan.step_seconds is not None and plan.comm_seconds > plan.step_seconds:
        lines.append(
            f"WARNING: ZeRO traffic alone ({plan.comm_seconds:.1f} s) exceeds the step time at MFU {cluster.mfu} "
            f"({plan.step_seconds:.1f} s): expect a lower MFU; fewer micro-batches per step (a larger "
            "trainer.micro_batch_size) cut ZeRO-3's traffic"
        )
    if plan.cfg.deepspeed.offload_optimizer or plan.cfg.deepspeed.offload_param:
        lines.append("note: offload: the step time leaves out the CPU optimizer and the PCIe transfers")
    if plan.cfg.trainer.precision not in SIXTEEN_BIT:
        lines.append(
            f"note: trainer.precision={plan.cfg.trainer.precision}: the accounting assumes 16-bit weights, "
            "as DeepSpeed's estimators do (fp32 weights need more)"
        )
    return lines


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from moss_train.config import compose, parse_recipe_args, to_object, validate

    args = parse_recipe_args(sys.argv[1:] if argv is None else argv, recipe_positional=True)
    if args.help:
        print(__doc__)
        return 0
    from moss_train.distributed import quiet_third_party_logs

    quiet_third_party_logs()
    try:
        cfg = to_object(compose(args.overrides, args.config_name))
        validate(cfg, world_size=cfg.cluster.nodes * cfg.cluster.gpus_per_node)
        plan = make_plan(cfg)
    except ConfigError as error:
        print(f"moss-plan: recipe error: {error}", file=sys.stderr)
        return 2
    print(render(plan))
    return 1 if plan.fits is False or plan.cpu_fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
