"""Training-step cost of each fusion strategy at 1, 2 and 3 encoders with base-size token counts.

    python bench/fusion_cost.py                 # all strategies in conf/fusion/, 1-3 encoders
    python bench/fusion_cost.py --strategies token_concat --encoders 3 --steps 5 --reduce 16 49

Each (strategy, number of encoders) runs in its own subprocess so its peak memory is its own. Printed:
step time and peak memory as ratios to ``token_concat`` with one encoder, FLOPs of one step (counted by
``torch.utils.flop_counter``), achieved FLOP/s, and that as a share of a bare fp32 matmul measured in the
same run. Features are random ``(B, 197, 768)`` tokens per encoder (ViT-B/16 at 224 px): the frozen
encoders are not part of the fusion cost (their features can come from the cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENS, ENC_DIM, TEXT_LEN, TEXT_DIM, NUM_CLASSES = 197, 768, 32, 384, 3129


def bare_matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square fp32 matmul: the machine's practical peak for this kind of work."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def build(strategy: str, n_encoders: int, overrides: list[str]):
    """The fusion model of ``conf/fusion/<strategy>.yaml`` + a VQA-sized head and its optimizer."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fusion.model.heads import ClassifierHead

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"fusion={strategy}", *overrides])
    names = [f"enc{i}" for i in range(n_encoders)]
    fusion = instantiate(cfg.fusion)(
        encoder_dims={n: ENC_DIM for n in names},
        encoder_tokens={n: TOKENS for n in names},
        encoder_prefix={n: 1 for n in names},
        text_dim=TEXT_DIM,
    )
    head = ClassifierHead(fusion.width, NUM_CLASSES)
    params = [*fusion.parameters(), *head.parameters()]
    # foreach AdamW: one multi-tensor kernel per step instead of a loop over parameters.
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return names, fusion, head, optimizer


def measure(strategy: str, n_encoders: int, batch: int, steps: int, overrides: list[str]) -> dict:
    """One configuration, in this process: seconds per step, FLOPs per step, peak RSS growth (MiB)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    names, fusion, head, optimizer = build(strategy, n_encoders, overrides)
    fusion.train()
    features = {n: torch.randn(batch, TOKENS, ENC_DIM) for n in names}
    keep = torch.ones(batch, n_encoders, dtype=torch.bool)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM)
    text_mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    labels = torch.randint(0, NUM_CLASSES, (batch,))

    def step() -> int:
        out = fusion(features, keep, text, text_mask)
        loss = torch.nn.functional.cross_entropy(head(out.pooled), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.hidden.shape[1] - 1 - TEXT_LEN  # visual tokens the transformer saw

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    visual_tokens = step()  # warm-up: allocates optimizer state
    with FlopCounterMode(display=False) as counter:
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"seconds": seconds, "flops": counter.get_total_flops(), "peak_mib": peak, "visual_tokens": visual_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="*", default=None, help="default: every conf/fusion/*.yaml")
    parser.add_argument("--encoders", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--override", nargs="*", default=["fusion.width=768", "fusion.depth=4",
                        "fusion.num_heads=12", "fusion.dropout=0.0"], help="Hydra overrides for the fusion model")
    parser.add_argument("--reduce", nargs="*", type=int, default=[49],
                        help="also run token_concat with fusion.tokens_per_encoder=K for each K (token reduction)")
    parser.add_argument("--one", nargs=2, metavar=("STRATEGY", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child process: one configuration, JSON on stdout
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.batch, args.steps, args.override)))
        return

    strategies = args.strategies or sorted(p.stem for p in (ROOT / "conf" / "fusion").glob("*.yaml"))
    peak = bare_matmul_flops()
    print(f"bare fp32 matmul: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(f"batch {args.batch}, {TOKENS} tokens x {ENC_DIM} per encoder, overrides {args.override}\n")
    variants = [(s, s, []) for s in strategies]
    if "token_concat" in strategies:
        variants += [(f"token_concat/K={k}", "token_concat", [f"fusion.tokens_per_encoder={k}"]) for k in args.reduce]
    rows, base = [], None
    for label, strategy, extra in variants:
        for n in args.encoders:
            cmd = [sys.executable, __file__, "--one", strategy, str(n), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--override", *args.override, *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{label} x{n}: failed\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if label == "token_concat" and n == 1:
                base = r
            rows.append((label, n, r))
    base = base or rows[0][2]
    header = f"{'strategy':<20}{'enc':>4}{'vis tok':>9}{'step s':>9}{'x time':>8}{'peak MiB':>10}{'x mem':>8}"
    header += f"{'GFLOP':>9}{'GFLOP/s':>9}{'% matmul':>10}"
    print(header)
    for strategy, n, r in rows:
        rate = r["flops"] / r["seconds"]
        print(f"{strategy:<20}{n:>4}{r['visual_tokens']:>9}{r['seconds']:>9.3f}{r['seconds'] / base['seconds']:>8.2f}"
              f"{r['peak_mib']:>10.0f}{r['peak_mib'] / max(base['peak_mib'], 1):>8.2f}"
              f"{r['flops'] / 1e9:>9.1f}{rate / 1e9:>9.1f}{100 * rate / peak:>9.0f}%")


if __name__ == "__main__":
    main()
