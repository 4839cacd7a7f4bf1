"""Roofline accounting for the benchmarks: what matrix products a run did, and how fast this
machine does those same products alone.

    recorder = ShapeRecorder(model)             # hooks: adaptor rows, encoder (b, t), scores
    ... train an epoch ...
    gemms = recorder.gemms(training=True, backward=True)
    peak = gemm_seconds(gemms)                  # plain fp32 torch.mm of every shape, timed now
    roofline_fraction = peak / measured_seconds # = achieved FLOP/s over the matmul peak

The same-shape peak is measured in the same run, shape by shape, so a small product's lower
speed counts against the peak, not against the run; on a shared machine both sides see the
same load. It is no roof, though: a skinny product (attention's ``(bt, H) @ (H, t)``) timed as
one plain ``torch.mm`` can be slower than the fused kernel the model ran, so a run can "beat"
it. Evaluation is therefore compared with the machine's large square product instead
(:func:`square_gemm_gflops`, also timed in the same run), which no product of these shapes
exceeds.

Run alone, it measures the machine's plain fp32 matmul rate (one large square product), a
quick look at how busy a shared machine is before timing anything on it::

    python benchmarks/roofline.py [--size 2048] [--device cuda]  # -> results/matmul.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from machine_load import LoadAverage

from pretrain.flops import Gemm, adaptor_gemms, encoder_gemms, score_gemms
from pretrain.model import BackboneConfig, SequenceRecommender


def last_position_encoder_gemms(b: int, t: int, cfg: BackboneConfig) -> list[Gemm]:
    """The encoder over ``(b, t)`` positions when only each row's last output is read
    (:meth:`SequenceRecommender.encode_last`, no backward): every layer but the last in full
    (:func:`encoder_gemms`); in the last, keys and values ``(bt, H) @ (H, 2H)`` at every
    position, then the query ``(b, H) @ (H, H)``, one query's attention (``q k^T`` and
    ``p v`` over ``t`` keys), the output projection and the feed-forward at ``b`` rows."""
    h = cfg.hidden_size
    earlier = encoder_gemms(b, t, replace(cfg, num_layers=cfg.num_layers - 1), backward=False)
    return [gemm for gemm in earlier if gemm.count] + [
        Gemm(b * t, h, 2 * h),
        Gemm(b, h, h),
        Gemm(b, h, t, 2),
        Gemm(b, h, h),
        Gemm(b, h, cfg.inner_size),
        Gemm(b, cfg.inner_size, h),
    ]


class ShapeRecorder:
    """Records, while attached, the shapes a :class:`SequenceRecommender` computes on: rows
    through the adaptor (per call), ``(b, t)`` through the encoder (and whether only the last
    positions were asked for), ``(p, n)`` scored."""

    def __init__(self, model: SequenceRecommender):
        self.model = model
        self.adaptor: list[int] = []
        self.encoder: list[tuple[int, int]] = []
        self.encoder_last: list[tuple[int, int]] = []
        self.scores: list[tuple[int, int]] = []
        self._hooks = [
            model.encoder.register_forward_hook(self._on_encoder, with_kwargs=True),
        ]
        adaptor = getattr(model, "adaptor", None)
        if adaptor is not None:
            self._hooks.append(adaptor.register_forward_hook(self._on_adaptor))
        self._score = model.score
        model.score = self._on_score  # instance attribute shadows the method

    def _on_adaptor(self, module, inputs, output) -> None:
        self.adaptor.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0])

    def _on_encoder(self, module, inputs, kwargs, output) -> None:
        lengths = inputs[1] if len(inputs) > 1 else kwargs.get("lengths")
        (self.encoder if lengths is None else self.encoder_last).append(tuple(inputs[0].shape[:2]))

    def _on_score(self, queries, vectors, temperature):
        self.scores.append((queries.reshape(-1, queries.shape[-1]).shape[0], vectors.shape[0]))
        return self._score(queries, vectors, temperature)

    def clear(self) -> None:
        self.adaptor.clear()
        self.encoder.clear()
        self.encoder_last.clear()
        self.scores.clear()

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        del self.model.score

    def gemms(self, *, training: bool, backward: bool, text_dim: int) -> list[Gemm]:
        cfg = self.model.cfg
        out: list[Gemm] = []
        for n in self.adaptor:
            out += adaptor_gemms(n, text_dim, cfg, training=training, backward=backward)
        for b, t in self.encoder:
            out += encoder_gemms(b, t, cfg, backward=backward)
        for b, t in self.encoder_last:
            out += last_position_encoder_gemms(b, t, cfg)
        for p, n in self.scores:
            out += score_gemms(p, n, cfg.hidden_size, backward=backward)
        return out


def gemm_seconds(gemms: list[Gemm], repeats: int = 5, device: str = "cpu") -> float:
    """Seconds plain fp32 ``torch.mm`` takes for all ``gemms`` here and now: each distinct
    shape timed ``repeats`` times after a warm-up, the median kept (on a shared machine the
    fastest would be a lucky moment the measured run did not get), times its count."""
    counts: Counter[tuple[int, int, int]] = Counter()
    for gemm in gemms:
        counts[(gemm.m, gemm.k, gemm.n)] += gemm.count
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    total = 0.0
    for (m, k, n), count in counts.items():
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        out = torch.empty(m, n, device=device)
        torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            sync()
            times.append(time.perf_counter() - started)
        total += sorted(times)[len(times) // 2] * count
    return total


def square_gemm_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """GFLOP/s of one large square fp32 product: the machine's plain matmul rate."""
    seconds = gemm_seconds([Gemm(size, size, size)], repeats, device)
    return 2 * size**3 / seconds / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The machine's plain fp32 matmul rate.")
    parser.add_argument("--size", type=int, default=2048, help="side of the square product")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "matmul.json"
    )
    args = parser.parse_args(argv)
    load = LoadAverage()
    gflops = square_gemm_gflops(args.size, args.repeats, args.device)
    result = {
        "size": args.size,
        "repeats": args.repeats,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "square_gemm_gflops": round(gflops, 2),
        "load": load.record(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fp32 {args.size}^3 product on {args.device}: {gflops:.1f} GFLOP/s -> {args.out}")


if __name__ == "__main__":
    main()
