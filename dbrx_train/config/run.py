"""The run configuration: YAML + CLI overrides -> one validated, typed ``TrainConfig``.

Keys follow LLM Foundry's ``train.py`` where the concept is the same; Foundry's other spellings are
translated or named by config/foundry.py first, so its YAMLs run as they are. Everything is checked
here, before any model, data or process group is built: every problem of a YAML is reported at
once, each naming its dotted key (and the closest valid key for typos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dbrx_train.config.foundry import Translation, translate
from dbrx_train.config.icl import EvalGauntletConfig, ICLTaskConfig, check_gauntlet, expand_file_reference
from dbrx_train.config.peft import PeftConfig
from dbrx_train.config.schema import INVALID, ConfigError, Time, build, convert, has_key, parse_time, to_dict
from dbrx_train.data.finetuning import FinetuningLoaderConfig
from dbrx_train.data.mixture import CurriculumConfig, plan_segments
from dbrx_train.data.text import TextLoaderConfig
from dbrx_train.model import DbrxConfig
from dbrx_train.model.compile import COMPILE_REGIONS

if TYPE_CHECKING:
    from composer.core import Time as ComposerTime


@dataclass
class ModelConfig:
    """``model:`` — the DbrxConfig fields (HF names) plus how to build the weights."""

    # The architecture: DbrxConfig's keys, written directly under `model:` as LLM Foundry does.
    dbrx: DbrxConfig = field(default_factory=DbrxConfig, metadata={"flatten": True})
    name: Literal["dbrx"] = "dbrx"  # the model family; only `dbrx`
    # cpu: every rank builds and initialises the full model from the run seed (identical on all ranks).
    # mixed: rank 0 builds it, the others start on `meta` and receive rank 0's weights while sharding.
    # meta: every rank starts on `meta`; weights are initialised shard by shard after FSDP (GPU), or
    # with `pretrained` (CPU or GPU) each rank reads only its shard's rows from the safetensors.
    init_device: Literal["cpu", "mixed", "meta"] = "cpu"
    # An HF DBRX folder (config.json + safetensors) to start from instead of random weights. Its
    # config.json supplies every architecture key the YAML omits; shape keys the YAML does give
    # (PRETRAINED_SHAPE_KEYS) must agree with it, other keys override it (e.g. moe_loss_weight).
    pretrained: str | None = None
    # LoRA adapters on the frozen pretrained base (LLM Foundry's keys); null: full fine-tuning.
    peft_config: PeftConfig | None = None


# Keys that fix parameter shapes: a pretrained folder and the YAML must agree on them.
PRETRAINED_SHAPE_KEYS = (
    "d_model",
    "n_heads",
    "n_layers",
    "vocab_size",
    "tie_word_embeddings",
    "attn_config.kv_n_heads",
    "ffn_config.ffn_hidden_size",
    "ffn_config.moe_num_experts",
)


@dataclass
class TokenizerConfig:
    # The tokenizer the data was prepared with; only `dbrx` (cl100k-based). Training reads token ids, so
    # the key is validated but not otherwise used.
    name: Literal["dbrx"] = "dbrx"


@dataclass
class OptimizerConfig:
    # decoupled_adamw: Composer's DecoupledAdamW; decoupled_lionw: Lion (LLM Foundry's DecoupledLionW);
    # adamw: torch.optim.AdamW.
    name: Literal["decoupled_adamw", "decoupled_lionw", "adamw"] = "decoupled_adamw"
    lr: float = 6.0e-4  # peak learning rate (> 0), reached at the end of warmup; the scheduler scales it
    betas: tuple[float, float] = (0.9, 0.95)  # (beta1, beta2), each in [0, 1): the moment decay rates
    eps: float = 1.0e-8  # added to Adam's denominator for stability; unused by decoupled_lionw
    # decoupled_*: each step p *= 1 - weight_decay * lr / peak lr (not scaled by lr itself);
    # adamw: p *= 1 - lr * weight_decay. 0: no weight decay.
    weight_decay: float = 0.0

    def problems(self) -> list[tuple[str, str]]:
        found = [("lr", f"must be > 0; got {self.lr}")] if self.lr <= 0 else []
        if not all(0.0 <= b < 1.0 for b in self.betas):
            found.append(("betas", f"must lie in [0, 1); got {list(self.betas)}"))
        return found


@dataclass
class SchedulerConfig:
    # After a linear warmup from 0 to lr: cosine or linear decay to alpha_f * lr at max_duration, or constant.
    name: Literal["cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup"] = (
        "cosine_with_warmup"
    )
    t_warmup: Time = "0ba"  # warmup length, a Composer time string (e.g. 100ba, 0.01dur)
    alpha_f: float = 0.0  # final lr as a fraction of lr; ignored by constant_with_warmup


@dataclass
class GradientClippingConfig:
    # norm: scale gradients so their total L2 norm <= threshold; value: clamp each element to
    # [-threshold, threshold]; adaptive: per parameter, cap grad norm / weight norm at threshold (AGC).
    clipping_type: Literal["norm", "value", "adaptive"] = "norm"
    clipping_threshold: float = 1.0  # the bound on the norm, the value or the ratio (see clipping_type)


@dataclass
class AlgorithmsConfig:
    gradient_clipping: GradientClippingConfig | None = None  # Composer's GradientClipping; null: no clipping


@dataclass
class NonFiniteLossConfig:
    """``nonfinite_loss:`` a batch whose loss is NaN or infinite (on any rank, in any microbatch)."""

    # Either way the batch's optimizer step is skipped (weights and optimizer state unchanged) and the
    # batch index is reported. stop: end the run with a checkpoint of the last good weights, exit code 3.
    # skip: go on, counting the skipped batches in the metric nonfinite/skipped_batches.
    policy: Literal["stop", "skip"] = "stop"
    # skip: the most non-finite batches in a row that are skipped; one more stops the run as `stop` does
    # (a diverged model rather than a bad batch). null: no limit.
    max_consecutive_skips: int | None = 10

    def problems(self) -> list[tuple[str, str]]:
        if self.max_consecutive_skips is not None and self.max_consecutive_skips < 0:
            return [("max_consecutive_skips", f"must be >= 0 or null; got {self.max_consecutive_skips}")]
        return []


@dataclass
class FSDPConfig:
    """``fsdp_config:`` (or ``parallelism_config.fsdp``); FSDP2 per-block sharding under Composer."""

    # FULL_SHARD: params, grads and optimizer state sharded over all ranks.
    # SHARD_GRAD_OP: like FULL_SHARD but parameters stay gathered between forward and backward.
    # HYBRID_SHARD: shard within a group of `data_parallel_shard_degree` ranks (default: one node),
    #               replicate across groups.
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"] = "FULL_SHARD"
    # HYBRID_SHARD: ranks per shard group, must divide the world size (null: ranks per node).
    # Other strategies shard over all ranks: leave null (or set it to the world size).
    data_parallel_shard_degree: int | None = None
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    activation_cpu_offload: bool = False  # keep the activations saved for backward in CPU memory
    # DEFAULT: params in low precision, reductions in fp32. PURE: both low. FULL: both fp32.
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "DEFAULT"
    # Checkpoint format: sharded (every rank writes its shard) or full (one gathered state dict).
    state_dict_type: Literal["sharded", "full"] = "sharded"
    verbose: bool = False  # log Composer's FSDP setup details
    # Expert parallelism (MegaBlocks' moe_expert_model_parallelism): each MoE layer's experts are split
    # over groups of this many ranks, E/degree per rank, and tokens travel to them by all-to-all;
    # FSDP shards the rest (and each expert over the world/degree ranks that hold it). Must divide
    # the world size and moe_num_experts; FULL_SHARD or SHARD_GRAD_OP, init_device cpu, torch backend.
    # null or 1: off, every rank holds every expert (FSDP-sharded like any weight).
    expert_parallel_degree: int | None = None


@dataclass
class CompileConfig:
    """``compile_config:`` torch.compile parts of the model (null: none); see docs/performance.md."""

    # loss: the cross-entropy over the logits (a CPU step with DBRX's 100k vocabulary: 1.2-1.6x);
    # attention: each block's norm-attention-norm; router: each block's router.
    regions: list[Literal[COMPILE_REGIONS]] = field(default_factory=lambda: ["loss"])
    mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode
    dynamic: bool | None = None  # torch.compile's dynamic; null: static until a shape changes


@dataclass
class ParallelismConfig:
    fsdp: FSDPConfig | None = None  # the same keys as fsdp_config (LLM Foundry's newer spelling)


@dataclass
class WandBConfig:
    project: str = "dbrx-train"  # W&B project
    entity: str | None = None  # W&B user or team; null: your default entity
    name: str | None = None  # W&B run name; null: the run's run_name
    group: str | None = None  # W&B group to file the run under; null: none
    tags: list[str] | None = None  # W&B tags of the run
    # offline: log locally (upload later with `wandb sync`); online: stream to W&B; disabled: no W&B.
    # Offline unless the user asks otherwise: a run must never need the network.
    mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class FileLoggerConfig:
    # Text log per rank (metrics, stdout, stderr); {save_folder}, {run_name}, {rank}, {local_rank} are filled in
    filename: str = "{save_folder}/logs-rank{rank}.txt"
    flush_interval: int = 1  # batches between flushes of the file to disk


@dataclass
class LoggersConfig:
    wandb: WandBConfig | None = None  # Weights & Biases (offline unless `mode` says otherwise); null: off
    file: FileLoggerConfig | None = None  # Composer's FileLogger; null: off (metrics.jsonl is always written)


@dataclass
class SpeedMonitorConfig:
    window_size: int = 10  # batches averaged for the logged throughput and MFU
    # FLOP/s of one device for MFU. "auto": Composer's table on known GPUs; on CPU a large matmul in
    # the run's precision (fp32 or bf16) is timed once at start-up. A number overrides both.
    peak_flops: float | Literal["auto"] | None = "auto"


@dataclass
class EmptyConfig:
    pass


@dataclass
class ExpertLoadConfig:
    log_interval: int = 10  # batches between logs of per-layer expert load and router entropy
    # An expert below this fraction of its fair share (1/E) for collapse_window batches counts as collapsed.
    collapse_fraction: float = 0.1
    collapse_window: int = 100  # batches an expert must stay below collapse_fraction to count as collapsed
    # Warn when, over this many batches, a layer's load-balancing loss fell while its busiest expert's load
    # over the mean load (max_over_mean) rose by more than imbalance_rise; at least 2 x log_interval.
    imbalance_window: int = 100
    imbalance_rise: float = 0.1  # relative rise of max_over_mean over imbalance_window that warns


@dataclass
class HFExportConfig:
    """``callbacks.hf_export:`` an HF DBRX folder `{folder}/ba{N}` every save_interval and at the end."""

    save_interval: Time = "1000ba"  # how often to export, a Composer time string; also once at the end
    folder: str = "{save_folder}/hf"  # holds the ba{N} folders; {save_folder} and {run_name} are filled in
    dtype: Literal["bf16", "fp32", "fp16"] = "bf16"  # dtype of the exported weights
    max_shard_size: int = 5 * 1024**3  # bytes per safetensors shard (transformers' default 5GB)
    tokenizer: bool = True  # also write tokenizer.json, tokenizer_config.json (chat template), ...
    # Bias balancing (model.ffn_config.moe_bias_update_rate > 0) trains expert biases that HF DBRX has no place
    # for. true: export without them and print how much the top-k choices change on the first eval batch (needs
    # an eval_loader); false: such a run is refused before it starts.
    drop_expert_bias: bool = False
    # LoRA runs (model.peft_config). merged: ba{N}/ is a plain DBRX folder with the adapters folded in;
    # peft: ba{N}/adapters/ is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors,
    # attention targets only: PEFT cannot adapt DBRX's fused experts); both: the two.
    adapters: Literal["merged", "peft", "both"] = "merged"

    def problems(self) -> list[tuple[str, str]]:
        return (
            [("max_shard_size", f"must be > 0; got {self.max_shard_size}")]
            if self.max_shard_size <= 0
            else []
        )


@dataclass
class CallbacksConfig:
    # Logs throughput (tokens/s, samples/s, ...) and MFU; null: off.
    speed_monitor: SpeedMonitorConfig | None = field(default_factory=SpeedMonitorConfig)
    # MoE health: per-layer expert load, router entropy, collapse warnings; null: off.
    expert_load: ExpertLoadConfig | None = field(default_factory=ExpertLoadConfig)
    lr_monitor: EmptyConfig | None = field(default_factory=EmptyConfig)  # `{}`: log the lr; null: off
    memory_monitor: EmptyConfig | None = None  # `{}`: log GPU memory use (CUDA only); null: off
    # `{}`: log the estimated time remaining; null: off.
    runtime_estimator: EmptyConfig | None = field(default_factory=EmptyConfig)
    hf_export: HFExportConfig | None = None  # write HF DBRX folders during training; null: off
    # `{}`: write {save_folder}/samples.jsonl, the dataset indices of every batch's samples (data provenance:
    # which samples a loss spike saw; that a resume saw each sample once); null: off.
    sample_log: EmptyConfig | None = None


@dataclass
class TrainConfig:
    model: ModelConfig
    train_loader: TextLoaderConfig | FinetuningLoaderConfig  # chosen by `name`: text | finetuning
    # Training length, a Composer time string: 1000ba, 2ep, 100000sp, 1000000tok (curriculum: ba/sp/tok).
    max_duration: Time
    # Samples per optimizer step over all ranks; a multiple of world size x device_train_microbatch_size.
    global_train_batch_size: int
    # Names the run: save_folder runs/{run_name}, W&B run. null: dbrx-YYYYMMDD-HHMMSS (autoresume needs one).
    run_name: str | None = None
    seed: int = 17  # seeds weight init, data shuffling and dropout
    # Training sequence length: text samples must have exactly this many tokens, fine-tuning samples are
    # padded to it. model.max_seq_len defaults to it and must not be smaller.
    max_seq_len: int = 2048
    variables: dict[str, Any] | None = None  # free-form, for ${variables.x} interpolation in YAML
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # The same keys as train_loader (its own `name`); null: no evaluation.
    eval_loader: TextLoaderConfig | FinetuningLoaderConfig | None = None
    curriculum: CurriculumConfig | None = None  # data-mix schedule over train_loader's streams
    # How often to evaluate, a Composer time string (with a curriculum, each mix segment is one epoch).
    eval_interval: Time = "1ep"
    eval_first: bool = False  # evaluate once before the first training batch (not when resuming mid-run)
    eval_subset_num_batches: int = -1  # batches per evaluation; -1: the whole eval_loader
    # In-context-learning tasks (LLM Foundry's icl_tasks), scored at eval_interval, at the end and with
    # eval_first: a list of tasks or the path of a YAML file holding `icl_tasks:`; null: none.
    icl_tasks: list[ICLTaskConfig] | None = None
    # Tokens per ICL sequence (prompt + answer) unless a task sets max_seq_len; null: max_seq_len.
    icl_seq_len: int | None = None
    # Batches per ICL task and shot count (the same ones on any number of ranks); null: all.
    icl_subset_num_batches: int | None = None
    # LLM Foundry's composite score over icl_tasks (or the path of a YAML file holding it); null: none.
    eval_gauntlet: EvalGauntletConfig | None = None
    # Samples per forward/backward on one device (gradient accumulation over the device batch); null: all.
    # auto: Composer's automatic microbatching on GPU (the largest that fits), the whole device batch
    # on CPU. One larger than the device batch becomes the device batch (with a warning).
    device_train_microbatch_size: int | Literal["auto"] | None = None
    device_eval_batch_size: int | None = None  # eval samples per device batch; null: the device train batch
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: gpu when CUDA is available, else cpu
    # auto: amp_bf16 on GPU and on CPUs with AVX512-BF16/AMX (native bf16 matmul), else fp32
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)
    nonfinite_loss: NonFiniteLossConfig = field(
        default_factory=NonFiniteLossConfig
    )  # NaN/inf loss: stop or skip
    # FSDP2 sharding (needed by model.init_device mixed/meta); null: no FSDP (plain DDP on several ranks).
    fsdp_config: FSDPConfig | None = None
    parallelism_config: ParallelismConfig | None = None  # holds `fsdp:`, instead of fsdp_config (not both)
    compile_config: CompileConfig | None = None  # torch.compile regions of the model; null: eager
    # The run folder (checkpoints, config.yaml, metrics.jsonl, report); {run_name} is filled in.
    # null: runs/{run_name}. An object-store URI (s3://, gs://, oci://, file://...): checkpoints are
    # written and committed in runs/{run_name} first, then uploaded; autoresume also looks there.
    save_folder: str | None = None
    # How often to write a checkpoint (time string); also at the end and when a run stops early (SIGTERM).
    save_interval: Time = "1000ba"
    # Checkpoints kept in save_folder, counted on disk (also across resumes), oldest deleted first; -1: all.
    save_num_checkpoints_to_keep: int = -1
    # A previous run in save_folder past this run's start: true replaces it if it finished; one that did not
    # finish (or has only damaged checkpoints) is replaced only when this names its folder
    # (save_overwrite: runs/x). false: either stops the run before it starts. A replaced run is moved to
    # .<folder>.replaced-<time>/ beside it and deleted when the new run finishes.
    save_overwrite: bool | str = False
    # Resume from the newest intact checkpoint in save_folder if there is one (then load_path is ignored);
    # damaged ones are reported, renamed <name>.corrupt, and the previous one is used; when none is intact the
    # run stops (start over with save_overwrite: <save_folder>). Needs a fixed run_name.
    autoresume: bool = False
    # Checkpoint to start from: a checkpoint folder, a run folder (its newest intact checkpoint), a Composer
    # .pt file, or an object-store URI; null: start fresh.
    load_path: str | None = None
    load_weights_only: bool = False  # take only the model weights from load_path (not optimizer, time, data)
    # Before loading a checkpoint, check its files against its manifest: hash (sha256, shared over the ranks)
    # or size (fast, catches truncation only).
    checkpoint_verify: Literal["hash", "size"] = "hash"
    # Config keys (or prefixes, e.g. optimizer.lr) allowed to differ when resuming; by default a changed
    # model, global batch, seed, max_seq_len, train data, curriculum or optimizer stops the resume.
    allow_config_changes: list[str] = field(default_factory=list)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    # One line every console_log_interval: batch/total, loss, lr, tokens/s, MFU, ETA; eval loss after each
    # evaluation; the data mix when it changes. Every other metric goes to metrics.jsonl, W&B, the report.
    log_to_console: bool = True
    console_log_interval: Time = "1ba"  # how often to print that line, in batches or epochs (e.g. 10ba, 1ep)
    # A progress bar with the loss, tokens/s, MFU and ETA; null: on when stdout is a terminal (off in CI logs).
    progress_bar: bool | None = None
    dist_timeout: float = 600.0  # seconds: timeout of the distributed process group (setup and collectives)
    # What the config loader translated from LLM Foundry's spellings (printed once at start); not a key.
    foundry: Translation | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def fsdp(self) -> FSDPConfig | None:
        if self.parallelism_config is not None and self.parallelism_config.fsdp is not None:
            return self.parallelism_config.fsdp
        return self.fsdp_config


def load_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read the YAML, apply ``key=value`` overrides, resolve ``${...}``; return plain dicts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError carries the line and column in its message (on several lines)
        raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(str(e).split())}") from e
    if not OmegaConf.is_dict(cfg):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys at top level")
    bad = [item for item in overrides or [] if "=" not in item]
    if bad:
        raise ConfigError(
            [f"command-line override '{item}' must look like key=value (e.g. seed=42)" for item in bad]
        )
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config file '{path}': {e}") from e
    assert isinstance(data, dict)
    return data


def parse_config(data: dict[str, Any]) -> TrainConfig:
    """Typed config from plain dicts; raises one ConfigError listing every problem found."""
    translation = translate(data, lambda key: has_key(TrainConfig, key))
    if translation.refused:
        raise ConfigError(translation.refused)
    problems = list(translation.problems)
    data = translation.data
    model = data.get("model")
    if isinstance(model, dict):
        data["model"] = _complete_model(model, data.get("max_seq_len"), problems)
    for key in ("icl_tasks", "eval_gauntlet"):
        try:
            expand_file_reference(data, key)
        except ConfigError as e:
            problems += e.problems
            data.pop(key)
    cfg = convert(TrainConfig, data, "", problems)
    if cfg is not INVALID:
        problems += cross_problems(cfg)
    if problems:
        raise ConfigError(problems)
    cfg.foundry = translation
    return cfg


def _complete_model(model: dict[str, Any], max_seq_len: Any, problems: list[str]) -> dict[str, Any]:
    """`model:` with what the YAML leaves to others: the architecture of `model.pretrained`'s
    config.json, and max_seq_len from the top level."""
    model = dict(model)
    if isinstance(model.get("pretrained"), str):
        model = _merge_pretrained(model["pretrained"], model, problems)
    if "max_seq_len" not in model and isinstance(max_seq_len, int):
        model["max_seq_len"] = max_seq_len
    return model


def _merge_pretrained(folder: str, yaml_model: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """config.json of `model.pretrained`, overridden by the YAML's keys; shape keys must agree."""
    from dbrx_train.model.hf import read_hf_config_dict

    try:
        hf = read_hf_config_dict(folder)
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"model.pretrained: {e}")
        return yaml_model
    for dotted in PRETRAINED_SHAPE_KEYS:
        section, _, key = dotted.rpartition(".")
        ours = yaml_model.get(section, {}) if section else yaml_model
        theirs = hf.get(section, {}) if section else hf
        if isinstance(ours, dict) and key in ours and key in theirs and ours[key] != theirs[key]:
            problems.append(
                f"model.{dotted} is {ours[key]!r} but the pretrained model {folder} has {theirs[key]!r} "
                f"in its config.json; remove model.{dotted} from the YAML or make it agree"
            )
    merged = {**hf, **{k: v for k, v in yaml_model.items() if k not in ("attn_config", "ffn_config")}}
    for section in ("attn_config", "ffn_config"):
        if isinstance(yaml_model.get(section), dict):
            merged[section] = {**hf.get(section, {}), **yaml_model[section]}
    return merged


def load_model_config(path: str | Path) -> DbrxConfig:
    """The model architecture of a run's resolved config.yaml (complete, so `pretrained` is not
    re-read): what converting or sampling a checkpoint of that run needs."""
    data = load_yaml(path)
    model = {k: v for k, v in (data.get("model") or {}).items() if k != "pretrained"}
    problems: list[str] = []
    parsed = convert(
        ModelConfig, _complete_model(model, data.get("max_seq_len"), problems), "model", problems
    )
    if problems:
        raise ConfigError(problems, source=str(path))
    return parsed.dbrx


def _curriculum_problems(cfg: TrainConfig) -> list[str]:
    if cfg.curriculum is None:
        return []
    streams = cfg.train_loader.dataset.streams or {}
    with_proportion = [name for name, stream in streams.items() if stream.proportion is not None]
    if with_proportion:
        return [
            f"the curriculum sets the mix; remove 'proportion' from train_loader.dataset.streams "
            f"{', '.join(with_proportion)}"
        ]
    try:
        plan_segments(
            cfg.curriculum,
            list(streams),
            max_duration=cfg.max_duration,
            global_batch_size=cfg.global_train_batch_size,
            max_seq_len=cfg.max_seq_len,
        )
    except ValueError as e:
        return [str(e)]
    return []


def console_interval(value: str) -> ComposerTime:
    """console_log_interval as a Composer Time: a positive number of batches or epochs."""
    interval = parse_time(value, "console_log_interval", units=("ba", "ep"))
    if interval.value == 0:
        raise ConfigError(
            f"config key 'console_log_interval' must be more than 0 (e.g. '10ba' or '1ep'); got {value!r}"
        )
    return interval


def cross_problems(cfg: TrainConfig) -> list[str]:
    """Checks across keys, once every section has been built."""
    found = []
    try:
        console_interval(cfg.console_log_interval)
    except ConfigError as e:
        found += e.problems
    if cfg.max_seq_len <= 0:
        found.append(f"config key 'max_seq_len' must be positive; got {cfg.max_seq_len}")
    elif cfg.model.dbrx.max_seq_len < cfg.max_seq_len:
        found.append(
            f"model.max_seq_len ({cfg.model.dbrx.max_seq_len}) is smaller than the training "
            f"max_seq_len ({cfg.max_seq_len}); raise model.max_seq_len or lower max_seq_len"
        )
    if cfg.global_train_batch_size <= 0:
        found.append(
            f"config key 'global_train_batch_size' must be positive; got {cfg.global_train_batch_size}"
        )
    micro = cfg.device_train_microbatch_size
    if isinstance(micro, int) and micro <= 0:
        found.append(f"config key 'device_train_microbatch_size' must be positive or auto; got {micro}")
    if cfg.fsdp_config is not None and cfg.parallelism_config is not None and cfg.parallelism_config.fsdp:
        found.append("give FSDP settings once: either 'fsdp_config' or 'parallelism_config.fsdp', not both")
    if cfg.autoresume and not cfg.run_name:
        found.append("autoresume: true needs a fixed 'run_name' so a restarted job finds its checkpoints")
    if cfg.load_weights_only and not cfg.load_path:
        found.append("load_weights_only: true needs 'load_path'")
    found += _icl_problems(cfg)
    if not found:  # the plan needs valid durations and sizes
        found += _curriculum_problems(cfg)
    return found


def _icl_problems(cfg: TrainConfig) -> list[str]:
    found = []
    tasks = cfg.icl_tasks or []
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        found.append(f"icl_tasks: each label must be unique; got {labels}")
    for key in ("icl_seq_len", "icl_subset_num_batches"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            found.append(f"config key '{key}' must be positive or null; got {value}")
    longest = max([cfg.icl_seq_len or cfg.max_seq_len] + [t.max_seq_len or 0 for t in tasks])
    if tasks and longest > cfg.model.dbrx.max_seq_len:
        found.append(
            f"ICL sequences of {longest} tokens (icl_seq_len or an icl_tasks max_seq_len) exceed "
            f"model.max_seq_len={cfg.model.dbrx.max_seq_len}; lower them"
        )
    if cfg.eval_gauntlet is not None:
        try:
            check_gauntlet(cfg.eval_gauntlet, tasks)
        except ConfigError as e:
            found += e.problems
    return found


@dataclass(frozen=True)
class BatchLayout:
    world_size: int
    device_train_batch_size: int
    # An int, or "auto": Composer finds the largest that fits (GPU only).
    device_train_microbatch_size: int | Literal["auto"]
    device_eval_batch_size: int
    notes: tuple[str, ...] = ()  # warnings for the user (e.g. a microbatch cut to the device batch)


def batch_layout(cfg: TrainConfig, world_size: int, device: str = "cpu") -> BatchLayout:
    """Split the global batch over ranks and microbatches, or say exactly what does not divide."""
    gbs = cfg.global_train_batch_size
    if gbs % world_size:
        raise ConfigError(
            f"global_train_batch_size={gbs} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size} (e.g. {math.ceil(gbs / world_size) * world_size})"
        )
    device_bs = gbs // world_size
    eval_bs = cfg.device_eval_batch_size or device_bs
    micro = cfg.device_train_microbatch_size
    if micro == "auto" and device == "gpu":
        return BatchLayout(world_size, device_bs, "auto", eval_bs)
    notes = []
    if micro is None or micro == "auto":
        micro = device_bs
    elif micro > device_bs:
        notes.append(
            f"device_train_microbatch_size={micro} is more than the {device_bs} samples each of {world_size} "
            f"rank(s) gets from global_train_batch_size={gbs}; using microbatches of {device_bs}"
        )
        micro = device_bs
    if device_bs % micro:
        raise ConfigError(
            f"global_train_batch_size={gbs} gives {device_bs} samples per device on {world_size} rank(s), "
            f"which is not divisible by device_train_microbatch_size={micro}; "
            f"choose global_train_batch_size as a multiple of world_size x microbatch = {world_size * micro}"
        )
    return BatchLayout(world_size, device_bs, micro, eval_bs, tuple(notes))


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file + ``key=value`` overrides -> validated TrainConfig (errors name file and key)."""
    try:
        return parse_config(load_yaml(path, overrides))
    except ConfigError as e:
        raise ConfigError(e.problems, source=str(path)) from None


def resolved_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain dicts in the YAML's shape, for config.yaml/W&B."""
    return to_dict(cfg)


class RunModel:
    """What a run's resolved config.yaml says about its model: architecture, base folder, adapters."""

    def __init__(self, config_yaml: str | Path):
        self.dbrx = load_model_config(config_yaml)
        model: dict[str, Any] = load_yaml(config_yaml).get("model") or {}
        self.pretrained: str | None = model.get("pretrained")
        peft = model.get("peft_config")
        self.peft: PeftConfig | None = None if peft is None else build(PeftConfig, peft, "model.peft_config")
