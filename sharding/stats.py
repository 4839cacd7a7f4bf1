"""A dataset manifest as a short human-readable table."""

from __future__ import annotations

TIED_NOTE = (
    "groups: tie groups (>= 2 interactions of one user at one timestamp); tied: interactions\n"
    "in them, ordered by 'ties' (file order, or shuffle:SEED), not by time"
)


def format_stats(manifest: dict) -> str:
    header = (
        f"{'domain':<14} {'users':>9} {'items':>9} {'interactions':>13} {'pretrain':>9} "
        f"{'ties':>10} {'groups':>9} {'tied':>17}"
    )
    lines = [header, "-" * len(header)]
    for name, d in manifest["domains"].items():
        order, groups, tied = _ties(d)
        lines.append(
            f"{name:<14} {d['num_users']:>9,} {d['num_items']:>9,} {d['num_interactions']:>13,} "
            f"{'yes' if d['pretrain'] else 'no':>9} {order:>10} {groups:>9} {tied:>17}"
        )
    lines.append(TIED_NOTE)
    enc = manifest["encoder"]
    lines.append(f"encoder: {enc['name']} ({enc['dim']}-d, {enc.get('pooling', 'cls')} pooling)")
    shards = manifest.get("shards")
    if shards:
        lines.append(
            f"shards: {len(shards['files'])} files, {shards['num_samples']:,} sequences "
            f"from {', '.join(shards['domains'])}"
        )
    lines.append(f"digest: {manifest['digest'][:16]}  format v{manifest['format_version']}")
    return "\n".join(lines)


def _ties(domain: dict) -> tuple[str, str, str]:
    """``(ties, groups, tied)`` cells: ``given`` where sequences came ordered (no timestamps), ``?``
    for a manifest written before ties were recorded."""
    if "ties" not in domain:
        return "?", "?", "?"
    ties = domain["ties"]
    if ties is None:
        return "given", "-", "-"
    order = ties["order"] if ties["seed"] is None else f"{ties['order']}:{ties['seed']}"
    share = ties["interactions"] / domain["num_interactions"] if domain["num_interactions"] else 0
    return order, f"{ties['groups']:,}", f"{ties['interactions']:,} ({share:.1%})"
