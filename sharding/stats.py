"""A dataset manifest as a short human-readable table."""

from __future__ import annotations


def format_stats(manifest: dict) -> str:
    header = f"{'domain':<14} {'users':>9} {'items':>9} {'interactions':>13} {'pretrain':>9}"
    lines = [header, "-" * len(header)]
    for name, d in manifest["domains"].items():
        lines.append(
            f"{name:<14} {d['num_users']:>9,} {d['num_items']:>9,} {d['num_interactions']:>13,} "
            f"{'yes' if d['pretrain'] else 'no':>9}"
        )
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
