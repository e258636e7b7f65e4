"""Stage configs and presets.

One dataclass per stage; a `Config` holds one of each. Presets are code (`PRESETS`), and every field can
be overridden from the command line with `--set section.field=value`. Every field declares what it
accepts (type, range or choices), so a bad override is answered with one line naming the field and
what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ConfigError(ValueError):
    """A user mistake in a preset name or an override; the CLI prints it as one line."""


def opt(default: Any, *, min: float | None = None, max: float | None = None, choices: tuple | None = None,
        help: str = "") -> Any:
    """A config field with its allowed values attached (checked by `Config.validate`)."""
    return field(default=default, metadata={"min": min, "max": max, "choices": choices, "help": help})


# --------------------------------------------------------------------------------------------- stages

@dataclass
class RunConfig:
    name: str = opt("default", help="run name: checkpoints/{stage}/{name}; resubmitting the same name resumes")
    storage_path: str = opt("", help="checkpoint root on a filesystem every node mounts; empty = RAYCHAT_BASE_DIR")
    seed: int = opt(42, min=0)
    kill_worker_at_step: int = opt(-1, min=-1, help="fault-tolerance drill: the last worker SIGKILLs itself once "
                                                   "at this step; -1 = off")
    keep_checkpoints: int = opt(3, min=0, max=100_000, help="newest training checkpoints kept per run, besides the "
                                                            "final one; 0 = keep every one")


@dataclass
class TokenizerConfig:
    vocab_size: int = opt(65536, min=256 + 9, max=2**20, help="including the 9 special tokens")
    max_chars: int = opt(2_000_000_000, min=1, help="characters of training text read from the shards")
    doc_cap: int = opt(10_000, min=1, help="each document is cropped to this many characters")
    num_threads: int = opt(0, min=0, help="0 = all cores")
    eval_hf_chars: int = opt(50_000_000, min=1, help="`tokenizer eval`: training text for the HF BPE baseline")


@dataclass
class DataConfig:
    base_url: str = opt("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                        help="FineWeb-EDU shard mirror; HF_ENDPOINT replaces the host")
    max_shard: int = opt(1822, min=1, help="index of the last shard (the validation split)")
    num_shards: int = opt(-1, min=-1, help="train shards to fetch; -1 = derived from the token budget")
    chars_per_token: float = opt(4.8, min=0.5, max=32.0)
    download_workers: int = opt(8, min=1, max=64)
    download_retries: int = opt(5, min=0, max=100, help="extra attempts per shard, with exponential backoff")
    download_backoff_s: float = opt(2.0, min=0.0, max=600.0, help="wait before the first retry; doubles each time")
    download_timeout_s: float = opt(60.0, min=0.1, help="socket timeout per request")
    packing: str = opt("bos_bestfit", choices=("bos_bestfit", "concat"))
    tokenizer_batch_size: int = opt(128, min=1, help="documents per read+tokenize task (map_batches call)")
    buffer_docs: int = opt(1000, min=1, help="documents held for best-fit packing, per rank")
    prefetch_batches: int = opt(2, min=1, max=64, help="packed batches prepared ahead of the training step")
    tasks_per_rank: int = opt(4, min=1, max=256, help="concurrent Ray Data read+tokenize tasks per rank")
    buffer_mb: int = opt(256, min=1, help="tokenized data each rank's Ray Data pipeline may hold ahead (MiB)")
    cache_mb: int = opt(64, min=0, help="a rank's share of the train/val text up to this size (MiB) is tokenized "
                                        "once and its tokens kept for every epoch; 0 = tokenize every epoch")
    ray_data: bool = opt(True, help="Ray trainer: read+tokenize in Ray Data tasks; false = in a thread of each "
                                    "training worker (the bare trainer always does)")


@dataclass
class TrainConfig:
    """Fields shared by every trainer (pretrain, midtrain, sft)."""
    num_workers: int = opt(8, min=1, help="Ray Train workers (one per GPU)")
    use_gpu: bool = opt(True)
    cpus_per_worker: float = opt(1.0, min=0.0, max=256.0)
    resources_per_worker: str = opt("", help="custom Ray resources each worker also asks for, as name=amount[,...] "
                                             "(e.g. to pin workers to nodes that advertise them)")
    deepspeed: bool = opt(True, help="Ray trainer: DeepSpeed ZeRO for the AdamW parameters; false = plain torch "
                                     "with averaged gradients")
    zero_stage: int = opt(2, choices=(1, 2), help="ZeRO-1/2 shard the AdamW state; Muon is raychat's own")
    dtype: str = opt("auto", choices=("auto", "bf16", "fp32"), help="auto = bf16 on GPU, fp32 on CPU")
    compile: bool = opt(True, help="torch.compile the training step's forward (GPU only; evaluation stays eager)")
    sequence_len: int = opt(2048, min=8, max=65536)
    device_batch_size: int = opt(32, min=1, help="rows per worker per micro-step")
    memory_split: int = opt(1, min=1, max=1024, help="run each micro-step as this many smaller micro-batches (more "
                                                     "accumulation, less activation memory); must divide "
                                                     "device_batch_size")
    total_batch_size: int = opt(524_288, min=1, help="tokens per optimizer step, all workers together")
    num_iterations: int = opt(-1, min=-1, help="-1 = derived from the horizon")
    embedding_lr: float = opt(0.2, min=0.0, max=10.0)
    unembedding_lr: float = opt(0.004, min=0.0, max=10.0)
    matrix_lr: float = opt(0.02, min=0.0, max=10.0)
    weight_decay: float = opt(0.0, min=0.0, max=1.0)
    muon_dtype: str = opt("auto", choices=("auto", "bf16", "fp32"), help="Muon's Newton-Schulz: auto = bf16 where "
                                                                        "the device has native bf16 (GPU, AVX512-BF16)")
    warmup_ratio: float = opt(0.0, min=0.0, max=1.0)
    warmdown_ratio: float = opt(0.2, min=0.0, max=1.0)
    final_lr_frac: float = opt(0.0, min=0.0, max=1.0)
    grad_clip: float = opt(0.0, min=0.0, help="max global grad norm over all parameters (as nanochat v0); "
                                               "0 = no clipping")
    log_every: int = opt(1, min=1)
    eval_every: int = opt(250, min=0, help="0 = only at the end")
    eval_tokens: int = opt(20 * 524_288, min=1)
    save_every: int = opt(1000, min=0, help="0 = only at the end")
    max_failures: int = opt(3, min=0, help="worker deaths survived by restarting from the last checkpoint")


@dataclass
class PretrainConfig(TrainConfig):
    depth: int = opt(20, min=1, max=128, help="layers; width = 64 x depth")
    max_seq_len: int = opt(2048, min=8, max=65536)
    target_param_data_ratio: float = opt(20.0, min=0.0, help="tokens per parameter (Chinchilla = 20)")
    core_every: int = opt(2000, min=0, help="CORE on rank 0 every N steps and at the end; 0 = never "
                                                  "(raychat eval base computes it)")
    core_max_per_task: int = opt(500, min=-1, help="-1 = every example")


@dataclass
class MidtrainConfig(TrainConfig):
    """nanochat's mid-training: the base model on conversations, every token trained, LR as pretraining."""
    parent_run: str = opt("", help="run of the base checkpoint to start from (its latest complete step); "
                                   "empty = run.name")
    mixture: str = opt("smoltalk,mmlu-aux,gsm8k,identity*2,spelling:200000,spelling-bee:80000",
                       help="conversation tasks, comma-separated name[:N][*K] (N: first N rows / N generated; "
                            "K: oversample K times), shuffled once with run.seed")
    num_iterations: int = opt(-1, min=-1, help="-1 = one epoch of the mixture")
    warmdown_ratio: float = opt(0.2, min=0.0, max=1.0)
    eval_every: int = opt(150, min=0, help="0 = only at the end")


@dataclass
class SFTConfig(TrainConfig):
    """nanochat's SFT: one conversation per row, loss on the assistant's tokens, LR from a fraction of the
    base LRs decaying linearly to 0."""
    source: str = opt("mid", choices=("base", "mid"), help="the stage whose latest checkpoint SFT starts from")
    parent_run: str = opt("", help="run of the source checkpoint; empty = run.name")
    mixture: str = opt("arc-easy,arc-challenge,gsm8k,smoltalk:10000,identity,spelling:300,spelling-bee:300",
                       help="conversation tasks, comma-separated name[:N][*K] (as midtrain.mixture)")
    compile: bool = opt(False, help="torch.compile the training forward (GPU only); off by default: every "
                                    "micro-batch has its own width (nanochat's SFT runs eager too)")
    device_batch_size: int = opt(4, min=1, help="conversations (rows) per worker per micro-step")
    total_batch_size: int = opt(32, min=1, help="conversations per optimizer step, all workers together")
    num_epochs: int = opt(1, min=1, help="passes over the mixture when num_iterations = -1")
    init_lr_frac: float = opt(0.02, min=0.0, max=1.0, help="learning rates start at this fraction of the "
                                                           "embedding/unembedding/matrix LRs")
    warmdown_ratio: float = opt(1.0, min=0.0, max=1.0, help="1.0 = linear decay over the whole run")
    eval_every: int = opt(100, min=0, help="0 = only at the end")
    eval_tokens: int = opt(400 * 2048, min=1, help="held-out positions (rows x length) for val bpb")


@dataclass
class RLConfig(TrainConfig):
    """nanochat's RL: REINFORCE with a group-mean baseline on GSM8K, from the SFT model; rollouts on their
    own actors (raychat/rl/)."""
    source: str = opt("sft", choices=("mid", "sft"), help="the stage whose latest checkpoint RL starts from")
    parent_run: str = opt("", help="run of the source checkpoint; empty = run.name")
    task: str = opt("gsm8k", help="gsm8k, spelling-bee, or fixed:<word> (a one-question smoke test)")
    num_rollout_actors: int = opt(8, min=1, max=4096, help="rollout actors, shared out among the learner workers")
    placement: str = opt("split", choices=("split", "colocated"), help="GPUs: split = one GPU per actor beside "
                         "the learners'; colocated = an actor shares each learner's GPU (half each)")
    num_samples: int = opt(16, min=1, max=1024, help="replies sampled per question (the group)")
    examples_per_step: int = opt(16, min=1, help="questions per step, all workers together")
    max_new_tokens: int = opt(256, min=1, max=4096)
    temperature: float = opt(1.0, min=0.0, max=2.0)
    top_k: int = opt(50, min=0, max=100_000, help="0 = no top-k")
    advantage: str = opt("mean", choices=("mean", "grpo", "drgrpo"), help="reward - group mean; grpo: also / group "
                         "std; drgrpo: the loss / (replies x max_new_tokens) instead of / sampled tokens")
    max_staleness: int = opt(0, min=0, max=1, help="weight versions a rollout may lag the learner: 0 = on-policy; "
                                                   "1 = step k+1 is generated while step k is learned")
    weight_sync: str = opt("auto", choices=("auto", "broadcast", "object_store"), help="new weights to the actors: "
                           "broadcast = a process group of each learner and its actors (NCCL on GPUs, gloo on "
                           "CPUs); auto = broadcast unless actors share the learners' GPUs")
    ppo_epochs: int = opt(1, min=1, max=16, help="updates per batch of rollouts (> 1: PPO's clipped ratio)")
    clip_eps: float = opt(0.2, min=0.0, max=1.0, help="PPO ratio clipping, when ppo_epochs > 1")
    kl_coef: float = opt(0.0, min=0.0, max=10.0, help="KL penalty to the starting (SFT) policy; 0 = none (nanochat)")
    num_epochs: int = opt(1, min=1, help="passes over the questions when num_iterations = -1")
    init_lr_frac: float = opt(0.05, min=0.0, max=1.0, help="learning rates start at this fraction of the base LRs")
    device_batch_size: int = opt(8, min=1, help="replies (rows) per worker per micro-step")
    sequence_len: int = opt(1024, min=8, max=65536, help="longest prompt + reply the parent's context must cover")
    compile: bool = opt(False, help="torch.compile the training forward (GPU only); rows vary in width")
    warmdown_ratio: float = opt(1.0, min=0.0, max=1.0, help="1.0 = linear decay to 0 over the run (nanochat)")
    eval_every: int = opt(60, min=0, help="pass@k on the task's test split every N steps; 0 = only at the end")
    eval_problems: int = opt(400, min=1, help="test questions for pass@k")
    eval_samples: int = opt(8, min=1, max=64, help="replies per test question: pass@1..K")
    save_every: int = opt(60, min=0, help="0 = only at the end")


@dataclass
class EvalConfig:
    num_actors: int = opt(8, min=1, help="Ray actors that share the CORE tasks")
    use_gpu: bool = opt(True)
    core_max_per_task: int = opt(-1, min=-1, help="-1 = every example")
    bpb_tokens: int = opt(20 * 524_288, min=1, help="validation tokens for bits-per-byte")
    batch_size: int = opt(32, min=1)
    chat_tasks: str = opt("ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee")
    max_problems: int = opt(-1, min=-1, help="per chat task; -1 = all")
    num_samples: int = opt(1, min=1, max=64, help="replies sampled per generative problem (pass@1..K)")
    temperature: float = opt(0.0, min=0.0, max=10.0, help="chat eval sampling; 0 = greedy")
    top_k: int = opt(50, min=0, help="chat eval sampling; 0 = no top-k")
    max_new_tokens: int = opt(512, min=1, max=65536, help="longest reply sampled in chat eval")
    seed: int = opt(42, min=0, help="chat eval sampling seed (each problem derives its own from it)")
    bundle_url: str = opt("https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip",
                          help="CORE eval bundle (zip), downloaded when RAYCHAT_DATA_DIR is unset")
    bundle_sha256: str = opt("", help="expected sha256 of the bundle zip; empty = check its CRCs only")


@dataclass
class ServeConfig:
    host: str = opt("127.0.0.1", help="address `raychat serve` binds; anything but loopback should set api_key")
    port: int = opt(8000, min=1, max=65535)
    source: str = opt("sft", choices=("base", "mid", "sft", "rl"))
    step: int = opt(-1, min=-1, max=10**9, help="checkpoint step to serve; -1 = the latest")
    num_replicas: int = opt(1, min=1, max=1024)
    min_replicas: int = opt(1, min=0, max=1024)
    max_replicas: int = opt(1, min=1, max=1024)
    target_ongoing_requests: float = opt(16.0, min=0.1, max=4096.0)
    use_gpu: bool = opt(True)
    cpus_per_replica: float = opt(1.0, min=0.0, max=256.0)
    max_batch_size: int = opt(32, min=1, max=1024, help="sequences decoded together per replica")
    max_queued: int = opt(64, min=0, max=4096, help="sequences waiting for a batch slot; more get 429 + Retry-After")
    max_queued_requests: int = opt(64, min=1, max=4096, help="requests Serve's router holds while every replica's "
                                                            "request slots are taken; more get 429 + Retry-After")
    max_tokens_per_request: int = opt(8192, min=1, max=65536, help="n x max_tokens of one request (400 above)")
    prefill_tokens_per_step: int = opt(512, min=1, max=65536, help="prompt tokens prefilled between two decode steps "
                                                                  "(one longer prompt is prefilled alone)")
    max_messages: int = opt(64, min=1, max=1024)
    max_chars_per_message: int = opt(8000, min=1, max=1_000_000)
    max_total_chars: int = opt(32000, min=1, max=1_000_000)
    default_max_tokens: int = opt(512, min=1, max=4096)
    body_timeout_s: float = opt(10.0, min=0.1, max=600.0, help="a request body must arrive within this many seconds "
                                                             "(408 otherwise)")
    api_key: str = opt("", help="when set (or RAYCHAT_API_KEY), every endpoint but / and /health needs "
                                "'Authorization: Bearer <key>'")
    allowed_hosts: str = opt("", help="Host header names accepted, comma-separated (DNS-rebinding guard); "
                                      "empty = loopback names when host is loopback, else any; '*' = any")
    access_log: bool = opt(False, help="Serve's per-request access log (costs CPU per request)")
    stream_interval_ms: int = opt(20, min=0, max=1000, help="after the first token, send a stream's new text at "
                                                          "most this often (fewer, larger chunks); 0 = every token")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    midtrain: MidtrainConfig = field(default_factory=MidtrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    preset: str = "d20"

    # ------------------------------------------------------------------ (de)serialisation, validation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls(preset=d.get("preset", "custom"))
        for section, values in d.items():
            if section == "preset":
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section}' must be a mapping of fields, got {values!r}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        cfg.validate()
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.field` from a string (CLI) or an already typed value (JSON)."""
        section_name, _, key = dotted.partition(".")
        sections = {f.name for f in fields(self) if f.name != "preset"}
        if section_name not in sections or not key:
            raise ConfigError(f"unknown config key '{dotted}': expected section.field with section one of "
                              f"{', '.join(sorted(sections))}")
        section = getattr(self, section_name)
        by_name = {f.name: f for f in fields(section)}
        if key not in by_name:
            raise ConfigError(f"unknown config key '{dotted}': {section_name} has "
                              f"{', '.join(sorted(by_name))}")
        setattr(section, key, _coerce(dotted, by_name[key], value))

    def validate(self) -> None:
        for section_field in fields(self):
            if section_field.name == "preset":
                continue
            section = getattr(self, section_field.name)
            for f in fields(section):
                _check_range(f"{section_field.name}.{f.name}", f, getattr(section, f.name))
        if not RUN_NAME.fullmatch(self.run.name):
            raise ConfigError(f"run.name must be letters, digits, '.', '_' or '-' (it names a directory), "
                              f"got '{self.run.name}'")
        if "://" in self.run.storage_path:
            raise ConfigError(f"run.storage_path must be a filesystem path every node mounts (NFS, EFS, Lustre); "
                              f"object stores like '{self.run.storage_path.split('://')[0]}://' are not supported")
        for stage in ("pretrain", "midtrain", "sft", "rl"):
            section = getattr(self, stage)
            parse_resources(section.resources_per_worker, f"{stage}.resources_per_worker")
            if isinstance(section, PretrainConfig) and section.sequence_len > section.max_seq_len:
                raise ConfigError(f"{stage}.sequence_len ({section.sequence_len}) must be <= {stage}.max_seq_len "
                                  f"({section.max_seq_len})")
        from raychat.common import UserError
        from raychat.tasks.mixture import parse_mixture
        for stage in ("midtrain", "sft"):
            try:
                parse_mixture(getattr(self, stage).mixture, f"{stage}.mixture")
            except UserError as error:
                raise ConfigError(str(error)) from None
        if self.rl.task not in ("gsm8k", "spelling-bee") and not (self.rl.task.startswith("fixed:")
                                                                 and self.rl.task[len("fixed:"):].strip()):
            raise ConfigError(f"rl.task must be gsm8k, spelling-bee or fixed:<word>, got '{self.rl.task}'")
        if self.serve.min_replicas > self.serve.max_replicas:
            raise ConfigError(f"serve.min_replicas ({self.serve.min_replicas}) must be <= serve.max_replicas "
                              f"({self.serve.max_replicas})")


def parse_resources(text: str, name: str) -> dict[str, float]:
    """'slot=1,fast_disk=0.5' -> {"slot": 1.0, "fast_disk": 0.5}: custom Ray resources (CPU/GPU have their own
    fields)."""
    resources = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            amount = float(value) if sep else -1.0
        except ValueError:
            amount = -1.0
        if not key.strip() or amount <= 0 or not math.isfinite(amount) or key.strip() in ("CPU", "GPU"):
            raise ConfigError(f"{name} must be name=amount[,name=amount] with amounts > 0 and names other than CPU/GPU, "
                              f"got '{text}'")
        resources[key.strip()] = amount
    return resources


def _type_of(f: dataclasses.Field) -> type:
    # annotations are strings because of `from __future__ import annotations`
    return {"int": int, "float": float, "bool": bool, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]


def _coerce(name: str, f: dataclasses.Field, value: Any) -> Any:
    kind = _type_of(f)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got '{value}'")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got '{value}'")
        if isinstance(value, int):
            return value
        text = str(value).strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:  # allow 2e9 and 2.0e9 when they are whole numbers
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"{name} must be an integer, got '{value}'") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got '{value}'")
        try:
            return float(str(value).strip().replace("_", "")) if not isinstance(value, (int, float)) else float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got '{value}'") from None
    return str(value)


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _check_range(name: str, f: dataclasses.Field, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got '{value}'")
    if lo is not None and value < lo:
        raise ConfigError(f"{name} must be >= {_fmt(lo)}{f' and <= {_fmt(hi)}' if hi is not None else ''}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {_fmt(hi)}{f' and >= {_fmt(lo)}' if lo is not None else ''}, got {value}")


# -------------------------------------------------------------------------------------------- presets

def _gpu_tier(depth: int, device_batch_size: int) -> dict:
    """nanochat's speedrun tiers on one 8xH100 node; larger models use smaller device batches."""
    return {
        "pretrain.depth": depth,
        "pretrain.device_batch_size": device_batch_size,
        "midtrain.device_batch_size": device_batch_size,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # every stage on 2 CPU cores in minutes: a 2-layer model, a 4k vocab, the offline shards.
    # Pretraining (measured on the 2-core project machine, README "Performance"): 150 steps of 8,192 tokens
    # (2 workers x 2 micro-batches x 8 rows x 256), final val bpb 2.3814, 126 s from the command to the
    # checkpoint: start-up 26 s (Ray, preflight, worker group and DeepSpeed ~20 s, the first batch waiting
    # ~6 s for its share of text to be tokenized), 150 steps ~0.7 s each (evaluations and checkpoints every
    # 50 steps: ~1 s each), shutdown ~5 s. Chosen deliberately, kept from before:
    #  - the token budget (1.2 M tokens): the model is token-bound at this size. 100 steps with doubled
    #    learning rates (Muon 0.04, lm_head 0.012, embedding 0.2) and a 40 % warm-down reached only
    #    2.5062 (2.5353 at step 100 of the 150-step run), so fewer steps cannot keep the val bpb;
    #  - 2 micro-batches of 8 rows: 1 micro-batch of 16 ran at the same tokens/s (7,477 vs 7,453);
    #  - Ray Data tokenizing ahead and DeepSpeed on 2 workers: the demo shows the distributed path; data
    #    never stalls a step after the first (wait 0 ms in every log line);
    #  - evaluation and checkpoints every 50 steps: ~1 s each, and a resumable demo.
    # What cut the time from 217-228 s: the soft-capped loss kernel on CPU (1.12 -> 0.7 s per step) and
    # DeepSpeed's CPU op no longer recompiled at start-up (56 -> 26 s), both outside this preset.
    "demo": {
        "tokenizer.vocab_size": 4096,
        "tokenizer.max_chars": 4_000_000,
        "data.num_shards": 2,
        "data.download_workers": 2,
        "data.packing": "concat",   # book-length documents: best-fit at T=256 would crop ~80% of the tokens
        "data.buffer_docs": 64,
        "data.tokenizer_batch_size": 128,
        "data.tasks_per_rank": 2,
        "data.buffer_mb": 8,
        **{f"{stage}.{k}": v for stage in ("pretrain", "midtrain", "sft") for k, v in {
            "num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5, "dtype": "fp32", "compile": False,
            "zero_stage": 2, "log_every": 10, "save_every": 50, "eval_every": 50,
        }.items()},
        "pretrain.depth": 2,
        "pretrain.max_seq_len": 256,
        "pretrain.sequence_len": 256,
        "pretrain.device_batch_size": 8,
        "pretrain.total_batch_size": 8192,
        "pretrain.num_iterations": 150,
        "pretrain.embedding_lr": 0.1,
        "pretrain.eval_tokens": 16384,
        "pretrain.core_every": 0,
        "pretrain.core_max_per_task": 16,
        "midtrain.sequence_len": 256,
        "midtrain.device_batch_size": 8,
        "midtrain.total_batch_size": 4096,
        "midtrain.eval_tokens": 8192,
        "midtrain.mixture": "smoltalk,mmlu-aux:1000,gsm8k:400,identity:300*2,spelling:400,spelling-bee:100",
        "sft.sequence_len": 256,
        "sft.device_batch_size": 4,
        "sft.total_batch_size": 8,
        "sft.eval_tokens": 8192,
        "sft.mixture": "arc-easy:200,arc-challenge:100,gsm8k:100,smoltalk,identity:200,spelling:100,spelling-bee:100",
        "rl.num_workers": 2, "rl.use_gpu": False, "rl.cpus_per_worker": 0.5, "rl.dtype": "fp32",
        "rl.num_rollout_actors": 2, "rl.num_samples": 4, "rl.examples_per_step": 4, "rl.max_new_tokens": 48,
        "rl.device_batch_size": 4, "rl.num_iterations": 4, "rl.sequence_len": 256, "rl.log_every": 1,
        "rl.save_every": 2, "rl.eval_every": 0, "rl.eval_problems": 8, "rl.eval_samples": 2,
        "eval.num_actors": 2, "eval.use_gpu": False, "eval.core_max_per_task": 16,
        "eval.bpb_tokens": 16384, "eval.batch_size": 8, "eval.max_problems": 16,
        "serve.use_gpu": False, "serve.cpus_per_replica": 1.0, "serve.max_batch_size": 32,
        "serve.default_max_tokens": 64, "serve.source": "sft",
    },
    "d20": _gpu_tier(20, 32),   # 561 M parameters, ~4 h on 8xH100 (nanochat's $100 run)
    "d26": _gpu_tier(26, 16),   # ~1.1 B parameters, ~12 h
    "d32": _gpu_tier(32, 8),    # ~1.9 B parameters, ~33 h
}


def load_config(preset: str = "d20", overrides: list[str] | None = None) -> Config:
    """The effective config: a preset, then `section.field=value` overrides, validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for key, value in PRESETS[preset].items():
        cfg.set(key, value)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad override '{item}': expected section.field=value")
        cfg.set(key.strip(), value)
    cfg.validate()
    return cfg
