"""What routing costs: one gateway with one upstream against one with ``UPSTREAMS`` of five,
side by side in one run, in front of one fake upstream.

    python bench/routing.py                         # ~4 minutes
    python bench/routing.py --configs off sqlite --rounds 5

The five-upstream gateway routes the bench's model (``gpt-4o-mini``) to the last of its
upstreams, after four whose patterns do not match, each with fallbacks: the most matching
a request can need. Each round runs wrk against the direct upstream, then both gateways
(which goes first alternates), at each concurrency, non-streamed, ~1 KB prompt. Prints every
round, then the medians: requests/s and the latency each adds to the direct upstream's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ab import side_by_side, summary  # noqa: E402
from fake_upstream.testing import serve_subprocess  # noqa: E402
from tests.gateway_process import REPO  # noqa: E402


def five_upstreams(base_url: str) -> dict[str, str]:
    """Four upstreams that do not serve the bench's model, then the one that does."""
    names = ["claude", "gemini", "local", "azure", "openai"]
    env = {"UPSTREAMS": ",".join(names)}
    for name, models in zip(
        names, ["claude-*", "gemini-*", "llama*,qwen*,mistral*", "gpt-4o,o3*", "gpt-*"], strict=True
    ):
        upper = name.upper()
        env[f"UPSTREAM_{upper}_BASE_URL"] = base_url
        env[f"UPSTREAM_{upper}_MODELS"] = models
    env["UPSTREAM_CLAUDE_FORMAT"] = "anthropic"
    env["UPSTREAM_OPENAI_FALLBACKS"] = "azure"
    env["UPSTREAM_AZURE_FALLBACKS"] = "local"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["off", "sqlite"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-routing-"))
    workdir.chmod(0o755)  # the database server runs as its own user
    with serve_subprocess() as upstream:
        for config in args.configs:
            variants = {"one": (REPO, {}), "five": (REPO, five_upstreams(upstream.base_url))}
            runs = side_by_side(
                upstream.base_url,
                config,
                workdir,
                variants,
                args.concurrency,
                args.rounds,
                args.duration,
            )
            summary(config, runs, args.concurrency, list(variants))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
