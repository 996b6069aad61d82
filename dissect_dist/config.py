"""The run configuration: one dataclass per component, validated at construction,
loaded from YAML plus `section.key=value` overrides. The DeepSpeed config is derived
from it (one source of truth) unless the user passes --deepspeed_config."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad key or value in the run config; raised before any process group starts."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "tiny-vit-28"  # an open_clip model name, or one of dissect_dist/model_configs
    pretrained: str | None = None  # an open_clip pretrained tag or a local checkpoint path
    # fp32; bf16: DeepSpeed's bf16 (bf16 weights and activations, fp32 master copy in the
    # optimizer); amp_bf16: fp32 weights with the training forward (and, with
    # selection.score_mode=eval, the scoring pass and evaluation) under torch.autocast
    # bf16, the structure of the reference code's `amp` (which autocasts to fp16 with a
    # gradient scaler; bf16 needs none).
    precision: Literal["fp32", "bf16", "amp_bf16"] = "fp32"
    # How open_clip's transformer blocks attend, in training, scoring and evaluation.
    # sdpa: one F.scaled_dot_product_attention call per block, is_causal in the text
    # tower (no mask tensor), no mask in the vision tower; same parameters and
    # state-dict keys, so checkpoints load either way (dissect_dist/attention.py). stock:
    # open_clip's nn.MultiheadAttention with its float causal mask.
    attention: Literal["sdpa", "stock"] = "sdpa"
    # torch's inference fast path of nn.MultiheadAttention, taken by every no-grad forward
    # in eval mode (the scoring pass, evaluation) under model.attention=stock. With an
    # attention mask (open_clip's text tower is causal) it is reported slower and larger
    # on CUDA than the path training uses (pytorch/pytorch#166166). auto: disabled on CUDA,
    # torch's default elsewhere (on CPU two timings showed no consistent difference:
    # benchmarks/README.md). With model.attention=sdpa no block calls
    # nn.MultiheadAttention, so only auto is accepted there.
    mha_fastpath: Literal["auto", "enabled", "disabled"] = "auto"

    def __post_init__(self) -> None:
        _check(self.precision in ("fp32", "bf16", "amp_bf16"), "model.precision",
               "use fp32, bf16 or amp_bf16")
        _check(self.attention in ("sdpa", "stock"), "model.attention", "sdpa or stock")
        _check(self.mha_fastpath == "auto" or self.attention == "stock", "model.mha_fastpath",
               f"{self.mha_fastpath!r} has no effect with model.attention=sdpa (no block "
               "calls nn.MultiheadAttention): set model.attention=stock to choose MHA's "
               "fast path, or leave mha_fastpath=auto")


@dataclasses.dataclass(kw_only=True, slots=True)
class DataConfig:
    # The training shards' manifest.json (python -m dissect_dist.data manifest): shard URL
    # -> sample count, which gives every sample its dense id. Required.
    train_manifest: str = ""
    batch_size: int = 64  # per rank, before selection
    workers: int = 2  # data worker processes per rank (0: decode on the rank's own thread)
    shuffle_window: int = 4  # shards whose samples are shuffled together (1: within a shard)
    noise_ledger: str | None = None  # ids of corrupted pairs: evaluation only
    zeroshot_dir: str | None = None  # a builder's output dir holding test/ and classes.json
    retrieval_manifest: str | None = None  # held-out pairs for image<->text retrieval
    # How a decoded crop is resized to the model's input (dissect_dist/data/decode.py).
    # fast: torch's vectorised antialiased kernels (PIL's bicubic/bilinear filters, within
    # one grey level of PIL's output) on the crop box rounded to whole decoded pixels (a
    # shift of under half an output pixel when the JPEG was decoded at reduced size).
    # exact: PIL's resize of the exact box, as open_clip's transform (~6x slower per crop).
    resampling: Literal["fast", "exact"] = "fast"
    # Where training JPEGs are decoded. workers: in the data workers (reduced-size DCT
    # decoding, above). device: on the training device, in the training process
    # (torchvision's decode_jpeg: nvJPEG on a GPU), at full size; the workers only read
    # the bytes, draw the crop and tokenise, so a host with few cores per GPU keeps up.
    # Images the device decoder does not take (not JPEG, CMYK) are still decoded by the
    # workers. The resize runs in float32 on the device, rounded to 8 bits after each
    # pass (within one grey level of the workers' uint8 kernel on the same pixels), so it
    # needs resampling=fast; evaluation sets are always decoded on the host.
    decode: Literal["workers", "device"] = "workers"
    # How long a rank waits for its next batch from a data worker before the run stops
    # (exit 5, one line naming the rank, the worker and the shard it was reading). Covers
    # a cold read of a shard from object storage; with workers: 0 the read happens on the
    # rank's main thread, and train.collective_timeout_s bounds it instead.
    worker_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check(bool(self.train_manifest), "data.train_manifest",
               "required: the manifest.json of the training shards")
        _check(self.batch_size >= 1, "data.batch_size", f"{self.batch_size}: need >= 1")
        _check(self.workers >= 0, "data.workers", f"{self.workers}: need >= 0")
        _check(self.worker_timeout_s > 0, "data.worker_timeout_s",
               f"{self.worker_timeout_s}: need > 0 (seconds a rank waits for a batch)")
        _check(self.resampling in ("fast", "exact"), "data.resampling",
               f"{self.resampling!r}: choose fast or exact")
        _check(self.decode in ("workers", "device"), "data.decode",
               f"{self.decode!r}: choose workers or device")
        _check(self.decode == "workers" or self.resampling == "fast", "data.decode",
               "device resizes on the device (data.resampling=fast); data.resampling=exact "
               "(PIL's resize) needs data.decode=workers")
        _check(self.shuffle_window >= 1, "data.shuffle_window",
               f"{self.shuffle_window}: need >= 1 (shards whose samples are shuffled "
               "together; 1 = within each shard)")


@dataclasses.dataclass(kw_only=True, slots=True)
class SelectionConfig:
    # Which rows a step trains on: dissect_momentum (the paper's delta = hist - curr with a
    # momentum history), full (every row), random (a uniform r share), and the others of
    # dissect_dist.selection.REGISTRY.
    strategy: str = "dissect_momentum"
    ratio: float = 0.3  # r: the share of each step's global batch that is trained on
    # global: rank the whole step's batch across ranks (one exchange); local: each rank
    # ranks its own rows (no exchange; its own random stream, so no resume at another size)
    scope: Literal["global", "local"] = "global"
    beta: float = 0.9  # the history's momentum: hist <- beta * hist + (1 - beta) * curr
    # The ranking key of a sample with no history yet: curr ranks it by delta = 0 (ties
    # at random); zero by 0 - curr, keeping the lowest-scoring pairs, as the reference
    # code ranks its first epoch against a zero-initialised history.
    first_sight: Literal["curr", "zero"] = "curr"
    # strategy dissect_warmup: epochs trained on a random r share (or everything) while
    # scores are recorded, before selection by delta starts
    warmup_epochs: int = 1
    warmup_train: Literal["random", "full"] = "random"  # dissect_warmup: what warm-up trains
    # How the no-grad scoring pass runs. eval: the model in eval mode (BatchNorm normalises
    # with its running statistics, no dropout) under the training precision, so a pair's
    # score does not depend on its batch-mates. reference: as the reference code scores,
    # in train mode (BatchNorm uses and updates the batch's statistics; dropout active)
    # and outside autocast (fp32 unless the weights themselves are bf16: precision=bf16),
    # TF32 matmuls allowed on CUDA. benchmarks/scoring_mode.py measures the difference.
    score_mode: Literal["eval", "reference"] = "eval"
    # Run the scoring pass through torch.compile (its own compiled function: the training
    # forward stays eager). The first steps pay the compilation (one per batch shape;
    # benchmarks/README.md gives the cost); needs a C++ compiler on CPU, Triton on CUDA.
    compile_scoring: bool = False
    # The cheap scoring pass: drop this share of the image patch tokens (ViT models) in
    # the scoring pass only, drawn per step from train.seed; its FLOPs fall about in
    # proportion, and the scores are noisier (benchmarks/cheap_scoring.py measures both).
    # 0 = off.
    score_patch_dropout: float = 0.0
    # The cheaper scoring pass at a lower image resolution (ViT models): images resized
    # (bilinear, antialiased) to this many pixels a side and the position embeddings
    # interpolated (bicubic) to the smaller patch grid, in the scoring pass only; a multiple
    # of the model's patch size below its image size. Counted in the FLOPs; measured by
    # benchmarks/cheap_scoring.py. 0 = the model's own resolution.
    score_resolution: int = 0
    # Selection health without a noise ledger: this share of the training samples (chosen
    # by sample id and train.seed, the same at any world size) gets another row's caption,
    # and the log says how many of them the selection keeps (canary_kept_share against
    # canary_share) and how it ranks them (key_auroc_rest_vs_canary); dissect_dist/canaries.py.
    # 0 = off; 0.005 costs half a percent of the data.
    canaries: float = 0.0
    # Strategies learnability and reference_filter: the reference model's scores of every
    # pair of data.train_manifest, a score-store snapshot written by launch/score.py (a
    # path or URL). Read-only; its cost (recorded in the snapshot) is charged to the run's
    # FLOPs (train.max_flops).
    reference: str | None = None

    def __post_init__(self) -> None:
        from dissect_dist.selection import REGISTRY

        _check(self.strategy in REGISTRY, "selection.strategy",
               f"{self.strategy!r}: choose one of {sorted(REGISTRY)}")
        _check(0.0 < self.ratio <= 1.0, "selection.ratio", f"{self.ratio}: need 0 < r <= 1")
        _check(self.scope in ("global", "local"), "selection.scope", "use global or local")
        _check(0.0 <= self.beta < 1.0, "selection.beta", f"{self.beta}: need 0 <= beta < 1")
        _check(self.first_sight in ("curr", "zero"), "selection.first_sight", "curr or zero")
        _check(self.warmup_epochs >= 0, "selection.warmup_epochs", "need >= 0")
        _check(self.warmup_train in ("random", "full"), "selection.warmup_train",
               "random or full")
        _check(0.0 <= self.score_patch_dropout < 1.0, "selection.score_patch_dropout",
               f"{self.score_patch_dropout}: a share of the patches, 0 (off) <= p < 1")
        _check(not (self.score_patch_dropout and self.compile_scoring),
               "selection.score_patch_dropout", "not with selection.compile_scoring (the "
               "compiled pass has fixed shapes); set one of them off")
        _check(self.score_resolution >= 0, "selection.score_resolution",
               f"{self.score_resolution}: pixels a side, or 0 (the model's resolution)")
        _check(not (self.score_resolution and self.compile_scoring),
               "selection.score_resolution", "not with selection.compile_scoring (the "
               "compiled pass has fixed shapes); set one of them off")
        _check(self.score_mode in ("eval", "reference"), "selection.score_mode",
               "eval or reference")
        _check(0.0 <= self.canaries < 0.5, "selection.canaries",
               f"{self.canaries}: a share of the samples, 0 (off) <= c < 0.5")
        if self.strategy in ("full", "oracle"):
            self.ratio = 1.0  # they keep what they keep, whatever r


@dataclasses.dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-3  # AdamW's peak learning rate
    weight_decay: float = 0.1  # on matrices only (not on biases, norms, scales)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.98  # AdamW's second-moment decay
    eps: float = 1e-6  # AdamW's epsilon
    # Linear warm-up over this many reference steps (steps of the saving world's global
    # batch), then the schedule.
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine decay to 0 at the run's end
    # Clip the global gradient norm at this value; 0 = no clipping, which also drops the
    # per-step norm and bf16 overflow check under ZeRO 1/2 (deepspeed_config). 1.0 is what
    # every run so far trained with: DeepSpeed clips at 1.0 when its config does not say,
    # and the config did not say until deepspeed_config always stated the value.
    grad_clip: float = 1.0
    # torch's fused AdamW kernel (CPU and CUDA): one pass over each parameter instead of a
    # dozen elementwise ops; 4x faster on the tiny CPU models. false = torch's default loop.
    fused: bool = True

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"{self.lr}: need > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "need >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "need >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"{self.grad_clip}: a norm > 0, or 0 "
               "(no clipping)")
        _check(self.schedule in ("cosine", "constant"), "optim.schedule", "cosine or constant")


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainConfig:
    epochs: int = 1  # passes over the training shards
    max_steps: int | None = None  # stop early (a smoke run); None = epochs * steps/epoch
    # Stop once the run has spent this many FLOPs on scoring and training (0: no budget):
    # equal-compute comparisons give every strategy the same budget. Counted as
    # dissect_dist/compute.py says; the run also stops at epochs or max_steps if sooner.
    max_flops: float = 0.0
    seed: int = 0  # model init, sample order, augmentation and random draws
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1 (optimizer state) or 2 (+ gradients)
    # Where the run writes: checkpoints/, metrics.jsonl, tb/ (TensorBoard), tokens/, the
    # exported open_clip_model.pt.
    run_dir: str = "runs/default"
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # complete checkpoints kept; older ones are deleted
    eval_every: int = 0  # steps; 0 = only at the end; -1 = at the end of every epoch
    log_every: int = 10  # steps per metrics.jsonl train row (the last step always logs)
    # write each step's ids, keep mask and ranking key per rank (audits, tests)
    record_samples: bool = False
    # Time each phase of the step (time_<phase>_ms: input = copies to the device,
    # normalisation and data.decode=device's decoding; score; wait; select; fwd_bwd; optim);
    # adds device syncs on GPU and a barrier before the selection so that rank skew is
    # booked as `wait`, not as exchange time.
    time_breakdown: bool = False
    # Score every batch even when the strategy does not need it, and log per epoch the mean
    # CLIPScore of clean and of noisy pairs (needs data.noise_ledger): the memorisation
    # diagnostic. Costs one no-grad forward per step for full/random.
    diagnose_scores: bool = False
    # How long a rank waits in one collective (all-reduce, all-gather, barrier) before it
    # gives up: a lost host or a cut network then ends the run with one line naming the
    # lost ranks and the last committed checkpoint (exit 4), instead of hanging for torch's
    # 30 minutes. It must exceed the longest time one rank can keep the others waiting:
    # rank 0's evaluation on the retrieval set, and the one-off conversion of a ZeRO
    # checkpoint to the universal format when a run resumes at another world size.
    collective_timeout_s: float = 600.0
    # Profile this launch's steps profile_at .. profile_at + profile_steps - 1 with
    # torch.profiler (0: off): RUN/profile/rank{r}.trace.json and rank{r}.txt.
    profile_at: int = 0
    profile_steps: int = 3  # how many steps are profiled from profile_at

    def __post_init__(self) -> None:
        _check(self.collective_timeout_s >= 5, "train.collective_timeout_s",
               f"{self.collective_timeout_s}: need >= 5 (seconds one collective may wait)")
        _check(self.profile_at == 0 or self.profile_at >= 2, "train.profile_at",
               f"{self.profile_at}: 0 (off) or a step >= 2 (the step before warms the "
               "profiler up)")
        _check(self.profile_steps >= 1, "train.profile_steps", f"{self.profile_steps}: need >= 1")
        _check(self.epochs >= 1, "train.epochs", f"{self.epochs}: need >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "need >= 1")
        _check(self.max_flops >= 0, "train.max_flops", f"{self.max_flops}: need >= 0 "
               "(0: no FLOP budget)")
        _check(self.zero_stage in (0, 1, 2), "train.zero_stage", "0, 1 or 2")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "need >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "need >= 1")
        _check(self.eval_every >= -1, "train.eval_every", "steps >= 1, 0 (end only) or -1 "
               "(every epoch)")
        _check(self.log_every >= 1, "train.log_every",
               f"{self.log_every}: need >= 1 (steps per log row; the last step is always "
               "logged)")


@dataclasses.dataclass(kw_only=True, slots=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.selection.strategy != "oracle" or bool(self.data.noise_ledger),
               "selection.strategy", "oracle keeps the pairs the noise ledger does not list: "
               "set data.noise_ledger (a benchmark arm; real data has no ledger)")
        _check(self.selection.strategy not in ("learnability", "reference_filter")
               or bool(self.selection.reference), "selection.reference",
               f"strategy {self.selection.strategy} reads a reference model's scores: score "
               "the manifest once with `deepspeed launch/score.py --config ... --model CKPT "
               "--out URL` and set selection.reference=URL")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def deepspeed_config(self) -> dict[str, Any]:
        """The engine's config. Under ZeRO 1/2: every parameter padded to 16 bytes in the
        flat buffer (dissect_dist/engine.py says why), and, without gradient clipping, no
        per-step work that only clipping reads: the global gradient norm (an all-reduce)
        and the bf16 overflow check (an all-reduce and a host sync; bf16 has fp32's range
        and no loss scale, so there is no scale to adjust). With clipping both stay as
        DeepSpeed runs them. ZeRO 0 bf16 runs DeepSpeed's unfused bf16 optimizer, which
        computes the norm and checks overflow every step and has no setting to skip them."""
        zero: dict[str, Any] = {"stage": self.train.zero_stage}
        bf16: dict[str, Any] = {"enabled": self.model.precision == "bf16"}
        clip = self.optim.grad_clip > 0
        if self.train.zero_stage >= 1:
            zero["parameter_alignment"] = True
            if not clip:
                zero["compute_grad_norm"] = False
                if bf16["enabled"]:
                    bf16["check_grad_overflow"] = False
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.data.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "bf16": bf16,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            # Always stated: left out, DeepSpeed 0.19 clips at 1.0.
            "gradient_clipping": self.optim.grad_clip,
        }
        return cfg


_CLASSES = {"model": ModelConfig, "data": DataConfig, "selection": SelectionConfig,
            "optim": OptimConfig, "train": TrainConfig}


def _coerce(section: str, key: str, value: Any) -> Any:
    hints = typing.get_type_hints(_CLASSES[section])
    t = hints[key]
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if value is None:
        return None
    if t is float or (origin is typing.Union and float in args):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{section}.{key}: {value!r} is not a number") from e
    if t is int or (origin is typing.Union and int in args):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{section}.{key}: {value!r} is not an integer")
    if t is bool and not isinstance(value, bool):
        raise ConfigError(f"{section}.{key}: {value!r} is not true or false")
    if t is str and not isinstance(value, str):
        return str(value)
    if origin is Literal and value not in args:
        raise ConfigError(f"{section}.{key}: {value!r}, choose one of {list(args)}")
    return value


def build_config(doc: dict[str, Any]) -> RunConfig:
    unknown = set(doc) - set(_CLASSES)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; "
                          f"sections are {sorted(_CLASSES)}")
    parts: dict[str, Any] = {}
    for section, cls in _CLASSES.items():
        values = doc.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - fields
        if bad:
            raise ConfigError(f"{section}.{sorted(bad)[0]}: unknown key; {section} keys are "
                              f"{sorted(fields)}")
        kwargs = {k: _coerce(section, k, v) for k, v in values.items()}
        try:
            parts[section] = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{section}: {e}") from e
    return RunConfig(**parts)


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings; values are parsed as YAML (numbers, null, lists)."""
    doc = {k: dict(v or {}) for k, v in doc.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: write section.key=value, e.g. "
                              "selection.ratio=0.5")
        path, raw = item.split("=", 1)
        section, key = path.split(".", 1)
        doc.setdefault(section, {})[key] = yaml.safe_load(raw)
    return doc


def load_config(path: str | None, overrides: list[str]) -> RunConfig:
    doc: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"--config {path}: no such file")
        doc = yaml.safe_load(p.read_text()) or {}
    return build_config(apply_overrides(doc, overrides))


def _local_path(url: str) -> str | None:
    """The filesystem path of a plain or file:// URL; None for other schemes (s3://...),
    which are left to the reader that opens them."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _missing(url: str, what: str) -> str | None:
    path = _local_path(url)
    if path is None or os.path.isfile(path):
        return None
    where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
    return f"{url}: no such file{where}; {what}"


def validate_environment(cfg: RunConfig) -> None:
    """The checks a RunConfig cannot make on its own values: that the files it names
    exist and that open_clip (with dissect_dist/model_configs) knows the model. Run by
    launch/train.py after load_config and before DeepSpeed is imported, so that a typo
    fails in seconds with the key's name instead of inside every rank. Local paths only:
    URLs with another scheme are read (and reported) by the data pipeline."""
    d = cfg.data
    err = _missing(d.train_manifest, "build one with python -m dissect_dist.data (its "
                   "fashion-mnist and icons builders write DIR/train/manifest.json; "
                   "`manifest SHARDS --out PATH` indexes existing shards)")
    _check(err is None, "data.train_manifest", str(err))
    if d.noise_ledger:
        err = _missing(d.noise_ledger, "the dataset builders write train/noise_ledger.npy "
                       "beside the manifest; or set data.noise_ledger=null (it only feeds "
                       "evaluation metrics)")
        _check(err is None, "data.noise_ledger", str(err))
    if d.zeroshot_dir:
        off = "or set data.zeroshot_dir=null"
        root = _local_path(d.zeroshot_dir)
        if root is not None:
            _check(os.path.isdir(root), "data.zeroshot_dir",
                   f"{d.zeroshot_dir}: no such directory; point it at a builder's output "
                   f"directory (python -m dissect_dist.data fashion-mnist --out DIR), {off}")
            for rel, holds in (("classes.json", "the class names and prompt templates"),
                               ("test/manifest.json", "the manifest of the test split")):
                _check(os.path.isfile(os.path.join(root, rel)), "data.zeroshot_dir",
                       f"{d.zeroshot_dir} has no {rel} ({holds}); point it at a builder's "
                       f"output directory (python -m dissect_dist.data fashion-mnist --out "
                       f"DIR), {off}")
    if d.retrieval_manifest:
        err = _missing(d.retrieval_manifest, "the icons builder writes heldout/manifest.json; "
                       "or set data.retrieval_manifest=null")
        _check(err is None, "data.retrieval_manifest", str(err))
    from dissect_dist.model import check_name  # imports torch and open_clip: last

    try:
        check_name(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from e
    if cfg.selection.score_resolution:
        from dissect_dist.model import check_scoring_resolution

        try:
            check_scoring_resolution(cfg.model.name, cfg.selection.score_resolution)
        except ValueError as e:
            raise ConfigError(f"selection.score_resolution: {e}") from e
