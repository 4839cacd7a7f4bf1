"""Where a secret could show up in a Ray cluster for people other than its owner: the state
API (jobs, actors, tasks, workers and their runtime_env), the Ray Jobs list, and the files of
the session's logs. Used by the tests that pass tracking credentials to Ray processes."""

from __future__ import annotations

from pathlib import Path


def ray_places_holding(secret: str, dashboard: str, session_dir: str | Path) -> list[str]:
    """Every place named above that contains ``secret`` (empty: none does)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util import state

    found = []
    listings = {
        "state api: jobs": lambda: state.list_jobs(address=dashboard, detail=True),
        "state api: actors": lambda: state.list_actors(address=dashboard, detail=True),
        "state api: tasks": lambda: state.list_tasks(address=dashboard, detail=True),
        "state api: workers": lambda: state.list_workers(address=dashboard, detail=True),
        "ray job list": lambda: JobSubmissionClient(dashboard).list_jobs(),
    }
    for place, listing in listings.items():
        if secret in repr(listing()):
            found.append(place)
    for path in sorted(Path(session_dir, "logs").rglob("*")):
        if path.is_file() and secret.encode() in path.read_bytes():
            found.append(f"log {path.relative_to(session_dir)}")
    return found


def command_lines_holding(secret: str) -> list[str]:
    """The command lines (``ps``) of this machine's processes that contain ``secret``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # ended while we looked
        if secret.encode() in text:
            found.append(text.decode(errors="replace")[:200])
    return found
