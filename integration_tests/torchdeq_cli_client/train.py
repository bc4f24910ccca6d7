"""A small TorchDEQ command-line training script, written the way TorchDEQ codebases are.

argparse with TorchDEQ's ``add_deq_args``, ``get_deq(args)``, ``apply_norm(model,
args=args)``, ``reset_norm`` at the top of ``forward``, a DataLoader with spawned workers,
an EMA copy made with ``copy.deepcopy``, a checkpoint saved and reloaded. Only the lines
marked ``# pcdeq`` were added for pcDEQ; everything else is plain TorchDEQ, and the
command line chooses pcDEQ::

    python train.py --out run/ --f_solver pcdeq --b_solver pcdeq --norm_type pc_nonneg

It writes ``metrics.json`` (losses, solver statistics, weight minima) and
``checkpoint.pt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchdeq import add_deq_args, apply_norm, get_deq, reset_norm

import pcdeq_plugin  # pcdeq

pcdeq_plugin.register("pcdeq")  # pcdeq (module level: spawned workers import this file too)

CLASSES = 4
SIDE = 8


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DEQ classifier on synthetic patterns")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ema_decay", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    add_deq_args(parser)
    pcdeq_plugin.add_pcdeq_args(parser)  # pcdeq
    return parser.parse_args(argv)


class Patterns(Dataset):
    """Class k lights up quadrant k of an 8x8 image; noise makes it a little harder."""

    def __init__(self, samples: int, seed: int) -> None:
        self.samples, self.seed = samples, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        label = index % CLASSES
        image = 0.3 * torch.randn(1, SIDE, SIDE, generator=generator)
        half = SIDE // 2
        row, col = divmod(label, 2)
        image[:, row * half : (row + 1) * half, col * half : (col + 1) * half] += 1.0
        return image, label


class DEQCell(nn.Conv2d):
    """The equilibrium layer ``z = tanh(conv(z) + u)``: a Conv2d subclass of our own."""

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.tanh(F.conv2d(z, self.weight, None, self.stride, self.padding) + u)


class DEQNet(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        width = args.channels
        self.inj = nn.Conv2d(1, width, 3, padding=1)
        self.cell = DEQCell(width, width, 3, padding=1, bias=False)
        self.head = nn.Linear(4 * width, CLASSES)
        with torch.no_grad():
            self.cell.weight.uniform_(0.0, 0.5 / (9 * width))
        self.deq = get_deq(args)
        apply_norm(self, args=args, filter_out=["inj", "head"])
        self.backward_stats: list[dict] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        reset_norm(self)
        u = F.softplus(self.inj(x), beta=5.0)  # a strictly positive injection
        z_out, info = self.deq(
            lambda z: self.cell(z, u), torch.zeros_like(u), backward_writer=self._record
        )
        pooled = F.adaptive_avg_pool2d(z_out[-1], 2).flatten(1)  # one value per quadrant
        return self.head(pooled), info

    def _record(self, info: dict) -> None:
        self.backward_stats.append(
            {"keys": sorted(info), "nstep": float(info["nstep"].float().mean())}
        )


def qualname(function: object) -> str:
    return f"{function.__module__}.{function.__qualname__}"


def evaluate(model: DEQNet, loader: DataLoader) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits, _ = model(images)
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    model.train()
    return total / count


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    loader = DataLoader(
        Patterns(args.samples, args.seed),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        multiprocessing_context="spawn" if args.workers else None,
        persistent_workers=args.workers > 0,
    )
    model = DEQNet(args)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    metrics: dict = {
        "f_solver": qualname(model.deq.f_solver),
        "b_solver": qualname(model.deq.b_solver),
        "losses": [],
        "forward": [],
        "weight_min": [],
    }
    for _epoch in range(args.epochs):
        for images, labels in loader:
            logits, info = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.mul_(args.ema_decay).add_(p, alpha=1 - args.ema_decay)
            metrics["losses"].append(float(loss.detach()))
            metrics["forward"].append(
                {
                    "keys": sorted(info),
                    "nstep": float(info["nstep"].float().mean()),
                    "rel_lowest": float(info["rel_lowest"].max()),
                    "trace_len": int(info["rel_trace"].shape[1]),
                    "pc_min": float(info["pc_min"].min()) if "pc_min" in info else None,
                }
            )
            reset_norm(model)
            metrics["weight_min"].append(float(model.cell.weight.detach().min()))
    metrics["backward"] = model.backward_stats
    metrics["weight_max"] = float(model.cell.weight.detach().max())
    metrics["raw_min"] = min(float(p.detach().min()) for p in model.cell.parameters())

    path = os.path.join(args.out, "checkpoint.pt")
    torch.save(
        {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()},
        path,
    )
    restored, restored_ema = DEQNet(args), DEQNet(args)
    checkpoint = torch.load(path, weights_only=True)
    restored.load_state_dict(checkpoint["model"])
    restored_ema.load_state_dict(checkpoint["ema"])
    probe = torch.stack([Patterns(8, args.seed + 1)[i][0] for i in range(8)])
    model.eval()
    restored.eval()
    with torch.no_grad():
        metrics["reload_max_diff"] = float((model(probe)[0] - restored(probe)[0]).abs().max())
    metrics["state_dict_keys"] = sorted(checkpoint["model"])
    metrics["ema_loss"] = evaluate(restored_ema, loader)
    metrics["ema_weight_min"] = float(restored_ema.cell.weight.detach().min())
    with open(os.path.join(args.out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=1)
    print(f"first loss {metrics['losses'][0]:.4f}, last loss {metrics['losses'][-1]:.4f}")


if __name__ == "__main__":
    main()
