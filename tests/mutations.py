"""Inject plausible model bugs one at a time and check the test suite catches each.

    .venv/bin/python tests/mutations.py            # all mutations
    .venv/bin/python tests/mutations.py pre-ln     # the named ones

Each mutation edits one copy of the project (in a temporary directory; the working tree is
never touched) and runs the test files that should catch it. A mutation the tests let
through prints MISSED and the script exits 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_TESTS = ["tests/test_model_reference.py", "tests/test_moe_adaptor.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (exact old text, new text), each must occur once
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "pre-ln",
        "pre-LN blocks instead of post-LN, input LayerNorm removed",
        "pretrain/model.py",
        (
            ("q, k, v = self.qkv(x).view(", "q, k, v = self.qkv(self.norm(x)).view("),
            (
                "return self.norm(x + self.dropout(self.out(attn)))",
                "return x + self.dropout(self.out(attn))",
            ),
            (
                "return self.norm(x + self.dropout(self.down(F.gelu(self.up(x)))))",
                "return x + self.dropout(self.down(F.gelu(self.up(self.norm(x)))))",
            ),
            (
                "x = self.dropout(self.norm(item_vecs + positions))",
                "x = self.dropout(item_vecs + positions)",
            ),
        ),
        tuple(MODEL_TESTS),
    ),
    Mutation(
        "constant-gate-noise",
        "gate noise with a constant std instead of softplus(x W_noise) + 0.01",
        "pretrain/model.py",
        (("std = F.softplus(x @ self.w_noise) + 1e-2", "std = torch.ones_like(logits)"),),
        tuple(MODEL_TESTS),
    ),
    Mutation(
        "dropout-after-shift",
        "whitening as dropout(x - b) W instead of (dropout(x) - b) W",
        "pretrain/model.py",
        (
            (
                "return out - self.lin(self.bias) if self.bias is not None else out",
                "return self.lin(self.dropout(x - self.bias))",
            ),
        ),
        tuple(MODEL_TESTS),
    ),
    Mutation(
        "relu",
        "ReLU instead of GELU in the feed-forward",
        "pretrain/model.py",
        (("self.down(F.gelu(self.up(x)))", "self.down(F.relu(self.up(x)))"),),
        tuple(MODEL_TESTS),
    ),
    Mutation(
        "not-causal",
        "attention sees the future",
        "pretrain/model.py",
        (("is_causal=True,", "is_causal=False,"),),
        tuple(MODEL_TESTS),
    ),
    Mutation(
        "dot-product-scores",
        "UniSRec scores by dot product instead of cosine / temperature",
        "pretrain/model.py",
        (
            (
                "return (F.normalize(queries, dim=-1) / temperature) @ F.normalize(vectors, dim=-1).T",
                "return queries @ vectors.T",
            ),
        ),
        tuple(MODEL_TESTS),
    ),
    Mutation(
        "exclude-history-noop",
        "exclude_history excludes nothing",
        "adaptors/evaluate.py",
        (("histories=histories if exclude_history else None,", "histories=None,"),),
        ("tests/test_evaluate.py",),
    ),
]


def _copy_project(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)


def run(mutation: Mutation) -> bool:
    """True when the tests fail with the mutation applied (the bug is caught)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        copy = Path(tmp)
        _copy_project(copy)
        path = copy / mutation.file
        text = path.read_text(encoding="utf-8")
        for old, new in mutation.edits:
            if text.count(old) != 1:
                raise SystemExit(f"{mutation.name}: {old!r} occurs {text.count(old)}x in {path}")
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
            cwd=copy,
            env={**os.environ, "PYTHONPATH": str(copy)},
            capture_output=True,
            text=True,
        )
        return done.returncode != 0


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    missed = 0
    for mutation in chosen:
        caught = run(mutation)
        missed += not caught
        print(f"{'caught' if caught else 'MISSED':<7} {mutation.name:<22} {mutation.what}")
    print(f"{len(chosen) - missed} of {len(chosen)} injected bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
