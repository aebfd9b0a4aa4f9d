"""LLM Foundry's train YAML keys and what each means here, so Foundry's YAMLs run as they are.

Every key that appears in LLM Foundry's `scripts/train/yamls/**` or in its `TrainConfig`
(`llmfoundry/utils/config_utils.py`) has one of four outcomes:

  same         the key means the same here (most keys: the schema accepts it as it is)
  ignored      no effect here (an FSDP1 knob, an auth token, ...): accepted and listed in one warning
  renamed      the concept exists under another key: translated, and the translation said once
  unsupported  no equivalent: a clear error naming the feature and what to use instead

`translate` applies the table to the raw YAML dict before the schema sees it. A key the schema
itself defines is never dropped as `ignored`, so a key that gains a meaning later is honoured.
docs/config.md lists the table (`markdown_table`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dbrx_train.config.schema import ConfigError, parse_time

Outcome = Literal["same", "ignored", "renamed", "unsupported"]
LOADERS = ("train_loader", "eval_loader")


@dataclass(frozen=True)
class FoundryKey:
    key: str  # dotted; `<loader>` stands for train_loader and eval_loader, `*` for any name
    outcome: Outcome
    note: str = ""  # ignored: why; renamed: what it becomes; unsupported: what to use instead
    # unsupported: values that change nothing here (Foundry's defaults), accepted as `ignored`.
    harmless: tuple[Any, ...] = ()


K = FoundryKey
FOUNDRY_KEYS: tuple[FoundryKey, ...] = (
    # --- the run ---
    K("variables", "same"),
    K("run_name", "same", "null: a dated name (autoresume needs a fixed one)"),
    K("seed", "same"),
    K("max_seq_len", "same"),
    K("max_duration", "same"),
    K("precision", "same"),
    K("global_train_batch_size", "same"),
    K(
        "device_train_microbatch_size",
        "same",
        "an integer or `auto` (Composer's automatic microbatching on GPU)",
    ),
    K("device_eval_batch_size", "same"),
    K("eval_interval", "same"),
    K("eval_first", "same"),
    K("eval_subset_num_batches", "same"),
    K("dist_timeout", "same"),
    K("progress_bar", "same", "null here by default: on when stdout is a terminal"),
    K("log_to_console", "same"),
    K("console_log_interval", "same"),
    K("save_folder", "same"),
    K("save_interval", "same"),
    K("save_num_checkpoints_to_keep", "same"),
    K("save_overwrite", "same"),
    K("load_path", "same"),
    K("load_weights_only", "same"),
    K("autoresume", "same"),
    K("compile_config", "same", "its keys are ours: regions, mode, dynamic"),
    K("icl_tasks", "same", "ICL evaluation (docs/eval.md)"),
    K("eval_gauntlet", "same", "ICL evaluation"),
    K("icl_seq_len", "same"),
    K("icl_subset_num_batches", "same"),
    K(
        "icl_max_seq_len",
        "ignored",
        "not in Foundry's TrainConfig either (one YAML's variable); icl_seq_len or a task's max_seq_len sizes ICL",
    ),
    K("expandable_segments", "ignored", "a CUDA allocator setting: set PYTORCH_CUDA_ALLOC_CONF yourself"),
    K("max_split_size_mb", "ignored", "a CUDA allocator setting: set PYTORCH_CUDA_ALLOC_CONF yourself"),
    K("cuda_load_lazy", "ignored", "a CUDA setting: set CUDA_MODULE_LOADING yourself"),
    K("python_log_level", "ignored", "dbrx-train logs at INFO"),
    K("log_config", "ignored", "the resolved config is always written to config.yaml and W&B"),
    K("spin_dataloaders", "ignored", "resumption restores the Streaming position instead"),
    K("metadata", "ignored", "not logged"),
    K("flatten_metadata", "ignored", "not logged"),
    K("save_latest_filename", "ignored", "checkpoints are folders ep<E>-ba<B>; load_path takes a run folder"),
    K("save_filename", "ignored", "checkpoints are folders ep<E>-ba<B>; load_path takes a run folder"),
    K("accumulate_train_batch_on_tokens", "ignored", "the loss is averaged over each batch's trained tokens"),
    K(
        "save_weights_only",
        "unsupported",
        "checkpoints always hold the whole training state (exact resumption); for weights alone use "
        "callbacks.hf_export",
        harmless=(False,),
    ),
    K("load_strict_model_weights", "unsupported", "weights always load strictly", harmless=(True,)),
    K(
        "load_ignore_keys",
        "unsupported",
        "weights always load whole; use load_weights_only",
        harmless=(None, []),
    ),
    K("save_ignore_keys", "unsupported", "checkpoints always hold the whole state", harmless=(None, [])),
    K(
        "only_hf_checkpoint",
        "unsupported",
        "use callbacks.hf_export beside the checkpoints",
        harmless=(False,),
    ),
    K("only_composer_checkpoint", "unsupported", "omit callbacks.hf_export", harmless=(False,)),
    K("train_subset_num_batches", "unsupported", "shorten max_duration instead", harmless=(-1,)),
    K(
        "device_train_batch_size",
        "unsupported",
        "set global_train_batch_size (= device_train_batch_size x number of ranks)",
    ),
    K(
        "device_train_grad_accum",
        "unsupported",
        "set device_train_microbatch_size (Foundry computes this key)",
    ),
    K("n_gpus", "unsupported", "remove it (Foundry computes this key)"),
    K("code_paths", "unsupported", "no code is imported from a config; remove it"),
    K("tp_config", "unsupported", "no tensor parallelism: use FSDP (fsdp_config) and expert_parallel_degree"),
    K("profiler", "unsupported", "remove it; see docs/performance.md for profiling"),
    K("eval_loaders", "unsupported", "one eval_loader; put several datasets in its `streams`"),
    # --- the model ---
    K(
        "model.name",
        "same",
        "`dbrx`; `hf_causal_lm` with a local DBRX folder means model.pretrained; "
        "any other model (mpt_causal_lm, ...) is refused: this framework trains DBRX",
    ),
    K("model.pretrained_model_name_or_path", "renamed", "model.pretrained (a local HF DBRX folder)"),
    K(
        "model.pretrained",
        "same",
        "Foundry's `true` with pretrained_model_name_or_path: the folder is model.pretrained",
    ),
    K("model.config_overrides", "renamed", "its keys apply under model: (HF DBRX config keys are ours)"),
    K("model.init_device", "same"),
    K("model.peft_config", "same", "LoRA adapters"),
    K("model.use_auth_token", "ignored", "nothing is downloaded"),
    K("model.trust_remote_code", "ignored", "no remote code is run"),
    K("model.use_flash_attention_2", "ignored", "attention runs torch SDPA (FlashAttention kernels on GPU)"),
    K("model.loss_fn", "ignored", "the loss is torch cross-entropy"),
    K("model.d_model", "same"),
    K("model.n_heads", "same"),
    K("model.n_layers", "same"),
    K("model.max_seq_len", "same"),
    K("model.vocab_size", "same"),
    K("model.attn_config", "same", "DBRX's keys: kv_n_heads, clip_qkv, rope_theta, attn_pdrop"),
    K("model.ffn_config.moe_num_experts", "same"),
    K("model.ffn_config.moe_top_k", "same"),
    K("model.ffn_config.moe_loss_weight", "same"),
    K("model.ffn_config.uniform_expert_assignment", "same"),
    K("model.ffn_config.moe_world_size", "renamed", "fsdp_config.expert_parallel_degree"),
    K("model.ffn_config.moe_lbl_in_fp32", "ignored", "the load-balancing loss is computed in fp32"),
    K("model.ffn_config.memory_optimized_mlp", "ignored", "MegaBlocks' own choice (moe_backend)"),
    K("model.ffn_config.mlp_impl", "ignored", "MegaBlocks' own choice (moe_backend)"),
    K("model.expansion_ratio", "unsupported", "an MPT key: this framework trains DBRX"),
    K("model.ffn_config.ffn_type", "unsupported", "an MPT key: this framework trains DBRX"),
    K("model.attn_config.attn_impl", "unsupported", "an MPT key: this framework trains DBRX"),
    K(
        "model.attn_config.attn_uses_sequence_id",
        "same",
        "packed documents attend only within themselves (our default true; Foundry's false)",
    ),
    # --- the tokenizer ---
    K(
        "tokenizer.name",
        "same",
        "`dbrx`; `databricks/dbrx-*` or a local DBRX folder mean the offline DBRX tokenizer",
    ),
    K("tokenizer.kwargs.model_max_length", "ignored", "max_seq_len sets the length"),
    K("tokenizer.kwargs.trust_remote_code", "ignored", "no remote code is run"),
    # --- data ---
    K("<loader>.name", "same", "`text` or `finetuning`"),
    K("<loader>.dataset.local", "same"),
    K("<loader>.dataset.remote", "same"),
    K("<loader>.dataset.split", "same"),
    K("<loader>.dataset.streams", "same"),
    K("<loader>.dataset.shuffle", "same"),
    K("<loader>.dataset.shuffle_seed", "same"),
    K("<loader>.dataset.max_seq_len", "same", "must equal the run's max_seq_len (one length per run)"),
    K(
        "<loader>.dataset.eos_token_id",
        "same",
        "text loader: marks document ends for document masking (sequence_id); a fine-tuning loader ignores "
        "it (as Foundry's collator does: conversations end with <|im_end|>)",
    ),
    K("<loader>.dataset.hf_name", "same", "a local .jsonl/.parquet file or folder (no downloads)"),
    K("<loader>.dataset.hf_kwargs", "same", "data_files and data_dir"),
    K("<loader>.dataset.decoder_only_format", "same", "must be true (DBRX is decoder-only)"),
    K("<loader>.dataset.allow_pad_trimming", "same"),
    K("<loader>.dataset.packing_ratio", "same", "a number or `auto`"),
    K("<loader>.dataset.target_prompts", "same"),
    K("<loader>.dataset.target_responses", "same"),
    K(
        "<loader>.dataset.preprocessing_fn",
        "unsupported",
        "no code runs from a config: rows must hold prompt/response or messages (convert other shapes first)",
    ),
    K("<loader>.drop_last", "same"),
    K("<loader>.num_workers", "same"),
    K("<loader>.pin_memory", "same"),
    K("<loader>.prefetch_factor", "same"),
    K("<loader>.persistent_workers", "same"),
    K("<loader>.timeout", "same"),
    # --- optimization ---
    K("optimizer", "same", "decoupled_adamw, decoupled_lionw, adamw with lr, betas, eps, weight_decay"),
    K("scheduler", "same", "cosine_with_warmup, linear_decay_with_warmup, constant_with_warmup"),
    K("algorithms.gradient_clipping", "same"),
    # --- FSDP ---
    K("fsdp_config.sharding_strategy", "same"),
    K("fsdp_config.mixed_precision", "same"),
    K("fsdp_config.activation_checkpointing", "same"),
    K("fsdp_config.activation_cpu_offload", "same"),
    K("fsdp_config.state_dict_type", "same"),
    K("fsdp_config.verbose", "same"),
    K("fsdp_config.data_parallel_shard_degree", "same"),
    K("fsdp_config.limit_all_gathers", "ignored", "an FSDP1 knob; FSDP2 here"),
    K("fsdp_config.activation_checkpointing_reentrant", "ignored", "checkpointing here is non-reentrant"),
    K("fsdp_config.sync_module_states", "ignored", "init_device mixed broadcasts rank 0's weights itself"),
    K("fsdp_config.backward_prefetch", "ignored", "an FSDP1 knob; FSDP2 here"),
    K("fsdp_config.forward_prefetch", "ignored", "an FSDP1 knob; FSDP2 here"),
    K("fsdp_config.use_orig_params", "ignored", "an FSDP1 knob; FSDP2 here"),
    K("fsdp_config.load_monolith_rank0_only", "ignored", "init_device mixed loads on rank 0 anyway"),
    # --- callbacks and loggers ---
    K("callbacks.lr_monitor", "same"),
    K("callbacks.memory_monitor", "same"),
    K("callbacks.runtime_estimator", "same"),
    K("callbacks.speed_monitor.window_size", "same"),
    K("callbacks.speed_monitor.gpu_flops_available", "renamed", "callbacks.speed_monitor.peak_flops"),
    K("callbacks.hf_checkpointer", "renamed", "callbacks.hf_export (folder {save_folder}/huggingface)"),
    K("callbacks.curriculum_learning", "renamed", "curriculum: (a mix schedule over train_loader's streams)"),
    K("loggers.wandb", "same"),
    K("loggers.mlflow", "unsupported", "log to W&B (loggers.wandb) and metrics.jsonl"),
    K("loggers.tensorboard", "unsupported", "log to W&B (loggers.wandb) and metrics.jsonl"),
)
del K
FOUNDRY_KEYS_BY = {entry.key: entry for entry in FOUNDRY_KEYS}

HF_CHECKPOINTER_DTYPES = {
    "bfloat16": "bf16",
    "float32": "fp32",
    "float16": "fp16",
    "fp32": "fp32",
    "bf16": "bf16",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DBRX_ONLY = "this framework trains DBRX"


@dataclass
class Translation:
    """What `translate` did to a raw config dict."""

    data: dict[str, Any]
    ignored: list[str] = field(default_factory=list)  # keys with no effect here
    renamed: list[str] = field(default_factory=list)  # "old -> new"
    problems: list[str] = field(default_factory=list)  # unsupported keys, named
    refused: str | None = None  # not a DBRX model: the one line to say, nothing else is worth checking

    def notes(self) -> list[str]:
        """The one-line notices a run prints once at start."""
        lines = []
        if self.renamed:
            lines.append("LLM Foundry keys translated: " + "; ".join(self.renamed))
        if self.ignored:
            lines.append(
                "warning: LLM Foundry keys with no effect here (ignored): " + ", ".join(self.ignored)
            )
        return lines


def expanded_keys() -> dict[str, FoundryKey]:
    """The table by dotted key, `<loader>` written out."""
    out = {}
    for entry in FOUNDRY_KEYS:
        for loader in LOADERS if entry.key.startswith("<loader>") else (None,):
            key = entry.key.replace("<loader>", loader) if loader else entry.key
            out[key] = entry
    return out


def translate(data: dict[str, Any], known: Callable[[str], bool]) -> Translation:
    """Foundry's spellings -> ours; `known(dotted)` says whether our schema defines a key."""
    t = Translation(copy.deepcopy(data))
    _model(t)
    _tokenizer(t)
    for loader in LOADERS:
        _loader(t, loader)
    _callbacks(t)
    _table_outcomes(t, known)
    return t


def _pop(d: dict, dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    for part in parents:
        d = d.get(part) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            return False, None
    if isinstance(d, dict) and leaf in d:
        return True, d.pop(leaf)
    return False, None


def _table_outcomes(t: Translation, known: Callable[[str], bool]) -> None:
    """`ignored` keys dropped (and listed), `unsupported` ones refused, unless the schema has them."""
    for key, entry in expanded_keys().items():
        if known(key):
            continue
        if entry.outcome not in ("ignored", "unsupported"):
            continue
        present, value = _pop(t.data, key)
        if not present:
            continue
        if entry.outcome == "ignored" or value in entry.harmless:
            t.ignored.append(key)
        else:
            t.problems.append(f"config key '{key}' (LLM Foundry) is not supported here: {entry.note}")
    # parallelism_config.fsdp is Foundry's newer spelling of fsdp_config: its knobs are ignored alike.
    for key, entry in expanded_keys().items():
        if key.startswith("fsdp_config.") and entry.outcome == "ignored":
            newer = "parallelism_config.fsdp." + key.removeprefix("fsdp_config.")
            if _pop(t.data, newer)[0]:
                t.ignored.append(newer)


def _refuse_model(t: Translation, why: str) -> None:
    t.refused = (
        f"{why}: {DBRX_ONLY} (model.name: dbrx with DBRX's architecture keys, see yamls/pretrain/dbrx-tiny.yaml, "
        "or model.pretrained: a local HF DBRX folder)"
    )


def is_dbrx_folder(path: str) -> bool:
    """A local HF folder whose config.json says model_type dbrx."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "dbrx"
    except (OSError, ValueError, AttributeError):
        return False


def _model(t: Translation) -> None:
    model = t.data.get("model")
    if not isinstance(model, dict):
        return
    name = model.get("name", "dbrx")
    mpt_keys = [k for k in ("expansion_ratio", "no_bias", "learned_pos_emb") if k in model]
    mpt_keys += [f"ffn_config.{k}" for k in ("ffn_type",) if k in (model.get("ffn_config") or {})]
    mpt_keys += [f"attn_config.{k}" for k in ("attn_impl",) if k in (model.get("attn_config") or {})]
    if name not in ("dbrx", "hf_causal_lm"):
        return _refuse_model(t, f"model.name is {name!r}")
    if mpt_keys:
        return _refuse_model(t, f"model.{mpt_keys[0]} is an MPT key")
    if "pretrained_model_name_or_path" in model:
        source = model.pop("pretrained_model_name_or_path")
        if model.pop("pretrained", True) is not True:
            t.problems.append(
                "config key 'model.pretrained' is false with pretrained_model_name_or_path (LLM Foundry: random "
                "weights from that model's config), which is not supported here: write the architecture under "
                "model: with name: dbrx"
            )
        elif not isinstance(source, str):
            t.problems.append(
                f"config key 'model.pretrained_model_name_or_path' must be a folder; got {source!r}"
            )
        elif Path(source, "config.json").is_file() and not is_dbrx_folder(source):
            return _refuse_model(
                t, f"model.pretrained_model_name_or_path {source!r} is not a DBRX model folder"
            )
        elif not Path(source).exists() and HUB_ID.fullmatch(source):
            if "dbrx" not in source.lower():
                return _refuse_model(t, f"model.pretrained_model_name_or_path {source!r} is not a DBRX model")
            t.problems.append(
                f"config key 'model.pretrained_model_name_or_path' is {source!r}, a Hugging Face Hub id, and nothing "
                f"is downloaded here: download it where the hub is reachable (`huggingface-cli download {source} "
                "--local-dir DIR`) and give the local DIR"
            )
        else:
            model["pretrained"] = source  # a missing folder is reported with the other pretrained checks
            t.renamed.append("model.pretrained_model_name_or_path -> model.pretrained")
    elif name == "hf_causal_lm":
        t.problems.append(
            "config key 'model.name' is hf_causal_lm without pretrained_model_name_or_path: give the local "
            "DBRX folder, or write name: dbrx with the architecture keys"
        )
    if name == "hf_causal_lm":
        model["name"] = "dbrx"
    overrides = model.pop("config_overrides", None)
    if overrides:
        if not isinstance(overrides, dict):
            t.problems.append(f"config key 'model.config_overrides' must be a mapping; got {overrides!r}")
        else:
            for key, value in overrides.items():
                if isinstance(value, dict) and isinstance(model.get(key), dict):
                    model[key] = {**model[key], **value}
                else:
                    model[key] = value
            t.renamed.append("model.config_overrides.* -> model.*")
    elif overrides is not None:
        t.ignored.append("model.config_overrides")
    ffn = model.get("ffn_config")
    if isinstance(ffn, dict) and "moe_world_size" in ffn:
        degree = ffn.pop("moe_world_size")
        if degree in (None, 1):
            t.ignored.append("model.ffn_config.moe_world_size")
        else:
            parallel = t.data.get("parallelism_config")
            fsdp = parallel.get("fsdp") if isinstance(parallel, dict) else None
            target = "parallelism_config.fsdp" if isinstance(fsdp, dict) else "fsdp_config"
            section = fsdp if isinstance(fsdp, dict) else t.data.setdefault("fsdp_config", {})
            if isinstance(section, dict):
                section["expert_parallel_degree"] = degree
                t.renamed.append(f"model.ffn_config.moe_world_size -> {target}.expert_parallel_degree")


def _tokenizer(t: Translation) -> None:
    tokenizer = t.data.get("tokenizer")
    if not isinstance(tokenizer, dict):
        return
    kwargs = tokenizer.pop("kwargs", None)
    if kwargs is not None:
        t.ignored += (
            [f"tokenizer.kwargs.{k}" for k in kwargs] if isinstance(kwargs, dict) else ["tokenizer.kwargs"]
        )
    name = tokenizer.get("name", "dbrx")
    if name == "dbrx" or not isinstance(name, str):
        return
    problem = dbrx_tokenizer_problem(name, "config key 'tokenizer.name'")
    if problem:
        tokenizer.pop("name")
        t.problems.append(problem)
    else:
        tokenizer["name"] = "dbrx"
        t.renamed.append(f"tokenizer.name {name} -> dbrx (the offline DBRX tokenizer)")


def dbrx_tokenizer_problem(name: str, key: str) -> str | None:
    """None when `name` means DBRX's tokenizer (dbrx, databricks/dbrx-*, a local DBRX folder), else
    the message: data here is tokenized with DBRX's tokenizer only."""
    if (
        name == "dbrx"
        or is_dbrx_folder(name)
        or (not Path(name).exists() and name.lower().startswith("databricks/dbrx"))
    ):
        return None
    return (
        f"{key} is {name!r}: {DBRX_ONLY} with DBRX's tokenizer (cl100k_base and DBRX's chat tokens): give dbrx, "
        "databricks/dbrx-instruct or a local DBRX folder; data must be tokenized with it"
    )


def _loader(t: Translation, key: str) -> None:
    loader = t.data.get(key)
    if key == "eval_loader" and isinstance(loader, list) and all(isinstance(x, dict) for x in loader):
        t.problems.append(
            f"config key 'eval_loader' is a list (LLM Foundry's several eval loaders), which is not supported "
            f"here: {FOUNDRY_KEYS_BY['eval_loaders'].note}"
        )
        t.data.pop(key)
        return
    dataset = loader.get("dataset") if isinstance(loader, dict) else None
    if not isinstance(dataset, dict):
        return
    if loader.get("name") == "finetuning" and "eos_token_id" in dataset:
        # Foundry's fine-tuning collator ends turns with the tokenizer's own EOS, not this value; here
        # a fine-tuning loader has no use for it either (conversations end with <|im_end|>).
        dataset.pop("eos_token_id")
        t.ignored.append(f"{key}.dataset.eos_token_id")
    if "max_seq_len" not in dataset:
        return
    length, run_length = dataset.pop("max_seq_len"), t.data.get("max_seq_len")
    if run_length is None:
        t.data["max_seq_len"] = length
        t.renamed.append(f"{key}.dataset.max_seq_len -> max_seq_len")
    elif length != run_length:
        t.problems.append(
            f"config key '{key}.dataset.max_seq_len' is {length!r} but max_seq_len is {run_length!r}: a run has one "
            "sequence length here; remove the dataset's or make them equal"
        )


def _callbacks(t: Translation) -> None:
    callbacks = t.data.get("callbacks")
    if not isinstance(callbacks, dict):
        return
    speed = callbacks.get("speed_monitor")
    if isinstance(speed, dict) and "gpu_flops_available" in speed:
        speed["peak_flops"] = speed.pop("gpu_flops_available")
        t.renamed.append("callbacks.speed_monitor.gpu_flops_available -> callbacks.speed_monitor.peak_flops")
    hf = callbacks.pop("hf_checkpointer", None)
    if isinstance(hf, dict):
        callbacks["hf_export"] = _hf_export(hf, t)
        t.renamed.append("callbacks.hf_checkpointer -> callbacks.hf_export")
    elif hf is not None:
        t.problems.append(f"config key 'callbacks.hf_checkpointer' must be a mapping; got {hf!r}")
    curriculum = callbacks.pop("curriculum_learning", None)
    if curriculum is not None:
        _curriculum(curriculum, t)


def _hf_export(hf: dict[str, Any], t: Translation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in hf.items():
        where = f"callbacks.hf_checkpointer.{key}"
        if key == "save_interval":
            out["save_interval"] = value
        elif key == "save_folder":
            out["folder"] = f"{value}/huggingface"  # where Foundry writes: {save_folder}/huggingface/ba<N>
        elif key == "precision":
            if value not in HF_CHECKPOINTER_DTYPES:
                t.problems.append(
                    f"config key '{where}' must be one of {', '.join(HF_CHECKPOINTER_DTYPES)}; got {value!r}"
                )
            else:
                out["dtype"] = HF_CHECKPOINTER_DTYPES[value]
        elif key == "overwrite":
            t.ignored.append(where)
        else:
            t.problems.append(
                f"config key '{where}' (LLM Foundry) is not supported here: callbacks.hf_export takes save_interval, "
                "folder, dtype, max_shard_size and tokenizer"
            )
    return out


def _curriculum(cl: Any, t: Translation) -> None:
    """Foundry's dataset-swapping schedule -> our mix schedule, when every datamix is a weighted mix
    of named streams; otherwise an error that shows the equivalent `curriculum:` block."""
    loader = t.data.get("train_loader")
    first = loader.get("dataset") if isinstance(loader, dict) else None
    schedule = cl.get("schedule") if isinstance(cl, dict) else None
    if not isinstance(first, dict) or not isinstance(schedule, list) or not schedule or "duration" not in cl:
        t.problems.append(
            "config key 'callbacks.curriculum_learning' must hold `duration` and a `schedule` list, with "
            "train_loader.dataset as the first datamix (LLM Foundry's shape); here the data mix over time is "
            "`curriculum:` (docs/data.md)"
        )
        return
    datamixes = [(cl["duration"], first)]
    datamixes += [
        (e.get("duration"), e.get("dataset")) if isinstance(e, dict) else (None, None) for e in schedule
    ]
    streams: dict[str, Any] = {}
    phases: list[dict[str, Any]] = []
    start, unit, why = 0.0, None, None
    for index, (duration, dataset) in enumerate(datamixes):
        try:
            time = parse_time(duration, "callbacks.curriculum_learning duration", units=("tok", "ba", "sp"))
        except ConfigError:
            time = None
        if not isinstance(dataset, dict) or not isinstance(dataset.get("streams"), dict):
            why = why or f"datamix {index} has no `streams`"
            continue
        if index and set(dataset) != {"streams"}:
            why = why or f"datamix {index} changes more than its streams ({', '.join(sorted(dataset))})"
        if time is None or unit not in (None, time.unit.value):
            why = why or f"duration {duration!r} is not in the tok, ba or sp of the others"
            continue
        unit = time.unit.value
        mix = {}
        for name, stream in dataset["streams"].items():
            stream = dict(stream or {})
            weight = stream.pop("proportion", None)
            if weight is None and len(dataset["streams"]) > 1:
                why = why or f"stream {name!r} has no proportion (Streaming would weigh it by its size)"
            if streams.get(name, stream) != stream:
                why = why or f"stream {name!r} names different data in two datamixes"
            streams[name] = stream
            mix[name] = 1.0 if weight is None else weight
        phases.append({"start": f"{_number(start)}{unit}", "mix": mix})
        start += time.value
    curriculum = {"interpolation": "step", "phases": phases}
    if why:
        equivalent = {"train_loader": {"dataset": {"streams": streams}}, "curriculum": curriculum}
        t.problems.append(
            f"config key 'callbacks.curriculum_learning' cannot be translated ({why}). The data mix over time is "
            f"`curriculum:` here, over train_loader's named streams; the equivalent (as JSON): {json.dumps(equivalent)}"
        )
    elif "curriculum" in t.data:
        t.problems.append(
            "give the data-mix schedule once: curriculum or callbacks.curriculum_learning, not both"
        )
    else:
        first["streams"] = streams
        t.data["curriculum"] = curriculum
        t.data.setdefault("max_duration", f"{_number(start)}{unit}")
        t.renamed.append("callbacks.curriculum_learning -> curriculum (phases at the datamix boundaries)")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def markdown_table() -> str:
    """The table for docs/config.md."""
    lines = [
        "## LLM Foundry keys",
        "",
        "What each key of LLM Foundry's train YAMLs means here (`dbrx_train/config/foundry.py`). `same`: accepted "
        "as it is; `ignored`: no effect here, listed in one warning at start; `renamed`: translated, said once "
        "at start; `unsupported`: an error that says what to use instead. `<loader>` is `train_loader` or "
        "`eval_loader`.",
        "",
        "| LLM Foundry key | outcome | here |",
        "|---|---|---|",
    ]
    for entry in FOUNDRY_KEYS:
        note = entry.note
        if entry.harmless:
            note += f" (accepted as ignored when {' or '.join(json.dumps(v) for v in entry.harmless)})"
        lines.append(f"| `{entry.key}` | {entry.outcome} | {note.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
